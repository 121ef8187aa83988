package dispatch

import (
	"encoding/binary"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/header"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/link"
)

// reject answers a denied TCP or UDP packet or ICMP request from client c
// with ICMP "communication administratively prohibited", like the Linux
// firewall VM's REJECT (qubes-firewall's "reject with icmp
// admin-prohibited"), so that the client fails fast instead of timing out.
// Rejects are rate-limited per client; other denied traffic (ICMP errors
// and replies, other protocols) is dropped silently: no ICMP error answers
// an ICMP error (RFC 1122 3.2.2).
func (p *Port) reject(c *client, frame []byte, now int64) {
	pk := &p.parsed
	switch {
	case pk.Proto == header.ProtoTCP, pk.Proto == header.ProtoUDP:
	case pk.Proto == header.ProtoICMP && header.ICMPIsRequest(pk.ICMPType):
	default:
		return
	}
	if !c.rejects.allow(now) {
		return
	}
	if p.icmpToClient(c, frame, header.ICMPDestUnreach, header.ICMPAdminProhibited, 0) {
		p.d.stats.Rejects++
	}
}

// fragNeeded tells client c that its DF packet does not fit the next hop.
func (p *Port) fragNeeded(c *client, frame []byte, mtu int) {
	p.icmpToClient(c, frame, header.ICMPDestUnreach, header.ICMPFragNeeded, uint16(mtu))
}

// icmpToClient queues an ICMP error about the packet in frame (which c
// sent) back to c, from our address. The message quotes the packet's IP
// header and first 8 payload bytes (RFC 792).
func (p *Port) icmpToClient(c *client, frame []byte, typ, code uint8, mtu uint16) bool {
	d := p.d
	pk := &p.parsed
	src := d.gatewayIPLocked()
	ip := header.IPv4(frame[pk.IPOff:pk.End])
	quote := ip.HeaderLen() + 8
	if quote > len(ip) {
		quote = len(ip)
	}
	total := header.IPv4MinLen + header.ICMPv4MinLen + quote
	b := p.alloc(header.EthernetLen + total)
	if b == nil {
		d.drop(c, ReasonNoBuffer)
		return false
	}
	header.PutEthernet(b, c.mac, p.mac, header.EtherTypeIPv4)
	d.ipID++
	header.PutIPv4(b[header.EthernetLen:], uint16(total), d.ipID, 64, header.ProtoICMP, src, c.ip)
	m := b[header.EthernetLen+header.IPv4MinLen:]
	m[0], m[1] = typ, code
	binary.BigEndian.PutUint32(m[2:], 0)
	binary.BigEndian.PutUint16(m[6:], mtu)
	copy(m[header.ICMPv4MinLen:], ip[:quote])
	header.ICMPv4(m).SetChecksum(header.Checksum(m))
	p.send(p, link.Frame{Data: b})
	return true
}

// gatewayIPLocked is the address clients know us by: our uplink address
// (Qubes gives clients the firewall's own IP as their gateway).
func (d *Dispatcher) gatewayIPLocked() [4]byte {
	if d.uplink != nil {
		return d.uplink.IP
	}
	return [4]byte{}
}
