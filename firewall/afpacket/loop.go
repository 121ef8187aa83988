package afpacket

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/link"
)

// A Loop reads every link it serves from one goroutine, the one running
// Run. Qubes gives the firewall VM one vCPU: a reader goroutine per link
// buys no parallelism there, only a goroutine switch per batch and a
// contended dispatcher lock when the scheduler preempts its holder.
//
// The links' sockets are in one epoll set, level-triggered, and the epoll
// descriptor itself is waited on in the runtime poller: the loop parks like
// any reader, and no thread sits blocked in epoll_wait. Each round gives
// every readable link a turn of up to turnBatches batches (each at most
// its receive slots) before any link gets another, so a busy client
// cannot starve the others.
//
// Membership changes (Serve, Close, a smaller Budget share) are rare: they
// publish a new member map behind an atomic pointer and wake the loop
// through an eventfd; the loop itself takes no lock.
type Loop struct {
	ep    *os.File // the epoll instance
	epfd  int      // its descriptor (os.File.Fd would make it blocking)
	rc    syscall.RawConn
	wake  *os.File // eventfd, member 0 of the epoll set
	wakeC syscall.RawConn

	members atomic.Pointer[map[int32]*member] // replaced, never changed
	halt    atomic.Bool                       // Run's context is done

	mu      sync.Mutex // serializes membership changes
	nextID  int32
	stopped bool // Run returned: no new members
}

// member is one served link; only the loop's goroutine reads it.
type member struct {
	id     int32
	l      *Link
	input  func([]link.Frame)
	frames []link.Frame
	quit   atomic.Bool // Serve's context is done
	err    error       // why it ended; set before done is closed
	done   chan struct{}
}

// ErrLoopStopped is returned by Serve when the loop's Run has returned.
var ErrLoopStopped = errors.New("afpacket: loop stopped")

// NewLoop returns a Loop serving no links; Run runs it.
func NewLoop() (*Loop, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll_create1: %w", err)
	}
	// Non-blocking, so that os.NewFile registers it with the runtime
	// poller, for which it is readable while it has ready members.
	if err := unix.SetNonblock(epfd, true); err != nil {
		unix.Close(epfd)
		return nil, fmt.Errorf("epoll non-blocking: %w", err)
	}
	lp := &Loop{ep: os.NewFile(uintptr(epfd), "afpacket:epoll"), epfd: epfd, nextID: 1}
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		lp.ep.Close()
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	lp.wake = os.NewFile(uintptr(efd), "afpacket:wake")
	if lp.rc, err = lp.ep.SyscallConn(); err == nil {
		lp.wakeC, err = lp.wake.SyscallConn()
	}
	if err == nil {
		err = unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, efd, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: 0})
	}
	if err != nil {
		lp.ep.Close()
		lp.wake.Close()
		return nil, fmt.Errorf("epoll set: %w", err)
	}
	lp.members.Store(&map[int32]*member{})
	return lp, nil
}

// Serve has the loop read l and call input with every batch, from the
// loop's goroutine, until l fails or is closed (link.ErrClosed), ctx is
// done (its error) or the loop stops (ErrLoopStopped). input may rewrite
// the frames in place; they are valid until it returns. Serve blocks
// until then, and once it has returned input is not called again.
func (lp *Loop) Serve(ctx context.Context, l link.Link, input func([]link.Frame)) error {
	al, ok := l.(*Link)
	if !ok {
		return fmt.Errorf("afpacket loop: %s is not an AF_PACKET link", l.Name())
	}
	m := &member{l: al, input: input, frames: make([]link.Frame, al.cfg.BatchSize), done: make(chan struct{})}
	if err := lp.add(m); err != nil {
		return err
	}
	stop := context.AfterFunc(ctx, func() {
		m.quit.Store(true)
		lp.poke()
	})
	defer stop()
	<-m.done
	if m.err == errQuit {
		return ctx.Err()
	}
	return m.err
}

// errQuit marks a member whose Serve context ended.
var errQuit = errors.New("serve context done")

func (lp *Loop) add(m *member) error {
	lp.mu.Lock()
	defer lp.mu.Unlock()
	if lp.stopped {
		return ErrLoopStopped
	}
	if m.l.closed.Load() {
		return link.ErrClosed
	}
	m.id = lp.nextID
	lp.nextID++
	var cerr error
	err := m.l.rc.Control(func(fd uintptr) {
		cerr = unix.EpollCtl(lp.epfd, unix.EPOLL_CTL_ADD, int(fd), &unix.EpollEvent{Events: unix.EPOLLIN, Fd: m.id})
	})
	if err != nil {
		return m.l.closedErr("serve", err)
	}
	if cerr != nil {
		return fmt.Errorf("serve %s: epoll_ctl: %w", m.l.name, cerr)
	}
	old := *lp.members.Load()
	next := make(map[int32]*member, len(old)+1)
	for id, o := range old {
		next[id] = o
	}
	next[m.id] = m
	lp.members.Store(&next)
	m.l.loop.Store(lp)
	if m.l.closed.Load() {
		// Close ran between the check above and the Store, and saw no
		// loop to poke.
		lp.poke()
	}
	return nil
}

// remove ends m with err. Only the loop's goroutine (or Run's end) calls
// it, so no input call for m is under way.
func (lp *Loop) remove(m *member, err error) {
	lp.mu.Lock()
	defer lp.mu.Unlock()
	old := *lp.members.Load()
	if old[m.id] != m {
		return
	}
	// A closed socket has left the set by itself.
	_ = m.l.rc.Control(func(fd uintptr) {
		_ = unix.EpollCtl(lp.epfd, unix.EPOLL_CTL_DEL, int(fd), nil)
	})
	next := make(map[int32]*member, len(old))
	for id, o := range old {
		if id != m.id {
			next[id] = o
		}
	}
	lp.members.Store(&next)
	m.l.loop.CompareAndSwap(lp, nil)
	m.err = err
	close(m.done)
}

// poke wakes the loop so that it looks at every member's state.
func (lp *Loop) poke() {
	var one [8]byte
	binary.NativeEndian.PutUint64(one[:], 1)
	// EAGAIN only at a counter of 2^64-2: the loop is awake anyway. After
	// Run's end the file is closed and Write fails harmlessly; the raw
	// call never parks.
	_ = lp.wakeC.Write(func(fd uintptr) bool {
		_, _ = unix.Write(int(fd), one[:])
		return true
	})
}

// Run serves the members until ctx is done; then every Serve returns
// ErrLoopStopped and the loop's descriptors are closed.
func (lp *Loop) Run(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() {
		lp.halt.Store(true)
		lp.poke()
	})
	defer stop()
	defer lp.shutdown()
	events := make([]unix.EpollEvent, 64)
	var n int
	var errno error
	// Built once: a closure made per round would be an allocation per
	// round.
	wait := func(fd uintptr) bool {
		n, errno = unix.EpollWait(int(fd), events, 0)
		if errno == unix.EINTR {
			n, errno = 0, nil
			return true
		}
		return n > 0 || errno != nil // nothing ready: park in the poller
	}
	for {
		err := lp.rc.Read(wait)
		if err != nil {
			return fmt.Errorf("afpacket loop: wait: %w", err)
		}
		if errno != nil {
			return fmt.Errorf("afpacket loop: epoll_wait: %w", errno)
		}
		if lp.halt.Load() {
			return ctx.Err()
		}
		ms := *lp.members.Load()
		for _, ev := range events[:n] {
			if ev.Fd == 0 {
				lp.housekeep(ms)
				continue
			}
			if m := ms[ev.Fd]; m != nil && !m.ended() {
				lp.serveOne(m)
			}
		}
	}
}

// ended reports whether m was removed this round (a housekeeping event
// earlier in the same round).
func (m *member) ended() bool {
	select {
	case <-m.done:
		return true
	default:
		return false
	}
}

// turnBatches bounds the batches a readable link gets in one round. One
// per round, strict round-robin, cost a third of the throughput with eight
// busy clients (bench/netns.sh, 8 clients in parallel: 0.47x kernel
// forwarding with 1, 0.60x with 4, 0.57x with 16; one stream alike): each
// client's frames reached its server in smaller bursts, and every burst
// wakes the server's reader, on a host a cross-CPU wake-up (perf, per GB
// forwarded: 2.6 times the samples in _raw_spin_unlock_irqrestore under
// sock_def_readable, twice the context switches). Reading a link again
// while it has frames, as a reader goroutine per link did, keeps the
// bursts; the bound keeps a flood on one link from holding up the others
// for more than a few batches.
const turnBatches = 4

// serveOne gives m its turn: batches read and handed over until its
// socket is empty (a read that returns nothing) or turnBatches were read.
func (lp *Loop) serveOne(m *member) {
	for range turnBatches {
		n, err := m.l.read(m.frames, false)
		if n > 0 {
			m.input(m.frames[:n])
		}
		if err != nil {
			lp.remove(m, err)
			return
		}
		if n == 0 {
			return
		}
	}
}

// housekeep drains the wake-up counter and acts on what the poke was
// about: a member whose Serve gave up, a closed link, a smaller share.
func (lp *Loop) housekeep(ms map[int32]*member) {
	var buf [8]byte
	_ = lp.wakeC.Read(func(fd uintptr) bool {
		_, _ = unix.Read(int(fd), buf[:]) // EAGAIN when already drained
		return true
	})
	for _, m := range ms {
		switch {
		case m.ended():
		case m.quit.Load():
			lp.remove(m, errQuit)
		case m.l.closed.Load():
			lp.remove(m, link.ErrClosed)
		case int(m.l.rxWant.Load()) != int(m.l.rxHave.Load()):
			// An idle link gives a smaller share back now, not at its
			// next frame; the loop is its only reader.
			m.l.initRx(int(m.l.rxWant.Load()))
		}
	}
}

func (lp *Loop) shutdown() {
	lp.mu.Lock()
	lp.stopped = true
	lp.mu.Unlock()
	for _, m := range *lp.members.Load() {
		lp.remove(m, ErrLoopStopped)
	}
	lp.ep.Close()
	lp.wake.Close()
}
