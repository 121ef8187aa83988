package nat

import "math/bits"

// portMap has one bit per port (or ICMP identifier).
type portMap [1024]uint64

func (m *portMap) has(p uint16) bool { return m[p>>6]&(1<<(p&63)) != 0 }
func (m *portMap) set(p uint16)      { m[p>>6] |= 1 << (p & 63) }
func (m *portMap) clear(p uint16)    { m[p>>6] &^= 1 << (p & 63) }

// Protocol indexes of the per-protocol port maps.
const (
	pTCP = iota
	pUDP
	pICMP
	nProto
)

// uplinkPorts records the ports in use on one uplink address, per
// protocol: a port is handed out once per (protocol, uplink address), so
// the port alone names the flow on the way back. flow is that index: per
// protocol and port, the slab index + 1 of the entry holding the port (0:
// none), so that an inbound packet finds its flow without hashing; its
// remote address and port are then checked against the entry.
type uplinkPorts struct {
	ip   [4]byte
	n    int // live entries using this map; 0 = free for another address
	used [nProto]portMap
	flow [nProto][]int32
}

// newUplinkPorts allocates the maps of one uplink address: 8 KiB of bits
// and 256 KiB of flow index per protocol, once for the table's life. (The
// bits say no more than flow != 0, but pickPort scans them 64 ports to a
// word, against the reserved ports' bits.)
func newUplinkPorts(ip [4]byte) *uplinkPorts {
	u := &uplinkPorts{ip: ip}
	for i := range u.flow {
		u.flow[i] = make([]int32, 1<<16)
	}
	return u
}

// randomProbes is how many uniformly random ports pickPort tries before it
// scans: with the space less than 7/8 full, the first probe almost always
// succeeds and the choice is uniform (RFC 6056 algorithm 1); when nearly
// full, the scan still finds a free port in at most 1024 word tests.
const randomProbes = 8

// pickPort returns a port in [lo, hi] that is free in both a and b.
func pickPort(rnd func() uint32, lo, hi uint16, a, b *portMap) (uint16, bool) {
	n := uint64(hi-lo) + 1
	for range randomProbes {
		p := lo + uint16(uint64(rnd())*n>>32)
		if !a.has(p) && !b.has(p) {
			return p, true
		}
	}
	start := int(lo) + int(uint64(rnd())*n>>32)
	if p, ok := scanFree(a, b, start, int(hi)); ok {
		return uint16(p), true
	}
	if p, ok := scanFree(a, b, int(lo), start-1); ok {
		return uint16(p), true
	}
	return 0, false
}

// scanFree returns the first port in [from, to] free in both maps, testing
// 64 ports at a time.
func scanFree(a, b *portMap, from, to int) (int, bool) {
	for p := from; p <= to; p = p | 63 + 1 {
		w := ^(a[p>>6] | b[p>>6]) >> (p & 63)
		if w != 0 {
			q := p + bits.TrailingZeros64(w)
			return q, q <= to
		}
	}
	return 0, false
}
