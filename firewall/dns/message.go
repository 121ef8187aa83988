package dns

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"golang.org/x/net/dns/dnsmessage"
)

// Wire limits. Replies are untrusted input: everything about them is bounded.
const (
	// maxReply is the EDNS0 UDP payload size we advertise (RFC 6891): the
	// DNS Flag Day 2020 value, which fits an IPv4 path without fragments.
	// A conforming server never sends more; a longer datagram is ignored
	// (the read buffer is one byte larger to notice it).
	maxReply = 1232
	// maxAnswers is how many answer records are looked at; the rest are
	// skipped. At the minimal 16 bytes per compressed A record a 1232-byte
	// reply holds at most about 75, so this cuts only padding and junk.
	maxAnswers = 64
	// maxChain bounds the CNAME hops followed inside one answer section.
	maxChain = 8
)

// outcome classifies a reply that genuinely answers our query.
type outcome uint8

const (
	// gotAddrs: NOERROR with at least one A record for the name (after CNAMEs).
	gotAddrs outcome = iota
	// noAddrs: NXDOMAIN, or NOERROR without an A record (NODATA).
	noAddrs
	// serverFailed: SERVFAIL, REFUSED, any other RCODE, or TC set. The
	// server did answer, but another server may do better.
	serverFailed
)

// reply is the validated content of an answer to one of our queries.
type reply struct {
	outcome outcome
	rcode   dnsmessage.RCode
	trunc   bool
	addrs   []netip.Addr // gotAddrs only: sorted, without duplicates
	ttl     uint32       // gotAddrs only: seconds, the minimum over the records used
}

// Reasons a datagram is not an answer to the query it claims to answer. The
// caller ignores such a datagram and keeps waiting for the real reply.
var (
	errTooLong   = errors.New("reply longer than the advertised size")
	errID        = errors.New("reply ID does not match")
	errNotReply  = errors.New("QR bit not set")
	errOpcode    = errors.New("opcode is not QUERY")
	errQuestion  = errors.New("question does not match")
	errLongChain = errors.New("CNAME chain too long")
)

// newQName turns a normalised name (lower case, no trailing dot) into the
// query name.
func newQName(name string) (dnsmessage.Name, error) {
	return dnsmessage.NewName(name + ".")
}

// buildQuery packs a recursive A/IN query for qname with the given ID and an
// EDNS0 OPT record advertising maxReply, appending to buf.
func buildQuery(buf []byte, id uint16, qname dnsmessage.Name) ([]byte, error) {
	b := dnsmessage.NewBuilder(buf, dnsmessage.Header{ID: id, RecursionDesired: true})
	b.EnableCompression()
	if err := b.StartQuestions(); err != nil {
		return nil, fmt.Errorf("build query for %v: %w", qname, err)
	}
	if err := b.Question(dnsmessage.Question{Name: qname, Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET}); err != nil {
		return nil, fmt.Errorf("build query for %v: %w", qname, err)
	}
	if err := b.StartAdditionals(); err != nil {
		return nil, fmt.Errorf("build query for %v: %w", qname, err)
	}
	var opt dnsmessage.ResourceHeader
	if err := opt.SetEDNS0(maxReply, dnsmessage.RCodeSuccess, false); err != nil {
		return nil, fmt.Errorf("build query for %v: %w", qname, err)
	}
	if err := b.OPTResource(opt, dnsmessage.OPTResource{}); err != nil {
		return nil, fmt.Errorf("build query for %v: %w", qname, err)
	}
	msg, err := b.Finish()
	if err != nil {
		return nil, fmt.Errorf("build query for %v: %w", qname, err)
	}
	return msg, nil
}

// record is an A or CNAME record of the answer section.
type record struct {
	owner  dnsmessage.Name
	cname  bool
	target dnsmessage.Name // cname
	addr   netip.Addr      // A
	ttl    uint32
}

// parseReply validates b as the reply to the A/IN query (id, qname) and
// extracts its addresses. The source address and port are the caller's to
// check. An error means b does not answer that query (spoofed, stale or
// malformed) and must be ignored; a genuine answer that is of no use (TC,
// SERVFAIL) is a reply with outcome serverFailed.
func parseReply(b []byte, id uint16, qname dnsmessage.Name) (reply, error) {
	if len(b) > maxReply {
		return reply{}, errTooLong
	}
	var p dnsmessage.Parser
	h, err := p.Start(b)
	if err != nil {
		return reply{}, fmt.Errorf("parse header: %w", err)
	}
	switch {
	case h.ID != id:
		return reply{}, errID
	case !h.Response:
		return reply{}, errNotReply
	case h.OpCode != 0:
		return reply{}, errOpcode
	}
	q, err := p.Question()
	if err != nil {
		return reply{}, fmt.Errorf("parse question: %w", err)
	}
	if q.Type != dnsmessage.TypeA || q.Class != dnsmessage.ClassINET || !nameEqual(q.Name, qname) {
		return reply{}, errQuestion
	}
	if _, err := p.Question(); !errors.Is(err, dnsmessage.ErrSectionDone) {
		return reply{}, errQuestion // a second question, or garbage
	}
	// From here on the reply answers our question.
	if h.Truncated {
		// No TCP fallback: the firewall has no TCP stack of its own, and an
		// A record set that does not fit 1232 bytes is not a dsthost.
		return reply{outcome: serverFailed, rcode: h.RCode, trunc: true}, nil
	}
	switch h.RCode {
	case dnsmessage.RCodeSuccess:
	case dnsmessage.RCodeNameError:
		return reply{outcome: noAddrs, rcode: h.RCode}, nil
	default:
		return reply{outcome: serverFailed, rcode: h.RCode}, nil
	}
	var recs []record
	for range maxAnswers {
		rh, err := p.AnswerHeader()
		if errors.Is(err, dnsmessage.ErrSectionDone) {
			break
		}
		if err != nil {
			return reply{}, fmt.Errorf("parse answer: %w", err)
		}
		rec := record{owner: rh.Name, ttl: rh.TTL}
		switch {
		case rh.Class == dnsmessage.ClassINET && rh.Type == dnsmessage.TypeA:
			a, err := p.AResource()
			if err != nil {
				return reply{}, fmt.Errorf("parse A record: %w", err)
			}
			rec.addr = netip.AddrFrom4(a.A)
		case rh.Class == dnsmessage.ClassINET && rh.Type == dnsmessage.TypeCNAME:
			c, err := p.CNAMEResource()
			if err != nil {
				return reply{}, fmt.Errorf("parse CNAME record: %w", err)
			}
			rec.cname, rec.target = true, c.CNAME
		default:
			if err := p.SkipAnswer(); err != nil {
				return reply{}, fmt.Errorf("skip answer: %w", err)
			}
			continue
		}
		recs = append(recs, rec)
	}
	return follow(recs, qname)
}

// follow collects the A records of qname, following CNAMEs (bounded). Records
// owned by names outside the chain are ignored.
func follow(recs []record, qname dnsmessage.Name) (reply, error) {
	target, ttl := qname, ^uint32(0)
	for hop := 0; ; hop++ {
		var addrs []netip.Addr
		minTTL := ttl
		for _, r := range recs {
			if !r.cname && nameEqual(r.owner, target) {
				addrs = append(addrs, r.addr)
				minTTL = min(minTTL, r.ttl)
			}
		}
		if len(addrs) > 0 {
			slices.SortFunc(addrs, netip.Addr.Compare)
			return reply{outcome: gotAddrs, addrs: slices.Compact(addrs), ttl: minTTL}, nil
		}
		i := slices.IndexFunc(recs, func(r record) bool { return r.cname && nameEqual(r.owner, target) })
		if i < 0 {
			return reply{outcome: noAddrs}, nil // NODATA, or a chain that ends without an address
		}
		if hop == maxChain {
			return reply{}, errLongChain
		}
		target, ttl = recs[i].target, min(ttl, recs[i].ttl)
	}
}

// nameEqual compares DNS names case-insensitively in ASCII only (RFC 4343),
// not with Unicode folding.
func nameEqual(a, b dnsmessage.Name) bool {
	if a.Length != b.Length {
		return false
	}
	for i := range int(a.Length) {
		if lower(a.Data[i]) != lower(b.Data[i]) {
			return false
		}
	}
	return true
}

func lower(c byte) byte {
	if 'A' <= c && c <= 'Z' {
		return c + 'a' - 'A'
	}
	return c
}
