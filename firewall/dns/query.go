package dns

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"golang.org/x/net/dns/dnsmessage"
)

// result is the outcome of resolving one name in a batch.
type result struct {
	done bool // rep holds an answer (addresses, NXDOMAIN or NODATA)
	rep  reply
	err  error // !done: why the last attempt failed
}

// query is a name's state within a batch.
type query struct {
	result
	qname   dnsmessage.Name
	id      uint16 // ID of the query of the current attempt
	waiting bool   // the current attempt still waits for its reply
}

// sent is a query in flight, by ID.
type sent struct {
	idx    int
	server netip.AddrPort
}

// resolveBatch resolves names (at most maxBatch) over one fresh Conn: each
// attempt sends every unanswered name to the next server and reads replies
// until all are answered or Timeout passes. A late reply to an earlier
// attempt is still accepted.
func (r *Resolver) resolveBatch(ctx context.Context, names []string) []result {
	qs := make([]query, len(names))
	// finish returns the results, err standing for any name without one.
	finish := func(err error) []result {
		out := make([]result, len(qs))
		for i := range qs {
			out[i] = qs[i].result
			if !out[i].done && out[i].err == nil {
				out[i].err = err
			}
		}
		return out
	}
	for i, n := range names {
		qn, err := newQName(n)
		if err != nil {
			qs[i].err = fmt.Errorf("query name: %w", err) // never sent: qname.Length == 0
		}
		qs[i].qname = qn
	}
	conn, err := r.cfg.Listen()
	if err != nil {
		return finish(fmt.Errorf("open DNS socket: %w", err))
	}
	defer conn.Close()

	inflight := make(map[uint16]sent)
	buf := make([]byte, maxReply+1)
	var msg []byte
	for attempt := range r.cfg.Retries + 1 {
		servers := r.cfg.Servers()
		if len(servers) == 0 {
			return finish(errors.New("no DNS servers configured"))
		}
		srv := netip.AddrPortFrom(servers[attempt%len(servers)], 53)
		waiting := 0
		for i := range qs {
			q := &qs[i]
			if q.done || q.qname.Length == 0 {
				continue
			}
			q.id = newID(inflight)
			msg, err = buildQuery(msg[:0], q.id, q.qname)
			if err == nil {
				err = conn.WriteTo(msg, srv)
			}
			if err != nil {
				q.err = fmt.Errorf("send query to %v: %w", srv, err)
				continue
			}
			r.queries.Add(1)
			inflight[q.id] = sent{idx: i, server: srv}
			q.waiting = true
			waiting++
		}
		actx, cancel := context.WithTimeout(ctx, r.cfg.Timeout)
		for waiting > 0 {
			n, src, err := conn.ReadFrom(actx, buf)
			if err != nil {
				break // timeout, closed, or ctx ended
			}
			q, ok := r.match(buf[:n], src, inflight, qs)
			if !ok {
				r.ignored.Add(1)
				continue
			}
			r.answers.Add(1)
			if q.waiting && (q.rep.outcome != serverFailed || q.id == binary.BigEndian.Uint16(buf)) {
				q.waiting = false
				waiting--
			}
		}
		cancel()
		if ctx.Err() != nil {
			return finish(ctx.Err())
		}
		for i := range qs {
			if qs[i].waiting {
				qs[i].waiting = false
				qs[i].err = fmt.Errorf("no reply from %v within %v", srv, r.cfg.Timeout)
				r.timeouts.Add(1)
			}
		}
		if !slices.ContainsFunc(qs, func(q query) bool { return !q.done && q.qname.Length != 0 }) {
			break
		}
	}
	return finish(errors.New("no answer"))
}

// match validates datagram b from src against the queries in flight and
// records the answer in its query. ok=false: b answers none of them.
func (r *Resolver) match(b []byte, src netip.AddrPort, inflight map[uint16]sent, qs []query) (*query, bool) {
	if len(b) < 2 {
		return nil, false
	}
	id := binary.BigEndian.Uint16(b)
	s, ok := inflight[id]
	if !ok || netip.AddrPortFrom(src.Addr().Unmap(), src.Port()) != s.server {
		return nil, false
	}
	q := &qs[s.idx]
	rep, err := parseReply(b, id, q.qname)
	if err != nil {
		return nil, false
	}
	delete(inflight, id)
	if q.done {
		return q, true // a late duplicate; the first answer stands
	}
	if rep.outcome == serverFailed {
		what := describe(rep)
		if rep.trunc {
			what = "truncated reply (no TCP fallback)"
		}
		q.rep, q.err = rep, fmt.Errorf("server %v: %s", s.server.Addr(), what)
		return q, true
	}
	q.rep, q.done, q.err = rep, true, nil
	return q, true
}

// newID draws a random query ID not in flight.
func newID(inflight map[uint16]sent) uint16 {
	var b [2]byte
	for {
		rand.Read(b[:]) // never fails (crypto/rand, Go 1.24+)
		id := binary.BigEndian.Uint16(b[:])
		if _, busy := inflight[id]; !busy {
			return id
		}
	}
}
