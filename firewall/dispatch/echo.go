package dispatch

import (
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/header"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/link"
)

// The firewall answers ping on its own address (the uplink IP, which is
// also the gateway its clients use), as the Linux sys-firewall does: from
// its clients, whose rules are not consulted (the Linux input chain does
// not consult them either), and from the uplink side. Nothing else
// addressed to it is answered.

// maxEchoLen bounds the echo requests answered, in bytes of IP datagram.
// A reply is never larger than its request (the request's IP options are
// not copied), so answering cannot amplify, and a batch of replies cannot
// exhaust the port's arena.
const maxEchoLen = 1500

// isEchoRequest reports whether pk is a whole ICMP echo request, however
// malformed otherwise; checkEcho says whether it is answered.
func isEchoRequest(pk *header.Parsed) bool {
	return pk.Kind == header.KindIPv4 && !pk.Fragment && pk.Proto == header.ProtoICMP && pk.ICMPType == header.ICMPEcho
}

// checkEcho decides whether the echo request pk describes in frame, which
// arrived on a link with MTU mtu and is to be answered to Ethernet address
// to, deserves a reply; if not, it returns why it is dropped. It changes
// nothing.
func checkEcho(pk *header.Parsed, frame []byte, to [6]byte, mtu int) (Reason, bool) {
	ipLen := pk.End - pk.IPOff
	switch {
	case pk.ICMPCode != 0:
		return ReasonToFirewall, false
	case to[0]&1 != 0 || to == [6]byte{}:
		// A reply to a broadcast or multicast sender would go to all.
		return ReasonInvalid, false
	case martian(pk.Src):
		return ReasonInvalid, false
	case ipLen > maxEchoLen || ipLen > mtu:
		return ReasonTooBig, false
	case !header.IPv4(frame[pk.IPOff:pk.End]).ChecksumValid():
		return ReasonInvalid, false
	case header.Fold(header.Sum(frame[pk.L4Off:pk.End], 0)) != 0xffff:
		return ReasonInvalid, false
	}
	return 0, true
}

// martian reports whether ip cannot be the source of a packet: "this"
// network, loopback, multicast, class E and the limited broadcast.
func martian(ip [4]byte) bool {
	return ip[0] == 0 || ip[0] == 127 || ip[0] >= 224
}

// answerEcho answers the echo request f (addressed to our IP) with an echo
// reply to Ethernet address to on the link it came from, if checkEcho
// allows it and limit has a token; c is the client that sent it (nil: the
// uplink side), for counting drops.
func (p *Port) answerEcho(c *client, limit *tokenBucket, to [6]byte, f *link.Frame, now int64) {
	d := p.d
	pk := &p.parsed
	if r, ok := checkEcho(pk, f.Data, to, p.mtu); !ok {
		d.drop(c, r)
		return
	}
	if !limit.allow(now) {
		d.drop(c, ReasonEchoLimit)
		return
	}
	req := f.Data[pk.L4Off:pk.End] // ICMP header, identifier, sequence, data
	total := header.IPv4MinLen + len(req)
	b := p.alloc(header.EthernetLen + total)
	if b == nil {
		d.drop(c, ReasonNoBuffer)
		return
	}
	header.PutEthernet(b, to, p.mac, header.EtherTypeIPv4)
	d.ipID++
	header.PutIPv4(b[header.EthernetLen:], uint16(total), d.ipID, 64, header.ProtoICMP, d.uplink.IP, pk.Src)
	m := header.ICMPv4(b[header.EthernetLen+header.IPv4MinLen:])
	copy(m, req)
	m[0] = header.ICMPEchoReply // code 0, as checkEcho required of the request
	m.SetChecksum(0)
	m.SetChecksum(header.Checksum(m))
	p.send(p, link.Frame{Data: b})
	d.stats.EchoReplies++
}
