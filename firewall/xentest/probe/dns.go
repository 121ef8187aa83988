package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strings"

	"golang.org/x/net/dns/dnsmessage"
)

// rcodeNames are the names dig prints, which a test script greps for.
var rcodeNames = []string{"NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED"}

// runDNS sends one query for name (again every second, as a stub resolver
// does) and reports the addresses in the answer.
func runDNS(ctx context.Context, _ *agent, c call) result {
	types := map[string]dnsmessage.Type{"A": dnsmessage.TypeA, "AAAA": dnsmessage.TypeAAAA}
	typ, ok := types[strings.ToUpper(cmp.Or(c.opts["type"], "A"))]
	if !ok {
		return errorf("unsupported type %q", c.opts["type"])
	}
	server, err := netip.ParseAddrPort(c.args[1])
	if a, aerr := netip.ParseAddr(c.args[1]); aerr == nil {
		server, err = netip.AddrPortFrom(a, 53), nil
	}
	if err != nil {
		return errorf("bad server %q", c.args[1])
	}
	qname, err := dnsmessage.NewName(strings.TrimSuffix(c.args[0], ".") + ".")
	if err != nil {
		return errorf("bad name %q: %v", c.args[0], err)
	}
	id := uint16(rand.Uint32())
	q := dnsmessage.Message{
		Header:    dnsmessage.Header{ID: id, RecursionDesired: true},
		Questions: []dnsmessage.Question{{Name: qname, Type: typ, Class: dnsmessage.ClassINET}},
	}
	query, err := q.Pack()
	if err != nil {
		return errorf("pack query: %v", err)
	}
	conn, r := dial(ctx, "udp", server.String())
	if conn == nil {
		return r
	}
	defer conn.Close()
	reply, r := udpExchange(ctx, conn, query, func(b []byte) bool {
		var p dnsmessage.Parser
		h, err := p.Start(b)
		return err == nil && h.ID == id && h.Response // else stale or garbage: wait on
	})
	if reply == nil {
		return r
	}
	return answer(reply, typ)
}

// answer decodes a response udpExchange accepted.
func answer(b []byte, typ dnsmessage.Type) result {
	var p dnsmessage.Parser
	h, err := p.Start(b)
	if err == nil && h.RCode != dnsmessage.RCodeSuccess {
		name := fmt.Sprint(int(h.RCode))
		if int(h.RCode) < len(rcodeNames) {
			name = rcodeNames[h.RCode]
		}
		return result{statusFail, "rcode=" + name}
	}
	if err == nil {
		err = p.SkipAllQuestions()
	}
	var addrs []string
	for err == nil {
		var ah dnsmessage.ResourceHeader
		if ah, err = p.AnswerHeader(); err != nil {
			break
		}
		switch {
		case ah.Type != typ:
			err = p.SkipAnswer()
		case typ == dnsmessage.TypeA:
			var r dnsmessage.AResource
			r, err = p.AResource()
			addrs = append(addrs, netip.AddrFrom4(r.A).String())
		default:
			var r dnsmessage.AAAAResource
			r, err = p.AAAAResource()
			addrs = append(addrs, netip.AddrFrom16(r.AAAA).String())
		}
	}
	if !errors.Is(err, dnsmessage.ErrSectionDone) {
		return result{statusFail, "bad response: " + err.Error()}
	}
	return result{statusOK, strings.Join(addrs, ",")}
}
