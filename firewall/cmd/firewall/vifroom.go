package main

import (
	"errors"
	"fmt"
	"sync"
	"time"
)

// vifKernelCost is what the VM's kernel takes for one more client vif once
// the client's netfront connects, beyond the firewall's own buffers:
// netback maps the client's grants into 256 pages it takes out of the VM's
// RAM (gnttab_alloc_pages; the image has no balloon driver and no
// unpopulated-memory allocator), plus its queue structure, two kernel
// threads and the packets its queues hold under load. Measured under Xen
// (make bench-xen, the firewall's stats line as clients attach to a 32 MiB
// VM): MemTotal falls by 1 MiB per client (those pages), MemAvailable by
// 1.65 MiB (the firewall's own share of 0.4 MiB included).
const vifKernelCost = 7 << 18 // 1.75 MiB

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
	total     int64                 // the VM's memory (MemTotal)
	available func() (int64, error) // MemAvailable in bytes
	now       func() time.Time

	mu     sync.Mutex
	recent []time.Time // admissions whose cost may not show yet
}

// floor is what MemAvailable must keep after a new vif's cost: the
// kernel's reserve for bursts (socket and netback queues, a netvm change's
// new netfront).
func (r *vifRoom) floor() int64 { return max(4<<20, r.total/8) }

// admit reports whether another client vif fits, and counts it if so.
func (r *vifRoom) admit(name string) error {
	avail, err := r.available()
	if err != nil {
		return fmt.Errorf("client %s: %w", name, err) // fail closed
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	now := r.now()
	keep := r.recent[:0]
	for _, t := range r.recent {
		if now.Sub(t) < vifSettle {
			keep = append(keep, t)
		}
	}
	r.recent = keep
	left := avail - int64(len(r.recent)+1)*vifKernelCost
	if left < r.floor() {
		return fmt.Errorf("client %s: %w: %d KiB available, %d client(s) still settling, a vif takes about %d KiB and %d KiB must stay free",
			name, errNoRoomForVif, avail>>10, len(r.recent), vifKernelCost>>10, r.floor()>>10)
	}
	r.recent = append(r.recent, now)
	return nil
}
