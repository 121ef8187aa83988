package qubesdbtest

import (
	"context"
	"errors"
	"fmt"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/qubesdb"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// guard is how long a test waits before declaring a hang; it never decides
// success.
const guard = 20 * time.Second

// startServer serves s in daemon mode on a fresh unix socket and returns the
// socket path.
func startServer(t *testing.T, s *Server) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "qubesdb.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(l) }()
	t.Cleanup(func() {
		s.Close()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return path
}

// startPeerServer serves s in dom0 mode on a second socket.
func startPeerServer(t *testing.T, s *Server) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "peer.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.ServePeerListener(l) }()
	t.Cleanup(func() {
		s.Close()
		<-done
	})
	return path
}

func dialConn(t *testing.T, path string) *qubesdb.Conn {
	t.Helper()
	rwc, err := qubesdb.UnixDialer(path)(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	c := qubesdb.NewConn(rwc)
	t.Cleanup(func() { c.Close() })
	return c
}

func newTestServer(t *testing.T, entries ...string) *Server {
	t.Helper()
	s := NewServer(t.Logf)
	for i := 0; i+1 < len(entries); i += 2 {
		if err := s.Write(entries[i], entries[i+1]); err != nil {
			t.Fatal(err)
		}
	}
	return s
}

func TestConn(t *testing.T) {
	s := newTestServer(t, "/qubes-ip", "10.137.0.1",
		"/qubes-firewall/10.137.0.5/policy", "drop",
		"/qubes-firewall/10.137.0.5/0000", "action=accept",
		"/qubes-firewall/10.137.0.5", "",
		"/qubes-firewall/10.137.0.6/policy", "drop")
	c := dialConn(t, startServer(t, s))

	if v, err := c.Read("/qubes-ip"); err != nil || v != "10.137.0.1" {
		t.Fatalf("Read = %q, %v", v, err)
	}
	if _, err := c.Read("/nope"); !errors.Is(err, qubesdb.ErrNotFound) {
		t.Fatalf("Read missing: %v", err)
	}
	if err := c.Write("/qubes-gateway", "10.137.0.254"); err != nil {
		t.Fatal(err)
	}
	if v, _ := s.Read("/qubes-gateway"); v != "10.137.0.254" {
		t.Fatalf("server has %q", v)
	}
	if err := c.Write("/dir/", "x"); !errors.Is(err, qubesdb.ErrRefused) {
		t.Fatalf("Write of a directory: %v", err)
	}
	paths, err := c.List("/qubes-firewall/10.137.0.5")
	want := []string{"/qubes-firewall/10.137.0.5", "/qubes-firewall/10.137.0.5/0000", "/qubes-firewall/10.137.0.5/policy"}
	if err != nil || !slices.Equal(paths, want) {
		t.Fatalf("List = %q, %v; want %q", paths, err, want)
	}
	m, err := c.MultiRead("/qubes-firewall/10.137.0.5/")
	if err != nil || len(m) != 2 || m["/qubes-firewall/10.137.0.5/policy"] != "drop" {
		t.Fatalf("MultiRead = %q, %v", m, err)
	}
	all, err := c.MultiRead("")
	if err != nil || len(all) != 6 {
		t.Fatalf("MultiRead everything = %q, %v", all, err)
	}

	// Watches: exact path, and a subtree.
	if err := c.Watch("/qubes-ip"); err != nil {
		t.Fatal(err)
	}
	if err := c.Watch("/qubes-firewall/"); err != nil {
		t.Fatal(err)
	}
	s.Write("/qubes-ip", "10.137.0.2")
	s.Write("/qubes-ipx", "not watched")
	if err := c.Rm("/qubes-firewall/10.137.0.5/"); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"/qubes-ip", "/qubes-firewall/10.137.0.5/"} {
		if p, err := c.NextWatch(); err != nil || p != want {
			t.Fatalf("NextWatch = %q, %v; want %q", p, err, want)
		}
	}
	if _, ok := s.Read("/qubes-firewall/10.137.0.5/0000"); ok {
		t.Fatal("subtree RM left an entry")
	}
	if _, ok := s.Read("/qubes-firewall/10.137.0.5"); !ok {
		t.Fatal("subtree RM removed the entry named like the directory")
	}
	if err := c.Rm("/qubes-firewall/10.137.0.5/"); !errors.Is(err, qubesdb.ErrNotFound) {
		t.Fatalf("second Rm: %v", err)
	}
	if err := c.Unwatch("/qubes-ip"); err != nil {
		t.Fatal(err)
	}
	if err := c.Unwatch("/qubes-ip"); !errors.Is(err, qubesdb.ErrNotFound) {
		t.Fatalf("second Unwatch: %v", err)
	}
	s.Write("/qubes-ip", "10.137.0.3")        // no longer watched
	s.Write("/qubes-firewall/10.137.0.7", "") // still watched
	if p, err := c.NextWatch(); err != nil || p != "/qubes-firewall/10.137.0.7" {
		t.Fatalf("NextWatch = %q, %v", p, err)
	}
}

func TestConnWatchDuringMultiRead(t *testing.T) {
	s := newTestServer(t, "/a", "1", "/c", "3")
	var once sync.Once
	s.midMultiRead = func(int) { once.Do(func() { s.Write("/b", "2") }) }
	c := dialConn(t, startServer(t, s))
	if err := c.Watch("/"); err != nil {
		t.Fatal(err)
	}
	m, err := c.MultiRead("")
	if err != nil {
		t.Fatal(err)
	}
	// The event was queued after the first entry, so it arrived before the
	// end of the reply and must have been set aside, not taken for an entry.
	if len(m) != 2 || m["/a"] != "1" || m["/c"] != "3" {
		t.Fatalf("MultiRead = %q", m)
	}
	if p, err := c.NextWatch(); err != nil || p != "/b" {
		t.Fatalf("NextWatch = %q, %v", p, err)
	}
}

// recorder is a qubesdb.Handler that keeps the resulting state and reports every
// call on a channel.
type recorder struct {
	calls chan string
}

func newRecorder() *recorder { return &recorder{calls: make(chan string, 100)} }

func (r *recorder) Snapshot(e map[string]string) {
	var kv []string
	for k, v := range e {
		kv = append(kv, k+"="+v)
	}
	slices.Sort(kv)
	r.calls <- "snapshot " + strings.Join(kv, " ")
}
func (r *recorder) Write(p, v string) { r.calls <- "write " + p + "=" + v }
func (r *recorder) Remove(p string)   { r.calls <- "remove " + p }
func (r *recorder) Flush()            {}

func (r *recorder) next(t *testing.T) string {
	t.Helper()
	select {
	case c := <-r.calls:
		return c
	case <-time.After(guard):
		t.Fatal("no handler call")
		return ""
	}
}

func (r *recorder) expect(t *testing.T, want ...string) {
	t.Helper()
	for _, w := range want {
		if got := r.next(t); got != w {
			t.Fatalf("handler call %q, want %q", got, w)
		}
	}
}

// runClient runs c until the test ends.
func runClient(t *testing.T, c *qubesdb.Client, h qubesdb.Handler) {
	t.Helper()
	c.SetFirstRetry(time.Millisecond)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx, h) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("Run = %v", err)
		}
	})
}

func TestClientDaemon(t *testing.T) {
	s := newTestServer(t, "/qubes-ip", "10.137.0.1", "/qubes-firewall/10.137.0.5/policy", "drop")
	var once sync.Once
	// A change lands in the middle of the initial snapshot's reply.
	s.midMultiRead = func(int) { once.Do(func() { s.Write("/b", "2") }) }
	r := newRecorder()
	runClient(t, qubesdb.NewClient(qubesdb.UnixDialer(startServer(t, s)), qubesdb.Daemon, t.Logf), r)

	r.expect(t, "snapshot /qubes-firewall/10.137.0.5/policy=drop /qubes-ip=10.137.0.1", "write /b=2")
	s.Write("/qubes-ip", "10.137.0.2")
	r.expect(t, "write /qubes-ip=10.137.0.2")
	s.Remove("/qubes-firewall/")
	r.expect(t, "remove /qubes-firewall/")
	s.Remove("/b")
	r.expect(t, "remove /b")

	// The server drops us; the client reconnects and re-syncs. A change made
	// meanwhile shows up in the new snapshot or as an event after it.
	s.dropConnections()
	s.Write("/z", "26")
	if got := r.next(t); !strings.HasPrefix(got, "snapshot ") {
		t.Fatalf("after reconnect: %q", got)
	} else if !strings.Contains(got, "/z=26") {
		r.expect(t, "write /z=26")
	}
	s.Write("/y", "25")
	r.expect(t, "write /y=25")
}

func TestClientPeer(t *testing.T) {
	s := newTestServer(t, "/qubes-ip", "10.137.0.1", "/name", "sys-firewall")
	replies := make(chan qubesdb.Message, 100)
	s.peerReply = func(m qubesdb.Message) { replies <- m }
	r := newRecorder()
	runClient(t, qubesdb.NewClient(qubesdb.UnixDialer(startPeerServer(t, s)), qubesdb.Peer, t.Logf), r)
	reply := func(want qubesdb.Message) {
		t.Helper()
		select {
		case m := <-replies:
			if m.String() != want.String() {
				t.Fatalf("peer replied %v, want %v", m, want)
			}
		case <-time.After(guard):
			t.Fatal("no peer reply")
		}
	}

	r.expect(t, "snapshot /name=sys-firewall /qubes-ip=10.137.0.1")
	s.Write("/qubes-firewall/10.137.0.5/policy", "drop")
	r.expect(t, "write /qubes-firewall/10.137.0.5/policy=drop")
	reply(qubesdb.Message{Type: qubesdb.RespOK, Path: "/qubes-firewall/10.137.0.5/policy"})

	// A daemon-mode client's write is pushed to the peer.
	c := dialConn(t, startServer(t, s))
	if err := c.Write("/connected-ips", "10.137.0.5"); err != nil {
		t.Fatal(err)
	}
	r.expect(t, "write /connected-ips=10.137.0.5")
	reply(qubesdb.Message{Type: qubesdb.RespOK, Path: "/connected-ips"})
	if err := c.Rm("/qubes-firewall/"); err != nil {
		t.Fatal(err)
	}
	r.expect(t, "remove /qubes-firewall/")
	reply(qubesdb.Message{Type: qubesdb.RespOK, Path: "/qubes-firewall/"})

	// An RM of something the VM never had is still acknowledged with OK:
	// RESP_ERROR_NOENT would be fatal for dom0's daemon.
	if !s.pushPeer(qubesdb.Message{Type: qubesdb.CmdRm, Path: "/never-written"}) {
		t.Fatal("no peer")
	}
	reply(qubesdb.Message{Type: qubesdb.RespOK, Path: "/never-written"})
	r.expect(t, "remove /never-written")
	// A push naming no possible entry is refused with RESP_ERROR (which dom0
	// logs and ignores) and not delivered.
	s.pushPeer(qubesdb.Message{Type: qubesdb.CmdWrite, Path: "/dir/", Data: []byte("x")})
	reply(qubesdb.Message{Type: qubesdb.RespError, Path: "/dir/"})

	// Reconnection: a new MULTIREAD on a new connection.
	s.dropConnections()
	s.Write("/z", "26")
	if got := r.next(t); !strings.HasPrefix(got, "snapshot ") {
		t.Fatalf("after reconnect: %q", got)
	} else if !strings.Contains(got, "/z=26") {
		r.expect(t, "write /z=26")
	}
}

// TestServePeerFatalNoEnt checks the server's dom0 behaviour that the peer
// tests rely on: a NOENT reply ends the session with an error.
func TestServePeerFatalNoEnt(t *testing.T) {
	s := newTestServer(t, "/a", "1")
	defer s.Close()
	vm, dom0 := net.Pipe()
	done := make(chan error, 1)
	go func() { done <- s.ServePeer(dom0) }()
	if err := qubesdb.WriteMessage(vm, qubesdb.Message{Type: qubesdb.CmdMultiRead}); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"/a", ""} {
		m, err := qubesdb.ReadMessage(vm)
		if err != nil || m.Type != qubesdb.RespMultiRead || m.Path != want {
			t.Fatalf("snapshot message %v, %v; want %q", m, err, want)
		}
	}
	// Once the peer is registered, writes are pushed; ServePeer registers it
	// before it starts reading, so after the snapshot this push reaches it.
	s.Write("/b", "2")
	if m, err := qubesdb.ReadMessage(vm); err != nil || m.Type != qubesdb.CmdWrite || m.Path != "/b" {
		t.Fatalf("push %v, %v", m, err)
	}
	qubesdb.WriteMessage(vm, qubesdb.Message{Type: qubesdb.RespErrorNoEnt, Path: "/b"})
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "fatal") {
			t.Fatalf("ServePeer = %v, want a fatal error", err)
		}
	case <-time.After(guard):
		t.Fatal("ServePeer did not end")
	}
	vm.Close()
}

func TestServerRejectsSecondMultiRead(t *testing.T) {
	s := newTestServer(t)
	defer s.Close()
	vm, dom0 := net.Pipe()
	defer vm.Close()
	done := make(chan error, 1)
	go func() { done <- s.ServePeer(dom0) }()
	qubesdb.WriteMessage(vm, qubesdb.Message{Type: qubesdb.CmdMultiRead})
	if m, err := qubesdb.ReadMessage(vm); err != nil || m.Type != qubesdb.RespMultiRead || m.Path != "" {
		t.Fatalf("snapshot end %v, %v", m, err)
	}
	qubesdb.WriteMessage(vm, qubesdb.Message{Type: qubesdb.CmdMultiRead})
	if err := <-done; err == nil {
		t.Fatal("second MULTIREAD accepted")
	}
}

func ExampleMirror() {
	m := qubesdb.NewMirror(func(e qubesdb.Event) { fmt.Println(e.Kind, e.IP, e.Rules) })
	m.Snapshot(map[string]string{})
	m.Write("/qubes-firewall/10.137.0.5/policy", "drop")
	m.Write("/qubes-firewall/10.137.0.5/0000", "action=accept proto=tcp dstports=443-443")
	m.Write("/qubes-firewall/10.137.0.5", "")
	// Output:
	// snapshot  map[]
	// rules 10.137.0.5 map[0000:action=accept proto=tcp dstports=443-443 policy:drop]
}
