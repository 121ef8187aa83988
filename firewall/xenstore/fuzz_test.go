package xenstore

import (
	"encoding/hex"
	"io"
	"net"
	"sync"
	"testing"
)

func FuzzDecode(f *testing.F) {
	for _, v := range vectors {
		b, _ := hex.DecodeString(v.hex)
		f.Add(b)
	}
	f.Add([]byte{2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := Decode(b)
		if err != nil {
			return
		}
		if len(m.Payload) > MaxPayload {
			t.Fatalf("payload of %d bytes accepted", len(m.Payload))
		}
		if string(m.Append(nil)) != string(b) {
			t.Fatal("decode/encode round trip differs")
		}
		if m.Type == TypeError {
			_ = decodeError(m.Payload)
		}
		_, _ = SplitStrings(m.Payload)
	})
}

// FuzzClientStream feeds a hostile byte stream to a client that has calls
// and a watch outstanding: every call must return once the stream ends,
// with no panic.
func FuzzClientStream(f *testing.F) {
	for _, v := range vectors {
		b, _ := hex.DecodeString(v.hex)
		f.Add(b)
	}
	f.Add((&Message{Type: TypeWatch, ReqID: 1, Payload: []byte("OK\x00")}).Append(
		(&Message{Type: TypeWatchEvent, Payload: JoinStrings("w", "t")}).Append(nil)))
	f.Fuzz(func(t *testing.T, stream []byte) {
		a, b := net.Pipe()
		c := New(a)
		go io.Copy(io.Discard, b) // swallow requests
		var wg sync.WaitGroup
		wg.Add(3)
		go func() {
			defer wg.Done()
			if ch, cancel, err := c.Watch("w", "t"); err == nil {
				for range ch {
				}
				cancel()
			}
		}()
		go func() { defer wg.Done(); c.Read("r") }()
		go func() { defer wg.Done(); c.Transaction(func(tx *Tx) error { _, err := tx.Directory("d"); return err }) }()
		b.Write(stream)
		b.Close()
		wg.Wait()
		c.Close()
	})
}
