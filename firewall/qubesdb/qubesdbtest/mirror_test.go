package qubesdbtest

import (
	"testing"
	"time"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/qubesdb"
)

// TestMirrorOverPeer drives a Mirror the way the firewall will: a qubesdb.Peer-mode
// client of a dom0-mode server.
func TestMirrorOverPeer(t *testing.T) {
	s := newTestServer(t, "/qubes-ip", "10.137.0.1")
	events := make(chan qubesdb.Event, 100)
	runClient(t, qubesdb.NewClient(qubesdb.UnixDialer(startPeerServer(t, s)), qubesdb.Peer, t.Logf), qubesdb.NewMirror(func(e qubesdb.Event) { events <- e }))
	next := func() qubesdb.Event {
		t.Helper()
		select {
		case e := <-events:
			return e
		case <-time.After(guard):
			t.Fatal("no event")
			return qubesdb.Event{}
		}
	}
	if e := next(); e.Kind != qubesdb.EventSnapshot || e.Uplink.IP != "10.137.0.1" {
		t.Fatalf("first event %+v", e)
	}
	s.Remove("/qubes-firewall/10.137.0.5/")
	s.Write("/qubes-firewall/10.137.0.5/policy", "drop")
	s.Write("/qubes-firewall/10.137.0.5/0001", "action=accept specialtarget=dns")
	s.Write("/qubes-firewall/10.137.0.5", "")
	if e := next(); e.Kind != qubesdb.EventRules || e.IP != "10.137.0.5" || len(e.Rules) != 2 {
		t.Fatalf("rules event %+v", e)
	}
	s.Write("/qubes-ip", "10.137.0.2")
	if e := next(); e.Kind != qubesdb.EventUplink || e.Uplink.IP != "10.137.0.2" {
		t.Fatalf("uplink event %+v", e)
	}
}
