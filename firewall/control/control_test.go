package control

import (
	"context"
	"errors"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/link/linktest"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/dispatch"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/link"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/qubesdb"
)

type fakeResolver struct {
	mu    sync.Mutex
	names []string
	kicks int
}

func (r *fakeResolver) SetNames(n []string) { r.mu.Lock(); r.names = n; r.mu.Unlock() }
func (r *fakeResolver) Kick()               { r.mu.Lock(); r.kicks++; r.mu.Unlock() }

// links opens in-memory uplinks on demand and remembers the netvm ends.
type links struct {
	mu      sync.Mutex
	present bool
	peers   []*linktest.Pipe
	opened  int
}

func (l *links) open(name string) (link.Link, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.present {
		return nil, errors.New("no such interface")
	}
	a, b := linktest.NewPipe(name, [6]byte{2, 0, 0, 0, 0, 1}, "netvm", [6]byte{2, 0, 0, 0, 0, 2}, 1500)
	l.peers = append(l.peers, b)
	l.opened++
	return a, nil
}

func TestSnapshotRulesAndUplink(t *testing.T) {
	d := dispatch.New(dispatch.Config{Logf: t.Logf})
	res := &fakeResolver{}
	ls := &links{present: true}
	c := New(Config{Dispatcher: d, UplinkName: "eth0", OpenLink: ls.open, Logf: t.Logf})
	c.SetResolver(res)
	c.Handle(qubesdb.Event{Kind: qubesdb.EventSnapshot,
		AllRules: map[string]map[string]string{
			"10.137.0.20": {"policy": "drop", "0000": "action=accept dsthost=b.example", "0001": "action=drop dsthost=a.example"},
			"10.137.0.21": {"policy": "drop", "0000": "action=accept dsthost=a.example"},
		},
		Uplink: qubesdb.Uplink{IP: "10.137.0.5", Gateway: "10.137.0.1", PrimaryDNS: "10.139.1.1", SecondaryDNS: "10.139.1.2"},
	})
	if want := []string{"a.example", "b.example"}; !slices.Equal(res.names, want) {
		t.Errorf("resolver names %v, want %v", res.names, want)
	}
	if want := []netip.Addr{netip.MustParseAddr("10.139.1.1"), netip.MustParseAddr("10.139.1.2")}; !slices.Equal(c.DNS(), want) {
		t.Errorf("DNS %v", c.DNS())
	}
	if ls.opened != 1 {
		t.Fatalf("uplink opened %d times", ls.opened)
	}
	// A DNS-only change keeps the link; a new address reopens it (a new
	// netfront of the same name).
	c.Handle(qubesdb.Event{Kind: qubesdb.EventUplink, Uplink: qubesdb.Uplink{IP: "10.137.0.5", Gateway: "10.137.0.1", PrimaryDNS: "10.139.1.3"}})
	if ls.opened != 1 || res.kicks != 2 {
		t.Fatalf("after DNS change: opened %d, kicks %d", ls.opened, res.kicks)
	}
	c.Handle(qubesdb.Event{Kind: qubesdb.EventUplink, Uplink: qubesdb.Uplink{IP: "10.138.0.7", Gateway: "10.138.0.1", PrimaryDNS: "10.139.1.3"}})
	if ls.opened != 2 {
		t.Fatalf("after netvm change: opened %d", ls.opened)
	}
	// The new uplink announces the new address.
	if f := ls.peers[1].TryRead(); len(f) == 0 {
		t.Fatal("no gratuitous ARP on the new uplink")
	}
	// A client removed from the snapshot loses its rules.
	c.Handle(qubesdb.Event{Kind: qubesdb.EventSnapshot,
		AllRules: map[string]map[string]string{"10.137.0.21": {"policy": "drop"}},
		Uplink:   qubesdb.Uplink{IP: "10.138.0.7", Gateway: "10.138.0.1"},
	})
	if len(res.names) != 0 || len(c.rulesets) != 1 {
		t.Fatalf("after snapshot: names %v, %d rulesets", res.names, len(c.rulesets))
	}
}

func TestUplinkRetriedUntilInterfaceAppears(t *testing.T) {
	d := dispatch.New(dispatch.Config{Logf: t.Logf})
	ls := &links{}
	c := New(Config{Dispatcher: d, UplinkName: "eth0", OpenLink: ls.open, Logf: t.Logf})
	c.Handle(qubesdb.Event{Kind: qubesdb.EventUplink, Uplink: qubesdb.Uplink{IP: "10.137.0.5", Gateway: "10.137.0.1"}})
	if ls.opened != 0 || !c.wantRetry {
		t.Fatal("missing interface not scheduled for retry")
	}
	ls.mu.Lock()
	ls.present = true
	ls.mu.Unlock()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { c.Run(ctx, time.Millisecond); close(done) }()
	deadline := time.After(30 * time.Second)
	for {
		ls.mu.Lock()
		n := ls.opened
		ls.mu.Unlock()
		if n == 1 {
			break
		}
		select {
		case <-deadline:
			t.Fatal("uplink never reopened")
		case <-time.After(time.Millisecond):
		}
	}
	// Netvm removed: the uplink goes down and the link is closed.
	c.Handle(qubesdb.Event{Kind: qubesdb.EventUplink, Uplink: qubesdb.Uplink{}})
	cancel()
	<-done
	if c.port != nil {
		t.Fatal("uplink still open without a netvm")
	}
}

// arpSender lists the sender addresses of the ARP frames among frames: a
// configured uplink announces its address and asks for the gateway.
func arpSender(frames []link.Frame) (ips [][4]byte) {
	for _, f := range frames {
		if len(f.Data) >= 42 && f.Data[12] == 0x08 && f.Data[13] == 0x06 {
			ips = append(ips, [4]byte(f.Data[28:32]))
		}
	}
	return ips
}

// After the uplink's link dies, the interface that comes back under the
// same name may be a new netvm's (a netvm change hot-plugs it): nothing may
// go out with the old address until QubesDB confirms or replaces it. Before,
// the retry reopened it with the stale address at once.
func TestUplinkAfterLinkDeathWaitsForQubesDB(t *testing.T) {
	for _, tc := range []struct {
		name    string
		confirm *qubesdb.Uplink // nil: QubesDB says nothing
		want    [4]byte
	}{
		{"new netvm", &qubesdb.Uplink{IP: "10.138.0.7", Gateway: "10.138.0.1"}, [4]byte{10, 138, 0, 7}},
		{"same settings rewritten", &qubesdb.Uplink{IP: "10.137.0.5", Gateway: "10.137.0.1"}, [4]byte{10, 137, 0, 5}},
		{"no word from QubesDB", nil, [4]byte{10, 137, 0, 5}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := dispatch.New(dispatch.Config{Logf: t.Logf})
			ls := &links{present: true}
			wait := time.Hour
			if tc.confirm == nil {
				wait = 20 * time.Millisecond
			}
			c := New(Config{Dispatcher: d, UplinkName: "eth0", OpenLink: ls.open, ConfirmWait: wait, Logf: t.Logf})
			c.Handle(qubesdb.Event{Kind: qubesdb.EventUplink, Uplink: qubesdb.Uplink{IP: "10.137.0.5", Gateway: "10.137.0.1"}})
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan struct{})
			go func() { c.Run(ctx, time.Millisecond); close(done) }()
			defer func() { cancel(); <-done }()
			// The netvm goes away: its end of the link closes.
			ls.mu.Lock()
			old := ls.peers[0]
			ls.mu.Unlock()
			old.Close()
			waitFor := func(what string, cond func() bool) {
				t.Helper()
				deadline := time.After(30 * time.Second) // a guard against hangs only
				for !cond() {
					select {
					case <-deadline:
						t.Fatalf("gave up waiting for %s", what)
					case <-time.After(time.Millisecond):
					}
				}
			}
			waitFor("the uplink reopened", func() bool { ls.mu.Lock(); defer ls.mu.Unlock(); return ls.opened == 2 })
			ls.mu.Lock()
			peer := ls.peers[1]
			ls.mu.Unlock()
			if tc.confirm != nil {
				// Held: a few ticks pass and nothing is announced.
				time.Sleep(20 * time.Millisecond)
				if got := arpSender(peer.TryRead()); len(got) != 0 {
					t.Fatalf("the reopened uplink sent ARP from %v before QubesDB confirmed", got)
				}
				c.Handle(qubesdb.Event{Kind: qubesdb.EventUplink, Uplink: *tc.confirm})
			}
			// A new address reopens the link once more (see
			// TestSnapshotRulesAndUplink): read every link's netvm end.
			var seen [][4]byte
			waitFor("the uplink configured", func() bool {
				ls.mu.Lock()
				defer ls.mu.Unlock()
				for _, p := range ls.peers[1:] {
					seen = append(seen, arpSender(p.TryRead())...)
				}
				return len(seen) > 0
			})
			for _, ip := range seen {
				if ip != tc.want {
					t.Fatalf("ARP from %v, want only %v", ip, tc.want)
				}
			}
		})
	}
}
