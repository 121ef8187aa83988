package rules

import (
	"strings"
	"testing"
)

// FuzzParseRule: never panics; whatever parses formats canonically and
// re-parses to the same rule.
func FuzzParseRule(f *testing.F) {
	for _, tt := range parseRuleTests {
		f.Add(tt.in)
	}
	for _, tt := range parseRuleErrorTests {
		f.Add(tt.in)
	}
	for _, tt := range ruleMatchTests {
		f.Add(tt.rule)
	}
	f.Fuzz(func(t *testing.T, s string) {
		r, err := ParseRule(s)
		if err != nil {
			if r != (Rule{}) {
				t.Fatalf("ParseRule(%q) returned %+v with error %v", s, r, err)
			}
			return
		}
		str := r.String()
		r2, err := ParseRule(str)
		if err != nil {
			t.Fatalf("ParseRule(%q) = %+v, its String %q does not parse: %v", s, r, str, err)
		}
		if r2 != r {
			t.Fatalf("ParseRule(%q) = %+v, re-parsed from %q = %+v", s, r, str, r2)
		}
		if r2.String() != str {
			t.Fatalf("String not canonical: %q then %q", str, r2.String())
		}
		for _, p := range []Packet{tcpTo("1.2.3.4", 53), udpTo("10.139.1.1", 53), icmpTo("93.184.216.34", 8)} {
			r.match(&p, &testEnv)
		}
	})
}

// FuzzParse: the input is QubesDB entries, one "key:value" per line. Never
// panics; an error always comes with a deny-all ruleset; a ruleset without
// error has one rule per rule key.
func FuzzParse(f *testing.F) {
	f.Add("policy:drop\n0000:action=accept proto=tcp dstports=443-443\n0002:action=drop dsthost=example.com\n0010:action=accept")
	f.Add("policy:accept\n0000:action=drop specialtarget=dns")
	f.Add("0000:action=accept")
	f.Add("policy:drop\n000:action=accept")
	for _, tt := range parseRuleErrorTests {
		f.Add("policy:accept\n0001:" + tt.in)
	}
	f.Fuzz(func(t *testing.T, in string) {
		entries := map[string]string{}
		for line := range strings.SplitSeq(in, "\n") {
			k, v, _ := strings.Cut(line, ":")
			entries[k] = v
		}
		rs, err := Parse(entries)
		if rs == nil {
			t.Fatalf("Parse(%q) returned a nil ruleset (err %v)", in, err)
		}
		if err != nil {
			if rs.policy != Drop || len(rs.rules) != 0 || len(rs.names) != 0 {
				t.Fatalf("Parse(%q) error %v with ruleset %v, want deny-all", in, err, rs)
			}
			return
		}
		if want := len(entries) - 1; len(rs.rules) != want {
			t.Fatalf("Parse(%q): %d rules, want %d", in, len(rs.rules), want)
		}
		for _, p := range []Packet{tcpTo("1.2.3.4", 53), udpTo("10.139.1.1", 53), icmpTo("93.184.216.34", 8)} {
			if v := rs.Match(p, testEnv); v.Rule < -1 || v.Rule >= len(rs.rules) {
				t.Fatalf("Match gave rule index %d of %d", v.Rule, len(rs.rules))
			}
		}
		_ = rs.String()
	})
}
