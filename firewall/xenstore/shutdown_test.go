package xenstore

import (
	"context"
	"fmt"
	"strings"
	"testing"
)

func TestWatchShutdown(t *testing.T) {
	s, c := newFake(t)
	ctx, cancel := context.WithCancel(context.Background())
	logs := make(chan string, 10)
	logf := func(f string, a ...any) { logs <- fmt.Sprintf(f, a...) }
	reqs, err := WatchShutdown(ctx, c, logf)
	if err != nil {
		t.Fatal(err)
	}
	// An unsupported request stays unacknowledged.
	s.Write("control/shutdown", "suspend")
	if l := <-logs; !strings.Contains(l, `"suspend"`) {
		t.Fatalf("log %q, want the unsupported request", l)
	}
	if v, _ := s.Read("control/shutdown"); v != "suspend" {
		t.Fatalf("unsupported request acknowledged: %q", v)
	}
	s.Write("control/shutdown", "reboot")
	if r := <-reqs; r != "reboot" {
		t.Fatalf("request %q, want reboot", r)
	}
	if v, _ := s.Read("control/shutdown"); v != "" {
		t.Fatalf("control/shutdown = %q after acknowledgement, want \"\"", v)
	}
	s.Write("control/shutdown", "poweroff")
	if r := <-reqs; r != "poweroff" {
		t.Fatalf("request %q, want poweroff", r)
	}
	cancel()
	for range reqs {
	}
}

// A request already pending when the watch starts is seen through the
// watch's first event.
func TestWatchShutdownPendingAtStart(t *testing.T) {
	s, c := newFake(t)
	s.Write("control/shutdown", "halt")
	reqs, err := WatchShutdown(context.Background(), c, nil)
	if err != nil {
		t.Fatal(err)
	}
	if r := <-reqs; r != "halt" {
		t.Fatalf("request %q, want halt", r)
	}
	c.Close()
	for range reqs {
	}
}
