package dns

import (
	"context"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// fakeDNS is an in-memory network of DNS servers behind fake Conns. Replies
// are real DNS wire format, built with dnsmessage. A Conn answers queries
// synchronously inside WriteTo and reports a timeout as soon as its queue is
// empty, so nothing in these tests waits for real time.
type fakeDNS struct {
	mu      sync.Mutex
	servers []netip.Addr
	ttl     uint32
	zone    map[string][]string                                   // name (lower case, no dot) -> A records; absent: NXDOMAIN
	down    map[netip.Addr]bool                                   // servers that never answer
	hook    func(srv netip.Addr, q dnsmessage.Message) []datagram // replaces the zone when set
	log     []string                                              // "server name" per query received
	open    int                                                   // Conns not closed
	ports   map[uint16]bool                                       // ports handed out
}

type datagram struct {
	src  netip.AddrPort
	data []byte
}

var (
	srv1 = netip.MustParseAddr("10.139.1.1")
	srv2 = netip.MustParseAddr("10.139.1.2")
	srv3 = netip.MustParseAddr("10.200.0.1")
)

func newFakeDNS() *fakeDNS {
	return &fakeDNS{
		servers: []netip.Addr{srv1, srv2},
		ttl:     100,
		zone:    map[string][]string{},
		down:    map[netip.Addr]bool{},
		ports:   map[uint16]bool{},
	}
}

func (d *fakeDNS) setServers(s ...netip.Addr) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.servers = s
}

func (d *fakeDNS) set(name string, addrs ...string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if addrs == nil {
		delete(d.zone, name)
		return
	}
	d.zone[name] = addrs
}

func (d *fakeDNS) setDown(s netip.Addr, down bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.down[s] = down
}

// queries returns and clears the query log.
func (d *fakeDNS) queries() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	l := d.log
	d.log = nil
	return l
}

func (d *fakeDNS) listen() (Conn, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.open++
	port := uint16(20000 + len(d.ports))
	d.ports[port] = true
	return &fakeConn{d: d, port: port}, nil
}

type fakeConn struct {
	d      *fakeDNS
	port   uint16
	queue  []datagram
	closed bool
}

func (c *fakeConn) LocalPort() uint16 { return c.port }

func (c *fakeConn) Close() error {
	c.d.mu.Lock()
	defer c.d.mu.Unlock()
	if !c.closed {
		c.closed = true
		c.d.open--
	}
	return nil
}

func (c *fakeConn) WriteTo(b []byte, dst netip.AddrPort) error {
	var q dnsmessage.Message
	if err := q.Unpack(b); err != nil || len(q.Questions) != 1 {
		panic("resolver sent a bad query")
	}
	d := c.d
	d.mu.Lock()
	defer d.mu.Unlock()
	d.log = append(d.log, dst.Addr().String()+" "+q.Questions[0].Name.String())
	if dst.Port() != 53 {
		return nil
	}
	switch {
	case d.hook != nil:
		c.queue = append(c.queue, d.hook(dst.Addr(), q)...)
	case d.down[dst.Addr()]:
	default:
		name := strings.TrimSuffix(strings.ToLower(q.Questions[0].Name.String()), ".")
		addrs, ok := d.zone[name]
		if !ok {
			c.queue = append(c.queue, datagram{dst, pack(answer(q, dnsmessage.RCodeNameError))})
			break
		}
		var rrs []dnsmessage.Resource
		for _, a := range addrs {
			rrs = append(rrs, aRR(q.Questions[0].Name.String(), d.ttl, a))
		}
		c.queue = append(c.queue, datagram{dst, pack(answer(q, dnsmessage.RCodeSuccess, rrs...))})
	}
	return nil
}

func (c *fakeConn) ReadFrom(ctx context.Context, b []byte) (int, netip.AddrPort, error) {
	if err := ctx.Err(); err != nil {
		return 0, netip.AddrPort{}, err
	}
	if len(c.queue) == 0 {
		return 0, netip.AddrPort{}, context.DeadlineExceeded // simulated timeout
	}
	dg := c.queue[0]
	c.queue = c.queue[1:]
	return copy(b, dg.data), dg.src, nil
}

// answer builds the reply to q.
func answer(q dnsmessage.Message, rcode dnsmessage.RCode, rrs ...dnsmessage.Resource) dnsmessage.Message {
	return dnsmessage.Message{
		Header:    dnsmessage.Header{ID: q.ID, Response: true, RecursionAvailable: true, RCode: rcode},
		Questions: q.Questions,
		Answers:   rrs,
	}
}

func pack(m dnsmessage.Message) []byte {
	b, err := m.Pack()
	if err != nil {
		panic(err)
	}
	return b
}

func aRR(name string, ttl uint32, addr string) dnsmessage.Resource {
	return dnsmessage.Resource{
		Header: dnsmessage.ResourceHeader{Name: dnsmessage.MustNewName(name), Class: dnsmessage.ClassINET, TTL: ttl},
		Body:   &dnsmessage.AResource{A: netip.MustParseAddr(addr).As4()},
	}
}

func cnameRR(name string, ttl uint32, target string) dnsmessage.Resource {
	return dnsmessage.Resource{
		Header: dnsmessage.ResourceHeader{Name: dnsmessage.MustNewName(name), Class: dnsmessage.ClassINET, TTL: ttl},
		Body:   &dnsmessage.CNAMEResource{CNAME: dnsmessage.MustNewName(target)},
	}
}

// fakeClock is the resolver's clock in unit tests.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) set(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = t
}

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

// harness is a resolver on a fake network and clock, driven step by step
// through resolveDue.
type harness struct {
	t       testing.TB
	r       *Resolver
	dns     *fakeDNS
	clk     *fakeClock
	changes int
}

func newHarness(t testing.TB, tune func(*Config)) *harness {
	h := &harness{t: t, dns: newFakeDNS(), clk: &fakeClock{t: t0}}
	cfg := Config{
		Servers: func() []netip.Addr {
			h.dns.mu.Lock()
			defer h.dns.mu.Unlock()
			return slices.Clone(h.dns.servers)
		},
		Listen:   h.dns.listen,
		OnChange: func() { h.changes++ },
		Logf:     t.Logf,
		Now:      h.clk.Now,
	}
	if tune != nil {
		tune(&cfg)
	}
	h.r = New(cfg)
	return h
}

// step runs one round at the fake time and returns when the next is due.
func (h *harness) step() time.Time {
	h.t.Helper()
	next := h.r.resolveDue(context.Background())
	if h.dns.open != 0 {
		h.t.Fatalf("%d Conns left open after a round", h.dns.open)
	}
	return next
}

// at sets the fake clock to t0+d and runs one round.
func (h *harness) at(d time.Duration) time.Time {
	h.t.Helper()
	h.clk.set(t0.Add(d))
	return h.step()
}

func (h *harness) want(name string, addrs ...string) {
	h.t.Helper()
	got, ok := h.r.Lookup(name)
	if addrs == nil {
		if ok {
			h.t.Fatalf("Lookup(%q) = %v, true; want unresolved", name, got)
		}
		return
	}
	var want []netip.Addr
	for _, a := range addrs {
		want = append(want, netip.MustParseAddr(a))
	}
	if !ok || !slices.Equal(got, want) {
		h.t.Fatalf("Lookup(%q) = %v, %v; want %v, true", name, got, ok, want)
	}
}

func (h *harness) wantQueries(want ...string) {
	h.t.Helper()
	if got := h.dns.queries(); !slices.Equal(got, want) {
		h.t.Fatalf("queries = %q; want %q", got, want)
	}
}
