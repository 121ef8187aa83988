package rules

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
)

// A client's rule set is bounded; beyond MaxRules it is refused (deny
// all), and a long set is summarised in the log instead of filling a
// line of hundreds of kilobytes.
func TestRuleLimitAndSummary(t *testing.T) {
	set := func(n int) map[string]string {
		m := map[string]string{"policy": "drop"}
		for i := range n {
			m[fmt.Sprintf("%04d", i)] = fmt.Sprintf("action=accept dst4=10.%d.%d.0/24 proto=tcp dstports=443-443", i/256, i%256)
		}
		return m
	}
	rs, err := Parse(set(MaxRules))
	if err != nil {
		t.Fatalf("%d rules: %v", MaxRules, err)
	}
	if s := rs.String(); len(s) > 2000 || !strings.Contains(s, fmt.Sprintf("and %d more rules (%d in all)", MaxRules-logRules, MaxRules)) {
		t.Errorf("log line of %d bytes: %.200s...", len(s), s)
	}
	rs, err = Parse(set(MaxRules + 1))
	if err == nil {
		t.Fatal("more than MaxRules accepted")
	}
	if v := rs.Match(Packet{Dst: netip.MustParseAddr("10.0.0.1"), Proto: 6, DstPort: 443}, Env{}); v.Action != Drop {
		t.Fatalf("refused set gives %v, want deny all", v)
	}
}
