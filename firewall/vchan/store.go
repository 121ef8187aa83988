package vchan

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
)

// Ports of the Qubes services that use vchan (qubes-core-qubesdb
// daemon/qubesdb_internal.h QUBESDB_VCHAN_PORT, qubes-core-qrexec
// libqrexec/qrexec.h VCHAN_BASE_PORT).
const (
	QubesDBPort = 111
	QrexecPort  = 512
)

// domidFirstReserved is Xen's DOMID_FIRST_RESERVED: domain IDs from here on
// name special domains (DOMID_SELF, ...), never a peer.
const domidFirstReserved = 0x7ff0

// Store is what vchan needs from a xenstore client. Relative paths are
// relative to the caller's own domain directory (/local/domain/<self>), which
// xenstored resolves itself.
type Store interface {
	Read(path string) (string, error)
	Write(path, value string) error
	Rm(path string) error
	// Watch watches path. The channel receives a value whenever the watch
	// fires (xenstore fires once when the watch is set, then on changes
	// at or below path); it is closed when the store fails or ctx is
	// done, and the watch is removed when ctx is done.
	Watch(ctx context.Context, path string) (<-chan struct{}, error)
}

// clientPath is where a server publishes the vchan for client on port
// (Qubes vchan/init.c libvchan_client_init_async_finish).
func clientPath(server, client, port int) string {
	return fmt.Sprintf("/local/domain/%d/data/vchan/%d/%d", server, client, port)
}

// serverPath is the same directory relative to the server's own
// (libvchan_server_init: "data/vchan/%d/%d").
func serverPath(client, port int) string {
	return fmt.Sprintf("data/vchan/%d/%d", client, port)
}

func checkDomid(d int) error {
	if d < 0 || d >= domidFirstReserved {
		return fmt.Errorf("vchan: invalid domain ID %d", d)
	}
	return nil
}

func checkPort(port int) error {
	if port < 0 {
		return fmt.Errorf("vchan: invalid port %d", port)
	}
	return nil
}

// parseDomid parses a domain ID as Qubes' parse_domid does: decimal, no
// leading zeros or signs, below DOMID_FIRST_RESERVED.
func parseDomid(s string) (int, error) {
	if s == "" || s[0] == '0' && s != "0" || s[0] < '0' || s[0] > '9' {
		return 0, fmt.Errorf("vchan: bad domain ID %q", s)
	}
	d, err := strconv.ParseUint(s, 10, 16)
	if err != nil || d >= domidFirstReserved {
		return 0, fmt.Errorf("vchan: bad domain ID %q", s)
	}
	return int(d), nil
}

// parseRef parses a grant reference or an event channel port published by
// the server: a non-zero decimal 32-bit number (libxenvchan's atoi accepts
// more; zero is its failure value too).
func parseRef(what, s string) (uint32, error) {
	v, err := strconv.ParseUint(s, 10, 32)
	if err != nil || v == 0 || s[0] == '+' {
		return 0, fmt.Errorf("vchan: bad %s %q", what, s)
	}
	return uint32(v), nil
}

func ownDomid(store Store) (int, error) {
	s, err := store.Read("domid")
	if err != nil {
		return 0, fmt.Errorf("vchan: read own domid: %w", err)
	}
	return parseDomid(s)
}

// waitServer waits until the server has published ring-ref and
// event-channel under base and returns them. It watches event-channel
// rather than the directory, as Qubes does, because the client may not be
// allowed to read the directory; the server writes ring-ref first (or both
// in one transaction).
func waitServer(ctx context.Context, store Store, base string) (ref, port uint32, err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	evPath := base + "/event-channel"
	fired, err := store.Watch(ctx, evPath)
	if err != nil {
		return 0, 0, fmt.Errorf("vchan: watch %s: %w", evPath, err)
	}
	for {
		// A read error is the usual ENOENT while the server is not up.
		if ev, err := store.Read(evPath); err == nil && ev != "" {
			if port, err = parseRef("event channel", ev); err != nil {
				return 0, 0, err
			}
			r, err := store.Read(base + "/ring-ref")
			if err != nil {
				return 0, 0, fmt.Errorf("vchan: read %s/ring-ref: %w", base, err)
			}
			if ref, err = parseRef("grant reference", r); err != nil {
				return 0, 0, err
			}
			return ref, port, nil
		}
		select {
		case _, ok := <-fired:
			if !ok && ctx.Err() == nil {
				return 0, 0, fmt.Errorf("vchan: watch %s: store closed", evPath)
			}
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			return 0, 0, fmt.Errorf("vchan: wait for server at %s: %w", base, ctx.Err())
		}
	}
}

// Dial connects as the vchan client to the server domain on port, waiting
// for the server to publish itself in xenstore. QubesDB in a VM is
// Dial(ctx, store, 0, QubesDBPort).
func Dial(ctx context.Context, store Store, server, port int) (*Conn, error) {
	if err := errors.Join(checkDomid(server), checkPort(port)); err != nil {
		return nil, err
	}
	self, err := ownDomid(store)
	if err != nil {
		return nil, err
	}
	if self == server {
		return nil, fmt.Errorf("vchan: loopback connection to domain %d", self)
	}
	base := clientPath(server, self, port)
	ref, evtch, err := waitServer(ctx, store, base)
	if err != nil {
		return nil, err
	}
	c, err := dialXen(server, ref, evtch)
	if err != nil {
		return nil, fmt.Errorf("vchan dial %s (ring-ref %d, event channel %d): %w", base, ref, evtch, err)
	}
	return c, nil
}

// Dialer returns Dial as the dial function qubesdb.NewClient takes.
func Dialer(store Store, server, port int) func(context.Context) (io.ReadWriteCloser, error) {
	return func(ctx context.Context) (io.ReadWriteCloser, error) {
		c, err := Dial(ctx, store, server, port)
		if err != nil {
			return nil, err
		}
		return c, nil
	}
}

// Listen serves one vchan connection on port for the client domain: it
// shares an interface page and rings big enough for readMin and writeMin
// bytes, publishes them in xenstore, waits for the client to connect and
// removes the xenstore entries again (Qubes vchan/io.c libvchan_wait). The
// entries get default permissions: a dom0 client may read them, another
// domain may not (libxenvchan grants the client read access explicitly).
func Listen(ctx context.Context, store Store, client, port, readMin, writeMin int) (*Conn, error) {
	if err := errors.Join(checkDomid(client), checkPort(port)); err != nil {
		return nil, err
	}
	left, right, err := serverOrders(readMin, writeMin)
	if err != nil {
		return nil, err
	}
	c, ref, evtch, err := listenXen(client, left, right)
	if err != nil {
		return nil, fmt.Errorf("vchan listen for domain %d port %d: %w", client, port, err)
	}
	rel := serverPath(client, port)
	err = publish(store, rel, ref, evtch)
	if err == nil {
		err = c.waitClient(ctx.Done())
	}
	if rerr := store.Rm(rel); rerr != nil && err == nil {
		err = fmt.Errorf("vchan: remove %s: %w", rel, rerr)
	}
	if err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// publish writes ring-ref before event-channel, which the client watches.
func publish(store Store, rel string, ref, evtch uint32) error {
	for _, kv := range [][2]string{
		{rel + "/ring-ref", strconv.FormatUint(uint64(ref), 10)},
		{rel + "/event-channel", strconv.FormatUint(uint64(evtch), 10)},
	} {
		if err := store.Write(kv[0], kv[1]); err != nil {
			return fmt.Errorf("vchan: publish %s: %w", kv[0], err)
		}
	}
	return nil
}
