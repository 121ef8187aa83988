package afpacket

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// A Budget divides the memory a VM can give to links among the links open
// at the moment, in proportion to their weights, so that the total stays
// bounded however many client VMs attach. Without one, each link takes
// Config.BatchSize slots and Config.SocketBuffer, and a VM of 32 MB runs
// out of memory at about ten clients (the kernel cannot kill PID 1, so the
// VM dies).
//
// A link's share sets two things, both again whenever a link opens or
// closes, and when Adapt moves memory to where the traffic is:
//   - its receive slots (Go heap, FrameSize+10 bytes each): between
//     minBatch and Config.BatchSize of them. A reader blocked in ReadBatch
//     is woken so that a smaller share is given back at once, not at its
//     next frame;
//   - its kernel socket queues (SO_RCVBUFFORCE and SO_SNDBUFFORCE, which
//     the kernel doubles): between minSocketBuffer and maxSocketBuffer
//     each. The send queue bounds what a client VM that stops draining its
//     ring can hold of the firewall's memory.
type Budget struct {
	slots, queues, perLink int

	mu    sync.Mutex
	links map[*Link]*budgetLink
}

// budgetLink is what a Budget keeps of one open link.
type budgetLink struct {
	share Share
	heat  int // Adapt's multiplier of the link's weight
}

// Share is what a Budget gives one link.
type Share struct {
	Batch        int // receive slots
	SocketBuffer int // the value set with SO_RCVBUFFORCE and SO_SNDBUFFORCE
}

const (
	// minBatch: fewer slots than this and each batch is one frame.
	minBatch = 2
	// minSocketBuffer (doubled by the kernel) still queues a GSO
	// super-frame; maxSocketBuffer is where more stops helping.
	minSocketBuffer = 64 << 10
	maxSocketBuffer = 4 << 20
)

// NewBudget returns a Budget of slots bytes of receive slots and queues
// bytes of kernel socket queues (both directions, the kernel's doubling
// included), of which each link first pays perLink bytes of slot memory
// for buffers its user keeps (the dispatcher's arena).
func NewBudget(slots, queues, perLink int) *Budget {
	return &Budget{slots: slots, queues: queues, perLink: perLink, links: map[*Link]*budgetLink{}}
}

// Shares returns the current share of each open link, by name.
func (b *Budget) Shares() map[string]Share {
	b.mu.Lock()
	defer b.mu.Unlock()
	m := make(map[string]Share, len(b.links))
	for l, bl := range b.links {
		m[l.name] = bl.share
	}
	return m
}

func (b *Budget) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	var slots, queues int
	for l, m := range b.links {
		slots += m.share.Batch * l.rx.slot
		queues += 4 * m.share.SocketBuffer
	}
	return fmt.Sprintf("%d links: %d KiB of slots (budget %d KiB), %d KiB of socket queues at most (budget %d KiB)",
		len(b.links), slots>>10, b.slots>>10, queues>>10, b.queues>>10)
}

// ErrBudget is returned by Open for a link its Budget has no room for.
var ErrBudget = errors.New("memory budget exhausted: no room for another link")

// admitSlots is the receive memory, in slots, a Budget must be able to give
// every link, a new one included, or it refuses the new one: a client VM
// that cannot attach is better than a VM whose kernel must kill PID 1.
// The arenas (perLink) count in the shares but not here: they are
// allocated on first use and most links never fill theirs, so the slot
// floor with one slot to spare is the limit (12 clients at 32 MB, 33 at
// 64 MB with the budget Qubes mode gives; TestClientsPerVMSize).
const admitSlots = minBatch + 1

// join adds l and rebalances, or refuses l when the budget cannot give
// every link admitSlots slots; leave removes it.
//
// A link opened with Config.Reserved (the uplink, without which no client
// has a use) is always admitted, and while none is open the others leave
// room for one.
func (b *Budget) join(l *Link) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	need := len(b.links) + 1
	if !l.cfg.Reserved {
		need++ // room for a reserved link, unless one is open
		for o := range b.links {
			if o.cfg.Reserved {
				need--
				break
			}
		}
		if need*admitSlots*l.rx.slot > b.slots {
			return fmt.Errorf("%w (%d links, %d KiB of receive slots)", ErrBudget, len(b.links), b.slots>>10)
		}
	}
	b.links[l] = &budgetLink{heat: 1}
	b.rebalanceLocked()
	return nil
}

func (b *Budget) leave(l *Link) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.links[l]; !ok {
		return
	}
	delete(b.links, l)
	b.rebalanceLocked()
}

// maxHeat bounds how far Adapt raises a busy link's weight.
const maxHeat = 8

// Adapt moves memory to where the traffic is: a link whose reads filled
// its whole batch since the last call (the socket held more than one
// call could take) has its weight doubled, up to maxHeat times its
// Config.Weight; a link without such a read has it halved, down to its
// Config.Weight. Shares change only when a weight did. Call it about
// once a second (Run does): each change reallocates receive slots, so
// not on every batch.
func (b *Budget) Adapt() {
	b.mu.Lock()
	defer b.mu.Unlock()
	changed := false
	for l, m := range b.links {
		h := m.heat
		if l.fullReads.Swap(0) > 0 {
			h = min(2*h, maxHeat)
		} else {
			h = max(h/2, 1)
		}
		if h != m.heat {
			m.heat = h
			changed = true
		}
	}
	if changed {
		b.rebalanceLocked()
	}
}

// Run calls Adapt every second until ctx is done.
func (b *Budget) Run(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			b.Adapt()
		}
	}
}

func (b *Budget) rebalanceLocked() {
	weights := 0
	for l, m := range b.links {
		weights += l.cfg.Weight * m.heat
	}
	// Slots by weight, water-filled: a link whose part is more than it
	// can use (Config.BatchSize slots) gets what it can use, and the rest
	// is divided again among the others.
	free, pool := max(0, b.slots-len(b.links)*b.perLink), weights
	batch := make(map[*Link]int, len(b.links))
	for capped := true; capped; {
		capped = false
		for l, m := range b.links {
			if _, ok := batch[l]; ok {
				continue
			}
			if w := l.cfg.Weight * m.heat; free*w/pool/l.rx.slot >= l.cfg.BatchSize {
				batch[l] = l.cfg.BatchSize
				free -= l.cfg.BatchSize * l.rx.slot
				pool -= w
				capped = true
			}
		}
	}
	for l, m := range b.links {
		old := m.share
		w := l.cfg.Weight * m.heat
		n, ok := batch[l]
		if !ok {
			n = max(free*w/pool/l.rx.slot, minBatch)
		}
		s := Share{
			Batch:        n,
			SocketBuffer: min(max(b.queues*w/weights/4, minSocketBuffer), maxSocketBuffer),
		}
		if l.cfg.SocketBuffer > 0 {
			s.SocketBuffer = l.cfg.SocketBuffer // set by the caller
		}
		if s != old {
			l.setShare(old, s)
			m.share = s
		}
	}
}

// setShare applies s: the socket queues at once, the slots at the reader's
// next turn, which a deadline in the past (or its Loop's poke) brings
// forward when it waits.
func (l *Link) setShare(old, s Share) {
	if s.SocketBuffer != old.SocketBuffer && l.cfg.SocketBuffer == 0 {
		err := l.rc.Control(func(fd uintptr) {
			for _, o := range []int{unix.SO_RCVBUFFORCE, unix.SO_SNDBUFFORCE} {
				if err := unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, o, s.SocketBuffer); err != nil {
					l.cfg.Logf("%s: socket buffer %d: %v", l.name, s.SocketBuffer, err)
				}
			}
		})
		if err != nil {
			l.cfg.Logf("%s: socket buffer: %v", l.name, err)
		}
	}
	// A smaller share is given back at once (the reader is woken); a
	// larger one is taken at the reader's next frame, so that a link
	// closing does not make every other link reallocate at that moment
	// (a netvm change, when the kernel itself needs memory for the new
	// netfront).
	if prev := int(l.rxWant.Swap(int32(s.Batch))); s.Batch < prev {
		if lp := l.loop.Load(); lp != nil {
			lp.poke()
		} else {
			_ = l.file.SetReadDeadline(time.Now())
		}
	}
}
