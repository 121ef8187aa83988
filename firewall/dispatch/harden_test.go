package dispatch

import (
	"encoding/binary"
	"errors"
	"testing"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/header"
)

// refix recomputes the IPv4 header checksum of frame after a test edited
// the header.
func refix(frame []byte) []byte {
	h := header.IPv4(frame[header.EthernetLen:])
	h.SetChecksum(0)
	h.SetChecksum(h.CalculateChecksum())
	return frame
}

// A client allowed only DNS cannot use ICMP errors quoting its DNS replies
// to send data to another host: before, the outer destination was never
// compared with the flow's remote and such errors were NATed and sent.
func TestICMPErrorToAnotherHostDropped(t *testing.T) {
	n := newTestNet(t)
	n.d.SetRules(client1, mustRules(map[string]string{"policy": "drop", "0000": "action=accept specialtarget=dns"}))
	q := pkt{srcMAC: c1MAC, src: client1, dst: dns1, proto: header.ProtoUDP, sport: 40000, dport: 53, payload: []byte("query")}
	up, _ := n.fromClient(0, q.bytes())
	sent := checkValid(t, one(t, up, "DNS query"))
	reply := pkt{srcMAC: gwMAC, dstMAC: upMAC, src: dns1, dst: fwIP, proto: header.ProtoUDP, sport: 53, dport: sent.SrcPort, payload: make([]byte, 1000)}
	c0, _, _ := n.fromUplink(reply.bytes())
	got := one(t, c0, "DNS reply")

	errTo := func(dst [4]byte, quoted int) []byte {
		e := pkt{srcMAC: c1MAC, src: client1, dst: dst, proto: header.ProtoICMP, sport: uint16(header.ICMPDestUnreach),
			icmpCode: header.ICMPPortUnreach, payload: got[header.EthernetLen : header.EthernetLen+quoted]}
		return e.bytes()
	}
	stranger := ip4("203.0.113.99")
	up, back := n.fromClient(0, errTo(stranger, len(got)-header.EthernetLen))
	none(t, up, "uplink: a 1,056-byte error to another host")
	none(t, back, "client")
	up, _ = n.fromClient(0, errTo(stranger, 28))
	none(t, up, "uplink: a short error to another host")
	up, _ = n.fromClient(0, errTo(dns1, len(got)-header.EthernetLen))
	none(t, up, "uplink: an error to the remote longer than 576 bytes")
	if c := n.d.Stats().Drops[ReasonICMPError]; c != 3 {
		t.Errorf("icmp-error drops = %d, want 3", c)
	}
	// The legitimate case: a short error to the flow's remote end.
	up, _ = n.fromClient(0, errTo(dns1, 28))
	out := checkValid(t, one(t, up, "error to the DNS server"))
	if out.Src != fwIP || out.Dst != dns1 {
		t.Fatalf("error sent %v -> %v", out.Src, out.Dst)
	}
}

// A DF packet too large for the uplink gets "fragmentation needed" that
// quotes what the client sent (its address and port), not the packet after
// NAT, so that the client's kernel matches it and lowers the route's MTU.
func TestFragNeededQuotesTheClientsPacket(t *testing.T) {
	n := newTestNetMTU(t, 1280)
	big := pkt{srcMAC: c1MAC, src: client1, dst: remote, proto: header.ProtoTCP, sport: 40000, dport: 443, tcpFlags: header.TCPAck, payload: make([]byte, 1400)}.bytes()
	header.IPv4(big[header.EthernetLen:]).SetFragment(true, false, 0)
	refix(big)
	orig := append([]byte(nil), big...)
	up, back := n.fromClient(0, big)
	none(t, up, "uplink")
	f := one(t, back, "frag needed")
	p := checkValid(t, f)
	m := header.ICMPv4(f[p.L4Off:p.End])
	if m.Type() != header.ICMPDestUnreach || m.Code() != header.ICMPFragNeeded || m.Seq() != 1280 {
		t.Fatalf("ICMP %d/%d mtu %d, want 3/4 mtu 1280", m.Type(), m.Code(), m.Seq())
	}
	quote := m.Quoted()
	if string(quote) != string(orig[header.EthernetLen:header.EthernetLen+28]) {
		t.Fatalf("quote\n got % x\nwant % x (the client's header and ports)", quote, orig[header.EthernetLen:header.EthernetLen+28])
	}
	if n.d.NATStats().Created != 0 || n.d.Stats().NATEntries != 0 {
		t.Error("a packet that cannot leave created a NAT entry")
	}
	// Without DF it is fragmented to the uplink's MTU.
	header.IPv4(orig[header.EthernetLen:]).SetFragment(false, false, 0)
	up, _ = n.fromClient(0, refix(orig))
	if len(up) != 2 {
		t.Fatalf("%d frames on the uplink, want 2 fragments", len(up))
	}
}

// Packets with IP options, a bad header checksum, or a martian destination
// are dropped and counted, in either direction.
func TestMalformedAndMartianDropped(t *testing.T) {
	n := newTestNet(t)
	ok := pkt{srcMAC: c1MAC, src: client1, dst: remote, proto: header.ProtoUDP, sport: 4000, dport: 53}
	up, _ := n.fromClient(0, ok.bytes())
	sent := checkValid(t, one(t, up, "the genuine datagram"))

	withOptions := func(b []byte) []byte {
		// A loose source route naming client 2, then end of options.
		lsrr := []byte{0x83, 7, 4, client2[0], client2[1], client2[2], client2[3], 0}
		o := make([]byte, 0, len(b)+8)
		o = append(o, b[:header.EthernetLen+header.IPv4MinLen]...)
		o = append(o, lsrr...)
		o = append(o, b[header.EthernetLen+header.IPv4MinLen:]...)
		h := header.IPv4(o[header.EthernetLen:])
		o[header.EthernetLen] = 0x47
		h.SetTotalLen(uint16(len(o) - header.EthernetLen))
		return refix(o)
	}
	badSum := ok.bytes()
	badSum[header.EthernetLen+10] ^= 0xff
	martian := ok
	martian.dst = ip4("127.0.0.1")
	zero := ok
	zero.dst = ip4("0.1.2.3")
	for _, tc := range []struct {
		name  string
		frame []byte
		r     Reason
	}{
		{"source route", withOptions(ok.bytes()), ReasonIPOptions},
		{"bad IP checksum", badSum, ReasonInvalid},
		{"loopback destination", martian.bytes(), ReasonMartian},
		{"0/8 destination", zero.bytes(), ReasonMartian},
	} {
		before := n.d.Stats().Drops[tc.r]
		up, back := n.fromClient(0, tc.frame)
		none(t, up, tc.name+": uplink")
		none(t, back, tc.name+": client")
		if got := n.d.Stats().Drops[tc.r]; got != before+1 {
			t.Errorf("%s: %v drops %d, want %d", tc.name, tc.r, got, before+1)
		}
	}
	// Inbound: the reply to the genuine datagram arrives, with options it
	// does not.
	reply := pkt{srcMAC: gwMAC, dstMAC: upMAC, src: remote, dst: fwIP, proto: header.ProtoUDP, sport: 53, dport: sent.SrcPort}
	c0, _, _ := n.fromUplink(withOptions(reply.bytes()))
	none(t, c0, "inbound with options")
	bad := reply.bytes()
	binary.BigEndian.PutUint16(bad[header.EthernetLen+10:], 0x1234)
	c0, _, _ = n.fromUplink(bad)
	none(t, c0, "inbound with a bad IP checksum")
	c0, _, _ = n.fromUplink(reply.bytes())
	one(t, c0, "the genuine reply")
}

// arpReplyFrame is an ARP reply from sender (at mac) to target.
func arpReplyFrame(mac [6]byte, sender [4]byte, targetMAC [6]byte, target [4]byte) []byte {
	b := make([]byte, arpFrameLen)
	header.PutEthernet(b, targetMAC, mac, header.EtherTypeARP)
	header.PutARP(b[header.EthernetLen:], header.ARPReply, mac, sender, targetMAC, target)
	return b
}

// One forged ARP naming the gateway with a foreign MAC used to replace the
// gateway's MAC at once and black-hole all outbound traffic. Now only the
// reply to our own who-has counts, and a learnt MAC is checked again.
func TestForgedGatewayARPIgnored(t *testing.T) {
	n := newTestNet(t)
	out := pkt{srcMAC: c1MAC, src: client1, dst: remote, proto: header.ProtoUDP, sport: 5000, dport: 53}
	dstMAC := func() [6]byte {
		up, _ := n.fromClient(0, out.bytes())
		return header.Ethernet(one(t, up, "outbound")).Dst()
	}
	// The gateway answers our who-has from SetUplink.
	real := [6]byte{0x02, 0, 0, 0, 0, 0x01}
	n.fromUplink(arpReplyFrame(real, gwIP, upMAC, fwIP))
	if got := dstMAC(); got != real {
		t.Fatalf("outbound to %x, want the gateway's %x", got, real)
	}
	forged := [6]byte{0x02, 0xba, 0xd0, 0, 0, 0x66}
	gratuitous := make([]byte, arpFrameLen)
	header.PutEthernet(gratuitous, header.BroadcastMAC, forged, header.EtherTypeARP)
	header.PutARP(gratuitous[header.EthernetLen:], header.ARPRequest, forged, gwIP, [6]byte{}, gwIP)
	for _, f := range [][]byte{
		gratuitous,                               // a gratuitous ARP
		arpReplyFrame(forged, gwIP, upMAC, fwIP), // an unsolicited reply
		arpReplyFrame(forged, gwIP, header.BroadcastMAC, gwIP), // a gratuitous reply
	} {
		n.fromUplink(f)
		if got := dstMAC(); got != real {
			t.Fatalf("after a forged ARP outbound goes to %x, want %x", got, real)
		}
	}
	if got := n.d.Stats().ARPIgnored; got != 3 {
		t.Errorf("ARPIgnored = %d, want 3", got)
	}
	// The periodic check asks again; a changed MAC in the reply is taken.
	for range gatewayRecheck {
		n.d.Tick()
	}
	asked := false
	for _, f := range n.upPeer.TryRead() {
		if a := header.ARP(f.Data[header.EthernetLen:]); len(f.Data) >= arpFrameLen && a.Op() == header.ARPRequest && a.TargetIP() == gwIP {
			asked = true
		}
	}
	if !asked {
		t.Fatal("no who-has for the gateway within the recheck interval")
	}
	moved := [6]byte{0x02, 0, 0, 0, 0, 0x02}
	n.fromUplink(arpReplyFrame(moved, gwIP, upMAC, fwIP))
	if got := dstMAC(); got != moved {
		t.Fatalf("outbound to %x after the gateway's answer, want %x", got, moved)
	}
}

// Uplink addressing from QubesDB that cannot be a netvm's is refused: the
// uplink stays down (nothing leaves), the refusal is counted.
func TestBadUplinkAddressingRefused(t *testing.T) {
	out := pkt{srcMAC: c1MAC, src: client1, dst: remote, proto: header.ProtoUDP, sport: 5000, dport: 53}
	for _, tc := range []struct {
		name   string
		ip, gw [4]byte
	}{
		{"a client's address", client2, gwIP},
		{"0.0.0.0", [4]byte{}, gwIP},
		{"0/8", ip4("0.1.2.3"), gwIP},
		{"broadcast", ip4("255.255.255.255"), gwIP},
		{"multicast", ip4("224.0.0.1"), gwIP},
		{"loopback", ip4("127.0.0.1"), gwIP},
		{"link-local", ip4("169.254.1.1"), gwIP},
		{"gateway loopback", fwIP, ip4("127.0.0.1")},
		{"gateway is a client", fwIP, client1},
		{"address is the gateway", gwIP, gwIP},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := newTestNet(t)
			if err := n.d.SetUplink(&Uplink{Port: n.up, IP: tc.ip, Gateway: tc.gw}); !errors.Is(err, ErrBadUplink) {
				t.Fatalf("SetUplink: %v, want ErrBadUplink", err)
			}
			up, _ := n.fromClient(0, out.bytes())
			none(t, up, "uplink")
			s := n.d.Stats()
			if s.UplinksRefused != 1 || s.Drops[ReasonNoUplink] != 1 {
				t.Fatalf("refused %d, no-uplink drops %d; want 1 and 1", s.UplinksRefused, s.Drops[ReasonNoUplink])
			}
		})
	}
}
