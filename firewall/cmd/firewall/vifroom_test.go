package main

import (
	"errors"
	"strings"
	"testing"
	"time"
)

// TestVifRoom: client vifs are admitted while MemAvailable, less the cost
// of the new one and of those whose cost may not show yet, stays above the
// floor; a failure to read the memory refuses (fail closed).
func TestVifRoom(t *testing.T) {
	const mib = 1 << 20
	now := time.Unix(1000, 0)
	avail := int64(8 * mib) // a 32 MiB VM before its first client
	var readErr error
	r := &vifRoom{total: 20 * mib, now: func() time.Time { return now }, available: func() (int64, error) { return avail, readErr }}
	if f := r.floor(); f != 4*mib {
		t.Fatalf("floor of a 20 MiB VM: %d, want 4 MiB", f)
	}
	// 8 MiB: one vif leaves 6.25, two in a row (the first not yet
	// visible) leave 4.5, a third would leave 2.75: refused.
	for i, want := range []bool{true, true, false} {
		err := r.admit("vif")
		if got := err == nil; got != want {
			t.Fatalf("admission %d: %v, want admitted %v", i+1, err, want)
		}
		if err != nil && (!errors.Is(err, errNoRoomForVif) || !strings.Contains(err.Error(), "8192 KiB available, 2 client(s) still settling")) {
			t.Fatalf("refusal: %v", err)
		}
	}
	// Once settled their cost shows in MemAvailable instead: the same
	// answer, not a double count forever.
	now = now.Add(vifSettle)
	avail = 5 * mib
	if err := r.admit("vif"); err == nil {
		t.Fatal("admitted with 5 MiB available: would leave 3.25 MiB, below the 4 MiB floor")
	}
	avail = 6 * mib
	if err := r.admit("vif"); err != nil {
		t.Fatalf("6 MiB available, nothing settling: %v", err)
	}
	// A bigger VM keeps an eighth free.
	big := &vifRoom{total: 256 * mib, now: time.Now, available: func() (int64, error) { return 33 * mib, nil }}
	if err := big.admit("vif"); err == nil {
		t.Fatal("admitted with 33 MiB of 256 available: would leave less than 32 MiB")
	}
	readErr = errors.New("no /proc")
	if err := r.admit("vif"); err == nil || !strings.Contains(err.Error(), "no /proc") {
		t.Fatalf("unreadable memory: %v, want a refusal naming the cause", err)
	}
}
