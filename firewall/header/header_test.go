package header

import (
	"encoding/binary"
	"math/rand/v2"
	"testing"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/internal/fixture"
)

// A TCP SYN from 10.137.0.5:40000 to 93.184.216.34:443 as a client sends it.
const synFrame = `
fe ff ff ff ff ff  00 16 3e 5e 6c 00  08 00     # Ethernet: dst, src, IPv4
45 00 00 2c  12 34 40 00  40 06 00 00           # IPv4: len 44, id, DF, ttl 64, tcp, csum (filled in by test)
0a 89 00 05  5d b8 d8 22                        # src 10.137.0.5, dst 93.184.216.34
9c 40 01 bb  00 00 00 01  00 00 00 00           # TCP: ports 40000 -> 443, seq 1, ack 0
60 02 fa f0  00 00 00 00                        # data offset 24, SYN, window, csum, urgent
02 04 05 b4                                     # MSS option 1460
`

func fixChecksums(f []byte) {
	ip := IPv4(f[EthernetLen:])
	ip.SetChecksum(0)
	ip.SetChecksum(Checksum(ip[:ip.HeaderLen()]))
	l4 := ip[ip.HeaderLen():ip.TotalLen()]
	var off int
	switch ip.Protocol() {
	case ProtoTCP:
		off = TCPChecksumOffset
	case ProtoUDP:
		off = UDPChecksumOffset
	case ProtoICMP:
		binary.BigEndian.PutUint16(l4[2:], 0)
		binary.BigEndian.PutUint16(l4[2:], Checksum(l4))
		return
	}
	binary.BigEndian.PutUint16(l4[off:], 0)
	binary.BigEndian.PutUint16(l4[off:], ^Fold(Sum(l4, PseudoHeaderSum(ip.Src(), ip.Dst(), ip.Protocol(), uint16(len(l4))))))
}

// transportValid recomputes the transport checksum from scratch.
func transportValid(f []byte) bool {
	ip := IPv4(f[EthernetLen:])
	l4 := ip[ip.HeaderLen():ip.TotalLen()]
	if ip.Protocol() == ProtoICMP {
		return Fold(Sum(l4, 0)) == 0xffff
	}
	return Fold(Sum(l4, PseudoHeaderSum(ip.Src(), ip.Dst(), ip.Protocol(), uint16(len(l4))))) == 0xffff
}

func TestDecodeSYN(t *testing.T) {
	f := fixture.Hex(t, synFrame)
	fixChecksums(f)
	var p Parsed
	p.Decode(f)
	want := Parsed{Kind: KindIPv4, EtherType: EtherTypeIPv4, IPOff: 14, L4Off: 34, End: 58, Proto: ProtoTCP,
		Src: [4]byte{10, 137, 0, 5}, Dst: [4]byte{93, 184, 216, 34}, TTL: 64,
		SrcPort: 40000, DstPort: 443, TCPFlags: TCPSyn, TCPSeq: 1}
	if p != want {
		t.Fatalf("Decode:\n got %+v\nwant %+v", p, want)
	}
	if !IPv4(f[14:]).ChecksumValid() || !transportValid(f) {
		t.Fatal("fixture checksums invalid")
	}
}

func TestDecodeRejectsInconsistentLengths(t *testing.T) {
	base := fixture.Hex(t, synFrame)
	cases := []struct {
		name   string
		mutate func(f []byte) []byte
	}{
		{"short ethernet", func(f []byte) []byte { return f[:13] }},
		{"short ip", func(f []byte) []byte { return f[:14+19] }},
		{"version 6 in ipv4 ethertype", func(f []byte) []byte { f[14] = 0x65; return f }},
		{"ihl 4", func(f []byte) []byte { f[14] = 0x44; return f }},
		{"ihl beyond total", func(f []byte) []byte { f[14] = 0x4f; return f }},
		{"total len beyond frame", func(f []byte) []byte { f[17] = 0x2d; return f }},
		{"total len below header", func(f []byte) []byte { f[16], f[17] = 0, 19; return f }},
		{"tcp truncated", func(f []byte) []byte { f[16], f[17] = 0, 20+19; return f }},
		{"tcp data offset beyond packet", func(f []byte) []byte { f[14+20+12] = 0xf0; return f }},
		{"tcp data offset below 20", func(f []byte) []byte { f[14+20+12] = 0x40; return f }},
		{"udp length beyond packet", func(f []byte) []byte { f[23] = ProtoUDP; f[14+20+4], f[14+20+5] = 0, 25; return f }},
		{"udp length below 8", func(f []byte) []byte { f[23] = ProtoUDP; f[14+20+4], f[14+20+5] = 0, 7; return f }},
		{"icmp truncated", func(f []byte) []byte { f[23] = ProtoICMP; f[16], f[17] = 0, 27; return f }},
	}
	for _, c := range cases {
		f := c.mutate(append([]byte(nil), base...))
		var p Parsed
		p.Decode(f)
		if p.Kind != KindInvalid {
			t.Errorf("%s: Kind = %v, want invalid", c.name, p.Kind)
		}
	}
}

func TestDecodeKinds(t *testing.T) {
	arp := make([]byte, EthernetLen+ARPLen)
	PutEthernet(arp, BroadcastMAC, [6]byte{2}, EtherTypeARP)
	PutARP(arp[EthernetLen:], ARPRequest, [6]byte{2}, [4]byte{10, 0, 0, 1}, [6]byte{}, [4]byte{10, 0, 0, 2})
	v6 := make([]byte, 60)
	PutEthernet(v6, BroadcastMAC, [6]byte{2}, EtherTypeIPv6)
	other := make([]byte, 60)
	PutEthernet(other, BroadcastMAC, [6]byte{2}, 0x88cc)
	badARP := append([]byte(nil), arp...)
	badARP[EthernetLen+4] = 8 // hlen 8
	frag := fixture.Hex(t, synFrame)
	frag[14+6] = 0x20 // MF
	IPv4(frag[14:]).SetChecksum(0)
	IPv4(frag[14:]).SetChecksum(IPv4(frag[14:]).CalculateChecksum())
	badSum := fixture.Hex(t, synFrame)
	badSum[14+10]++
	for _, c := range []struct {
		f    []byte
		want Kind
	}{{arp, KindARP}, {v6, KindIPv6}, {other, KindOther}, {badARP, KindInvalid}, {arp[:40], KindInvalid}, {badSum, KindInvalid}} {
		var p Parsed
		p.Decode(c.f)
		if p.Kind != c.want {
			t.Errorf("kind %v, want %v", p.Kind, c.want)
		}
	}
	var p Parsed
	p.Decode(frag)
	if p.Kind != KindIPv4 || !p.Fragment || p.SrcPort != 0 {
		t.Errorf("fragment decoded as %+v", p)
	}
}

func TestChecksumKnownVector(t *testing.T) {
	// RFC 1071 §3 example: words 0001 f203 f4f5 f6f7 sum to ddf2.
	b := []byte{0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7}
	if got := Fold(Sum(b, 0)); got != 0xddf2 {
		t.Fatalf("sum = %#x, want 0xddf2", got)
	}
	// An odd length pads with zero.
	if got := Fold(Sum([]byte{0x12, 0x34, 0x56}, 0)); got != 0x1234+0x5600 {
		t.Fatalf("odd sum = %#x", got)
	}
}

// slowSum is an independent, byte-pair-at-a-time reference.
func slowSum(b []byte) uint16 {
	var s uint32
	for i := 0; i < len(b); i += 2 {
		w := uint32(b[i]) << 8
		if i+1 < len(b) {
			w |= uint32(b[i+1])
		}
		s += w
		s = s&0xffff + s>>16
	}
	return uint16(s)
}

func TestSumMatchesReference(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for n := 0; n < 300; n++ {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(r.Uint32())
		}
		if got, want := Fold(Sum(b, 0)), slowSum(b); got != want && !(got == 0xffff && want == 0) && !(got == 0 && want == 0xffff) {
			t.Fatalf("len %d: Sum %#x, reference %#x", n, got, want)
		}
	}
}

func TestRewriteKeepsChecksumsValid(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	for i := 0; i < 2000; i++ {
		f := fixture.Hex(t, synFrame)
		switch i % 3 {
		case 1:
			f[23] = ProtoUDP
			binary.BigEndian.PutUint16(f[14+20+4:], 24)
		case 2:
			f[23] = ProtoICMP
			f[34] = ICMPEcho
		}
		for j := 54; j < len(f); j++ {
			f[j] = byte(r.Uint32())
		}
		fixChecksums(f)
		var p Parsed
		p.Decode(f)
		if p.Kind != KindIPv4 {
			t.Fatalf("fixture %d invalid", i)
		}
		addr := [4]byte{byte(r.Uint32()), byte(r.Uint32()), byte(r.Uint32()), byte(r.Uint32())}
		port := uint16(r.Uint32())
		if i%2 == 0 {
			p.RewriteSrc(f, addr, port, CsumFull)
		} else {
			p.RewriteDst(f, addr, port, CsumFull)
		}
		if !IPv4(f[14:]).ChecksumValid() || !transportValid(f) {
			t.Fatalf("case %d proto %d: checksum invalid after rewrite", i, p.Proto)
		}
		var q Parsed
		q.Decode(f)
		if q != p {
			t.Fatalf("case %d: Parsed not kept in step:\n got %+v\nwant %+v", i, p, q)
		}
		if !IPv4(f[14:]).DecTTL() || !IPv4(f[14:]).ChecksumValid() {
			t.Fatalf("case %d: DecTTL broke the checksum", i)
		}
	}
}

func TestRewritePartialChecksum(t *testing.T) {
	f := fixture.Hex(t, synFrame)
	fixChecksums(f)
	// What a sender with checksum offload leaves in the field: the folded
	// pseudo-header sum.
	ip := IPv4(f[14:])
	l4len := uint16(len(ip.Payload()))
	binary.BigEndian.PutUint16(f[34+16:], Fold(PseudoHeaderSum(ip.Src(), ip.Dst(), ProtoTCP, l4len)))
	var p Parsed
	p.Decode(f)
	newSrc := [4]byte{192, 168, 1, 77}
	p.RewriteSrc(f, newSrc, 51000, CsumPartial)
	want := Fold(PseudoHeaderSum(newSrc, ip.Dst(), ProtoTCP, l4len))
	if got := TCP(f[34:]).Checksum(); got != want {
		t.Fatalf("partial checksum %#x, want pseudo-header sum %#x", got, want)
	}
	if TCP(f[34:]).SrcPort() != 51000 {
		t.Fatal("port not rewritten")
	}
}

func TestUDPZeroChecksumStaysZero(t *testing.T) {
	f := fixture.Hex(t, synFrame)
	f[23] = ProtoUDP
	binary.BigEndian.PutUint16(f[14+20+4:], 24)
	fixChecksums(f)
	binary.BigEndian.PutUint16(f[34+6:], 0)
	var p Parsed
	p.Decode(f)
	p.RewriteSrc(f, [4]byte{1, 2, 3, 4}, 999, CsumFull)
	if UDP(f[34:]).Checksum() != 0 {
		t.Fatal("a UDP packet without checksum got one")
	}
}

func TestDecTTL(t *testing.T) {
	f := fixture.Hex(t, synFrame)
	ip := IPv4(f[14:])
	f[22] = 1
	if ip.DecTTL() || ip.TTL() != 1 {
		t.Fatal("DecTTL at 1 must refuse and not change the packet")
	}
}

func TestDecodeDoesNotAllocate(t *testing.T) {
	f := fixture.Hex(t, synFrame)
	fixChecksums(f)
	var p Parsed
	allocs := testing.AllocsPerRun(100, func() {
		p.Decode(f)
		p.RewriteSrc(f, [4]byte{1, 2, 3, 4}, 1234, CsumFull)
	})
	if allocs != 0 {
		t.Fatalf("Decode+Rewrite allocate %v times", allocs)
	}
}

func FuzzDecode(f *testing.F) {
	f.Add(fixture.Hex(f, synFrame))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, frame []byte) {
		var p Parsed
		p.Decode(frame)
		if p.Kind != KindIPv4 {
			return
		}
		if p.IPOff > p.L4Off || p.L4Off > p.End || p.End > len(frame) {
			t.Fatalf("offsets out of order: %+v len %d", p, len(frame))
		}
		// Rewriting a decoded packet must stay in bounds.
		p.RewriteSrc(frame, [4]byte{1, 2, 3, 4}, 4321, CsumFull)
		p.RewriteDst(frame, [4]byte{5, 6, 7, 8}, 8765, CsumPartial)
		IPv4(frame[p.IPOff:]).DecTTL()
	})
}

func BenchmarkDecodeRewrite(b *testing.B) {
	f := fixture.Hex(b, synFrame)
	fixChecksums(f)
	var p Parsed
	b.ReportAllocs()
	for b.Loop() {
		p.Decode(f)
		p.RewriteSrc(f, [4]byte{1, 2, 3, 4}, 1234, CsumFull)
	}
}
