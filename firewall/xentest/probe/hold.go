package main

import (
	"bufio"
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"
)

// holdInterval: at 5 lines a second a connection the firewall forgot (on
// a rule reload, say) shows within a second or two.
const holdInterval = 200 * time.Millisecond

// hold is a long-lived TCP connection that checks it keeps working: it
// sends "seq <k>" lines and counts the echoes until the first error.
type hold struct {
	conn  net.Conn
	start time.Time

	mu     sync.Mutex
	echoes int
	last   time.Time // of the last echo
	err    error
	closed bool
}

func runHoldStart(ctx context.Context, a *agent, c call) result {
	name := c.args[0]
	if a.hold(name, false) != nil {
		return errorf("hold %q exists", name)
	}
	conn, r := dial(ctx, "tcp", c.args[1])
	if conn == nil {
		return r
	}
	conn.SetDeadline(time.Time{}) // the hold outlives the command
	h := &hold{conn: conn, start: time.Now()}
	a.mu.Lock()
	a.holds[name] = h
	a.mu.Unlock()
	go h.send()
	go h.receive()
	return result{statusOK, "started"}
}

func (h *hold) send() {
	for k := 1; h.alive(); k++ {
		// A peer that stops reading must show as an error, not a hang.
		h.conn.SetWriteDeadline(time.Now().Add(2 * time.Second))
		if _, err := fmt.Fprintf(h.conn, "seq %d\n", k); err != nil {
			h.fail(fmt.Errorf("send: %w", err))
			return
		}
		time.Sleep(holdInterval)
	}
}

func (h *hold) alive() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.err == nil && !h.closed
}

func (h *hold) receive() {
	s := bufio.NewScanner(h.conn)
	for s.Scan() {
		h.mu.Lock()
		h.echoes++
		h.last = time.Now()
		h.mu.Unlock()
	}
	h.fail(fmt.Errorf("receive: %w", cmp.Or(s.Err(), errors.New("closed by peer"))))
}

func (h *hold) fail(err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.err == nil && !h.closed {
		h.err = err
	}
}

func (h *hold) close() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.closed = true
	h.conn.Close()
}

// status reports the echo count, the milliseconds since the last echo
// (since connecting, before the first one) and the first error.
func (h *hold) status() result {
	h.mu.Lock()
	defer h.mu.Unlock()
	since, e := h.last, "none"
	if since.IsZero() {
		since = h.start
	}
	if h.err != nil {
		e = h.err.Error()
	}
	return result{statusOK, fmt.Sprintf("echoes=%d last=%d err=%s", h.echoes, time.Since(since).Milliseconds(), e)}
}

// hold returns the hold called name, or nil; remove forgets it.
func (a *agent) hold(name string, remove bool) *hold {
	a.mu.Lock()
	defer a.mu.Unlock()
	h := a.holds[name]
	if remove {
		delete(a.holds, name)
	}
	return h
}

// runHoldStatus runs hold-status, and hold-stop, which then closes it.
func runHoldStatus(_ context.Context, a *agent, c call) result {
	stop := c.name == "hold-stop"
	h := a.hold(c.args[0], stop)
	if h == nil {
		return errorf("no such hold")
	}
	r := h.status()
	if stop {
		h.close()
	}
	return r
}

func (a *agent) stopHolds() {
	a.mu.Lock()
	defer a.mu.Unlock()
	for name, h := range a.holds {
		h.close()
		delete(a.holds, name)
	}
}
