package dns

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"golang.org/x/net/dns/dnsmessage"
)

const testID = 0x1234

var testQName = dnsmessage.MustNewName("a.example.")

// testQuery is the query the replies below answer.
var testQuery = dnsmessage.Message{
	Header:    dnsmessage.Header{ID: testID, RecursionDesired: true},
	Questions: []dnsmessage.Question{{Name: testQName, Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET}},
}

func TestBuildQuery(t *testing.T) {
	b, err := buildQuery(nil, testID, testQName)
	if err != nil {
		t.Fatal(err)
	}
	var m dnsmessage.Message
	if err := m.Unpack(b); err != nil {
		t.Fatal(err)
	}
	if m.ID != testID || m.Response || !m.RecursionDesired || len(m.Questions) != 1 || m.Questions[0] != testQuery.Questions[0] {
		t.Errorf("query %+v", m)
	}
	if len(m.Additionals) != 1 || m.Additionals[0].Header.Type != dnsmessage.TypeOPT || m.Additionals[0].Header.Class != maxReply {
		t.Errorf("want one EDNS0 OPT record advertising %d bytes, got %+v", maxReply, m.Additionals)
	}
}

// chain returns CNAME records a.example -> c1 -> ... -> cN and an A record
// for cN.
func chain(n int) []dnsmessage.Resource {
	var rrs []dnsmessage.Resource
	owner := "a.example."
	for i := 1; i <= n; i++ {
		next := fmt.Sprintf("c%d.example.", i)
		rrs = append(rrs, cnameRR(owner, 100, next))
		owner = next
	}
	return append(rrs, aRR(owner, 100, "192.0.2.77"))
}

func TestParseReply(t *testing.T) {
	mod := func(f func(m *dnsmessage.Message)) []byte {
		m := answer(testQuery, dnsmessage.RCodeSuccess, aRR("a.example.", 300, "192.0.2.1"))
		f(&m)
		return pack(m)
	}
	many := func(m *dnsmessage.Message) {
		m.Answers = nil
		for i := range 70 {
			m.Answers = append(m.Answers, aRR("a.example.", 100, fmt.Sprintf("10.0.0.%d", i)))
		}
	}
	good := mod(func(*dnsmessage.Message) {})
	for _, tc := range []struct {
		name    string
		b       []byte
		err     error // nil: accepted
		outcome outcome
		addrs   int    // gotAddrs: count
		ttl     uint32 // gotAddrs
	}{
		{"A", good, nil, gotAddrs, 1, 300},
		{"question in other case", mod(func(m *dnsmessage.Message) {
			m.Questions[0].Name = dnsmessage.MustNewName("A.eXample.")
		}), nil, gotAddrs, 1, 300},
		{"min TTL over records", mod(func(m *dnsmessage.Message) {
			m.Answers = append(m.Answers, aRR("A.EXAMPLE.", 7, "192.0.2.2"), aRR("a.example.", 9, "192.0.2.1"))
		}), nil, gotAddrs, 2, 7},
		{"NXDOMAIN", mod(func(m *dnsmessage.Message) { m.RCode, m.Answers = dnsmessage.RCodeNameError, nil }), nil, noAddrs, 0, 0},
		{"NODATA", mod(func(m *dnsmessage.Message) { m.Answers = nil }), nil, noAddrs, 0, 0},
		{"only AAAA", mod(func(m *dnsmessage.Message) {
			m.Answers = []dnsmessage.Resource{{Header: dnsmessage.ResourceHeader{Name: testQName, Class: dnsmessage.ClassINET},
				Body: &dnsmessage.AAAAResource{AAAA: netip.MustParseAddr("2001:db8::1").As16()}}}
		}), nil, noAddrs, 0, 0},
		{"A in class CHAOS ignored", mod(func(m *dnsmessage.Message) { m.Answers[0].Header.Class = dnsmessage.ClassCHAOS }), nil, noAddrs, 0, 0},
		{"A for another name ignored", mod(func(m *dnsmessage.Message) { m.Answers[0].Header.Name = dnsmessage.MustNewName("b.example.") }), nil, noAddrs, 0, 0},
		{"SERVFAIL", mod(func(m *dnsmessage.Message) { m.RCode = dnsmessage.RCodeServerFailure }), nil, serverFailed, 0, 0},
		{"REFUSED", mod(func(m *dnsmessage.Message) { m.RCode = dnsmessage.RCodeRefused }), nil, serverFailed, 0, 0},
		{"TC", mod(func(m *dnsmessage.Message) { m.Truncated = true }), nil, serverFailed, 0, 0},
		{"CNAME chain of 8", mod(func(m *dnsmessage.Message) { m.Answers = chain(8) }), nil, gotAddrs, 1, 100},
		{"CNAME chain of 9", mod(func(m *dnsmessage.Message) { m.Answers = chain(9) }), errLongChain, 0, 0, 0},
		{"CNAME loop", mod(func(m *dnsmessage.Message) {
			m.Answers = []dnsmessage.Resource{cnameRR("a.example.", 1, "b.example."), cnameRR("b.example.", 1, "a.example.")}
		}), errLongChain, 0, 0, 0},
		{"CNAME without target address", mod(func(m *dnsmessage.Message) {
			m.Answers = []dnsmessage.Resource{cnameRR("a.example.", 1, "b.example."), aRR("a.example.", 1, "203.0.113.66")}
		}), nil, gotAddrs, 1, 1}, // an A for the owner itself is taken first
		{"answers capped", mod(many), nil, gotAddrs, maxAnswers, 100},
		{"wrong ID", mod(func(m *dnsmessage.Message) { m.ID++ }), errID, 0, 0, 0},
		{"QR not set", mod(func(m *dnsmessage.Message) { m.Response = false }), errNotReply, 0, 0, 0},
		{"opcode", mod(func(m *dnsmessage.Message) { m.OpCode = 4 }), errOpcode, 0, 0, 0},
		{"other name", mod(func(m *dnsmessage.Message) { m.Questions[0].Name = dnsmessage.MustNewName("b.example.") }), errQuestion, 0, 0, 0},
		{"suffix name", mod(func(m *dnsmessage.Message) { m.Questions[0].Name = dnsmessage.MustNewName("a.example.org.") }), errQuestion, 0, 0, 0},
		{"type AAAA", mod(func(m *dnsmessage.Message) { m.Questions[0].Type = dnsmessage.TypeAAAA }), errQuestion, 0, 0, 0},
		{"class ANY", mod(func(m *dnsmessage.Message) { m.Questions[0].Class = dnsmessage.ClassANY }), errQuestion, 0, 0, 0},
		{"two questions", mod(func(m *dnsmessage.Message) { m.Questions = append(m.Questions, m.Questions[0]) }), errQuestion, 0, 0, 0},
		{"no question", mod(func(m *dnsmessage.Message) { m.Questions = nil }), dnsmessage.ErrSectionDone, 0, 0, 0},
		{"too long", append(slices.Clone(good), make([]byte, maxReply)...), errTooLong, 0, 0, 0},
		{"cut answer", good[:len(good)-1], errors.New("parse"), 0, 0, 0},
		{"header only", good[:12], errors.New("parse"), 0, 0, 0},
		{"empty", nil, errors.New("parse"), 0, 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rep, err := parseReply(tc.b, testID, testQName)
			switch {
			case tc.err == nil && err != nil:
				t.Fatalf("rejected: %v", err)
			case tc.err != nil && err == nil:
				t.Fatalf("accepted %+v; want error %v", rep, tc.err)
			case tc.err != nil && !errors.Is(err, tc.err) && !strings.Contains(err.Error(), tc.err.Error()):
				t.Fatalf("error %v; want %v", err, tc.err)
			case tc.err != nil:
				return
			}
			if rep.outcome != tc.outcome || len(rep.addrs) != tc.addrs || (tc.outcome == gotAddrs && rep.ttl != tc.ttl) {
				t.Fatalf("got outcome %d, %d addrs %v, TTL %d; want %d, %d, %d", rep.outcome, len(rep.addrs), rep.addrs, rep.ttl, tc.outcome, tc.addrs, tc.ttl)
			}
		})
	}
}

// FuzzParseReply feeds arbitrary bytes as the reply to the query (testID,
// a.example A IN): parseReply must not panic, and whatever it accepts must
// carry our ID, the QR bit, opcode QUERY and exactly our question.
func FuzzParseReply(f *testing.F) {
	f.Add(pack(answer(testQuery, dnsmessage.RCodeSuccess, aRR("a.example.", 300, "192.0.2.1"))))
	f.Add(pack(answer(testQuery, dnsmessage.RCodeSuccess, chain(3)...)))
	f.Add(pack(answer(testQuery, dnsmessage.RCodeNameError)))
	f.Add(pack(answer(testQuery, dnsmessage.RCodeServerFailure)))
	f.Add(pack(answer(testQuery, dnsmessage.RCodeSuccess, cnameRR("a.example.", 1, "b.example."), cnameRR("b.example.", 1, "a.example."))))
	f.Fuzz(func(t *testing.T, b []byte) {
		rep, err := parseReply(b, testID, testQName)
		if err != nil {
			return
		}
		if len(b) > maxReply || len(b) < 12 {
			t.Fatalf("accepted %d bytes", len(b))
		}
		if id := binary.BigEndian.Uint16(b); id != testID {
			t.Fatalf("accepted ID %#x", id)
		}
		if b[2]&0x80 == 0 || b[2]>>3&0xf != 0 {
			t.Fatalf("accepted flags %#x", b[2])
		}
		if qd := binary.BigEndian.Uint16(b[4:]); qd != 1 {
			t.Fatalf("accepted %d questions", qd)
		}
		// The question's name, decoded by hand unless it is compressed.
		if b[12]&0xc0 == 0 {
			want := []byte("\x01a\x07example\x00\x00\x01\x00\x01")
			if len(b) < 12+len(want) {
				t.Fatalf("accepted a short question")
			}
			got := b[12 : 12+len(want)]
			for i := range want {
				if lower(got[i]) != want[i] {
					t.Fatalf("accepted question % x", got)
				}
			}
		}
		switch rep.outcome {
		case gotAddrs:
			if len(rep.addrs) == 0 || len(rep.addrs) > maxAnswers || !slices.IsSortedFunc(rep.addrs, netip.Addr.Compare) ||
				len(slices.Compact(slices.Clone(rep.addrs))) != len(rep.addrs) || rep.rcode != dnsmessage.RCodeSuccess || b[2]&0x02 != 0 {
				t.Fatalf("bad addresses %+v", rep)
			}
		case noAddrs, serverFailed:
			if len(rep.addrs) != 0 {
				t.Fatalf("addresses with outcome %d", rep.outcome)
			}
		default:
			t.Fatalf("outcome %d", rep.outcome)
		}
	})
}
