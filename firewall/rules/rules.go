// Package rules parses the per-client firewall rules that dom0 writes into
// QubesDB under /qubes-firewall/<client-ip>/ and decides, for the first
// packet of a new flow, whether to accept or drop it.
//
// Parsing is strict and fails closed: any malformed entry turns the whole
// ruleset of that client into deny-all, and the error says which key and
// token were wrong. Matching is pure (no side effects, no allocation): it
// returns a Verdict and leaves NAT, rejects and logging to the caller.
//
// Semantics, following the Linux agent (qubes-core-agent-linux
// qubesagent/firewall.py) where it is defined:
//   - rules are tried in numeric order of their NNNN keys; the first match
//     wins; if none matches, the policy decides;
//   - dstports without proto means TCP or UDP; icmptype without proto means
//     ICMP;
//   - specialtarget=dns matches TCP/UDP port 53 to the DNS servers given in
//     Env; with dstports it matches only if the range includes 53, and then
//     only port 53;
//   - dst6 never matches (only IPv4 is forwarded);
//   - dsthost matches the resolver's current addresses; while the name is
//     unresolved an accept rule matches nothing and a drop rule matches every
//     packet that satisfies its other conditions (proto, ports, icmptype,
//     specialtarget).
package rules

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// Packet is what the matcher looks at: the first packet of a new flow.
type Packet struct {
	Dst      netip.Addr // IPv4 destination
	Proto    uint8      // IP protocol number
	DstPort  uint16     // TCP/UDP
	ICMPType uint8      // ICMP
}

// Resolver returns the current addresses of a dsthost name; ok=false while
// the name has not resolved (yet). It is called on the hot path and must not
// allocate: return a slice it owns and does not mutate afterwards.
type Resolver interface {
	Lookup(name string) (addrs []netip.Addr, ok bool)
}

// RecentResolver is a Resolver that also remembers the addresses a name
// resolved to recently. The dispatcher re-checks existing flows with it when
// rules change, so that a flow accepted under an earlier answer of a
// round-robin or CDN name is not cut because the current answer is another
// subset.
type RecentResolver interface {
	Resolver
	// LookupRecent returns the current addresses of name and those it had
	// recently; ok=false when it has neither.
	LookupRecent(name string) (addrs []netip.Addr, ok bool)
}

// Env is the per-evaluation context.
type Env struct {
	DNS      []netip.Addr // current DNS servers (/qubes-primary-dns, /qubes-secondary-dns)
	Resolver Resolver     // may be nil: every dsthost is unresolved
	// Existing says the packet is the first of a flow that already
	// exists: an accept dsthost rule then matches the name's recent
	// addresses too (when Resolver is a RecentResolver). A drop dsthost
	// rule matches recent addresses as well, and everything while the
	// name is unresolved, as for new flows.
	Existing bool
}

// Verdict is the outcome of Match.
type Verdict struct {
	Action Action
	Rule   int // index of the matching rule in numeric key order; -1 when the policy decided
}

func (v Verdict) String() string {
	if v.Rule < 0 {
		return v.Action.String() + " by policy"
	}
	return fmt.Sprintf("%v by rule #%d", v.Action, v.Rule)
}

// Ruleset is one client's rules. It is immutable after Parse and safe for
// concurrent Match.
type Ruleset struct {
	policy Action
	rules  []Rule
	keys   []string // the NNNN key of each rule, for String
	names  []string // distinct dsthost names
}

// DenyAll returns a ruleset that drops everything: no rules, policy drop.
func DenyAll() *Ruleset { return &Ruleset{policy: Drop} }

// policyKey is the entry holding the default action.
const policyKey = "policy"

// MaxRules bounds the rules of one client. A larger set is refused and the
// client denied everything (fail closed): the keys allow 10,000 rules, and
// every rule costs memory and time on each new flow. qvm-firewall sets of a
// few dozen rules are usual.
const MaxRules = 1000

// logRules is how many rules String lists before summarising the rest.
const logRules = 16

// Parse builds a ruleset from the entries below /qubes-firewall/<ip>/,
// keyed relative to it: "policy" and rules "0000" to "9999" (gaps allowed,
// every rule is used). On any error it returns DenyAll() and the error,
// never a nil ruleset.
func Parse(entries map[string]string) (*Ruleset, error) {
	rs, err := parse(entries)
	if err != nil {
		return DenyAll(), fmt.Errorf("firewall rules: %w", err)
	}
	return rs, nil
}

func parse(entries map[string]string) (*Ruleset, error) {
	rs := &Ruleset{}
	pol, ok := entries[policyKey]
	if !ok {
		return nil, errors.New("no policy key")
	}
	switch pol {
	case "accept":
		rs.policy = Accept
	case "drop":
		rs.policy = Drop
	default:
		return nil, fmt.Errorf("policy %q: must be accept or drop", pol)
	}
	keys := make([]string, 0, len(entries))
	for k := range entries {
		if k == policyKey {
			continue
		}
		if !isRuleKey(k) {
			return nil, fmt.Errorf("key %q: not policy and not a 4-digit rule number", k)
		}
		keys = append(keys, k)
	}
	if len(keys) > MaxRules {
		return nil, fmt.Errorf("%d rules: at most %d allowed", len(keys), MaxRules)
	}
	// Four digits each, so string order is numeric order.
	slices.Sort(keys)
	rs.rules = make([]Rule, 0, len(keys))
	for _, k := range keys {
		r, err := ParseRule(entries[k])
		if err != nil {
			return nil, fmt.Errorf("rule %s: %w", k, err)
		}
		rs.rules = append(rs.rules, r)
		if r.Host != "" && !slices.Contains(rs.names, r.Host) {
			rs.names = append(rs.names, r.Host)
		}
	}
	rs.keys = keys
	return rs, nil
}

func isRuleKey(k string) bool {
	if len(k) != 4 {
		return false
	}
	for _, c := range []byte(k) {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// Match decides the fate of the first packet of a new flow. It does not
// allocate.
func (r *Ruleset) Match(p Packet, env Env) Verdict {
	p.Dst = p.Dst.Unmap()
	for i := range r.rules {
		if r.rules[i].match(&p, &env) {
			return Verdict{Action: r.rules[i].Action, Rule: i}
		}
	}
	return Verdict{Action: r.policy, Rule: -1}
}

// Names returns the distinct dsthost names in rule order, for the resolver
// to resolve. The slice is the caller's.
func (r *Ruleset) Names() []string { return slices.Clone(r.names) }

// String describes the ruleset on one line, for logs: the policy and the
// first rules, then how many more there are.
func (r *Ruleset) String() string {
	var b strings.Builder
	b.WriteString("policy=" + r.policy.String())
	if len(r.rules) == 0 {
		b.WriteString(", no rules")
	}
	for i, rule := range r.rules {
		if i == logRules {
			fmt.Fprintf(&b, "; and %d more rules (%d in all)", len(r.rules)-logRules, len(r.rules))
			break
		}
		fmt.Fprintf(&b, "; #%d %s: %v", i, r.keys[i], rule)
	}
	return b.String()
}
