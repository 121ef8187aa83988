package nat

import (
	"encoding/binary"
	"slices"
	"testing"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/header"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/internal/fixture"
)

// outbound creates an entry for a client frame and translates it.
func outbound(t *testing.T, tb *Table, f []byte, now int64) *Entry {
	t.Helper()
	p := decode(t, f)
	if e := tb.LookupOut(p, now); e != nil {
		t.Fatalf("entry before Create: %+v", e)
	}
	e, err := tb.Create(p, uplink, now)
	if err != nil {
		t.Fatal(err)
	}
	if got := tb.LookupOut(p, now); got != e {
		t.Fatalf("LookupOut after Create = %p, want %p", got, e)
	}
	tb.TranslateOut(e, f, p, header.CsumFull, now)
	mustCheck(t, tb)
	return e
}

// inbound looks up and translates a frame from the uplink.
func inbound(t *testing.T, tb *Table, f []byte, want *Entry, now int64) {
	t.Helper()
	p := decode(t, f)
	e := tb.LookupIn(p, now)
	if e != want {
		t.Fatalf("LookupIn = %p, want %p", e, want)
	}
	tb.TranslateIn(e, f, p, header.CsumFull, now)
}

func TestUDPRoundTrip(t *testing.T) {
	tb := newTable(t, Config{MaxEntries: 16})
	f := ipFrame(header.ProtoUDP, client, remote, udpDgram(40000, 53, "query"))
	e := outbound(t, tb, f, 0)
	nat := e.NATPort()
	if nat < 1024 {
		t.Fatalf("NAT port %d outside the default range", nat)
	}
	sameBytes(t, "outbound", f, ipFrame(header.ProtoUDP, uplink, remote, udpDgram(nat, 53, "query")))
	checkFrame(t, f)
	if e.State() != StateNew || e.Assured() {
		t.Errorf("state %v assured %v before the reply", e.State(), e.Assured())
	}
	want := Tuple{header.ProtoUDP, client, remote, 40000, 53}
	if e.ClientTuple() != want || e.OutsideTuple() != (Tuple{header.ProtoUDP, uplink, remote, nat, 53}) ||
		e.ClientIP() != client || e.UplinkIP() != uplink {
		t.Errorf("entry tuples %+v %+v", e.ClientTuple(), e.OutsideTuple())
	}

	r := ipFrame(header.ProtoUDP, remote, uplink, udpDgram(53, nat, "answer!"))
	inbound(t, tb, r, e, sec)
	sameBytes(t, "inbound", r, ipFrame(header.ProtoUDP, remote, client, udpDgram(53, 40000, "answer!")))
	checkFrame(t, r)
	if e.State() != StateReplied || !e.Assured() {
		t.Errorf("state %v assured %v after the reply", e.State(), e.Assured())
	}
	// The reply must come from the flow's remote, to our port.
	for _, r := range [][]byte{
		ipFrame(header.ProtoUDP, router, uplink, udpDgram(53, nat, "x")),
		ipFrame(header.ProtoUDP, remote, uplink, udpDgram(54, nat, "x")),
		ipFrame(header.ProtoUDP, remote, uplink, udpDgram(53, nat+1, "x")),
		ipFrame(header.ProtoTCP, remote, uplink, tcpSeg(53, nat, header.TCPAck, "")),
		ipFrame(header.ProtoUDP, remote, uplink2, udpDgram(53, nat, "x")),
	} {
		if e := tb.LookupIn(decode(t, r), sec); e != nil {
			t.Errorf("LookupIn matched a foreign packet % x", r)
		}
	}
}

// A UDP datagram without a checksum keeps none.
func TestUDPNoChecksum(t *testing.T) {
	tb := newTable(t, Config{MaxEntries: 4})
	f := ipFrame(header.ProtoUDP, client, remote, udpDgram(40000, 53, "q"))
	f[14+20+6], f[14+20+7] = 0, 0
	e := outbound(t, tb, f, 0)
	want := ipFrame(header.ProtoUDP, uplink, remote, udpDgram(e.NATPort(), 53, "q"))
	want[14+20+6], want[14+20+7] = 0, 0
	sameBytes(t, "outbound", f, want)
}

// The TCP frame as a client sends it, written out so a reader can check
// the test fixtures themselves.
const synHex = `
fe ff ff ff ff ff  00 16 3e 5e 6c 00  08 00     # Ethernet: dst, src, IPv4
45 00 00 28  12 34 00 00  40 06 28 34           # IPv4: len 40, id, ttl 64, TCP, checksum
0a 89 00 05  5d b8 d8 22                        # src 10.137.0.5, dst 93.184.216.34
9c 40 01 bb  01 02 03 04  0a 0b 0c 0d           # TCP: ports 40000 -> 443, seq, ack
50 02 fa f0  bc 6f 00 00                        # data offset 20, SYN, window, checksum, urgent
`

func TestTCPRoundTrip(t *testing.T) {
	tb := newTable(t, Config{MaxEntries: 16})
	f := fixture.Hex(t, synHex)
	sameBytes(t, "fixture", f, ipFrame(header.ProtoTCP, client, remote, tcpSeg(40000, 443, header.TCPSyn, "")))
	e := outbound(t, tb, f, 0)
	nat := e.NATPort()
	sameBytes(t, "SYN out", f, ipFrame(header.ProtoTCP, uplink, remote, tcpSeg(nat, 443, header.TCPSyn, "")))
	checkFrame(t, f)
	if e.State() != TCPSynSent || e.Assured() || e.Established() {
		t.Fatalf("after SYN: %v", e.State())
	}

	r := ipFrame(header.ProtoTCP, remote, uplink, tcpSeg(443, nat, header.TCPSyn|header.TCPAck, ""))
	inbound(t, tb, r, e, sec)
	sameBytes(t, "SYN-ACK in", r, ipFrame(header.ProtoTCP, remote, client, tcpSeg(443, 40000, header.TCPSyn|header.TCPAck, "")))
	checkFrame(t, r)
	if e.State() != TCPEstablished || !e.Assured() || !e.Established() {
		t.Fatalf("after SYN-ACK: %v", e.State())
	}

	// Odd-length payload: the checksum update must not care.
	d := ipFrame(header.ProtoTCP, client, remote, tcpSeg(40000, 443, header.TCPAck|header.TCPPsh, "GET / HTTP/1.0\r\n\r"))
	p := decode(t, d)
	if tb.LookupOut(p, 2*sec) != e {
		t.Fatal("data segment: no entry")
	}
	tb.TranslateOut(e, d, p, header.CsumFull, 2*sec)
	sameBytes(t, "data out", d, ipFrame(header.ProtoTCP, uplink, remote, tcpSeg(nat, 443, header.TCPAck|header.TCPPsh, "GET / HTTP/1.0\r\n\r")))
}

// With checksum offload the field holds the pseudo-header sum only
// (folded, not complemented) and ports are not part of it.
func TestTCPCsumPartial(t *testing.T) {
	tb := newTable(t, Config{MaxEntries: 16})
	partial := func(src, dst [4]byte, payload string) []byte {
		f := ipFrame(header.ProtoTCP, src, dst, tcpSeg(1, 2, header.TCPAck, payload))
		n := 20 + len(payload)
		binary.BigEndian.PutUint16(f[34+16:], sum16(nil, pseudo(src, dst, header.ProtoTCP, n)))
		return f
	}
	setPorts := func(f []byte, s, d uint16) []byte {
		binary.BigEndian.PutUint16(f[34:], s)
		binary.BigEndian.PutUint16(f[36:], d)
		return f
	}
	f := setPorts(partial(client, remote, "hello"), 40000, 443)
	p := decode(t, f)
	e, err := tb.Create(p, uplink, 0)
	if err != nil {
		t.Fatal(err)
	}
	tb.TranslateOut(e, f, p, header.CsumPartial, 0)
	sameBytes(t, "partial out", f, setPorts(partial(uplink, remote, "hello"), e.NATPort(), 443))

	r := setPorts(partial(remote, uplink, "hi"), 443, e.NATPort())
	p = decode(t, r)
	if tb.LookupIn(p, 0) != e {
		t.Fatal("no entry for the reply")
	}
	tb.TranslateIn(e, r, p, header.CsumPartial, 0)
	sameBytes(t, "partial in", r, setPorts(partial(remote, client, "hi"), 443, 40000))
	// Completing the checksum as the device would gives a valid segment.
	l4 := r[34:]
	binary.BigEndian.PutUint16(l4[16:], ^sum16(l4, 0))
	checkFrame(t, r)
}

func TestICMPEchoRoundTrip(t *testing.T) {
	tb := newTable(t, Config{MaxEntries: 16})
	f := ipFrame(header.ProtoICMP, client, remote, icmpEcho(header.ICMPEcho, 0x1111, 7, "ping!"))
	e := outbound(t, tb, f, 0)
	id := e.NATPort()
	sameBytes(t, "echo out", f, ipFrame(header.ProtoICMP, uplink, remote, icmpEcho(header.ICMPEcho, id, 7, "ping!")))
	checkFrame(t, f)
	if e.ClientTuple() != (Tuple{header.ProtoICMP, client, remote, 0x1111, 0}) {
		t.Errorf("client tuple %+v", e.ClientTuple())
	}

	r := ipFrame(header.ProtoICMP, remote, uplink, icmpEcho(header.ICMPEchoReply, id, 7, "ping!"))
	inbound(t, tb, r, e, sec)
	sameBytes(t, "echo reply in", r, ipFrame(header.ProtoICMP, remote, client, icmpEcho(header.ICMPEchoReply, 0x1111, 7, "ping!")))
	checkFrame(t, r)
	if !e.Assured() {
		t.Error("echo reply did not assure the entry")
	}
	// An echo request from outside with our identifier is not a reply.
	in := ipFrame(header.ProtoICMP, remote, uplink, icmpEcho(header.ICMPEcho, id, 8, ""))
	if tb.LookupIn(decode(t, in), sec) != nil {
		t.Error("inbound echo request matched the entry")
	}
	// Replies are not flows a client opens.
	rep := ipFrame(header.ProtoICMP, client, remote, icmpEcho(header.ICMPEchoReply, 5, 1, ""))
	if _, err := tb.Create(decode(t, rep), uplink, 0); err != ErrUnsupported {
		t.Errorf("Create(echo reply) = %v, want ErrUnsupported", err)
	}
}

func TestICMPErrorUDPPortUnreachable(t *testing.T) {
	tb := newTable(t, Config{MaxEntries: 16})
	orig := ipFrame(header.ProtoUDP, client, remote, udpDgram(40000, 5000, "some payload"))
	f := slices.Clone(orig)
	e := outbound(t, tb, f, 0)

	// The remote host answers with port unreachable quoting 28 bytes.
	er := ipFrame(header.ProtoICMP, remote, uplink, icmpErr(header.ICMPDestUnreach, header.ICMPPortUnreach, 0, f[14:14+28]))
	p := decode(t, er)
	if got := tb.TranslateICMPErrorIn(er, p, sec); got != e {
		t.Fatalf("TranslateICMPErrorIn = %p, want %p", got, e)
	}
	sameBytes(t, "error in", er, ipFrame(header.ProtoICMP, remote, client, icmpErr(header.ICMPDestUnreach, header.ICMPPortUnreach, 0, orig[14:14+28])))
	checkFrame(t, er)
	if p.Dst != client {
		t.Errorf("Parsed.Dst = %v, want the client", p.Dst)
	}
	if e.Assured() {
		t.Error("an ICMP error assured the entry")
	}

	// The whole datagram quoted: the quoted UDP checksum is checked too.
	f = slices.Clone(orig)
	tb.TranslateOut(e, f, decode(t, f), header.CsumFull, 0)
	er = ipFrame(header.ProtoICMP, router, uplink, icmpErr(header.ICMPTimeExceeded, 0, 0, f[14:]))
	if tb.TranslateICMPErrorIn(er, decode(t, er), sec) != e {
		t.Fatal("time exceeded not translated")
	}
	sameBytes(t, "time exceeded in", er, ipFrame(header.ProtoICMP, router, client, icmpErr(header.ICMPTimeExceeded, 0, 0, orig[14:])))
	checkFrame(t, er)
}

func TestICMPErrorTCPFragNeeded(t *testing.T) {
	tb := newTable(t, Config{MaxEntries: 16})
	orig := ipFrame(header.ProtoTCP, client, remote, tcpSeg(40000, 443, header.TCPAck|header.TCPPsh, "a large segment"))
	e := outbound(t, tb, slices.Clone(orig), 0)
	for _, n := range []int{8, 16, 18, 20, 20 + 15} { // quoted TCP bytes; 35 = all of it
		f := slices.Clone(orig)
		tb.TranslateOut(e, f, decode(t, f), header.CsumFull, 0)
		er := ipFrame(header.ProtoICMP, router, uplink, icmpErr(header.ICMPDestUnreach, header.ICMPFragNeeded, 1400, f[14:14+20+n]))
		if tb.TranslateICMPErrorIn(er, decode(t, er), sec) != e {
			t.Fatalf("%d bytes quoted: not translated", n)
		}
		sameBytes(t, "frag needed in", er, ipFrame(header.ProtoICMP, router, client, icmpErr(header.ICMPDestUnreach, header.ICMPFragNeeded, 1400, orig[14:14+20+n])))
		checkFrame(t, er)
	}
}

func TestICMPErrorEchoTimeExceeded(t *testing.T) {
	tb := newTable(t, Config{MaxEntries: 16})
	orig := ipFrame(header.ProtoICMP, client, remote, icmpEcho(header.ICMPEcho, 0x2222, 1, "traceroute"))
	f := slices.Clone(orig)
	e := outbound(t, tb, f, 0)
	er := ipFrame(header.ProtoICMP, router, uplink, icmpErr(header.ICMPTimeExceeded, 0, 0, f[14:]))
	if tb.TranslateICMPErrorIn(er, decode(t, er), sec) != e {
		t.Fatal("not translated")
	}
	sameBytes(t, "time exceeded in", er, ipFrame(header.ProtoICMP, router, client, icmpErr(header.ICMPTimeExceeded, 0, 0, orig[14:])))
	checkFrame(t, er)
}

// A client reports an error about a packet it received through NAT: the
// quote must name our uplink address and port, as the remote sent it.
func TestICMPErrorOut(t *testing.T) {
	for _, tc := range []struct {
		name  string
		proto uint8
		l4    func(sport, dport uint16) []byte
		code  uint8
		n     int // bytes of the reply quoted, 0 = all
	}{
		{"udp port unreachable", header.ProtoUDP, func(s, d uint16) []byte { return udpDgram(s, d, "reply") }, header.ICMPPortUnreach, 28},
		{"udp whole", header.ProtoUDP, func(s, d uint16) []byte { return udpDgram(s, d, "reply") }, header.ICMPPortUnreach, 0},
		{"tcp 8 bytes", header.ProtoTCP, func(s, d uint16) []byte { return tcpSeg(s, d, header.TCPAck, "data") }, header.ICMPFragNeeded, 28},
		{"tcp whole", header.ProtoTCP, func(s, d uint16) []byte { return tcpSeg(s, d, header.TCPAck, "data") }, header.ICMPFragNeeded, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tb := newTable(t, Config{MaxEntries: 16})
			e := outbound(t, tb, ipFrame(tc.proto, client, remote, tc.l4(40000, 8080)), 0)
			sent := ipFrame(tc.proto, remote, uplink, tc.l4(8080, e.NATPort()))
			r := slices.Clone(sent)
			inbound(t, tb, r, e, 0)
			n := tc.n
			if n == 0 {
				n = len(r) - 14
			}
			er := ipFrame(header.ProtoICMP, client, remote, icmpErr(header.ICMPDestUnreach, tc.code, 0, r[14:14+n]))
			p := decode(t, er)
			if tb.TranslateICMPErrorOut(er, p, sec) != e {
				t.Fatal("not translated")
			}
			sameBytes(t, "error out", er, ipFrame(header.ProtoICMP, uplink, remote, icmpErr(header.ICMPDestUnreach, tc.code, 0, sent[14:14+n])))
			checkFrame(t, er)
			if p.Src != uplink {
				t.Errorf("Parsed.Src = %v", p.Src)
			}
		})
	}
}

// Hostile or foreign ICMP errors are refused and left untouched.
func TestICMPErrorHostile(t *testing.T) {
	tb := newTable(t, Config{MaxEntries: 16})
	orig := ipFrame(header.ProtoUDP, client, remote, udpDgram(40000, 5000, "payload"))
	f := slices.Clone(orig)
	e := outbound(t, tb, f, 0)
	quote := func() []byte { return slices.Clone(f[14 : 14+28]) }
	mod := func(fn func(q []byte) []byte) []byte { return fn(quote()) }
	echo := ipFrame(header.ProtoICMP, uplink, remote, icmpEcho(header.ICMPEcho, e.NATPort(), 1, ""))
	for _, tc := range []struct {
		name  string
		outer [4]byte // outer destination
		q     []byte
		fix   bool // fix the outer ICMP checksum after tampering
	}{
		{"truncated quote", uplink, quote()[:24], true},
		{"quote without transport", uplink, quote()[:20], true},
		{"header length past the quote", uplink, mod(func(q []byte) []byte { q[0] = 0x4f; return q }), true},
		{"header length below 20", uplink, mod(func(q []byte) []byte { q[0] = 0x44; return q }), true},
		{"total length below header+8", uplink, mod(func(q []byte) []byte { q[2], q[3] = 0, 24; return q }), true},
		{"not IPv4", uplink, mod(func(q []byte) []byte { q[0] = 0x65; return q }), true},
		{"non-first fragment", uplink, mod(func(q []byte) []byte { q[7] = 1; return q }), true},
		{"unknown port", uplink, mod(func(q []byte) []byte { q[21]++; return q }), true},
		{"unknown remote", uplink, mod(func(q []byte) []byte { q[19]++; return q }), true},
		{"udp length below 8", uplink, mod(func(q []byte) []byte { q[24], q[25] = 0, 4; return q }), true},
		{"other protocol", uplink, mod(func(q []byte) []byte { q[9] = 47; return q }), true},
		{"quotes an ICMP error", uplink, icmpErrQuote(f), true},
		{"quotes an echo reply", uplink, mod(func(q []byte) []byte {
			q = slices.Clone(echo[14:42])
			q[20] = header.ICMPEchoReply
			return q
		}), true},
		{"outer dst is not the quoted src", uplink2, quote(), true},
		{"bad outer checksum", uplink, quote(), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			er := ipFrame(header.ProtoICMP, remote, tc.outer, icmpErr(header.ICMPDestUnreach, header.ICMPPortUnreach, 0, tc.q))
			if !tc.fix {
				er[14+20+2]++
			}
			before := slices.Clone(er)
			p := decode(t, er)
			if got := tb.TranslateICMPErrorIn(er, p, sec); got != nil {
				t.Fatalf("translated: %+v", got)
			}
			sameBytes(t, "frame", er, before)
			// The same quote from a client is refused as well.
			out := ipFrame(header.ProtoICMP, client, remote, icmpErr(header.ICMPDestUnreach, header.ICMPPortUnreach, 0, tc.q))
			if tb.TranslateICMPErrorOut(out, decode(t, out), sec) != nil {
				t.Fatal("translated outbound")
			}
		})
	}
	// Not an error at all.
	if tb.TranslateICMPErrorIn(echo, decode(t, echo), sec) != nil {
		t.Error("echo request taken for an error")
	}
	// An expired flow is unknown.
	er := ipFrame(header.ProtoICMP, remote, uplink, icmpErr(header.ICMPDestUnreach, header.ICMPPortUnreach, 0, quote()))
	if tb.TranslateICMPErrorIn(er, decode(t, er), 3600*sec) != nil || tb.Len() != 0 {
		t.Error("error for an expired flow translated")
	}
}

// icmpErrQuote quotes an ICMP error (itself quoting f) as if we had sent it.
func icmpErrQuote(f []byte) []byte {
	inner := ipFrame(header.ProtoICMP, uplink, remote, icmpErr(header.ICMPDestUnreach, header.ICMPPortUnreach, 0, f[14:14+28]))
	return inner[14 : 14+28]
}

// A client's error about an echo reply it received quotes the reply with
// its own identifier; the remote must see ours.
func TestICMPErrorOutQuotingEchoReply(t *testing.T) {
	tb := newTable(t, Config{MaxEntries: 16})
	e := outbound(t, tb, ipFrame(header.ProtoICMP, client, remote, icmpEcho(header.ICMPEcho, 0x3333, 1, "x")), 0)
	sent := ipFrame(header.ProtoICMP, remote, uplink, icmpEcho(header.ICMPEchoReply, e.NATPort(), 1, "x"))
	r := slices.Clone(sent)
	inbound(t, tb, r, e, 0)
	er := ipFrame(header.ProtoICMP, client, remote, icmpErr(header.ICMPParamProblem, 0, 0, r[14:]))
	if tb.TranslateICMPErrorOut(er, decode(t, er), 0) != e {
		t.Fatal("not translated")
	}
	sameBytes(t, "error out", er, ipFrame(header.ProtoICMP, uplink, remote, icmpErr(header.ICMPParamProblem, 0, 0, sent[14:])))
	checkFrame(t, er)
}

// A client may only report an error about one of its flows to that flow's
// remote end. Before, the outer destination was not checked: a client
// allowed only DNS sent a 1,071-byte "port unreachable" quoting its DNS
// reply to an arbitrary host, and it was NATed and sent.
func TestICMPErrorOutOnlyToTheFlowsRemote(t *testing.T) {
	tb := newTable(t, Config{MaxEntries: 16})
	e := outbound(t, tb, ipFrame(header.ProtoUDP, client, remote, udpDgram(40000, 53, "query")), 0)
	r := ipFrame(header.ProtoUDP, remote, uplink, udpDgram(53, e.NATPort(), string(make([]byte, 1000))))
	inbound(t, tb, r, e, 0)
	stranger := [4]byte{203, 0, 113, 99}
	for _, tc := range []struct {
		name  string
		typ   uint8
		outer [4]byte
		n     int // bytes of the reply quoted
		want  bool
	}{
		{"to the remote, 28 bytes", header.ICMPDestUnreach, remote, 28, true},
		{"to the remote, 548 bytes: 576 in all", header.ICMPDestUnreach, remote, 548, true},
		{"to another host", header.ICMPDestUnreach, stranger, 28, false},
		{"to another host, whole reply", header.ICMPDestUnreach, stranger, len(r) - 14, false},
		{"to the remote, 577 bytes in all", header.ICMPDestUnreach, remote, 549, false},
		{"to the remote, whole reply", header.ICMPDestUnreach, remote, len(r) - 14, false},
		{"redirect", header.ICMPRedirect, remote, 28, false},
		{"source quench", header.ICMPSourceQuench, remote, 28, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			er := ipFrame(header.ProtoICMP, client, tc.outer, icmpErr(tc.typ, header.ICMPPortUnreach, 0, slices.Clone(r[14:14+tc.n])))
			before := slices.Clone(er)
			got := tb.TranslateICMPErrorOut(er, decode(t, er), sec)
			if (got != nil) != tc.want {
				t.Fatalf("translated = %v, want %v", got != nil, tc.want)
			}
			if !tc.want {
				sameBytes(t, "refused frame", er, before)
			}
		})
	}
}

// Redirects and source quench from the uplink are not translated either.
func TestICMPErrorInRedirectRefused(t *testing.T) {
	tb := newTable(t, Config{MaxEntries: 16})
	f := ipFrame(header.ProtoUDP, client, remote, udpDgram(40000, 5000, "payload"))
	e := outbound(t, tb, f, 0)
	for _, typ := range []uint8{header.ICMPRedirect, header.ICMPSourceQuench} {
		er := ipFrame(header.ProtoICMP, remote, uplink, icmpErr(typ, 1, 0, slices.Clone(f[14:14+28])))
		if got := tb.TranslateICMPErrorIn(er, decode(t, er), sec); got != nil {
			t.Errorf("type %d translated (entry %p, flow %p)", typ, got, e)
		}
	}
	// The same quote as "port unreachable" is.
	er := ipFrame(header.ProtoICMP, remote, uplink, icmpErr(header.ICMPDestUnreach, header.ICMPPortUnreach, 0, slices.Clone(f[14:14+28])))
	if tb.TranslateICMPErrorIn(er, decode(t, er), sec) != e {
		t.Error("port unreachable not translated")
	}
}
