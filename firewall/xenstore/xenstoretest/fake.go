// Package xenstoretest provides fakes for testing xenstore clients: an
// in-memory xenstored (FakeServer) and a model of the Linux guest's
// /dev/xen/xenbus device in front of it (Xenbus), which reproduces the
// device's ordering constraints, deadlock included.
package xenstoretest

import (
	"bufio"
	"errors"
	"io"
	"maps"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/xenstore"
)

// FakeServer is an in-memory xenstored for tests: the tree, READ, WRITE,
// MKDIR, RM, DIRECTORY, GET_DOMAIN_PATH, watches (fired once on
// registration, then for every change at or below their path) and
// transactions (snapshot on start; a commit after any intervening change
// fails with EAGAIN, as xenstored's does). Permissions are ignored. Every
// connection acts as the guest domain given to NewFakeServer, so relative
// paths resolve below /local/domain/<domid>.
//
// Changes made through its Go methods fire watches like changes from
// clients do.
type FakeServer struct {
	domid uint32
	home  string

	mu          sync.Mutex
	tree        map[string]string // every existing node, by absolute path
	gen         uint64            // bumped by every change
	conns       map[*fakeConn]struct{}
	nextTx      uint32
	failCommits int
	interleave  bool
	held        int // HoldReplies calls not yet released
	listeners   []net.Listener
	wg          sync.WaitGroup
}

type fakeConn struct {
	rwc     io.ReadWriteCloser
	watches []fakeWatch
	txs     map[uint32]*fakeTx

	qmu    sync.Mutex
	qcond  *sync.Cond
	queue  [][]byte
	held   int // the server's held count, copied under qmu
	closed bool
}

type fakeWatch struct{ path, abs, token string }

type fakeTx struct {
	tree map[string]string
	gen  uint64
}

// NewFakeServer returns a server whose tree holds the home directory of
// domain domid with its "domid" key, as the toolstack writes it.
func NewFakeServer(domid uint32) *FakeServer {
	s := &FakeServer{domid: domid, home: "/local/domain/" + strconv.FormatUint(uint64(domid), 10),
		tree: map[string]string{"/": ""}, conns: make(map[*fakeConn]struct{})}
	s.mu.Lock()
	s.writeLocked(s.tree, s.home+"/domid", strconv.FormatUint(uint64(domid), 10))
	s.mu.Unlock()
	return s
}

// Abs resolves p like the server does for its domain's connections.
func (s *FakeServer) Abs(p string) string {
	if strings.HasPrefix(p, "/") {
		return p
	}
	return s.home + "/" + p
}

// Read returns the value at p and whether it exists.
func (s *FakeServer) Read(p string) (string, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, ok := s.tree[s.Abs(p)]
	return v, ok
}

// Write stores value at p (creating parents) and fires watches.
func (s *FakeServer) Write(p, value string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.commitLocked(func(t map[string]string) { s.writeLocked(t, s.Abs(p), value) })
}

// WriteAll stores several values at once, as one transaction would, then
// fires watches.
func (s *FakeServer) WriteAll(values map[string]string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.commitLocked(func(t map[string]string) {
		for _, p := range slices.Sorted(maps.Keys(values)) {
			s.writeLocked(t, s.Abs(p), values[p])
		}
	})
}

// Rm removes p and everything below it and fires watches.
func (s *FakeServer) Rm(p string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.commitLocked(func(t map[string]string) { rmTree(t, s.Abs(p)) })
}

// FailCommits makes the next n transaction commits fail with EAGAIN.
func (s *FakeServer) FailCommits(n int) {
	s.mu.Lock()
	s.failCommits = n
	s.mu.Unlock()
}

// InterleaveEvents makes the server send, before every reply, a spurious
// event for each watch of the connection — legal (xenstore.txt: "Watches
// may be triggered spuriously") and the hardest order for a client.
func (s *FakeServer) InterleaveEvents(on bool) {
	s.mu.Lock()
	s.interleave = on
	s.mu.Unlock()
}

// HoldReplies makes the server a slow xenstored: it goes on receiving and
// handling requests on every connection, but sends nothing (replies and
// events stay queued, in order) until release is called. Tests use it to
// decide deterministically what a client has written before any reply
// arrives. Calls nest; release is idempotent.
func (s *FakeServer) HoldReplies() (release func()) {
	s.setHeld(+1)
	var once sync.Once
	return func() { once.Do(func() { s.setHeld(-1) }) }
}

func (s *FakeServer) setHeld(delta int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.held += delta
	for c := range s.conns {
		c.setHeld(s.held)
	}
}

func (c *fakeConn) setHeld(n int) {
	c.qmu.Lock()
	c.held = n
	c.qcond.Broadcast()
	c.qmu.Unlock()
}

// Serve accepts connections on l until it is closed.
func (s *FakeServer) Serve(l net.Listener) error {
	s.mu.Lock()
	s.listeners = append(s.listeners, l)
	s.mu.Unlock()
	for {
		c, err := l.Accept()
		if err != nil {
			return err
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.ServeConn(c)
		}()
	}
}

// Client returns a client connected to s through an in-memory pipe. It
// talks to xenstored directly, like a process in dom0 does; NewXenbus puts
// the guest kernel's device in between.
func (s *FakeServer) Client() *xenstore.Client { return xenstore.New(s.pipe()) }

// pipe returns the client end of a new in-memory connection to s.
func (s *FakeServer) pipe() net.Conn {
	a, b := net.Pipe()
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.ServeConn(b)
	}()
	return a
}

// Close closes listeners and connections and waits for their goroutines.
func (s *FakeServer) Close() {
	s.mu.Lock()
	for _, l := range s.listeners {
		l.Close()
	}
	for c := range s.conns {
		c.rwc.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// ServeConn speaks the protocol on rwc until it fails; a malformed message
// closes the connection (xenstored does the same to an oversized one), and
// one of an unknown or unsupported type gets ENOSYS.
func (s *FakeServer) ServeConn(rwc io.ReadWriteCloser) {
	c := &fakeConn{rwc: rwc, txs: make(map[uint32]*fakeTx)}
	c.qcond = sync.NewCond(&c.qmu)
	s.mu.Lock()
	s.conns[c] = struct{}{}
	c.held = s.held
	s.mu.Unlock()
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.writeLoop()
	}()
	r := bufio.NewReader(rwc)
	for {
		m, err := xenstore.ReadMessage(r)
		if err != nil && !errors.Is(err, xenstore.ErrUnknownType) {
			break
		}
		s.handle(c, m) // an unknown type gets ENOSYS, as from xenstored
	}
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
	c.qmu.Lock()
	c.closed = true
	c.qcond.Broadcast()
	c.qmu.Unlock()
	rwc.Close()
	<-done
}

// send queues a message; the connection's own goroutine writes it, so a
// client that does not read never blocks the server.
func (c *fakeConn) send(m xenstore.Message) {
	c.qmu.Lock()
	c.queue = append(c.queue, m.Append(nil))
	c.qcond.Broadcast()
	c.qmu.Unlock()
}

func (c *fakeConn) writeLoop() {
	for {
		c.qmu.Lock()
		for (len(c.queue) == 0 || c.held > 0) && !c.closed {
			c.qcond.Wait()
		}
		if c.closed {
			c.qmu.Unlock()
			return
		}
		b := c.queue[0]
		c.queue = c.queue[1:]
		c.qmu.Unlock()
		if _, err := c.rwc.Write(b); err != nil {
			c.rwc.Close()
			return
		}
	}
}

func (s *FakeServer) handle(c *fakeConn, m xenstore.Message) {
	s.mu.Lock()
	defer s.mu.Unlock()
	reply := func(payload []byte) {
		if s.interleave {
			for _, w := range c.watches {
				c.send(xenstore.Message{Type: xenstore.TypeWatchEvent, Payload: xenstore.JoinStrings(w.path, w.token)})
			}
		}
		c.send(xenstore.Message{Type: m.Type, ReqID: m.ReqID, TxID: m.TxID, Payload: payload})
	}
	fail := func(e xenstore.Error) {
		c.send(xenstore.Message{Type: xenstore.TypeError, ReqID: m.ReqID, TxID: m.TxID, Payload: xenstore.JoinStrings(string(e))})
	}
	ok := xenstore.JoinStrings("OK")

	switch m.Type {
	case xenstore.TypeRead, xenstore.TypeWrite, xenstore.TypeMkdir, xenstore.TypeRm,
		xenstore.TypeDirectory, xenstore.TypeGetDomainPath, xenstore.TypeWatch, xenstore.TypeUnwatch,
		xenstore.TypeTransactionStart, xenstore.TypeTransactionEnd:
	default:
		fail(xenstore.ENOSYS)
		return
	}
	args, err := xenstore.SplitStrings(m.Payload)
	if m.Type == xenstore.TypeWrite {
		// "<path>\0<value>": the value is not NUL-terminated.
		i := strings.IndexByte(string(m.Payload), 0)
		if i < 0 {
			fail(xenstore.EINVAL)
			return
		}
		args, err = []string{string(m.Payload[:i]), string(m.Payload[i+1:])}, nil
	}
	if err != nil || len(args) == 0 {
		fail(xenstore.EINVAL)
		return
	}
	// The tree the request works on: the live one or a transaction's copy.
	tree := s.tree
	var tx *fakeTx
	if m.TxID != 0 {
		if tx = c.txs[m.TxID]; tx == nil {
			fail(xenstore.ENOENT)
			return
		}
		tree = tx.tree
	}
	// change applies f to the request's tree; outside a transaction that
	// is a commit, which fires watches.
	change := func(f func(map[string]string)) {
		if tx != nil {
			f(tx.tree)
			return
		}
		s.commitLocked(f)
	}
	p := args[0]
	abs := s.Abs(p)
	switch m.Type {
	case xenstore.TypeRead:
		v, found := tree[abs]
		if !found {
			fail(xenstore.ENOENT)
			return
		}
		reply([]byte(v))
	case xenstore.TypeWrite:
		change(func(t map[string]string) { s.writeLocked(t, abs, args[1]) })
		reply(ok)
	case xenstore.TypeMkdir:
		if _, found := tree[abs]; !found {
			change(func(t map[string]string) { s.writeLocked(t, abs, "") })
		}
		reply(ok)
	case xenstore.TypeRm:
		if _, found := tree[parent(abs)]; !found {
			fail(xenstore.ENOENT)
			return
		}
		if _, found := tree[abs]; found {
			change(func(t map[string]string) { rmTree(t, abs) })
		}
		reply(ok)
	case xenstore.TypeDirectory:
		if _, found := tree[abs]; !found {
			fail(xenstore.ENOENT)
			return
		}
		reply(xenstore.JoinStrings(children(tree, abs)...))
	case xenstore.TypeGetDomainPath:
		id, err := strconv.ParseUint(p, 10, 16)
		if err != nil {
			fail(xenstore.EINVAL)
			return
		}
		reply(xenstore.JoinStrings("/local/domain/" + strconv.FormatUint(id, 10)))
	case xenstore.TypeWatch, xenstore.TypeUnwatch:
		if len(args) < 2 {
			fail(xenstore.EINVAL)
			return
		}
		w := fakeWatch{path: p, abs: abs, token: args[1]}
		i := slices.Index(c.watches, w)
		if m.Type == xenstore.TypeUnwatch {
			if i < 0 {
				fail(xenstore.ENOENT)
				return
			}
			c.watches = slices.Delete(c.watches, i, i+1)
			reply(ok)
			return
		}
		if i >= 0 {
			fail(xenstore.EEXIST)
			return
		}
		c.watches = append(c.watches, w)
		reply(ok)
		// xenstored's do_watch: "We fire once up front".
		c.send(xenstore.Message{Type: xenstore.TypeWatchEvent, Payload: xenstore.JoinStrings(p, w.token)})
	case xenstore.TypeTransactionStart:
		if m.TxID != 0 {
			fail(xenstore.EINVAL)
			return
		}
		s.nextTx++
		c.txs[s.nextTx] = &fakeTx{tree: maps.Clone(s.tree), gen: s.gen}
		reply(xenstore.JoinStrings(strconv.FormatUint(uint64(s.nextTx), 10)))
	case xenstore.TypeTransactionEnd:
		if tx == nil || (p != "T" && p != "F") {
			fail(xenstore.EINVAL)
			return
		}
		delete(c.txs, m.TxID)
		if p == "T" {
			if s.failCommits > 0 || tx.gen != s.gen {
				if s.failCommits > 0 {
					s.failCommits--
				}
				fail(xenstore.EAGAIN)
				return
			}
			s.commitLocked(func(t map[string]string) {
				clear(t)
				maps.Copy(t, tx.tree)
			})
		}
		reply(ok)
	}
}

// commitLocked applies f to the live tree and fires the watches of every
// node that changed, appeared or disappeared.
func (s *FakeServer) commitLocked(f func(map[string]string)) {
	before := maps.Clone(s.tree)
	f(s.tree)
	var changed []string
	for p, v := range s.tree {
		if old, ok := before[p]; !ok || old != v {
			changed = append(changed, p)
		}
	}
	for p := range before {
		if _, ok := s.tree[p]; !ok {
			changed = append(changed, p)
		}
	}
	if len(changed) == 0 {
		return
	}
	s.gen++
	slices.Sort(changed)
	for c := range s.conns {
		for _, w := range c.watches {
			fired := false
			for _, p := range changed {
				switch {
				case p == w.abs || strings.HasPrefix(p, w.abs+"/") || w.abs == "/":
					c.send(xenstore.Message{Type: xenstore.TypeWatchEvent, Payload: xenstore.JoinStrings(s.eventPath(w, p), w.token)})
				case !fired && strings.HasPrefix(w.abs, p+"/"):
					// A removed ancestor: the event names the watched path.
					if _, ok := s.tree[w.abs]; !ok {
						c.send(xenstore.Message{Type: xenstore.TypeWatchEvent, Payload: xenstore.JoinStrings(w.path, w.token)})
						fired = true
					}
				}
			}
		}
	}
}

// eventPath is p as the watcher named it: relative if its watch was.
func (s *FakeServer) eventPath(w fakeWatch, p string) string {
	if strings.HasPrefix(w.path, "/") {
		return p
	}
	return strings.TrimPrefix(p, s.home+"/")
}

func (s *FakeServer) writeLocked(t map[string]string, abs, value string) {
	for q := parent(abs); q != "/"; q = parent(q) {
		if _, ok := t[q]; !ok {
			t[q] = ""
		}
	}
	t[abs] = value
}

func parent(p string) string {
	i := strings.LastIndexByte(p, '/')
	if i <= 0 {
		return "/"
	}
	return p[:i]
}

func rmTree(t map[string]string, abs string) {
	for p := range t {
		if p != "/" && (p == abs || strings.HasPrefix(p, abs+"/") || abs == "/") {
			delete(t, p)
		}
	}
}

func children(t map[string]string, abs string) []string {
	prefix := abs + "/"
	if abs == "/" {
		prefix = "/"
	}
	var out []string
	for p := range t {
		if rest, ok := strings.CutPrefix(p, prefix); ok && rest != "" && !strings.Contains(rest, "/") {
			out = append(out, rest)
		}
	}
	slices.Sort(out)
	return out
}
