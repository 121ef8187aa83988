package rules

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

// fakeResolver maps names to addresses; a missing name is unresolved.
type fakeResolver map[string][]netip.Addr

func (f fakeResolver) Lookup(name string) ([]netip.Addr, bool) {
	a, ok := f[name]
	return a, ok
}

var _ Resolver = fakeResolver(nil)

var (
	qubesDNS = []netip.Addr{addr("10.139.1.1"), addr("10.139.1.2")}
	testEnv  = Env{
		DNS: qubesDNS,
		Resolver: fakeResolver{
			"example.com":    {addr("93.184.216.34"), addr("93.184.216.35")},
			"v6only.example": {}, // resolved, but no A record
		},
	}
)

func addr(s string) netip.Addr { return netip.MustParseAddr(s) }

const (
	tcp  = uint8(ProtoTCP)
	udp  = uint8(ProtoUDP)
	icmp = uint8(ProtoICMP)
	gre  = uint8(47)
)

func tcpTo(dst string, port uint16) Packet   { return Packet{Dst: addr(dst), Proto: tcp, DstPort: port} }
func udpTo(dst string, port uint16) Packet   { return Packet{Dst: addr(dst), Proto: udp, DstPort: port} }
func icmpTo(dst string, typ uint8) Packet    { return Packet{Dst: addr(dst), Proto: icmp, ICMPType: typ} }
func protoTo(dst string, proto uint8) Packet { return Packet{Dst: addr(dst), Proto: proto} }

// ruleMatchTests: does this one rule match this packet (in testEnv)?
var ruleMatchTests = []struct {
	rule  string
	pkt   Packet
	match bool
}{
	// no conditions
	{"action=accept", tcpTo("1.2.3.4", 80), true},
	{"action=accept", protoTo("1.2.3.4", gre), true},

	// dst4
	{"action=accept dst4=10.1.2.0/24", tcpTo("10.1.2.200", 80), true},
	{"action=accept dst4=10.1.2.0/24", tcpTo("10.1.3.1", 80), false},
	{"action=accept dst4=10.1.2.3/24", icmpTo("10.1.2.99", 8), true}, // host bits cleared
	{"action=accept dst4=0.0.0.0/0", udpTo("255.255.255.255", 1), true},
	{"action=accept dst4=0.0.0.0/0", icmpTo("1.2.3.4", 0), true},
	{"action=accept dst4=192.168.0.5/32", tcpTo("192.168.0.5", 1), true},
	{"action=accept dst4=192.168.0.5/32", tcpTo("192.168.0.6", 1), false},
	{"action=accept dst4=192.168.0.5/32", Packet{Dst: addr("::ffff:192.168.0.5"), Proto: tcp}, true}, // mapped form is unmapped

	// dst6 never matches IPv4, not even via a v4-mapped prefix
	{"action=accept dst6=::/0", tcpTo("1.2.3.4", 80), false},
	{"action=drop dst6=::ffff:0:0/96", tcpTo("1.2.3.4", 80), false},

	// dsthost resolved
	{"action=accept dsthost=example.com", tcpTo("93.184.216.35", 443), true},
	{"action=accept dsthost=example.com", tcpTo("93.184.216.36", 443), false},
	{"action=drop dsthost=example.com", tcpTo("93.184.216.34", 443), true},
	{"action=drop dsthost=example.com", tcpTo("1.1.1.1", 443), false},
	{"action=accept dsthost=v6only.example", tcpTo("1.1.1.1", 443), false},
	{"action=drop dsthost=v6only.example", tcpTo("1.1.1.1", 443), false},
	// dsthost unresolved: accept matches nothing, drop everything that
	// satisfies its other conditions
	{"action=accept dsthost=pending.example", tcpTo("1.1.1.1", 443), false},
	{"action=drop dsthost=pending.example", tcpTo("1.1.1.1", 443), true},
	{"action=drop dsthost=pending.example", icmpTo("8.8.8.8", 8), true},
	{"action=drop dsthost=pending.example proto=tcp dstports=443-443", tcpTo("1.1.1.1", 443), true},
	{"action=drop dsthost=pending.example proto=tcp dstports=443-443", tcpTo("1.1.1.1", 80), false},
	{"action=drop dsthost=pending.example proto=tcp dstports=443-443", udpTo("1.1.1.1", 443), false},

	// proto
	{"action=accept proto=tcp", tcpTo("1.2.3.4", 80), true},
	{"action=accept proto=tcp", udpTo("1.2.3.4", 80), false},
	{"action=accept proto=tcp", icmpTo("1.2.3.4", 8), false},
	{"action=accept proto=udp", udpTo("1.2.3.4", 80), true},
	{"action=accept proto=udp", tcpTo("1.2.3.4", 80), false},
	{"action=accept proto=icmp", icmpTo("1.2.3.4", 8), true},
	{"action=accept proto=icmp", udpTo("1.2.3.4", 8), false},
	{"action=accept proto=icmp", protoTo("1.2.3.4", gre), false},

	// dstports
	{"action=accept proto=tcp dstports=443-443", tcpTo("1.2.3.4", 443), true},
	{"action=accept proto=tcp dstports=443-443", tcpTo("1.2.3.4", 442), false},
	{"action=accept proto=tcp dstports=443-443", tcpTo("1.2.3.4", 444), false},
	{"action=accept proto=tcp dstports=443-443", udpTo("1.2.3.4", 443), false},
	{"action=accept proto=udp dstports=0-65535", udpTo("1.2.3.4", 0), true},
	{"action=accept proto=udp dstports=0-65535", udpTo("1.2.3.4", 65535), true},
	{"action=accept proto=udp dstports=1000-2000", udpTo("1.2.3.4", 999), false},
	{"action=accept proto=udp dstports=1000-2000", udpTo("1.2.3.4", 2000), true},
	// dstports without proto: TCP or UDP, never anything else
	{"action=accept dstports=80-90", tcpTo("1.2.3.4", 85), true},
	{"action=accept dstports=80-90", udpTo("1.2.3.4", 80), true},
	{"action=accept dstports=80-90", tcpTo("1.2.3.4", 91), false},
	{"action=accept dstports=0-65535", icmpTo("1.2.3.4", 8), false},
	{"action=accept dstports=0-65535", protoTo("1.2.3.4", gre), false},

	// icmptype
	{"action=accept proto=icmp icmptype=8", icmpTo("1.2.3.4", 8), true},
	{"action=accept proto=icmp icmptype=8", icmpTo("1.2.3.4", 0), false},
	{"action=accept icmptype=8", icmpTo("1.2.3.4", 8), true}, // implies icmp
	{"action=accept icmptype=8", icmpTo("1.2.3.4", 13), false},
	{"action=accept icmptype=8", Packet{Dst: addr("1.2.3.4"), Proto: tcp, ICMPType: 8}, false},
	{"action=accept icmptype=8", Packet{Dst: addr("1.2.3.4"), Proto: udp, DstPort: 8}, false},

	// specialtarget=dns: TCP/UDP port 53 to the DNS servers
	{"action=accept specialtarget=dns", udpTo("10.139.1.1", 53), true},
	{"action=accept specialtarget=dns", tcpTo("10.139.1.2", 53), true},
	{"action=accept specialtarget=dns", udpTo("10.139.1.1", 54), false},
	{"action=accept specialtarget=dns", udpTo("8.8.8.8", 53), false},
	{"action=accept specialtarget=dns", icmpTo("10.139.1.1", 8), false},
	{"action=accept specialtarget=dns", protoTo("10.139.1.1", gre), false},
	{"action=accept proto=udp specialtarget=dns", udpTo("10.139.1.1", 53), true},
	{"action=accept proto=udp specialtarget=dns", tcpTo("10.139.1.1", 53), false},
	{"action=accept proto=tcp specialtarget=dns", tcpTo("10.139.1.1", 53), true},
	{"action=accept specialtarget=dns dstports=53-53", udpTo("10.139.1.2", 53), true},
	{"action=accept specialtarget=dns dstports=1-1024", udpTo("10.139.1.2", 53), false}, // the agent skips any range but 53-53
	{"action=accept specialtarget=dns dstports=53-53", udpTo("10.139.1.2", 53), true},
	{"action=accept specialtarget=dns dstports=1-1024", udpTo("10.139.1.2", 80), false},
	{"action=accept specialtarget=dns dstports=80-80", udpTo("10.139.1.2", 53), false}, // never matches
	{"action=accept specialtarget=dns dstports=80-80", udpTo("10.139.1.2", 80), false},
	{"action=accept dst4=10.139.1.1/32 specialtarget=dns", udpTo("10.139.1.1", 53), true}, // both must hold
	{"action=accept dst4=10.139.1.1/32 specialtarget=dns", udpTo("10.139.1.2", 53), false},
	{"action=drop dsthost=pending.example specialtarget=dns", udpTo("10.139.1.1", 53), true},
	{"action=drop dsthost=pending.example specialtarget=dns", udpTo("1.1.1.1", 53), false},

	// keys in another order than dom0 writes them
	{"dstports=22-22 proto=tcp action=accept dst4=10.0.0.0/8", tcpTo("10.9.9.9", 22), true},
	{"dstports=22-22 proto=tcp action=accept dst4=10.0.0.0/8", tcpTo("11.9.9.9", 22), false},
}

func TestRuleMatch(t *testing.T) {
	for _, tt := range ruleMatchTests {
		rs, err := Parse(map[string]string{"policy": "drop", "0000": tt.rule})
		if err != nil {
			t.Fatalf("Parse(%q): %v", tt.rule, err)
		}
		v := rs.Match(tt.pkt, testEnv)
		if got := v.Rule == 0; got != tt.match {
			t.Errorf("rule %q, packet %+v: matched=%v, want %v", tt.rule, tt.pkt, got, tt.match)
		}
		if v.Rule == 0 && v.Action != rs.rules[0].Action {
			t.Errorf("rule %q: verdict %v, want the rule's action", tt.rule, v)
		}
	}
}

func TestMatchEnvEdges(t *testing.T) {
	tests := []struct {
		name  string
		rule  string
		env   Env
		pkt   Packet
		match bool
	}{
		{"nil resolver, accept dsthost", "action=accept dsthost=example.com", Env{}, tcpTo("93.184.216.34", 80), false},
		{"nil resolver, drop dsthost", "action=drop dsthost=example.com", Env{}, tcpTo("1.1.1.1", 80), true},
		{"no DNS servers known", "action=accept specialtarget=dns", Env{}, udpTo("10.139.1.1", 53), false},
		{"mapped DNS server address", "action=accept specialtarget=dns", Env{DNS: []netip.Addr{addr("::ffff:10.139.1.1")}}, udpTo("10.139.1.1", 53), true},
	}
	for _, tt := range tests {
		rs, err := Parse(map[string]string{"policy": "drop", "0000": tt.rule})
		if err != nil {
			t.Fatalf("%s: %v", tt.name, err)
		}
		if got := rs.Match(tt.pkt, tt.env).Rule == 0; got != tt.match {
			t.Errorf("%s: matched=%v, want %v", tt.name, got, tt.match)
		}
	}
}

func TestRulesetMatch(t *testing.T) {
	tests := []struct {
		name    string
		entries map[string]string
		pkt     Packet
		want    Verdict
	}{
		{
			name:    "policy drop, no rules",
			entries: map[string]string{"policy": "drop"},
			pkt:     tcpTo("1.2.3.4", 80),
			want:    Verdict{Drop, -1},
		},
		{
			name:    "policy accept, no rules",
			entries: map[string]string{"policy": "accept"},
			pkt:     tcpTo("1.2.3.4", 80),
			want:    Verdict{Accept, -1},
		},
		{
			name:    "policy accept after non-matching rule",
			entries: map[string]string{"policy": "accept", "0000": "action=drop proto=udp"},
			pkt:     tcpTo("1.2.3.4", 80),
			want:    Verdict{Accept, -1},
		},
		{
			name: "first match wins: drop before accept",
			entries: map[string]string{"policy": "accept",
				"0000": "action=drop proto=tcp dstports=22-22",
				"0001": "action=accept"},
			pkt:  tcpTo("1.2.3.4", 22),
			want: Verdict{Drop, 0},
		},
		{
			name: "first match wins: falls through to second rule",
			entries: map[string]string{"policy": "drop",
				"0000": "action=drop proto=tcp dstports=22-22",
				"0001": "action=accept"},
			pkt:  tcpTo("1.2.3.4", 80),
			want: Verdict{Accept, 1},
		},
	}
	for _, tt := range tests {
		rs, err := Parse(tt.entries)
		if err != nil {
			t.Fatalf("%s: %v", tt.name, err)
		}
		if got := rs.Match(tt.pkt, testEnv); got != tt.want {
			t.Errorf("%s: Match = %v, want %v", tt.name, got, tt.want)
		}
	}
}

// Sparse numbering: dom0 leaves gaps (it skips rules of the other address
// family); every rule is read, in numeric order.
func TestParseSparse(t *testing.T) {
	rs, err := Parse(map[string]string{
		"policy": "drop",
		"0010":   "action=accept dst4=10.0.0.0/8",
		"0000":   "action=accept dst4=1.0.0.0/8",
		"0002":   "action=drop dst4=10.1.0.0/16",
		"0100":   "action=accept dsthost=example.com",
		"1000":   "action=accept dsthost=pending.example",
		"9999":   "action=drop dsthost=example.com",
	})
	if err != nil {
		t.Fatal(err)
	}
	wantKeys := []string{"0000", "0002", "0010", "0100", "1000", "9999"}
	if !slices.Equal(rs.keys, wantKeys) {
		t.Errorf("keys = %v, want %v", rs.keys, wantKeys)
	}
	for _, tt := range []struct {
		pkt  Packet
		want Verdict
	}{
		{tcpTo("1.1.1.1", 1), Verdict{Accept, 0}},
		{tcpTo("10.1.1.1", 1), Verdict{Drop, 1}},   // 0002 before 0010
		{tcpTo("10.2.1.1", 1), Verdict{Accept, 2}}, // 0010 not skipped
		{tcpTo("93.184.216.34", 1), Verdict{Accept, 3}},
		{tcpTo("2.2.2.2", 1), Verdict{Drop, -1}},
	} {
		if got := rs.Match(tt.pkt, testEnv); got != tt.want {
			t.Errorf("Match(%v) = %v, want %v", tt.pkt.Dst, got, tt.want)
		}
	}
	if got, want := rs.Names(), []string{"example.com", "pending.example"}; !slices.Equal(got, want) {
		t.Errorf("Names() = %q, want %q", got, want)
	}
	want := "policy=drop; #0 0000: action=accept dst4=1.0.0.0/8; #1 0002: action=drop dst4=10.1.0.0/16; " +
		"#2 0010: action=accept dst4=10.0.0.0/8; #3 0100: action=accept dsthost=example.com; " +
		"#4 1000: action=accept dsthost=pending.example; #5 9999: action=drop dsthost=example.com"
	if got := rs.String(); got != want {
		t.Errorf("String() =\n%s\nwant\n%s", got, want)
	}
}

var parseErrorTests = []struct {
	name    string
	entries map[string]string
	wantErr []string // substrings of the error
}{
	{"nil map", nil, []string{"no policy"}},
	{"missing policy", map[string]string{"0000": "action=accept"}, []string{"no policy"}},
	{"policy allow", map[string]string{"policy": "allow"}, []string{`policy "allow"`}},
	{"policy empty", map[string]string{"policy": ""}, []string{`policy ""`}},
	{"policy with space", map[string]string{"policy": "drop "}, []string{`policy "drop "`}},
	{"3-digit key", map[string]string{"policy": "drop", "000": "action=accept"}, []string{`key "000"`}},
	{"5-digit key", map[string]string{"policy": "drop", "00000": "action=accept"}, []string{`key "00000"`}},
	{"non-digit key", map[string]string{"policy": "drop", "00a1": "action=accept"}, []string{`key "00a1"`}},
	{"signed key", map[string]string{"policy": "drop", "+001": "action=accept"}, []string{`key "+001"`}},
	{"other key", map[string]string{"policy": "drop", "expire": "1"}, []string{`key "expire"`}},
	{"empty key", map[string]string{"policy": "drop", "": ""}, []string{`key ""`}},
	{"empty rule", map[string]string{"policy": "drop", "0003": ""}, []string{"rule 0003", "empty rule"}},
	{
		"bad rule among good ones",
		map[string]string{"policy": "accept", "0000": "action=accept proto=tcp", "0005": "action=accept proto=tcp dstports=443", "0007": "action=drop"},
		[]string{"rule 0005", `"dstports=443"`, "lo-hi"},
	},
	{"first bad rule in numeric order is reported", map[string]string{"policy": "drop", "0009": "x", "0001": "y"}, []string{"rule 0001"}},
}

func TestParseErrors(t *testing.T) {
	for _, tt := range parseErrorTests {
		rs, err := Parse(tt.entries)
		if err == nil {
			t.Errorf("%s: no error, ruleset %v", tt.name, rs)
			continue
		}
		for _, s := range tt.wantErr {
			if !strings.Contains(err.Error(), s) {
				t.Errorf("%s: error %q does not contain %q", tt.name, err, s)
			}
		}
		checkDenyAll(t, tt.name, rs)
	}
	// Every malformed rule string makes the whole ruleset deny-all.
	for _, tt := range parseRuleErrorTests {
		rs, err := Parse(map[string]string{"policy": "accept", "0000": "action=accept", "0001": tt.in})
		if err == nil || !strings.Contains(err.Error(), "rule 0001") {
			t.Errorf("rule %q: error %v, want one naming rule 0001", tt.in, err)
		}
		checkDenyAll(t, tt.in, rs)
	}
}

// checkDenyAll asserts rs exists and drops what the rules or policy of the
// test would otherwise have accepted.
func checkDenyAll(t *testing.T, name string, rs *Ruleset) {
	t.Helper()
	if rs == nil {
		t.Errorf("%s: nil ruleset", name)
		return
	}
	for _, p := range []Packet{tcpTo("1.2.3.4", 80), udpTo("10.139.1.1", 53), icmpTo("8.8.8.8", 8)} {
		if v := rs.Match(p, testEnv); v != (Verdict{Drop, -1}) {
			t.Errorf("%s: deny-all ruleset gave %v for %+v", name, v, p)
		}
	}
	if len(rs.rules) != 0 || len(rs.Names()) != 0 {
		t.Errorf("%s: deny-all ruleset has rules: %v", name, rs)
	}
}

func TestDenyAll(t *testing.T) {
	checkDenyAll(t, "DenyAll", DenyAll())
	if got := DenyAll().String(); got != "policy=drop, no rules" {
		t.Errorf("DenyAll().String() = %q", got)
	}
}

func TestVerdictString(t *testing.T) {
	for _, tt := range []struct {
		v    Verdict
		want string
	}{
		{Verdict{Drop, -1}, "drop by policy"},
		{Verdict{Accept, 3}, "accept by rule #3"},
	} {
		if got := tt.v.String(); got != tt.want {
			t.Errorf("%#v.String() = %q, want %q", tt.v, got, tt.want)
		}
	}
}

func TestMatchNoAllocs(t *testing.T) {
	rs := benchRuleset(t, 50)
	pkts := []Packet{tcpTo("1.2.3.4", 80), udpTo("10.139.1.1", 53), icmpTo("8.8.8.8", 8), tcpTo("93.184.216.34", 443)}
	got := testing.AllocsPerRun(100, func() {
		for _, p := range pkts {
			rs.Match(p, testEnv)
		}
	})
	if got != 0 {
		t.Errorf("Match allocates %v times per run, want 0", got)
	}
}

// benchRuleset builds n rules of mixed kinds, none of which matches
// tcp 203.0.113.7:8080, so that packet walks all of them.
func benchRuleset(tb testing.TB, n int) *Ruleset {
	entries := map[string]string{"policy": "drop"}
	forms := []string{
		"action=accept dst4=10.%d.%d.0/24 proto=tcp dstports=443-443",
		"action=drop dst4=10.%d.%d.0/24",
		"action=accept dst4=192.168.%d.%d/32 proto=udp dstports=1000-2000",
		"action=accept dsthost=h%d-%d.example.com proto=tcp",
		"action=accept proto=icmp icmptype=%d dst4=172.16.%d.0/24",
		"action=accept specialtarget=dns dstports=1%d%d-65535",
		"action=drop dsthost=example.com dstports=1%d%d-65535",
	}
	for i := range n {
		f := forms[i%len(forms)]
		entries[fmt.Sprintf("%04d", i)] = fmt.Sprintf(f, i/256%256, i%256)
	}
	rs, err := Parse(entries)
	if err != nil {
		tb.Fatal(err)
	}
	return rs
}

func BenchmarkMatch1000(b *testing.B) {
	rs := benchRuleset(b, 1000)
	p := tcpTo("203.0.113.7", 8080)
	if v := rs.Match(p, testEnv); v.Rule != -1 {
		b.Fatalf("benchmark packet matched rule %d; it must walk all rules", v.Rule)
	}
	b.ReportAllocs()
	for b.Loop() {
		rs.Match(p, testEnv)
	}
}
