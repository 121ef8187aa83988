// Package qubesvm runs the firewall as a Qubes VM: clients are discovered
// through xenstore (backend/vif), QubesDB is reached as dom0's peer (over
// vchan in Qubes), and the uplink is the netfront eth0 — or, in BSD netvm
// mode, the netvm's own vif. The run ends when its context does: dom0's
// shutdown requests reach PID 1 through the guest kernel (see
// firewall/cmd/firewall), not through this package.
//
// Transports are injected, so the same code runs against the in-repo fakes
// over unix sockets in tests: only how the bytes travel differs.
package qubesvm

import (
	"context"
	"fmt"
	"io"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/afpacket"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/boot"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/control"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/dispatch"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/link"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/nat"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/qubesdb"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/vifs"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/xenstore"
)

// Config describes one run.
type Config struct {
	XS      *xenstore.Client
	QubesDB func(context.Context) (io.ReadWriteCloser, error) // dom0 peer connection
	// OpenLink opens a network interface once it exists (waiting for it
	// until ctx ends) and brings it up.
	OpenLink func(ctx context.Context, name string) (link.Link, error)
	// OpenClientLink opens a client's vif the same way; nil: OpenLink.
	// Client links should not wait on a full send queue (a stalled
	// client must not hold up the reader serving the other links).
	OpenClientLink func(ctx context.Context, name string) (link.Link, error)
	Uplink         string // the netfront: "eth0"

	// BSD netvm mode: no netfront; the netvm is the client whose IP is
	// Gateway and our address is IP.
	BSDIP, BSDGateway netip.Addr
	BSDDNS            []netip.Addr

	// Loop, when set, reads every link from one goroutine; Run runs it.
	// nil: a reader goroutine per link.
	Loop *afpacket.Loop
	// Budget, when set, is the links' memory budget; Run has it follow
	// the traffic (Budget.Run).
	Budget *afpacket.Budget

	NATTableSize int
	NATClientMax int // one client's share of the NAT table; 0: half
	StatsEvery   time.Duration
	Logf         func(string, ...any)
}

// Run runs the firewall until ctx ends (nil) or a part it cannot run
// without fails (the error).
func Run(ctx context.Context, cfg Config) error {
	logf := cfg.Logf
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	dcfg := dispatch.Config{Logf: logf, NAT: nat.Config{MaxEntries: cfg.NATTableSize, ClientMax: cfg.NATClientMax}}
	if cfg.Loop != nil {
		dcfg.Loop = cfg.Loop // not a typed nil inside the interface
	}
	d := dispatch.New(dcfg)
	uplink := cfg.Uplink
	if cfg.BSDIP.IsValid() {
		uplink = "" // the uplink is the netvm's vif, attached by discovery
	}
	ctl := control.New(control.Config{
		Dispatcher: d,
		UplinkName: uplink,
		OpenLink: func(name string) (link.Link, error) {
			// The netfront exists or not; control retries every second.
			ctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
			defer cancel()
			return cfg.OpenLink(ctx, name)
		},
		Logf: logf,
	})
	res := ctl.NewResolver()

	var wg sync.WaitGroup
	defer func() {
		cancel() // stop every goroutine before waiting for them
		wg.Wait()
	}()
	att := &attacher{ctx: ctx, d: d, ctl: ctl, cfg: cfg, wg: &wg, logf: logf}
	errc := make(chan error, 3)
	if cfg.Loop != nil {
		wg.Go(func() {
			if err := cfg.Loop.Run(ctx); err != nil && ctx.Err() == nil {
				errc <- fmt.Errorf("link loop: %w", err)
			}
		})
	}
	if cfg.Budget != nil {
		wg.Go(func() { cfg.Budget.Run(ctx) })
	}
	wg.Go(func() { res.Run(ctx) })
	wg.Go(func() { ctl.Run(ctx, time.Second) })
	wg.Go(func() {
		db := qubesdb.NewClient(cfg.QubesDB, qubesdb.Peer, logf)
		if err := db.Run(ctx, qubesdb.NewMirror(ctl.Handle)); err != nil && ctx.Err() == nil {
			errc <- fmt.Errorf("qubesdb: %w", err)
		}
	})
	wg.Go(func() {
		open := cfg.OpenClientLink
		if open == nil {
			open = cfg.OpenLink
		}
		err := vifs.Run(ctx, vifs.Config{XS: cfg.XS, Attacher: att, Links: linksFunc(open), Logf: logf})
		if err != nil && ctx.Err() == nil {
			errc <- fmt.Errorf("client discovery: %w", err)
		}
	})
	if cfg.StatsEvery > 0 {
		wg.Go(func() { ctl.LogStats(ctx, cfg.StatsEvery, boot.MemoryStats) })
	}
	logf("qubesvm: running (uplink %s, bsd %v)", cfg.Uplink, cfg.BSDIP.IsValid())
	select {
	case <-ctx.Done():
		return nil
	case err := <-errc:
		return err
	}
}

// attacher connects vifs' discovered clients to the dispatcher.
type attacher struct {
	ctx  context.Context
	d    *dispatch.Dispatcher
	ctl  *control.Controller
	cfg  Config
	wg   *sync.WaitGroup
	logf func(string, ...any)
}

var _ vifs.Attacher = (*attacher)(nil)

func (a *attacher) AddClient(ip [4]byte, mac [6]byte, l link.Link) (func(), error) {
	p := a.d.Attach(l)
	if err := a.d.AddClient(ip, mac, p); err != nil {
		a.d.Detach(p)
		l.Close()
		return nil, err
	}
	done := make(chan struct{})
	a.wg.Go(func() {
		defer close(done)
		if err := a.d.Serve(a.ctx, p); err != nil && a.ctx.Err() == nil {
			a.logf("qubesvm: client %v on %s: %v", netip.AddrFrom4(ip), l.Name(), err)
		}
	})
	bsdGateway := a.cfg.BSDIP.IsValid() && ip == a.cfg.BSDGateway.As4()
	if bsdGateway {
		a.logf("qubesvm: netvm %v attached on %s: uplink (BSD mode)", netip.AddrFrom4(ip), l.Name())
		a.ctl.SetStaticUplink(&dispatch.Uplink{Port: p, IP: a.cfg.BSDIP.As4(), Gateway: ip}, a.cfg.BSDDNS)
	}
	return func() {
		a.d.RemoveClient(ip)
		a.d.Detach(p)
		l.Close()
		<-done
	}, nil
}

type linksFunc func(ctx context.Context, name string) (link.Link, error)

func (f linksFunc) Open(ctx context.Context, name string) (link.Link, error) { return f(ctx, name) }

// OpenAFPacket returns an OpenLink that waits for the interface to appear
// in /sys/class/net, brings it up with up and opens it with AF_PACKET.
func OpenAFPacket(up func(name string) error, cfg afpacket.Config) func(ctx context.Context, name string) (link.Link, error) {
	return func(ctx context.Context, name string) (link.Link, error) {
		t := time.NewTicker(50 * time.Millisecond)
		defer t.Stop()
		for {
			if _, err := os.Stat("/sys/class/net/" + name); err == nil {
				break
			}
			select {
			case <-ctx.Done():
				return nil, fmt.Errorf("interface %s: %w", name, ctx.Err())
			case <-t.C:
			}
		}
		if err := up(name); err != nil {
			return nil, err
		}
		return afpacket.Open(name, cfg)
	}
}

// StoreAdapter gives package vchan the xenstore access it needs.
type StoreAdapter struct{ XS *xenstore.Client }

func (s StoreAdapter) Read(path string) (string, error) { return s.XS.Read(path) }
func (s StoreAdapter) Write(path, value string) error   { return s.XS.Write(path, value) }
func (s StoreAdapter) Rm(path string) error             { return s.XS.Rm(path) }

// Watch turns xenstore watch events into the bare wake-ups vchan waits on.
func (s StoreAdapter) Watch(ctx context.Context, path string) (<-chan struct{}, error) {
	events, cancel, err := s.XS.Watch(path, "qgfw-vchan-"+path)
	if err != nil {
		return nil, err
	}
	out := make(chan struct{}, 1)
	go func() {
		defer close(out)
		defer cancel()
		for {
			select {
			case <-ctx.Done():
				return
			case _, ok := <-events:
				if !ok {
					return
				}
				select {
				case out <- struct{}{}:
				default: // a wake-up is already pending
				}
			}
		}
	}()
	return out, nil
}
