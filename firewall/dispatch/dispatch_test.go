package dispatch

import (
	"encoding/binary"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/link/linktest"
	"net/netip"
	"testing"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/header"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/link"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/nat"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/rules"
)

var (
	fwIP     = ip4("10.137.0.10") // our uplink address, the clients' gateway
	gwIP     = ip4("10.137.0.1")  // the netvm
	client1  = ip4("10.137.0.20")
	client2  = ip4("10.137.0.21")
	remote   = ip4("93.184.216.34")
	dns1     = ip4("10.139.1.1")
	upMAC    = [6]byte{0x00, 0x16, 0x3e, 0x00, 0x00, 0x10}
	gwMAC    = [6]byte{0xfe, 0xff, 0xff, 0xff, 0xff, 0x01}
	vifMAC   = [6]byte{0xfe, 0xff, 0xff, 0xff, 0xff, 0xff}
	c1MAC    = [6]byte{0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x00}
	c2MAC    = [6]byte{0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x01}
	acceptRS = mustRules(map[string]string{"policy": "drop", "0000": "action=accept"})
)

func ip4(s string) [4]byte { return netip.MustParseAddr(s).As4() }

func mustRules(m map[string]string) *rules.Ruleset {
	rs, err := rules.Parse(m)
	if err != nil {
		panic(err)
	}
	return rs
}

// testNet is a dispatcher with an uplink and two clients on in-memory
// links; the test plays the netvm (upPeer) and the clients (cPeer).
type testNet struct {
	t      testing.TB
	d      *Dispatcher
	now    int64
	up     *Port
	upPeer *linktest.Pipe
	c      [2]*Port
	cPeer  [2]*linktest.Pipe
}

func newTestNet(t testing.TB) *testNet { return newTestNetWith(t, 1500, 0) }

// newTestNetMTU is newTestNet with an uplink of the given MTU (the client
// links keep 1500).
func newTestNetMTU(t testing.TB, upMTU int) *testNet { return newTestNetWith(t, upMTU, 0) }

// newTestNetWith also sets the NAT table's size (0: the default); fuzz
// targets use a small one, which is much cheaper to create.
func newTestNetWith(t testing.TB, upMTU, natSize int) *testNet {
	n := &testNet{t: t, now: 1e9}
	n.d = New(Config{Logf: t.Logf, Clock: func() int64 { return n.now }, NAT: nat.Config{MaxEntries: natSize}})
	upA, upB := linktest.NewPipe("eth0", upMAC, "netvm", gwMAC, upMTU)
	n.up, n.upPeer = n.d.Attach(upA), upB
	for i, ip := range [][4]byte{client1, client2} {
		a, b := linktest.NewPipe("vif", vifMAC, "client", [][6]byte{c1MAC, c2MAC}[i], 1500)
		n.c[i], n.cPeer[i] = n.d.Attach(a), b
		if err := n.d.AddClient(ip, [][6]byte{c1MAC, c2MAC}[i], n.c[i]); err != nil {
			t.Fatal(err)
		}
		n.d.SetRules(ip, acceptRS)
	}
	n.d.SetUplink(&Uplink{Port: n.up, IP: fwIP, Gateway: gwIP})
	n.d.SetDNS([]netip.Addr{netip.AddrFrom4(dns1)})
	n.upPeer.TryRead() // gratuitous ARP and gateway query
	return n
}

// fromClient injects frames as client i and returns what the firewall sent
// to the uplink and back to that client.
func (n *testNet) fromClient(i int, frames ...[]byte) (up, back [][]byte) {
	n.c[i].Input(toFrames(frames))
	return data(n.upPeer.TryRead()), data(n.cPeer[i].TryRead())
}

// fromUplink injects frames from the netvm and returns what reached each client.
func (n *testNet) fromUplink(frames ...[]byte) (c0, c1, up [][]byte) {
	n.up.Input(toFrames(frames))
	return data(n.cPeer[0].TryRead()), data(n.cPeer[1].TryRead()), data(n.upPeer.TryRead())
}

func toFrames(b [][]byte) []link.Frame {
	f := make([]link.Frame, len(b))
	for i := range b {
		f[i].Data = append([]byte(nil), b[i]...)
	}
	return f
}

func data(fs []link.Frame) [][]byte {
	var out [][]byte
	for _, f := range fs {
		out = append(out, f.Data)
	}
	return out
}

// pkt describes a test packet.
type pkt struct {
	srcMAC, dstMAC [6]byte
	src, dst       [4]byte
	proto          uint8
	sport, dport   uint16 // or ICMP type (sport) and identifier (dport)
	tcpFlags       uint8
	ttl            uint8
	payload        []byte
	icmpCode       uint8
}

func (p pkt) bytes() []byte {
	ttl := p.ttl
	if ttl == 0 {
		ttl = 64
	}
	var l4 []byte
	switch p.proto {
	case header.ProtoTCP:
		l4 = make([]byte, header.TCPMinLen+len(p.payload))
		binary.BigEndian.PutUint16(l4[0:], p.sport)
		binary.BigEndian.PutUint16(l4[2:], p.dport)
		binary.BigEndian.PutUint32(l4[4:], 1000)
		l4[12] = 5 << 4
		l4[13] = p.tcpFlags
		binary.BigEndian.PutUint16(l4[14:], 65535)
		copy(l4[20:], p.payload)
	case header.ProtoUDP:
		l4 = make([]byte, header.UDPLen+len(p.payload))
		copy(l4[8:], p.payload)
	case header.ProtoICMP:
		l4 = make([]byte, header.ICMPv4MinLen+len(p.payload))
		l4[0], l4[1] = uint8(p.sport), p.icmpCode
		binary.BigEndian.PutUint16(l4[4:], p.dport)
		binary.BigEndian.PutUint16(l4[6:], 1)
		copy(l4[8:], p.payload)
	}
	b := make([]byte, header.EthernetLen+header.IPv4MinLen+len(l4))
	header.PutEthernet(b, p.dstMAC, p.srcMAC, header.EtherTypeIPv4)
	header.PutIPv4(b[14:], uint16(20+len(l4)), 7, ttl, p.proto, p.src, p.dst)
	copy(b[34:], l4)
	switch p.proto {
	case header.ProtoTCP:
		binary.BigEndian.PutUint16(b[34+16:], ^header.Fold(header.Sum(l4, header.PseudoHeaderSum(p.src, p.dst, p.proto, uint16(len(l4))))))
	case header.ProtoUDP:
		header.PutUDP(b[34:], p.src, p.dst, p.sport, p.dport, len(p.payload))
	case header.ProtoICMP:
		header.ICMPv4(b[34:]).SetChecksum(header.Checksum(b[34:]))
	}
	return b
}

// checkValid fails unless frame is IPv4 with correct IP and transport checksums.
func checkValid(t testing.TB, frame []byte) header.Parsed {
	t.Helper()
	var p header.Parsed
	p.Decode(frame)
	if p.Kind != header.KindIPv4 {
		t.Fatalf("frame is %v, want IPv4: %x", p.Kind, frame)
	}
	ip := header.IPv4(frame[14:])
	if !ip.ChecksumValid() {
		t.Fatalf("bad IP checksum: %x", frame)
	}
	l4 := frame[p.L4Off:p.End]
	var s uint32
	if p.Proto != header.ProtoICMP {
		s = header.PseudoHeaderSum(p.Src, p.Dst, p.Proto, uint16(len(l4)))
	}
	if header.Fold(header.Sum(l4, s)) != 0xffff {
		t.Fatalf("bad %d checksum: %x", p.Proto, frame)
	}
	return p
}

// rfc1071 is the Internet checksum computed the slow, obvious way, as an
// oracle independent of package header: 0 over a region whose checksum
// field is right.
func rfc1071(b []byte) uint16 {
	var s uint32
	for i := 0; i < len(b); i += 2 {
		w := uint32(b[i]) << 8
		if i+1 < len(b) {
			w |= uint32(b[i+1])
		}
		s += w
	}
	for s > 0xffff {
		s = s&0xffff + s>>16
	}
	return ^uint16(s)
}

func one(t testing.TB, frames [][]byte, what string) []byte {
	t.Helper()
	if len(frames) != 1 {
		t.Fatalf("%s: got %d frames, want 1", what, len(frames))
	}
	return frames[0]
}

func none(t testing.TB, frames [][]byte, what string) {
	t.Helper()
	if len(frames) != 0 {
		t.Fatalf("%s: got %d frames, want none: %x", what, len(frames), frames)
	}
}

func TestRoundTrips(t *testing.T) {
	for _, proto := range []struct {
		name  string
		proto uint8
		sport uint16
		reply uint16 // reply's sport: ICMP echo reply type
	}{
		{"tcp", header.ProtoTCP, 40000, 443},
		{"udp", header.ProtoUDP, 40000, 443},
		{"icmp", header.ProtoICMP, uint16(header.ICMPEcho), uint16(header.ICMPEchoReply)},
	} {
		t.Run(proto.name, func(t *testing.T) {
			n := newTestNet(t)
			out := pkt{srcMAC: c1MAC, dstMAC: vifMAC, src: client1, dst: remote, proto: proto.proto,
				sport: proto.sport, dport: 443, tcpFlags: header.TCPSyn, payload: []byte("hello")}
			if proto.proto == header.ProtoICMP {
				out.dport = 0x1234 // echo identifier
			}
			up, back := n.fromClient(0, out.bytes())
			none(t, back, "back to client")
			f := one(t, up, "to uplink")
			p := checkValid(t, f)
			eth := header.Ethernet(f)
			if eth.Src() != upMAC || eth.Dst() != dispatcherGatewayMAC(n) {
				t.Errorf("uplink frame MACs %x -> %x", eth.Src(), eth.Dst())
			}
			if p.Src != fwIP || p.Dst != remote || p.TTL != 63 {
				t.Errorf("uplink packet %v -> %v ttl %d", p.Src, p.Dst, p.TTL)
			}
			natPort := p.SrcPort
			if proto.proto == header.ProtoICMP {
				natPort = p.ICMPIdent
			}
			// The reply comes back to the client's address and port.
			reply := pkt{srcMAC: gwMAC, dstMAC: upMAC, src: remote, dst: fwIP, proto: proto.proto,
				sport: proto.reply, dport: natPort, tcpFlags: header.TCPSyn | header.TCPAck, payload: []byte("world")}
			if proto.proto != header.ProtoICMP {
				reply.sport, reply.dport = 443, natPort
			}
			c0, c1, _ := n.fromUplink(reply.bytes())
			none(t, c1, "other client")
			f = one(t, c0, "reply to client")
			p = checkValid(t, f)
			if p.Src != remote || p.Dst != client1 {
				t.Errorf("reply %v -> %v", p.Src, p.Dst)
			}
			if proto.proto == header.ProtoICMP {
				if p.ICMPIdent != 0x1234 {
					t.Errorf("reply identifier %#x, want 0x1234", p.ICMPIdent)
				}
			} else if p.DstPort != 40000 {
				t.Errorf("reply port %d, want 40000", p.DstPort)
			}
			if eth := header.Ethernet(f); eth.Dst() != c1MAC || eth.Src() != vifMAC {
				t.Errorf("client frame MACs %x -> %x", eth.Src(), eth.Dst())
			}
		})
	}
}

func dispatcherGatewayMAC(n *testNet) [6]byte {
	n.d.mu.Lock()
	defer n.d.mu.Unlock()
	return n.d.gwMAC
}

func TestSpoofedSourceDropped(t *testing.T) {
	n := newTestNet(t)
	spoof := pkt{srcMAC: c1MAC, src: ip4("10.137.0.99"), dst: remote, proto: header.ProtoUDP, sport: 1, dport: 2}
	asOther := pkt{srcMAC: c1MAC, src: client2, dst: remote, proto: header.ProtoUDP, sport: 1, dport: 2}
	up, back := n.fromClient(0, spoof.bytes(), asOther.bytes())
	none(t, up, "uplink")
	none(t, back, "client")
	if got := n.d.Stats().Clients[client1][ReasonSpoof]; got != 2 {
		t.Errorf("spoof drops for client1 = %d, want 2", got)
	}
}

func TestDeniedFlowGetsReject(t *testing.T) {
	n := newTestNet(t)
	n.d.SetRules(client1, mustRules(map[string]string{"policy": "drop", "0000": "action=drop proto=tcp dstports=443-443", "0001": "action=accept"}))
	syn := pkt{srcMAC: c1MAC, src: client1, dst: remote, proto: header.ProtoTCP, sport: 40000, dport: 443, tcpFlags: header.TCPSyn}
	orig := syn.bytes()
	up, back := n.fromClient(0, orig)
	none(t, up, "uplink")
	f := one(t, back, "reject")
	p := checkValid(t, f)
	// The whole reject, byte for byte: Ethernet to the client, IPv4 from
	// our address, ICMP 3/13 quoting the SYN's IP header and 8 bytes.
	want := make([]byte, 14+20+8+28)
	header.PutEthernet(want, c1MAC, vifMAC, header.EtherTypeIPv4)
	header.PutIPv4(want[14:], 20+8+28, header.IPv4(f[14:]).ID(), 64, header.ProtoICMP, fwIP, client1)
	want[34], want[35] = 3, 13
	copy(want[42:], orig[14:14+28])
	header.ICMPv4(want[34:]).SetChecksum(header.Checksum(want[34:]))
	if string(f) != string(want) {
		t.Fatalf("reject\n got %x\nwant %x", f, want)
	}
	if p.Dst != client1 {
		t.Fatal("reject not to the client")
	}
	// Port 80 is accepted by the second rule.
	syn.dport = 80
	up, _ = n.fromClient(0, syn.bytes())
	one(t, up, "accepted flow")
	// A denied ICMP request is rejected the same way, as by the Linux
	// agent; a denied ICMP error or reply is dropped silently.
	n.d.SetRules(client1, mustRules(map[string]string{"policy": "drop"}))
	ping := pkt{srcMAC: c1MAC, src: client1, dst: remote, proto: header.ProtoICMP, sport: uint16(header.ICMPEcho), dport: 9}
	up, back = n.fromClient(0, ping.bytes())
	none(t, up, "uplink")
	p = checkValid(t, one(t, back, "reject of a ping"))
	if m := header.ICMPv4(back[0][p.L4Off:p.End]); m.Type() != header.ICMPDestUnreach || m.Code() != header.ICMPAdminProhibited {
		t.Fatalf("ping answered with ICMP %d/%d, want 3/13", m.Type(), m.Code())
	}
	reply := ping
	reply.sport = uint16(header.ICMPEchoReply)
	up, back = n.fromClient(0, reply.bytes())
	none(t, up, "uplink")
	none(t, back, "client: an echo reply is not rejected")
}

// ICMP query types other than echo and timestamp (information, address
// mask) that a rule accepts are forwarded and tracked like echo.
func TestOtherICMPQueriesTracked(t *testing.T) {
	n := newTestNet(t)
	n.d.SetRules(client1, mustRules(map[string]string{"policy": "drop", "0000": "action=accept proto=icmp icmptype=17"}))
	q := pkt{srcMAC: c1MAC, src: client1, dst: remote, proto: header.ProtoICMP, sport: uint16(header.ICMPMaskRequest), dport: 0x4242, payload: make([]byte, 4)}
	up, _ := n.fromClient(0, q.bytes())
	sent := checkValid(t, one(t, up, "address mask request"))
	reply := pkt{srcMAC: gwMAC, dstMAC: upMAC, src: remote, dst: fwIP, proto: header.ProtoICMP, sport: uint16(header.ICMPMaskReply), dport: sent.ICMPIdent, payload: make([]byte, 4)}
	c0, _, _ := n.fromUplink(reply.bytes())
	got := checkValid(t, one(t, c0, "address mask reply"))
	if got.Dst != client1 || got.ICMPIdent != 0x4242 {
		t.Fatalf("reply to %v ident %#x, want %v 0x4242", got.Dst, got.ICMPIdent, client1)
	}
}

func TestRejectsAreRateLimited(t *testing.T) {
	n := newTestNet(t)
	n.d.SetRules(client1, mustRules(map[string]string{"policy": "drop"}))
	var frames [][]byte
	for i := 0; i < 100; i++ {
		frames = append(frames, pkt{srcMAC: c1MAC, src: client1, dst: remote, proto: header.ProtoUDP, sport: uint16(1000 + i), dport: 53}.bytes())
	}
	_, back := n.fromClient(0, frames...)
	if len(back) != 20 {
		t.Fatalf("%d rejects for 100 denied packets at once, want the burst of 20", len(back))
	}
	n.now += 1e9
	_, back = n.fromClient(0, frames[0])
	if len(back) != 1 {
		t.Fatalf("no reject after the bucket refilled")
	}
}

func TestClientToClientBlocked(t *testing.T) {
	n := newTestNet(t)
	p := pkt{srcMAC: c1MAC, src: client1, dst: client2, proto: header.ProtoTCP, sport: 1, dport: 22, tcpFlags: header.TCPSyn}
	up, back := n.fromClient(0, p.bytes())
	none(t, up, "uplink")
	none(t, back, "client")
	if len(n.cPeer[1].TryRead()) != 0 {
		t.Fatal("reached the other client")
	}
	if n.d.Stats().Drops[ReasonClientToClient] != 1 {
		t.Fatal("not counted")
	}
}

func TestToFirewallDropped(t *testing.T) {
	// Ping is answered (echo_test.go); everything else is rejected.
	n := newTestNet(t)
	p := pkt{srcMAC: c1MAC, src: client1, dst: fwIP, proto: header.ProtoUDP, sport: 5000, dport: 53}
	up, back := n.fromClient(0, p.bytes())
	none(t, up, "uplink")
	one(t, back, "reject")
	if n.d.Stats().Drops[ReasonToFirewall] != 1 {
		t.Fatal("not counted")
	}
}

func TestInboundWithoutEntryDropped(t *testing.T) {
	n := newTestNet(t)
	for _, p := range []pkt{
		{srcMAC: gwMAC, src: remote, dst: fwIP, proto: header.ProtoTCP, sport: 443, dport: 40000, tcpFlags: header.TCPSyn},
		{srcMAC: gwMAC, src: remote, dst: client1, proto: header.ProtoTCP, sport: 443, dport: 22, tcpFlags: header.TCPSyn},
		{srcMAC: gwMAC, src: remote, dst: fwIP, proto: header.ProtoICMP, sport: uint16(header.ICMPEchoReply), dport: 1},
	} {
		c0, c1, up := n.fromUplink(p.bytes())
		none(t, c0, "client 0")
		none(t, c1, "client 1")
		none(t, up, "uplink")
	}
	s := n.d.Stats()
	if s.Drops[ReasonNoEntry] != 2 || s.Drops[ReasonNotForUs] != 1 {
		t.Fatalf("drops %v", s.Drops.String())
	}
}

func TestUplinkPacketWithClientSourceDropped(t *testing.T) {
	n := newTestNet(t)
	out := pkt{srcMAC: c1MAC, src: client1, dst: remote, proto: header.ProtoUDP, sport: 5000, dport: 53}
	up, _ := n.fromClient(0, out.bytes())
	p := checkValid(t, one(t, up, "uplink"))
	for _, src := range [][4]byte{client2, fwIP} {
		in := pkt{srcMAC: gwMAC, src: src, dst: fwIP, proto: header.ProtoUDP, sport: 53, dport: p.SrcPort}
		c0, c1, _ := n.fromUplink(in.bytes())
		none(t, c0, "client 0")
		none(t, c1, "client 1")
	}
	if n.d.Stats().Drops[ReasonUplinkSpoof] != 2 {
		t.Fatal("not counted")
	}
}

func TestRulesReloadCutsFlows(t *testing.T) {
	n := newTestNet(t)
	out := func(port uint16) []byte {
		return pkt{srcMAC: c1MAC, src: client1, dst: remote, proto: header.ProtoTCP, sport: 40000 + port, dport: port, tcpFlags: header.TCPAck}.bytes()
	}
	up, _ := n.fromClient(0, out(80), out(443))
	if len(up) != 2 {
		t.Fatalf("%d frames out", len(up))
	}
	natPorts := []uint16{checkValid(t, up[0]).SrcPort, checkValid(t, up[1]).SrcPort}
	n.d.SetRules(client1, mustRules(map[string]string{"policy": "drop", "0000": "action=accept proto=tcp dstports=443-443"}))
	// The port-80 flow is gone in both directions; 443 lives on.
	in80 := pkt{srcMAC: gwMAC, src: remote, dst: fwIP, proto: header.ProtoTCP, sport: 80, dport: natPorts[0], tcpFlags: header.TCPAck}
	in443 := pkt{srcMAC: gwMAC, src: remote, dst: fwIP, proto: header.ProtoTCP, sport: 443, dport: natPorts[1], tcpFlags: header.TCPAck}
	c0, _, _ := n.fromUplink(in80.bytes(), in443.bytes())
	if len(c0) != 1 || checkValid(t, c0[0]).SrcPort != 443 {
		t.Fatalf("after reload, client got %d frames", len(c0))
	}
	up, back := n.fromClient(0, out(80))
	none(t, up, "denied flow after reload")
	one(t, back, "reject after reload")
}

func TestMalformedRulesDenyOnlyThatClient(t *testing.T) {
	n := newTestNet(t)
	rs, err := rules.Parse(map[string]string{"policy": "drop", "0000": "action=accept bogus=1"})
	if err == nil {
		t.Fatal("bad rule parsed")
	}
	n.d.SetRules(client1, rs)
	p := pkt{srcMAC: c1MAC, src: client1, dst: remote, proto: header.ProtoUDP, sport: 1, dport: 2}
	up, _ := n.fromClient(0, p.bytes())
	none(t, up, "client with broken rules")
	p.src, p.srcMAC = client2, c2MAC
	up, _ = n.fromClient(1, p.bytes())
	one(t, up, "other client")
}

func TestARP(t *testing.T) {
	n := newTestNet(t)
	req := func(srcMAC [6]byte, sender, target [4]byte) []byte {
		b := make([]byte, arpFrameLen)
		header.PutEthernet(b, header.BroadcastMAC, srcMAC, header.EtherTypeARP)
		header.PutARP(b[14:], header.ARPRequest, srcMAC, sender, [6]byte{}, target)
		return b
	}
	// A client asking for its gateway (or anything else) gets our MAC.
	_, back := n.fromClient(0, req(c1MAC, client1, fwIP))
	a := header.ARP(one(t, back, "arp reply")[14:])
	if a.Op() != header.ARPReply || a.SenderMAC() != vifMAC || a.SenderIP() != fwIP || a.TargetMAC() != c1MAC {
		t.Fatalf("bad reply %x", back[0])
	}
	_, back = n.fromClient(0, req(c1MAC, client1, remote))
	one(t, back, "arp reply for a remote address")
	// Not for its own address (duplicate address detection must succeed).
	_, back = n.fromClient(0, req(c1MAC, [4]byte{}, client1))
	none(t, back, "arp for own address")
	// The netvm asking for our uplink address gets an answer; its MAC is
	// learnt only from its reply to our own who-has.
	learnt := [6]byte{0x02, 0, 0, 0, 0, 0x77}
	_, _, up := n.fromUplink(req(learnt, gwIP, fwIP))
	if header.ARP(one(t, up, "uplink arp reply")[14:]).SenderMAC() != upMAC {
		t.Fatal("uplink reply not from our MAC")
	}
	if dispatcherGatewayMAC(n) != FallbackMAC {
		t.Fatal("gateway MAC learnt from a request")
	}
	_, _, _ = n.fromUplink(arpReplyFrame(learnt, gwIP, upMAC, fwIP))
	if dispatcherGatewayMAC(n) != learnt {
		t.Fatal("gateway MAC not learnt from the reply to our request")
	}
	// Other uplink hosts' requests for other addresses are ignored.
	_, _, up = n.fromUplink(req(learnt, remote, client1))
	none(t, up, "uplink arp for a client address")
}

func TestUplinkChange(t *testing.T) {
	n := newTestNet(t)
	out := pkt{srcMAC: c1MAC, src: client1, dst: remote, proto: header.ProtoUDP, sport: 5000, dport: 53}
	up, _ := n.fromClient(0, out.bytes())
	oldPort := checkValid(t, one(t, up, "before")).SrcPort
	// The netvm changes: new link, new address. Old flows are flushed.
	a, b := linktest.NewPipe("eth1", upMAC, "netvm2", gwMAC, 1500)
	newIP := ip4("10.138.5.5")
	n.d.SetUplink(&Uplink{Port: n.d.Attach(a), IP: newIP, Gateway: ip4("10.138.5.1")})
	sent := b.TryRead()
	if len(sent) != 2 {
		t.Fatalf("%d frames on the new uplink, want gratuitous ARP and gateway query", len(sent))
	}
	n.up.Input(toFrames([][]byte{pkt{srcMAC: gwMAC, src: remote, dst: fwIP, proto: header.ProtoUDP, sport: 53, dport: oldPort}.bytes()}))
	if len(n.cPeer[0].TryRead()) != 0 {
		t.Fatal("old uplink still delivers")
	}
	n.c[0].Input(toFrames([][]byte{out.bytes()}))
	f := data(b.TryRead())
	if p := checkValid(t, one(t, f, "after")); p.Src != newIP {
		t.Fatalf("NATed to %v after the change", p.Src)
	}
	// Netvm gone: outbound dropped.
	n.d.SetUplink(nil)
	up, _ = n.fromClient(0, out.bytes())
	none(t, up, "no uplink")
	if n.d.Stats().Drops[ReasonNoUplink] != 1 {
		t.Fatal("not counted")
	}
}

func TestIPv6AndJunkCounted(t *testing.T) {
	n := newTestNet(t)
	v6 := make([]byte, 60)
	header.PutEthernet(v6, vifMAC, c1MAC, header.EtherTypeIPv6)
	up, _ := n.fromClient(0, v6, []byte{1, 2, 3})
	none(t, up, "uplink")
	c := n.d.Stats().Clients[client1]
	if c[ReasonIPv6] != 1 || c[ReasonInvalid] != 1 {
		t.Fatalf("counters %v", c.String())
	}
}

// bsdNet is BSD netvm mode: no netfront; the netvm is client netvmIP on
// port p0 (its peer end netvm), reached through its vif, and our address
// (fwIP, the --ipv4 option) is the client side of that link; an AppVM
// (client1) is on port p1 (peer appvm).
type bsdNet struct {
	*testNet
	p0, p1       *Port
	netvm, appvm *linktest.Pipe
}

var netvmIP = ip4("10.137.0.1")

func newBSDNet(t *testing.T) *bsdNet {
	n := &bsdNet{testNet: &testNet{t: t, now: 1e9}}
	n.d = New(Config{Logf: t.Logf, Clock: func() int64 { return n.now }})
	a, netvm := linktest.NewPipe("vif1.0", vifMAC, "netvm", gwMAC, 1500)
	n.p0, n.netvm = n.d.Attach(a), netvm
	if err := n.d.AddClient(netvmIP, gwMAC, n.p0); err != nil {
		t.Fatal(err)
	}
	n.d.SetRules(netvmIP, acceptRS)
	b, appvm := linktest.NewPipe("vif2.0", vifMAC, "appvm", c1MAC, 1500)
	n.p1, n.appvm = n.d.Attach(b), appvm
	if err := n.d.AddClient(client1, c1MAC, n.p1); err != nil {
		t.Fatal(err)
	}
	n.d.SetRules(client1, acceptRS)
	n.d.SetUplink(&Uplink{Port: n.p0, IP: fwIP, Gateway: netvmIP})
	netvm.TryRead()
	return n
}

func TestBSDMode(t *testing.T) {
	n := newBSDNet(t)
	p0, p1, netvm, appvm := n.p0, n.p1, n.netvm, n.appvm
	p1.Input(toFrames([][]byte{pkt{srcMAC: c1MAC, src: client1, dst: remote, proto: header.ProtoUDP, sport: 7, dport: 53}.bytes()}))
	f := one(t, data(netvm.TryRead()), "to netvm")
	p := checkValid(t, f)
	if p.Src != fwIP || header.Ethernet(f).Dst() != gwMAC {
		t.Fatalf("outbound via netvm: src %v dst mac %x", p.Src, header.Ethernet(f).Dst())
	}
	// The netvm forwards the reply with a foreign source.
	p0.Input(toFrames([][]byte{pkt{srcMAC: gwMAC, src: remote, dst: fwIP, proto: header.ProtoUDP, sport: 53, dport: p.SrcPort}.bytes()}))
	if got := checkValid(t, one(t, data(appvm.TryRead()), "reply")); got.Dst != client1 {
		t.Fatal("reply not translated")
	}
}

func TestLocalUDP(t *testing.T) {
	n := newTestNet(t)
	conn, err := n.d.ListenUDP()
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if err := conn.WriteTo([]byte("query"), netip.AddrPortFrom(netip.AddrFrom4(gwIP), 53)); err != nil {
		t.Fatal(err)
	}
	f := one(t, data(n.upPeer.TryRead()), "query")
	p := checkValid(t, f)
	if p.Src != fwIP || p.SrcPort != conn.LocalPort() || p.DstPort != 53 {
		t.Fatalf("query %v:%d -> %d", p.Src, p.SrcPort, p.DstPort)
	}
	reply := pkt{srcMAC: gwMAC, src: gwIP, dst: fwIP, proto: header.ProtoUDP, sport: 53, dport: conn.LocalPort(), payload: []byte("answer")}
	n.fromUplink(reply.bytes())
	buf := make([]byte, 100)
	nr, src, err := conn.ReadFrom(t.Context(), buf)
	if err != nil || string(buf[:nr]) != "answer" || src.Port() != 53 {
		t.Fatalf("read %q from %v: %v", buf[:nr], src, err)
	}
}

// fragment cuts the IPv4 packet in frame into fragments of size payload
// bytes (a multiple of 8), each a frame with frame's Ethernet header.
func fragment(frame []byte, size int) [][]byte {
	ip := header.IPv4(frame[14:])
	data := ip.Payload()
	var frags [][]byte
	for off := 0; off < len(data); off += size {
		end := min(off+size, len(data))
		f := make([]byte, 14+20+end-off)
		copy(f, frame[:34])
		copy(f[34:], data[off:end])
		h := header.IPv4(f[14:])
		h.SetTotalLen(uint16(20 + end - off))
		h.SetFragment(false, end < len(data), off)
		h.SetChecksum(0)
		h.SetChecksum(h.CalculateChecksum())
		frags = append(frags, f)
	}
	return frags
}

func TestFragmentsReassembledAndRefragmented(t *testing.T) {
	n := newTestNet(t)
	payload := make([]byte, 3000)
	for i := range payload {
		payload[i] = byte(i)
	}
	whole := pkt{srcMAC: c1MAC, src: client1, dst: remote, proto: header.ProtoUDP, sport: 4000, dport: 9000, payload: payload}.bytes()
	frags := fragment(whole, 1000)
	// Reverse order, to be sure it is reassembly and not pass-through.
	up, _ := n.fromClient(0, frags[3], frags[1], frags[0], frags[2])
	if len(up) < 3 {
		t.Fatalf("%d frames on the uplink, want the datagram in MTU-sized fragments", len(up))
	}
	// Put it back together and check the translated datagram.
	var got []byte
	for _, f := range up {
		h := header.IPv4(f[14:])
		if !h.ChecksumValid() || h.Src() != fwIP || len(f)-14 > 1500 {
			t.Fatalf("bad fragment %x", f[:40])
		}
		if h.FragOffset() != len(got) {
			t.Fatalf("fragment at %d, want %d", h.FragOffset(), len(got))
		}
		got = append(got, h.Payload()...)
	}
	if len(got) != 8+3000 || string(got[8:]) != string(payload) {
		t.Fatalf("reassembled payload differs (len %d)", len(got))
	}
}

func TestOffloadMetadataPassesThrough(t *testing.T) {
	n := newTestNet(t)
	b := pkt{srcMAC: c1MAC, src: client1, dst: remote, proto: header.ProtoTCP, sport: 40000, dport: 443, tcpFlags: header.TCPAck, payload: make([]byte, 4000)}.bytes()
	// As a sender with offload leaves it: the pseudo-header sum in the field.
	l4len := uint16(len(b) - 34)
	binary.BigEndian.PutUint16(b[34+16:], header.Fold(header.PseudoHeaderSum(client1, remote, header.ProtoTCP, l4len)))
	off := link.Offload{NeedsCsum: true, CsumStart: 34, CsumOffset: 16, GSOType: link.GSOTCPv4, GSOSize: 1448, HdrLen: 54}
	n.c[0].Input([]link.Frame{{Data: b, Offload: off}})
	out := n.upPeer.TryRead()
	if len(out) != 1 {
		t.Fatalf("%d frames, want the super-frame whole", len(out))
	}
	if out[0].Offload != off {
		t.Fatalf("offload %+v, want %+v", out[0].Offload, off)
	}
	if got, want := binary.BigEndian.Uint16(out[0].Data[34+16:]), header.Fold(header.PseudoHeaderSum(fwIP, remote, header.ProtoTCP, l4len)); got != want {
		t.Fatalf("partial checksum %#x, want %#x for the new source", got, want)
	}
}

func TestTTLExpiredDropped(t *testing.T) {
	n := newTestNet(t)
	p := pkt{srcMAC: c1MAC, src: client1, dst: remote, proto: header.ProtoUDP, sport: 1, dport: 2, ttl: 1}
	up, _ := n.fromClient(0, p.bytes())
	none(t, up, "ttl 1")
	p.ttl = 2
	up, _ = n.fromClient(0, p.bytes())
	if got := checkValid(t, one(t, up, "ttl 2")); got.TTL != 1 {
		t.Fatalf("forwarded with ttl %d, want 1", got.TTL)
	}
	if n.d.Stats().Drops[ReasonTTL] != 1 {
		t.Fatal("not counted")
	}
}
