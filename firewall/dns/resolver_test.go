package dns

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

func TestResolve(t *testing.T) {
	h := newHarness(t, nil)
	h.dns.set("host.example", "192.0.2.9", "192.0.2.1", "192.0.2.9")
	h.want("host.example") // nothing asked yet
	h.r.SetNames([]string{"Host.Example."})
	h.want("host.example")
	next := h.step()
	h.wantQueries("10.139.1.1 host.example.")
	h.want("host.example", "192.0.2.1", "192.0.2.9") // sorted, duplicates removed
	h.want("HOST.example.", "192.0.2.1", "192.0.2.9")
	h.want("other.example")
	if h.changes != 1 {
		t.Errorf("OnChange called %d times; want 1", h.changes)
	}
	if want := t0.Add(80 * time.Second); !next.Equal(want) {
		t.Errorf("next round at %v; want %v (80%% of the 100 s TTL)", next, want)
	}
	if s := h.r.Stats(); s.Queries != 1 || s.Answers != 1 || s.Ignored != 0 || s.Timeouts != 0 {
		t.Errorf("stats %+v", s)
	}
}

func TestRefreshBeforeExpiry(t *testing.T) {
	h := newHarness(t, nil)
	h.dns.set("a.example", "192.0.2.1")
	h.r.SetNames([]string{"a.example"})
	h.at(0)
	h.wantQueries("10.139.1.1 a.example.")

	h.at(79 * time.Second)
	h.wantQueries() // not due yet
	next := h.at(80 * time.Second)
	h.wantQueries("10.139.1.1 a.example.")
	if want := t0.Add(160 * time.Second); !next.Equal(want) {
		t.Fatalf("next round at %v; want %v", next, want)
	}
	// Past the first answer's TTL and grace: still valid, it was refreshed.
	h.at(106 * time.Second)
	h.want("a.example", "192.0.2.1")
	if h.changes != 1 {
		t.Errorf("OnChange called %d times; want 1 (refresh with the same address)", h.changes)
	}
}

func TestAddressChangeFollowed(t *testing.T) {
	h := newHarness(t, nil)
	h.dns.set("a.example", "192.0.2.1")
	h.r.SetNames([]string{"a.example"})
	h.at(0)
	h.dns.set("a.example", "198.51.100.7")
	h.at(50 * time.Second)
	h.want("a.example", "192.0.2.1") // cached until the refresh
	h.at(80 * time.Second)
	h.want("a.example", "198.51.100.7")
	if h.changes != 2 {
		t.Errorf("OnChange called %d times; want 2", h.changes)
	}
}

func TestExpiryWithoutRefresh(t *testing.T) {
	h := newHarness(t, nil)
	h.dns.set("a.example", "192.0.2.1")
	h.r.SetNames([]string{"a.example"})
	h.at(0)
	h.dns.setDown(srv1, true)
	h.dns.setDown(srv2, true)
	// Follow the resolver's own schedule: it retries with backoff and
	// keeps the address until TTL + grace (100 s + 5 s).
	h.clk.set(t0.Add(80 * time.Second))
	var rounds int
	for {
		next := h.step()
		rounds++
		now := h.clk.Now()
		_, ok := h.r.Lookup("a.example")
		if before := now.Before(t0.Add(105 * time.Second)); ok != before {
			t.Fatalf("at t0+%v: resolved=%v", now.Sub(t0), ok)
		}
		if !ok {
			break
		}
		if !next.After(now) || rounds > 20 {
			t.Fatalf("round %d at t0+%v: next round at t0+%v", rounds, now.Sub(t0), next.Sub(t0))
		}
		h.clk.set(next)
	}
	if rounds < 3 {
		t.Errorf("only %d rounds before expiry; want retries", rounds)
	}
	if h.changes != 2 {
		t.Errorf("OnChange called %d times; want 2 (resolved, expired)", h.changes)
	}
	// A server comes back: resolved again at the next retry.
	h.dns.setDown(srv2, false)
	h.clk.set(h.step())
	h.step()
	h.want("a.example", "192.0.2.1")
}

func TestFailoverOnTimeout(t *testing.T) {
	h := newHarness(t, nil)
	h.dns.set("a.example", "192.0.2.1")
	h.dns.setDown(srv1, true)
	h.r.SetNames([]string{"a.example"})
	h.at(0)
	h.wantQueries("10.139.1.1 a.example.", "10.139.1.2 a.example.")
	h.want("a.example", "192.0.2.1")
	if s := h.r.Stats(); s.Timeouts != 1 || s.Queries != 2 {
		t.Errorf("stats %+v; want 1 timeout, 2 queries", s)
	}
}

func TestFailoverOnServfailAndTruncation(t *testing.T) {
	for _, tc := range []struct {
		name string
		bad  func(q dnsmessage.Message) dnsmessage.Message
	}{
		{"SERVFAIL", func(q dnsmessage.Message) dnsmessage.Message { return answer(q, dnsmessage.RCodeServerFailure) }},
		{"REFUSED", func(q dnsmessage.Message) dnsmessage.Message { return answer(q, dnsmessage.RCodeRefused) }},
		{"TC", func(q dnsmessage.Message) dnsmessage.Message {
			m := answer(q, dnsmessage.RCodeSuccess, aRR("a.example.", 100, "203.0.113.66"))
			m.Truncated = true
			return m
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, nil)
			h.dns.hook = func(srv netip.Addr, q dnsmessage.Message) []datagram {
				if srv == srv1 {
					return []datagram{{netip.AddrPortFrom(srv, 53), pack(tc.bad(q))}}
				}
				return []datagram{{netip.AddrPortFrom(srv, 53), pack(answer(q, dnsmessage.RCodeSuccess, aRR("a.example.", 100, "192.0.2.1")))}}
			}
			h.r.SetNames([]string{"a.example"})
			h.at(0)
			h.wantQueries("10.139.1.1 a.example.", "10.139.1.2 a.example.")
			h.want("a.example", "192.0.2.1")
		})
	}
}

func TestRetriesExhausted(t *testing.T) {
	h := newHarness(t, nil)
	h.dns.set("a.example", "192.0.2.1")
	h.dns.setDown(srv1, true)
	h.dns.setDown(srv2, true)
	h.r.SetNames([]string{"a.example"})
	next := h.at(0)
	// 1 + Retries(2) attempts, rotating through the servers.
	h.wantQueries("10.139.1.1 a.example.", "10.139.1.2 a.example.", "10.139.1.1 a.example.")
	h.want("a.example")
	if s := h.r.Stats(); s.Timeouts != 3 {
		t.Errorf("stats %+v; want 3 timeouts", s)
	}
	// Exponential backoff between failed rounds.
	var delays []time.Duration
	for range 8 {
		now := h.clk.Now()
		delays = append(delays, next.Sub(now))
		h.clk.set(next)
		next = h.step()
	}
	want := []time.Duration{1, 2, 4, 8, 16, 32, 60, 60}
	for i := range want {
		if delays[i] != want[i]*time.Second {
			t.Fatalf("backoff delays %v; want %v seconds", delays, want)
		}
	}
	h.dns.setDown(srv2, false)
	h.clk.set(next)
	h.dns.queries()
	h.step()
	h.want("a.example", "192.0.2.1")
}

func TestServersChangeFollowed(t *testing.T) {
	h := newHarness(t, nil)
	h.dns.set("a.example", "192.0.2.1")
	h.r.SetNames([]string{"a.example"})
	h.at(0)
	h.wantQueries("10.139.1.1 a.example.")
	// netvm change: new DNS servers; the next query goes there.
	h.dns.setServers(srv3)
	h.dns.set("a.example", "192.0.2.2")
	h.at(80 * time.Second)
	h.wantQueries("10.200.0.1 a.example.")
	h.want("a.example", "192.0.2.2")
}

func TestServersChangeBetweenAttempts(t *testing.T) {
	h := newHarness(t, nil)
	h.dns.set("a.example", "192.0.2.1")
	h.dns.hook = func(srv netip.Addr, q dnsmessage.Message) []datagram {
		if srv == srv1 {
			h.dns.servers = []netip.Addr{srv3} // changes while the query is out (lock held by WriteTo)
			return nil
		}
		return []datagram{{netip.AddrPortFrom(srv, 53), pack(answer(q, dnsmessage.RCodeSuccess, aRR("a.example.", 100, "192.0.2.3")))}}
	}
	h.r.SetNames([]string{"a.example"})
	h.at(0)
	h.wantQueries("10.139.1.1 a.example.", "10.200.0.1 a.example.")
	h.want("a.example", "192.0.2.3")
}

func TestNoServers(t *testing.T) {
	h := newHarness(t, nil)
	h.dns.setServers()
	h.r.SetNames([]string{"a.example"})
	if next := h.at(0); !next.Equal(t0.Add(time.Second)) {
		t.Errorf("next round at %v; want a retry after 1 s", next)
	}
	h.wantQueries()
	h.want("a.example")
}

func TestKick(t *testing.T) {
	h := newHarness(t, nil)
	h.dns.set("a.example", "192.0.2.1")
	h.dns.set("b.example", "192.0.2.2")
	h.r.SetNames([]string{"a.example", "b.example"})
	h.at(0)
	h.dns.queries()
	h.at(time.Second)
	h.wantQueries()
	h.r.Kick()
	h.at(time.Second)
	h.wantQueries("10.139.1.1 a.example.", "10.139.1.1 b.example.")
}

func TestSetNames(t *testing.T) {
	h := newHarness(t, nil)
	h.dns.set("a.example", "192.0.2.1")
	h.dns.set("b.example", "192.0.2.2")
	h.dns.set("c.example", "192.0.2.3")
	h.r.SetNames([]string{"a.example", "b.example", "", "x..example"})
	h.at(0)
	h.wantQueries("10.139.1.1 a.example.", "10.139.1.1 b.example.")
	h.r.SetNames([]string{"b.example", "c.example"})
	h.want("a.example") // forgotten at once
	h.want("b.example", "192.0.2.2")
	h.at(time.Second)
	h.wantQueries("10.139.1.1 c.example.") // only the new name
	h.want("c.example", "192.0.2.3")
	h.r.SetNames(nil)
	if next := h.at(2 * time.Second); !next.IsZero() {
		t.Errorf("next round at %v with no names; want none", next)
	}
	h.want("b.example")
}

func TestNXDOMAIN(t *testing.T) {
	h := newHarness(t, nil)
	h.r.SetNames([]string{"gone.example"})
	next := h.at(0)
	h.wantQueries("10.139.1.1 gone.example.") // NXDOMAIN is an answer: no failover
	h.want("gone.example")
	if !next.Equal(t0.Add(30 * time.Second)) {
		t.Errorf("next round at %v; want after NegativeTTL", next)
	}
	if h.changes != 0 {
		t.Errorf("OnChange called %d times; want 0", h.changes)
	}
	h.dns.set("gone.example", "192.0.2.5")
	h.at(30 * time.Second)
	h.want("gone.example", "192.0.2.5")
	// Resolved -> NXDOMAIN: unresolved at once, OnChange called.
	h.dns.set("gone.example")
	h.r.Kick()
	h.at(31 * time.Second)
	h.want("gone.example")
	if h.changes != 2 {
		t.Errorf("OnChange called %d times; want 2", h.changes)
	}
}

func TestNODATAAndCNAME(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.NegativeTTL = time.Hour })
	h.dns.hook = func(srv netip.Addr, q dnsmessage.Message) []datagram {
		var rrs []dnsmessage.Resource
		switch q.Questions[0].Name.String() {
		case "www.example.":
			rrs = []dnsmessage.Resource{
				aRR("evil.example.", 100, "203.0.113.66"), // not in the chain
				cnameRR("www.example.", 300, "CDN.example."),
				aRR("edge.example.", 200, "192.0.2.8"),
				cnameRR("cdn.example.", 40, "edge.example."),
			}
		}
		return []datagram{{netip.AddrPortFrom(srv, 53), pack(answer(q, dnsmessage.RCodeSuccess, rrs...))}}
	}
	h.r.SetNames([]string{"www.example", "nodata.example"})
	h.at(0)
	h.want("www.example", "192.0.2.8")
	h.want("nodata.example")
	h.dns.queries()
	// The refresh is due at 80% of the chain's smallest TTL (40 s).
	h.at(32 * time.Second)
	h.wantQueries("10.139.1.1 www.example.")
}

func TestSpoofedRepliesIgnored(t *testing.T) {
	// Each spoof carries the attacker's address 203.0.113.66 and arrives
	// before the real reply; only the real one may count.
	spoofs := map[string]func(q dnsmessage.Message, srv netip.Addr) datagram{
		"wrong ID": func(q dnsmessage.Message, srv netip.Addr) datagram {
			q.ID++
			return datagram{netip.AddrPortFrom(srv, 53), pack(answer(q, 0, aRR("a.example.", 100, "203.0.113.66")))}
		},
		"wrong source address": func(q dnsmessage.Message, srv netip.Addr) datagram {
			return datagram{netip.AddrPortFrom(srv3, 53), pack(answer(q, 0, aRR("a.example.", 100, "203.0.113.66")))}
		},
		"wrong source port": func(q dnsmessage.Message, srv netip.Addr) datagram {
			return datagram{netip.AddrPortFrom(srv, 5353), pack(answer(q, 0, aRR("a.example.", 100, "203.0.113.66")))}
		},
		"wrong question name": func(q dnsmessage.Message, srv netip.Addr) datagram {
			q.Questions = []dnsmessage.Question{{Name: dnsmessage.MustNewName("b.example."), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET}}
			return datagram{netip.AddrPortFrom(srv, 53), pack(answer(q, 0, aRR("b.example.", 100, "203.0.113.66")))}
		},
		"wrong question type": func(q dnsmessage.Message, srv netip.Addr) datagram {
			q.Questions = slices.Clone(q.Questions)
			q.Questions[0].Type = dnsmessage.TypeAAAA
			return datagram{netip.AddrPortFrom(srv, 53), pack(answer(q, 0, aRR("a.example.", 100, "203.0.113.66")))}
		},
		"wrong class": func(q dnsmessage.Message, srv netip.Addr) datagram {
			q.Questions = slices.Clone(q.Questions)
			q.Questions[0].Class = dnsmessage.ClassCHAOS
			return datagram{netip.AddrPortFrom(srv, 53), pack(answer(q, 0, aRR("a.example.", 100, "203.0.113.66")))}
		},
		"two questions": func(q dnsmessage.Message, srv netip.Addr) datagram {
			q.Questions = append(q.Questions, q.Questions[0])
			return datagram{netip.AddrPortFrom(srv, 53), pack(answer(q, 0, aRR("a.example.", 100, "203.0.113.66")))}
		},
		"QR not set": func(q dnsmessage.Message, srv netip.Addr) datagram {
			m := answer(q, 0, aRR("a.example.", 100, "203.0.113.66"))
			m.Response = false
			return datagram{netip.AddrPortFrom(srv, 53), pack(m)}
		},
		"garbage": func(q dnsmessage.Message, srv netip.Addr) datagram {
			b := pack(answer(q, 0, aRR("a.example.", 100, "203.0.113.66")))
			return datagram{netip.AddrPortFrom(srv, 53), b[:len(b)-3]}
		},
		"too long": func(q dnsmessage.Message, srv netip.Addr) datagram {
			b := pack(answer(q, 0, aRR("a.example.", 100, "203.0.113.66")))
			return datagram{netip.AddrPortFrom(srv, 53), append(b, make([]byte, maxReply)...)}
		},
		"one byte": func(q dnsmessage.Message, srv netip.Addr) datagram {
			return datagram{netip.AddrPortFrom(srv, 53), []byte{0}}
		},
	}
	for name, spoof := range spoofs {
		t.Run(name, func(t *testing.T) {
			for _, real := range []bool{true, false} {
				h := newHarness(t, nil)
				h.dns.hook = func(srv netip.Addr, q dnsmessage.Message) []datagram {
					d := []datagram{spoof(q, srv)}
					if real {
						d = append(d, datagram{netip.AddrPortFrom(srv, 53), pack(answer(q, 0, aRR("a.example.", 100, "192.0.2.1")))})
					}
					return d
				}
				h.r.SetNames([]string{"a.example"})
				h.at(0)
				s := h.r.Stats()
				if real {
					h.want("a.example", "192.0.2.1")
					if s.Ignored != 1 || s.Answers != 1 {
						t.Errorf("stats %+v; want 1 ignored, 1 answer", s)
					}
				} else {
					h.want("a.example")
					if s.Ignored != 3 || s.Answers != 0 || s.Timeouts != 3 {
						t.Errorf("stats %+v; want 3 ignored, 3 timeouts", s)
					}
				}
			}
		})
	}
}

func TestLateReplyToEarlierAttemptAccepted(t *testing.T) {
	h := newHarness(t, nil)
	var first []byte
	h.dns.hook = func(srv netip.Addr, q dnsmessage.Message) []datagram {
		if srv == srv1 { // slow: its reply arrives during the second attempt
			first = pack(answer(q, 0, aRR("a.example.", 100, "192.0.2.1")))
			return nil
		}
		return []datagram{{netip.AddrPortFrom(srv1, 53), first}}
	}
	h.r.SetNames([]string{"a.example"})
	h.at(0)
	h.want("a.example", "192.0.2.1")
}

func TestLookupNoAllocs(t *testing.T) {
	h := newHarness(t, nil)
	h.dns.set("a.example", "192.0.2.1")
	h.r.SetNames([]string{"a.example"})
	h.at(0)
	for _, name := range []string{"a.example", "A.Example.", "missing.example", "MISSING.example"} {
		if n := testing.AllocsPerRun(100, func() { h.r.Lookup(name) }); n != 0 {
			t.Errorf("Lookup(%q) allocates %v times", name, n)
		}
	}
}

func BenchmarkLookup(b *testing.B) {
	h := newHarness(b, func(c *Config) { c.Logf = nil })
	h.dns.set("a.example", "192.0.2.1")
	h.r.SetNames([]string{"a.example"})
	h.r.resolveDue(context.Background())
	b.ReportAllocs()
	for b.Loop() {
		h.r.Lookup("a.example")
	}
}

// TestRun drives the real goroutine (fake network, real clock): SetNames
// wakes it, OnChange reports the result, cancelling stops it.
func TestRun(t *testing.T) {
	d := newFakeDNS()
	d.set("a.example", "192.0.2.1")
	changed := make(chan struct{}, 10)
	r := New(Config{
		Servers:  func() []netip.Addr { return []netip.Addr{srv1} },
		Listen:   d.listen,
		OnChange: func() { changed <- struct{}{} },
		Logf:     t.Logf,
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- r.Run(ctx) }()
	r.SetNames([]string{"a.example"})
	select {
	case <-changed:
	case <-time.After(time.Minute): // failure guard only
		t.Fatal("no OnChange after SetNames")
	}
	if a, ok := r.Lookup("a.example"); !ok || a[0] != netip.MustParseAddr("192.0.2.1") {
		t.Fatalf("Lookup = %v, %v", a, ok)
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Run returned %v; want context.Canceled", err)
	}
}

func TestManyNamesInParallelBatches(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.Logf = nil })
	var names []string
	for i := range 100 {
		n := fmt.Sprintf("n%d.example", i)
		h.dns.set(n, fmt.Sprintf("10.0.%d.1", i))
		names = append(names, n)
	}
	h.r.SetNames(names)
	h.at(0)
	if q := h.dns.queries(); len(q) != 100 {
		t.Fatalf("%d queries; want 100", len(q))
	}
	if len(h.dns.ports) != 4 {
		t.Errorf("%d Conns; want 4 (batches of %d)", len(h.dns.ports), maxBatch)
	}
	for i, n := range names {
		h.want(n, fmt.Sprintf("10.0.%d.1", i))
	}
	if h.changes != 1 {
		t.Errorf("OnChange called %d times; want 1 per round", h.changes)
	}
}

// A name whose answer rotates (round robin, CDN) keeps the addresses it
// had for LookupRecent, so that flows accepted under an earlier answer are
// not cut; Lookup, which new flows use, follows the current answer only.
func TestRecentAddressesKept(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.RecentHold = time.Hour })
	h.dns.set("cdn.example", "192.0.2.1", "192.0.2.2")
	h.r.SetNames([]string{"cdn.example"})
	h.at(0)
	h.dns.set("cdn.example", "192.0.2.2", "192.0.2.3")
	h.at(80 * time.Second)
	h.want("cdn.example", "192.0.2.2", "192.0.2.3")
	wantRecent := func(want ...string) {
		t.Helper()
		got, ok := h.r.LookupRecent("CDN.example.")
		var s []string
		for _, a := range got {
			s = append(s, a.String())
		}
		slices.Sort(s)
		if !ok && len(want) > 0 || !slices.Equal(s, want) {
			t.Fatalf("LookupRecent = %v %v, want %v", s, ok, want)
		}
	}
	wantRecent("192.0.2.1", "192.0.2.2", "192.0.2.3")
	// NXDOMAIN: unresolved for new flows, the addresses stay recent.
	h.dns.set("cdn.example")
	h.at(160 * time.Second)
	h.want("cdn.example")
	wantRecent("192.0.2.1", "192.0.2.2", "192.0.2.3")
	// An address that comes back is current, not recent, and its hold
	// starts again when it goes.
	h.dns.set("cdn.example", "192.0.2.1")
	h.at(200 * time.Second)
	wantRecent("192.0.2.1", "192.0.2.2", "192.0.2.3")
	// After the hold only the current answer is left.
	h.at(160*time.Second + time.Hour + time.Second)
	wantRecent("192.0.2.1")
}
