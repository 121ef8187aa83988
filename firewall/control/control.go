// Package control is the firewall's control plane: it turns QubesDB state
// (rules, uplink addressing, DNS servers) into dispatcher configuration,
// keeps the dsthost resolver's name list current, and manages the uplink
// link's lifecycle across netvm changes.
package control

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/dispatch"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/dns"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/link"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/qubesdb"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/rules"
)

// Resolver is what the controller needs of the dsthost resolver.
type Resolver interface {
	SetNames(names []string)
	Kick()
}

// Config wires a Controller.
type Config struct {
	Dispatcher *dispatch.Dispatcher
	Resolver   Resolver // may be nil: dsthost names never resolve
	// UplinkName is the netvm interface (eth0 in Qubes) and OpenLink opens
	// it; it is reopened whenever it fails or the netvm changes, since a
	// netvm change hot-plugs a new interface of the same name. An empty
	// UplinkName means BSD mode or no uplink link of ours.
	UplinkName string
	OpenLink   func(name string) (link.Link, error)
	// ConfirmWait is how long an uplink that came back after its link
	// died waits for QubesDB to confirm (or replace) its addressing before
	// it sends with the addressing it had (default 5 s). A netvm change
	// hot-plugs the new netvm's interface under the same name, and the old
	// address must not leak to the new netvm; a restarted netvm of the
	// same addressing gets its traffic after the wait.
	ConfirmWait time.Duration
	Logf        func(format string, args ...any)
}

// Controller applies QubesDB events. Its methods are safe for concurrent use.
type Controller struct {
	cfg  Config
	d    *dispatch.Dispatcher
	logf func(string, ...any)

	mu        sync.Mutex
	rulesets  map[[4]byte]*rules.Ruleset // clients with committed rules
	uplink    qubesdb.Uplink             // last settings from QubesDB
	static    *dispatch.Uplink           // BSD mode: fixed uplink
	port      *dispatch.Port             // the open uplink port
	portDone  chan struct{}              // closed when port's reader ends
	dns       []netip.Addr
	wantRetry bool
	// unconfirmed: the uplink's link died; a new link of the same name
	// may be another netvm's, so its addressing waits for QubesDB (or for
	// holdUntil).
	unconfirmed bool
	holdUntil   time.Time
}

// New returns a Controller; call Run to keep the uplink alive.
func New(cfg Config) *Controller {
	if cfg.ConfirmWait <= 0 {
		cfg.ConfirmWait = 5 * time.Second
	}
	c := &Controller{cfg: cfg, d: cfg.Dispatcher, logf: cfg.Logf, rulesets: make(map[[4]byte]*rules.Ruleset)}
	if c.logf == nil {
		c.logf = func(string, ...any) {}
	}
	return c
}

// SetResolver sets the dsthost resolver (it usually needs the controller's
// DNS method, hence not in Config).
func (c *Controller) SetResolver(r Resolver) {
	c.mu.Lock()
	c.cfg.Resolver = r
	c.mu.Unlock()
	c.updateNames()
}

// DNS returns the current DNS servers (for the resolver).
func (c *Controller) DNS() []netip.Addr {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.dns)
}

// Handle applies one QubesDB event; use it as the qubesdb.Mirror's report
// function. It must not be called concurrently with itself.
func (c *Controller) Handle(ev qubesdb.Event) {
	switch ev.Kind {
	case qubesdb.EventSnapshot:
		c.applySnapshot(ev)
	case qubesdb.EventRules:
		c.applyRules(ev.IP, ev.Rules)
		c.updateNames()
	case qubesdb.EventUplink:
		c.applyUplink(ev.Uplink)
	}
}

func (c *Controller) applySnapshot(ev qubesdb.Event) {
	c.mu.Lock()
	var gone [][4]byte
	for ip := range c.rulesets {
		if _, ok := ev.AllRules[netip.AddrFrom4(ip).String()]; !ok {
			gone = append(gone, ip)
		}
	}
	c.mu.Unlock()
	for _, ip := range gone {
		c.applyRules(netip.AddrFrom4(ip).String(), nil)
	}
	for ip, entries := range ev.AllRules {
		c.applyRules(ip, entries)
	}
	c.updateNames()
	c.applyUplink(ev.Uplink)
}

// applyRules parses and installs one client's rules. A ruleset that does
// not parse is installed as deny-all (rules.Parse returns that with the
// error), so the client is cut off, not left with stale rules.
func (c *Controller) applyRules(ipStr string, entries map[string]string) {
	addr, err := netip.ParseAddr(ipStr)
	if err != nil || !addr.Is4() {
		c.logf("control: rules for %q ignored: not an IPv4 address", ipStr)
		return
	}
	ip := addr.As4()
	if entries == nil {
		c.mu.Lock()
		delete(c.rulesets, ip)
		c.mu.Unlock()
		c.d.SetRules(ip, nil)
		c.logf("control: rules of %v removed: deny all", addr)
		return
	}
	rs, err := rules.Parse(entries)
	if err != nil {
		c.logf("control: rules of %v rejected, client denied everything: %v", addr, err)
	} else {
		c.logf("control: rules of %v: %v", addr, rs)
	}
	c.mu.Lock()
	c.rulesets[ip] = rs
	c.mu.Unlock()
	c.d.SetRules(ip, rs)
}

// updateNames gives the resolver the union of every client's dsthost names.
func (c *Controller) updateNames() {
	c.mu.Lock()
	r := c.cfg.Resolver
	if r == nil {
		c.mu.Unlock()
		return
	}
	var names []string
	for _, rs := range c.rulesets {
		names = append(names, rs.Names()...)
	}
	c.mu.Unlock()
	slices.Sort(names)
	r.SetNames(slices.Compact(names))
}

// applyUplink takes new uplink settings: DNS servers at once, addressing
// by (re)configuring the uplink.
func (c *Controller) applyUplink(u qubesdb.Uplink) {
	var dns []netip.Addr
	for _, s := range []string{u.PrimaryDNS, u.SecondaryDNS} {
		if a, err := netip.ParseAddr(s); err == nil && a.Is4() {
			dns = append(dns, a)
		}
	}
	c.mu.Lock()
	changed := c.uplink != u
	moved := c.uplink.IP != u.IP || c.uplink.Gateway != u.Gateway
	c.uplink = u
	// Whatever QubesDB says now is the current netvm's addressing.
	held := c.unconfirmed
	c.unconfirmed, c.holdUntil = false, time.Time{}
	if len(dns) > 0 || c.static == nil {
		// In BSD mode the kernel command line's DNS servers stand
		// unless QubesDB names others.
		c.dns = dns
	}
	dns = c.dns
	c.mu.Unlock()
	c.d.SetDNS(dns)
	if !changed {
		if held {
			c.logf("control: QubesDB confirms the uplink settings")
			c.reconcile(false)
		}
		return
	}
	c.logf("control: uplink settings ip=%q gateway=%q dns=%q,%q", u.IP, u.Gateway, u.PrimaryDNS, u.SecondaryDNS)
	// A new address or gateway means a new netvm: its interface is a new
	// one even if the name is the same.
	c.reconcile(moved)
	c.mu.Lock()
	r := c.cfg.Resolver
	c.mu.Unlock()
	if r != nil {
		r.Kick()
	}
}

// SetStaticUplink configures BSD netvm mode: the uplink is port (the
// netvm's client link) with fixed addresses, and QubesDB addressing is
// ignored.
func (c *Controller) SetStaticUplink(u *dispatch.Uplink, dns []netip.Addr) {
	c.mu.Lock()
	c.static = u
	c.dns = dns
	c.mu.Unlock()
	c.d.SetDNS(dns)
	if err := c.d.SetUplink(u); err != nil {
		c.logf("control: BSD netvm uplink refused: %v", err)
	}
}

// reconcile makes the dispatcher's uplink match the settings: open the
// interface if needed and configure the addresses; with reopen the link is
// closed and opened again (a new netfront of the same name).
func (c *Controller) reconcile(reopen bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.static != nil || c.cfg.UplinkName == "" {
		return
	}
	ip, err1 := netip.ParseAddr(c.uplink.IP)
	gw, err2 := netip.ParseAddr(c.uplink.Gateway)
	if err1 != nil || err2 != nil || !ip.Is4() || !gw.Is4() {
		// No netvm (or broken settings): outbound traffic is dropped.
		c.d.SetUplink(nil)
		c.closePortLocked()
		c.wantRetry = false
		return
	}
	if reopen {
		c.closePortLocked()
	}
	if c.port == nil {
		l, err := c.cfg.OpenLink(c.cfg.UplinkName)
		if err != nil {
			c.d.SetUplink(nil)
			c.logf("control: uplink %s not available yet: %v", c.cfg.UplinkName, err)
			c.wantRetry = true
			return
		}
		c.port = c.d.Attach(l)
		c.portDone = make(chan struct{})
		go c.serveUplink(c.port, c.portDone)
	}
	if c.unconfirmed {
		now := time.Now()
		if c.holdUntil.IsZero() {
			c.holdUntil = now.Add(c.cfg.ConfirmWait)
			c.logf("control: uplink %s is back; nothing goes out until QubesDB confirms its addressing (at most %v)", c.cfg.UplinkName, c.cfg.ConfirmWait)
		}
		if now.Before(c.holdUntil) {
			c.wantRetry = true // Run calls again every tick
			return
		}
		c.logf("control: no new uplink settings within %v: the same netvm is back", c.cfg.ConfirmWait)
		c.unconfirmed, c.holdUntil = false, time.Time{}
	}
	c.wantRetry = false
	up := &dispatch.Uplink{Port: c.port, IP: ip.As4(), Gateway: gw.As4()}
	if m, err := netip.ParseAddr(c.uplink.Netmask); err == nil && m.Is4() {
		up.Netmask = m.As4()
	}
	if err := c.d.SetUplink(up); err != nil {
		// Fail closed: the link stays open but nothing goes out until
		// QubesDB gives usable addressing.
		c.logf("control: QubesDB uplink settings refused, uplink down: %v", err)
	}
}

func (c *Controller) serveUplink(p *dispatch.Port, done chan struct{}) {
	err := c.d.Serve(context.Background(), p)
	close(done)
	if err != nil && !errors.Is(err, link.ErrClosed) {
		c.logf("control: uplink %s failed: %v; reopening", p.Link().Name(), err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.port == p {
		// The link died under us (netvm gone or restarting): forget it
		// and let Run open it again.
		c.d.Detach(p)
		p.Link().Close()
		c.port = nil
		c.wantRetry = true
		c.unconfirmed = true
	}
}

func (c *Controller) closePortLocked() {
	if c.port == nil {
		return
	}
	p, done := c.port, c.portDone
	c.port = nil
	c.d.Detach(p)
	p.Link().Close()
	c.mu.Unlock()
	<-done
	c.mu.Lock()
}

// Run retries opening the uplink every interval while it is wanted but
// missing, and ticks the dispatcher. It returns when ctx is done, closing
// the uplink.
func (c *Controller) Run(ctx context.Context, interval time.Duration) error {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			c.mu.Lock()
			c.closePortLocked()
			c.mu.Unlock()
			return nil
		case <-t.C:
		}
		c.d.Tick()
		c.mu.Lock()
		retry := c.wantRetry
		c.mu.Unlock()
		if retry {
			c.reconcile(false)
		}
	}
}

// Describe summarises the state for logs.
func (c *Controller) Describe() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	up := "down"
	switch {
	case c.static != nil:
		up = fmt.Sprintf("%s ip=%v gw=%v (BSD netvm)", c.static.Port.Link().Name(), netip.AddrFrom4(c.static.IP), netip.AddrFrom4(c.static.Gateway))
	case c.port != nil:
		up = fmt.Sprintf("%s ip=%s gw=%s", c.port.Link().Name(), c.uplink.IP, c.uplink.Gateway)
	}
	return fmt.Sprintf("uplink %s, %d clients with rules, dns %v", up, len(c.rulesets), c.dns)
}

// LogStats logs the dispatcher's counters, the controller's state and
// extra() (e.g. link counters; may be nil) every interval until ctx ends.
func (c *Controller) LogStats(ctx context.Context, every time.Duration, extra func() string) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		s := c.d.Stats()
		line := fmt.Sprintf("firewall: %s; forwarded %d, nat %d, rejects %d, arp replies %d, echo replies %d, drops: %s",
			c.Describe(), s.Forwarded, s.NATEntries, s.Rejects, s.ARPReplies, s.EchoReplies, s.Drops.String())
		if s.ARPIgnored > 0 || s.UplinksRefused > 0 {
			line += fmt.Sprintf("; gateway ARP ignored %d, uplink settings refused %d", s.ARPIgnored, s.UplinksRefused)
		}
		if extra != nil {
			line += "; " + extra()
		}
		c.logf("%s", line)
	}
}

// NewResolver returns the dsthost resolver wired to the controller's
// dispatcher: it asks the controller for the current DNS servers, sends
// through the dispatcher's own UDP sockets (so queries follow the current
// uplink), makes the dispatcher re-check flows when answers change, and is
// installed in both. The caller runs it.
func (c *Controller) NewResolver() *dns.Resolver {
	res := dns.New(dns.Config{
		Servers: c.DNS,
		Listen: func() (dns.Conn, error) {
			conn, err := c.d.ListenUDP()
			if err != nil {
				return nil, err // not a typed nil inside the interface
			}
			return conn, nil
		},
		// No OnChange: a new answer for a dsthost name applies to new
		// flows; existing ones stay while their rule does (rule changes
		// re-check them with the name's recent addresses).
		Logf: c.logf,
	})
	c.d.SetResolver(res)
	c.SetResolver(res)
	return res
}
