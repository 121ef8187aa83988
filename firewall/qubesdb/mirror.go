package qubesdb

import (
	"maps"
	"strings"
)

// QubesDB keys the firewall reads (written by dom0).
const (
	KeyIP           = "/qubes-ip"
	KeyGateway      = "/qubes-gateway"
	KeyNetmask      = "/qubes-netmask"
	KeyPrimaryDNS   = "/qubes-primary-dns"
	KeySecondaryDNS = "/qubes-secondary-dns"
	KeyConnectedIPs = "/connected-ips"
	// FirewallDir holds one directory per client IP: FirewallDir+ip+"/policy"
	// and FirewallDir+ip+"/NNNN" are the rules, FirewallDir+ip (no slash)
	// is the commit marker dom0 writes last.
	FirewallDir = "/qubes-firewall/"
)

// Uplink is the firewall's own addressing towards its netvm; a field is ""
// when its key is absent.
type Uplink struct {
	IP, Gateway, Netmask, PrimaryDNS, SecondaryDNS string
}

// EventKind says what an Event reports.
type EventKind int

const (
	// EventSnapshot: after a (re)connection. AllRules, Uplink and
	// ConnectedIPs are complete; everything known before is void.
	EventSnapshot EventKind = iota
	// EventRules: dom0 committed the rules of client IP (Rules), or removed
	// the commit marker (Rules nil: the client has no rules, deny all).
	EventRules
	// EventUplink: Uplink holds the new settings.
	EventUplink
	// EventConnectedIPs: ConnectedIPs holds the new list.
	EventConnectedIPs
)

func (k EventKind) String() string {
	switch k {
	case EventSnapshot:
		return "snapshot"
	case EventRules:
		return "rules"
	case EventUplink:
		return "uplink"
	case EventConnectedIPs:
		return "connected-ips"
	}
	return "unknown"
}

// Event is a firewall-relevant change. Maps in it belong to the receiver.
type Event struct {
	Kind EventKind
	// IP and Rules for EventRules: Rules maps the entry names below
	// FirewallDir+IP+"/" ("policy", "0000", ...) to their values, as they
	// were when the marker was written. Gaps in the numbering are kept as
	// they are; parsing is the receiver's business.
	IP    string
	Rules map[string]string
	// AllRules for EventSnapshot: the rules of every client whose commit
	// marker exists, keyed by IP.
	AllRules     map[string]map[string]string
	Uplink       Uplink
	ConnectedIPs []string
}

// Mirror is a Handler that keeps a copy of the database and reports
// firewall-relevant events to a callback.
//
// Rules are reported only when dom0 writes the commit marker, never for the
// individual entries, so a half-written ruleset is never seen. Uplink and
// connected-ips changes are coalesced: they are reported at the next Flush
// (the end of the burst that the client had received), or just before the
// next rules event so that events keep their order, and only when the value
// differs from the one last reported. This needs no timers; a burst split
// across two reads may be reported as two events, the last one being the
// complete state.
//
// A Mirror is used by one goroutine (the client's).
type Mirror struct {
	report       func(Event)
	entries      map[string]string
	uplink       Uplink
	connectedIPs string
	uplinkDirty  bool
	connDirty    bool
}

var _ Handler = (*Mirror)(nil)

// NewMirror returns an empty mirror reporting to report.
func NewMirror(report func(Event)) *Mirror {
	return &Mirror{report: report, entries: make(map[string]string)}
}

// Value returns the mirrored value of path.
func (m *Mirror) Value(path string) (string, bool) {
	v, ok := m.entries[path]
	return v, ok
}

// Snapshot implements Handler.
func (m *Mirror) Snapshot(entries map[string]string) {
	m.entries = maps.Clone(entries)
	m.uplink, m.connectedIPs = m.currentUplink(), m.entries[KeyConnectedIPs]
	m.uplinkDirty, m.connDirty = false, false
	all := make(map[string]map[string]string)
	for p := range m.entries {
		if ip, ok := markerIP(p); ok {
			all[ip] = m.rules(ip)
		}
	}
	m.report(Event{Kind: EventSnapshot, AllRules: all, Uplink: m.uplink,
		ConnectedIPs: strings.Fields(m.connectedIPs)})
}

// Write implements Handler.
func (m *Mirror) Write(path, value string) {
	m.entries[path] = value
	m.changed(path, true)
}

// Remove implements Handler.
func (m *Mirror) Remove(path string) {
	if !strings.HasSuffix(path, "/") {
		if _, ok := m.entries[path]; ok {
			delete(m.entries, path)
			m.changed(path, false)
		}
		return
	}
	var gone []string
	for p := range m.entries {
		if strings.HasPrefix(p, path) {
			gone = append(gone, p)
		}
	}
	for _, p := range gone {
		delete(m.entries, p)
	}
	for _, p := range gone {
		m.changed(p, false)
	}
}

// Flush implements Handler: it reports coalesced changes.
func (m *Mirror) Flush() {
	if m.uplinkDirty {
		m.uplinkDirty = false
		if u := m.currentUplink(); u != m.uplink {
			m.uplink = u
			m.report(Event{Kind: EventUplink, Uplink: u})
		}
	}
	if m.connDirty {
		m.connDirty = false
		if s := m.entries[KeyConnectedIPs]; s != m.connectedIPs {
			m.connectedIPs = s
			m.report(Event{Kind: EventConnectedIPs, ConnectedIPs: strings.Fields(s)})
		}
	}
}

func (m *Mirror) changed(path string, written bool) {
	switch path {
	case KeyIP, KeyGateway, KeyNetmask, KeyPrimaryDNS, KeySecondaryDNS:
		m.uplinkDirty = true
		return
	case KeyConnectedIPs:
		m.connDirty = true
		return
	}
	ip, ok := markerIP(path)
	if !ok {
		return
	}
	m.Flush()
	ev := Event{Kind: EventRules, IP: ip}
	if written {
		ev.Rules = m.rules(ip)
	}
	m.report(ev)
}

func (m *Mirror) currentUplink() Uplink {
	return Uplink{IP: m.entries[KeyIP], Gateway: m.entries[KeyGateway], Netmask: m.entries[KeyNetmask],
		PrimaryDNS: m.entries[KeyPrimaryDNS], SecondaryDNS: m.entries[KeySecondaryDNS]}
}

// rules collects the entries of one client's directory.
func (m *Mirror) rules(ip string) map[string]string {
	dir := FirewallDir + ip + "/"
	r := make(map[string]string)
	for p, v := range m.entries {
		if name, ok := strings.CutPrefix(p, dir); ok {
			r[name] = v
		}
	}
	return r
}

// markerIP recognises a commit marker FirewallDir+ip.
func markerIP(path string) (string, bool) {
	ip, ok := strings.CutPrefix(path, FirewallDir)
	if !ok || ip == "" || strings.Contains(ip, "/") {
		return "", false
	}
	return ip, true
}
