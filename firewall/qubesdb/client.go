package qubesdb

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"
)

// Mode selects which side of which QubesDB connection the client is.
type Mode int

const (
	// Daemon: a client of the local daemon's unix socket (ordinary VM).
	Daemon Mode = iota
	// Peer: the VM end of the vchan to dom0's daemon (what the firewall VM
	// sees in Qubes, port 111): dom0 pushes WRITE and RM, we acknowledge.
	Peer
)

func (m Mode) String() string {
	if m == Peer {
		return "peer"
	}
	return "daemon"
}

// Handler receives the database as the client sees it. All methods are
// called from the goroutine running Client.Run, in the order the changes
// happened.
type Handler interface {
	// Snapshot replaces everything known so far: the whole database after a
	// (re)connection. The handler may keep the map.
	Snapshot(entries map[string]string)
	// Write reports that path now holds value. In daemon mode the value is
	// read after the watch event fired, so it may already be newer than
	// that event and the same value may be reported twice.
	Write(path, value string)
	// Remove reports that path is gone; a path ending with '/' removes every
	// entry starting with it.
	Remove(path string)
	// Flush marks a batch boundary: everything that had arrived has been
	// reported and no further input is buffered. Consumers may defer work
	// that a burst of changes would otherwise repeat until Flush.
	Flush()
}

// Backoff between reconnection attempts.
const (
	minBackoff = 100 * time.Millisecond
	maxBackoff = 5 * time.Second
	// maxSnapshot bounds the entries accepted in one snapshot (a firewall
	// VM's database has a few hundred).
	maxSnapshot = 16384
)

// Client keeps a Handler in sync with a QubesDB, reconnecting as needed.
type Client struct {
	dial       func(context.Context) (io.ReadWriteCloser, error)
	mode       Mode
	logf       func(string, ...any)
	minBackoff time.Duration
}

// NewClient returns a client that reaches the database through dial (a unix
// socket, a vchan, a serial port: any byte stream).
func NewClient(dial func(context.Context) (io.ReadWriteCloser, error), mode Mode, logf func(string, ...any)) *Client {
	return &Client{dial: dial, mode: mode, logf: logf, minBackoff: minBackoff}
}

// SetFirstRetry sets the wait before the first reconnection (default 100
// ms; it doubles up to 5 s). Tests shorten it.
func (c *Client) SetFirstRetry(d time.Duration) { c.minBackoff = d }

// Run connects, delivers a snapshot, then every change, until ctx is done.
// When the connection fails it reconnects with exponential backoff and
// delivers a fresh snapshot, which the handler diffs against what it had.
// It returns ctx.Err().
func (c *Client) Run(ctx context.Context, h Handler) error {
	backoff := c.minBackoff
	for {
		rwc, err := c.dial(ctx)
		if err == nil {
			var synced bool
			synced, err = c.session(ctx, rwc, h)
			if synced {
				backoff = c.minBackoff
			}
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		c.logf("qubesdb (%v): %v; reconnecting in %v", c.mode, err, backoff)
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
		backoff = min(2*backoff, maxBackoff)
	}
}

// session runs one connection until it fails; synced reports whether a
// snapshot was delivered.
func (c *Client) session(ctx context.Context, rwc io.ReadWriteCloser, h Handler) (synced bool, err error) {
	defer rwc.Close()
	// Closing the connection is what interrupts a blocked read.
	stop := context.AfterFunc(ctx, func() { rwc.Close() })
	defer stop()
	if c.mode == Peer {
		return c.peerSession(rwc, h)
	}
	return c.daemonSession(NewConn(rwc), h)
}

func (c *Client) daemonSession(conn *Conn, h Handler) (bool, error) {
	// Watch first, so that nothing changed after the snapshot goes unseen;
	// events racing with the snapshot are re-read after it, which is
	// harmless.
	if err := conn.Watch("/"); err != nil {
		return false, err
	}
	entries, err := conn.MultiRead("")
	if err != nil {
		return false, err
	}
	h.Snapshot(entries)
	h.Flush()
	dirty := false
	for {
		queued, buffered := conn.pending()
		if !queued && !buffered && dirty {
			h.Flush()
			dirty = false
		}
		path, err := conn.NextWatch()
		if err != nil {
			return true, err
		}
		if !ValidPath(path) || !strings.HasPrefix(path, "/") {
			return true, fmt.Errorf("qubesdb: %w: watch event for %q", ErrMalformed, path)
		}
		dirty = true
		if strings.HasSuffix(path, "/") {
			// Only an RM of a subtree fires with a trailing '/'.
			h.Remove(path)
			continue
		}
		v, err := conn.Read(path)
		switch {
		case errors.Is(err, ErrNotFound):
			h.Remove(path)
		case err != nil:
			return true, err
		default:
			h.Write(path, v)
		}
	}
}

func (c *Client) peerSession(rwc io.ReadWriteCloser, h Handler) (bool, error) {
	r := bufio.NewReaderSize(rwc, HeaderLen+MaxData)
	if err := WriteMessage(rwc, Message{Type: CmdMultiRead}); err != nil {
		return false, fmt.Errorf("qubesdb peer: request snapshot: %w", err)
	}
	entries := make(map[string]string)
	for {
		m, err := ReadMessage(r)
		if err != nil {
			return false, fmt.Errorf("qubesdb peer: snapshot: %w", err)
		}
		if m.Type != RespMultiRead {
			return false, fmt.Errorf("qubesdb peer: snapshot: %w: unexpected %v", ErrMalformed, m)
		}
		if m.Path == "" && len(m.Data) == 0 {
			break
		}
		if !ValidKey(m.Path) || len(entries) >= maxSnapshot {
			return false, fmt.Errorf("qubesdb peer: snapshot: %w: entry %q (%d so far)", ErrMalformed, m.Path, len(entries))
		}
		entries[m.Path] = string(m.Data)
	}
	h.Snapshot(entries)
	h.Flush()
	for {
		m, err := ReadMessage(r)
		if err != nil {
			return true, fmt.Errorf("qubesdb peer: %w", err)
		}
		// dom0's daemon treats RESP_ERROR_NOENT (or any reply it does not
		// expect) as fatal, so every well-formed push is acknowledged with
		// RESP_OK, even an RM of something we never had. Only pushes that
		// name no possible entry get RESP_ERROR, which dom0 logs and ignores.
		reply := Message{Type: RespOK, Path: m.Path}
		switch {
		case m.Type == CmdWrite && ValidKey(m.Path):
		case m.Type == CmdRm && ValidPath(m.Path) && strings.HasPrefix(m.Path, "/"):
		case m.Type == CmdWrite || m.Type == CmdRm:
			c.logf("qubesdb peer: refusing %v", m)
			reply.Type = RespError
		default:
			return true, fmt.Errorf("qubesdb peer: %w: unexpected %v", ErrMalformed, m)
		}
		if err := WriteMessage(rwc, reply); err != nil {
			return true, fmt.Errorf("qubesdb peer: acknowledge %v: %w", m, err)
		}
		switch {
		case reply.Type != RespOK:
		case m.Type == CmdWrite:
			h.Write(m.Path, string(m.Data))
		default:
			h.Remove(m.Path)
		}
		if r.Buffered() == 0 {
			h.Flush()
		}
	}
}
