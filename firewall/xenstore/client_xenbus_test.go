package xenstore_test

import (
	"errors"
	"fmt"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/xenstore"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/xenstore/xenstoretest"
)

// These tests run the client through a model of the Linux guest's
// /dev/xen/xenbus, which deadlocks, as the kernel does, when a WATCH is
// written behind an undelivered reply on the same fd.

// watchdog bounds the wait for a workload; it only turns a hang into a
// failure and says nothing about speed.
const watchdog = 60 * time.Second

func newXenbus(t *testing.T) (*xenstoretest.FakeServer, *xenstoretest.Xenbus, *xenstore.Client) {
	t.Helper()
	s := xenstoretest.NewFakeServer(7)
	x := xenstoretest.NewXenbus(s)
	c := x.Client()
	t.Cleanup(func() {
		c.Close()
		x.Close()
		s.Close()
	})
	return s, x, c
}

// finish waits for the workload wg to end. If the device deadlocks first
// (or the watchdog fires), it closes the device so that the stuck calls
// fail, waits for them, and fails the test.
func finish(t *testing.T, x *xenstoretest.Xenbus, wg *sync.WaitGroup) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	deadline := time.After(watchdog)
	for {
		select {
		case <-done:
			return
		case <-tick.C:
			if !x.Deadlocked() {
				continue
			}
			x.Close()
			<-done
			t.Fatalf("the xenbus device deadlocked (stats %+v): a WATCH was written behind an undelivered reply", x.Stats())
		case <-deadline:
			x.Close()
			<-done
			t.Fatalf("watchdog: workload still running after %v (stats %+v)", watchdog, x.Stats())
		}
	}
}

// errs collects the workload's errors; the first few are reported.
type errs struct {
	mu   sync.Mutex
	list []error
}

func (e *errs) add(err error) {
	e.mu.Lock()
	e.list = append(e.list, err)
	e.mu.Unlock()
}

func (e *errs) report(t *testing.T) {
	t.Helper()
	for i, err := range e.list {
		if i == 5 {
			t.Errorf("... and %d more errors", len(e.list)-i)
			break
		}
		t.Error(err)
	}
}

// awaitEvent reads ch until an event for path arrives.
func awaitEvent(ch <-chan xenstore.Event, path string) error {
	for ev := range ch {
		if ev.Path == path {
			return nil
		}
	}
	return fmt.Errorf("watch closed before the event for %s", path)
}

// Many goroutines share one client through the device: reads, writes,
// directories, watches set and cancelled, transactions (some refused with
// EAGAIN). It all completes, every watch sees its events, and the device
// never has two requests of the client in flight.
func TestClientThroughXenbusConcurrent(t *testing.T) {
	const (
		workers = 4
		rounds  = 25
	)
	s, x, c := newXenbus(t)
	var wg sync.WaitGroup
	var e errs
	var committed sync.Map // tx worker -> increments committed
	for w := range workers {
		wg.Add(3)
		go func() { // plain requests
			defer wg.Done()
			dir := fmt.Sprintf("data/w%d", w)
			for i := range rounds {
				p, v := fmt.Sprintf("%s/k%d", dir, i), strconv.Itoa(i)
				if err := c.Write(p, v); err != nil {
					e.add(err)
					return
				}
				if got, err := c.Read(p); err != nil || got != v {
					e.add(fmt.Errorf("read %s = %q, %v; want %q", p, got, err, v))
				}
				if names, err := c.Directory(dir); err != nil || len(names) != i+1 {
					e.add(fmt.Errorf("directory %s = %q, %v; want %d names", dir, names, err, i+1))
				}
				if _, err := c.Read(dir + "/missing"); !errors.Is(err, xenstore.ENOENT) {
					e.add(fmt.Errorf("read of a missing key: %v", err))
				}
			}
		}()
		go func() { // watches
			defer wg.Done()
			for i := range rounds / 5 {
				p := fmt.Sprintf("watched/w%d", w)
				ch, cancel, err := c.Watch(p, fmt.Sprintf("tok%d.%d", w, i))
				if err != nil {
					e.add(err)
					return
				}
				if err := awaitEvent(ch, p); err != nil { // fired on registration
					e.add(err)
				}
				if err := c.Write(p+"/x", strconv.Itoa(i)); err != nil {
					e.add(err)
				}
				if err := awaitEvent(ch, p+"/x"); err != nil {
					e.add(err)
				}
				cancel()
				for range ch { // closed by cancel
				}
			}
		}()
		go func() { // transactions
			defer wg.Done()
			p := fmt.Sprintf("tx/w%d", w)
			n := 0
			for i := range rounds / 2 {
				if i%4 == 0 {
					s.FailCommits(1)
				}
				err := c.Transaction(func(tx *xenstore.Tx) error {
					v, err := tx.Read(p)
					if errors.Is(err, xenstore.ENOENT) {
						v, err = "0", nil
					}
					if err != nil {
						return err
					}
					k, _ := strconv.Atoi(v)
					return tx.Write(p, strconv.Itoa(k+1))
				})
				if err != nil {
					e.add(fmt.Errorf("transaction %d of %s: %w", i, p, err))
					continue
				}
				n++
			}
			committed.Store(p, n)
		}()
	}
	finish(t, x, &wg)
	e.report(t)
	committed.Range(func(p, n any) bool {
		if v, _ := s.Read(p.(string)); v != strconv.Itoa(n.(int)) {
			t.Errorf("%s = %q after %d committed increments", p, v, n)
		}
		return true
	})
	t.Logf("device %+v, client %+v", x.Stats(), c.Stats())
	if st := x.Stats(); st.Pipelined != 0 || st.Hazards != 0 || st.Requests == 0 {
		t.Errorf("device stats %+v: want requests, none pipelined", st)
	}
	if st := c.Stats(); st.Malformed != 0 {
		t.Errorf("client stats %+v", st)
	}
}

// The firewall's start on Xen: the vif watch, a transaction and a read of
// domid at once on one client, with xenstored slow to answer. This hung
// the guest's xenstore in 3 of 4 boots while the client pipelined.
func TestClientThroughXenbusStartup(t *testing.T) {
	s, x, c := newXenbus(t)
	release := s.HoldReplies()
	defer release()

	var wg sync.WaitGroup
	var e errs
	wg.Add(3)
	go func() {
		defer wg.Done()
		if v, err := c.Read("domid"); err != nil || v != "7" {
			e.add(fmt.Errorf("read domid = %q, %v", v, err))
		}
	}()
	// With the READ's reply held, the calls below queue behind it in the
	// client — or, in a client that pipelines, reach the device (which the
	// model counts) and deadlock it once the replies come.
	waitUntil(func() bool { return x.Stats().Requests >= 1 }, watchdog)
	go func() {
		defer wg.Done()
		err := c.Transaction(func(tx *xenstore.Tx) error {
			if _, err := tx.Read("domid"); err != nil {
				return err
			}
			return tx.Write("data/started", "1")
		})
		if err != nil {
			e.add(err)
		}
	}()
	go func() {
		defer wg.Done()
		ch, cancel, err := c.Watch("backend/vif", "vifs")
		if err != nil {
			e.add(err)
			return
		}
		defer cancel()
		if err := awaitEvent(ch, "backend/vif"); err != nil {
			e.add(err)
			return
		}
		s.Write("backend/vif/3/0/ip", "10.137.0.5")
		if err := awaitEvent(ch, "backend/vif/3/0/ip"); err != nil {
			e.add(err)
		}
	}()
	waitUntil(func() bool { st := x.Stats(); return st.Requests >= 3 || st.Hazards > 0 }, 100*time.Millisecond)
	release()
	finish(t, x, &wg)
	e.report(t)
	if v, _ := s.Read("data/started"); v != "1" {
		t.Errorf("transaction did not commit: data/started = %q", v)
	}
	if st := x.Stats(); st.Pipelined != 0 || st.Hazards != 0 {
		t.Errorf("device stats %+v: want none pipelined", st)
	}
}

// waitUntil polls cond for at most max; it does not fail.
func waitUntil(cond func() bool, max time.Duration) {
	for deadline := time.Now().Add(max); !cond() && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
	}
}
