package qubesdbtest

import (
	"bufio"
	"errors"
	"fmt"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/qubesdb"
	"io"
	"net"
	"slices"
	"strings"
	"sync"
)

// Server holds a database and serves it with the real protocol: to local
// clients in daemon mode (what an ordinary VM's qubesdb-daemon does) and to
// one peer at a time in dom0 mode (what dom0's daemon does over vchan). It
// exists for tests and the qubesdb command; the firewall never runs it.
//
// Every change — made through Write/Remove or by a daemon-mode client — fires
// the matching watches and is pushed to the peer, so a CLI write to the
// daemon socket reaches a firewall connected as peer.
//
// Deviation from the real daemon: a malformed message closes the connection
// instead of being answered with RESP_ERROR.
type Server struct {
	logf func(string, ...any)

	mu        sync.Mutex
	tree      map[string]string
	clients   map[*serverConn]struct{} // every connection, the peer's too
	peer      *serverConn              // the synchronised peer, if any
	listeners map[net.Listener]struct{}
	closed    bool
	handlers  sync.WaitGroup // daemon-mode connection goroutines

	// Test hooks: called between MULTIREAD reply entries, and with every
	// reply the peer sends.
	midMultiRead func(entry int)
	peerReply    func(qubesdb.Message)
}

// serverConn is one connection. Messages to it go through out, written by
// its own goroutine, so that a slow reader never blocks the server.
type serverConn struct {
	rwc     io.ReadWriteCloser
	out     *outQueue
	watches []string // guarded by Server.mu; a peer has none
}

// NewServer returns a server with an empty database.
func NewServer(logf func(string, ...any)) *Server {
	return &Server{logf: logf, tree: make(map[string]string),
		clients: make(map[*serverConn]struct{}), listeners: make(map[net.Listener]struct{})}
}

// Read returns the value at path.
func (s *Server) Read(path string) (string, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, ok := s.tree[path]
	return v, ok
}

// Entries returns a copy of the database.
func (s *Server) Entries() map[string]string {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := make(map[string]string, len(s.tree))
	for k, v := range s.tree {
		m[k] = v
	}
	return m
}

// Write sets path to value, fires watches and pushes the change to the peer.
func (s *Server) Write(path, value string) error {
	if !qubesdb.ValidKey(path) || len(value) > qubesdb.MaxData || strings.IndexByte(value, 0) >= 0 {
		return fmt.Errorf("qubesdb server write %q: invalid path or value", path)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.writeLocked(path, value, nil)
	return nil
}

// Remove removes path, or the subtree when path ends with '/', and reports
// whether anything was removed.
func (s *Server) Remove(path string) (bool, error) {
	if !qubesdb.ValidPath(path) || !strings.HasPrefix(path, "/") {
		return false, fmt.Errorf("qubesdb server rm %q: invalid path", path)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.removeLocked(path, nil), nil
}

func (s *Server) writeLocked(path, value string, from *serverConn) {
	s.tree[path] = value
	if s.peer != nil && s.peer != from {
		s.peer.send(qubesdb.Message{Type: qubesdb.CmdWrite, Path: path, Data: []byte(value)})
	}
	if from != nil {
		from.send(qubesdb.Message{Type: qubesdb.RespOK, Path: path})
	}
	s.fireLocked(path)
}

// removeLocked answers from (if any) and reports whether anything went.
func (s *Server) removeLocked(path string, from *serverConn) bool {
	removed := false
	for k := range s.tree {
		if k == path || strings.HasSuffix(path, "/") && strings.HasPrefix(k, path) {
			delete(s.tree, k)
			removed = true
		}
	}
	if !removed {
		if from != nil {
			from.send(qubesdb.Message{Type: qubesdb.RespErrorNoEnt, Path: path})
		}
		return false
	}
	if s.peer != nil && s.peer != from {
		s.peer.send(qubesdb.Message{Type: qubesdb.CmdRm, Path: path})
	}
	if from != nil {
		from.send(qubesdb.Message{Type: qubesdb.RespOK, Path: path})
	}
	// Like the daemon, one event carrying the RM path, even for a subtree.
	s.fireLocked(path)
	return true
}

// fireLocked sends one RESP_WATCH per matching watch: a watch matches its
// path exactly, or as a prefix when it ends with '/' (qubesdb_add_watch).
func (s *Server) fireLocked(path string) {
	for c := range s.clients {
		for _, w := range c.watches {
			if w == path || strings.HasSuffix(w, "/") && strings.HasPrefix(path, w) {
				c.send(qubesdb.Message{Type: qubesdb.RespWatch, Path: path})
			}
		}
	}
}

// sortedLocked returns the entries starting with prefix in path order.
func (s *Server) sortedLocked(prefix string) []qubesdb.Message {
	var ms []qubesdb.Message
	for k, v := range s.tree {
		if strings.HasPrefix(k, prefix) {
			ms = append(ms, qubesdb.Message{Path: k, Data: []byte(v)})
		}
	}
	slices.SortFunc(ms, func(a, b qubesdb.Message) int { return strings.Compare(a.Path, b.Path) })
	return ms
}

// Serve accepts daemon-mode clients on l until l or the server is closed.
func (s *Server) Serve(l net.Listener) error {
	return s.accept(l, func(rwc io.ReadWriteCloser) { s.serveDaemon(rwc) })
}

// ServePeerListener accepts peer connections on l one at a time (a second
// peer waits until the first is gone) until l or the server is closed.
func (s *Server) ServePeerListener(l net.Listener) error {
	return s.accept(l, nil)
}

func (s *Server) accept(l net.Listener, serve func(io.ReadWriteCloser)) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		l.Close()
		return net.ErrClosed
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	for {
		c, err := l.Accept()
		if err != nil {
			s.mu.Lock()
			closed := s.closed
			delete(s.listeners, l)
			s.mu.Unlock()
			if closed || errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("qubesdb server accept: %w", err)
		}
		if serve != nil {
			// Add under the lock that Close takes before it waits.
			s.mu.Lock()
			if s.closed {
				s.mu.Unlock()
				c.Close()
				continue
			}
			s.handlers.Add(1)
			s.mu.Unlock()
			go func() {
				defer s.handlers.Done()
				serve(c)
			}()
		} else if err := s.ServePeer(c); err != nil {
			s.logf("qubesdb server: peer: %v", err)
		}
	}
}

// register adds a connection, returning nil if the server is closed.
func (s *Server) register(rwc io.ReadWriteCloser) *serverConn {
	c := &serverConn{rwc: rwc, out: newOutQueue()}
	go c.out.run(rwc)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		c.close()
		return nil
	}
	s.clients[c] = struct{}{}
	return c
}

func (s *Server) unregister(c *serverConn) {
	s.mu.Lock()
	delete(s.clients, c)
	if s.peer == c {
		s.peer = nil
	}
	s.mu.Unlock()
	c.close()
}

func (s *Server) serveDaemon(rwc io.ReadWriteCloser) {
	c := s.register(rwc)
	if c == nil {
		return
	}
	defer s.unregister(c)
	r := bufio.NewReaderSize(rwc, qubesdb.HeaderLen+qubesdb.MaxData)
	for {
		m, err := qubesdb.ReadMessage(r)
		if err != nil {
			if err != io.EOF && !errors.Is(err, net.ErrClosed) {
				s.logf("qubesdb server: client: %v", err)
			}
			return
		}
		s.handle(c, m)
	}
}

func (s *Server) handle(c *serverConn, m qubesdb.Message) {
	if m.Type == qubesdb.CmdMultiRead || m.Type == qubesdb.CmdList {
		s.mu.Lock()
		entries := s.sortedLocked(m.Path)
		s.mu.Unlock()
		// Entries are queued one at a time (not under the lock) so that
		// watch events can land between them, as with the real daemon.
		for i, e := range entries {
			if m.Type == qubesdb.CmdList {
				e.Data = nil
			}
			e.Type = m.Type + (qubesdb.RespMultiRead - qubesdb.CmdMultiRead)
			c.send(e)
			if s.midMultiRead != nil {
				s.midMultiRead(i)
			}
		}
		c.send(qubesdb.Message{Type: m.Type + (qubesdb.RespMultiRead - qubesdb.CmdMultiRead)})
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	reply := qubesdb.Message{Type: qubesdb.RespOK, Path: m.Path}
	switch m.Type {
	case qubesdb.CmdRead:
		v, ok := s.tree[m.Path]
		reply.Type, reply.Data = qubesdb.RespRead, []byte(v)
		if !ok {
			reply.Type, reply.Data = qubesdb.RespErrorNoEnt, nil
		}
	case qubesdb.CmdWrite:
		if qubesdb.ValidKey(m.Path) {
			s.writeLocked(m.Path, string(m.Data), c)
			return
		}
		reply.Type = qubesdb.RespError
	case qubesdb.CmdRm:
		if strings.HasPrefix(m.Path, "/") {
			s.removeLocked(m.Path, c)
			return
		}
		reply.Type = qubesdb.RespError
	case qubesdb.CmdWatch:
		c.watches = append(c.watches, m.Path)
	case qubesdb.CmdUnwatch:
		i := slices.Index(c.watches, m.Path)
		if i < 0 {
			reply.Type = qubesdb.RespErrorNoEnt
		} else {
			c.watches = slices.Delete(c.watches, i, i+1)
		}
	default:
		reply.Type = qubesdb.RespError
	}
	c.send(reply)
}

// ServePeer serves one peer (dom0 mode) on conn until it closes or breaks
// the protocol: the peer's MULTIREAD with an empty path is answered with the
// whole database in reverse path order (as dom0 does) and an empty
// RESP_MULTIREAD; afterwards every change is pushed as WRITE or RM and the
// peer must answer RESP_OK (RESP_ERROR is logged). Like dom0's daemon, it
// treats anything else — RESP_ERROR_NOENT in particular — as fatal and
// returns an error. conn is closed on return.
func (s *Server) ServePeer(conn io.ReadWriteCloser) error {
	c := s.register(conn)
	if c == nil {
		return errors.New("qubesdb server: closed")
	}
	defer s.unregister(c)
	r := bufio.NewReaderSize(conn, qubesdb.HeaderLen+qubesdb.MaxData)
	m, err := qubesdb.ReadMessage(r)
	if err != nil {
		return fmt.Errorf("qubesdb server: peer request: %w", err)
	}
	if m.Type != qubesdb.CmdMultiRead || m.Path != "" {
		return fmt.Errorf("qubesdb server: peer: expected MULTIREAD of everything, got %v", m)
	}
	s.mu.Lock()
	if s.peer != nil {
		s.mu.Unlock()
		return errors.New("qubesdb server: peer: another peer is connected")
	}
	entries := s.sortedLocked("")
	for i := len(entries) - 1; i >= 0; i-- {
		e := entries[i]
		e.Type = qubesdb.RespMultiRead
		c.send(e)
	}
	c.send(qubesdb.Message{Type: qubesdb.RespMultiRead})
	s.peer = c
	s.mu.Unlock()
	for {
		m, err := qubesdb.ReadMessage(r)
		if err != nil {
			if err == io.EOF || errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("qubesdb server: peer: %w", err)
		}
		if s.peerReply != nil {
			s.peerReply(m)
		}
		switch m.Type {
		case qubesdb.RespOK:
		case qubesdb.RespError:
			s.logf("qubesdb server: peer refused %q", m.Path)
		default:
			return fmt.Errorf("qubesdb server: peer: fatal: unexpected %v", m)
		}
	}
}

// pushPeer sends m to the peer as if the database had changed (tests).
func (s *Server) pushPeer(m qubesdb.Message) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.peer == nil {
		return false
	}
	s.peer.send(m)
	return true
}

// dropConnections closes every connection but keeps listening (tests).
func (s *Server) dropConnections() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.clients {
		c.close()
	}
}

// Close stops the listeners, closes every connection and waits for the
// daemon-mode connection handlers to finish.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	for l := range s.listeners {
		l.Close()
	}
	for c := range s.clients {
		c.close()
	}
	s.mu.Unlock()
	s.handlers.Wait()
	return nil
}

func (c *serverConn) send(m qubesdb.Message) {
	b, err := m.Encode()
	if err == nil && c.out.push(b) {
		return
	}
	// Only a server bug makes Encode fail (everything stored was validated);
	// push fails for a closed or hopelessly slow connection.
	c.close()
}

func (c *serverConn) close() {
	c.out.close()
	c.rwc.Close()
}

// outQueue buffers a connection's outgoing messages, bounded in bytes.
type outQueue struct {
	mu     sync.Mutex
	cond   *sync.Cond
	msgs   [][]byte
	bytes  int
	closed bool
}

// maxQueued is the most a connection may fall behind before it is dropped.
const maxQueued = 4 << 20

func newOutQueue() *outQueue {
	q := &outQueue{}
	q.cond = sync.NewCond(&q.mu)
	return q
}

func (q *outQueue) push(b []byte) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed || q.bytes+len(b) > maxQueued {
		return false
	}
	q.msgs = append(q.msgs, b)
	q.bytes += len(b)
	q.cond.Signal()
	return true
}

func (q *outQueue) close() {
	q.mu.Lock()
	q.closed = true
	q.cond.Signal()
	q.mu.Unlock()
}

// run writes queued messages to w until the queue is closed or a write fails.
func (q *outQueue) run(w io.Writer) {
	for {
		q.mu.Lock()
		for len(q.msgs) == 0 && !q.closed {
			q.cond.Wait()
		}
		if q.closed {
			q.mu.Unlock()
			return
		}
		b := q.msgs[0]
		q.msgs = q.msgs[1:]
		q.bytes -= len(b)
		q.mu.Unlock()
		if _, err := w.Write(b); err != nil {
			q.close()
			return
		}
	}
}
