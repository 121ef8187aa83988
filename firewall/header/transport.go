package header

import "encoding/binary"

// TCP is a TCP header followed by its payload (RFC 9293).
//
//	+-------------------------------+-------------------------------+
//	|          Source Port          |       Destination Port        |
//	+-------------------------------+-------------------------------+
//	|                        Sequence Number                        |
//	+---------------------------------------------------------------+
//	|                    Acknowledgment Number                      |
//	+-------+-------+---------------+-------------------------------+
//	| Offset| Rsrvd |     Flags     |            Window             |
//	+-------+-------+---------------+-------------------------------+
//	|           Checksum            |         Urgent Pointer        |
type TCP []byte

// TCPMinLen is the length of a TCP header without options.
const TCPMinLen = 20

// TCP flags.
const (
	TCPFin uint8 = 1 << iota
	TCPSyn
	TCPRst
	TCPPsh
	TCPAck
	TCPUrg
)

// TCPChecksumOffset is where the checksum sits in a TCP header.
const TCPChecksumOffset = 16

// SrcPortOffset and DstPortOffset are where the ports sit in TCP and UDP
// headers alike.
const (
	SrcPortOffset = 0
	DstPortOffset = 2
)

func (t TCP) SrcPort() uint16      { return binary.BigEndian.Uint16(t[0:]) }
func (t TCP) DstPort() uint16      { return binary.BigEndian.Uint16(t[2:]) }
func (t TCP) Seq() uint32          { return binary.BigEndian.Uint32(t[4:]) }
func (t TCP) Ack() uint32          { return binary.BigEndian.Uint32(t[8:]) }
func (t TCP) DataOffset() int      { return int(t[12]>>4) * 4 }
func (t TCP) Flags() uint8         { return t[13] }
func (t TCP) Checksum() uint16     { return binary.BigEndian.Uint16(t[16:]) }
func (t TCP) SetChecksum(c uint16) { binary.BigEndian.PutUint16(t[16:], c) }
func (t TCP) setSrcPort(p uint16)  { binary.BigEndian.PutUint16(t[0:], p) }
func (t TCP) setDstPort(p uint16)  { binary.BigEndian.PutUint16(t[2:], p) }

// UDP is a UDP header followed by its payload (RFC 768).
//
//	+-------------------------------+-------------------------------+
//	|          Source Port          |       Destination Port        |
//	+-------------------------------+-------------------------------+
//	|            Length             |           Checksum            |
type UDP []byte

// UDPLen is the length of a UDP header.
const UDPLen = 8

// UDPChecksumOffset is where the checksum sits in a UDP header.
const UDPChecksumOffset = 6

func (u UDP) SrcPort() uint16      { return binary.BigEndian.Uint16(u[0:]) }
func (u UDP) DstPort() uint16      { return binary.BigEndian.Uint16(u[2:]) }
func (u UDP) Length() uint16       { return binary.BigEndian.Uint16(u[4:]) }
func (u UDP) Checksum() uint16     { return binary.BigEndian.Uint16(u[6:]) }
func (u UDP) SetChecksum(c uint16) { binary.BigEndian.PutUint16(u[6:], c) }

// PutUDP writes a UDP header for payloadLen bytes of payload that already
// follow it in b, and its checksum.
func PutUDP(b []byte, src, dst [4]byte, srcPort, dstPort uint16, payloadLen int) {
	n := uint16(UDPLen + payloadLen)
	binary.BigEndian.PutUint16(b[0:], srcPort)
	binary.BigEndian.PutUint16(b[2:], dstPort)
	binary.BigEndian.PutUint16(b[4:], n)
	binary.BigEndian.PutUint16(b[6:], 0)
	c := ^Fold(Sum(b[:n], PseudoHeaderSum(src, dst, ProtoUDP, n)))
	if c == 0 {
		c = 0xffff // 0 means "no checksum" in UDP
	}
	UDP(b).SetChecksum(c)
}
