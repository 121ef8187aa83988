package xenstoretest_test

import (
	"bufio"
	"errors"
	"io"
	"syscall"
	"testing"
	"time"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/xenstore"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/xenstore/xenstoretest"
)

// watchdog bounds how long a test waits for something that must happen; it
// only turns a hang into a failure and says nothing about speed.
const watchdog = 30 * time.Second

func newXenbus(t *testing.T) (*xenstoretest.FakeServer, *xenstoretest.Xenbus) {
	t.Helper()
	s := xenstoretest.NewFakeServer(7)
	x := xenstoretest.NewXenbus(s)
	t.Cleanup(func() {
		x.Close()
		s.Close()
	})
	return s, x
}

// fd is a raw file on the device, written and read by hand.
type fd struct {
	t  *testing.T
	rw io.ReadWriteCloser
	r  *bufio.Reader
}

func open(t *testing.T, x *xenstoretest.Xenbus) *fd {
	rw := x.Open()
	t.Cleanup(func() { rw.Close() })
	return &fd{t: t, rw: rw, r: bufio.NewReader(rw)}
}

func (f *fd) write(m xenstore.Message) {
	f.t.Helper()
	if _, err := f.rw.Write(m.Append(nil)); err != nil {
		f.t.Fatalf("write %v: %v", m.Type, err)
	}
}

func (f *fd) read() xenstore.Message {
	f.t.Helper()
	m, err := xenstore.ReadMessage(f.r)
	if err != nil {
		f.t.Fatal(err)
	}
	return m
}

// waitFor polls cond until it holds; the watchdog guards against a hang.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(watchdog)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("watchdog: still waiting for %s after %v", what, watchdog)
		}
		time.Sleep(time.Millisecond)
	}
}

// A client that pipelines — READ, then WATCH before the READ's reply is
// delivered — deadlocks the device, and with it every other fd, as Linux
// does: the WATCH holds the fd's msgbuffer_mutex waiting for its reply, and
// the one reader, holding the READ's reply that xenstored sent first, waits
// for that mutex.
func TestPipeliningDeadlocksXenbus(t *testing.T) {
	s, x := newXenbus(t)
	f := open(t, x)
	release := s.HoldReplies()
	defer release()

	f.write(xenstore.Message{Type: xenstore.TypeRead, ReqID: 1, Payload: xenstore.JoinStrings("domid")})
	watched := make(chan error, 1)
	go func() {
		m := xenstore.Message{Type: xenstore.TypeWatch, ReqID: 2, Payload: xenstore.JoinStrings("backend/vif", "t")}
		_, err := f.rw.Write(m.Append(nil))
		watched <- err
	}()
	waitFor(t, "the WATCH to be written", func() bool { return x.Stats().Hazards == 1 })
	release()
	waitFor(t, "the deadlock", func() bool {
		select {
		case err := <-watched:
			t.Fatalf("WATCH returned (%v): the device did not deadlock", err)
		default:
		}
		return x.Deadlocked()
	})
	if st := x.Stats(); st.Requests != 2 || st.Pipelined != 1 || st.Hazards != 1 {
		t.Fatalf("stats %+v, want 2 requests, 1 pipelined, 1 hazard", st)
	}

	// Another fd cannot get an answer either: its READ is sent, but only
	// the stuck reader could deliver the reply. It fails when the model is
	// closed, and the WATCH with it.
	other := x.Client()
	defer other.Close()
	got := make(chan error, 1)
	go func() {
		_, err := other.Read("domid")
		got <- err
	}()
	waitFor(t, "the other fd's READ", func() bool { return x.Stats().Requests == 3 })
	if !x.Deadlocked() {
		t.Fatal("the deadlock ended by itself")
	}
	x.Close()
	if err := <-got; err == nil {
		t.Fatal("the other fd's read succeeded")
	}
	if err := <-watched; err == nil {
		t.Fatal("the deadlocked WATCH succeeded")
	}
}

// The device's own behaviour, as clients see it.
func TestXenbusDevice(t *testing.T) {
	s, x := newXenbus(t)
	f := open(t, x)

	// A message written in pieces is acted on once complete; the reply is
	// a byte stream, read here one byte at a time.
	req := (&xenstore.Message{Type: xenstore.TypeRead, ReqID: 9, Payload: xenstore.JoinStrings("domid")}).Append(nil)
	for _, piece := range [][]byte{req[:3], req[3:16], req[16:]} {
		if n, err := f.rw.Write(piece); err != nil || n != len(piece) {
			t.Fatalf("partial write: %d, %v", n, err)
		}
	}
	var wire []byte
	b := make([]byte, 1)
	for len(wire) < xenstore.HeaderLen+1 {
		if _, err := f.rw.Read(b); err != nil {
			t.Fatal(err)
		}
		wire = append(wire, b[0])
	}
	if m, err := xenstore.Decode(wire); err != nil || m.Type != xenstore.TypeRead || m.ReqID != 9 || string(m.Payload) != "7" {
		t.Fatalf("reply %+v, %v: want READ, req_id 9, \"7\"", m, err)
	}

	// WATCH: the reply is the request's header echoed with "OK"; events
	// carry the caller's token, whatever token the kernel used with
	// xenstored, and a header of which only type and len mean anything.
	f.write(xenstore.Message{Type: xenstore.TypeWatch, ReqID: 5, TxID: 0, Payload: xenstore.JoinStrings("data", "mine")})
	var sawReply, sawEvent bool
	for !sawReply || !sawEvent {
		switch m := f.read(); m.Type {
		case xenstore.TypeWatch:
			if m.ReqID != 5 || string(m.Payload) != "OK\x00" {
				t.Fatalf("WATCH reply %+v", m)
			}
			sawReply = true
		case xenstore.TypeWatchEvent:
			if string(m.Payload) != "data\x00mine\x00" || m.ReqID != 0xdeadbeef {
				t.Fatalf("event %+v %q", m, m.Payload)
			}
			sawEvent = true
		default:
			t.Fatalf("unexpected %+v", m)
		}
	}
	s.Write("data/k", "v")
	for m := f.read(); string(m.Payload) != "data/k\x00mine\x00"; m = f.read() {
		if m.Type != xenstore.TypeWatchEvent {
			t.Fatalf("unexpected %+v", m)
		}
	}
	// UNWATCH of a watch that does not exist still answers OK.
	f.write(xenstore.Message{Type: xenstore.TypeUnwatch, ReqID: 6, Payload: xenstore.JoinStrings("nope", "mine")})
	if m := f.read(); m.Type != xenstore.TypeUnwatch || m.ReqID != 6 || string(m.Payload) != "OK\x00" {
		t.Fatalf("UNWATCH reply %+v", m)
	}
	f.write(xenstore.Message{Type: xenstore.TypeUnwatch, ReqID: 7, Payload: xenstore.JoinStrings("data", "mine")})
	if m := f.read(); m.Type != xenstore.TypeUnwatch || m.ReqID != 7 {
		t.Fatalf("UNWATCH reply %+v", m)
	}

	// The kernel refuses what it checks itself, with a reply of its own.
	for _, c := range []struct {
		m    xenstore.Message
		want string
	}{
		{xenstore.Message{Type: xenstore.TypeRead, ReqID: 10, TxID: 99, Payload: xenstore.JoinStrings("domid")}, "ENOENT\x00"},
		{xenstore.Message{Type: xenstore.TypeWatch, ReqID: 11, Payload: []byte("no-token\x00")}, "EINVAL\x00"},
		{xenstore.Message{Type: xenstore.TypeTransactionEnd, ReqID: 12, Payload: xenstore.JoinStrings("X")}, "EINVAL\x00"},
	} {
		f.write(c.m)
		if m := f.read(); m.Type != xenstore.TypeError || m.ReqID != c.m.ReqID || string(m.Payload) != c.want {
			t.Errorf("%v request: reply %+v %q, want ERROR %q", c.m.Type, m, m.Payload, c.want)
		}
	}

	// A transaction the fd started is known to it.
	f.write(xenstore.Message{Type: xenstore.TypeTransactionStart, ReqID: 20, Payload: xenstore.JoinStrings("")})
	start := f.read()
	if start.Type != xenstore.TypeTransactionStart {
		t.Fatalf("TRANSACTION_START reply %+v", start)
	}
	var tx uint32
	for _, c := range start.Payload[:len(start.Payload)-1] {
		tx = tx*10 + uint32(c-'0')
	}
	f.write(xenstore.Message{Type: xenstore.TypeRead, ReqID: 21, TxID: tx, Payload: xenstore.JoinStrings("domid")})
	if m := f.read(); m.Type != xenstore.TypeRead || m.TxID != tx {
		t.Fatalf("read in transaction %d: %+v", tx, m)
	}
	f.write(xenstore.Message{Type: xenstore.TypeTransactionEnd, ReqID: 22, TxID: tx, Payload: xenstore.JoinStrings("F")})
	if m := f.read(); m.Type != xenstore.TypeTransactionEnd {
		t.Fatalf("TRANSACTION_END reply %+v", m)
	}
	f.write(xenstore.Message{Type: xenstore.TypeRead, ReqID: 23, TxID: tx, Payload: xenstore.JoinStrings("domid")})
	if m := f.read(); m.Type != xenstore.TypeError || string(m.Payload) != "ENOENT\x00" {
		t.Fatalf("read in an ended transaction: %+v", m)
	}

	// Size limits: a header announcing more than fits, and a write that
	// overflows the buffer.
	big := xenstore.Message{Type: xenstore.TypeWrite, Payload: make([]byte, xenstore.MaxRequestPayload+1)}
	if _, err := f.rw.Write(big.Append(nil)[:xenstore.HeaderLen]); !errors.Is(err, syscall.E2BIG) {
		t.Errorf("oversized message: %v, want E2BIG", err)
	}
	if _, err := f.rw.Write(big.Append(nil)); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("write beyond the buffer: %v, want EINVAL", err)
	}
	if st := x.Stats(); st.Pipelined != 0 || st.Hazards != 0 {
		t.Errorf("stats %+v: nothing was pipelined", st)
	}
}
