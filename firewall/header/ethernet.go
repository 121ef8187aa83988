package header

import "encoding/binary"

// Ethernet is an Ethernet II header followed by its payload.
//
//	 0                   1                   2                   3
//	+-------------------------------------------------------------+
//	|            destination MAC (6)         |   source MAC (6)   |
//	+-------------------------------------------------------------+
//	| EtherType (2) |  payload ...
type Ethernet []byte

// EthernetLen is the length of an Ethernet II header (no 802.1Q tag).
const EthernetLen = 14

// EtherTypes the firewall distinguishes.
const (
	EtherTypeIPv4 uint16 = 0x0800
	EtherTypeARP  uint16 = 0x0806
	EtherTypeVLAN uint16 = 0x8100
	EtherTypeIPv6 uint16 = 0x86dd
)

// BroadcastMAC is ff:ff:ff:ff:ff:ff.
var BroadcastMAC = [6]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}

func (e Ethernet) Dst() (m [6]byte)  { copy(m[:], e[0:6]); return }
func (e Ethernet) Src() (m [6]byte)  { copy(m[:], e[6:12]); return }
func (e Ethernet) Type() uint16      { return binary.BigEndian.Uint16(e[12:]) }
func (e Ethernet) Payload() []byte   { return e[EthernetLen:] }
func (e Ethernet) SetDst(m [6]byte)  { copy(e[0:6], m[:]) }
func (e Ethernet) SetSrc(m [6]byte)  { copy(e[6:12], m[:]) }
func (e Ethernet) SetType(t uint16)  { binary.BigEndian.PutUint16(e[12:], t) }
func (e Ethernet) IsValid() bool     { return len(e) >= EthernetLen }
func (e Ethernet) IsBroadcast() bool { return e.Dst() == BroadcastMAC }
func (e Ethernet) IsMulticast() bool { return e[0]&1 != 0 }

// PutEthernet writes an Ethernet header into b, which must hold EthernetLen bytes.
func PutEthernet(b []byte, dst, src [6]byte, etherType uint16) {
	e := Ethernet(b)
	e.SetDst(dst)
	e.SetSrc(src)
	e.SetType(etherType)
}
