// Package xenstore speaks the Xen xenstore wire protocol: the message codec,
// a Client that runs requests, watch events and transactions over one
// connection (/dev/xen/xenbus inside a guest, or a unix socket). Its fakes
// (an in-memory xenstored and a model of the Linux xenbus device) are in
// package xenstoretest.
//
// control/shutdown is deliberately not handled here: the guest kernel's own
// handler (drivers/xen/manage.c) always watches it and acts first; PID 1
// receives the result (see firewall/cmd/firewall).
//
// Protocol facts, from Xen's docs/misc/xenstore.txt and xen/include/public/
// io/xs_wire.h (Linux: include/xen/interface/io/xs_wire.h):
//
//   - every message is a 16-byte header struct xsd_sockmsg {uint32 type,
//     req_id, tx_id, len} in host byte order (little endian on x86) followed
//     by len bytes of payload, len <= 4096 (XENSTORE_PAYLOAD_MAX) both ways;
//   - a reply carries the request's type, req_id and tx_id, or type ERROR
//     with the errno name ("ENOENT\x00") as payload;
//   - WATCH_EVENT is unsolicited: "<path>\x00<token>\x00". Through the Linux
//     device its req_id is not even initialised (xenbus_dev_frontend.c
//     watch_fired sets only type and len), so events are recognised by type.
//
// Everything read from the connection is untrusted: a header announcing
// more than MaxPayload is a fatal protocol error, never an allocation.
package xenstore

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Type is a message type (enum xsd_sockmsg_type).
type Type uint32

// Message types, with the numbers of xs_wire.h.
const (
	TypeControl            Type = 0 // formerly DEBUG
	TypeDirectory          Type = 1
	TypeRead               Type = 2
	TypeGetPerms           Type = 3
	TypeWatch              Type = 4
	TypeUnwatch            Type = 5
	TypeTransactionStart   Type = 6
	TypeTransactionEnd     Type = 7
	TypeIntroduce          Type = 8
	TypeRelease            Type = 9
	TypeGetDomainPath      Type = 10
	TypeWrite              Type = 11
	TypeMkdir              Type = 12
	TypeRm                 Type = 13
	TypeSetPerms           Type = 14
	TypeWatchEvent         Type = 15
	TypeError              Type = 16
	TypeIsDomainIntroduced Type = 17
	TypeResume             Type = 18
	TypeSetTarget          Type = 19
	TypeResetWatches       Type = 21 // 20 was RESTRICT, now unused
	TypeDirectoryPart      Type = 22
	typeCount              Type = 23
)

var typeNames = [...]string{"CONTROL", "DIRECTORY", "READ", "GET_PERMS", "WATCH", "UNWATCH",
	"TRANSACTION_START", "TRANSACTION_END", "INTRODUCE", "RELEASE", "GET_DOMAIN_PATH", "WRITE",
	"MKDIR", "RM", "SET_PERMS", "WATCH_EVENT", "ERROR", "IS_DOMAIN_INTRODUCED", "RESUME",
	"SET_TARGET", "RESTRICT", "RESET_WATCHES", "DIRECTORY_PART"}

func (t Type) String() string {
	if t < typeCount {
		return typeNames[t]
	}
	return fmt.Sprintf("type(%d)", uint32(t))
}

// Wire layout of struct xsd_sockmsg:
//
//	offset 0   uint32 type
//	offset 4   uint32 req_id   echoed in the reply
//	offset 8   uint32 tx_id    0 outside transactions
//	offset 12  uint32 len      payload bytes that follow, <= 4096
const (
	HeaderLen = 16
	// MaxPayload is XENSTORE_PAYLOAD_MAX.
	MaxPayload = 4096
	// MaxRequestPayload is what fits a request through /dev/xen/xenbus: the
	// Linux driver buffers header and payload together in 4096 bytes
	// (xenbus_file_write returns E2BIG beyond that).
	MaxRequestPayload = MaxPayload - HeaderLen
)

// Message is one xenstore message.
type Message struct {
	Type    Type
	ReqID   uint32
	TxID    uint32
	Payload []byte
}

// Errors of the codec.
var (
	ErrTooLong     = errors.New("xenstore payload longer than 4096 bytes")
	ErrUnknownType = errors.New("unknown xenstore message type")
	ErrMalformed   = errors.New("malformed xenstore payload")
)

// Append appends m's wire form to b.
func (m *Message) Append(b []byte) []byte {
	b = binary.LittleEndian.AppendUint32(b, uint32(m.Type))
	b = binary.LittleEndian.AppendUint32(b, m.ReqID)
	b = binary.LittleEndian.AppendUint32(b, m.TxID)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(m.Payload)))
	return append(b, m.Payload...)
}

// decodeHeader checks a header and returns the message it starts (without
// payload) and the payload length.
func decodeHeader(h []byte) (Message, int, error) {
	m := Message{
		Type:  Type(binary.LittleEndian.Uint32(h[0:])),
		ReqID: binary.LittleEndian.Uint32(h[4:]),
		TxID:  binary.LittleEndian.Uint32(h[8:]),
	}
	n := binary.LittleEndian.Uint32(h[12:])
	if n > MaxPayload {
		return m, 0, fmt.Errorf("%v message: %w (%d)", m.Type, ErrTooLong, n)
	}
	if m.Type >= typeCount {
		return m, int(n), fmt.Errorf("%w %d", ErrUnknownType, uint32(m.Type))
	}
	return m, int(n), nil
}

// Decode decodes the one message b holds exactly. The payload aliases b.
func Decode(b []byte) (Message, error) {
	if len(b) < HeaderLen {
		return Message{}, fmt.Errorf("xenstore message: %d bytes, shorter than its header", len(b))
	}
	m, n, err := decodeHeader(b[:HeaderLen])
	if err != nil {
		return m, err
	}
	if len(b)-HeaderLen != n {
		return m, fmt.Errorf("%v message: header announces %d payload bytes, %d present", m.Type, n, len(b)-HeaderLen)
	}
	m.Payload = b[HeaderLen:]
	return m, nil
}

// ReadMessage reads the next whole message from a byte stream. The Linux
// device returns the queued reply bytes without regard to message
// boundaries (xenbus_file_read copies across buffers), so the stream is
// framed here; r should be buffered.
//
// The payload is freshly allocated (at most MaxPayload bytes). An unknown
// type is reported (ErrUnknownType) with the message, which was consumed
// whole, so the stream stays in sync; any other error leaves the stream
// unusable.
func ReadMessage(r io.Reader) (Message, error) {
	var hdr [HeaderLen]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return Message{}, err
	}
	m, n, herr := decodeHeader(hdr[:])
	if herr != nil && !errors.Is(herr, ErrUnknownType) {
		return m, herr
	}
	m.Payload = make([]byte, n)
	if _, err := io.ReadFull(r, m.Payload); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return m, fmt.Errorf("%v payload: %w", m.Type, err)
	}
	return m, herr
}

// SplitStrings splits a payload of NUL-terminated strings ("a\x00b\x00").
// A payload that does not end with NUL is malformed; an empty one holds no
// strings.
func SplitStrings(p []byte) ([]string, error) {
	if len(p) == 0 {
		return nil, nil
	}
	if p[len(p)-1] != 0 {
		return nil, fmt.Errorf("%w: strings not NUL-terminated", ErrMalformed)
	}
	parts := bytes.Split(p[:len(p)-1], []byte{0})
	out := make([]string, len(parts))
	for i, s := range parts {
		out[i] = string(s)
	}
	return out, nil
}

// JoinStrings builds a payload of NUL-terminated strings.
func JoinStrings(s ...string) []byte {
	var b []byte
	for _, x := range s {
		b = append(append(b, x...), 0)
	}
	return b
}

// Error is an error reply from xenstored: the errno name it sent.
type Error string

func (e Error) Error() string { return "xenstore: " + string(e) }

// The error names of xs_wire.h that callers test for.
const (
	ENOENT  Error = "ENOENT"
	EAGAIN  Error = "EAGAIN"
	EINVAL  Error = "EINVAL"
	EACCES  Error = "EACCES"
	EEXIST  Error = "EEXIST"
	EISDIR  Error = "EISDIR"
	ENOSPC  Error = "ENOSPC"
	EQUOTA  Error = "EQUOTA"
	E2BIG   Error = "E2BIG"
	ENOSYS  Error = "ENOSYS"
	EBUSY   Error = "EBUSY"
	EIO     Error = "EIO"
	ENOMEM  Error = "ENOMEM"
	EROFS   Error = "EROFS"
	EISCONN Error = "EISCONN"
)

// maxErrorName bounds the errno name kept from an ERROR reply.
const maxErrorName = 32

// decodeError turns an ERROR payload into an Error. Names are upper-case
// letters and digits; anything else is replaced so that a hostile payload
// cannot inject text into logs.
func decodeError(p []byte) Error {
	p = bytes.TrimRight(p, "\x00")
	if len(p) > maxErrorName {
		p = p[:maxErrorName]
	}
	b := make([]byte, len(p))
	for i, c := range p {
		if (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') {
			b[i] = c
		} else {
			b[i] = '?'
		}
	}
	if len(b) == 0 {
		return "EIO"
	}
	return Error(b)
}
