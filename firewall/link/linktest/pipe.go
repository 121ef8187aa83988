package linktest

import (
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/link"
	"sync"
)

// Pipe is an in-memory link.Link for tests: frames written to one end are read
// from the other. The queue is bounded; writes to a full queue drop the
// frame and count it, as a real NIC would.
type Pipe struct {
	name string
	mac  [6]byte
	mtu  int
	peer *Pipe

	mu      sync.Mutex
	cond    *sync.Cond
	queue   []link.Frame // frames waiting to be read from this end
	closed  bool
	dropped int
}

// PipeQueueLen bounds the number of frames waiting at each end of a Pipe.
const PipeQueueLen = 1024

// NewPipe returns the two connected ends of an in-memory link. Each end
// reports the MAC given for it.
func NewPipe(nameA string, macA [6]byte, nameB string, macB [6]byte, mtu int) (*Pipe, *Pipe) {
	a := &Pipe{name: nameA, mac: macA, mtu: mtu}
	b := &Pipe{name: nameB, mac: macB, mtu: mtu}
	a.cond = sync.NewCond(&a.mu)
	b.cond = sync.NewCond(&b.mu)
	a.peer, b.peer = b, a
	return a, b
}

var _ link.Link = (*Pipe)(nil)

func (p *Pipe) Name() string { return p.name }
func (p *Pipe) MAC() [6]byte { return p.mac }
func (p *Pipe) MTU() int     { return p.mtu }

// ReadBatch implements link.Link.
func (p *Pipe) ReadBatch(frames []link.Frame) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for len(p.queue) == 0 && !p.closed {
		p.cond.Wait()
	}
	if len(p.queue) == 0 {
		return 0, link.ErrClosed
	}
	n := copy(frames, p.queue)
	p.queue = append(p.queue[:0], p.queue[n:]...)
	return n, nil
}

// TryRead returns the frames waiting at this end without blocking.
func (p *Pipe) TryRead() []link.Frame {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := p.queue
	p.queue = nil
	return out
}

// WriteBatch implements link.Link: it copies each frame into the peer's queue.
func (p *Pipe) WriteBatch(frames []link.Frame) (int, error) {
	q := p.peer
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return 0, link.ErrClosed
	}
	for _, f := range frames {
		if len(q.queue) >= PipeQueueLen {
			q.dropped++
			continue
		}
		f.Data = append([]byte(nil), f.Data...)
		q.queue = append(q.queue, f)
	}
	q.cond.Broadcast()
	return len(frames), nil
}

// Dropped reports how many frames were dropped because this end's queue was full.
func (p *Pipe) Dropped() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.dropped
}

// Close closes both ends.
func (p *Pipe) Close() error {
	for _, e := range []*Pipe{p, p.peer} {
		e.mu.Lock()
		e.closed = true
		e.cond.Broadcast()
		e.mu.Unlock()
	}
	return nil
}
