package dispatch

import (
	"errors"
	"net/netip"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/header"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/link"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/nat"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/rules"
)

// Decide, then act. For an IPv4 packet, classifyOut (from a client) and
// classifyIn (from the uplink) read the current state — clients, uplink,
// rules, the NAT table — and return a verdict; they create, translate and
// rewrite nothing, so every rule of what may leave is in one place and
// can be read as such. applyOut and applyIn carry the verdict out: they
// count, answer, create the flow, translate and queue the frame.
//
// The steps before a verdict are the ones that cannot be one: ARP, which
// has its own state, and fragment reassembly, which turns fragments into
// the packet the verdict is about.

// action is what a verdict says to do.
type action uint8

const (
	actDrop       action = iota // count reason, send nothing
	actReject                   // count reason, answer with ICMP admin-prohibited
	actFragNeeded               // count ReasonTooBig, answer "fragmentation needed"
	actEcho                     // answer an echo request to our own address
	actLocal                    // deliver to one of our UDP sockets
	actForward                  // through flow (nil: a new flow) to port to
)

// A verdict is the decision about one packet.
type verdict struct {
	act     action
	reason  Reason
	flow    *nat.Entry // actForward: the existing flow, or nil to create one
	icmpErr bool       // actForward: an ICMP error about flow
	to      *Port      // actForward: where it goes
	client  *client    // inbound actForward: the client it goes to
	local   *UDPConn   // actLocal
}

func dropped(r Reason) verdict { return verdict{act: actDrop, reason: r} }

// classifyOut decides the fate of an IPv4 packet (reassembled) that client
// c sent from its own address.
func (p *Port) classifyOut(c *client, f *link.Frame, now int64) verdict {
	d := p.d
	pk := &p.parsed
	dst := pk.Dst
	u := d.uplink
	switch {
	case dst[0] >= 224 || dst == [4]byte{255, 255, 255, 255}:
		return dropped(ReasonBroadcast)
	case dst[0] == 0 || dst[0] == 127:
		return dropped(ReasonMartian)
	case u != nil && u.subnetEdge(dst):
		// A directed broadcast to the netvm's subnet.
		return dropped(ReasonBroadcast)
	case u != nil && dst == u.IP:
		// Anti-spoofing has run; the client's rules do not apply here.
		if isEchoRequest(pk) {
			return verdict{act: actEcho}
		}
		// Rejected as the Linux firewall VM's input chain does.
		return verdict{act: actReject, reason: ReasonToFirewall}
	}
	if other, ok := d.clients[dst]; ok && !d.isBSDGateway(other) {
		return dropped(ReasonClientToClient)
	}
	if u == nil {
		return dropped(ReasonNoUplink)
	}
	if pk.TTL <= 1 {
		// Before NAT, so an expiring packet touches no entry.
		return dropped(ReasonTTL)
	}
	if tooBig(f, pk, u.Port.mtu) {
		// Before NAT: "fragmentation needed" must quote the header the
		// client sent, or its kernel cannot match it to the socket and
		// path MTU discovery black-holes the connection.
		return verdict{act: actFragNeeded, reason: ReasonTooBig, to: u.Port}
	}
	if pk.Proto == header.ProtoICMP && header.ICMPIsError(pk.ICMPType) {
		// An error about a packet the client received through NAT; only
		// to that flow's remote end (nat.Table.ICMPErrorOut).
		e := d.nat.ICMPErrorOut(f.Data, pk, now)
		if e == nil {
			return dropped(ReasonICMPError)
		}
		return verdict{act: actForward, flow: e, icmpErr: true, to: u.Port}
	}
	if e := d.nat.LookupOut(pk, now); e != nil {
		return verdict{act: actForward, flow: e, to: u.Port}
	}
	v := d.rulesLocked(c.ip).Match(rules.Packet{
		Dst: netip.AddrFrom4(dst), Proto: pk.Proto, DstPort: pk.DstPort, ICMPType: pk.ICMPType,
	}, d.envLocked())
	if v.Action != rules.Accept {
		return verdict{act: actReject, reason: ReasonRule}
	}
	if pk.Proto == header.ProtoICMP && !header.ICMPIsRequest(pk.ICMPType) {
		// Only requests open ICMP flows.
		return dropped(ReasonRule)
	}
	return verdict{act: actForward, to: u.Port} // a new flow
}

// applyOut carries out v for the packet in f from client c.
func (p *Port) applyOut(c *client, f *link.Frame, v verdict, now int64) {
	d := p.d
	pk := &p.parsed
	switch v.act {
	case actDrop:
		d.drop(c, v.reason)
		return
	case actReject:
		d.drop(c, v.reason)
		p.reject(c, f.Data, now)
		return
	case actFragNeeded:
		d.drop(c, ReasonTooBig)
		if !(pk.Proto == header.ProtoICMP && header.ICMPIsError(pk.ICMPType)) {
			p.fragNeeded(c, f.Data, v.to.mtu)
		}
		return
	case actEcho:
		p.answerEcho(c, &c.echoes, c.mac, f, now)
		return
	case actForward:
	default:
		d.drop(c, ReasonInvalid) // not a verdict for this direction
		return
	}
	u := d.uplink
	e := v.flow
	switch {
	case v.icmpErr:
		if !nat.RewriteICMPErrorOut(e, f.Data, pk) {
			d.drop(c, ReasonICMPError)
			return
		}
	case e == nil:
		var err error
		if e, err = d.nat.Create(pk, u.IP, now); err != nil {
			r := ReasonNATFull
			switch {
			case errors.Is(err, nat.ErrPortsExhausted):
				r = ReasonPortsExhausted
			case errors.Is(err, nat.ErrClientQuota):
				r = ReasonNATQuota
			case errors.Is(err, nat.ErrUnsupported):
				r = ReasonProtocol
			}
			d.drop(c, r)
			d.log.log(now, "dispatch: client %v: new flow refused: %v", netip.AddrFrom4(c.ip), err)
			return
		}
		fallthrough
	default:
		d.nat.TranslateOut(e, f.Data, pk, csumMode(f), now)
	}
	header.IPv4(f.Data[pk.IPOff:]).DecTTL()
	header.Ethernet(f.Data).SetSrc(v.to.mac)
	header.Ethernet(f.Data).SetDst(d.gwMAC)
	p.forward(c, v.to, f)
}

// classifyIn decides the fate of an IPv4 packet (reassembled) that came
// from the uplink addressed to our uplink address, from a source that is
// neither a client nor ourselves.
func (p *Port) classifyIn(f *link.Frame, now int64) verdict {
	d := p.d
	pk := &p.parsed
	if isEchoRequest(pk) {
		// NAT entries translate replies; no request ever matches one.
		return verdict{act: actEcho}
	}
	if pk.Proto == header.ProtoUDP {
		if conn, ok := d.local[pk.DstPort]; ok {
			return verdict{act: actLocal, local: conn}
		}
	}
	if pk.TTL <= 1 {
		return dropped(ReasonTTL)
	}
	var e *nat.Entry
	icmpErr := pk.Proto == header.ProtoICMP && header.ICMPIsError(pk.ICMPType)
	if icmpErr {
		e = d.nat.ICMPErrorIn(f.Data, pk, now)
	} else if e = d.nat.LookupIn(pk, now); e != nil && !e.AcceptsIn(pk) {
		return dropped(ReasonTCPReset)
	}
	if e == nil {
		return dropped(ReasonNoEntry)
	}
	c, ok := d.clients[e.ClientIP()]
	if !ok {
		return dropped(ReasonNoEntry)
	}
	return verdict{act: actForward, flow: e, icmpErr: icmpErr, to: c.port, client: c}
}

// applyIn carries out v for the packet in f from the uplink.
func (p *Port) applyIn(f *link.Frame, v verdict, now int64) {
	d := p.d
	pk := &p.parsed
	switch v.act {
	case actDrop:
		d.drop(nil, v.reason)
		return
	case actEcho:
		// The reply goes back to the frame's sender: the gateway (or, in
		// BSD mode, the netvm client).
		p.answerEcho(nil, &d.echoes, header.Ethernet(f.Data).Src(), f, now)
		return
	case actLocal:
		v.local.deliver(pk, f)
		return
	case actForward:
	default:
		d.drop(nil, ReasonInvalid) // not a verdict for this direction
		return
	}
	if v.icmpErr {
		if !nat.RewriteICMPErrorIn(v.flow, f.Data, pk) {
			d.drop(nil, ReasonNoEntry)
			return
		}
	} else {
		d.nat.TranslateIn(v.flow, f.Data, pk, csumMode(f), now)
	}
	c := v.client
	header.IPv4(f.Data[pk.IPOff:]).DecTTL()
	header.Ethernet(f.Data).SetSrc(v.to.mac)
	header.Ethernet(f.Data).SetDst(c.mac)
	p.forward(c, v.to, f)
}
