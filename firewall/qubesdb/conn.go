package qubesdb

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
)

// DefaultSocket is where the daemon of an ordinary Qubes VM listens.
const DefaultSocket = "/var/run/qubes/qubesdb.sock"

var (
	// ErrNotFound is the daemon's RESP_ERROR_NOENT.
	ErrNotFound = errors.New("qubesdb: no such entry")
	// ErrRefused is the daemon's RESP_ERROR.
	ErrRefused = errors.New("qubesdb: request refused")
	// errEventOverflow ends a session whose watch events pile up faster than
	// they are handled; the client resynchronises instead of buffering more.
	errEventOverflow = errors.New("qubesdb: too many pending watch events")
)

// maxPendingEvents bounds the watch events queued while a reply is awaited.
const maxPendingEvents = 1024

// UnixDialer returns a dial function for the daemon socket at path.
func UnixDialer(path string) func(context.Context) (io.ReadWriteCloser, error) {
	return func(ctx context.Context) (io.ReadWriteCloser, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", path)
	}
}

// Conn is a synchronous daemon-mode connection: one request at a time, each
// waiting for its reply. The daemon may send RESP_WATCH at any moment, even
// between the messages of a MULTIREAD reply; Conn sets those aside and hands
// them out through NextWatch. A Conn is not safe for concurrent use.
type Conn struct {
	rwc    io.ReadWriteCloser
	r      *bufio.Reader
	events []string // watch events received while waiting for replies
}

// NewConn wraps an established connection.
func NewConn(rwc io.ReadWriteCloser) *Conn {
	return &Conn{rwc: rwc, r: bufio.NewReaderSize(rwc, HeaderLen+MaxData)}
}

// Close closes the connection.
func (c *Conn) Close() error { return c.rwc.Close() }

func (c *Conn) send(m Message) error {
	if err := WriteMessage(c.rwc, m); err != nil {
		return fmt.Errorf("qubesdb send %v: %w", m.Type, err)
	}
	return nil
}

// recv returns the next message that is not a watch event, queueing events.
func (c *Conn) recv() (Message, error) {
	for {
		m, err := ReadMessage(c.r)
		if err != nil {
			return Message{}, fmt.Errorf("qubesdb receive: %w", err)
		}
		if m.Type != RespWatch {
			return m, nil
		}
		if len(c.events) >= maxPendingEvents {
			return Message{}, errEventOverflow
		}
		c.events = append(c.events, m.Path)
	}
}

// call sends a request without data-bearing reply and checks the answer.
func (c *Conn) call(req Message, want Type) (Message, error) {
	if err := c.send(req); err != nil {
		return Message{}, err
	}
	m, err := c.recv()
	if err != nil {
		return Message{}, fmt.Errorf("%v %q: %w", req.Type, req.Path, err)
	}
	switch {
	case m.Type == want && m.Path == req.Path:
		return m, nil
	case m.Type == RespErrorNoEnt:
		return Message{}, fmt.Errorf("%v %q: %w", req.Type, req.Path, ErrNotFound)
	case m.Type == RespError:
		return Message{}, fmt.Errorf("%v %q: %w", req.Type, req.Path, ErrRefused)
	}
	return Message{}, fmt.Errorf("%v %q: %w: unexpected reply %v", req.Type, req.Path, ErrMalformed, m)
}

// Read returns the value at path (ErrNotFound if absent).
func (c *Conn) Read(path string) (string, error) {
	m, err := c.call(Message{Type: CmdRead, Path: path}, RespRead)
	return string(m.Data), err
}

// Write sets path to value.
func (c *Conn) Write(path, value string) error {
	_, err := c.call(Message{Type: CmdWrite, Path: path, Data: []byte(value)}, RespOK)
	return err
}

// Rm removes path, or every entry below it when path ends with '/'
// (ErrNotFound when nothing was removed).
func (c *Conn) Rm(path string) error {
	_, err := c.call(Message{Type: CmdRm, Path: path}, RespOK)
	return err
}

// Watch registers a watch: on path exactly, or on every path starting with
// it when it ends with '/' (so "/" watches everything).
func (c *Conn) Watch(path string) error {
	_, err := c.call(Message{Type: CmdWatch, Path: path}, RespOK)
	return err
}

// Unwatch removes one watch registered with the same path.
func (c *Conn) Unwatch(path string) error {
	_, err := c.call(Message{Type: CmdUnwatch, Path: path}, RespOK)
	return err
}

// List returns the paths starting with prefix (a plain string prefix, with
// or without a trailing '/').
func (c *Conn) List(prefix string) ([]string, error) {
	var paths []string
	err := c.multi(Message{Type: CmdList, Path: prefix}, RespList, func(m Message) {
		paths = append(paths, m.Path)
	})
	return paths, err
}

// MultiRead returns the entries whose path starts with prefix; the empty
// prefix returns the whole database.
func (c *Conn) MultiRead(prefix string) (map[string]string, error) {
	entries := make(map[string]string)
	err := c.multi(Message{Type: CmdMultiRead, Path: prefix}, RespMultiRead, func(m Message) {
		entries[m.Path] = string(m.Data)
	})
	return entries, err
}

// multi runs a request answered by a series of want messages ended by one
// with an empty path and no data.
func (c *Conn) multi(req Message, want Type, each func(Message)) error {
	if err := c.send(req); err != nil {
		return err
	}
	for {
		m, err := c.recv()
		if err != nil {
			return fmt.Errorf("%v %q: %w", req.Type, req.Path, err)
		}
		switch {
		case m.Type == RespError:
			return fmt.Errorf("%v %q: %w", req.Type, req.Path, ErrRefused)
		case m.Type != want:
			return fmt.Errorf("%v %q: %w: unexpected reply %v", req.Type, req.Path, ErrMalformed, m)
		case m.Path == "" && len(m.Data) == 0:
			return nil
		case !ValidKey(m.Path) || !strings.HasPrefix(m.Path, req.Path):
			return fmt.Errorf("%v %q: %w: reply entry %q", req.Type, req.Path, ErrMalformed, m.Path)
		}
		each(m)
	}
}

// NextWatch returns the path of the next watch event, waiting for one if
// none is queued. A path ending with '/' is a removal of that whole subtree.
func (c *Conn) NextWatch() (string, error) {
	if len(c.events) == 0 {
		m, err := ReadMessage(c.r)
		if err != nil {
			return "", fmt.Errorf("qubesdb wait for watch: %w", err)
		}
		if m.Type != RespWatch {
			return "", fmt.Errorf("qubesdb wait for watch: %w: unexpected %v", ErrMalformed, m)
		}
		return m.Path, nil
	}
	p := c.events[0]
	c.events = c.events[1:]
	return p, nil
}

// pending reports whether NextWatch can answer without reading the
// connection's next message from the network: an event is queued or input
// is already buffered.
func (c *Conn) pending() (queued bool, buffered bool) {
	return len(c.events) > 0, c.r.Buffered() > 0
}
