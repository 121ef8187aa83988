package afpacket

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/link"
)

// TestBudget: links that share a Budget divide it by weight as they open
// and close; a reader blocked in ReadBatch gives back slots at once; the
// socket queues follow; frames still flow after a resize.
func TestBudget(t *testing.T) {
	fw, peer := newNetns(t, "fw"), newNetns(t, "peer")
	needRoot(t)
	const slot = vnetHdrLen + link.MaxFrame
	// 32 slots of budget, 4 of them paid as per-link overhead by two
	// links; 4 MiB of queues.
	b := NewBudget(34*slot, 4<<20, slot)
	open := func(i, weight int) *Link {
		f, p := fmt.Sprintf("f%d", i), fmt.Sprintf("p%d", i)
		veth(t, fw, f, fmt.Sprintf("02:00:00:00:01:%02x", i), peer, p, fmt.Sprintf("02:00:00:00:02:%02x", i))
		return openIn(t, fw, f, Config{Budget: b, Weight: weight})
	}
	want := func(l *Link, batch, sockbuf int) {
		t.Helper()
		s := b.Shares()[l.name]
		if s.Batch != batch || s.SocketBuffer != sockbuf {
			t.Fatalf("%s: share %+v, want batch %d socket buffer %d (%v)", l.name, s, batch, sockbuf, b)
		}
		var got int
		l.rc.Control(func(fd uintptr) { got, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF) })
		if got != 2*sockbuf {
			t.Fatalf("%s: SO_RCVBUF %d, want %d", l.name, got, 2*sockbuf)
		}
	}
	up := open(0, 3)
	want(up, 16, maxSocketBuffer/4) // alone: BatchSize caps it; 4 MiB / 4
	blocked := make(chan error, 1)
	go func() {
		_, err := up.ReadBatch(make([]link.Frame, 64))
		blocked <- err
	}()
	c1 := open(1, 1)
	// weights 3+1: 32 slots after overhead -> 24 and 8; the uplink can
	// use only 16 (BatchSize), the rest goes to c1, which can use 16
	want(up, 16, 3*(4<<20)/4/4)
	want(c1, 16, (4<<20)/4/4)
	c2, c3 := open(2, 1), open(3, 1)
	// 34-4 = 30 slots over weight 6: 15 and 5; queues 4 MiB/6/4 each unit
	want(up, 15, 3*(4<<20)/6/4)
	want(c2, 5, (4<<20)/6/4)
	// The blocked reader shrank without a frame arriving.
	deadline := time.Now().Add(10 * time.Second) // a hang guard, not a timing assertion
	for up.rxHave.Load() != 15 {
		if time.Now().After(deadline) {
			t.Fatalf("the blocked reader still has %d slots, want 15", up.rxHave.Load())
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Frames flow through the resized link: one wakes the blocked
	// reader, whose batch must be done before the next read (one reader
	// per link), then a burst larger than the new batch.
	fd, ifindex := rawSocket(t, peer, "p0")
	send := func(i int) {
		fr := testFrame(up.MAC(), [6]byte{2, 0, 0, 0, 2, 0}, 100, 'B', i)
		if err := unix.Sendto(fd, fr, 0, &unix.SockaddrLinklayer{Ifindex: ifindex, Protocol: htons(testEtherType)}); err != nil {
			t.Fatal(err)
		}
	}
	send(0)
	if err := <-blocked; err != nil {
		t.Fatal(err)
	}
	for i := range 40 {
		send(1 + i)
	}
	got := readTestFrames(t, up, 40)
	if got[39].Data[15] != 40 {
		t.Fatalf("last frame %d, want 40", got[39].Data[15])
	}
	// A tiny budget still leaves each link minBatch slots and
	// minSocketBuffer; closing links gives their part back.
	c3.Close()
	c2.Close()
	want(up, 16, 3*(4<<20)/4/4)
	want(c1, 16, (4<<20)/4/4)
	small := NewBudget(admitSlots*slot, 0, slot)
	openIn(t, fw, "f1", Config{Budget: small, Reserved: true})
	if s := small.Shares()["f1"]; s.Batch != minBatch || s.SocketBuffer != minSocketBuffer {
		t.Fatalf("share of a tiny budget %+v, want the floors", s)
	}
	// No room for a second link: refused, not squeezed below the floor
	// (a reserved one is always let in).
	err := inNetns(fw, func() error {
		l, err := Open("f2", Config{Budget: small})
		if err == nil {
			l.Close()
		}
		return err
	})
	if !errors.Is(err, ErrBudget) {
		t.Fatalf("a link beyond the budget: %v, want ErrBudget", err)
	}
	if len(small.Shares()) != 1 {
		t.Fatalf("the refused link is in the budget: %v", small.Shares())
	}
}

// TestBudgetAdapt: a link whose reads fill its batch gains slots from the
// idle ones, within the budget and above their floor, and gives them back
// once it is quiet again.
func TestBudgetAdapt(t *testing.T) {
	fw, peer := newNetns(t, "fw"), newNetns(t, "peer")
	needRoot(t)
	const slot = vnetHdrLen + link.MaxFrame
	b := NewBudget(24*slot, 4<<20, 0)
	var links []*Link
	for i := range 3 {
		f, p := fmt.Sprintf("f%d", i), fmt.Sprintf("p%d", i)
		veth(t, fw, f, fmt.Sprintf("02:00:00:00:01:%02x", i), peer, p, fmt.Sprintf("02:00:00:00:02:%02x", i))
		links = append(links, openIn(t, fw, f, Config{Budget: b, BatchSize: 16}))
	}
	busy := links[0]
	batches := func() (got []int, total int) {
		for _, l := range links {
			n := b.Shares()[l.name].Batch
			got = append(got, n)
			total += n
		}
		return got, total
	}
	if got, _ := batches(); got[0] != 8 || got[1] != 8 || got[2] != 8 {
		t.Fatalf("equal weights: batches %v, want 8 each", got)
	}
	// A real full read: more frames queued than the link has slots.
	fd, ifindex := rawSocket(t, peer, "p0")
	for i := range 20 {
		fr := testFrame(busy.MAC(), [6]byte{2, 0, 0, 0, 2, 0}, 100, 'A', i)
		if err := unix.Sendto(fd, fr, 0, &unix.SockaddrLinklayer{Ifindex: ifindex, Protocol: htons(testEtherType)}); err != nil {
			t.Fatal(err)
		}
	}
	readTestFrames(t, busy, 8)
	if n := busy.fullReads.Load(); n == 0 {
		t.Fatal("a read that filled the batch was not counted")
	}
	b.Adapt()
	prev := 8
	for round := 0; ; round++ {
		got, total := batches()
		t.Logf("busy round %d: batches %v", round, got)
		if total > 24 || got[1] < minBatch || got[2] < minBatch {
			t.Fatalf("batches %v: over the budget of 24 or below the floor", got)
		}
		if got[0] < prev {
			t.Fatalf("the busy link's share fell: %v", got)
		}
		if got[0] == prev && round > 0 {
			break // at maxHeat
		}
		if round == 10 {
			t.Fatalf("no steady share after 10 rounds: %v", got)
		}
		prev = got[0]
		busy.fullReads.Add(1) // as its reads keep filling the batch
		b.Adapt()
	}
	// The busy link is capped at its BatchSize; what it cannot use stays
	// with the others.
	if got, _ := batches(); got[0] != 16 || got[1] != 4 || got[2] != 4 {
		t.Fatalf("busy link: batches %v, want 16 (its BatchSize) and 4 each for the others", got)
	}
	for range 5 { // quiet again: halved each round, back to its weight
		b.Adapt()
	}
	if got, _ := batches(); got[0] != 8 || got[1] != 8 || got[2] != 8 {
		t.Fatalf("after the traffic stopped: batches %v, want 8 each", got)
	}
}
