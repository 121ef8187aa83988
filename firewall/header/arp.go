package header

import "encoding/binary"

// ARP is an ARP packet for IPv4 over Ethernet (RFC 826).
//
//	+---------------+---------------+---------+---------+-----------+
//	| htype=1 (2)   | ptype=0800 (2)| hlen=6  | plen=4  | op (2)    |
//	+---------------+---------------+---------+---------+-----------+
//	| sender MAC (6) | sender IP (4) | target MAC (6) | target IP (4) |
type ARP []byte

// ARPLen is the length of an Ethernet/IPv4 ARP packet.
const ARPLen = 28

// ARP operations.
const (
	ARPRequest uint16 = 1
	ARPReply   uint16 = 2
)

// IsValid reports whether a is long enough and describes Ethernet/IPv4.
func (a ARP) IsValid() bool {
	return len(a) >= ARPLen &&
		binary.BigEndian.Uint16(a[0:]) == 1 &&
		binary.BigEndian.Uint16(a[2:]) == EtherTypeIPv4 &&
		a[4] == 6 && a[5] == 4
}

func (a ARP) Op() uint16             { return binary.BigEndian.Uint16(a[6:]) }
func (a ARP) SenderMAC() (m [6]byte) { copy(m[:], a[8:14]); return }
func (a ARP) SenderIP() (ip [4]byte) { copy(ip[:], a[14:18]); return }
func (a ARP) TargetMAC() (m [6]byte) { copy(m[:], a[18:24]); return }
func (a ARP) TargetIP() (ip [4]byte) { copy(ip[:], a[24:28]); return }

// PutARP writes a complete ARP packet into b, which must hold ARPLen bytes.
func PutARP(b []byte, op uint16, senderMAC [6]byte, senderIP [4]byte, targetMAC [6]byte, targetIP [4]byte) {
	binary.BigEndian.PutUint16(b[0:], 1)
	binary.BigEndian.PutUint16(b[2:], EtherTypeIPv4)
	b[4], b[5] = 6, 4
	binary.BigEndian.PutUint16(b[6:], op)
	copy(b[8:14], senderMAC[:])
	copy(b[14:18], senderIP[:])
	copy(b[18:24], targetMAC[:])
	copy(b[24:28], targetIP[:])
}
