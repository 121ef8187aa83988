package main

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/boot"
)

// TestVifRoom: client vifs are admitted while MemAvailable, less what the
// firewall's own memory may still grow by, the cost of the new vif and of
// those whose cost may not show yet, keeps the floor plus burst headroom
// for every link; a failure to read the memory refuses (fail closed).
func TestVifRoom(t *testing.T) {
	const mib = 1 << 20
	const kib = 1 << 10
	now := time.Unix(1000, 0)
	// A 32 MiB VM before its first client (make bench-xen).
	mem := boot.Memory{Available: 8600 * kib, RSS: 3500 * kib}
	links := 1 // the uplink
	var readErr error
	r := &vifRoom{total: 20 * mib, growth: slotBudget(20*mib) * 5 / 4, now: func() time.Time { return now },
		links: func() int { return links }, memory: func() (boot.Memory, error) { return mem, readErr }}
	if f := r.floor(); f != 2*mib {
		t.Fatalf("floor of a 20 MiB VM: %d, want 2 MiB", f)
	}
	// 8.6 MiB less 3.125 the firewall may still take: the first vif
	// leaves 4.725 against 2 + 2 × 0.5; a second in a row (the first not
	// yet visible) 3.975 against 3.5; a third 3.225 against 4: refused.
	for i, want := range []bool{true, true, false} {
		err := r.admit("vif")
		if got := err == nil; got != want {
			t.Fatalf("admission %d: %v, want admitted %v", i+1, err, want)
		}
		if err != nil && (!errors.Is(err, errNoRoomForVif) || !strings.Contains(err.Error(), "5400 KiB available (8600 KiB less the firewall's own growth still to come), 2 client(s) still settling")) {
			t.Fatalf("refusal: %v", err)
		}
		if err == nil {
			links++
		}
	}
	// Once settled their cost shows in MemAvailable instead: the same
	// answer, not a double count forever. The firewall has grown by
	// 0.7 MiB, which it no longer needs kept for it.
	now = now.Add(vifSettle)
	mem = boot.Memory{Available: 7500 * kib, RSS: 4200 * kib}
	if err := r.admit("vif"); err != nil {
		t.Fatalf("7.3 MiB available, nothing settling, three links: %v", err)
	}
	links++
	// After bursts the firewall has taken its growth: MemAvailable says
	// what is left.
	now = now.Add(vifSettle)
	mem = boot.Memory{Available: 5 * mib, RSS: 6500 * kib}
	if err := r.admit("vif"); err == nil {
		t.Fatal("admitted with 5 MiB available and four links: 5 - 0.125 - 0.75 < 2 + 2.5")
	}
	// A client that leaves gives its headroom back.
	links = 2
	if err := r.admit("vif"); err != nil {
		t.Fatalf("two links, 5 MiB available: %v", err)
	}
	// A bigger VM keeps a sixteenth free, and room for its links' growth.
	big := &vifRoom{total: 256 * mib, growth: slotBudget(256*mib) * 5 / 4, now: time.Now, links: func() int { return 10 },
		memory: func() (boot.Memory, error) { return boot.Memory{Available: 60 * mib, RSS: 5 * mib}, nil }}
	if err := big.admit("vif"); err == nil {
		t.Fatal("admitted with 60 MiB of 256 available and 10 links: 60 - 40 - 0.75 < 16 + 5.5")
	}
	readErr = errors.New("no /proc")
	if err := r.admit("vif"); err == nil || !strings.Contains(err.Error(), "no /proc") {
		t.Fatalf("unreadable memory: %v, want a refusal naming the cause", err)
	}
}
