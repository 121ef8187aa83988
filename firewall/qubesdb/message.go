// Package qubesdb speaks the QubesDB protocol (QubesOS/qubes-core-qubesdb):
// the wire codec, a client for both roles a firewall VM meets (the local
// daemon's unix socket, and dom0 itself over vchan), a Mirror that turns the
// stream of changes into firewall events, and a Server used by tests and the
// qubesdb command.
//
// Everything read from a connection is untrusted: ReadMessage validates a
// message completely before anyone looks at it and never allocates more than
// MaxData bytes for one.
package qubesdb

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Type is the message type (enum qdb_msg in include/qubesdb.h).
type Type uint8

// Message types, in wire order.
const (
	CmdRead Type = iota
	CmdWrite
	CmdMultiRead
	CmdList
	CmdRm
	CmdWatch
	CmdUnwatch
	RespOK
	RespErrorNoEnt
	RespError
	RespRead
	RespMultiRead
	RespList
	RespWatch
)

var typeNames = [...]string{"READ", "WRITE", "MULTIREAD", "LIST", "RM", "WATCH", "UNWATCH",
	"RESP_OK", "RESP_ERROR_NOENT", "RESP_ERROR", "RESP_READ", "RESP_MULTIREAD", "RESP_LIST", "RESP_WATCH"}

func (t Type) String() string {
	if int(t) < len(typeNames) {
		return typeNames[t]
	}
	return fmt.Sprintf("type(%d)", uint8(t))
}

// carriesData reports whether messages of type t may have a data part. The
// daemon rejects data on every other command, and never sends any with the
// other responses.
func (t Type) carriesData() bool {
	return t == CmdWrite || t == RespRead || t == RespMultiRead
}

// Wire layout of struct qdb_hdr on x86 (the only architecture Qubes runs on):
//
//	offset 0   uint8  type
//	offset 1   char   path[64]   NUL-terminated, so at most 63 characters
//	offset 65  3 bytes of alignment padding (may hold garbage: ignored)
//	offset 68  uint32 data_len   host order, i.e. little endian
//	offset 72  data_len bytes of data, no terminating NUL
const (
	HeaderLen = 72
	// MaxPath is the longest path: path[64] including its NUL.
	MaxPath = 63
	// MaxData is the largest data part: the daemon refuses data_len >= 3072.
	MaxData = 3071

	offPath    = 1
	offDataLen = 68
)

// Message is one QubesDB message.
type Message struct {
	Type Type
	Path string
	Data []byte
}

func (m Message) String() string {
	return fmt.Sprintf("%v %q (%d bytes)", m.Type, m.Path, len(m.Data))
}

// Errors that name a protocol violation by the other side.
var (
	ErrMalformed = errors.New("malformed qubesdb message")
)

// ValidPath reports whether p may appear in a message: at most MaxPath
// characters from [A-Za-z0-9_/.:@-], no leading '-' (verify_path in
// daemon/db-cmds.c). The empty path is valid (MULTIREAD/LIST of everything,
// end-of-reply markers).
func ValidPath(p string) bool {
	if len(p) > MaxPath {
		return false
	}
	for i := 0; i < len(p); i++ {
		c := p[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case c == '_' || c == '/' || c == '.' || c == ':' || c == '@':
		case c == '-' && i > 0:
		default:
			return false
		}
	}
	return true
}

// ValidKey reports whether p can name a database entry: a valid path that
// starts with '/' and does not end with '/' (qubesdb_insert in db-core.c).
func ValidKey(p string) bool {
	return ValidPath(p) && len(p) > 1 && p[0] == '/' && p[len(p)-1] != '/'
}

func (m Message) validate() error {
	if int(m.Type) >= len(typeNames) {
		return fmt.Errorf("%w: unknown type %d", ErrMalformed, uint8(m.Type))
	}
	if !ValidPath(m.Path) {
		return fmt.Errorf("%w: invalid path %q", ErrMalformed, m.Path)
	}
	if len(m.Data) > MaxData {
		return fmt.Errorf("%w: %v data length %d exceeds %d", ErrMalformed, m.Type, len(m.Data), MaxData)
	}
	if len(m.Data) > 0 && !m.Type.carriesData() {
		return fmt.Errorf("%w: %v carries %d bytes of data", ErrMalformed, m.Type, len(m.Data))
	}
	// The daemon refuses values containing NUL (verify_data).
	if bytes.IndexByte(m.Data, 0) >= 0 {
		return fmt.Errorf("%w: %v data contains NUL", ErrMalformed, m.Type)
	}
	return nil
}

// AppendTo appends the wire form of m to b. It refuses a message that
// ReadMessage would refuse.
func (m Message) AppendTo(b []byte) ([]byte, error) {
	if err := m.validate(); err != nil {
		return b, err
	}
	var h [HeaderLen]byte
	h[0] = byte(m.Type)
	copy(h[offPath:offPath+MaxPath], m.Path)
	binary.LittleEndian.PutUint32(h[offDataLen:], uint32(len(m.Data)))
	b = append(b, h[:]...)
	return append(b, m.Data...), nil
}

// Encode returns the wire form of m.
func (m Message) Encode() ([]byte, error) {
	return m.AppendTo(make([]byte, 0, HeaderLen+len(m.Data)))
}

// WriteMessage writes m with a single Write call, so that a message from one
// goroutine is never split by another's on a stream socket.
func WriteMessage(w io.Writer, m Message) error {
	b, err := m.Encode()
	if err != nil {
		return err
	}
	_, err = w.Write(b)
	return err
}

// ReadMessage reads and validates one message. A clean end of stream before
// the first byte is io.EOF; a message cut short is io.ErrUnexpectedEOF;
// anything invalid wraps ErrMalformed (the stream cannot be trusted after it).
func ReadMessage(r io.Reader) (Message, error) {
	var h [HeaderLen]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return Message{}, err
	}
	m := Message{Type: Type(h[0])}
	path := h[offPath : offPath+MaxPath+1]
	n := bytes.IndexByte(path, 0)
	if n < 0 {
		return Message{}, fmt.Errorf("%w: path not NUL-terminated", ErrMalformed)
	}
	m.Path = string(path[:n])
	dataLen := binary.LittleEndian.Uint32(h[offDataLen:])
	if dataLen > MaxData {
		return Message{}, fmt.Errorf("%w: data length %d exceeds %d", ErrMalformed, dataLen, MaxData)
	}
	if dataLen > 0 {
		if !m.Type.carriesData() {
			return Message{}, fmt.Errorf("%w: %v carries %d bytes of data", ErrMalformed, m.Type, dataLen)
		}
		m.Data = make([]byte, dataLen)
		if _, err := io.ReadFull(r, m.Data); err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return Message{}, err
		}
	}
	if err := m.validate(); err != nil {
		return Message{}, err
	}
	return m, nil
}
