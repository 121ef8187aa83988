// Package dns is the firewall's own DNS client for dsthost rules. It resolves
// the names the rules mention (A records only: the firewall forwards IPv4)
// through the current uplink and DNS servers, keeps each answer for its TTL
// and re-resolves it before it runs out, and serves the results to the packet
// path without locks or allocation.
//
// Semantics (fail closed, DESIGN §4):
//   - Until a name resolves, Lookup says ok=false: an accept dsthost rule
//     matches nothing, a drop dsthost rule drops what reaches it.
//   - A successful answer is kept until its TTL (clamped to [MinTTL, MaxTTL])
//     plus Grace runs out without a successful refresh; the name is
//     re-queried at 80% of the TTL, so a reachable server refreshes it in
//     time and a change of address is followed within one TTL.
//   - NXDOMAIN, or NOERROR without an A record (NODATA), makes the name
//     unresolved at once (not "resolved to no address") and it is asked
//     again after NegativeTTL. The Linux agent (qubes-core-agent-linux
//     qubesagent/firewall.py) resolves dsthost with getaddrinfo when rules
//     load and treats any failure to resolve, NXDOMAIN and no-address
//     included, as a rule error that blocks all of that client's traffic.
//     An empty address set would instead turn a drop dsthost rule into a
//     no-op and let later accept rules pass traffic the agent would block;
//     "unresolved" keeps the drop rule dropping. (The agent's whole-client
//     deny-all is stricter still; our rules package decides per rule.)
//   - Timeouts, SERVFAIL/REFUSED and truncated replies count as failures:
//     the next attempt goes to the next server; after 1+Retries attempts the
//     name keeps what it had (until it expires) and is retried with
//     exponential backoff.
//
// Spoofing (Kaminsky-style): each batch of at most maxBatch queries gets a
// fresh Conn, i.e. a fresh random source port reserved by the dispatcher,
// and every query a fresh random 16-bit ID from crypto/rand, so an off-path
// attacker must guess about 32 bits per query. A fresh port per query would
// add nothing against an off-path attacker (the port is already fresh for
// every batch) and cost a NAT port reservation per name. A reply is accepted
// only from the queried server's port 53 (the Conn only delivers datagrams
// addressed to its own port), with a matching ID, the QR bit, opcode QUERY
// and the same single question (name case-insensitively, A, IN); anything
// else is ignored and counted, and the resolver keeps waiting for the real
// reply until the timeout.
package dns

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/dns/dnsmessage"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/rules"
)

// Conn is a UDP socket of the firewall's own on the uplink; the dispatcher's
// *dispatch.UDPConn implements it.
type Conn interface {
	// WriteTo sends b to dst from the current uplink address and LocalPort.
	WriteTo(b []byte, dst netip.AddrPort) error
	// ReadFrom waits for a datagram addressed to LocalPort.
	ReadFrom(ctx context.Context, b []byte) (n int, src netip.AddrPort, err error)
	LocalPort() uint16
	Close() error
}

// Config configures a Resolver. Servers and Listen are required; zero
// durations take the defaults named below.
type Config struct {
	// Servers returns the current DNS servers (/qubes-primary-dns,
	// /qubes-secondary-dns). It is asked before every attempt, so the
	// next query after a netvm change goes to the new servers.
	Servers func() []netip.Addr
	// Listen opens a Conn with a fresh random port; one per batch.
	Listen func() (Conn, error)
	// OnChange is called from Run, without locks held, after any name's
	// address set changed (resolved, changed, expired, NXDOMAIN), so the
	// dispatcher can re-check its flows against the rules.
	OnChange func()
	// RecentHold is how long an address a name no longer resolves to
	// still counts for flows that exist (LookupRecent; default 24 h, well
	// beyond the NAT table's idle timeouts).
	RecentHold time.Duration
	Logf       func(format string, args ...any)
	Now        func() time.Time // default time.Now; tests drive a fake clock

	MinTTL      time.Duration // TTLs below are raised to this (default 5 s)
	MaxTTL      time.Duration // TTLs above are cut to this (default 1 h)
	NegativeTTL time.Duration // NXDOMAIN/NODATA asked again after this (default 30 s)
	// Grace is how long an answer outlives its TTL while refreshing
	// fails (default 5 s). Expiry is applied between rounds, so a round
	// still waiting for servers may add up to (1+Retries)·Timeout.
	Grace   time.Duration
	Timeout time.Duration // wait per attempt (default 2 s)
	Retries int           // extra attempts after the first, rotating through the servers (default 2; negative: none)
}

// Defaults and bounds.
const (
	defaultMinTTL      = 5 * time.Second
	defaultMaxTTL      = time.Hour
	defaultNegativeTTL = 30 * time.Second
	defaultGrace       = 5 * time.Second
	defaultTimeout     = 2 * time.Second
	defaultRetries     = 2
	defaultRecentHold  = 24 * time.Hour
	// maxBackoff caps the wait between failed rounds for one name.
	maxBackoff = time.Minute
	// maxBatch bounds the queries in flight on one Conn: the dispatcher
	// queues at most 64 datagrams per Conn, and late replies to a previous
	// attempt may still arrive.
	maxBatch = 32
	// maxNames bounds the names (and so the cache); the rest stay
	// unresolved, i.e. fail closed.
	maxNames = 1024
	// maxNameLen is the longest name in text form without the trailing dot.
	maxNameLen = 253
)

// refreshNum/refreshDen is the fraction of the TTL after which a name is
// asked again: 80% leaves 20% of the TTL plus Grace for retries.
const refreshNum, refreshDen = 8, 10

// Stats counts what the resolver did; for logs.
type Stats struct {
	Queries  uint64 // queries sent
	Answers  uint64 // replies accepted as answers to a query
	Ignored  uint64 // datagrams ignored: wrong source, ID or question, malformed, too long
	Timeouts uint64 // queries that got no reply within Timeout
}

// Resolver resolves dsthost names; see the package comment.
type Resolver struct {
	cfg    Config
	snap   atomic.Pointer[map[string][]netip.Addr] // resolved names only; immutable
	recent atomic.Pointer[map[string][]netip.Addr] // current and recent addresses; immutable
	wake   chan struct{}

	mu    sync.Mutex
	names map[string]*entry

	queries, answers, ignored, timeouts atomic.Uint64
}

// entry is the state of one name, guarded by Resolver.mu.
type entry struct {
	addrs    []netip.Addr // nil while unresolved; never mutated once published
	recent   []recentAddr // earlier addresses not in addrs, oldest first
	expires  time.Time    // addrs != nil: when they stop being valid
	next     time.Time    // when to query next; zero: now
	fails    int          // consecutive failed rounds
	negative bool         // the last answer was NXDOMAIN/NODATA (to log changes only)
}

// recentAddr is an address a name had, kept until until.
type recentAddr struct {
	addr  netip.Addr
	until time.Time
}

// maxRecent bounds the remembered addresses per name.
const maxRecent = 64

// remember keeps the addresses of old that are not in e.addrs as recent
// until now+hold.
func (e *entry) remember(old []netip.Addr, now time.Time, hold time.Duration) {
	for _, a := range old {
		if slices.Contains(e.addrs, a) {
			continue
		}
		e.recent = slices.DeleteFunc(e.recent, func(r recentAddr) bool { return r.addr == a })
		e.recent = append(e.recent, recentAddr{a, now.Add(hold)})
	}
	// Addresses current again are not "recent".
	e.recent = slices.DeleteFunc(e.recent, func(r recentAddr) bool { return slices.Contains(e.addrs, r.addr) })
	if n := len(e.recent) - maxRecent; n > 0 {
		e.recent = slices.Delete(e.recent, 0, n)
	}
}

// prune forgets recent addresses whose time is up and reports whether any
// went.
func (e *entry) prune(now time.Time) bool {
	n := len(e.recent)
	e.recent = slices.DeleteFunc(e.recent, func(r recentAddr) bool { return !now.Before(r.until) })
	return len(e.recent) != n
}

var _ rules.RecentResolver = (*Resolver)(nil)

// New returns a resolver with no names. Start Run in a goroutine.
func New(cfg Config) *Resolver {
	if cfg.Servers == nil || cfg.Listen == nil {
		panic("dns.New: Config.Servers and Config.Listen are required")
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&cfg.MinTTL, defaultMinTTL)
	def(&cfg.MaxTTL, defaultMaxTTL)
	def(&cfg.NegativeTTL, defaultNegativeTTL)
	def(&cfg.Grace, defaultGrace)
	def(&cfg.Timeout, defaultTimeout)
	cfg.MaxTTL = max(cfg.MaxTTL, cfg.MinTTL)
	switch {
	case cfg.Retries == 0:
		cfg.Retries = defaultRetries
	case cfg.Retries < 0:
		cfg.Retries = 0
	}
	if cfg.OnChange == nil {
		cfg.OnChange = func() {}
	}
	if cfg.Logf == nil {
		cfg.Logf = func(string, ...any) {}
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	r := &Resolver{cfg: cfg, wake: make(chan struct{}, 1), names: make(map[string]*entry)}
	r.snap.Store(&map[string][]netip.Addr{})
	r.recent.Store(&map[string][]netip.Addr{})
	if r.cfg.RecentHold <= 0 {
		r.cfg.RecentHold = defaultRecentHold
	}
	return r
}

// Lookup returns the current addresses of name (any case, with or without
// the trailing dot) and ok=true, or ok=false while it is unresolved. It
// does not lock, block or allocate; the slice must not be modified.
func (r *Resolver) Lookup(name string) ([]netip.Addr, bool) {
	return lookupIn(*r.snap.Load(), name)
}

// LookupRecent returns the current addresses of name with those it had
// within RecentHold, and ok=false if it has neither.
func (r *Resolver) LookupRecent(name string) ([]netip.Addr, bool) {
	return lookupIn(*r.recent.Load(), name)
}

func lookupIn(m map[string][]netip.Addr, name string) ([]netip.Addr, bool) {
	if a, ok := m[name]; ok {
		return a, true
	}
	// Slow path for names not in normal form; the string conversion in
	// the map index does not allocate.
	var buf [maxNameLen + 1]byte
	n := strings.TrimSuffix(name, ".")
	if len(n) > maxNameLen {
		return nil, false
	}
	for i := range len(n) {
		buf[i] = lower(n[i])
	}
	a, ok := m[string(buf[:len(n)])]
	return a, ok
}

// SetNames sets the names to resolve: the union of every client's dsthost
// names. New names are queried right away; dropped names are forgotten at
// once. Invalid names are logged and stay unresolved.
func (r *Resolver) SetNames(names []string) {
	want := make(map[string]bool, len(names))
	for _, name := range names {
		n, err := normalize(name)
		if err != nil {
			r.cfg.Logf("dns: ignoring name %q: %v", name, err)
			continue
		}
		if len(want) == maxNames && !want[n] {
			r.cfg.Logf("dns: more than %d names; %q stays unresolved", maxNames, n)
			continue
		}
		want[n] = true
	}
	r.mu.Lock()
	for n := range r.names {
		if !want[n] {
			delete(r.names, n)
		}
	}
	for n := range want {
		if r.names[n] == nil {
			r.names[n] = &entry{}
		}
	}
	r.publishLocked()
	r.mu.Unlock()
	r.poke()
}

// Kick re-resolves every name now, e.g. after a netvm change. The current
// addresses are kept until they expire or are replaced.
func (r *Resolver) Kick() {
	r.mu.Lock()
	for _, e := range r.names {
		e.next, e.fails = time.Time{}, 0
	}
	r.mu.Unlock()
	r.poke()
}

// Stats returns the counters.
func (r *Resolver) Stats() Stats {
	return Stats{Queries: r.queries.Load(), Answers: r.answers.Load(), Ignored: r.ignored.Load(), Timeouts: r.timeouts.Load()}
}

func (r *Resolver) poke() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// Run is the resolver goroutine: it queries the names that are due, expires
// stale answers and sleeps until the next is due or SetNames/Kick wake it.
// It returns ctx.Err() when ctx ends. Call it once.
func (r *Resolver) Run(ctx context.Context) error {
	t := time.NewTimer(time.Hour)
	defer t.Stop()
	for {
		next := r.resolveDue(ctx)
		if err := ctx.Err(); err != nil {
			return err
		}
		var wait <-chan time.Time
		if !next.IsZero() {
			t.Reset(next.Sub(r.cfg.Now()))
			wait = t.C
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-r.wake:
		case <-wait:
		}
	}
}

// resolveDue runs one round: it queries every name that is due, applies the
// answers, expires stale ones, publishes and notifies. It returns when the
// next round is due (zero: no names).
func (r *Resolver) resolveDue(ctx context.Context) time.Time {
	r.mu.Lock()
	now := r.cfg.Now()
	var due []string
	for n, e := range r.names {
		if !e.next.After(now) {
			due = append(due, n)
		}
	}
	r.mu.Unlock()
	slices.Sort(due) // deterministic batches

	// Batches run in parallel, each on its own Conn, so a round lasts at
	// most (1+Retries)·Timeout however many names there are.
	results := make([]result, len(due))
	var wg sync.WaitGroup
	for start := 0; start < len(due); start += maxBatch {
		end := min(start+maxBatch, len(due))
		wg.Go(func() { copy(results[start:end], r.resolveBatch(ctx, due[start:end])) })
	}
	wg.Wait()
	if ctx.Err() != nil {
		return time.Time{}
	}

	r.mu.Lock()
	now = r.cfg.Now()
	changed := false
	for i, n := range due {
		if e := r.names[n]; e != nil { // else dropped by SetNames meanwhile
			changed = r.apply(n, e, results[i], now) || changed
		}
	}
	var next time.Time
	for n, e := range r.names {
		if e.addrs != nil && !now.Before(e.expires) {
			r.cfg.Logf("dns: %s: addresses %v expired, name unresolved until a server answers", n, e.addrs)
			old := e.addrs
			e.addrs, changed = nil, true
			e.remember(old, now, r.cfg.RecentHold)
		}
		if e.prune(now) {
			changed = true
		}
		next = earliest(next, e.next)
		if e.addrs != nil {
			next = earliest(next, e.expires)
		}
	}
	if changed {
		r.publishLocked()
	}
	r.mu.Unlock()
	if changed {
		r.cfg.OnChange()
	}
	return next
}

func earliest(a, b time.Time) time.Time {
	if a.IsZero() || b.Before(a) {
		return b
	}
	return a
}

// apply updates the entry of name with the result of its query and reports
// whether its address set changed.
func (r *Resolver) apply(name string, e *entry, res result, now time.Time) bool {
	if !res.done {
		e.fails++
		delay := min(time.Second<<min(e.fails-1, 6), maxBackoff)
		e.next = now.Add(delay)
		if e.fails == 1 {
			r.cfg.Logf("dns: %s: %v; retrying with backoff", name, res.err)
		}
		return false
	}
	e.fails = 0
	old := e.addrs
	if res.rep.outcome == noAddrs {
		if !e.negative || old != nil {
			r.cfg.Logf("dns: %s: %s, no IPv4 address; unresolved", name, describe(res.rep))
		}
		e.addrs, e.negative = nil, true
		e.remember(old, now, r.cfg.RecentHold)
		e.next = now.Add(r.cfg.NegativeTTL)
		return old != nil
	}
	ttl := min(max(time.Duration(res.rep.ttl)*time.Second, r.cfg.MinTTL), r.cfg.MaxTTL)
	e.negative = false
	e.expires = now.Add(ttl + r.cfg.Grace)
	e.next = now.Add(ttl * refreshNum / refreshDen)
	if slices.Equal(old, res.rep.addrs) {
		return false // keep the published slice
	}
	r.cfg.Logf("dns: %s: %v (TTL %v)", name, res.rep.addrs, ttl)
	e.addrs = res.rep.addrs
	e.remember(old, now, r.cfg.RecentHold)
	return true
}

func describe(rep reply) string {
	switch rep.rcode {
	case dnsmessage.RCodeSuccess:
		return "NODATA"
	case dnsmessage.RCodeNameError:
		return "NXDOMAIN"
	case dnsmessage.RCodeServerFailure:
		return "SERVFAIL"
	case dnsmessage.RCodeRefused:
		return "REFUSED"
	}
	return fmt.Sprintf("RCODE %d", rep.rcode)
}

// publishLocked replaces the snapshots Lookup and LookupRecent read.
func (r *Resolver) publishLocked() {
	m := make(map[string][]netip.Addr, len(r.names))
	rm := make(map[string][]netip.Addr, len(r.names))
	for n, e := range r.names {
		if e.addrs != nil {
			m[n] = e.addrs
		}
		if len(e.recent) == 0 {
			if e.addrs != nil {
				rm[n] = e.addrs
			}
			continue
		}
		all := slices.Clip(slices.Clone(e.addrs))
		for _, a := range e.recent {
			all = append(all, a.addr)
		}
		rm[n] = all
	}
	r.snap.Store(&m)
	r.recent.Store(&rm)
}

// normalize turns a dsthost into the form names are kept in: lower case,
// without the trailing dot, checked for DNS sizes.
func normalize(name string) (string, error) {
	n := strings.ToLower(strings.TrimSuffix(name, "."))
	if n == "" || len(n) > maxNameLen {
		return "", fmt.Errorf("name must be 1..%d characters", maxNameLen)
	}
	for label := range strings.SplitSeq(n, ".") {
		if label == "" || len(label) > 63 {
			return "", errors.New("labels must be 1..63 characters")
		}
	}
	return n, nil
}
