package nat

import (
	"encoding/binary"
	"slices"
	"testing"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/header"
)

// fuzzTable has one TCP, one UDP and one ICMP echo flow from client, and
// returns the frames each sent on the uplink.
func fuzzTable(t testing.TB) (*Table, [][]byte) {
	tb := newTable(t, Config{MaxEntries: 8})
	var sent [][]byte
	for _, f := range [][]byte{
		ipFrame(header.ProtoTCP, client, remote, tcpSeg(40000, 443, header.TCPAck, "0123456789")),
		ipFrame(header.ProtoUDP, client, remote, udpDgram(40001, 53, "query")),
		ipFrame(header.ProtoICMP, client, remote, icmpEcho(header.ICMPEcho, 0x1111, 1, "ping")),
	} {
		p := decode(t, f)
		e, err := tb.Create(p, uplink, 0)
		if err != nil {
			t.Fatal(err)
		}
		tb.TranslateOut(e, f, p, header.CsumFull, 0)
		sent = append(sent, f)
	}
	return tb, sent
}

// The fuzzer supplies the whole ICMP message after a valid outer IPv4
// header (its checksum made valid so that the quote gets examined).
func FuzzTranslateICMPErrorIn(f *testing.F) {
	_, sent := fuzzTable(f)
	for _, s := range sent {
		for _, n := range []int{28, 32, 40, len(s) - 14} {
			n = min(n, len(s)-14)
			f.Add(icmpErr(header.ICMPDestUnreach, header.ICMPPortUnreach, 0, s[14:14+n]))
			f.Add(icmpErr(header.ICMPTimeExceeded, 0, 0, s[14:14+n]))
		}
	}
	f.Add(icmpErr(header.ICMPDestUnreach, header.ICMPFragNeeded, 1280, icmpErrQuote(sent[1])))
	f.Fuzz(func(t *testing.T, msg []byte) {
		if len(msg) < 4 || len(msg) > 1500 {
			return
		}
		tb, _ := fuzzTable(t)
		fr := ipFrame(header.ProtoICMP, remote, uplink, msg)
		var p header.Parsed
		p.Decode(fr)
		if e := tb.TranslateICMPErrorIn(fr, &p, sec); e != nil {
			checkTranslated(t, fr, client, [4]byte(fr[14+12:]))
		}
		mustCheck(t, tb)

		// The same message from the client, about a packet it received.
		fr = ipFrame(header.ProtoICMP, client, remote, msg)
		p.Decode(fr)
		if e := tb.TranslateICMPErrorOut(fr, &p, sec); e != nil {
			checkTranslated(t, fr, remote, uplink)
		}
		mustCheck(t, tb)
	})
}

// checkTranslated verifies a translated ICMP error: still a valid IPv4
// packet to dst from src with a correct IP header and ICMP checksum.
func checkTranslated(t *testing.T, fr []byte, dst, src [4]byte) {
	t.Helper()
	var p header.Parsed
	p.Decode(fr)
	if p.Kind != header.KindIPv4 || p.Dst != dst || p.Src != src {
		t.Fatalf("translated frame decodes as %+v", p)
	}
	ip := fr[14:]
	if sum16(ip[:20], 0) != 0xffff {
		t.Fatal("IP checksum wrong after translation")
	}
	if sum16(fr[p.L4Off:p.End], 0) != 0xffff {
		t.Fatal("ICMP checksum wrong after translation")
	}
}

// FuzzOperations runs random sequences of table operations and checks the
// table's invariants after each one, and the checksums of every packet
// it translates.
func FuzzOperations(f *testing.F) {
	f.Add([]byte{0, 0, 0, 0, 0, 0, 1, 0, 0, 2, 200, 3, 0})
	f.Add([]byte{0, 1, 1, 1, 1, 1, 0, 2, 2, 2, 2, 0, 1, 0, 1, 4, 1, 6, 1, 0, 1, 5, 5, 0})
	f.Add(slices.Repeat([]byte{0, 3, 7, 1, 9, 1}, 40))
	f.Fuzz(func(t *testing.T, ops []byte) {
		const max = 8
		tb := newTable(t, Config{MaxEntries: max, PortMin: 1024, PortMax: 1039})
		next := func() byte {
			if len(ops) == 0 {
				return 0
			}
			b := ops[0]
			ops = ops[1:]
			return b
		}
		protos := []uint8{header.ProtoTCP, header.ProtoUDP, header.ProtoICMP}
		ups := [][4]byte{uplink, uplink2}
		var reserved []uint16
		now := int64(0)
		for len(ops) > 0 {
			switch next() % 9 {
			case 0: // a client packet
				proto, c, rp, cp, up, flags := protos[next()%3], [4]byte{10, 137, 0, next() % 4}, uint16(next()%3), uint16(next()%8), ups[next()%2], next()
				var l4 []byte
				switch proto {
				case header.ProtoTCP:
					l4 = tcpSeg(cp, rp, flags, "x")
				case header.ProtoUDP:
					l4 = udpDgram(cp, rp, "x")
				default:
					l4 = icmpEcho(header.ICMPEcho, cp, 0, "x")
				}
				fr := ipFrame(proto, c, remote, l4)
				p := decode(t, fr)
				e := tb.LookupOut(p, now)
				if e == nil {
					var err error
					if e, err = tb.Create(p, up, now); err != nil {
						continue
					}
				}
				tb.TranslateOut(e, fr, p, header.CsumFull, now)
				checkFrame(t, fr)
				if p.Src != e.UplinkIP() || [4]byte(fr[14+12:]) != e.UplinkIP() {
					t.Fatal("packet left without the uplink address")
				}
			case 1: // a reply to a live entry
				e := &tb.slab[int(next())%max]
				if e.flags&flagLive == 0 || e.expires <= now {
					continue
				}
				o := e.OutsideTuple()
				var l4 []byte
				switch o.Proto {
				case header.ProtoTCP:
					l4 = tcpSeg(o.DstPort, o.SrcPort, next(), "y")
				case header.ProtoUDP:
					l4 = udpDgram(o.DstPort, o.SrcPort, "y")
				default:
					l4 = icmpEcho(header.ICMPEchoReply, o.SrcPort, 0, "y")
				}
				fr := ipFrame(o.Proto, o.Dst, o.Src, l4)
				p := decode(t, fr)
				if got := tb.LookupIn(p, now); got != e {
					t.Fatalf("LookupIn = %p, want %p", got, e)
				}
				tb.TranslateIn(e, fr, p, header.CsumFull, now)
				checkFrame(t, fr)
				if binary.BigEndian.Uint16(fr[36:]) != e.ct.SrcPort && o.Proto != header.ProtoICMP {
					t.Fatal("reply not sent to the client's port")
				}
			case 2:
				now += int64(next()) * sec
			case 3:
				tb.Expire(now)
			case 4:
				tb.FlushClient([4]byte{10, 137, 0, next() % 4})
			case 5:
				tb.FlushUplink(ups[next()%2])
			case 6:
				if p, err := tb.ReservePort(protos[next()%3]); err == nil {
					reserved = append(reserved, p)
				}
			case 7:
				if len(reserved) > 0 {
					for _, proto := range protos {
						tb.ReleasePort(proto, reserved[0])
					}
					reserved = reserved[1:]
				}
			case 8:
				b := next()
				tb.FlushIf(func(e *Entry) bool { return byte(e.natPort)&b != 0 })
			}
			mustCheck(t, tb)
			if tb.Len() > max {
				t.Fatalf("Len %d > %d", tb.Len(), max)
			}
		}
	})
}
