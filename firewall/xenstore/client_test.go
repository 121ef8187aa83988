package xenstore_test

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/xenstore"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/xenstore/xenstoretest"
)

func newFake(t *testing.T) (*xenstoretest.FakeServer, *xenstore.Client) {
	t.Helper()
	s := xenstoretest.NewFakeServer(7)
	c := s.Client()
	t.Cleanup(func() {
		c.Close()
		s.Close()
	})
	return s, c
}

func TestClientTreeOps(t *testing.T) {
	s, c := newFake(t)
	if v, err := c.Read("domid"); err != nil || v != "7" {
		t.Fatalf("read domid = %q, %v", v, err)
	}
	if err := c.Write("data/a/b", "x y"); err != nil {
		t.Fatal(err)
	}
	if v, ok := s.Read("/local/domain/7/data/a/b"); !ok || v != "x y" {
		t.Fatalf("relative write landed as %q, %v", v, ok)
	}
	if err := c.Write("/abs", ""); err != nil {
		t.Fatal(err)
	}
	if v, err := c.Read("/abs"); err != nil || v != "" {
		t.Fatalf("empty value: %q, %v", v, err)
	}
	if err := c.Mkdir("data/c"); err != nil {
		t.Fatal(err)
	}
	names, err := c.Directory("data")
	if err != nil || !slices.Equal(names, []string{"a", "c"}) {
		t.Fatalf("directory = %q, %v", names, err)
	}
	if names, err := c.Directory("data/c"); err != nil || len(names) != 0 {
		t.Fatalf("empty directory = %q, %v", names, err)
	}
	if err := c.Rm("data/a"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Read("data/a/b"); !errors.Is(err, xenstore.ENOENT) {
		t.Fatalf("read after rm: %v, want xenstore.ENOENT", err)
	}
	if err := c.Rm("data/missing"); err != nil {
		t.Fatalf("rm of a missing node under an existing parent: %v", err)
	}
	if err := c.Rm("nope/missing"); !errors.Is(err, xenstore.ENOENT) {
		t.Fatalf("rm with missing parent: %v, want xenstore.ENOENT", err)
	}
	if p, err := c.GetDomainPath(3); err != nil || p != "/local/domain/3" {
		t.Fatalf("get domain path = %q, %v", p, err)
	}
	if err := c.Write("big", strings.Repeat("v", xenstore.MaxRequestPayload)); !errors.Is(err, xenstore.ErrTooLong) {
		t.Fatalf("oversized write: %v, want xenstore.ErrTooLong", err)
	}
	if _, err := c.Read("bad\x00path"); err == nil {
		t.Fatal("path with NUL accepted")
	}
}

// next returns the next event; the channel must deliver one.
func next(t *testing.T, ch <-chan xenstore.Event) xenstore.Event {
	t.Helper()
	ev, ok := <-ch
	if !ok {
		t.Fatal("watch channel closed")
	}
	return ev
}

func TestWatchFiresOnRegistrationAndChanges(t *testing.T) {
	s, c := newFake(t)
	ch, cancel, err := c.Watch("backend/vif", "tok")
	if err != nil {
		t.Fatal(err)
	}
	if ev := next(t, ch); ev != (xenstore.Event{Path: "backend/vif", Token: "tok"}) {
		t.Fatalf("first event %+v, want the watched path itself", ev)
	}
	s.Write("backend/vif/3/0/ip", "10.137.0.5")
	// The fake fires for each created node, parents first.
	var got []string
	for len(got) == 0 || got[len(got)-1] != "backend/vif/3/0/ip" {
		got = append(got, next(t, ch).Path)
	}
	if got[0] != "backend/vif" {
		t.Errorf("events %q: want relative paths, starting with the created directory", got)
	}
	s.Write("/elsewhere", "x")
	s.Rm("backend/vif/3")
	for ev := next(t, ch); ev.Path != "backend/vif/3/0/ip"; ev = next(t, ch) {
		if !strings.HasPrefix(ev.Path, "backend/vif/3") {
			t.Fatalf("event %+v outside the removed subtree", ev)
		}
	}
	if _, _, err := c.Watch("other", "tok"); err == nil {
		t.Fatal("duplicate token accepted")
	}
	cancel()
	if _, ok := <-drain(ch); ok {
		t.Fatal("channel open after cancel")
	}
	cancel() // idempotent
}

// drain discards queued events and returns the channel once it is closed.
func drain(ch <-chan xenstore.Event) <-chan xenstore.Event {
	for range ch {
	}
	return ch
}

// The fake sends a spurious event before every reply: calls must still
// get their own replies, and the events must reach the watch.
func TestEventsInterleavedWithReplies(t *testing.T) {
	s, c := newFake(t)
	ch, cancel, err := c.Watch("control", "w")
	if err != nil {
		t.Fatal(err)
	}
	defer cancel()
	s.InterleaveEvents(true)
	for i := range 20 {
		if err := c.Write("control/k", strings.Repeat("v", i)); err != nil {
			t.Fatal(err)
		}
		if v, err := c.Read("control/k"); err != nil || v != strings.Repeat("v", i) {
			t.Fatalf("read %d: %q, %v", i, v, err)
		}
	}
	if len(ch) == 0 {
		t.Fatal("no events queued")
	}
	if st := c.Stats(); st.Unmatched != 0 || st.Malformed != 0 {
		t.Fatalf("stats %+v", st)
	}
}

func TestWatchOverflowWidensToWatchedPath(t *testing.T) {
	s, c := newFake(t)
	ch, cancel, err := c.Watch("/d", "w")
	if err != nil {
		t.Fatal(err)
	}
	defer cancel()
	for i := range xenstore.WatchBuffer * 2 {
		s.Write("/d/k", strings.Repeat("x", i+1))
	}
	// A round trip guarantees every event sent before it was dispatched.
	if _, err := c.Read("/d/k"); err != nil {
		t.Fatal(err)
	}
	if len(ch) != xenstore.WatchBuffer {
		t.Fatalf("%d events queued, want %d", len(ch), xenstore.WatchBuffer)
	}
	var last xenstore.Event
	for range xenstore.WatchBuffer {
		last = <-ch
	}
	if last.Path != "/d" || c.Stats().EventsDropped == 0 {
		t.Fatalf("last event %+v, stats %+v: want the widened event", last, c.Stats())
	}
}

func TestTransactionRetriesOnEAGAIN(t *testing.T) {
	s, c := newFake(t)
	s.FailCommits(2)
	runs := 0
	err := c.Transaction(func(tx *xenstore.Tx) error {
		runs++
		return tx.Write("t/x", "1")
	})
	if err != nil || runs != 3 {
		t.Fatalf("transaction: %v after %d runs, want success after 3", err, runs)
	}
	if v, _ := s.Read("t/x"); v != "1" {
		t.Fatalf("committed value %q", v)
	}

	// A real conflict: another writer changes the tree mid-transaction.
	runs = 0
	err = c.Transaction(func(tx *xenstore.Tx) error {
		runs++
		v, err := tx.Read("t/x")
		if err != nil {
			return err
		}
		if runs == 1 {
			s.Write("t/y", "other")
		}
		return tx.Write("t/x", v+"+")
	})
	if err != nil || runs != 2 {
		t.Fatalf("conflicting transaction: %v after %d runs", err, runs)
	}
	if v, _ := s.Read("t/x"); v != "1+" {
		t.Fatalf("value %q, want 1+ (written once)", v)
	}

	// An error from fn aborts: nothing is written.
	boom := errors.New("boom")
	if err := c.Transaction(func(tx *xenstore.Tx) error {
		tx.Write("t/z", "no")
		return boom
	}); !errors.Is(err, boom) {
		t.Fatalf("aborted transaction: %v", err)
	}
	if _, ok := s.Read("t/z"); ok {
		t.Fatal("aborted transaction wrote")
	}

	s.FailCommits(xenstore.MaxTxRetries + 1)
	if err := c.Transaction(func(tx *xenstore.Tx) error { return nil }); !errors.Is(err, xenstore.EAGAIN) {
		t.Fatalf("endless contention: %v, want xenstore.EAGAIN after bounded retries", err)
	}
}

func TestDialUnixSocket(t *testing.T) {
	s := xenstoretest.NewFakeServer(0)
	defer s.Close()
	sock := filepath.Join(t.TempDir(), "xs.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(l)
	c, err := xenstore.Dial(sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if v, err := c.Read("/local/domain/0/domid"); err != nil || v != "0" {
		t.Fatalf("read over socket: %q, %v", v, err)
	}
	if _, err := xenstore.Dial(filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Fatal("dial of a missing path succeeded")
	}
}

// hostile runs a client against a hand-driven server end.
type hostile struct {
	t   *testing.T
	c   *xenstore.Client
	srv net.Conn
	r   *bufio.Reader
}

func newHostile(t *testing.T) *hostile {
	a, b := net.Pipe()
	h := &hostile{t: t, c: xenstore.New(a), srv: b, r: bufio.NewReader(b)}
	t.Cleanup(func() { h.c.Close(); b.Close() })
	return h
}

func (h *hostile) request() xenstore.Message {
	h.t.Helper()
	m, err := xenstore.ReadMessage(h.r)
	if err != nil {
		h.t.Fatal(err)
	}
	return m
}

func (h *hostile) send(b []byte) {
	h.t.Helper()
	if _, err := h.srv.Write(b); err != nil {
		h.t.Fatal(err)
	}
}

func TestClientWritesExactBytes(t *testing.T) {
	h := newHostile(t)
	done := make(chan error)
	go func() {
		_, err := h.c.Read("domid")
		done <- err
	}()
	buf := make([]byte, 22)
	if _, err := io.ReadFull(h.srv, buf); err != nil {
		t.Fatal(err)
	}
	want, _ := hex.DecodeString("" +
		"02000000" + // type READ
		"01000000" + // req_id 1
		"00000000" + // tx_id 0
		"06000000" + // len 6
		"646f6d696400") // "domid\0"
	if !bytes.Equal(buf, want) {
		t.Fatalf("request %x, want %x", buf, want)
	}
	h.send((&xenstore.Message{Type: xenstore.TypeRead, ReqID: 1, Payload: []byte("7")}).Append(nil))
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestClientMalformedReplies(t *testing.T) {
	h := newHostile(t)
	got := make(chan error, 1)
	call := func(f func() error) { go func() { got <- f() }() }

	// A reply nobody waits for, an event for an unknown token and an event
	// without a token are ignored and counted; the real reply still works.
	call(func() error { _, err := h.c.Read("a"); return err })
	req := h.request()
	h.send((&xenstore.Message{Type: xenstore.TypeRead, ReqID: req.ReqID + 100, Payload: []byte("x")}).Append(nil))
	h.send((&xenstore.Message{Type: xenstore.TypeWatchEvent, Payload: xenstore.JoinStrings("p", "nobody")}).Append(nil))
	h.send((&xenstore.Message{Type: xenstore.TypeWatchEvent, Payload: []byte("p-without-token")}).Append(nil))
	h.send((&xenstore.Message{Type: xenstore.TypeRead, ReqID: req.ReqID, Payload: []byte("ok")}).Append(nil))
	if err := <-got; err != nil {
		t.Fatal(err)
	}
	if st := h.c.Stats(); st.Unmatched != 2 || st.Malformed != 1 {
		t.Fatalf("stats %+v, want 2 unmatched, 1 malformed", st)
	}

	// A reply of the wrong type, and one of an unknown type, fail their call
	// without breaking the connection.
	call(func() error { _, err := h.c.Read("b"); return err })
	req = h.request()
	h.send((&xenstore.Message{Type: xenstore.TypeWrite, ReqID: req.ReqID, Payload: []byte("OK\x00")}).Append(nil))
	if err := <-got; !errors.Is(err, xenstore.ErrMalformed) {
		t.Fatalf("wrong reply type: %v", err)
	}
	call(func() error { _, err := h.c.Read("c"); return err })
	req = h.request()
	h.send((&xenstore.Message{Type: 99, ReqID: req.ReqID}).Append(nil))
	if err := <-got; !errors.Is(err, xenstore.ErrUnknownType) {
		t.Fatalf("unknown reply type: %v", err)
	}
	call(func() error { _, err := h.c.Directory("d"); return err })
	req = h.request()
	h.send((&xenstore.Message{Type: xenstore.TypeDirectory, ReqID: req.ReqID, Payload: []byte("a\x00b")}).Append(nil))
	if err := <-got; !errors.Is(err, xenstore.ErrMalformed) {
		t.Fatalf("unterminated directory: %v", err)
	}
	call(func() error { return h.c.Transaction(func(*xenstore.Tx) error { return nil }) })
	req = h.request()
	h.send((&xenstore.Message{Type: xenstore.TypeTransactionStart, ReqID: req.ReqID, Payload: []byte("x1\x00")}).Append(nil))
	if err := <-got; !errors.Is(err, xenstore.ErrMalformed) {
		t.Fatalf("bad transaction id: %v", err)
	}

	// An oversized header is fatal: the call fails, later calls fail, and
	// watch channels close.
	ch, _, werr := func() (<-chan xenstore.Event, func(), error) {
		res := make(chan struct {
			ch  <-chan xenstore.Event
			err error
		})
		go func() {
			ch, _, err := h.c.Watch("w", "t")
			res <- struct {
				ch  <-chan xenstore.Event
				err error
			}{ch, err}
		}()
		req := h.request()
		h.send((&xenstore.Message{Type: xenstore.TypeWatch, ReqID: req.ReqID, Payload: []byte("OK\x00")}).Append(nil))
		r := <-res
		return r.ch, nil, r.err
	}()
	if werr != nil {
		t.Fatal(werr)
	}
	call(func() error { _, err := h.c.Read("e"); return err })
	h.request()
	h.send([]byte{2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x10, 0, 0}) // len 4097
	if err := <-got; !errors.Is(err, xenstore.ErrTooLong) {
		t.Fatalf("oversized reply: %v", err)
	}
	if _, ok := <-ch; ok {
		t.Fatal("watch channel still open after a fatal error")
	}
	if _, err := h.c.Read("f"); !errors.Is(err, xenstore.ErrTooLong) {
		t.Fatalf("call after fatal error: %v", err)
	}
}

func TestCloseFailsPendingCalls(t *testing.T) {
	h := newHostile(t)
	got := make(chan error)
	go func() { _, err := h.c.Read("x"); got <- err }()
	h.request()
	h.c.Close()
	if err := <-got; !errors.Is(err, xenstore.ErrClosed) {
		t.Fatalf("pending call after Close: %v", err)
	}
}

// Through the Linux device an event can precede the reply to the WATCH
// that caused it, with a garbage req_id: it must still reach the watch.
func TestWatchEventBeforeReply(t *testing.T) {
	h := newHostile(t)
	type watched struct {
		ch  <-chan xenstore.Event
		err error
	}
	res := make(chan watched)
	go func() {
		ch, _, err := h.c.Watch("backend/vif", "vifs")
		res <- watched{ch, err}
	}()
	req := h.request()
	h.send((&xenstore.Message{Type: xenstore.TypeWatchEvent, ReqID: 0xdeadbeef, TxID: 0xdeadbeef,
		Payload: xenstore.JoinStrings("backend/vif", "vifs")}).Append(nil))
	h.send((&xenstore.Message{Type: xenstore.TypeWatch, ReqID: req.ReqID, Payload: []byte("OK\x00")}).Append(nil))
	r := <-res
	if r.err != nil {
		t.Fatal(r.err)
	}
	if ev := next(t, r.ch); ev != (xenstore.Event{Path: "backend/vif", Token: "vifs"}) {
		t.Fatalf("event %+v", ev)
	}
	if st := h.c.Stats(); st.Unmatched != 0 || st.Malformed != 0 {
		t.Fatalf("stats %+v", st)
	}
}
