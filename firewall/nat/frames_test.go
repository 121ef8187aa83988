package nat

import (
	"bytes"
	"encoding/binary"
	"maps"
	"math/bits"
	"math/rand/v2"
	"testing"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/header"
)

// Frames for the tests are built here with a checksum implementation of
// their own (byte by byte, no header package), so that comparing a
// translated frame with one built from scratch checks the incremental
// checksum updates against a full computation.

var (
	client  = [4]byte{10, 137, 0, 5}
	client2 = [4]byte{10, 137, 0, 6}
	remote  = [4]byte{93, 184, 216, 34}
	router  = [4]byte{172, 16, 0, 1}
	uplink  = [4]byte{10, 138, 7, 9}
	uplink2 = [4]byte{10, 138, 7, 10}
)

const sec = int64(1e9)

// sum16 is the ones' complement sum of b as big-endian words, folded.
func sum16(b []byte, s uint32) uint16 {
	for i := 0; i < len(b); i++ {
		if i%2 == 0 {
			s += uint32(b[i]) << 8
		} else {
			s += uint32(b[i])
		}
	}
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return uint16(s)
}

func pseudo(src, dst [4]byte, proto uint8, n int) uint32 {
	return uint32(sum16(append(append(src[:], dst[:]...), 0, proto, byte(n>>8), byte(n)), 0))
}

// ipFrame is an Ethernet frame with an IPv4 header (no options) around
// l4, every checksum computed.
func ipFrame(proto uint8, src, dst [4]byte, l4 []byte) []byte {
	f := make([]byte, 14+20+len(l4))
	copy(f, []byte{0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x16, 0x3e, 0x5e, 0x6c, 0, 8, 0})
	ip := f[14:]
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], uint16(20+len(l4)))
	binary.BigEndian.PutUint16(ip[4:], 0x1234)
	ip[8], ip[9] = 64, proto
	copy(ip[12:], src[:])
	copy(ip[16:], dst[:])
	binary.BigEndian.PutUint16(ip[10:], ^sum16(ip[:20], 0))
	copy(ip[20:], l4)
	fillTransportChecksum(proto, src, dst, ip[20:])
	return f
}

func fillTransportChecksum(proto uint8, src, dst [4]byte, l4 []byte) {
	switch proto {
	case header.ProtoTCP:
		binary.BigEndian.PutUint16(l4[16:], ^sum16(l4, pseudo(src, dst, proto, len(l4))))
	case header.ProtoUDP:
		c := ^sum16(l4, pseudo(src, dst, proto, len(l4)))
		if c == 0 {
			c = 0xffff
		}
		binary.BigEndian.PutUint16(l4[6:], c)
	case header.ProtoICMP:
		binary.BigEndian.PutUint16(l4[2:], ^sum16(l4, 0))
	}
}

func tcpSeg(sport, dport uint16, flags uint8, payload string) []byte {
	b := make([]byte, 20, 20+len(payload))
	binary.BigEndian.PutUint16(b[0:], sport)
	binary.BigEndian.PutUint16(b[2:], dport)
	binary.BigEndian.PutUint32(b[4:], 0x01020304)
	binary.BigEndian.PutUint32(b[8:], 0x0a0b0c0d)
	b[12], b[13] = 5<<4, flags
	binary.BigEndian.PutUint16(b[14:], 64240)
	return append(b, payload...)
}

func udpDgram(sport, dport uint16, payload string) []byte {
	b := make([]byte, 8, 8+len(payload))
	binary.BigEndian.PutUint16(b[0:], sport)
	binary.BigEndian.PutUint16(b[2:], dport)
	binary.BigEndian.PutUint16(b[4:], uint16(8+len(payload)))
	return append(b, payload...)
}

func icmpEcho(typ uint8, id, seq uint16, payload string) []byte {
	b := make([]byte, 8, 8+len(payload))
	b[0] = typ
	binary.BigEndian.PutUint16(b[4:], id)
	binary.BigEndian.PutUint16(b[6:], seq)
	return append(b, payload...)
}

// icmpErr is an ICMP error quoting ip (an IP packet, possibly cut short);
// mtu goes in the low 16 bits of the second word (frag needed).
func icmpErr(typ, code uint8, mtu uint16, ip []byte) []byte {
	b := make([]byte, 8, 8+len(ip))
	b[0], b[1] = typ, code
	binary.BigEndian.PutUint16(b[6:], mtu)
	return append(b, ip...)
}

// fixICMP recomputes the outer ICMP checksum of frame (fuzz and hostile
// inputs: make the checksum check pass so the quote is examined).
func fixICMP(f []byte) {
	ip := f[14:]
	l4 := ip[int(ip[0]&0xf)*4 : binary.BigEndian.Uint16(ip[2:])]
	l4[2], l4[3] = 0, 0
	binary.BigEndian.PutUint16(l4[2:], ^sum16(l4, 0))
}

// checkFrame verifies from scratch every checksum of an IPv4 frame: IP
// header, transport (with pseudo-header), and for ICMP errors the quoted
// IP header and, when the whole datagram is quoted, its transport.
func checkFrame(t testing.TB, f []byte) {
	t.Helper()
	ip := f[14:]
	hl := int(ip[0]&0xf) * 4
	if sum16(ip[:hl], 0) != 0xffff {
		t.Errorf("IP header checksum wrong: % x", ip[:hl])
	}
	tl := int(binary.BigEndian.Uint16(ip[2:]))
	var src, dst [4]byte
	copy(src[:], ip[12:])
	copy(dst[:], ip[16:])
	checkTransport(t, "", ip[9], src, dst, ip[hl:tl])
	if ip[9] != header.ProtoICMP || !header.ICMPIsError(ip[hl]) {
		return
	}
	q := ip[hl+8 : tl]
	qhl := int(q[0]&0xf) * 4
	if sum16(q[:qhl], 0) != 0xffff {
		t.Errorf("quoted IP header checksum wrong: % x", q[:qhl])
	}
	if qtl := int(binary.BigEndian.Uint16(q[2:])); qtl == len(q) {
		copy(src[:], q[12:])
		copy(dst[:], q[16:])
		checkTransport(t, "quoted ", q[9], src, dst, q[qhl:])
	}
}

func checkTransport(t testing.TB, what string, proto uint8, src, dst [4]byte, l4 []byte) {
	t.Helper()
	var s uint16
	switch proto {
	case header.ProtoTCP:
		s = sum16(l4, pseudo(src, dst, proto, len(l4)))
	case header.ProtoUDP:
		if binary.BigEndian.Uint16(l4[6:]) == 0 {
			return
		}
		s = sum16(l4, pseudo(src, dst, proto, len(l4)))
	case header.ProtoICMP:
		s = sum16(l4, 0)
	}
	if s != 0xffff {
		t.Errorf("%sproto %d checksum wrong: % x", what, proto, l4)
	}
}

func decode(t testing.TB, f []byte) *header.Parsed {
	t.Helper()
	p := new(header.Parsed)
	p.Decode(f)
	if p.Kind != header.KindIPv4 {
		t.Fatalf("test frame decodes as %v: % x", p.Kind, f)
	}
	return p
}

func sameBytes(t testing.TB, what string, got, want []byte) {
	t.Helper()
	if !bytes.Equal(got, want) {
		t.Errorf("%s:\n got % x\nwant % x", what, got, want)
	}
}

func testRand(seed uint64) func() uint32 { return rand.New(rand.NewPCG(seed, 7)).Uint32 }

func newTable(t testing.TB, cfg Config) *Table {
	t.Helper()
	if cfg.Rand == nil {
		cfg.Rand = testRand(1)
	}
	return New(cfg)
}

// check verifies the table's invariants: maps, LRU lists, free list and
// port maps agree with the slab.
func (t *Table) check() string {
	live := 0
	per := map[[4]byte]int{}
	for i := range t.slab {
		e := &t.slab[i]
		if e.idx != int32(i) {
			return "idx wrong"
		}
		if e.flags&flagLive == 0 {
			continue
		}
		live++
		per[e.ct.Src]++
		u := t.uplinks[e.slot]
		if t.out.find(e.ct, t.slab) != int32(i) || u.flow[protoIndex(e.ct.Proto)][e.natPort] != int32(i)+1 {
			return "entry missing from the outbound map or the inbound index"
		}
		if u.ip != e.uplink || !u.used[protoIndex(e.ct.Proto)].has(e.natPort) {
			return "port not marked in use"
		}
		if t.reserved[protoIndex(e.ct.Proto)].has(e.natPort) {
			return "entry holds a reserved port"
		}
		if e.natPort < t.portMin || e.natPort > t.portMax {
			return "port out of range"
		}
	}
	if live != t.n || t.out.n != t.n || t.n > len(t.slab) {
		return "counts disagree"
	}
	// Every inbound index slot names a live entry that holds that port.
	for _, u := range t.uplinks {
		used := 0
		for pi := range u.flow {
			for port, i := range u.flow[pi] {
				if i == 0 {
					continue
				}
				used++
				e := &t.slab[i-1]
				if e.flags&flagLive == 0 || int(e.natPort) != port || protoIndex(e.ct.Proto) != pi || e.uplink != u.ip {
					return "stale inbound index slot"
				}
			}
		}
		if used != u.n {
			return "inbound index and uplink count disagree"
		}
	}
	if !maps.Equal(per, t.perClient) {
		return "per-client counts disagree"
	}
	for l := range t.head {
		prev, n := int32(-1), 0
		for i := t.head[l]; i >= 0; i = t.slab[i].nextLRU {
			e := &t.slab[i]
			if e.prevLRU != prev || e.list() != l || e.flags&flagLive == 0 {
				return "LRU list broken"
			}
			if prev, n = i, n+1; n > t.n {
				return "LRU list cycles"
			}
		}
		if t.tail[l] != prev {
			return "LRU tail wrong"
		}
		live -= n
	}
	if live != 0 {
		return "LRU lists miss entries"
	}
	free := 0
	for i := t.free; i >= 0; i = t.slab[i].nextLRU {
		if t.slab[i].flags != 0 {
			return "live entry on the free list"
		}
		if free++; free > len(t.slab) {
			return "free list cycles"
		}
	}
	if free != len(t.slab)-t.n {
		return "free list length wrong"
	}
	inUse := 0
	for _, u := range t.uplinks {
		bitsSet := 0
		for _, m := range u.used {
			for _, w := range m {
				bitsSet += bits.OnesCount64(w)
			}
		}
		if bitsSet != u.n {
			return "port map count wrong"
		}
		inUse += u.n
	}
	if inUse != t.n {
		return "port maps disagree with the table"
	}
	return ""
}

func mustCheck(t testing.TB, tb *Table) {
	t.Helper()
	if msg := tb.check(); msg != "" {
		t.Fatal("invariant: " + msg)
	}
}
