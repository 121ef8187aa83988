package dispatch

import (
	"fmt"
	"strings"
)

// Reason says why a frame was dropped.
type Reason uint8

const (
	ReasonInvalid        Reason = iota // truncated or inconsistent frame
	ReasonIPv6                         // IPv6 is not forwarded yet
	ReasonEtherType                    // neither ARP, IPv4 nor IPv6
	ReasonUnknownPort                  // frame on a link with no client
	ReasonSpoof                        // client used a source address not its own
	ReasonBroadcast                    // broadcast or multicast destination
	ReasonToFirewall                   // IP traffic addressed to the firewall itself, other than ping
	ReasonClientToClient               // between two clients: always blocked
	ReasonRule                         // denied by the client's rules
	ReasonNoUplink                     // no netvm connected
	ReasonNATFull                      // NAT table full and nothing evictable
	ReasonPortsExhausted               // no free NAT port
	ReasonNoEntry                      // inbound packet without a NAT entry
	ReasonUplinkSpoof                  // inbound packet claiming a client's or our own source
	ReasonNotForUs                     // inbound packet not addressed to our uplink IP
	ReasonTTL                          // TTL expired
	ReasonFragment                     // fragment reassembly refused or gave up
	ReasonTooBig                       // larger than the outgoing MTU with DF set, or a ping to us too large to answer
	ReasonNoBuffer                     // no room to build a generated frame
	ReasonLocal                        // for the firewall's own sockets, not accepted
	ReasonEchoLimit                    // ping to us beyond the echo reply rate
	ReasonICMPError                    // client ICMP error not about one of its flows, to that flow's remote, within 576 bytes
	ReasonIPOptions                    // IPv4 header with options (source routes, record route...)
	ReasonMartian                      // destination in 0.0.0.0/8 or 127.0.0.0/8
	ReasonOffload                      // checksum or segmentation offload metadata that disagree with the headers
	ReasonSourceMAC                    // Ethernet source not the client's MAC, or a group address
	ReasonNATQuota                     // the client holds its share of the NAT table
	ReasonProtocol                     // accepted, but a protocol NAT cannot track (not TCP, UDP or an ICMP query)
	ReasonTCPReset                     // inbound TCP RST with an implausible sequence number
	numReasons
)

var reasonNames = [numReasons]string{
	"invalid", "ipv6", "ethertype", "unknown-port", "spoof", "broadcast",
	"to-firewall", "client-to-client", "rule", "no-uplink", "nat-full",
	"ports-exhausted", "no-entry", "uplink-spoof", "not-for-us", "ttl",
	"fragment", "too-big", "no-buffer", "local", "echo-limit", "icmp-error",
	"ip-options", "martian", "offload", "source-mac",
	"nat-quota", "protocol", "tcp-reset",
}

func (r Reason) String() string {
	if r < numReasons {
		return reasonNames[r]
	}
	return fmt.Sprintf("reason(%d)", uint8(r))
}

// Counters counts drops by reason.
type Counters [numReasons]uint64

// Total is the number of drops of every reason.
func (c *Counters) Total() uint64 {
	var n uint64
	for _, v := range c {
		n += v
	}
	return n
}

// String lists the non-zero counters, e.g. "spoof=3 rule=12".
func (c *Counters) String() string {
	var b strings.Builder
	for r, v := range c {
		if v == 0 {
			continue
		}
		if b.Len() > 0 {
			b.WriteByte(' ')
		}
		fmt.Fprintf(&b, "%s=%d", Reason(r), v)
	}
	return b.String()
}

// Stats is a snapshot of the dispatcher's counters.
type Stats struct {
	Forwarded   uint64 // frames forwarded, either direction
	Rejects     uint64 // ICMP rejects sent
	ARPReplies  uint64 // ARP replies sent
	EchoReplies uint64 // ICMP echo replies sent (ping of our address)
	ARPIgnored  uint64 // gateway ARP that was not a reply to our request, with another MAC
	// UplinksRefused counts uplink addressing refused by SetUplink.
	UplinksRefused uint64
	Drops          Counters             // every drop, by reason
	Clients        map[[4]byte]Counters // drops by client IP
	NATEntries     int
}

// logLimiter lets through at most burst lines per second of per-packet
// logging and reports how many it suppressed.
type logLimiter struct {
	logf       func(string, ...any)
	burst      int
	windowEnd  int64
	used       int
	suppressed int
}

func (l *logLimiter) log(now int64, format string, args ...any) {
	if now >= l.windowEnd {
		if l.suppressed > 0 {
			l.logf("dispatch: %d log lines suppressed", l.suppressed)
		}
		l.windowEnd, l.used, l.suppressed = now+1e9, 0, 0
	}
	if l.used >= l.burst {
		l.suppressed++
		return
	}
	l.used++
	l.logf(format, args...)
}

// tokenBucket rate-limits generated packets (ICMP rejects, echo replies).
type tokenBucket struct {
	perSec, burst float64
	tokens        float64
	last          int64
}

func (b *tokenBucket) allow(now int64) bool {
	if b.last != 0 {
		b.tokens += float64(now-b.last) / 1e9 * b.perSec
	} else {
		b.tokens = b.burst
	}
	b.last = now
	if b.tokens > b.burst {
		b.tokens = b.burst
	}
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}
