package main

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/boot"
)

// vifKernelCost is what MemAvailable falls by when one more client's
// netfront connects, beyond the firewall's own buffers: netback's queue
// structure, its two kernel threads and their rings. Netback's 256 grant
// pages per vif no longer come out of RAM (the kernel maps grants into
// unpopulated space, XEN_UNPOPULATED_ALLOC; before, MemTotal fell by
// 1 MiB per client and this was 1.75 MiB). Measured under Xen (make
// bench-xen, the stats line as clients attach to a 32 MiB VM): 0.6 MiB.
//
// The stats line's breakdown later split that: two clients took
// MemAvailable down 1.2 MiB, of which the firewall's RssAnon was 1.0 and
// Slab 0.2, so the kernel's own part is about 0.1 MiB per vif. The rest
// is the margin for the firewall's growth beyond vifRoom.growth: with
// 0.375 MiB here a 32 MiB VM took three clients, and in their second
// burst its RssAnon grew from 2.7 to 5.6 MiB (VmRSS 4.6 MiB above its
// value at the first admission, against 3.3 reserved), leaving 3.2 MiB
// available. Lower this once the firewall's heap is bounded under
// rebalancing.
const vifKernelCost = 3 << 18 // 0.75 MiB

// vifBurst is the headroom every open link needs on top of the floor for
// the packets the kernel queues for it under load: netback's queue toward
// a busy client holds up to about half a MiB of skbs before it drops.
// Without it, three clients of a 32 MiB VM pushing at once ran the kernel
// out of memory ("System is deadlocked on memory") although each had
// been admitted with its resting cost.
const vifBurst = 1 << 19 // 0.5 MiB

// vifSettle is how long after an admission its kernel cost may not yet
// show in MemAvailable: netback allocates when the client's frontend
// connects, after the firewall has opened the vif.
const vifSettle = 20 * time.Second

// errNoRoomForVif is returned for a client vif the VM has no memory for.
var errNoRoomForVif = errors.New("no memory for another client vif")

// vifRoom admits client vifs while the kernel keeps enough memory free
// for them: the links' Budget bounds the firewall's own memory, but a
// 32 MB VM under Xen with four clients ran its kernel out of memory under
// load ("System is deadlocked on memory": there is no process it may
// kill). A refused vif gets no hotplug-status, so the client VM fails to
// start with a network error, as for a Budget refusal.
type vifRoom struct {
	total int64 // the VM's memory (MemTotal)
	// growth is how far the firewall's own resident set may grow under
	// load: its receive slots fill their budget when Budget.Adapt heats
	// busy links (a 32 MiB VM's grew by 2.6 MiB in two bursts, make
	// bench-xen). What it has not grown yet is kept out of what vifs may
	// take.
	growth int64
	memory func() (boot.Memory, error) // bytes
	links  func() int                  // links open now (uplink and clients)
	now    func() time.Time

	mu     sync.Mutex
	rss0   int64       // the firewall's resident set at the first admission
	recent []time.Time // admissions whose cost may not show yet
}

// floor is what MemAvailable must keep after a new vif's cost and every
// link's burst headroom: the kernel's own reserve (its watermarks, a netvm
// change's new netfront).
func (r *vifRoom) floor() int64 { return max(2<<20, r.total/16) }

// admit reports whether another client vif fits, and counts it if so.
func (r *vifRoom) admit(name string) error {
	m, err := r.memory()
	if err != nil {
		return fmt.Errorf("client %s: %w", name, err) // fail closed
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.rss0 == 0 {
		r.rss0 = m.RSS
	}
	reserve := max(0, r.growth-max(0, m.RSS-r.rss0))
	avail := m.Available - reserve
	now := r.now()
	keep := r.recent[:0]
	for _, t := range r.recent {
		if now.Sub(t) < vifSettle {
			keep = append(keep, t)
		}
	}
	r.recent = keep
	links := r.links() + 1 // the new one included
	left := avail - int64(len(r.recent)+1)*vifKernelCost
	keepFree := r.floor() + int64(links)*vifBurst
	if left < keepFree {
		return fmt.Errorf("client %s: %w: %d KiB available (%d KiB less the firewall's own growth still to come), %d client(s) still settling, a vif takes about %d KiB and %d KiB must stay free (%d KiB and %d KiB for each of %d links under load)",
			name, errNoRoomForVif, avail>>10, m.Available>>10, len(r.recent), vifKernelCost>>10, keepFree>>10, r.floor()>>10, vifBurst>>10, links)
	}
	r.recent = append(r.recent, now)
	return nil
}
