package rules

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// Action is what a rule or the policy does with a packet.
type Action uint8

const (
	Drop   Action = iota // the zero value, so a forgotten Action fails closed
	Accept               //
)

func (a Action) String() string {
	switch a {
	case Drop:
		return "drop"
	case Accept:
		return "accept"
	}
	return "action(" + strconv.Itoa(int(a)) + ")"
}

// Proto is an IP protocol number, so the dispatcher can compare header
// values directly.
type Proto uint8

const (
	ProtoAny  Proto = 0 // no proto= key
	ProtoICMP Proto = 1
	ProtoTCP  Proto = 6
	ProtoUDP  Proto = 17
)

func (p Proto) String() string {
	switch p {
	case ProtoAny:
		return "any"
	case ProtoICMP:
		return "icmp"
	case ProtoTCP:
		return "tcp"
	case ProtoUDP:
		return "udp"
	}
	return "proto(" + strconv.Itoa(int(p)) + ")"
}

// dnsPort is the port a specialtarget=dns rule is about.
const dnsPort = 53

// Rule is one parsed firewall rule, exactly as written (nothing implied is
// filled in, so String gives back an equivalent rule string). It is
// comparable with ==.
//
// At most one destination is set: Prefix (dst4 or dst6, host bits cleared)
// or Host (dsthost). Neither means any destination.
type Rule struct {
	Action      Action
	Prefix      netip.Prefix // dst4 (Prefix.Addr().Is4()) or dst6; invalid when absent
	Host        string       // dsthost; "" when absent
	Proto       Proto        // ProtoAny when absent
	DNS         bool         // specialtarget=dns
	HasPorts    bool         // dstports present
	PortLo      uint16
	PortHi      uint16
	HasICMPType bool // icmptype present
	ICMPType    uint8
}

// Rule keys, in the order dom0 writes them (qubes-core-admin sorts rule
// properties by (order, name)); String uses the same order.
const (
	keyAction        = "action"
	keyDst4          = "dst4"
	keyDst6          = "dst6"
	keyDstHost       = "dsthost"
	keyProto         = "proto"
	keySpecialTarget = "specialtarget"
	keyDstPorts      = "dstports"
	keyICMPType      = "icmptype"
)

// ParseRule parses one rule string as dom0 writes it into QubesDB: key=value
// pairs separated by single spaces, each key at most once, in any order.
// It is strict where dom0 is canonical (single spaces, dstports always lo-hi,
// numbers without leading zeros), because anything unexpected must make the
// caller fail closed rather than guess.
func ParseRule(s string) (Rule, error) {
	var r Rule
	if s == "" {
		return r, errors.New("empty rule")
	}
	var seen [8]bool // indexed like the key switch below
	haveAction := false
	for tok := range strings.SplitSeq(s, " ") {
		if tok == "" {
			return Rule{}, fmt.Errorf("rule %q: empty token (leading, trailing or double space)", s)
		}
		key, val, ok := strings.Cut(tok, "=")
		if !ok {
			return Rule{}, fmt.Errorf("token %q: no '='", tok)
		}
		idx, err := r.set(key, val)
		if err != nil {
			return Rule{}, fmt.Errorf("token %q: %w", tok, err)
		}
		if seen[idx] {
			return Rule{}, fmt.Errorf("token %q: key %s repeated", tok, key)
		}
		seen[idx] = true
		if idx == 0 {
			haveAction = true
		}
	}
	if !haveAction {
		return Rule{}, fmt.Errorf("rule %q: no action", s)
	}
	if n := btoi(seen[1]) + btoi(seen[2]) + btoi(seen[3]); n > 1 {
		return Rule{}, fmt.Errorf("rule %q: more than one of dst4, dst6, dsthost", s)
	}
	if err := r.checkCombination(); err != nil {
		return Rule{}, fmt.Errorf("rule %q: %w", s, err)
	}
	return r, nil
}

// set stores one key's value and returns the key's index for the
// repeated-key check.
func (r *Rule) set(key, val string) (int, error) {
	switch key {
	case keyAction:
		switch val {
		case "accept":
			r.Action = Accept
		case "drop":
			r.Action = Drop
		default:
			return 0, errors.New("action must be accept or drop")
		}
		return 0, nil
	case keyDst4, keyDst6:
		p, err := netip.ParsePrefix(val)
		if err != nil {
			return 0, fmt.Errorf("want address/length: %w", err)
		}
		// dom0 passes a user's "10.1.2.3/24" through unchanged and
		// iptables/nftables match it as 10.1.2.0/24; do the same.
		p = p.Masked()
		if key == keyDst4 {
			if !p.Addr().Is4() {
				return 0, errors.New("not an IPv4 prefix")
			}
			r.Prefix = p
			return 1, nil
		}
		if !p.Addr().Is6() {
			return 0, errors.New("not an IPv6 prefix")
		}
		r.Prefix = p
		return 2, nil
	case keyDstHost:
		if err := checkHostName(val); err != nil {
			return 0, err
		}
		r.Host = val
		return 3, nil
	case keyProto:
		switch val {
		case "tcp":
			r.Proto = ProtoTCP
		case "udp":
			r.Proto = ProtoUDP
		case "icmp":
			r.Proto = ProtoICMP
		default:
			return 0, errors.New("proto must be tcp, udp or icmp")
		}
		return 4, nil
	case keySpecialTarget:
		if val != "dns" {
			return 0, errors.New("specialtarget must be dns")
		}
		r.DNS = true
		return 5, nil
	case keyDstPorts:
		los, his, ok := strings.Cut(val, "-")
		if !ok {
			return 0, errors.New("want lo-hi (dom0 always writes a range, e.g. 443-443)")
		}
		lo, err := parseDecimal(los, 65535)
		if err != nil {
			return 0, fmt.Errorf("low port: %w", err)
		}
		hi, err := parseDecimal(his, 65535)
		if err != nil {
			return 0, fmt.Errorf("high port: %w", err)
		}
		if lo > hi {
			return 0, errors.New("port range reversed")
		}
		r.HasPorts, r.PortLo, r.PortHi = true, uint16(lo), uint16(hi)
		return 6, nil
	case keyICMPType:
		t, err := parseDecimal(val, 255)
		if err != nil {
			return 0, err
		}
		r.HasICMPType, r.ICMPType = true, uint8(t)
		return 7, nil
	}
	return 0, errors.New("unknown key")
}

// checkCombination rejects keys that contradict each other. dom0 itself
// refuses dstports without tcp/udp and icmptype without icmp; the Linux agent
// reads a missing proto as "whatever the other key implies", which we follow.
func (r *Rule) checkCombination() error {
	switch {
	case r.HasPorts && r.Proto == ProtoICMP:
		return errors.New("dstports with proto=icmp")
	case r.HasICMPType && (r.Proto == ProtoTCP || r.Proto == ProtoUDP):
		return fmt.Errorf("icmptype with proto=%v", r.Proto)
	case r.HasPorts && r.HasICMPType:
		return errors.New("dstports together with icmptype")
	case r.DNS && (r.Proto == ProtoICMP || r.HasICMPType):
		// DNS is TCP/UDP only; the nftables agent fails on this rule
		// (and so blocks everything), we reject it likewise.
		return errors.New("specialtarget=dns with icmp")
	}
	return nil
}

// checkHostName accepts what dom0 lets into a dsthost: lower-case letters,
// digits, '-', '_' and '.', in DNS-sized labels. IP literals are refused:
// dom0 turns those into dst4/dst6.
func checkHostName(s string) error {
	name := strings.TrimSuffix(s, ".")
	if name == "" || len(name) > 253 {
		return errors.New("dsthost must be 1..253 characters")
	}
	for label := range strings.SplitSeq(name, ".") {
		if label == "" || len(label) > 63 {
			return errors.New("dsthost label must be 1..63 characters")
		}
	}
	for _, c := range []byte(name) {
		if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-' || c == '_' || c == '.') {
			return fmt.Errorf("dsthost character %q not allowed (lower-case name only)", c)
		}
	}
	if _, err := netip.ParseAddr(name); err == nil {
		return errors.New("dsthost is an IP address (dom0 writes dst4/dst6)")
	}
	return nil
}

// parseDecimal parses a canonical decimal number (as Python's str(int) writes
// it: digits only, no sign, no leading zero) no larger than max.
func parseDecimal(s string, max uint64) (uint64, error) {
	if s == "" || len(s) > 1 && s[0] == '0' {
		return 0, fmt.Errorf("%q: not a canonical decimal number", s)
	}
	for _, c := range []byte(s) {
		if c < '0' || c > '9' {
			return 0, fmt.Errorf("%q: not a decimal number", s)
		}
	}
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil || n > max {
		return 0, fmt.Errorf("%q: out of range 0..%d", s, max)
	}
	return n, nil
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// String formats the rule the way dom0 writes it; ParseRule(r.String())
// gives r back.
func (r Rule) String() string {
	var b strings.Builder
	b.WriteString(keyAction + "=" + r.Action.String())
	switch {
	case r.Prefix.IsValid() && r.Prefix.Addr().Is4():
		b.WriteString(" " + keyDst4 + "=" + r.Prefix.String())
	case r.Prefix.IsValid():
		b.WriteString(" " + keyDst6 + "=" + r.Prefix.String())
	case r.Host != "":
		b.WriteString(" " + keyDstHost + "=" + r.Host)
	}
	if r.Proto != ProtoAny {
		b.WriteString(" " + keyProto + "=" + r.Proto.String())
	}
	if r.DNS {
		b.WriteString(" " + keySpecialTarget + "=dns")
	}
	if r.HasPorts {
		fmt.Fprintf(&b, " %s=%d-%d", keyDstPorts, r.PortLo, r.PortHi)
	}
	if r.HasICMPType {
		fmt.Fprintf(&b, " %s=%d", keyICMPType, r.ICMPType)
	}
	return b.String()
}

// match reports whether the rule matches p. Cheap header checks come first,
// the destination (which may ask the resolver) last. p.Dst must be unmapped.
func (r *Rule) match(p *Packet, env *Env) bool {
	proto := Proto(p.Proto)
	transport := proto == ProtoTCP || proto == ProtoUDP
	switch {
	case r.Proto != ProtoAny && proto != r.Proto:
		return false
	case (r.HasPorts || r.DNS) && !transport:
		// dstports or specialtarget=dns without proto: TCP or UDP.
		return false
	case r.HasICMPType && proto != ProtoICMP:
		// icmptype without proto implies ICMP.
		return false
	}
	if r.HasPorts && (p.DstPort < r.PortLo || p.DstPort > r.PortHi) {
		return false
	}
	if r.HasICMPType && p.ICMPType != r.ICMPType {
		return false
	}
	// The Linux agent skips a specialtarget=dns rule whose dstports is
	// anything but 53-53, so such a rule never matches here either.
	if r.DNS && (p.DstPort != dnsPort || !contains(env.DNS, p.Dst) ||
		r.HasPorts && (r.PortLo != dnsPort || r.PortHi != dnsPort)) {
		return false
	}
	switch {
	case r.Prefix.IsValid():
		// A dst6 prefix never contains an IPv4 address.
		return r.Prefix.Contains(p.Dst)
	case r.Host != "":
		if env.Resolver == nil {
			return r.Action == Drop
		}
		addrs, ok := env.Resolver.Lookup(r.Host)
		if rr, recent := env.Resolver.(RecentResolver); recent && env.Existing {
			if ok || r.Action == Accept {
				addrs, ok = rr.LookupRecent(r.Host)
			}
		}
		if !ok {
			// Unresolved: accept nothing, drop everything that got
			// this far (fail closed).
			return r.Action == Drop
		}
		return contains(addrs, p.Dst)
	}
	return true
}

func contains(addrs []netip.Addr, a netip.Addr) bool {
	for _, x := range addrs {
		if x.Unmap() == a {
			return true
		}
	}
	return false
}
