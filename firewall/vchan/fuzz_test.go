package vchan

import (
	"bytes"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"testing"
)

var errWaitBudget = errors.New("wait budget used up")

// boundedNotifier delivers an event at once for each of the first max waits,
// then fails: a connection using it can never block for long.
type boundedNotifier struct {
	waits, max atomic.Int32
	done       chan struct{}
	once       sync.Once
}

func (b *boundedNotifier) Wait() error {
	select {
	case <-b.done:
		return net.ErrClosed
	default:
	}
	if b.waits.Add(1) > b.max.Load() {
		return errWaitBudget
	}
	return nil
}

func (b *boundedNotifier) Notify() error { return nil }
func (b *boundedNotifier) Close() error  { b.once.Do(func() { close(b.done) }); return nil }

const guard = 64

// FuzzHostileIndexes runs a client against a "server" that is the fuzzer
// itself: between the client's reads and writes it writes arbitrary values
// into the indexes, orders, live and notify bytes, or writes data the honest
// way. The client must return (errors are fine), never panic, and never
// write outside its own ring, index and flag bytes.
func FuzzHostileIndexes(f *testing.F) {
	f.Add([]byte{2, 3, 5, 40, 1, 30, 0, 20, 9, 1, 50, 0})
	f.Add([]byte{0, 1, 2, 1, 0xff, 0xff, 0xff, 0x7f, 1, 10})
	f.Add([]byte{1, 7, 0, 200, 200, 0, 200, 200, 2, 3, 0, 0, 0, 0x80, 0, 5, 5})
	f.Add([]byte{3, 2, 4, 1, 7, 1, 9, 4, 1, 0, 0, 1, 30})
	f.Add([]byte{4, 0, 3, 0, 21, 0, 1, 5, 100, 1, 200})
	f.Fuzz(hostilePeer)
}

func hostilePeer(t *testing.T, data []byte) {
	{
		if len(data) < 2 {
			return
		}
		o := [][2]int{{10, 11}, {11, 10}, {12, 12}, {10, 12}, {13, 11}}[int(data[0])%5]
		left, right, err := layout(o[0], o[1])
		if err != nil {
			t.Fatal(err)
		}
		n := &boundedNotifier{done: make(chan struct{})}
		n.max.Store(int32(data[1] % 8))
		data = data[2:min(len(data), 300)] // keeps executions (and minimizing) quick
		next := func() byte {
			if len(data) == 0 {
				return 0
			}
			b := data[0]
			data = data[1:]
			return b
		}

		pg, err := newPage(alignedBytes(PageSize))
		if err != nil {
			t.Fatal(err)
		}
		// Granted rings sit between guard bytes that must stay intact.
		var guarded [][]byte
		var grants []uint32
		rings := map[uint32][]byte{}
		grant := func(pl placement) []byte {
			if pl.pages == 0 {
				return pg.ring(pl)
			}
			b := bytes.Repeat([]byte{0xa5}, pl.size()+2*guard)
			guarded = append(guarded, b)
			first := uint32(len(grants) + 1)
			for i := range pl.pages {
				grants = append(grants, first+uint32(i))
			}
			rings[first] = b[guard : guard+pl.size()]
			return rings[first]
		}
		grant(left)
		peerRing := grant(right)
		pg.initServer(left, right, grants)
		mapRing := func(refs []uint32, writable bool) ([]byte, error) { return rings[refs[0]], nil }
		c, err := attachClient(pg, mapRing, n, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()

		// The bytes a client may change: left.prod, right.cons, the
		// notify bytes, and the left ring if it is in the page.
		mayWrite := func(off int) bool {
			return off >= offLeft+offProd && off < offRight+offProd ||
				off == offCliNotify || off == offSrvNotify ||
				left.offset != 0 && off >= left.offset && off < left.offset+left.size()
		}
		var peerProd uint32
		buf := make([]byte, 5000)
		for len(data) > 0 {
			before, beforeRing := bytes.Clone(pg.b), bytes.Clone(peerRing)
			switch next() % 6 {
			case 0:
				c.Write(buf[:(int(next())<<8|int(next()))%len(buf)])
			case 1:
				c.Read(buf[:(int(next())<<8|int(next()))%len(buf)])
			case 2: // any index, any value
				off := int(next()%4) * 4
				pg.store(off, uint32(next())|uint32(next())<<8|uint32(next())<<16|uint32(next())<<24)
				continue
			case 3: // the orders: read once at attach, never again
				pg.b[offLeftOrder+int(next()%4)] = next()
				continue
			case 4: // live and notify flags
				pg.setByte(offCliLive+int(next()%4), next())
				continue
			case 5: // honest data from the peer
				k := min(int(next()), right.size())
				for i := range k {
					peerRing[(int(peerProd)+i)&(right.size()-1)] = byte(i)
				}
				peerProd += uint32(k)
				pg.store(offRight+offProd, peerProd)
				continue
			}
			for off := range pg.b {
				if pg.b[off] != before[off] && !mayWrite(off) {
					t.Fatalf("client wrote page offset %d: %#x -> %#x", off, before[off], pg.b[off])
				}
			}
			if !bytes.Equal(peerRing, beforeRing) {
				t.Fatal("client wrote the ring it reads")
			}
		}
		for _, b := range guarded {
			for i := range guard {
				if b[i] != 0xa5 || b[len(b)-1-i] != 0xa5 {
					t.Fatal("client wrote outside a granted ring")
				}
			}
		}
	}
}
