package header

import "encoding/binary"

// IPv4 is an IPv4 header followed by its payload (RFC 791).
//
//	 0                   1                   2                   3
//	 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//	+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//	|Version|  IHL  |Type of Service|          Total Length         |
//	+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//	|         Identification        |Flags|      Fragment Offset    |
//	+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//	|  Time to Live |    Protocol   |         Header Checksum       |
//	+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//	|                       Source Address                          |
//	+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//	|                    Destination Address                        |
//	+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//	|                    Options                    |    Padding    |
type IPv4 []byte

const (
	// IPv4MinLen is the length of a header without options.
	IPv4MinLen = 20
	// IPv4MaxLen is the length of a header with the most options.
	IPv4MaxLen = 60

	ipv4FlagMF = 0x2000
	ipv4FlagDF = 0x4000
)

// Offsets of the fields NAT edits in place, for code that rewrites a
// header with incremental checksum updates (nat's ICMP error quotes).
const (
	IPv4ChecksumOffset = 10
	IPv4SrcOffset      = 12
	IPv4DstOffset      = 16
)

// IP protocol numbers.
const (
	ProtoICMP uint8 = 1
	ProtoTCP  uint8 = 6
	ProtoUDP  uint8 = 17
)

// IsValid reports whether b starts with a well-formed IPv4 header whose
// total length fits in b. It does not check the header checksum.
func (b IPv4) IsValid() bool {
	if len(b) < IPv4MinLen || b[0]>>4 != 4 {
		return false
	}
	hl := b.HeaderLen()
	tl := int(b.TotalLen())
	return hl >= IPv4MinLen && hl <= tl && tl <= len(b)
}

func (b IPv4) HeaderLen() int            { return int(b[0]&0xf) * 4 }
func (b IPv4) TOS() uint8                { return b[1] }
func (b IPv4) TotalLen() uint16          { return binary.BigEndian.Uint16(b[2:]) }
func (b IPv4) ID() uint16                { return binary.BigEndian.Uint16(b[4:]) }
func (b IPv4) flagsFrag() uint16         { return binary.BigEndian.Uint16(b[6:]) }
func (b IPv4) MoreFragments() bool       { return b.flagsFrag()&ipv4FlagMF != 0 }
func (b IPv4) DontFragment() bool        { return b.flagsFrag()&ipv4FlagDF != 0 }
func (b IPv4) FragOffset() int           { return int(b.flagsFrag()&0x1fff) * 8 }
func (b IPv4) IsFragment() bool          { return b.flagsFrag()&(ipv4FlagMF|0x1fff) != 0 }
func (b IPv4) TTL() uint8                { return b[8] }
func (b IPv4) Protocol() uint8           { return b[9] }
func (b IPv4) Checksum() uint16          { return binary.BigEndian.Uint16(b[10:]) }
func (b IPv4) Src() (a [4]byte)          { copy(a[:], b[12:16]); return }
func (b IPv4) Dst() (a [4]byte)          { copy(a[:], b[16:20]); return }
func (b IPv4) Options() []byte           { return b[IPv4MinLen:b.HeaderLen()] }
func (b IPv4) Payload() []byte           { return b[b.HeaderLen():b.TotalLen()] }
func (b IPv4) SetTotalLen(n uint16)      { binary.BigEndian.PutUint16(b[2:], n) }
func (b IPv4) SetChecksum(c uint16)      { binary.BigEndian.PutUint16(b[10:], c) }
func (b IPv4) SetProtocol(p uint8)       { b[9] = p }
func (b IPv4) CalculateChecksum() uint16 { return ^Fold(Sum(b[:b.HeaderLen()], 0)) }

// ChecksumValid reports whether the header checksum is correct.
func (b IPv4) ChecksumValid() bool { return Fold(Sum(b[:b.HeaderLen()], 0)) == 0xffff }

// SetFragment sets the flags and fragment offset (a multiple of 8 bytes).
func (b IPv4) SetFragment(df, mf bool, offset int) {
	v := uint16(offset/8) & 0x1fff
	if df {
		v |= ipv4FlagDF
	}
	if mf {
		v |= ipv4FlagMF
	}
	binary.BigEndian.PutUint16(b[6:], v)
}

// SetSrc rewrites the source address and updates the header checksum.
func (b IPv4) SetSrc(a [4]byte) {
	b.SetChecksum(Update32(b.Checksum(), b.Src(), a))
	copy(b[12:16], a[:])
}

// SetDst rewrites the destination address and updates the header checksum.
func (b IPv4) SetDst(a [4]byte) {
	b.SetChecksum(Update32(b.Checksum(), b.Dst(), a))
	copy(b[16:20], a[:])
}

// DecTTL decrements the TTL and updates the header checksum. It reports
// false, changing nothing, when the TTL is already 0 or 1: the packet must
// not be forwarded.
func (b IPv4) DecTTL() bool {
	if b[8] <= 1 {
		return false
	}
	old := binary.BigEndian.Uint16(b[8:])
	b[8]--
	b.SetChecksum(Update16(b.Checksum(), old, binary.BigEndian.Uint16(b[8:])))
	return true
}

// PutIPv4 writes a 20-byte header without options into b and computes its
// checksum.
func PutIPv4(b []byte, totalLen, id uint16, ttl, proto uint8, src, dst [4]byte) {
	h := IPv4(b)
	h[0] = 0x45
	h[1] = 0
	h.SetTotalLen(totalLen)
	binary.BigEndian.PutUint16(h[4:], id)
	binary.BigEndian.PutUint16(h[6:], 0)
	h[8] = ttl
	h[9] = proto
	h.SetChecksum(0)
	copy(h[12:16], src[:])
	copy(h[16:20], dst[:])
	h.SetChecksum(Checksum(h[:IPv4MinLen]))
}
