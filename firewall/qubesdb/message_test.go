package qubesdb

import (
	"bytes"
	"errors"
	"io"
	"runtime"
	"strings"
	"testing"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/internal/fixture"
)

// header builds a raw header; path is copied as is (no NUL added if it
// fills all 64 bytes).
func header(typ byte, path string, dataLen uint32) []byte {
	h := make([]byte, HeaderLen)
	h[0] = typ
	copy(h[offPath:offPath+64], path)
	h[offDataLen] = byte(dataLen)
	h[offDataLen+1] = byte(dataLen >> 8)
	h[offDataLen+2] = byte(dataLen >> 16)
	h[offDataLen+3] = byte(dataLen >> 24)
	return h
}

func TestVector(t *testing.T) {
	// WRITE /qubes-ip = 10.137.0.5, as an x86 qubesdb-daemon lays it out.
	wire := fixture.Hex(t,
		"01",                            // type: QDB_CMD_WRITE
		"2f 71 75 62 65 73 2d 69 70",    // path: "/qubes-ip"
		strings.Repeat("00", 64-9),      // rest of path[64], NUL-filled
		"00 00 00",                      // alignment padding
		"0a 00 00 00",                   // data_len: 10, little endian
		"31 30 2e 31 33 37 2e 30 2e 35", // data: "10.137.0.5", no NUL
	)
	m := Message{Type: CmdWrite, Path: "/qubes-ip", Data: []byte("10.137.0.5")}
	got, err := m.Encode()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, wire) {
		t.Fatalf("Encode:\n got %x\nwant %x", got, wire)
	}
	dec, err := ReadMessage(bytes.NewReader(wire))
	if err != nil {
		t.Fatal(err)
	}
	if dec.String() != m.String() || string(dec.Data) != string(m.Data) {
		t.Fatalf("ReadMessage = %v %q, want %v", dec, dec.Data, m)
	}
}

func TestRoundTrip(t *testing.T) {
	for _, m := range []Message{
		{Type: CmdMultiRead},
		{Type: RespMultiRead, Path: "/qubes-firewall/10.137.0.5/0000", Data: []byte("action=accept proto=tcp dstports=443-443")},
		{Type: RespWatch, Path: "/qubes-firewall/10.137.0.5/"},
		{Type: RespRead, Path: "/" + strings.Repeat("a", MaxPath-1), Data: bytes.Repeat([]byte{'x'}, MaxData)},
		{Type: CmdWrite, Path: "/qubes-firewall/fd09:24ef:4179::a89:5", Data: nil},
		{Type: RespOK, Path: "/a-b_c.d:e@f"},
	} {
		b, err := m.Encode()
		if err != nil {
			t.Fatalf("Encode %v: %v", m, err)
		}
		if len(b) != HeaderLen+len(m.Data) {
			t.Fatalf("Encode %v: %d bytes", m, len(b))
		}
		got, err := ReadMessage(bytes.NewReader(b))
		if err != nil {
			t.Fatalf("ReadMessage %v: %v", m, err)
		}
		if got.Type != m.Type || got.Path != m.Path || !bytes.Equal(got.Data, m.Data) {
			t.Fatalf("round trip: got %v, want %v", got, m)
		}
	}
}

func TestLenientFields(t *testing.T) {
	// The C structs are not zeroed: padding and bytes after the path's NUL
	// may be garbage and must be ignored.
	h := header(byte(RespOK), "/x", 0)
	h[offPath+3] = 0xee
	h[65], h[66], h[67] = 0xff, 0xff, 0xff
	m, err := ReadMessage(bytes.NewReader(h))
	if err != nil || m.Path != "/x" || m.Type != RespOK {
		t.Fatalf("got %v, %v", m, err)
	}
}

func TestMalformed(t *testing.T) {
	long := "/" + strings.Repeat("a", 63) // 64 bytes: no room for the NUL
	for _, tc := range []struct {
		name string
		in   []byte
		want error
	}{
		{"unknown type", header(14, "/x", 0), ErrMalformed},
		{"type 255", header(255, "", 0), ErrMalformed},
		{"path without NUL", header(byte(CmdRead), long, 0), ErrMalformed},
		{"space in path", header(byte(CmdRead), "/a b", 0), ErrMalformed},
		{"leading dash", header(byte(CmdRead), "-a", 0), ErrMalformed},
		{"high byte in path", header(byte(CmdRead), "/\xff", 0), ErrMalformed},
		{"data_len 3072", header(byte(CmdWrite), "/x", 3072), ErrMalformed},
		{"data_len 4G", header(byte(RespRead), "/x", 0xffffffff), ErrMalformed},
		{"data on WATCH event", append(header(byte(RespWatch), "/x", 1), 'a'), ErrMalformed},
		{"data on RM", append(header(byte(CmdRm), "/x", 1), 'a'), ErrMalformed},
		{"NUL in data", append(header(byte(CmdWrite), "/x", 2), 'a', 0), ErrMalformed},
		{"empty", nil, io.EOF},
		{"truncated header", header(byte(RespOK), "/x", 0)[:40], io.ErrUnexpectedEOF},
		{"truncated body", append(header(byte(RespRead), "/x", 10), "abc"...), io.ErrUnexpectedEOF},
		{"missing body", header(byte(RespRead), "/x", 10), io.ErrUnexpectedEOF},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := ReadMessage(bytes.NewReader(tc.in))
			if !errors.Is(err, tc.want) {
				t.Fatalf("ReadMessage = %v, %v; want %v", m, err, tc.want)
			}
		})
	}
	for _, m := range []Message{
		{Type: 14},
		{Type: CmdRead, Path: long},
		{Type: CmdWrite, Path: "/x", Data: make([]byte, MaxData+1)},
		{Type: CmdRm, Path: "/x", Data: []byte("a")},
		{Type: CmdWrite, Path: "/x", Data: []byte{'a', 0}},
	} {
		if _, err := m.Encode(); !errors.Is(err, ErrMalformed) {
			t.Errorf("Encode %v = %v, want ErrMalformed", m, err)
		}
	}
}

func TestValidKey(t *testing.T) {
	for p, want := range map[string]bool{
		"/qubes-ip": true, "/a/b": true, "": false, "/": false, "/a/": false, "a": false,
		"/" + strings.Repeat("a", 62): true, "/" + strings.Repeat("a", 63): false,
	} {
		if got := ValidKey(p); got != want {
			t.Errorf("ValidKey(%q) = %v, want %v", p, got, want)
		}
	}
}

func TestReadMessageAllocs(t *testing.T) {
	// A hostile data_len must be refused before anything is allocated for it.
	h := header(byte(RespRead), "/x", 0xffffffff)
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for range 100 {
		if _, err := ReadMessage(bytes.NewReader(h)); !errors.Is(err, ErrMalformed) {
			t.Fatal(err)
		}
	}
	runtime.ReadMemStats(&after)
	if n := after.TotalAlloc - before.TotalAlloc; n > 100*1024 {
		t.Fatalf("%d bytes allocated for 100 refused headers", n)
	}
}

func FuzzReadMessage(f *testing.F) {
	for _, m := range []Message{
		{Type: CmdWrite, Path: "/qubes-ip", Data: []byte("10.137.0.5")},
		{Type: RespMultiRead},
		{Type: RespWatch, Path: "/qubes-firewall/"},
	} {
		b, _ := m.Encode()
		f.Add(b)
	}
	f.Add(header(byte(RespRead), "/x", 0xffffffff))
	f.Fuzz(func(t *testing.T, in []byte) {
		r := bytes.NewReader(in)
		for {
			m, err := ReadMessage(r)
			if err != nil {
				return
			}
			b, err := m.Encode()
			if err != nil {
				t.Fatalf("decoded %v does not encode: %v", m, err)
			}
			again, err := ReadMessage(bytes.NewReader(b))
			if err != nil || again.Type != m.Type || again.Path != m.Path || !bytes.Equal(again.Data, m.Data) {
				t.Fatalf("re-decode of %v: %v, %v", m, again, err)
			}
		}
	})
}
