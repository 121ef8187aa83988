package dispatch

import (
	"bytes"
	"encoding/binary"
	"errors"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/link/linktest"
	"net/netip"
	"testing"
	"time"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/header"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/link"
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
		{"address is its subnet's broadcast", ip4("10.137.0.255"), gwIP},
		{"gateway is its subnet's network", fwIP, ip4("10.137.0.0")},
		{"netmask not a prefix", fwIP, gwIP},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := newTestNet(t)
			mask := ip4("255.255.255.0")
			if tc.name == "netmask not a prefix" {
				mask = ip4("255.0.255.0")
			}
			if err := n.d.SetUplink(&Uplink{Port: n.up, IP: tc.ip, Gateway: tc.gw, Netmask: mask}); !errors.Is(err, ErrBadUplink) {
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

// partialUDP is a UDP datagram from client 1 as a sender with checksum
// offload leaves it (the pseudo-header sum in the field), followed by pad
// bytes of Ethernet padding, and its offload metadata.
func partialUDP(payload, pad int) ([]byte, link.Offload) {
	b := pkt{srcMAC: c1MAC, src: client1, dst: remote, proto: header.ProtoUDP, sport: 4000, dport: 9000, payload: make([]byte, payload)}.bytes()
	for i := range b[42:] {
		b[42+i] = byte(i * 7)
	}
	l4len := uint16(len(b) - 34)
	binary.BigEndian.PutUint16(b[34+6:], header.Fold(header.PseudoHeaderSum(client1, remote, header.ProtoUDP, l4len)))
	b = append(b, make([]byte, pad)...)
	for i := len(b) - pad; i < len(b); i++ {
		b[i] = 0xee
	}
	return b, link.Offload{NeedsCsum: true, CsumStart: 34, CsumOffset: 6}
}

// Offload metadata that disagree with the headers are dropped and counted
// instead of being handed to the next kernel.
func TestOffloadMetadataChecked(t *testing.T) {
	tcp := pkt{srcMAC: c1MAC, src: client1, dst: remote, proto: header.ProtoTCP, sport: 40000, dport: 443, tcpFlags: header.TCPAck, payload: make([]byte, 4000)}.bytes()
	udp, udpOff := partialUDP(100, 0)
	good := link.Offload{NeedsCsum: true, CsumStart: 34, CsumOffset: 16, GSOType: link.GSOTCPv4, GSOSize: 1448, HdrLen: 54}
	for _, tc := range []struct {
		name  string
		frame []byte
		mod   func(o *link.Offload)
		ok    bool
	}{
		{"valid TSO", tcp, func(o *link.Offload) {}, true},
		{"valid TSO with ECN", tcp, func(o *link.Offload) { o.GSOType |= link.GSOECN }, true},
		{"valid UDP partial checksum", udp, nil, true},
		{"csum start not the transport header", tcp, func(o *link.Offload) { o.CsumStart = 40 }, false},
		{"csum offset not the TCP checksum", tcp, func(o *link.Offload) { o.CsumOffset = 6 }, false},
		{"TCP offset on UDP", udp, func(o *link.Offload) { *o = udpOff; o.CsumOffset = 16 }, false},
		{"TCP segmentation of UDP", udp, func(o *link.Offload) { *o = udpOff; o.GSOType, o.GSOSize = link.GSOTCPv4, 1400 }, false},
		{"IPv6 segmentation", tcp, func(o *link.Offload) { o.GSOType = link.GSOTCPv6 }, false},
		{"unknown segmentation", tcp, func(o *link.Offload) { o.GSOType = 9 }, false},
		{"segment size 0", tcp, func(o *link.Offload) { o.GSOSize = 0 }, false},
		{"header length past the frame", tcp, func(o *link.Offload) { o.HdrLen = 5000 }, false},
		{"ECN bit alone", tcp, func(o *link.Offload) { o.GSOType = link.GSOECN }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := newTestNet(t)
			o := udpOff
			if tc.mod != nil {
				o = good
				tc.mod(&o)
			}
			n.c[0].Input([]link.Frame{{Data: append([]byte(nil), tc.frame...), Offload: o}})
			out := n.upPeer.TryRead()
			if got := len(out) == 1; got != tc.ok {
				t.Fatalf("forwarded %d frames, want forwarded=%v", len(out), tc.ok)
			}
			if d := n.d.Stats().Drops[ReasonOffload]; (d == 0) != tc.ok {
				t.Fatalf("offload drops %d", d)
			}
		})
	}
}

// A partial checksum completed in software before fragmenting covers the
// packet only, not the Ethernet padding behind it; and a fragment train
// that does not fit the arena is not sent at all.
func TestCompletedChecksumIgnoresPadding(t *testing.T) {
	n := newTestNetMTU(t, 1280)
	b, off := partialUDP(1400, 12)
	n.c[0].Input([]link.Frame{{Data: b, Offload: off}})
	up := n.upPeer.TryRead()
	if len(up) != 2 {
		t.Fatalf("%d frames, want 2 fragments", len(up))
	}
	var dg []byte
	for _, f := range up {
		if f.Offload.NeedsCsum {
			t.Fatal("a fragment still asks for checksum offload")
		}
		dg = append(dg, header.IPv4(f.Data[14:]).Payload()...)
	}
	h := header.IPv4(up[0].Data[14:])
	if header.Fold(header.Sum(dg, header.PseudoHeaderSum(h.Src(), h.Dst(), header.ProtoUDP, uint16(len(dg))))) != 0xffff {
		t.Fatal("the reassembled datagram's UDP checksum is wrong")
	}
}

func TestNoPartialFragmentTrain(t *testing.T) {
	n := newTestNetMTU(t, 576)
	// Two datagrams of 60,000 bytes, reassembled and cut into 109
	// fragments each, use about 242 KiB of the 256 KiB arena; the third
	// (8,000 bytes) is still reassembled but its fragments do not fit.
	var frames []link.Frame
	for i, size := range []int{60000, 60000, 8000} {
		whole := pkt{srcMAC: c1MAC, src: client1, dst: remote, proto: header.ProtoUDP, sport: 4000, dport: 9000, payload: make([]byte, size)}.bytes()
		binary.BigEndian.PutUint16(whole[14+4:], uint16(100+i)) // IP ID
		for _, fr := range fragment(refix(whole), 1400) {
			frames = append(frames, link.Frame{Data: fr})
		}
	}
	n.c[0].Input(frames)
	up := n.upPeer.TryRead()
	if n.d.Stats().Drops[ReasonNoBuffer] == 0 {
		t.Fatalf("the arena never ran out (%d frames out): the test does not test", len(up))
	}
	// Every datagram that went out went out whole: offsets contiguous
	// from 0 to a last fragment.
	next := map[uint16]int{}
	done := map[uint16]bool{}
	for _, f := range up {
		h := header.IPv4(f.Data[14:])
		if h.FragOffset() != next[h.ID()] {
			t.Fatalf("datagram %d: fragment at %d, want %d", h.ID(), h.FragOffset(), next[h.ID()])
		}
		next[h.ID()] += len(h.Payload())
		if !h.MoreFragments() {
			done[h.ID()] = true
		}
	}
	for id := range next {
		if !done[id] {
			t.Errorf("datagram %d: a partial train of %d bytes went out", id, next[id])
		}
	}
	if !done[100] || !done[101] || next[102] != 0 {
		t.Fatalf("datagrams out: %v, want the first two whole and nothing of the third", next)
	}
}

// A client's frames must come from its own MAC, and no frame from a group
// (broadcast or multicast) source MAC is taken, from either side.
func TestSourceMACChecked(t *testing.T) {
	n := newTestNet(t)
	ok := pkt{srcMAC: c1MAC, src: client1, dst: remote, proto: header.ProtoUDP, sport: 4000, dport: 53}
	up, _ := n.fromClient(0, ok.bytes())
	one(t, up, "from the client's MAC")
	for _, mac := range [][6]byte{c2MAC, header.BroadcastMAC, {0x01, 0x00, 0x5e, 0, 0, 1}, {0x02, 0, 0, 0, 0, 9}} {
		bad := ok
		bad.srcMAC = mac
		up, back := n.fromClient(0, bad.bytes())
		none(t, up, "uplink")
		none(t, back, "client")
	}
	if got := n.d.Stats().Drops[ReasonSourceMAC]; got != 4 {
		t.Fatalf("source-mac drops %d, want 4", got)
	}
	// ARP from a foreign MAC gets no answer either.
	req := make([]byte, arpFrameLen)
	header.PutEthernet(req, header.BroadcastMAC, c2MAC, header.EtherTypeARP)
	header.PutARP(req[header.EthernetLen:], header.ARPRequest, c2MAC, client1, [6]byte{}, fwIP)
	_, back := n.fromClient(0, req)
	none(t, back, "ARP reply to a foreign MAC")
	// Inbound from a multicast source MAC.
	sent := checkValid(t, one(t, func() [][]byte { u, _ := n.fromClient(0, ok.bytes()); return u }(), "again"))
	reply := pkt{srcMAC: [6]byte{0x01, 0, 0x5e, 0, 0, 1}, dstMAC: upMAC, src: remote, dst: fwIP, proto: header.ProtoUDP, sport: 53, dport: sent.SrcPort}
	c0, _, _ := n.fromUplink(reply.bytes())
	none(t, c0, "inbound from a multicast MAC")
	reply.srcMAC = gwMAC
	c0, _, _ = n.fromUplink(reply.bytes())
	one(t, c0, "inbound from the gateway")
}

// rotatingResolver is a rules.RecentResolver whose answers the test sets.
type rotatingResolver struct{ cur, recent map[string][]netip.Addr }

func (r *rotatingResolver) Lookup(n string) ([]netip.Addr, bool) { a, ok := r.cur[n]; return a, ok }
func (r *rotatingResolver) LookupRecent(n string) ([]netip.Addr, bool) {
	a, ok := r.recent[n]
	return a, ok
}

// A dsthost name whose answer moves to another address (round robin, CDN)
// keeps established flows up: before, every refresh re-matched all flows
// against the current answer only and cut them. New flows follow the
// current answer; a rule change still cuts what the new rules deny.
func TestDsthostAddressChangeKeepsFlows(t *testing.T) {
	n := newTestNet(t)
	other := ip4("198.51.100.9")
	res := &rotatingResolver{
		cur:    map[string][]netip.Addr{"cdn.test": {netip.AddrFrom4(remote)}},
		recent: map[string][]netip.Addr{"cdn.test": {netip.AddrFrom4(remote)}},
	}
	n.d.SetResolver(res)
	cdnRules := map[string]string{"policy": "drop", "0000": "action=accept dsthost=cdn.test proto=tcp"}
	n.d.SetRules(client1, mustRules(cdnRules))
	seg := pkt{srcMAC: c1MAC, src: client1, dst: remote, proto: header.ProtoTCP, sport: 40000, dport: 443, tcpFlags: header.TCPSyn}
	up, _ := n.fromClient(0, seg.bytes())
	one(t, up, "SYN to the name's address")
	seg.tcpFlags = header.TCPAck

	// The name now resolves elsewhere; the old address is recent.
	res.cur["cdn.test"] = []netip.Addr{netip.AddrFrom4(other)}
	res.recent["cdn.test"] = []netip.Addr{netip.AddrFrom4(other), netip.AddrFrom4(remote)}
	up, _ = n.fromClient(0, seg.bytes())
	one(t, up, "established flow after the answer changed")
	// An unrelated rule change re-checks flows with the recent addresses.
	cdnRules["0001"] = "action=accept proto=udp dstports=53-53"
	n.d.SetRules(client1, mustRules(cdnRules))
	up, _ = n.fromClient(0, seg.bytes())
	one(t, up, "established flow after a rule change")
	// A new flow to the old address is not accepted.
	fresh := seg
	fresh.sport, fresh.tcpFlags = 40001, header.TCPSyn
	up, _ = n.fromClient(0, fresh.bytes())
	none(t, up, "a new flow to an address the name no longer has")
	// Rules without the name cut the flow.
	n.d.SetRules(client1, mustRules(map[string]string{"policy": "drop", "0000": "action=accept proto=udp"}))
	up, _ = n.fromClient(0, seg.bytes())
	none(t, up, "the flow after its rule went")
}

// lockCheckLink fails the test when the dispatcher writes to it with its
// lock held.
type lockCheckLink struct {
	link.Link
	t *testing.T
	d **Dispatcher
}

func (l *lockCheckLink) WriteBatch(f []link.Frame) (int, error) {
	if d := *l.d; d != nil {
		if !d.mu.TryLock() {
			l.t.Error("a frame was written with the dispatcher's lock held")
		} else {
			d.mu.Unlock()
		}
	}
	return l.Link.WriteBatch(f)
}

// Console logging and generated ARP frames happen after the lock is
// released: a slow console or link must not stall forwarding.
func TestNothingSlowUnderTheLock(t *testing.T) {
	var d *Dispatcher
	logged := 0
	d = New(Config{Logf: func(format string, args ...any) {
		logged++
		if !d.mu.TryLock() {
			t.Errorf("logged with the lock held: "+format, args...)
		} else {
			d.mu.Unlock()
		}
	}})
	upA, upB := linktest.NewPipe("eth0", upMAC, "netvm", gwMAC, 1500)
	up := d.Attach(&lockCheckLink{Link: upA, t: t, d: &d})
	if err := d.SetUplink(&Uplink{Port: up, IP: fwIP, Gateway: gwIP}); err != nil {
		t.Fatal(err)
	}
	if n := len(upB.TryRead()); n != 2 {
		t.Fatalf("%d ARP frames after SetUplink, want 2 (gratuitous, who-has)", n)
	}
	for range 10 {
		d.Tick()
	}
	up.Input([]link.Frame{{Data: arpReplyFrame([6]byte{2, 0, 0, 0, 0, 7}, gwIP, upMAC, fwIP)}})
	if logged < 2 {
		t.Fatalf("%d lines logged, want the uplink and gateway lines", logged)
	}
}

// The per-packet path of an existing flow allocates nothing, in either
// direction (a regression here shows as GC work at line rate).
func TestFastPathNoAllocs(t *testing.T) {
	n := newTestNet(t)
	out := pkt{srcMAC: c1MAC, src: client1, dst: remote, proto: header.ProtoUDP, sport: 40000, dport: 443, payload: make([]byte, 1400)}.bytes()
	up, _ := n.fromClient(0, out)
	sent := checkValid(t, one(t, up, "first packet"))
	in := pkt{srcMAC: gwMAC, dstMAC: upMAC, src: remote, dst: fwIP, proto: header.ProtoUDP, sport: 443, dport: sent.SrcPort, payload: make([]byte, 1400)}.bytes()
	c0, _, _ := n.fromUplink(in)
	one(t, c0, "first reply")
	n.d.mu.Lock()
	n.d.uplink.Port.link = nullLink{} // measure the dispatcher, not the pipes' copies
	n.d.clients[client1].port.link = nullLink{}
	n.d.mu.Unlock()
	outF, inF := []link.Frame{{}}, []link.Frame{{}}
	ob, ib := make([]byte, len(out)), make([]byte, len(in))
	allocs := testing.AllocsPerRun(1000, func() {
		copy(ob, out)
		outF[0] = link.Frame{Data: ob}
		n.c[0].Input(outF)
		copy(ib, in)
		inF[0] = link.Frame{Data: ib}
		n.up.Input(inF)
	})
	if allocs != 0 {
		t.Fatalf("%v allocations per packet pair of an existing flow, want 0", allocs)
	}
	if s := n.d.Stats(); s.Forwarded < 2000 || s.Drops.Total() != 0 {
		t.Fatalf("forwarded %d, drops %q: the packets did not take the fast path", s.Forwarded, s.Drops.String())
	}
}

// The network and broadcast addresses of the netvm's subnet are never
// forwarded to (a directed broadcast reaches every VM there); the rest of
// the subnet is, and a /31 has no such addresses.
func TestSubnetBroadcastDropped(t *testing.T) {
	n := newTestNet(t)
	if err := n.d.SetUplink(&Uplink{Port: n.up, IP: fwIP, Gateway: gwIP, Netmask: ip4("255.255.255.0")}); err != nil {
		t.Fatal(err)
	}
	n.upPeer.TryRead() // the gratuitous ARP and the gateway query
	to := func(dst [4]byte) pkt {
		return pkt{srcMAC: c1MAC, src: client1, dst: dst, proto: header.ProtoUDP, sport: 5000, dport: 9}
	}
	for _, dst := range []string{"10.137.0.255", "10.137.0.0"} {
		before := n.d.Stats().Drops[ReasonBroadcast]
		up, back := n.fromClient(0, to(ip4(dst)).bytes())
		none(t, up, dst+": uplink")
		none(t, back, dst+": client")
		if got := n.d.Stats().Drops[ReasonBroadcast]; got != before+1 {
			t.Errorf("%s: broadcast drops %d, want %d", dst, got, before+1)
		}
	}
	up, _ := n.fromClient(0, to(ip4("10.137.0.254")).bytes())
	one(t, up, "a host of the subnet")
	if err := n.d.SetUplink(&Uplink{Port: n.up, IP: fwIP, Gateway: ip4("10.137.0.11"), Netmask: ip4("255.255.255.254")}); err != nil {
		t.Fatal(err)
	}
	n.upPeer.TryRead()
	up, _ = n.fromClient(0, to(ip4("10.137.0.11")).bytes())
	one(t, up, "the other address of a /31")
}

// Fragmentation is byte work (copies, perhaps a 64 KiB checksum): the
// locked phase only queues the packet whole, marked to be cut; the cutting
// happens after the lock is released, and its outcome is counted then.
func TestFragmentationOutsideTheLock(t *testing.T) {
	n := newTestNetMTU(t, 1400)
	big := pkt{srcMAC: c1MAC, src: client1, dst: remote, proto: header.ProtoUDP, sport: 4000, dport: 9, payload: make([]byte, 3000)}.bytes()
	p := n.c[0]
	p.pending, p.arena = p.pending[:0], p.arena[:0]
	n.d.mu.Lock()
	p.input(&link.Frame{Data: big}, earlyGo, n.d.clock())
	n.d.mu.Unlock()
	if len(p.pending) != 1 || !p.pending[0].cut || len(p.pending[0].frame.Data) != len(big) || len(p.arena) != 0 {
		t.Fatalf("after the locked phase: %d pending (cut %v), arena %d bytes; want the whole packet, marked, nothing built",
			len(p.pending), len(p.pending) > 0 && p.pending[0].cut, len(p.arena))
	}
	before := n.d.Stats().Forwarded
	p.fragmentPending()
	p.flush()
	frags := data(n.upPeer.TryRead())
	if len(frags) != 3 {
		t.Fatalf("%d frames on the uplink, want 3 fragments", len(frags))
	}
	var got []byte
	for _, f := range frags {
		h := header.IPv4(f[header.EthernetLen:])
		if !h.ChecksumValid() || h.Src() != fwIP || len(f) > header.EthernetLen+1400 || h.FragOffset() != len(got) {
			t.Fatalf("bad fragment %x", f[:40])
		}
		got = append(got, h.Payload()...)
	}
	if len(got) != 8+3000 {
		t.Fatalf("fragments carry %d bytes, want %d", len(got), 8+3000)
	}
	if got := n.d.Stats().Forwarded; got != before+1 {
		t.Errorf("forwarded %d, want %d", got, before+1)
	}
}

// Decide, then act: classifying a packet changes neither the frame nor the
// NAT table, whatever the verdict; applying it does the rest.
func TestClassifyChangesNothing(t *testing.T) {
	n := newTestNet(t)
	flow := pkt{srcMAC: c1MAC, src: client1, dst: remote, proto: header.ProtoUDP, sport: 4000, dport: 53}
	up, _ := n.fromClient(0, flow.bytes())
	natPort := checkValid(t, one(t, up, "the flow's first packet")).SrcPort
	reply := pkt{srcMAC: gwMAC, dstMAC: upMAC, src: remote, dst: fwIP, proto: header.ProtoUDP, sport: 53, dport: natPort}
	n.d.SetRules(client1, mustRules(map[string]string{"policy": "drop", "0000": "action=accept proto=udp"}))
	for _, tc := range []struct {
		name string
		p    *Port
		b    []byte
		act  action
	}{
		{"existing flow", n.c[0], flow.bytes(), actForward},
		{"new flow", n.c[0], pkt{srcMAC: c1MAC, src: client1, dst: remote, proto: header.ProtoUDP, sport: 4001, dport: 53}.bytes(), actForward},
		{"denied", n.c[0], pkt{srcMAC: c1MAC, src: client1, dst: remote, proto: header.ProtoTCP, sport: 4002, dport: 80, tcpFlags: header.TCPSyn}.bytes(), actReject},
		{"to another client", n.c[0], pkt{srcMAC: c1MAC, src: client1, dst: client2, proto: header.ProtoUDP, sport: 4003, dport: 53}.bytes(), actDrop},
		{"inbound reply", n.up, reply.bytes(), actForward},
		{"inbound, no flow", n.up, pkt{srcMAC: gwMAC, dstMAC: upMAC, src: remote, dst: fwIP, proto: header.ProtoUDP, sport: 53, dport: natPort + 1}.bytes(), actDrop},
	} {
		n.d.mu.Lock()
		before, entries := append([]byte(nil), tc.b...), n.d.nat.Len()
		f := &link.Frame{Data: tc.b}
		tc.p.parsed.Decode(f.Data)
		var v verdict
		if tc.p == n.up {
			v = tc.p.classifyIn(f, n.d.clock())
		} else {
			v = tc.p.classifyOut(n.d.clients[client1], f, n.d.clock())
		}
		n.d.mu.Unlock()
		if v.act != tc.act {
			t.Errorf("%s: action %d, want %d (reason %v)", tc.name, v.act, tc.act, v.reason)
		}
		if !bytes.Equal(tc.b, before) || n.d.nat.Len() != entries {
			t.Errorf("%s: classifying changed the frame or the NAT table (%d -> %d entries)", tc.name, entries, n.d.nat.Len())
		}
	}
}

// Reassembly copies every byte of a datagram: it runs before the
// dispatcher's lock is taken (the reassembler is the port's). Here the
// test holds the lock while the port gathers fragments; the reassembled
// datagram then goes the usual way.
func TestReassemblyBeforeTheLock(t *testing.T) {
	n := newTestNet(t)
	whole := pkt{srcMAC: c1MAC, src: client1, dst: remote, proto: header.ProtoUDP, sport: 4000, dport: 9000, payload: make([]byte, 2500)}.bytes()
	frames := toFrames(fragment(whole, 1000))
	p := n.c[0]
	p.pending, p.arena = p.pending[:0], p.arena[:0]
	n.d.mu.Lock()
	done := make(chan struct{})
	go func() {
		p.gather(frames, n.d.clock())
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second): // a hang guard, not a timing assertion
		t.Fatal("gather waits for the dispatcher's lock")
	}
	n.d.mu.Unlock()
	last := len(frames) - 1
	for i, e := range p.early {
		if want := map[bool]uint8{true: earlyGo, false: earlyHeld}[i == last]; e != want {
			t.Fatalf("frame %d: %d, want %d", i, e, want)
		}
	}
	if len(frames[last].Data) != len(whole) {
		t.Fatalf("the last frame holds %d bytes, want the whole datagram's %d", len(frames[last].Data), len(whole))
	}
	// The whole Input path: the datagram leaves translated.
	up, _ := n.fromClient(0, fragment(whole, 1000)...)
	var got int
	for _, f := range up {
		got += len(header.IPv4(f[header.EthernetLen:]).Payload())
	}
	if got != 8+2500 {
		t.Fatalf("%d bytes left on the uplink, want %d", got, 8+2500)
	}
}
