// Package dispatch is the firewall's forwarding engine: it takes Ethernet
// frames from client links and the uplink, applies anti-spoofing, the Qubes
// rules and NAT, and sends them on. It answers ARP, and ping on its own
// address, and generates ICMP rejects; everything else addressed to the
// firewall is dropped.
//
// Decide, then act: per frame, under its lock, the dispatcher classifies the
// packet into a verdict without changing anything (verdict.go), then
// carries the verdict out: NAT, rewriting the frame in place, queueing it.
// Fragmenting and writing the queued frames happen after the lock is
// released.
package dispatch

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/frag"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/header"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/link"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/nat"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/rules"
)

// FallbackMAC is the gateway MAC used until ARP resolves the real one; it
// is what Qubes gives every backend vif, so it usually works as is.
var FallbackMAC = [6]byte{0xfe, 0xff, 0xff, 0xff, 0xff, 0xff}

// Config tunes a Dispatcher. The zero value works.
type Config struct {
	Logf  func(format string, args ...any) // nil: no logging
	NAT   nat.Config
	Frag  frag.Config
	Clock func() int64 // monotonic nanoseconds; nil: the runtime clock

	// RejectsPerSecond and RejectBurst limit ICMP rejects per client
	// (default 10/s, burst 20).
	RejectsPerSecond, RejectBurst float64
	// EchoRepliesPerSecond and EchoReplyBurst limit the answers to ping
	// of our address, per client and for the uplink side as a whole
	// (default 10/s, burst 20).
	EchoRepliesPerSecond, EchoReplyBurst float64
	// LogBurst bounds per-packet log lines per second (default 20).
	LogBurst int
	// Loop, when set, reads the links for Serve, all from its one
	// goroutine; nil: each Serve reads its link itself.
	Loop Loop
}

// A Loop reads many links from one goroutine (afpacket.Loop). Serve calls
// input with each batch read from l, from the loop's goroutine, until l
// fails or is closed (link.ErrClosed) or ctx is done (its error), and
// returns only when input is no longer called.
type Loop interface {
	Serve(ctx context.Context, l link.Link, input func([]link.Frame)) error
}

// Dispatcher forwards frames between attached links. All methods are safe
// for concurrent use.
type Dispatcher struct {
	logf  func(string, ...any)
	clock func() int64
	cfg   Config

	mu       sync.Mutex
	ports    map[*Port]struct{}
	clients  map[[4]byte]*client
	rulesets map[[4]byte]*rules.Ruleset // by client IP; may precede the client's link
	uplink   *Uplink
	gwMAC    [6]byte
	gwKnown  bool
	arpAsked bool // a who-has for the gateway is unanswered
	arpTries int
	dns      []netip.Addr
	resolver rules.Resolver
	nat      *nat.Table
	local    map[uint16]*UDPConn // our own UDP sockets on the uplink IP
	ipID     uint16
	echoes   tokenBucket // echo replies to the uplink side
	log      logLimiter
	later    deferred // work done after unlocking
	stats    Stats
}

// client is a downstream VM.
type client struct {
	ip      [4]byte
	mac     [6]byte
	port    *Port
	drops   Counters
	rejects tokenBucket
	echoes  tokenBucket // echo replies
}

// Uplink is the link to the netvm and our addresses on it.
//
// In BSD netvm mode (no netfront; the netvm is a client of ours) Port is
// that client's port and Gateway its IP; frames from that port addressed to
// IP are then treated as inbound traffic, whatever their source.
type Uplink struct {
	Port    *Port
	IP      [4]byte // our address: the source of all NATed traffic
	Gateway [4]byte // the netvm
	// Netmask is the netvm's subnet (/qubes-netmask); zero when unknown.
	// Its network and broadcast addresses are never a destination.
	Netmask [4]byte
}

// subnetEdge reports whether dst is the network or the broadcast address
// of the uplink's subnet (none for a /31 or /32, whose addresses are all
// hosts).
func (u *Uplink) subnetEdge(dst [4]byte) bool {
	m := binary.BigEndian.Uint32(u.Netmask[:])
	if m == 0 || ^m <= 1 {
		return false
	}
	ip, a := binary.BigEndian.Uint32(u.IP[:]), binary.BigEndian.Uint32(dst[:])
	return a == ip&m || a == ip|^m
}

// Port is a link attached to the dispatcher. Input must be called from one
// goroutine at a time (the link's reader).
type Port struct {
	d    *Dispatcher
	link link.Link
	mac  [6]byte
	mtu  int

	clients []*client // the clients behind this port (under d.mu)

	// Used only by the goroutine that calls Input, or under d.mu.
	parsed   header.Parsed
	fragMu   sync.Mutex // guards frag: Input reassembles outside d.mu, Tick expires
	frag     *frag.Reassembler
	early    []uint8 // per frame of the batch: what reassembly made of it
	pending  []pending
	cut      bool      // some pending frames are to be fragmented
	spare    []pending // the other half of pending while fragmenting
	arena    []byte    // generated frames of the current batch
	batch    []link.Frame
	fragBufs [][]byte // reused by frag.Fragment
}

type pending struct {
	to    *Port
	frame link.Frame
	// cut: the packet exceeds to's MTU and is fragmented after the lock
	// is released (byte work: copies, perhaps a 64 KiB checksum); c is
	// charged if that fails.
	cut bool
	c   *client
}

// ArenaSize bounds the bytes of frames a port generates per batch (ARP
// replies, ICMP rejects, reassembled datagrams, fragments): the memory a
// port holds beyond its link's buffers, allocated at its first use.
const ArenaSize = 256 << 10

// New returns a Dispatcher with no links.
func New(cfg Config) *Dispatcher {
	if cfg.RejectsPerSecond == 0 {
		cfg.RejectsPerSecond = 10
	}
	if cfg.RejectBurst == 0 {
		cfg.RejectBurst = 20
	}
	if cfg.EchoRepliesPerSecond == 0 {
		cfg.EchoRepliesPerSecond = 10
	}
	if cfg.EchoReplyBurst == 0 {
		cfg.EchoReplyBurst = 20
	}
	if cfg.LogBurst == 0 {
		cfg.LogBurst = 20
	}
	d := &Dispatcher{
		clock:    cfg.Clock,
		cfg:      cfg,
		ports:    make(map[*Port]struct{}),
		clients:  make(map[[4]byte]*client),
		rulesets: make(map[[4]byte]*rules.Ruleset),
		local:    make(map[uint16]*UDPConn),
		nat:      nat.New(cfg.NAT),
		gwMAC:    FallbackMAC,
		echoes:   tokenBucket{perSec: cfg.EchoRepliesPerSecond, burst: cfg.EchoReplyBurst},
	}
	if cfg.Logf == nil {
		cfg.Logf = func(string, ...any) {}
	}
	// Everything the dispatcher logs is logged with d.mu held; the line
	// is kept and written after unlocking (unlock), so a slow console
	// never holds up forwarding.
	d.later.out = cfg.Logf
	d.logf = d.later.logf
	if d.clock == nil {
		start := time.Now()
		d.clock = func() int64 { return int64(time.Since(start)) }
	}
	d.log = logLimiter{logf: d.logf, burst: cfg.LogBurst}
	d.stats.Clients = make(map[[4]byte]Counters)
	return d
}

// Attach makes l known to the dispatcher. Frames read from it are passed to
// the returned port's Input (Serve does both).
func (d *Dispatcher) Attach(l link.Link) *Port {
	p := &Port{d: d, link: l, mac: l.MAC(), mtu: l.MTU(), frag: frag.New(d.cfg.Frag)}
	d.mu.Lock()
	d.ports[p] = struct{}{}
	d.unlock()
	return p
}

// Detach forgets p: its client, if any, is removed and, if it is the
// uplink, the uplink goes down. The caller closes the link.
func (d *Dispatcher) Detach(p *Port) {
	d.mu.Lock()
	defer d.unlock()
	delete(d.ports, p)
	for ip, c := range d.clients {
		if c.port == p {
			d.removeClientLocked(ip)
		}
	}
	if d.uplink != nil && d.uplink.Port == p {
		d.setUplinkLocked(nil)
	}
}

// Link returns the link behind p.
func (p *Port) Link() link.Link { return p.link }

// Serve reads batches from p's link and processes them until the link
// fails or is closed (nil) or ctx is done. With Config.Loop the loop reads
// and Serve waits.
func (d *Dispatcher) Serve(ctx context.Context, p *Port) error {
	if d.cfg.Loop != nil {
		err := d.cfg.Loop.Serve(ctx, p.link, p.Input)
		switch {
		case errors.Is(err, link.ErrClosed):
			return nil
		case err != nil && ctx.Err() == nil:
			return fmt.Errorf("serve %s: %w", p.link.Name(), err)
		}
		return ctx.Err()
	}
	frames := make([]link.Frame, 64)
	for ctx.Err() == nil {
		n, err := p.link.ReadBatch(frames)
		if n > 0 {
			p.Input(frames[:n])
		}
		if err != nil {
			if errors.Is(err, link.ErrClosed) {
				return nil
			}
			return fmt.Errorf("read %s: %w", p.link.Name(), err)
		}
	}
	return ctx.Err()
}

// ErrDuplicateIP is returned by AddClient for an IP that another port holds.
var ErrDuplicateIP = errors.New("client IP already attached on another link")

// AddClient registers the VM with address ip and MAC mac behind port p.
// Until SetRules gives it rules, everything it sends is denied.
func (d *Dispatcher) AddClient(ip [4]byte, mac [6]byte, p *Port) error {
	d.mu.Lock()
	defer d.unlock()
	if c, ok := d.clients[ip]; ok {
		if c.port != p {
			return fmt.Errorf("add client %v on %s: %w (%s)", netip.AddrFrom4(ip), p.link.Name(), ErrDuplicateIP, c.port.link.Name())
		}
		c.mac = mac
		return nil
	}
	c := &client{
		ip: ip, mac: mac, port: p,
		rejects: tokenBucket{perSec: d.cfg.RejectsPerSecond, burst: d.cfg.RejectBurst},
		echoes:  tokenBucket{perSec: d.cfg.EchoRepliesPerSecond, burst: d.cfg.EchoReplyBurst},
	}
	d.clients[ip] = c
	p.clients = append(p.clients, c)
	return nil
}

// RemoveClient forgets the client with address ip and its NAT entries. Its
// rules stay known (dom0 keeps them in QubesDB) until SetRules(ip, nil).
func (d *Dispatcher) RemoveClient(ip [4]byte) {
	d.mu.Lock()
	defer d.unlock()
	d.removeClientLocked(ip)
}

func (d *Dispatcher) removeClientLocked(ip [4]byte) {
	c, ok := d.clients[ip]
	if !ok {
		return
	}
	prev := d.stats.Clients[ip]
	for r, v := range c.drops {
		prev[r] += v
	}
	d.stats.Clients[ip] = prev
	delete(d.clients, ip)
	c.port.clients = slices.DeleteFunc(c.port.clients, func(x *client) bool { return x == c })
	d.nat.FlushClient(ip)
}

// SetRules installs the ruleset of the client with address ip (nil: forget
// it; the client is then denied everything) and cuts the client's existing
// flows that the new rules would not accept.
func (d *Dispatcher) SetRules(ip [4]byte, rs *rules.Ruleset) {
	d.mu.Lock()
	defer d.unlock()
	if rs == nil {
		delete(d.rulesets, ip)
	} else {
		d.rulesets[ip] = rs
	}
	d.recheckFlowsLocked(func(client [4]byte) bool { return client == ip })
}

// recheckFlowsLocked evaluates the current rules again for the NAT entries
// of the clients selected by which and removes those now denied.
//
// Names in dsthost rules match their recent addresses as well
// (rules.Env.Existing): a flow accepted under an earlier answer stays while
// the rule that accepted it stays.
func (d *Dispatcher) recheckFlowsLocked(which func([4]byte) bool) {
	env := d.envLocked()
	env.Existing = true
	d.nat.FlushIf(func(e *nat.Entry) bool {
		ip := e.ClientIP()
		if !which(ip) {
			return false
		}
		return d.rulesLocked(ip).Match(flowPacket(e.ClientTuple()), env).Action != rules.Accept
	})
}

// flowPacket is the rules' view of the first packet of an existing flow.
func flowPacket(t nat.Tuple) rules.Packet {
	p := rules.Packet{Dst: netip.AddrFrom4(t.Dst), Proto: t.Proto, DstPort: t.DstPort}
	if t.Proto == header.ProtoICMP {
		// Only requests create ICMP entries; echo is the one in use.
		p.DstPort, p.ICMPType = 0, header.ICMPEcho
	}
	return p
}

func (d *Dispatcher) rulesLocked(ip [4]byte) *rules.Ruleset {
	if rs, ok := d.rulesets[ip]; ok {
		return rs
	}
	return denyAll
}

var denyAll = rules.DenyAll()

func (d *Dispatcher) envLocked() rules.Env {
	return rules.Env{DNS: d.dns, Resolver: d.resolver}
}

// SetDNS sets the DNS server addresses that specialtarget=dns rules match.
func (d *Dispatcher) SetDNS(servers []netip.Addr) {
	d.mu.Lock()
	defer d.unlock()
	if slices.Equal(d.dns, servers) {
		// Every QubesDB uplink event repeats the servers; re-checking
		// every flow for nothing would scan the whole NAT table.
		return
	}
	d.dns = append([]netip.Addr(nil), servers...)
	d.recheckFlowsLocked(func([4]byte) bool { return true })
}

// SetResolver sets where dsthost rules look names up.
func (d *Dispatcher) SetResolver(r rules.Resolver) {
	d.mu.Lock()
	defer d.unlock()
	d.resolver = r
}

// ErrBadUplink is returned by SetUplink for addressing that cannot be a
// netvm's: the uplink then stays down.
var ErrBadUplink = errors.New("unusable uplink addressing")

// SetUplink connects (or, with nil, disconnects) the netvm. NAT entries
// bound to a previous uplink address are flushed; the gateway's MAC is
// resolved again by ARP, and a gratuitous ARP announces our address.
//
// Addressing from QubesDB is untrusted: an address or gateway that is not
// a unicast host address, that equals the other, or that a client holds
// (the netvm would see client sources) is refused. The uplink goes down,
// the refusal is counted, and SetUplink returns ErrBadUplink: fail closed.
func (d *Dispatcher) SetUplink(u *Uplink) error {
	d.mu.Lock()
	defer d.unlock()
	if u != nil {
		if err := d.checkUplinkLocked(u); err != nil {
			d.stats.UplinksRefused++
			d.setUplinkLocked(nil)
			return err
		}
	}
	d.setUplinkLocked(u)
	return nil
}

func (d *Dispatcher) checkUplinkLocked(u *Uplink) error {
	for _, a := range []struct {
		what string
		ip   [4]byte
	}{{"address", u.IP}, {"gateway", u.Gateway}} {
		ip := netip.AddrFrom4(a.ip)
		// IsGlobalUnicast includes private ranges and excludes 0.0.0.0,
		// broadcast, loopback, link-local and multicast.
		if !ip.IsGlobalUnicast() || a.ip[0] == 0 {
			return fmt.Errorf("uplink %s %v: %w (not a unicast host address)", a.what, ip, ErrBadUplink)
		}
	}
	if inv := ^binary.BigEndian.Uint32(u.Netmask[:]); inv != ^uint32(0) && inv&(inv+1) != 0 {
		return fmt.Errorf("uplink netmask %v: %w (not a prefix)", netip.AddrFrom4(u.Netmask), ErrBadUplink)
	}
	if u.subnetEdge(u.IP) || u.subnetEdge(u.Gateway) {
		return fmt.Errorf("uplink address %v or gateway %v is its subnet's network or broadcast address: %w", netip.AddrFrom4(u.IP), netip.AddrFrom4(u.Gateway), ErrBadUplink)
	}
	if u.IP == u.Gateway {
		return fmt.Errorf("uplink address %v is also the gateway: %w", netip.AddrFrom4(u.IP), ErrBadUplink)
	}
	if _, ok := d.clients[u.IP]; ok {
		return fmt.Errorf("uplink address %v belongs to a client: %w", netip.AddrFrom4(u.IP), ErrBadUplink)
	}
	if c, ok := d.clients[u.Gateway]; ok && c.port != u.Port {
		// Only in BSD mode is the gateway a client, behind the uplink.
		return fmt.Errorf("uplink gateway %v is a client on another link: %w", netip.AddrFrom4(u.Gateway), ErrBadUplink)
	}
	return nil
}

func (d *Dispatcher) setUplinkLocked(u *Uplink) {
	if old := d.uplink; old != nil && (u == nil || old.IP != u.IP) {
		d.nat.FlushUplink(old.IP)
	}
	if u != nil {
		cp := *u
		u = &cp
	}
	d.uplink = u
	d.gwMAC, d.gwKnown, d.arpAsked, d.arpTries = FallbackMAC, false, false, 0
	if u == nil {
		d.logf("dispatch: uplink down")
		return
	}
	d.logf("dispatch: uplink %s ip %v gateway %v", u.Port.link.Name(), netip.AddrFrom4(u.IP), netip.AddrFrom4(u.Gateway))
	if c, ok := d.clients[u.Gateway]; ok && c.port == u.Port {
		// BSD mode: the gateway is our client, its MAC is known.
		d.gwMAC, d.gwKnown = c.mac, true
	}
	d.sendARPLocked(u.Port, header.ARPRequest, u.IP, header.BroadcastMAC, u.IP)
	if !d.gwKnown {
		d.askGatewayLocked(u)
	}
}

// askGatewayLocked sends a who-has for the gateway; only the reply to it
// may set the gateway's MAC (uplinkARP).
func (d *Dispatcher) askGatewayLocked(u *Uplink) {
	d.arpAsked = true
	d.sendARPLocked(u.Port, header.ARPRequest, u.IP, [6]byte{}, u.Gateway)
}

// gatewayRecheck is how many ticks (seconds) pass between checks of a
// known gateway MAC.
const gatewayRecheck = 60

// Tick does periodic work: NAT and fragment expiry, gateway ARP retries.
// Call it about once a second.
func (d *Dispatcher) Tick() {
	now := d.clock()
	d.mu.Lock()
	defer d.unlock()
	d.nat.Expire(now)
	for p := range d.ports {
		p.fragMu.Lock()
		p.frag.Expire(now)
		p.fragMu.Unlock()
	}
	if u := d.uplink; u != nil && u.Port != nil && !d.isBSDGatewayIP(u.Gateway) {
		// Until the gateway answers, keep asking, backing off to every
		// 8th tick after the first few; once it has, ask again every
		// gatewayRecheck ticks, so that a MAC that changed (or a stale
		// one) is corrected.
		d.arpTries++
		if !d.gwKnown && (d.arpTries < 5 || d.arpTries%8 == 0) || d.gwKnown && d.arpTries%gatewayRecheck == 0 {
			d.askGatewayLocked(u)
		}
	}
}

// Stats returns a snapshot of the counters.
func (d *Dispatcher) Stats() Stats {
	d.mu.Lock()
	defer d.unlock()
	s := d.stats
	s.Clients = make(map[[4]byte]Counters, len(d.stats.Clients)+len(d.clients))
	for ip, c := range d.stats.Clients {
		s.Clients[ip] = c
	}
	for ip, c := range d.clients {
		prev := s.Clients[ip]
		for r, v := range c.drops {
			prev[r] += v
		}
		s.Clients[ip] = prev
	}
	s.NATEntries = d.nat.Len()
	return s
}

// NATStats returns the NAT table's counters.
func (d *Dispatcher) NATStats() nat.Stats {
	d.mu.Lock()
	defer d.unlock()
	return d.nat.Stats()
}
