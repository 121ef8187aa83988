package dispatch

import (
	"fmt"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/link"
)

// maxDeferredLines bounds the log lines kept during one hold of the lock;
// more are counted and reported as one line.
const maxDeferredLines = 64

// deferred collects, under the dispatcher's lock, what must not be done
// under it: log lines (a console write can block for as long as the
// console is slow) and frames generated outside a port's Input (ARP on
// uplink changes and ticks). unlock releases the lock and then does it.
// Every method is called with d.mu held.
type deferred struct {
	out     func(string, ...any) // the configured Logf
	lines   []string
	dropped int
	frames  []pending
}

func (q *deferred) logf(format string, args ...any) {
	if len(q.lines) >= maxDeferredLines {
		q.dropped++
		return
	}
	q.lines = append(q.lines, fmt.Sprintf(format, args...))
}

func (q *deferred) send(to *Port, f link.Frame) {
	q.frames = append(q.frames, pending{to: to, frame: f})
}

// unlock releases d.mu, then writes what was deferred while it was held.
// The fast path (nothing deferred) costs a length check.
func (d *Dispatcher) unlock() {
	q := &d.later
	if len(q.lines) == 0 && len(q.frames) == 0 && q.dropped == 0 {
		d.mu.Unlock()
		return
	}
	lines, frames, dropped := q.lines, q.frames, q.dropped
	q.lines, q.frames, q.dropped = nil, nil, 0
	d.mu.Unlock()
	for _, f := range frames {
		// A link that fails is its reader's to notice.
		_, _ = f.to.link.WriteBatch([]link.Frame{f.frame})
	}
	for _, l := range lines {
		q.out("%s", l)
	}
	if dropped > 0 {
		q.out("dispatch: %d log lines dropped (more than %d at once)", dropped, maxDeferredLines)
	}
}
