package vchan

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Notifier is the event channel between the two ends.
type Notifier interface {
	// Wait blocks until the peer signals (signals may coalesce). An error
	// ends event delivery for good.
	Wait() error
	// Notify signals the peer.
	Notify() error
	// Close makes a blocked Wait return an error.
	Close() error
}

// ErrPeerClosed is returned by Write once the peer has exited.
var ErrPeerClosed = fmt.Errorf("vchan: peer closed: %w", io.ErrClosedPipe)

// recheck bounds every single wait: the shared state is re-read at least
// this often even if an event was lost, so a peer whose live flag says it
// exited is noticed without its event.
const recheck = time.Second

// Conn is one end of a vchan: an io.ReadWriteCloser. One Read and one Write
// may run at the same time (like net.Conn); Close may be called any time.
type Conn struct {
	pg     page
	server bool
	rd, wr []byte // the ring we read (peer writes) and the ring we write
	rdIdx  int    // offset of the ring_shared we read
	wrIdx  int    // offset of the ring_shared we write
	// Offsets of the flag bytes as seen from this end.
	ownLive, peerLive int
	askPeer           int // peer's notify byte: bits we want events for
	peerAsks          int // our notify byte: bits the peer wants events for

	n       Notifier
	ev      events
	release func() error // unmaps shared memory, after every user is gone

	rmu  sync.Mutex
	cons uint32 // private copy of our read index (the peer may scribble on the shared one)
	wmu  sync.Mutex
	prod uint32 // private copy of our write index

	closed    atomic.Bool
	done      chan struct{} // closed by Close: wakes blocked Read and Write
	closeOnce sync.Once
	closeErr  error
}

var _ io.ReadWriteCloser = (*Conn)(nil)

// newConn builds one end over an interface page whose rings are rd and wr.
// It starts the goroutine that turns n's events into wake-ups.
func newConn(pg page, server bool, rd, wr []byte, n Notifier, release func() error) *Conn {
	c := &Conn{pg: pg, server: server, rd: rd, wr: wr, n: n, release: release, done: make(chan struct{})}
	if server {
		c.rdIdx, c.wrIdx = offLeft, offRight
		c.ownLive, c.peerLive = offSrvLive, offCliLive
		c.askPeer, c.peerAsks = offCliNotify, offSrvNotify
	} else {
		c.rdIdx, c.wrIdx = offRight, offLeft
		c.ownLive, c.peerLive = offCliLive, offSrvLive
		c.askPeer, c.peerAsks = offSrvNotify, offCliNotify
	}
	// Start where the shared indexes are: zero for a fresh server page, the
	// previous client's position for a client re-attaching to a server.
	c.cons = pg.load(c.rdIdx + offCons)
	c.prod = pg.load(c.wrIdx + offProd)
	c.ev.ch = make(chan struct{})
	go c.ev.pump(n)
	return c
}

// attachClient connects as the client to a server's interface page: it
// validates the layout, maps the rings with mapRing (the granted pages
// listed in the page, writable for the left ring that the client writes),
// marks the client connected and wakes the server (Xen init.c
// libxenvchan_client_init, Qubes vchan/init.c). On error nothing of the
// page is changed; the caller releases what mapRing mapped.
func attachClient(pg page, mapRing func(grants []uint32, writable bool) ([]byte, error), n Notifier, release func() error) (*Conn, error) {
	left, right, grants, err := pg.readLayout()
	if err != nil {
		return nil, err
	}
	ring := func(pl placement, grants []uint32, writable bool) ([]byte, error) {
		if b := pg.ring(pl); b != nil {
			return b, nil
		}
		b, err := mapRing(grants, writable)
		if err != nil {
			return nil, fmt.Errorf("vchan: map ring of order %d: %w", pl.order, err)
		}
		if len(b) != pl.size() {
			return nil, fmt.Errorf("vchan: mapped ring has %d bytes, want %d", len(b), pl.size())
		}
		return b, nil
	}
	wr, err := ring(left, grants[:left.pages], true)
	if err != nil {
		return nil, err
	}
	rd, err := ring(right, grants[left.pages:], false)
	if err != nil {
		return nil, err
	}
	c := newConn(pg, false, rd, wr, n, release)
	pg.setByte(offCliLive, liveConnected)
	pg.setByte(offSrvNotify, NotifyWrite)
	if err := n.Notify(); err != nil {
		c.Close()
		return nil, fmt.Errorf("vchan: wake server: %w", err)
	}
	return c, nil
}

// events turns the Notifier's events into a broadcast: ch is closed and
// replaced on every event, so a waiter that took ch before checking the
// shared state cannot miss an event that arrives after the check.
type events struct {
	mu  sync.Mutex
	ch  chan struct{}
	err error
}

func (e *events) pump(n Notifier) {
	for {
		err := n.Wait()
		e.mu.Lock()
		close(e.ch)
		if err != nil {
			e.err = err // ch stays closed: every later wait returns at once
			e.mu.Unlock()
			return
		}
		e.ch = make(chan struct{})
		e.mu.Unlock()
	}
}

func (e *events) arm() (<-chan struct{}, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.ch, e.err
}

func (c *Conn) wait(wake <-chan struct{}) {
	t := time.NewTimer(recheck)
	defer t.Stop()
	select {
	case <-wake:
	case <-c.done:
	case <-t.C:
	}
}

// peerAlive reads the peer's live flag: 2 (not yet connected) is valid only
// for a server waiting for its client.
func (c *Conn) peerAlive() (bool, error) {
	switch v := c.pg.loadByte(c.peerLive); {
	case v == liveExited:
		return false, nil
	case v == liveConnected, v == liveWaiting && c.server:
		return true, nil
	default:
		return false, fmt.Errorf("%w: peer live flag %d", ErrBroken, v)
	}
}

// notifyPeer sends an event if the peer asked for bit, clearing the request
// (send_notify in Xen io.c). The caller published its index with an atomic
// store, which is a full barrier, before the request is read here.
func (c *Conn) notifyPeer(bit uint8) error {
	if c.pg.updateByte(c.peerAsks, ^bit, 0)&bit == 0 {
		return nil
	}
	if err := c.n.Notify(); err != nil {
		return fmt.Errorf("vchan: notify peer: %w", err)
	}
	return nil
}

// Read reads what the peer wrote, at most len(p) bytes; io.EOF once the ring
// is empty and the peer has exited.
func (c *Conn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	c.rmu.Lock()
	defer c.rmu.Unlock()
	size := uint32(len(c.rd))
	asked := false
	for {
		if c.closed.Load() {
			return 0, net.ErrClosed
		}
		wake, evErr := c.ev.arm()
		// Acquire: the data the peer wrote before publishing prod is
		// visible once prod is read with an atomic load.
		prod := c.pg.load(c.rdIdx + offProd)
		ready := prod - c.cons
		if ready > size {
			return 0, fmt.Errorf("%w: read ring holds %d bytes (prod %#x cons %#x), size %d", ErrBroken, ready, prod, c.cons, size)
		}
		if ready > 0 {
			n := min(uint32(len(p)), ready)
			off := c.cons & (size - 1)
			k := copy(p[:n], c.rd[off:])
			copy(p[k:n], c.rd)
			c.cons += n
			// Release: our copies are done before the peer may reuse
			// the space.
			c.pg.store(c.rdIdx+offCons, c.cons)
			return int(n), c.notifyPeer(NotifyRead)
		}
		alive, err := c.peerAlive()
		if err != nil {
			return 0, err
		}
		if !alive {
			return 0, io.EOF
		}
		if !asked {
			// Ask for an event when the peer writes, then look again:
			// it may have written after our check but before our
			// request (the compare-and-swap is a full barrier).
			c.pg.updateByte(c.askPeer, 0xff, NotifyWrite)
			asked = true
			continue
		}
		if evErr != nil {
			return 0, fmt.Errorf("vchan: wait for data: %w", evErr)
		}
		c.wait(wake)
		asked = false // the peer clears the request when it notifies
	}
}

// Write writes all of p, waiting for space as needed; it fails once the
// peer has exited.
func (c *Conn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	size := uint32(len(c.wr))
	done := 0
	asked := false
	for done < len(p) {
		if c.closed.Load() {
			return done, net.ErrClosed
		}
		alive, err := c.peerAlive()
		if err != nil {
			return done, err
		}
		if !alive {
			return done, ErrPeerClosed
		}
		wake, evErr := c.ev.arm()
		cons := c.pg.load(c.wrIdx + offCons)
		used := c.prod - cons
		if used > size {
			return done, fmt.Errorf("%w: write ring holds %d bytes (prod %#x cons %#x), size %d", ErrBroken, used, c.prod, cons, size)
		}
		if space := size - used; space > 0 {
			n := min(uint32(len(p)-done), space)
			off := c.prod & (size - 1)
			k := copy(c.wr[off:], p[done:done+int(n)])
			copy(c.wr, p[done+k:done+int(n)])
			c.prod += n
			// Release: the data is in the ring before prod says so.
			c.pg.store(c.wrIdx+offProd, c.prod)
			done += int(n)
			if err := c.notifyPeer(NotifyWrite); err != nil {
				return done, err
			}
			asked = false
			continue
		}
		if !asked {
			c.pg.updateByte(c.askPeer, 0xff, NotifyRead)
			asked = true
			continue
		}
		if evErr != nil {
			return done, fmt.Errorf("vchan: wait for space: %w", evErr)
		}
		c.wait(wake)
		asked = false
	}
	return done, nil
}

// Close marks this end exited, wakes the peer and any blocked Read or Write,
// and releases the shared memory once they have returned.
func (c *Conn) Close() error {
	c.closeOnce.Do(func() {
		c.closed.Store(true)
		c.pg.setByte(c.ownLive, liveExited)
		c.n.Notify() // best effort: the peer may be gone already
		close(c.done)
		c.rmu.Lock()
		c.wmu.Lock()
		var err error
		if c.release != nil {
			// Unmapping fires the kernel's unmap notification, which
			// signals the still bound event channel (as libxenvchan
			// unmaps before it closes the event channel).
			err = c.release()
		}
		c.wmu.Unlock()
		c.rmu.Unlock()
		err = errors.Join(err, c.n.Close()) // ends the event pump
		if err != nil {
			c.closeErr = fmt.Errorf("vchan close: %w", err)
		}
	})
	return c.closeErr
}

// waitClient blocks a server until its client has connected (cli_live
// leaves 2), the client exited, or done is closed.
func (c *Conn) waitClient(done <-chan struct{}) error {
	for {
		if c.closed.Load() {
			return net.ErrClosed
		}
		wake, evErr := c.ev.arm()
		switch v := c.pg.loadByte(offCliLive); v {
		case liveConnected:
			return nil
		case liveExited:
			return ErrPeerClosed
		case liveWaiting:
		default:
			return fmt.Errorf("%w: client live flag %d", ErrBroken, v)
		}
		if evErr != nil {
			return fmt.Errorf("vchan: wait for client: %w", evErr)
		}
		select {
		case <-done:
			return errors.New("vchan: wait for client: canceled")
		default:
		}
		t := time.NewTimer(recheck)
		select {
		case <-wake:
		case <-t.C:
		case <-done:
		case <-c.done:
		}
		t.Stop()
	}
}
