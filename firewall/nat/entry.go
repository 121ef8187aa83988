package nat

import (
	"time"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/header"
)

// Tuple is a flow key: packed, comparable and pointer-free so that it hashes
// fast as a map key. For TCP and UDP it holds the ports; for ICMP queries
// SrcPort is the identifier and DstPort is 0.
type Tuple struct {
	Proto            uint8
	Src, Dst         [4]byte
	SrcPort, DstPort uint16
}

// State is where a flow stands; it selects the idle timeout.
type State uint8

const (
	StateNew       State = iota // UDP or ICMP query, no reply seen
	StateReplied                // UDP or ICMP query, a reply was seen
	TCPSynSent                  // TCP, nothing seen from the remote yet
	TCPEstablished              // TCP, the remote answered (SYN-ACK or ACK)
	TCPFinWait                  // TCP, FIN seen in one direction
	TCPClosing                  // TCP, FIN seen in both directions
	TCPReset                    // TCP, RST seen in either direction
)

var stateNames = [...]string{"new", "replied", "syn-sent", "established", "fin-wait", "closing", "reset"}

func (s State) String() string {
	if int(s) < len(stateNames) {
		return stateNames[s]
	}
	return "unknown"
}

// Timeouts are idle timeouts per state: an entry expires this long after
// the last packet that refreshed it. A zero field takes its default.
type Timeouts struct {
	TCPSynSent     time.Duration // default 4 min: RFC 5382 REQ-5, "transitory" (partially open) at least 4 min
	TCPEstablished time.Duration // default 2 h 4 min: RFC 5382 REQ-5 minimum for established connections
	TCPFinWait     time.Duration // default 4 min: RFC 5382 REQ-5, "transitory" (closing)
	TCPClosing     time.Duration // default 2 min: FIN both ways, 2*MSL of TIME-WAIT (RFC 9293 3.4.2)
	TCPReset       time.Duration // default 10 s: only stray retransmissions follow a RST (Linux "close")
	UDP            time.Duration // default 30 s: unreplied, as DESIGN and Linux (below RFC 4787's 2 min: nobody relies on a one-way mapping)
	UDPReplied     time.Duration // default 2 min: RFC 4787 REQ-5 minimum for a mapping in use
	ICMP           time.Duration // default 60 s: RFC 5508 REQ-1 (query mappings at least 60 s)
}

// DefaultTimeouts returns what the zero Timeouts means.
func DefaultTimeouts() Timeouts { return defaultTimeouts }

var defaultTimeouts = Timeouts{
	TCPSynSent:     4 * time.Minute,
	TCPEstablished: 2*time.Hour + 4*time.Minute,
	TCPFinWait:     4 * time.Minute,
	TCPClosing:     2 * time.Minute,
	TCPReset:       10 * time.Second,
	UDP:            30 * time.Second,
	UDPReplied:     2 * time.Minute,
	ICMP:           60 * time.Second,
}

func (to Timeouts) withDefaults() Timeouts {
	d := defaultTimeouts
	for _, f := range [...]struct{ v, def *time.Duration }{
		{&to.TCPSynSent, &d.TCPSynSent}, {&to.TCPEstablished, &d.TCPEstablished},
		{&to.TCPFinWait, &d.TCPFinWait}, {&to.TCPClosing, &d.TCPClosing},
		{&to.TCPReset, &d.TCPReset}, {&to.UDP, &d.UDP},
		{&to.UDPReplied, &d.UDPReplied}, {&to.ICMP, &d.ICMP},
	} {
		if *f.v <= 0 {
			*f.v = *f.def
		}
	}
	return to
}

func (to *Timeouts) of(proto uint8, s State) int64 {
	switch s {
	case TCPSynSent:
		return int64(to.TCPSynSent)
	case TCPEstablished:
		return int64(to.TCPEstablished)
	case TCPFinWait:
		return int64(to.TCPFinWait)
	case TCPClosing:
		return int64(to.TCPClosing)
	case TCPReset:
		return int64(to.TCPReset)
	}
	if proto == header.ProtoICMP {
		return int64(to.ICMP)
	}
	if s == StateReplied {
		return int64(to.UDPReplied)
	}
	return int64(to.UDP)
}

// Entry flags.
const (
	flagLive    uint8 = 1 << iota // in use (else on the free list)
	flagAssured                   // a reply was seen: on the assured LRU list
	flagFinOut                    // TCP FIN seen from the client
	flagFinIn                     // TCP FIN seen from the remote
)

// Entry is one translated flow. Entries live in a slab owned by the Table:
// a *Entry stays valid only until the next Table call that may remove
// entries (Create, Expire, Flush*, and lookups, which drop expired entries).
type Entry struct {
	ct      Tuple   // client ip:port -> remote ip:port, as the client sends
	natPort uint16  // our port (or ICMP identifier) on the uplink
	uplink  [4]byte // our uplink address the flow is masqueraded to
	state   State
	flags   uint8
	slot    uint8 // index of the uplink's port map in Table.uplinks
	tick    uint8 // lruTick of the entry's last move to the front of its list
	expires int64 // monotonic ns
	prevLRU int32 // neighbours in the LRU list (toward the head), -1 = none
	nextLRU int32 // toward the tail; also links the free list
	idx     int32 // own index in the slab
	// seq is what an inbound RST is checked against: in TCPSynSent the
	// client's SYN sequence number + 1 (a RST must acknowledge it), later
	// the remote's next sequence number as the client last acknowledged
	// it. It and tick fill what was padding: the entry stays 48 bytes.
	seq uint32
}

// rstWindow is how far from the client's last acknowledgement an inbound
// RST's sequence number may be (RFC 5961 3.2 accepts it within the
// receive window; the window's scale is not tracked, so a fixed bound that
// covers usual windows). An off-path attacker must guess within it.
const rstWindow = 1 << 20

// AcceptsIn reports whether a packet from the remote fits the flow: a TCP
// RST must carry a plausible sequence number (in reply to our SYN, the
// acknowledgement of it), so that a blind reset cannot end the flow.
func (e *Entry) AcceptsIn(p *header.Parsed) bool {
	if e.ct.Proto != header.ProtoTCP || p.TCPFlags&header.TCPRst == 0 {
		return true
	}
	if e.state == TCPSynSent {
		return p.TCPFlags&header.TCPAck != 0 && p.TCPAck == e.seq
	}
	return p.TCPSeq-e.seq+rstWindow < 2*rstWindow
}

// ClientTuple is the flow as the client sends it: client ip:port -> remote.
func (e *Entry) ClientTuple() Tuple { return e.ct }

// OutsideTuple is the flow as it leaves on the uplink: uplinkIP:natport -> remote.
func (e *Entry) OutsideTuple() Tuple {
	return Tuple{Proto: e.ct.Proto, Src: e.uplink, Dst: e.ct.Dst, SrcPort: e.natPort, DstPort: e.ct.DstPort}
}

func (e *Entry) ClientIP() [4]byte { return e.ct.Src }
func (e *Entry) UplinkIP() [4]byte { return e.uplink }
func (e *Entry) NATPort() uint16   { return e.natPort }
func (e *Entry) Proto() uint8      { return e.ct.Proto }
func (e *Entry) State() State      { return e.state }

// Expires is the monotonic time (ns) at which the entry expires unless a
// packet refreshes it.
func (e *Entry) Expires() int64 { return e.expires }

// Assured reports whether a reply was seen (TCP: the remote answered the
// handshake; UDP/ICMP: a reply came back). Eviction spares assured entries
// while unassured ones exist.
func (e *Entry) Assured() bool { return e.flags&flagAssured != 0 }

// Established reports whether a TCP entry completed its handshake and has
// not been reset or closed.
func (e *Entry) Established() bool { return e.state == TCPEstablished || e.state == TCPFinWait }

// track advances the entry's state for a packet in direction out (client
// to remote) or in. The caller moves the entry to the LRU list its
// assured flag now names.
func (e *Entry) track(p *header.Parsed, out bool) {
	switch e.ct.Proto {
	case header.ProtoTCP:
		f := p.TCPFlags
		if out && f&(header.TCPSyn|header.TCPAck) == header.TCPSyn {
			e.seq = p.TCPSeq + 1
		} else if out && f&header.TCPAck != 0 && e.state != TCPSynSent {
			e.seq = p.TCPAck
		} else if !out && f&(header.TCPSyn|header.TCPAck) == header.TCPSyn|header.TCPAck && e.state == TCPSynSent {
			e.seq = p.TCPSeq + 1 // what the client's ACK will acknowledge
		}
		switch {
		case f&header.TCPRst != 0:
			e.state = TCPReset
		case out && f&(header.TCPSyn|header.TCPAck) == header.TCPSyn && (e.state == TCPReset || e.state == TCPClosing):
			// The client opens a new connection from the same port.
			e.state = TCPSynSent
			e.flags &^= flagAssured | flagFinOut | flagFinIn
		case e.state == TCPReset:
		default:
			if !out && e.state == TCPSynSent && f&header.TCPAck != 0 {
				e.state = TCPEstablished
				e.flags |= flagAssured
			}
			if f&header.TCPFin != 0 {
				if out {
					e.flags |= flagFinOut
				} else {
					e.flags |= flagFinIn
				}
			}
			switch {
			case e.flags&(flagFinOut|flagFinIn) == flagFinOut|flagFinIn:
				e.state = TCPClosing
			case e.flags&(flagFinOut|flagFinIn) != 0 && e.state == TCPEstablished:
				e.state = TCPFinWait
			}
		}
	default:
		if !out {
			e.state = StateReplied
			e.flags |= flagAssured
		}
	}
}
