package afpacket

import (
	"context"
	"encoding/binary"
	"errors"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/link"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/link/linktest"
)

// loopTopo is namespace fw with interfaces f0 and f1, joined to p0 and p1
// in namespace peer; a Loop runs until the test ends.
type loopTopo struct {
	fw, peer string
	lp       *Loop
	cancel   context.CancelFunc
	runErr   chan error
}

func newLoopTopo(t *testing.T) *loopTopo {
	needRoot(t)
	lt := &loopTopo{fw: newNetns(t, "fw"), peer: newNetns(t, "peer"), runErr: make(chan error, 1)}
	veth(t, lt.fw, "f0", macString(macF0), lt.peer, "p0", macString(macP0))
	veth(t, lt.fw, "f1", "02:00:00:00:01:f1", lt.peer, "p1", "02:00:00:00:01:01")
	lp, err := NewLoop()
	if err != nil {
		t.Fatal(err)
	}
	lt.lp = lp
	ctx, cancel := context.WithCancel(context.Background())
	lt.cancel = cancel
	go func() { lt.runErr <- lp.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-lt.runErr
	})
	return lt
}

// recorder keeps, per input call, which link it was for and how many test
// frames it got.
type recorder struct {
	mu    sync.Mutex
	calls []string
	count map[string]int
	more  chan struct{} // a signal per call
}

func newRecorder() *recorder {
	return &recorder{count: map[string]int{}, more: make(chan struct{}, 1<<16)}
}

func (r *recorder) input(name string) func([]link.Frame) {
	return func(frames []link.Frame) {
		n := 0
		for _, f := range frames {
			if binary.BigEndian.Uint16(f.Data[12:]) == testEtherType {
				n++
			}
		}
		r.mu.Lock()
		r.calls = append(r.calls, name)
		r.count[name] += n
		r.mu.Unlock()
		r.more <- struct{}{}
	}
}

// waitCount waits until name got want frames; 10 s without progress fail
// the test (a hang guard, not a timing assertion).
func (r *recorder) waitCount(t *testing.T, name string, want int) {
	t.Helper()
	for {
		r.mu.Lock()
		got := r.count[name]
		r.mu.Unlock()
		if got >= want {
			return
		}
		select {
		case <-r.more:
		case <-time.After(10 * time.Second):
			t.Fatalf("%s: %d of %d frames after 10 s", name, got, want)
		}
	}
}

// sendFrames sends n test frames from the peer's interface ifname.
func sendFrames(t *testing.T, peer, ifname string, dst [6]byte, n int, tag byte) {
	t.Helper()
	fd, ifindex := rawSocket(t, peer, ifname)
	for i := range n {
		b := testFrame(dst, [6]byte{2, 0, 0, 0, 0, tag}, 60, tag, i)
		if err := unix.Sendto(fd, b, 0, &unix.SockaddrLinklayer{Ifindex: ifindex, Protocol: htons(testEtherType)}); err != nil {
			t.Fatal(err)
		}
	}
}

// serve runs lp.Serve in a goroutine; its result arrives on the channel.
func serve(ctx context.Context, lp *Loop, l *Link, input func([]link.Frame)) chan error {
	c := make(chan error, 1)
	go func() { c <- lp.Serve(ctx, l, input) }()
	return c
}

func waitErr(t *testing.T, what string, c chan error) error {
	t.Helper()
	select {
	case err := <-c:
		return err
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: Serve did not return within 10 s", what)
		return nil
	}
}

// TestLoopFair: one goroutine serves two links, each batch to its own
// input; a link with a deep queue does not hold up the other, which is
// served right after the busy link's first turn.
func TestLoopFair(t *testing.T) {
	lt := newLoopTopo(t)
	// Big socket queues so that every frame queued before the loop
	// reads is still there.
	busy := openIn(t, lt.fw, "f0", Config{BatchSize: 16, SocketBuffer: 4 << 20})
	quiet := openIn(t, lt.fw, "f1", Config{BatchSize: 16, SocketBuffer: 4 << 20})
	sendFrames(t, lt.peer, "p0", macF0, 400, 'B')
	sendFrames(t, lt.peer, "p1", [6]byte{2, 0, 0, 0, 1, 0xf1}, 10, 'Q')

	rec := newRecorder()
	errs := serveBoth(t, lt, rec, busy, "busy", quiet, "quiet")
	rec.waitCount(t, "busy", 400)
	rec.waitCount(t, "quiet", 10)

	rec.mu.Lock()
	calls := append([]string(nil), rec.calls...)
	rec.mu.Unlock()
	first := -1
	for i, c := range calls {
		if c == "quiet" {
			first = i
			break
		}
	}
	t.Logf("%d input calls; the quiet link's first is call %d", len(calls), first)
	// The gated first call may be either link's; after the busy link's
	// first turn at the latest the quiet one has been served.
	if first < 0 || first > turnBatches {
		t.Errorf("quiet link first served at call %d of %v: starved by the busy one", first, calls)
	}
	if len(calls) < 400/16 {
		t.Errorf("%d calls for 400 frames in batches of at most 16", len(calls))
	}

	closeServed(t, errs, busy, quiet)
	waitMembers(t, lt.lp, 0)
}

// serveBoth serves a and b on lt's loop, each batch recorded under its
// name, and returns once both are members. Only then may the loop's first
// input go on (it waits), so that the links' queues are read as the test
// filled them, not one before the other was served.
func serveBoth(t *testing.T, lt *loopTopo, rec *recorder, a *Link, aName string, b *Link, bName string) []chan error {
	t.Helper()
	var gate sync.WaitGroup
	gate.Add(1)
	gated := func(in func([]link.Frame)) func([]link.Frame) {
		return func(f []link.Frame) { gate.Wait(); in(f) }
	}
	ctx := context.Background()
	errs := []chan error{serve(ctx, lt.lp, a, gated(rec.input(aName))), serve(ctx, lt.lp, b, gated(rec.input(bName)))}
	waitMembers(t, lt.lp, 2)
	gate.Done()
	return errs
}

// closeServed closes the links and checks that each Serve (errs, in the
// same order) ended with link.ErrClosed.
func closeServed(t *testing.T, errs []chan error, links ...*Link) {
	t.Helper()
	for _, l := range links {
		l.Close()
	}
	for _, c := range errs {
		if err := waitErr(t, "after Close", c); !errors.Is(err, link.ErrClosed) {
			t.Errorf("Serve after Close = %v, want link.ErrClosed", err)
		}
	}
}

// TestLoopTurns: two links with deep queues take turns of turnBatches
// batches each: a turn reads a link again while it has frames (more than
// one batch in a row), and never more than turnBatches while the other
// link waits.
func TestLoopTurns(t *testing.T) {
	lt := newLoopTopo(t)
	a := openIn(t, lt.fw, "f0", Config{BatchSize: 16, SocketBuffer: 4 << 20})
	b := openIn(t, lt.fw, "f1", Config{BatchSize: 16, SocketBuffer: 4 << 20})
	const each = 16 * 4 * turnBatches // four full turns per link
	sendFrames(t, lt.peer, "p0", macF0, each, 'A')
	sendFrames(t, lt.peer, "p1", [6]byte{2, 0, 0, 0, 1, 0xf1}, each, 'B')

	rec := newRecorder()
	errs := serveBoth(t, lt, rec, a, "a", b, "b")
	rec.waitCount(t, "a", each)
	rec.waitCount(t, "b", each)

	rec.mu.Lock()
	calls := append([]string(nil), rec.calls...)
	rec.mu.Unlock()
	// Runs of calls for one link, up to the first link to run dry: the
	// last run may be longer, as the other link has nothing left.
	var runs []int
	seen := map[string]int{}
	for i, c := range calls {
		seen[c]++
		if i > 0 && c == calls[i-1] {
			runs[len(runs)-1]++
		} else {
			runs = append(runs, 1)
		}
		if seen[c] == each/16 {
			break
		}
	}
	t.Logf("%d input calls; runs per link while both had frames: %v", len(calls), runs)
	// The first run may be two turns: the gated first round can have
	// seen one link only, and that link can come first in the next.
	if len(runs) < 3 {
		t.Fatalf("the links did not alternate: runs %v", runs)
	}
	longest := 0
	for _, r := range runs[1 : len(runs)-1] {
		longest = max(longest, r)
	}
	if longest > turnBatches {
		t.Errorf("a link had %d batches in a row while the other waited, want at most %d: %v", longest, turnBatches, runs)
	}
	if longest < 2 {
		t.Errorf("no turn read a link twice while it had frames: %v", runs)
	}
	closeServed(t, errs, a, b)
}

// waitMembers waits until the loop has n members (a hang guard).
func waitMembers(t *testing.T, lp *Loop, n int) {
	t.Helper()
	for i := 0; len(*lp.members.Load()) != n; i++ {
		if i == 1000 {
			t.Fatalf("loop has %d members, want %d", len(*lp.members.Load()), n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestLoopServeContext: a Serve whose context ends returns its error and
// its input is not called again, while the loop goes on serving others.
func TestLoopServeContext(t *testing.T) {
	lt := newLoopTopo(t)
	a := openIn(t, lt.fw, "f0", Config{})
	b := openIn(t, lt.fw, "f1", Config{})
	rec := newRecorder()
	ctx, cancel := context.WithCancel(context.Background())
	ea := serve(ctx, lt.lp, a, rec.input("a"))
	eb := serve(context.Background(), lt.lp, b, rec.input("b"))
	waitMembers(t, lt.lp, 2)
	sendFrames(t, lt.peer, "p0", macF0, 5, 'A')
	rec.waitCount(t, "a", 5)
	cancel()
	if err := waitErr(t, "after cancel", ea); !errors.Is(err, context.Canceled) {
		t.Fatalf("Serve after cancel = %v, want context.Canceled", err)
	}
	sendFrames(t, lt.peer, "p0", macF0, 5, 'A')
	sendFrames(t, lt.peer, "p1", [6]byte{2, 0, 0, 0, 1, 0xf1}, 5, 'B')
	rec.waitCount(t, "b", 5)
	rec.mu.Lock()
	got := rec.count["a"]
	rec.mu.Unlock()
	if got != 5 {
		t.Errorf("link a: %d frames after its Serve returned, want none", got-5)
	}
	// The link itself is still usable: a new Serve takes it up again.
	ea = serve(context.Background(), lt.lp, a, rec.input("a"))
	rec.waitCount(t, "a", 10)

	lt.cancel() // the loop stops: every Serve returns
	for _, c := range []chan error{ea, eb} {
		if err := waitErr(t, "after the loop's end", c); !errors.Is(err, ErrLoopStopped) {
			t.Errorf("Serve after Run's end = %v, want ErrLoopStopped", err)
		}
	}
	if err := <-lt.runErr; !errors.Is(err, context.Canceled) {
		t.Errorf("Run = %v, want context.Canceled", err)
	}
	lt.runErr <- nil // for the cleanup
	if err := lt.lp.Serve(context.Background(), a, rec.input("a")); !errors.Is(err, ErrLoopStopped) {
		t.Errorf("Serve on a stopped loop = %v, want ErrLoopStopped", err)
	}
}

// TestLoopNotAFPacket: a link that is not a socket is refused, not read.
func TestLoopNotAFPacket(t *testing.T) {
	lp, err := NewLoop()
	if err != nil {
		t.Fatal(err)
	}
	a, _ := linktest.NewPipe("a", macF0, "b", macP0, 1500)
	if err := lp.Serve(context.Background(), a, func([]link.Frame) {}); err == nil {
		t.Fatal("Serve of a pipe link succeeded")
	}
}

// TestLoopBudgetShrinksIdleLink: when a new link joins the budget, an idle
// link served by the loop gives slots back at once, without a frame to
// wake it, as a blocked ReadBatch does.
func TestLoopBudgetShrinksIdleLink(t *testing.T) {
	lt := newLoopTopo(t)
	b := NewBudget(8*(vnetHdrLen+2048), 1<<20, 0)
	a := openIn(t, lt.fw, "f0", Config{BatchSize: 8, FrameSize: 2048, Budget: b, Reserved: true})
	if got := a.rxHave.Load(); got != 8 {
		t.Fatalf("alone, the link has %d slots, want 8", got)
	}
	ea := serve(context.Background(), lt.lp, a, func([]link.Frame) {})
	waitMembers(t, lt.lp, 1)
	openIn(t, lt.fw, "f1", Config{BatchSize: 8, FrameSize: 2048, Budget: b})
	for i := 0; a.rxHave.Load() != a.rxWant.Load(); i++ {
		if i == 1000 {
			t.Fatalf("idle link still has %d slots, its share is %d", a.rxHave.Load(), a.rxWant.Load())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if a.rxHave.Load() >= 8 {
		t.Errorf("share after a second link joined: %d slots, want fewer than 8", a.rxHave.Load())
	}
	a.Close()
	if err := waitErr(t, "after Close", ea); !errors.Is(err, link.ErrClosed) {
		t.Errorf("Serve = %v, want link.ErrClosed", err)
	}
}

// TestLoopNoAllocs: serving batches allocates nothing in the loop (the
// whole process's allocations are counted, so other goroutines are
// quiet meanwhile).
func TestLoopNoAllocs(t *testing.T) {
	lt := newLoopTopo(t)
	a := openIn(t, lt.fw, "f0", Config{BatchSize: 16, SocketBuffer: 4 << 20})
	var got atomic.Int64
	ea := serve(context.Background(), lt.lp, a, func(frames []link.Frame) { got.Add(int64(len(frames))) })
	waitMembers(t, lt.lp, 1)
	fd, ifindex := rawSocket(t, lt.peer, "p0")
	frame := testFrame(macF0, macP0, 60, 'N', 0)
	sa := &unix.SockaddrLinklayer{Ifindex: ifindex, Protocol: htons(testEtherType)}
	sendAndWait := func(n int) {
		want := got.Load() + int64(n)
		for range n {
			if err := unix.Sendto(fd, frame, 0, sa); err != nil {
				t.Fatal(err)
			}
		}
		// Polled with Sleep, which allocates nothing (a timer channel
		// per wait would be counted).
		for i := 0; got.Load() < want; i++ {
			if i == 10000 {
				t.Fatalf("%d of %d frames served after 10 s", got.Load(), want)
			}
			time.Sleep(time.Millisecond)
		}
	}
	sendAndWait(100) // warm up
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	sendAndWait(2000)
	runtime.ReadMemStats(&after)
	// Neither Sendto nor the loop allocate per frame or per batch; the
	// margin is for the runtime's own rare allocations.
	perFrame := float64(after.Mallocs-before.Mallocs) / 2000
	t.Logf("%.3f allocations per frame sent and served", perFrame)
	if perFrame > 0.02 {
		t.Errorf("%.2f allocations per frame: the loop allocates", perFrame)
	}
	a.Close()
	waitErr(t, "after Close", ea)
}
