package dispatch

import (
	"net"
	"net/netip"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/header"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/link"
)

const arpFrameLen = header.EthernetLen + header.ARPLen

// clientARP answers a client's who-has for any address but its own with
// our MAC on its link: every destination is reached through us. Nothing is
// learnt from client ARP.
func (p *Port) clientARP(c *client, frame []byte) {
	a := header.ARP(frame[header.EthernetLen:])
	if a.Op() != header.ARPRequest || a.TargetIP() == c.ip {
		return
	}
	p.arpReply(frame)
}

// uplinkARP answers who-has for our uplink address and learns the
// gateway's MAC, but only from a reply to our own who-has: a request or a
// gratuitous ARP naming the gateway with another MAC would otherwise
// black-hole all outbound traffic until the next change. Anything else the
// gateway says is counted and ignored; until a reply arrives the fallback
// MAC (Qubes' fixed backend MAC) stays in use.
func (p *Port) uplinkARP(u *Uplink, frame []byte) {
	d := p.d
	a := header.ARP(frame[header.EthernetLen:])
	if a.SenderIP() == u.Gateway && !d.isBSDGatewayIP(u.Gateway) {
		mac := a.SenderMAC()
		switch {
		case a.Op() != header.ARPReply || a.TargetIP() != u.IP || a.TargetMAC() != p.mac || !d.arpAsked:
			if mac != d.gwMAC {
				d.stats.ARPIgnored++
			}
		case mac[0]&1 == 0 && mac != [6]byte{}:
			d.arpAsked = false
			if mac != d.gwMAC || !d.gwKnown {
				d.logf("dispatch: gateway %v is at %v", netip.AddrFrom4(u.Gateway), net.HardwareAddr(mac[:]))
			}
			d.gwMAC, d.gwKnown = mac, true
		}
	}
	if a.Op() == header.ARPRequest && a.TargetIP() == u.IP {
		p.arpReply(frame)
	}
}

// arpReply queues the answer to the ARP request in frame: the target IP is
// at our MAC.
func (p *Port) arpReply(req []byte) {
	a := header.ARP(req[header.EthernetLen:])
	b := p.alloc(arpFrameLen)
	if b == nil {
		p.d.drop(nil, ReasonNoBuffer)
		return
	}
	header.PutEthernet(b, a.SenderMAC(), p.mac, header.EtherTypeARP)
	header.PutARP(b[header.EthernetLen:], header.ARPReply, p.mac, a.TargetIP(), a.SenderMAC(), a.SenderIP())
	p.send(p, link.Frame{Data: b})
	p.d.stats.ARPReplies++
}

// sendARPLocked queues an ARP request from outside a port's Input (on
// uplink changes and ticks); unlock sends it. With dstMAC broadcast and
// targetIP == ourIP it is a gratuitous ARP announcing our address.
func (d *Dispatcher) sendARPLocked(p *Port, op uint16, ourIP [4]byte, targetMAC [6]byte, targetIP [4]byte) {
	b := make([]byte, arpFrameLen)
	header.PutEthernet(b, header.BroadcastMAC, p.mac, header.EtherTypeARP)
	header.PutARP(b[header.EthernetLen:], op, p.mac, ourIP, targetMAC, targetIP)
	d.later.send(p, link.Frame{Data: b})
}
