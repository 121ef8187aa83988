package dispatch

import (
	"encoding/binary"
	"testing"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/header"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/internal/fixture"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/link"
)

// Client 1 pings its gateway, the firewall's address, with TTL 1 (a
// packet for us is not forwarded: its TTL does not matter).
const echoRequestHex = `
fe ff ff ff ff ff  00 16 3e 5e 6c 00  08 00   # Ethernet: to our vif MAC, from client 1, IPv4
45 00 00 20  00 07 00 00  01 01 a4 a7         # IPv4: len 32, id 7, ttl 1, ICMP, checksum
0a 89 00 14  0a 89 00 0a                      # src 10.137.0.20 (client 1), dst 10.137.0.10 (us)
08 00 06 fa  12 34 00 01                      # ICMP echo request, checksum, identifier 0x1234, sequence 1
70 69 6e 67                                   # data "ping"
`

// What the firewall answers: everything is ours except identifier,
// sequence and data.
const echoReplyHex = `
00 16 3e 5e 6c 00  fe ff ff ff ff ff  08 00   # Ethernet: to client 1's MAC, from our vif MAC, IPv4
45 00 00 20  00 01 00 00  40 01 65 ad         # IPv4: len 32, id 1 (our first), ttl 64, ICMP, checksum
0a 89 00 0a  0a 89 00 14                      # src 10.137.0.10 (us), dst 10.137.0.20
00 00 0e fa  12 34 00 01                      # ICMP echo reply, checksum, identifier 0x1234, sequence 1
70 69 6e 67                                   # data "ping"
`

func TestEchoFromClient(t *testing.T) {
	req, want := fixture.Hex(t, echoRequestHex), fixture.Hex(t, echoReplyHex)
	for what, f := range map[string][]byte{"request": req, "reply": want} {
		if rfc1071(f[14:34]) != 0 || rfc1071(f[34:]) != 0 {
			t.Fatalf("%s fixture: wrong checksums", what)
		}
	}
	if p := (pkt{srcMAC: c1MAC, dstMAC: vifMAC, src: client1, dst: fwIP, proto: header.ProtoICMP,
		sport: uint16(header.ICMPEcho), dport: 0x1234, ttl: 1, payload: []byte("ping")}).bytes(); string(p) != string(req) {
		t.Fatalf("request fixture is not what pkt builds:\n% x\n% x", req, p)
	}
	n := newTestNet(t)
	// The client's rules deny everything: they are not consulted.
	n.d.SetRules(client1, nil)
	up, back := n.fromClient(0, req)
	none(t, up, "uplink")
	got := one(t, back, "echo reply")
	if string(got) != string(want) {
		t.Fatalf("echo reply\n got % x\nwant % x", got, want)
	}
	s := n.d.Stats()
	if s.EchoReplies != 1 || s.Drops.Total() != 0 || s.NATEntries != 0 {
		t.Fatalf("echo replies %d, drops %q, NAT entries %d; want 1, none, 0", s.EchoReplies, s.Drops.String(), s.NATEntries)
	}
}

// checkEchoReply checks every field of reply, an answer to the echo
// request req, with checksums computed by rfc1071, and returns its IP ID.
func checkEchoReply(t *testing.T, reply, req []byte, dstMAC, srcMAC [6]byte) uint16 {
	t.Helper()
	eth, ip := reply[:14], reply[14:]
	if len(ip) < 28 {
		t.Fatalf("reply too short: % x", reply)
	}
	icmp := ip[20:]
	reqIP := header.IPv4(req[14:])
	reqICMP := req[14+reqIP.HeaderLen() : 14+int(reqIP.TotalLen())]
	be := binary.BigEndian.Uint16
	for _, c := range []struct {
		what      string
		got, want any
	}{
		{"Ethernet dst", [6]byte(eth[0:6]), dstMAC},
		{"Ethernet src", [6]byte(eth[6:12]), srcMAC},
		{"EtherType", be(eth[12:]), uint16(0x0800)},
		{"version/IHL", ip[0], uint8(0x45)},
		{"TOS", ip[1], uint8(0)},
		{"total length", int(be(ip[2:])), len(ip)},
		{"total length vs request", int(be(ip[2:])), 20 + len(reqICMP)},
		{"flags/fragment", be(ip[6:]), uint16(0)},
		{"TTL", ip[8], uint8(64)},
		{"protocol", ip[9], header.ProtoICMP},
		{"IP checksum (rfc1071 over the header)", rfc1071(ip[:20]), uint16(0)},
		{"source", [4]byte(ip[12:16]), [4]byte(reqIP[16:20])},
		{"destination", [4]byte(ip[16:20]), [4]byte(reqIP[12:16])},
		{"ICMP type", icmp[0], header.ICMPEchoReply},
		{"ICMP code", icmp[1], uint8(0)},
		{"ICMP checksum (rfc1071 over the message)", rfc1071(icmp), uint16(0)},
		{"identifier", be(icmp[4:]), be(reqICMP[4:])},
		{"sequence", be(icmp[6:]), be(reqICMP[6:])},
		{"data", string(icmp[8:]), string(reqICMP[8:])},
	} {
		if c.got != c.want {
			t.Errorf("%s = %v, want %v", c.what, c.got, c.want)
		}
	}
	if id := be(ip[4:]); id == be(reqIP[4:]) {
		t.Errorf("IP ID %d copied from the request", id)
	}
	return be(ip[4:])
}

func TestEchoFromUplink(t *testing.T) {
	n := newTestNet(t)
	ids := map[uint16]bool{}
	// The netvm itself, and a host behind it, with an odd-length payload.
	for i, src := range [][4]byte{gwIP, remote} {
		req := pkt{srcMAC: gwMAC, dstMAC: upMAC, src: src, dst: fwIP, proto: header.ProtoICMP,
			sport: uint16(header.ICMPEcho), dport: uint16(100 + i), payload: []byte("abcdefghijklmnopq"), ttl: 1}.bytes()
		c0, c1, up := n.fromUplink(req)
		none(t, c0, "client 0")
		none(t, c1, "client 1")
		ids[checkEchoReply(t, one(t, up, "echo reply"), req, gwMAC, upMAC)] = true
	}
	// A request the size of the MTU is answered in full.
	big := pkt{srcMAC: gwMAC, dstMAC: upMAC, src: remote, dst: fwIP, proto: header.ProtoICMP,
		sport: uint16(header.ICMPEcho), dport: 7, payload: make([]byte, 1500-28)}.bytes()
	for i := range big[42:] {
		big[42+i] = byte(i)
	}
	header.ICMPv4(big[34:]).SetChecksum(0)
	header.ICMPv4(big[34:]).SetChecksum(header.Checksum(big[34:]))
	_, _, up := n.fromUplink(big)
	ids[checkEchoReply(t, one(t, up, "reply to 1500 bytes"), big, gwMAC, upMAC)] = true
	if len(ids) != 3 {
		t.Errorf("IP IDs %v: not one per reply", ids)
	}
	s := n.d.Stats()
	if s.EchoReplies != 3 || s.Drops.Total() != 0 || s.NATEntries != 0 {
		t.Fatalf("echo replies %d, drops %q, NAT entries %d; want 3, none, 0", s.EchoReplies, s.Drops.String(), s.NATEntries)
	}
}

func TestEchoSpoofedSourceDropped(t *testing.T) {
	n := newTestNet(t)
	for _, src := range [][4]byte{client2, ip4("10.137.0.99"), fwIP} {
		req := pkt{srcMAC: c1MAC, src: src, dst: fwIP, proto: header.ProtoICMP, sport: uint16(header.ICMPEcho), dport: 1}
		up, back := n.fromClient(0, req.bytes())
		none(t, up, "uplink")
		none(t, back, "client")
	}
	s := n.d.Stats()
	if c := s.Clients[client1]; c[ReasonSpoof] != 3 || s.EchoReplies != 0 {
		t.Fatalf("client 1 drops %q, echo replies %d; want spoof=3, 0", c.String(), s.EchoReplies)
	}
}

// TestEchoDrops: what is addressed to the firewall and is not an echo
// request it answers is dropped, counted once, and answers nothing.
func TestEchoDrops(t *testing.T) {
	fromC := func(m func(*pkt)) []byte {
		p := pkt{srcMAC: c1MAC, dstMAC: vifMAC, src: client1, dst: fwIP, proto: header.ProtoICMP, sport: uint16(header.ICMPEcho), dport: 1}
		if m != nil {
			m(&p)
		}
		return p.bytes()
	}
	fromU := func(m func(*pkt)) []byte {
		p := pkt{srcMAC: gwMAC, dstMAC: upMAC, src: remote, dst: fwIP, proto: header.ProtoICMP, sport: uint16(header.ICMPEcho), dport: 1}
		if m != nil {
			m(&p)
		}
		return p.bytes()
	}
	flip := func(b []byte, i int) []byte { b[i] ^= 1; return b }
	big := func(p *pkt) { p.payload = make([]byte, 1501-28) }
	tcp := func(p *pkt) { p.proto, p.sport, p.dport, p.tcpFlags = header.ProtoTCP, 40000, 22, header.TCPSyn }
	udp := func(p *pkt) { p.proto, p.sport, p.dport = header.ProtoUDP, 40000, 53 }
	typ := func(t uint8) func(*pkt) { return func(p *pkt) { p.sport = uint16(t) } }
	srcMAC := func(m [6]byte) func(*pkt) { return func(p *pkt) { p.srcMAC = m } }
	src := func(a [4]byte) func(*pkt) { return func(p *pkt) { p.src = a } }
	reassembledBig := fragment(fromC(func(p *pkt) { p.payload = make([]byte, 2000) }), 1000)

	// Answered with ICMP admin-prohibited, as Linux's input chain does.
	rejected := map[string]bool{"client: timestamp": true, "client: tcp": true, "client: udp": true}
	for _, tc := range []struct {
		name   string
		uplink bool // else from client 1
		frames [][]byte
		want   Reason
	}{
		{"client: bad ICMP checksum", false, [][]byte{flip(fromC(nil), 36)}, ReasonInvalid},
		{"client: bad IP checksum", false, [][]byte{flip(fromC(nil), 24)}, ReasonInvalid},
		{"client: echo code 1", false, [][]byte{fromC(func(p *pkt) { p.icmpCode = 1 })}, ReasonToFirewall},
		{"client: 1501 bytes", false, [][]byte{fromC(big)}, ReasonTooBig},
		{"client: 2028 bytes in fragments", false, reassembledBig, ReasonTooBig},
		{"client: echo reply", false, [][]byte{fromC(typ(header.ICMPEchoReply))}, ReasonToFirewall},
		{"client: timestamp", false, [][]byte{fromC(typ(header.ICMPTimestamp))}, ReasonToFirewall},
		{"client: port unreachable", false, [][]byte{fromC(typ(header.ICMPDestUnreach))}, ReasonToFirewall},
		{"client: tcp", false, [][]byte{fromC(tcp)}, ReasonToFirewall},
		{"client: udp", false, [][]byte{fromC(udp)}, ReasonToFirewall},
		{"uplink: bad ICMP checksum", true, [][]byte{flip(fromU(nil), 37)}, ReasonInvalid},
		{"uplink: bad IP checksum", true, [][]byte{flip(fromU(nil), 25)}, ReasonInvalid},
		{"uplink: 1501 bytes", true, [][]byte{fromU(big)}, ReasonTooBig},
		{"uplink: broadcast source MAC", true, [][]byte{fromU(srcMAC(header.BroadcastMAC))}, ReasonSourceMAC},
		{"uplink: multicast source MAC", true, [][]byte{fromU(srcMAC([6]byte{0x01, 0x00, 0x5e, 0, 0, 1}))}, ReasonSourceMAC},
		{"uplink: zero source MAC", true, [][]byte{fromU(srcMAC([6]byte{}))}, ReasonInvalid},
		{"uplink: loopback source", true, [][]byte{fromU(src(ip4("127.0.0.1")))}, ReasonInvalid},
		{"uplink: multicast source", true, [][]byte{fromU(src(ip4("224.0.0.1")))}, ReasonInvalid},
		{"uplink: broadcast source", true, [][]byte{fromU(src(ip4("255.255.255.255")))}, ReasonInvalid},
		{"uplink: zero source", true, [][]byte{fromU(src(ip4("0.0.0.0")))}, ReasonInvalid},
		{"uplink: client source", true, [][]byte{fromU(src(client1))}, ReasonUplinkSpoof},
		{"uplink: our own source", true, [][]byte{fromU(src(fwIP))}, ReasonUplinkSpoof},
		{"uplink: echo code 1", true, [][]byte{fromU(func(p *pkt) { p.icmpCode = 1 })}, ReasonToFirewall},
		{"uplink: echo reply", true, [][]byte{fromU(typ(header.ICMPEchoReply))}, ReasonNoEntry},
		{"uplink: tcp", true, [][]byte{fromU(tcp)}, ReasonNoEntry},
		{"uplink: udp", true, [][]byte{fromU(udp)}, ReasonNoEntry},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := newTestNet(t)
			if tc.uplink {
				c0, c1, up := n.fromUplink(tc.frames...)
				none(t, c0, "client 0")
				none(t, c1, "client 1")
				none(t, up, "uplink")
			} else {
				up, back := n.fromClient(0, tc.frames...)
				none(t, up, "uplink")
				if rejected[tc.name] {
					p := checkValid(t, one(t, back, "reject"))
					if m := header.ICMPv4(back[0][p.L4Off:p.End]); m.Type() != header.ICMPDestUnreach || m.Code() != header.ICMPAdminProhibited {
						t.Fatalf("answered with ICMP %d/%d, want 3/13", m.Type(), m.Code())
					}
				} else {
					none(t, back, "client")
				}
			}
			s := n.d.Stats()
			if s.Drops[tc.want] != 1 || s.Drops.Total() != 1 || s.EchoReplies != 0 {
				t.Fatalf("drops %q, echo replies %d; want %v=1 only, 0", s.Drops.String(), s.EchoReplies, tc.want)
			}
			if c := s.Clients[client1]; !tc.uplink && c[tc.want] != 1 {
				t.Fatalf("not counted against client 1: %q", c.String())
			}
		})
	}
}

func TestEchoFragments(t *testing.T) {
	n := newTestNet(t)
	payload := make([]byte, 1000)
	for i := range payload {
		payload[i] = byte(i * 7)
	}
	req := pkt{srcMAC: c1MAC, src: client1, dst: fwIP, proto: header.ProtoICMP, sport: uint16(header.ICMPEcho), dport: 3, payload: payload}.bytes()
	frags := fragment(req, 400)
	// A fragment alone is not answered; it waits in the reassembler.
	up, back := n.fromClient(0, frags[0])
	none(t, up, "uplink")
	none(t, back, "reply to one fragment")
	// Once the datagram is whole, it is (from the sender's MTU to ours).
	_, back = n.fromClient(0, frags[2], frags[1])
	checkEchoReply(t, one(t, back, "reply to the reassembled request"), req, c1MAC, vifMAC)
	// A lone fragment expires and is counted by the reassembler.
	n.fromClient(0, frags[1])
	n.now += 31e9
	n.d.Tick()
	if got := n.c[0].frag.Stats().Expired; got != 1 {
		t.Fatalf("%d expired datagrams, want the lone fragment", got)
	}
	if s := n.d.Stats(); s.EchoReplies != 1 {
		t.Fatalf("%d echo replies, want 1", s.EchoReplies)
	}
}

func TestEchoRateLimited(t *testing.T) {
	n := newTestNet(t)
	ping := func(srcMAC [6]byte, src [4]byte, id uint16) []byte {
		return pkt{srcMAC: srcMAC, src: src, dst: fwIP, proto: header.ProtoICMP, sport: uint16(header.ICMPEcho), dport: id}.bytes()
	}
	var flood [][]byte
	for i := 0; i < 100; i++ {
		flood = append(flood, ping(c1MAC, client1, uint16(i)))
	}
	if _, back := n.fromClient(0, flood...); len(back) != 20 {
		t.Fatalf("%d replies to 100 pings at once, want the burst of 20", len(back))
	}
	if got := n.d.Stats().Clients[client1][ReasonEchoLimit]; got != 80 {
		t.Fatalf("%d echo-limit drops, want 80", got)
	}
	// Per client: the other client is still answered.
	if _, back := n.fromClient(1, ping(c2MAC, client2, 1)); len(back) != 1 {
		t.Fatal("client 2 not answered after client 1's flood")
	}
	// One bucket for the whole uplink side, whatever the source.
	var upFlood [][]byte
	for i := 0; i < 30; i++ {
		upFlood = append(upFlood, ping(gwMAC, [][4]byte{remote, gwIP}[i%2], uint16(i)))
	}
	if _, _, up := n.fromUplink(upFlood...); len(up) != 20 {
		t.Fatalf("%d replies to 30 pings from the uplink side, want 20", len(up))
	}
	// 10 tokens a second.
	n.now += 1e9
	if _, back := n.fromClient(0, flood...); len(back) != 10 {
		t.Fatalf("%d replies a second later, want 10", len(back))
	}
	s := n.d.Stats()
	if s.EchoReplies != 20+1+20+10 || s.Drops[ReasonEchoLimit] != 80+10+90 {
		t.Fatalf("echo replies %d, drops %q", s.EchoReplies, s.Drops.String())
	}
}

func TestEchoBSDMode(t *testing.T) {
	n := newBSDNet(t)
	// The netvm, and a host whose ping it forwards, are answered on its vif.
	for _, src := range [][4]byte{netvmIP, remote} {
		req := pkt{srcMAC: gwMAC, src: src, dst: fwIP, proto: header.ProtoICMP, sport: uint16(header.ICMPEcho), dport: 5, payload: []byte("bsd")}.bytes()
		n.p0.Input(toFrames([][]byte{req}))
		none(t, data(n.appvm.TryRead()), "appvm")
		checkEchoReply(t, one(t, data(n.netvm.TryRead()), "reply to the netvm side"), req, gwMAC, vifMAC)
	}
	// The AppVM pings its gateway, the same address.
	req := pkt{srcMAC: c1MAC, src: client1, dst: fwIP, proto: header.ProtoICMP, sport: uint16(header.ICMPEcho), dport: 6, payload: []byte("app")}.bytes()
	n.p1.Input(toFrames([][]byte{req}))
	none(t, data(n.netvm.TryRead()), "netvm")
	checkEchoReply(t, one(t, data(n.appvm.TryRead()), "reply to the appvm"), req, c1MAC, vifMAC)
	if s := n.d.Stats(); s.EchoReplies != 3 || s.Drops.Total() != 0 {
		t.Fatalf("echo replies %d, drops %q", s.EchoReplies, s.Drops.String())
	}
}

// TestEchoNoAllocs: answering ping allocates nothing once a port's arena
// exists.
func TestEchoNoAllocs(t *testing.T) {
	n := newTestNet(t)
	n.d.mu.Lock()
	n.c[0].link, n.up.link = nullLink{}, nullLink{}
	n.d.mu.Unlock()
	for _, tc := range []struct {
		name string
		port *Port
		req  []byte
	}{
		{"client", n.c[0], pkt{srcMAC: c1MAC, src: client1, dst: fwIP, proto: header.ProtoICMP, sport: uint16(header.ICMPEcho), dport: 1, payload: make([]byte, 56)}.bytes()},
		{"uplink", n.up, pkt{srcMAC: gwMAC, src: remote, dst: fwIP, proto: header.ProtoICMP, sport: uint16(header.ICMPEcho), dport: 1, payload: make([]byte, 56)}.bytes()},
	} {
		frames := []link.Frame{{Data: tc.req}}
		before := n.d.Stats().EchoReplies
		allocs := testing.AllocsPerRun(100, func() {
			n.now += 1e9 // refill the bucket
			tc.port.Input(frames)
		})
		if allocs != 0 {
			t.Errorf("%s: %v allocations per echo reply", tc.name, allocs)
		}
		if got := n.d.Stats().EchoReplies - before; got != 101 {
			t.Errorf("%s: %d replies for 101 requests", tc.name, got)
		}
	}
}

// BenchmarkEchoReply answers a client's 64-byte ping (ping's default).
func BenchmarkEchoReply(b *testing.B) {
	n := newTestNet(b)
	n.d.mu.Lock()
	n.c[0].link = nullLink{}
	n.d.mu.Unlock()
	frame := pkt{srcMAC: c1MAC, src: client1, dst: fwIP, proto: header.ProtoICMP, sport: uint16(header.ICMPEcho), dport: 1, payload: make([]byte, 56)}.bytes()
	frames := []link.Frame{{Data: frame}}
	b.ReportAllocs()
	b.SetBytes(int64(len(frame)))
	for b.Loop() {
		n.now += 1e9
		n.c[0].Input(frames)
	}
	if n.d.Stats().EchoReplies < uint64(b.N) {
		b.Fatal("pings were not answered")
	}
}
