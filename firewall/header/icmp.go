package header

import "encoding/binary"

// ICMPv4 is an ICMP message (RFC 792). Queries carry an identifier and a
// sequence number; errors carry 4 unused/parameter bytes and then the IP
// header and at least 8 bytes of the datagram that caused them.
//
//	+-------------+-------------+-----------------------------+
//	|  Type (1)   |  Code (1)   |         Checksum (2)        |
//	+-------------+-------------+-----------------------------+
//	|  Identifier / unused (2)  |   Sequence / MTU (2)        |
//	+---------------------------+-----------------------------+
type ICMPv4 []byte

// ICMPv4MinLen is the length of the fixed part of every ICMP message.
const ICMPv4MinLen = 8

// Offsets in an ICMP message.
const (
	ICMPv4ChecksumOffset = 2
	ICMPv4IdentOffset    = 4 // queries
)

// ICMP types.
const (
	ICMPEchoReply      uint8 = 0
	ICMPDestUnreach    uint8 = 3
	ICMPSourceQuench   uint8 = 4
	ICMPRedirect       uint8 = 5
	ICMPEcho           uint8 = 8
	ICMPTimeExceeded   uint8 = 11
	ICMPParamProblem   uint8 = 12
	ICMPTimestamp      uint8 = 13
	ICMPTimestampReply uint8 = 14
	ICMPInfoRequest    uint8 = 15 // RFC 792, obsolete but valid
	ICMPInfoReply      uint8 = 16
	ICMPMaskRequest    uint8 = 17 // address mask, RFC 950
	ICMPMaskReply      uint8 = 18
)

// ICMP codes for ICMPDestUnreach.
const (
	ICMPNetUnreach      uint8 = 0
	ICMPHostUnreach     uint8 = 1
	ICMPProtoUnreach    uint8 = 2
	ICMPPortUnreach     uint8 = 3
	ICMPFragNeeded      uint8 = 4
	ICMPAdminProhibited uint8 = 13
)

func (m ICMPv4) Type() uint8          { return m[0] }
func (m ICMPv4) Code() uint8          { return m[1] }
func (m ICMPv4) Checksum() uint16     { return binary.BigEndian.Uint16(m[2:]) }
func (m ICMPv4) Ident() uint16        { return binary.BigEndian.Uint16(m[4:]) }
func (m ICMPv4) Seq() uint16          { return binary.BigEndian.Uint16(m[6:]) }
func (m ICMPv4) SetChecksum(c uint16) { binary.BigEndian.PutUint16(m[2:], c) }

// SetIdent rewrites the query identifier and updates the checksum.
func (m ICMPv4) SetIdent(id uint16) {
	m.SetChecksum(Update16(m.Checksum(), m.Ident(), id))
	binary.BigEndian.PutUint16(m[4:], id)
}

// Quoted is the IP datagram an error message carries.
func (m ICMPv4) Quoted() []byte { return m[ICMPv4MinLen:] }

// ICMPIsQuery reports whether t is a request or reply with an identifier
// that NAT tracks.
func ICMPIsQuery(t uint8) bool {
	switch t {
	case ICMPEcho, ICMPEchoReply, ICMPTimestamp, ICMPTimestampReply,
		ICMPInfoRequest, ICMPInfoReply, ICMPMaskRequest, ICMPMaskReply:
		return true
	}
	return false
}

// ICMPIsRequest reports whether t opens a query (the reply is the other
// direction). Every query type carries an identifier at the same place.
func ICMPIsRequest(t uint8) bool {
	return t == ICMPEcho || t == ICMPTimestamp || t == ICMPInfoRequest || t == ICMPMaskRequest
}

// ICMPIsError reports whether t is an error message that quotes a datagram.
func ICMPIsError(t uint8) bool {
	switch t {
	case ICMPDestUnreach, ICMPSourceQuench, ICMPRedirect, ICMPTimeExceeded, ICMPParamProblem:
		return true
	}
	return false
}
