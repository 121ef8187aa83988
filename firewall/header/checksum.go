package header

import "encoding/binary"

// Sum adds b to the ones' complement accumulator initial, treating b as a
// sequence of big-endian 16-bit words (an odd final byte is padded with
// zero). The result is not folded; pass it to Fold.
func Sum(b []byte, initial uint32) uint32 {
	s := uint64(initial)
	for len(b) >= 8 {
		v := binary.BigEndian.Uint64(b)
		s += v>>48 + (v>>32)&0xffff + (v>>16)&0xffff + v&0xffff
		b = b[8:]
	}
	for len(b) >= 2 {
		s += uint64(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		s += uint64(b[0]) << 8
	}
	for s>>32 != 0 {
		s = s&0xffffffff + s>>32
	}
	return uint32(s)
}

// Fold folds a 32-bit accumulator into 16 bits with end-around carry.
func Fold(s uint32) uint16 {
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return uint16(s)
}

// Checksum is the Internet checksum (RFC 1071) of b: the complement of
// its folded ones' complement sum.
func Checksum(b []byte) uint16 { return ^Fold(Sum(b, 0)) }

// PseudoHeaderSum is the unfolded sum of the IPv4 pseudo-header that TCP
// and UDP checksums cover.
func PseudoHeaderSum(src, dst [4]byte, proto uint8, length uint16) uint32 {
	return uint32(binary.BigEndian.Uint16(src[0:])) + uint32(binary.BigEndian.Uint16(src[2:])) +
		uint32(binary.BigEndian.Uint16(dst[0:])) + uint32(binary.BigEndian.Uint16(dst[2:])) +
		uint32(proto) + uint32(length)
}

// Update16 returns checksum hc after a covered 16-bit word changed from old
// to new, by RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m').
func Update16(hc, old, new uint16) uint16 {
	s := uint32(^hc) + uint32(^old) + uint32(new)
	return ^Fold(s)
}

// Update32 is Update16 for a 32-bit field such as an IPv4 address.
func Update32(hc uint16, old, new [4]byte) uint16 {
	s := uint32(^hc) +
		uint32(^binary.BigEndian.Uint16(old[0:])) + uint32(^binary.BigEndian.Uint16(old[2:])) +
		uint32(binary.BigEndian.Uint16(new[0:])) + uint32(binary.BigEndian.Uint16(new[2:]))
	return ^Fold(s)
}

// UpdatePartial32 adjusts a partial checksum — the folded, uncomplemented
// pseudo-header sum a sender leaves in the field when checksum offload
// (virtio NEEDS_CSUM) will complete it — for an address change.
func UpdatePartial32(partial uint16, old, new [4]byte) uint16 {
	return ^Update32(^partial, old, new)
}
