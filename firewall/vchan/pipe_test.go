package vchan

import (
	"fmt"
	"net"
	"slices"
	"sync"
	"unsafe"
)

// Pipe returns both ends of a vchan in memory: an interface page and rings
// in ordinary Go memory, an event channel made of Go channels. The server
// end is set up exactly as over Xen and the client attaches through the
// same validation and mapping path as Dial, so everything but the device
// calls is the code that runs in Qubes. leftOrder sizes the ring the client
// writes, rightOrder the one the server writes.
func Pipe(leftOrder, rightOrder int) (client, server *Conn, err error) {
	return pipe(leftOrder, rightOrder, 0, nil)
}

// pipe is Pipe with all four ring indexes starting at start, and the
// client's notifier wrapped by wrap (tests).
func pipe(leftOrder, rightOrder int, start uint32, wrap func(Notifier) Notifier) (client, server *Conn, err error) {
	left, right, err := layout(leftOrder, rightOrder)
	if err != nil {
		return nil, nil, err
	}
	pg, err := newPage(alignedBytes(PageSize))
	if err != nil {
		return nil, nil, err
	}
	// "Grant" the granted rings: fake references, one per page, that the
	// client's mapper resolves back to the same memory.
	granted := make(map[uint32][]byte)
	var grants []uint32
	grant := func(pl placement) []byte {
		if pl.pages == 0 {
			return pg.ring(pl)
		}
		b := alignedBytes(pl.size())
		first := uint32(len(grants) + 100)
		for i := range pl.pages {
			grants = append(grants, first+uint32(i))
		}
		granted[first] = b
		return b
	}
	rd, wr := grant(left), grant(right)
	pg.initServer(left, right, grants)
	for _, off := range []int{offLeft + offCons, offLeft + offProd, offRight + offCons, offRight + offProd} {
		pg.store(off, start)
	}
	cn, sn := memNotifiers()
	var cNotifier Notifier = cn
	if wrap != nil {
		cNotifier = wrap(cn)
	}
	server = newConn(pg, true, rd, wr, sn, nil)
	mapRing := func(refs []uint32, writable bool) ([]byte, error) {
		if len(refs) == 0 {
			return nil, fmt.Errorf("no grants")
		}
		b, ok := granted[refs[0]]
		want := make([]uint32, len(refs))
		for i := range want {
			want[i] = refs[0] + uint32(i)
		}
		if !ok || len(b) != len(refs)*PageSize || !slices.Equal(refs, want) {
			return nil, fmt.Errorf("no grants %v", refs)
		}
		return b, nil
	}
	client, err = attachClient(pg, mapRing, cNotifier, nil)
	if err != nil {
		server.Close()
		return nil, nil, err
	}
	return client, server, nil
}

// alignedBytes returns n zero bytes aligned for 64-bit atomics (as mapped
// pages are).
func alignedBytes(n int) []byte {
	u := make([]uint64, (n+7)/8)
	return unsafe.Slice((*byte)(unsafe.Pointer(&u[0])), n)
}

// memNotifier is an event channel in memory: a pending signal is one
// buffered token, so signals coalesce as Xen's pending bit does.
type memNotifier struct {
	in, out   chan struct{}
	done      chan struct{}
	closeOnce sync.Once
}

func memNotifiers() (a, b *memNotifier) {
	ab, ba := make(chan struct{}, 1), make(chan struct{}, 1)
	a = &memNotifier{in: ba, out: ab, done: make(chan struct{})}
	b = &memNotifier{in: ab, out: ba, done: make(chan struct{})}
	return a, b
}

func (m *memNotifier) Wait() error {
	select {
	case <-m.in:
		return nil
	case <-m.done:
		return net.ErrClosed
	}
}

func (m *memNotifier) Notify() error {
	select {
	case <-m.done:
		return net.ErrClosed
	default:
	}
	select {
	case m.out <- struct{}{}:
	default: // already pending
	}
	return nil
}

func (m *memNotifier) Close() error {
	m.closeOnce.Do(func() { close(m.done) })
	return nil
}
