package xenstore

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
)

// DevicePath is the guest kernel's xenstore device.
const DevicePath = "/dev/xen/xenbus"

// Limits on what the client sends; xenstored kills a connection that
// exceeds XENSTORE_PAYLOAD_MAX, which a domain cannot recover from.
const (
	// MaxPath is XENSTORE_ABS_PATH_MAX (xs_wire.h).
	MaxPath = 3072
	// WatchBuffer is how many events wait for a slow watcher before the
	// oldest are dropped (see Watch).
	WatchBuffer = 64
	// maxTxRetries bounds the attempts of Transaction under contention.
	maxTxRetries = 32
)

// ErrClosed is returned by every call once the connection is gone.
var ErrClosed = errors.New("xenstore connection closed")

// Event is one watch event: Path changed (or, if it equals the watched
// path, anything at or below it may have changed).
type Event struct {
	Path  string
	Token string
}

// Stats counts what the client ignored on its connection.
type Stats struct {
	Unmatched     uint64 // replies and events nobody waited for
	Malformed     uint64 // messages of unknown type or with bad payloads
	EventsDropped uint64 // events dropped because a watcher lagged
}

// Client is a connection to xenstored. All methods are safe for concurrent
// use, but the client keeps one request in flight at a time, as
// libxenstore does: concurrent calls queue, and each request is written
// only once the previous one's reply has been read. Replies are matched to
// requests by req_id, and watch events are delivered to the channel of
// their watch whenever they arrive, even before a WATCH's reply or between
// a request and its reply.
//
// Why one at a time: Linux's /dev/xen/xenbus (xenbus_dev_frontend.c) holds
// the fd's msgbuffer_mutex while it processes a written message, and for
// WATCH and UNWATCH that means waiting for xenstored's reply; the kernel's
// single xenbus reader thread needs the same mutex to deliver the reply of
// an earlier request on that fd (xenbus_dev_queue_reply). A WATCH written
// behind an undelivered reply therefore deadlocks the guest's entire
// xenstore, the kernel's own users included.
type Client struct {
	rwc io.ReadWriteCloser
	// turn is held for a whole round trip, from writing a request until
	// its reply (or the connection's failure) has been read: see above.
	turn sync.Mutex

	mu      sync.Mutex
	nextID  uint32
	pending map[uint32]chan result
	watches map[string]*watch // by token
	err     error             // set once the connection failed
	stats   Stats
}

type result struct {
	m   Message
	err error
}

type watch struct {
	path, token string
	ch          chan Event
}

// Dial connects to xenstore at path: a unix socket (xenstored's, or a
// xenstoretest.FakeServer's) or the /dev/xen/xenbus device.
func Dial(path string) (*Client, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("dial xenstore %s: %w", path, err)
	}
	if fi.Mode()&os.ModeSocket != 0 {
		c, err := net.Dial("unix", path)
		if err != nil {
			return nil, fmt.Errorf("dial xenstore %s: %w", path, err)
		}
		return New(c), nil
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("open xenstore %s: %w", path, err)
	}
	return New(f), nil
}

// New runs the protocol over rwc, which the client owns from now on.
func New(rwc io.ReadWriteCloser) *Client {
	c := &Client{rwc: rwc, pending: make(map[uint32]chan result), watches: make(map[string]*watch)}
	go c.readLoop()
	return c
}

// Close closes the connection; pending calls fail and watch channels close.
func (c *Client) Close() error {
	c.fail(ErrClosed)
	return c.rwc.Close()
}

// Stats returns the counters of ignored input.
func (c *Client) Stats() Stats {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.stats
}

// Err returns why the connection failed, or nil while it works.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

func (c *Client) readLoop() {
	r := bufio.NewReaderSize(c.rwc, HeaderLen+MaxPayload)
	for {
		m, err := ReadMessage(r)
		if errors.Is(err, ErrUnknownType) {
			c.reject(m, err)
			continue
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = ErrClosed
			}
			c.fail(fmt.Errorf("xenstore read: %w", err))
			// The stream is out of step for good (a header we cannot
			// frame, a length past the limit): close it, so the peer
			// sees the end instead of writing into a connection that
			// nobody reads any more.
			c.rwc.Close()
			return
		}
		c.dispatch(m)
	}
}

// reject counts a message that cannot be used and fails the request it
// answers, if any, so that no caller waits for a reply that never comes.
func (c *Client) reject(m Message, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.stats.Malformed++
	if ch, ok := c.pending[m.ReqID]; ok && m.Type != TypeWatchEvent {
		delete(c.pending, m.ReqID)
		ch <- result{err: err}
	}
}

func (c *Client) dispatch(m Message) {
	if m.Type == TypeWatchEvent {
		parts, err := SplitStrings(m.Payload)
		if err != nil || len(parts) < 2 {
			c.mu.Lock()
			c.stats.Malformed++
			c.mu.Unlock()
			return
		}
		c.deliver(Event{Path: parts[0], Token: parts[1]})
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	ch, ok := c.pending[m.ReqID]
	if !ok {
		c.stats.Unmatched++
		return
	}
	delete(c.pending, m.ReqID)
	ch <- result{m: m} // buffered: never blocks
}

// deliver queues ev for its watch without ever blocking the reader: when
// the watcher lags, the oldest queued event is dropped and the new one is
// widened to the watched path, which tells the watcher to re-read
// everything below it.
func (c *Client) deliver(ev Event) {
	c.mu.Lock()
	defer c.mu.Unlock()
	w, ok := c.watches[ev.Token]
	if !ok {
		c.stats.Unmatched++
		return
	}
	select {
	case w.ch <- ev:
		return
	default:
	}
	c.stats.EventsDropped++
	select {
	case <-w.ch:
	default:
	}
	w.ch <- Event{Path: w.path, Token: w.token}
}

// fail ends the connection: every pending call gets err, every watch
// channel is closed.
func (c *Client) fail(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil {
		c.err = err
	}
	for id, ch := range c.pending {
		ch <- result{err: c.err}
		delete(c.pending, id)
	}
	for tok, w := range c.watches {
		close(w.ch)
		delete(c.watches, tok)
	}
}

// call sends one request and waits for its reply. An ERROR reply becomes
// an Error; a reply of another type than the request is a protocol error.
// It waits for its turn first: one request in flight (see Client).
func (c *Client) call(typ Type, tx uint32, payload []byte) ([]byte, error) {
	if len(payload) > MaxRequestPayload {
		return nil, fmt.Errorf("%v request: %w (%d bytes; at most %d fit the device)", typ, ErrTooLong, len(payload), MaxRequestPayload)
	}
	c.turn.Lock()
	defer c.turn.Unlock()
	ch := make(chan result, 1)
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return nil, err
	}
	c.nextID++
	id := c.nextID
	c.pending[id] = ch
	c.mu.Unlock()

	// One Write per message: the device acts on a message once it is
	// complete and drops what a write holds beyond it.
	msg := Message{Type: typ, ReqID: id, TxID: tx, Payload: payload}
	if _, err := c.rwc.Write(msg.Append(make([]byte, 0, HeaderLen+len(payload)))); err != nil {
		c.mu.Lock()
		delete(c.pending, id)
		c.mu.Unlock()
		// The device refused the message (or WATCH failed): no reply follows.
		return nil, fmt.Errorf("%v request: %w", typ, err)
	}
	r := <-ch // the reply, or fail's error: either way the turn ends
	switch {
	case r.err != nil:
		return nil, r.err
	case r.m.Type == TypeError:
		return nil, decodeError(r.m.Payload)
	case r.m.Type != typ:
		c.mu.Lock()
		c.stats.Malformed++
		c.mu.Unlock()
		return nil, fmt.Errorf("%v request answered with %v: %w", typ, r.m.Type, ErrMalformed)
	}
	return r.m.Payload, nil
}

func checkPath(p string) error {
	if p == "" || len(p) > MaxPath || strings.IndexByte(p, 0) >= 0 {
		return fmt.Errorf("invalid xenstore path %q", p)
	}
	return nil
}

// ops implements the requests that may run inside a transaction.
type ops struct {
	c  *Client
	tx uint32
}

func (o ops) read(path string) (string, error) {
	if err := checkPath(path); err != nil {
		return "", err
	}
	v, err := o.c.call(TypeRead, o.tx, JoinStrings(path))
	if err != nil {
		return "", fmt.Errorf("xenstore read %s: %w", path, err)
	}
	return string(v), nil
}

func (o ops) write(path, value string) error {
	if err := checkPath(path); err != nil {
		return err
	}
	// WRITE is "<path>\0<value>" with no terminator after the value.
	_, err := o.c.call(TypeWrite, o.tx, append(JoinStrings(path), value...))
	if err != nil {
		return fmt.Errorf("xenstore write %s: %w", path, err)
	}
	return nil
}

func (o ops) simple(typ Type, path string) error {
	if err := checkPath(path); err != nil {
		return err
	}
	if _, err := o.c.call(typ, o.tx, JoinStrings(path)); err != nil {
		return fmt.Errorf("xenstore %v %s: %w", typ, path, err)
	}
	return nil
}

func (o ops) directory(path string) ([]string, error) {
	if err := checkPath(path); err != nil {
		return nil, err
	}
	p, err := o.c.call(TypeDirectory, o.tx, JoinStrings(path))
	if err == nil {
		var names []string
		if names, err = SplitStrings(p); err == nil {
			// Some servers answer an empty directory with one empty name.
			out := names[:0]
			for _, n := range names {
				if n != "" {
					out = append(out, n)
				}
			}
			return out, nil
		}
	}
	return nil, fmt.Errorf("xenstore directory %s: %w", path, err)
}

// Read returns the value at path. A path not starting with '/' is relative
// to the caller's domain (/local/domain/<domid>); xenstored resolves it.
func (c *Client) Read(path string) (string, error) { return ops{c: c}.read(path) }

// Write stores value at path, creating missing parents.
func (c *Client) Write(path, value string) error { return ops{c: c}.write(path, value) }

// Mkdir creates path (and missing parents) if it does not exist.
func (c *Client) Mkdir(path string) error { return ops{c: c}.simple(TypeMkdir, path) }

// Rm removes path and everything below it; a missing path is no error
// unless its parent is missing too.
func (c *Client) Rm(path string) error { return ops{c: c}.simple(TypeRm, path) }

// Directory returns the names of path's children.
func (c *Client) Directory(path string) ([]string, error) { return ops{c: c}.directory(path) }

// GetDomainPath returns the home path of domain domid.
func (c *Client) GetDomainPath(domid uint32) (string, error) {
	p, err := c.call(TypeGetDomainPath, 0, JoinStrings(strconv.FormatUint(uint64(domid), 10)))
	if err != nil {
		return "", fmt.Errorf("xenstore get domain path %d: %w", domid, err)
	}
	return strings.TrimRight(string(p), "\x00"), nil
}

// Watch sets a watch on path (and everything below it) named by token,
// which must be unique on this client. Like xenstored, the watch fires once
// straight away. Events arrive on the returned channel, which holds up to
// WatchBuffer of them; when it is full the oldest is dropped and the newest
// becomes an event on path itself. The channel is closed by cancel or when
// the connection fails.
func (c *Client) Watch(path, token string) (<-chan Event, func(), error) {
	if err := checkPath(path); err != nil {
		return nil, nil, err
	}
	if token == "" || strings.IndexByte(token, 0) >= 0 {
		return nil, nil, fmt.Errorf("xenstore watch %s: invalid token %q", path, token)
	}
	w := &watch{path: path, token: token, ch: make(chan Event, WatchBuffer)}
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return nil, nil, err
	}
	if _, dup := c.watches[token]; dup {
		c.mu.Unlock()
		return nil, nil, fmt.Errorf("xenstore watch %s: token %q already in use", path, token)
	}
	// Registered before the request: the first event may precede the reply.
	c.watches[token] = w
	c.mu.Unlock()

	payload := JoinStrings(path, token)
	if _, err := c.call(TypeWatch, 0, payload); err != nil {
		c.dropWatch(w)
		return nil, nil, fmt.Errorf("xenstore watch %s: %w", path, err)
	}
	var once sync.Once
	cancel := func() {
		once.Do(func() {
			if c.dropWatch(w) {
				// Best effort: the watch is gone for us either way.
				c.call(TypeUnwatch, 0, payload)
			}
		})
	}
	return w.ch, cancel, nil
}

// dropWatch forgets w and closes its channel, unless fail already did.
func (c *Client) dropWatch(w *watch) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.watches[w.token] != w {
		return false
	}
	delete(c.watches, w.token)
	close(w.ch)
	return true
}

// Tx is an open transaction. Its reads see a snapshot; its writes become
// visible to others, all at once, only when the transaction commits.
type Tx struct{ o ops }

func (t *Tx) Read(path string) (string, error)        { return t.o.read(path) }
func (t *Tx) Write(path, value string) error          { return t.o.write(path, value) }
func (t *Tx) Mkdir(path string) error                 { return t.o.simple(TypeMkdir, path) }
func (t *Tx) Rm(path string) error                    { return t.o.simple(TypeRm, path) }
func (t *Tx) Directory(path string) ([]string, error) { return t.o.directory(path) }

// Transaction runs fn in a transaction and commits it. When xenstored
// refuses the commit with EAGAIN (another writer intervened), fn runs again
// in a new transaction, up to a bounded number of times; fn must therefore
// have no effects outside the transaction. An error from fn aborts the
// transaction and is returned.
func (c *Client) Transaction(fn func(tx *Tx) error) error {
	var err error
	for range maxTxRetries {
		var p []byte
		if p, err = c.call(TypeTransactionStart, 0, JoinStrings("")); err != nil {
			return fmt.Errorf("xenstore transaction start: %w", err)
		}
		id, perr := strconv.ParseUint(strings.TrimRight(string(p), "\x00"), 10, 32)
		if perr != nil || id == 0 {
			return fmt.Errorf("xenstore transaction start: bad id %q: %w", p, ErrMalformed)
		}
		tx := &Tx{o: ops{c: c, tx: uint32(id)}}
		if err = fn(tx); err != nil {
			c.call(TypeTransactionEnd, tx.o.tx, JoinStrings("F"))
			if errors.Is(err, EAGAIN) {
				continue
			}
			return err
		}
		if _, err = c.call(TypeTransactionEnd, tx.o.tx, JoinStrings("T")); !errors.Is(err, EAGAIN) {
			if err != nil {
				return fmt.Errorf("xenstore transaction commit: %w", err)
			}
			return nil
		}
	}
	return fmt.Errorf("xenstore transaction: gave up after %d attempts: %w", maxTxRetries, err)
}
