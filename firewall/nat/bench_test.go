package nat

import (
	"testing"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/header"
)

// BenchmarkFastPath is a packet of an existing TCP flow: lookup and
// translation, plus restoring the 54-byte frame and its Parsed for the
// next round (a few ns).
func BenchmarkFastPath(b *testing.B) {
	tb := newTable(b, Config{MaxEntries: 65536})
	fillTable(b, tb, 10000)
	orig := ipFrame(header.ProtoTCP, client, remote, tcpSeg(40000, 443, header.TCPAck, ""))
	f := make([]byte, len(orig))
	p0 := *decode(b, orig)
	if _, err := tb.Create(&p0, uplink, 0); err != nil {
		b.Fatal(err)
	}
	var p header.Parsed
	b.ReportAllocs()
	for b.Loop() {
		copy(f, orig)
		p = p0
		e := tb.LookupOut(&p, sec)
		tb.TranslateOut(e, f, &p, header.CsumFull, sec)
	}
	if [4]byte(f[26:30]) != uplink {
		b.Fatal("not translated")
	}
}

// BenchmarkCreate is the first packet of a new flow in a table of 10k
// entries (each new flow replaces one, keeping the table at 10k). ClientMax
// lets the creating client take the whole table: at the default share it
// would, after 5k flows, have to find its own entries near the LRU tail,
// which are all newer than the filler's, and Create would refuse with
// ErrClientQuota (the share's purpose, not the cost measured here).
func BenchmarkCreate(b *testing.B) {
	tb := newTable(b, Config{MaxEntries: 10000, ClientMax: 10000})
	fillTable(b, tb, 10000)
	p := decode(b, ipFrame(header.ProtoUDP, client, remote, udpDgram(1, 53, "")))
	n := uint32(0)
	b.ReportAllocs()
	for b.Loop() {
		n++
		p.SrcPort, p.Dst[3] = uint16(n), byte(n>>16)
		if _, err := tb.Create(p, uplink, sec); err != nil {
			b.Fatal(err)
		}
	}
}

func fillTable(b *testing.B, tb *Table, n int) {
	p := decode(b, ipFrame(header.ProtoUDP, client2, remote, udpDgram(1, 53, "")))
	for i := range n {
		p.SrcPort, p.Dst[3] = uint16(i), byte(i>>16)
		if _, err := tb.Create(p, uplink, 0); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkManyFlows is a packet of one of 50,000 live flows, visited in
// a scattered order, so that the entries and their LRU neighbours are
// rarely in cache: what a busy table costs per packet (lookup, the LRU
// update, translation), out (client to uplink) and in (the replies).
func BenchmarkManyFlows(b *testing.B) {
	const n = 50000
	tb := newTable(b, Config{MaxEntries: 65536})
	var frames [2][][]byte // out, in
	var parsed [2][]header.Parsed
	for i := range n {
		remote := [4]byte{198, 51, byte(i >> 8), byte(i)}
		f := ipFrame(header.ProtoUDP, client, remote, udpDgram(uint16(1024+i%50000), 443, ""))
		p := *decode(b, f)
		e, err := tb.Create(&p, uplink, 0)
		if err != nil {
			b.Fatal(err)
		}
		frames[0] = append(frames[0], f)
		parsed[0] = append(parsed[0], p)
		f = ipFrame(header.ProtoUDP, remote, uplink, udpDgram(443, e.NATPort(), ""))
		frames[1] = append(frames[1], f)
		parsed[1] = append(parsed[1], *decode(b, f))
	}
	for d, name := range []string{"out", "in"} {
		b.Run(name, func(b *testing.B) {
			f := make([]byte, len(frames[d][0]))
			var p header.Parsed
			i, now := 0, int64(0)
			b.ReportAllocs()
			for b.Loop() {
				i = (i + 7919) % n // a prime stride: every flow, out of order
				now += 100         // 10 Mpps: ticks pass as they would
				copy(f, frames[d][i])
				p = parsed[d][i]
				if d == 0 {
					e := tb.LookupOut(&p, now)
					if e == nil {
						b.Fatal("flow lost")
					}
					tb.TranslateOut(e, f, &p, header.CsumFull, now)
				} else {
					e := tb.LookupIn(&p, now)
					if e == nil {
						b.Fatal("flow lost")
					}
					tb.TranslateIn(e, f, &p, header.CsumFull, now)
				}
			}
		})
	}
}
