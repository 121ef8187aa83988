package rules

import (
	"net/netip"
	"strings"
	"testing"
)

var parseRuleTests = []struct {
	in   string
	want Rule
	str  string // canonical form; "" means same as in
}{
	{in: "action=accept", want: Rule{Action: Accept}},
	{in: "action=drop", want: Rule{Action: Drop}},
	{in: "action=accept dst4=10.1.2.0/24", want: Rule{Action: Accept, Prefix: pfx("10.1.2.0/24")}},
	{in: "action=accept dst4=0.0.0.0/0", want: Rule{Action: Accept, Prefix: pfx("0.0.0.0/0")}},
	{in: "action=drop dst4=192.168.0.5/32", want: Rule{Prefix: pfx("192.168.0.5/32")}},
	// Host bits: dom0 passes them through, iptables/nft mask them; so do we.
	{in: "action=accept dst4=10.1.2.3/24", want: Rule{Action: Accept, Prefix: pfx("10.1.2.0/24")}, str: "action=accept dst4=10.1.2.0/24"},
	{in: "action=accept dst6=2001:db8::/32", want: Rule{Action: Accept, Prefix: pfx("2001:db8::/32")}},
	{in: "action=accept dst6=::/0", want: Rule{Action: Accept, Prefix: pfx("::/0")}},
	{in: "action=accept dsthost=www.example.com", want: Rule{Action: Accept, Host: "www.example.com"}},
	{in: "action=accept dsthost=my_host-1.example.", want: Rule{Action: Accept, Host: "my_host-1.example."}},
	{in: "action=accept proto=tcp", want: Rule{Action: Accept, Proto: ProtoTCP}},
	{in: "action=accept proto=udp", want: Rule{Action: Accept, Proto: ProtoUDP}},
	{in: "action=accept proto=icmp", want: Rule{Action: Accept, Proto: ProtoICMP}},
	{in: "action=accept proto=tcp dstports=443-443", want: Rule{Action: Accept, Proto: ProtoTCP, HasPorts: true, PortLo: 443, PortHi: 443}},
	{in: "action=accept proto=udp dstports=0-65535", want: Rule{Action: Accept, Proto: ProtoUDP, HasPorts: true, PortLo: 0, PortHi: 65535}},
	{in: "action=accept dstports=80-90", want: Rule{Action: Accept, HasPorts: true, PortLo: 80, PortHi: 90}},
	{in: "action=accept specialtarget=dns", want: Rule{Action: Accept, DNS: true}},
	{in: "action=accept proto=udp specialtarget=dns dstports=53-53", want: Rule{Action: Accept, Proto: ProtoUDP, DNS: true, HasPorts: true, PortLo: 53, PortHi: 53}},
	{in: "action=accept proto=icmp icmptype=8", want: Rule{Action: Accept, Proto: ProtoICMP, HasICMPType: true, ICMPType: 8}},
	{in: "action=drop icmptype=255", want: Rule{HasICMPType: true, ICMPType: 255}},
	{in: "action=drop icmptype=0", want: Rule{HasICMPType: true, ICMPType: 0}},
	// Any key order is accepted; String writes dom0's order.
	{
		in:   "dstports=22-22 proto=tcp dst4=10.0.0.0/8 action=accept",
		want: Rule{Action: Accept, Prefix: pfx("10.0.0.0/8"), Proto: ProtoTCP, HasPorts: true, PortLo: 22, PortHi: 22},
		str:  "action=accept dst4=10.0.0.0/8 proto=tcp dstports=22-22",
	},
	{
		in:   "icmptype=3 dsthost=a.b action=drop proto=icmp",
		want: Rule{Host: "a.b", Proto: ProtoICMP, HasICMPType: true, ICMPType: 3},
		str:  "action=drop dsthost=a.b proto=icmp icmptype=3",
	},
}

func TestParseRule(t *testing.T) {
	for _, tt := range parseRuleTests {
		got, err := ParseRule(tt.in)
		if err != nil {
			t.Errorf("ParseRule(%q): %v", tt.in, err)
			continue
		}
		if got != tt.want {
			t.Errorf("ParseRule(%q) = %+v, want %+v", tt.in, got, tt.want)
		}
		str := tt.str
		if str == "" {
			str = tt.in
		}
		if got.String() != str {
			t.Errorf("ParseRule(%q).String() = %q, want %q", tt.in, got.String(), str)
		}
	}
}

var parseRuleErrorTests = []struct {
	in      string
	wantErr string // substring of the error
}{
	{"", "empty rule"},
	{" action=accept", "empty token"},
	{"action=accept ", "empty token"},
	{"action=accept  proto=tcp", "empty token"},
	{"action=accept\tproto=tcp", "action must be"},
	{"action", `token "action": no '='`},
	{"action=accept proto", `token "proto": no '='`},
	{"action=allow", "action must be accept or drop"},
	{"action=", "action must be accept or drop"},
	{"action=accept foo=bar", `token "foo=bar": unknown key`},
	{"action=accept comment=x", "unknown key"},
	{"action=accept expire=1", "unknown key"},
	{"action=accept action=drop", `token "action=drop": key action repeated`},
	{"action=accept proto=tcp proto=tcp", "key proto repeated"},
	{"proto=tcp", "no action"},
	{"action=accept proto=sctp", "proto must be"},
	{"action=accept proto=TCP", "proto must be"},
	{"action=accept specialtarget=ntp", "specialtarget must be dns"},
	// CIDR
	{"action=accept dst4=10.0.0.0", "want address/length"},
	{"action=accept dst4=10.0.0.0/", "want address/length"},
	{"action=accept dst4=10.0.0.0/33", "want address/length"},
	{"action=accept dst4=10.0.0.0/-1", "want address/length"},
	{"action=accept dst4=10.0.0.0/08", "want address/length"},
	{"action=accept dst4=10.0.0/8", "want address/length"},
	{"action=accept dst4=010.0.0.0/8", "want address/length"},
	{"action=accept dst4=example.com/8", "want address/length"},
	{"action=accept dst4=2001:db8::/32", "not an IPv4 prefix"},
	{"action=accept dst4=::ffff:10.0.0.0/104", "not an IPv4 prefix"},
	{"action=accept dst6=10.0.0.0/8", "not an IPv6 prefix"},
	{"action=accept dst6=2001:db8::/129", "want address/length"},
	{"action=accept dst6=fe80::1%eth0/64", "want address/length"},
	// dsthost
	{"action=accept dsthost=", "1..253"},
	{"action=accept dsthost=.", "1..253"},
	{"action=accept dsthost=Example.com", "lower-case"},
	{"action=accept dsthost=a..b", "label"},
	{"action=accept dsthost=" + strings.Repeat("a", 64) + ".com", "label"},
	{"action=accept dsthost=" + strings.Repeat("a.", 127) + "ab", "1..253"},
	{"action=accept dsthost=a/b", "not allowed"},
	{"action=accept dsthost=1.2.3.4", "IP address"},
	// two destinations
	{"action=accept dst4=10.0.0.0/8 dsthost=a.b", "more than one of dst4, dst6, dsthost"},
	{"action=accept dst4=10.0.0.0/8 dst6=::/0", "more than one"},
	{"action=accept dst6=::/0 dsthost=a.b", "more than one"},
	// ports
	{"action=accept proto=tcp dstports=443", "want lo-hi"},
	{"action=accept proto=tcp dstports=90-80", "port range reversed"},
	{"action=accept proto=tcp dstports=0-65536", "out of range"},
	{"action=accept proto=tcp dstports=70000-70001", "out of range"},
	{"action=accept proto=tcp dstports=99999999999999999999-1", "out of range"},
	{"action=accept proto=tcp dstports=a-b", "not a decimal number"},
	{"action=accept proto=tcp dstports=-1-5", "low port"},
	{"action=accept proto=tcp dstports=1--5", "high port"},
	{"action=accept proto=tcp dstports=+1-5", "not a decimal number"},
	{"action=accept proto=tcp dstports=080-80", "canonical"},
	{"action=accept proto=tcp dstports=-", "low port"},
	{"action=accept proto=tcp dstports=1-2-3", "high port"},
	// icmptype
	{"action=accept proto=icmp icmptype=echo", "not a decimal number"},
	{"action=accept proto=icmp icmptype=256", "out of range"},
	{"action=accept proto=icmp icmptype=-1", "not a decimal number"},
	{"action=accept proto=icmp icmptype=", "canonical"},
	// combinations
	{"action=accept proto=icmp dstports=1-2", "dstports with proto=icmp"},
	{"action=accept proto=tcp icmptype=8", "icmptype with proto=tcp"},
	{"action=accept proto=udp icmptype=8", "icmptype with proto=udp"},
	{"action=accept dstports=1-2 icmptype=8", "dstports together with icmptype"},
	{"action=accept proto=icmp specialtarget=dns", "specialtarget=dns with icmp"},
	{"action=accept specialtarget=dns icmptype=8", "specialtarget=dns with icmp"},
}

func TestParseRuleErrors(t *testing.T) {
	for _, tt := range parseRuleErrorTests {
		got, err := ParseRule(tt.in)
		if err == nil {
			t.Errorf("ParseRule(%q) = %v, want error containing %q", tt.in, got, tt.wantErr)
			continue
		}
		if !strings.Contains(err.Error(), tt.wantErr) {
			t.Errorf("ParseRule(%q) error %q, want it to contain %q", tt.in, err, tt.wantErr)
		}
		if got != (Rule{}) {
			t.Errorf("ParseRule(%q) returned %+v with an error, want zero Rule", tt.in, got)
		}
	}
}

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }
