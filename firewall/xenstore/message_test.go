package xenstore

import (
	"bytes"
	"encoding/hex"
	"errors"
	"strings"
	"testing"
)

// Wire vectors, annotated field by field (little endian).
var vectors = []struct {
	name string
	hex  string
	m    Message
}{
	{"READ domid", "" +
		"02000000" + // type READ
		"01000000" + // req_id 1
		"00000000" + // tx_id 0
		"06000000" + // len 6
		"646f6d696400", // "domid\0"
		Message{Type: TypeRead, ReqID: 1, Payload: []byte("domid\x00")}},
	{"WRITE in transaction", "" +
		"0b000000" + // type WRITE
		"07000000" + // req_id 7
		"2a000000" + // tx_id 42
		"05000000" + // len 5
		"6100" + "626364", // path "a\0", value "bcd" (no NUL)
		Message{Type: TypeWrite, ReqID: 7, TxID: 42, Payload: []byte("a\x00bcd")}},
	{"WATCH_EVENT", "" +
		"0f000000" + // type WATCH_EVENT
		"00000000" + // req_id 0
		"00000000" + // tx_id 0
		"0f000000" + // len 15
		"6261636b656e642f76696600" + "743100", // "backend/vif\0" "t1\0"
		Message{Type: TypeWatchEvent, Payload: []byte("backend/vif\x00t1\x00")}},
	{"ERROR ENOENT", "" +
		"10000000" + // type ERROR
		"03000000" + // req_id 3
		"00000000" + // tx_id 0
		"07000000" + // len 7
		"454e4f454e5400", // "ENOENT\0"
		Message{Type: TypeError, ReqID: 3, Payload: []byte("ENOENT\x00")}},
}

func TestCodecVectors(t *testing.T) {
	for _, v := range vectors {
		wire, err := hex.DecodeString(v.hex)
		if err != nil {
			t.Fatal(err)
		}
		if got := v.m.Append(nil); !bytes.Equal(got, wire) {
			t.Errorf("%s: encoded %x, want %x", v.name, got, wire)
		}
		m, err := Decode(wire)
		if err != nil {
			t.Fatalf("%s: %v", v.name, err)
		}
		if m.Type != v.m.Type || m.ReqID != v.m.ReqID || m.TxID != v.m.TxID || !bytes.Equal(m.Payload, v.m.Payload) {
			t.Errorf("%s: decoded %+v, want %+v", v.name, m, v.m)
		}
	}
}

func TestDecodeRejects(t *testing.T) {
	hdr := func(typ, n uint32) []byte {
		return (&Message{Type: Type(typ)}).Append(nil)[:12:12]
	}
	withLen := func(typ uint32, n uint32, payload int) []byte {
		b := append(hdr(typ, n), byte(n), byte(n>>8), byte(n>>16), byte(n>>24))
		return append(b, make([]byte, payload)...)
	}
	for _, c := range []struct {
		name string
		b    []byte
		want error
	}{
		{"short header", make([]byte, 15), nil},
		{"len 4097", withLen(2, 4097, 4097), ErrTooLong},
		{"len 2^32-1", withLen(2, 0xffffffff, 0), ErrTooLong},
		{"unknown type", withLen(23, 0, 0), ErrUnknownType},
		{"type 2^31", withLen(0x80000000, 0, 0), ErrUnknownType},
		{"payload shorter than len", withLen(2, 10, 9), nil},
		{"payload longer than len", withLen(2, 10, 11), nil},
	} {
		_, err := Decode(c.b)
		if err == nil || (c.want != nil && !errors.Is(err, c.want)) {
			t.Errorf("%s: err %v, want %v", c.name, err, c.want)
		}
	}
	if _, err := Decode(withLen(2, 4096, 4096)); err != nil {
		t.Errorf("len 4096 (the maximum): %v", err)
	}
}

func TestSplitStrings(t *testing.T) {
	for _, c := range []struct {
		in   string
		want []string
		ok   bool
	}{
		{"", nil, true},
		{"\x00", []string{""}, true},
		{"a\x00bc\x00", []string{"a", "bc"}, true},
		{"a\x00b", nil, false},
	} {
		got, err := SplitStrings([]byte(c.in))
		if (err == nil) != c.ok || strings.Join(got, "|") != strings.Join(c.want, "|") {
			t.Errorf("SplitStrings(%q) = %q, %v", c.in, got, err)
		}
	}
}

func TestDecodeErrorSanitises(t *testing.T) {
	for in, want := range map[string]Error{
		"ENOENT\x00":              ENOENT,
		"EAGAIN":                  EAGAIN,
		"":                        EIO,
		"E\x1b[31mX\x00":          "E??31?X",
		strings.Repeat("A", 5000): Error(strings.Repeat("A", maxErrorName)),
	} {
		if got := decodeError([]byte(in)); got != want {
			t.Errorf("decodeError(%q) = %q, want %q", in, got, want)
		}
	}
}
