package dispatch

import (
	"net/netip"
	"testing"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/frag"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/header"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/link"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/link/linktest"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/nat"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/rules"
)

// The stateful fuzzer's world: two clients and an uplink, a small NAT
// table, a handful of remote hosts and rule sets, and two netvm addresses.
var (
	fuzzRemotes = [][4]byte{remote, ip4("198.51.100.7"), ip4("203.0.113.5"), dns1}
	fuzzFwIPs   = [][4]byte{fwIP, ip4("10.138.9.2")}
	fuzzRules   = []map[string]string{
		{"policy": "accept"},
		{"policy": "drop", "0000": "action=accept specialtarget=dns"},
		{"policy": "drop", "0000": "action=accept dst4=93.184.216.34/32 proto=tcp dstports=443-443", "0001": "action=accept proto=icmp icmptype=8"},
		{"policy": "drop", "0000": "action=drop dst4=198.51.100.0/24", "0001": "action=accept proto=udp"},
		{"policy": "drop"},
	}
)

const (
	fuzzNATSize   = 32
	fuzzClientMax = 20
	fuzzFragBytes = 64 << 10
)

// fuzzWorld is the dispatcher under test and what the oracles know: the
// rules each client has now, and per client the remote addresses the rules
// accepted a flow to (a flow's remote is the only place its packets and
// ICMP errors about it may go, and the only source of what comes back).
type fuzzWorld struct {
	t       *testing.T
	n       *testNet
	rules   [2]*rules.Ruleset
	remotes [2]map[fuzzFlow]bool
	up      [4]byte // the uplink address now
	sent    [][]byte
}

// fuzzFlow is what the model keeps of a flow the rules accepted.
type fuzzFlow struct {
	proto uint8
	dst   [4]byte
	dport uint16 // 0 for ICMP
}

// hasRemote says whether client i has a flow to addr.
func (w *fuzzWorld) hasRemote(i int, addr [4]byte) bool {
	for f := range w.remotes[i] {
		if f.dst == addr {
			return true
		}
	}
	return false
}

func newFuzzWorld(t *testing.T) *fuzzWorld {
	w := &fuzzWorld{t: t, up: fwIP}
	n := &testNet{t: t, now: 1e9}
	n.d = New(Config{Logf: func(string, ...any) {}, Clock: func() int64 { return n.now },
		NAT:  nat.Config{MaxEntries: fuzzNATSize, ClientMax: fuzzClientMax},
		Frag: frag.Config{MaxBytes: fuzzFragBytes}})
	upA, upB := linktest.NewPipe("eth0", upMAC, "netvm", gwMAC, 1500)
	n.up, n.upPeer = n.d.Attach(upA), upB
	for i, ip := range [][4]byte{client1, client2} {
		a, b := linktest.NewPipe("vif", vifMAC, "client", [][6]byte{c1MAC, c2MAC}[i], 1500)
		n.c[i], n.cPeer[i] = n.d.Attach(a), b
		if err := n.d.AddClient(ip, [][6]byte{c1MAC, c2MAC}[i], n.c[i]); err != nil {
			t.Fatal(err)
		}
		w.setRules(i, 0)
	}
	if err := n.d.SetUplink(&Uplink{Port: n.up, IP: fwIP, Gateway: gwIP}); err != nil {
		t.Fatal(err)
	}
	n.d.SetDNS([]netip.Addr{netip.AddrFrom4(dns1)})
	w.n = n
	w.drain(-1)
	return w
}

func (w *fuzzWorld) setRules(i, which int) {
	w.rules[i] = mustRules(fuzzRules[which%len(fuzzRules)])
	// Flows the new rules deny are cut; the model keeps the others.
	if w.remotes[i] == nil {
		w.remotes[i] = map[fuzzFlow]bool{}
	}
	for f := range w.remotes[i] {
		p := header.Parsed{Proto: f.proto, Dst: f.dst, DstPort: f.dport, ICMPType: header.ICMPEcho}
		if !w.accepts(i, &p) {
			delete(w.remotes[i], f)
		}
	}
	if w.n != nil {
		w.n.d.SetRules([][4]byte{client1, client2}[i], w.rules[i])
	}
}

// accepts says whether client i's rules accept a new flow like packet p.
// An ICMP query flow is re-checked after a rule change as echo (the
// dispatcher does not keep the type), so an accepted echo to the same
// destination counts too.
func (w *fuzzWorld) accepts(i int, p *header.Parsed) bool {
	env := rules.Env{DNS: []netip.Addr{netip.AddrFrom4(dns1)}}
	rp := rules.Packet{Dst: netip.AddrFrom4(p.Dst), Proto: p.Proto, DstPort: p.DstPort, ICMPType: p.ICMPType}
	if w.rules[i].Match(rp, env).Action == rules.Accept {
		return true
	}
	if p.Proto == header.ProtoICMP && header.ICMPIsQuery(p.ICMPType) {
		rp.ICMPType = header.ICMPEcho
		return w.rules[i].Match(rp, env).Action == rules.Accept
	}
	return false
}

// FuzzDispatcherSequence drives the dispatcher with a program: frames
// from either client or the netvm (built from the program's bytes, some
// replies to what was sent, some corrupted), clock steps, rule changes and
// netvm changes. After every step the oracles hold:
//
//	(a) every frame on the uplink has the current uplink address as source
//	    and goes where its client's rules accept a new flow or to the remote
//	    end of one of its flows (ICMP errors: only the latter);
//	(b) every frame to a client carries its IP and MAC as destination and
//	    comes from a remote of its flows or is ICMP from the firewall;
//	(c) nothing one client sends reaches the other;
//	(d) the NAT table, each client's share of it and the reassembly buffers
//	    stay within their configured bounds.
func FuzzDispatcherSequence(f *testing.F) {
	f.Add([]byte{0, 0, 0, 0, 1, 2, 3, 4, 2, 0, 9, 9, 5, 3, 6, 1, 2, 7, 1})
	f.Add([]byte{0, 0, 1, 0, 53, 0, 0, 2, 0, 1, 0, 0, 0, 0, 3, 0, 0, 0})
	f.Add([]byte{6, 0, 2, 0, 0, 0, 0, 1, 2, 0, 0, 1, 0, 0, 0, 2, 1, 0, 0, 0, 0, 7, 0, 2, 0, 0, 0})
	f.Add([]byte{1, 1, 2, 3, 80, 0, 4, 5, 0, 2, 0, 1, 1, 3, 1, 1, 5, 200, 2, 0, 0})
	f.Fuzz(func(t *testing.T, prog []byte) {
		if len(prog) > 4096 {
			return
		}
		w := newFuzzWorld(t)
		r := &fuzzReader{b: prog}
		for steps := 0; r.more() && steps < 256; steps++ {
			switch op := r.next() % 8; op {
			case 0, 1, 2: // a client sends
				w.fromClient(int(op)%2, r)
			case 3, 4: // the netvm sends
				w.fromUplink(r)
			case 5: // time passes
				w.n.now += int64(r.next()) * 1e9
				w.n.d.Tick()
				w.drain(-1)
			case 6: // dom0 changes a client's rules
				w.setRules(int(r.next())%2, int(r.next()))
				w.drain(-1)
			case 7: // a netvm change: new address, flows flushed
				ip := fuzzFwIPs[int(r.next())%len(fuzzFwIPs)]
				if err := w.n.d.SetUplink(&Uplink{Port: w.n.up, IP: ip, Gateway: gwIP}); err != nil {
					t.Fatal(err)
				}
				if ip != w.up {
					// The flows of the old address are flushed.
					w.up, w.remotes = ip, [2]map[fuzzFlow]bool{{}, {}}
				}
				w.drain(-1)
			}
			w.bounds()
		}
	})
}

// fuzzReader hands out the program's bytes, zeros once they run out.
type fuzzReader struct {
	b []byte
	i int
}

func (r *fuzzReader) more() bool { return r.i < len(r.b) }
func (r *fuzzReader) next() byte {
	if r.i >= len(r.b) {
		return 0
	}
	r.i++
	return r.b[r.i-1]
}

// fromClient builds a frame from client i: a protocol, a destination
// (a remote, the firewall, the other client, DNS), ports, flags, maybe a
// corrupted byte or a spoofed source.
func (w *fuzzWorld) fromClient(i int, r *fuzzReader) {
	ips, macs := [][4]byte{client1, client2}, [][6]byte{c1MAC, c2MAC}
	b := r.next()
	dsts := append(append([][4]byte(nil), fuzzRemotes...), w.up, ips[1-i])
	p := pkt{srcMAC: macs[i], dstMAC: vifMAC, src: ips[i], dst: dsts[int(r.next())%len(dsts)],
		sport: 40000 + uint16(r.next()%4), dport: []uint16{53, 443, 80, 22}[r.next()%4], tcpFlags: r.next() & 0x3f}
	switch b % 4 {
	case 0:
		p.proto = header.ProtoTCP
	case 1:
		p.proto = header.ProtoUDP
	case 2:
		p.proto = header.ProtoICMP
		p.sport, p.dport = uint16([]uint8{header.ICMPEcho, header.ICMPEchoReply, header.ICMPTimestamp, header.ICMPMaskRequest}[r.next()%4]), uint16(r.next())
	case 3:
		// An ICMP error about something the client received, to
		// wherever the program says: the exfiltration attempt of
		// defect 1 among others.
		q := w.lastTo(i)
		if q == nil {
			return
		}
		p.proto, p.sport, p.icmpCode = header.ProtoICMP, uint16(header.ICMPDestUnreach), header.ICMPPortUnreach
		p.payload = q[header.EthernetLen:min(len(q), header.EthernetLen+28+int(r.next()))]
	}
	if b&0x10 != 0 {
		p.src = ip4("10.137.0.99") // spoofed
	}
	frame := p.bytes()
	if b&0x20 != 0 && len(frame) > 0 {
		frame[int(r.next())%len(frame)] ^= 1 << (r.next() % 8)
	}
	var before header.Parsed
	before.Decode(frame)
	if before.Kind == header.KindIPv4 && before.Src == ips[i] && !(before.Proto == header.ProtoICMP && header.ICMPIsError(before.ICMPType)) &&
		w.accepts(i, &before) && before.Dst != w.up && before.Dst != ips[1-i] {
		f := fuzzFlow{proto: before.Proto, dst: before.Dst, dport: before.DstPort}
		if f.proto == header.ProtoICMP {
			f.dport = 0
		}
		w.remotes[i][f] = true
	}
	w.n.c[i].Input([]link.Frame{{Data: frame}})
	w.drain(i)
}

// lastTo is the last frame client i received, if any.
func (w *fuzzWorld) lastTo(i int) []byte {
	for j := len(w.sent) - 1; j >= 0; j-- {
		if header.Ethernet(w.sent[j]).Dst() == [][6]byte{c1MAC, c2MAC}[i] {
			return w.sent[j]
		}
	}
	return nil
}

// fromUplink sends, from the netvm, a reply to a frame the firewall sent
// (when there is one) or a frame to one of our addresses from a remote.
func (w *fuzzWorld) fromUplink(r *fuzzReader) {
	b := r.next()
	var frame []byte
	if len(w.sent) > 0 && b&1 == 0 {
		// Reverse one of the frames the firewall put on the uplink.
		o := w.sent[int(r.next())%len(w.sent)]
		var op header.Parsed
		op.Decode(o)
		if op.Kind != header.KindIPv4 || header.Ethernet(o).Dst() != gwMAC && header.Ethernet(o).Dst() != FallbackMAC {
			return
		}
		p := pkt{srcMAC: gwMAC, dstMAC: upMAC, src: op.Dst, dst: op.Src, proto: op.Proto, sport: op.DstPort, dport: op.SrcPort, tcpFlags: r.next() & 0x3f}
		if op.Proto == header.ProtoICMP {
			p.sport, p.dport = uint16(header.ICMPEchoReply), op.ICMPIdent
			if b&2 != 0 {
				p.sport, p.icmpCode, p.payload = uint16(header.ICMPDestUnreach), header.ICMPHostUnreach, o[header.EthernetLen:min(len(o), header.EthernetLen+28)]
				p.dport = 0
			}
		}
		frame = p.bytes()
	} else {
		p := pkt{srcMAC: gwMAC, dstMAC: upMAC, src: fuzzRemotes[int(r.next())%len(fuzzRemotes)], dst: fuzzFwIPs[int(r.next())%2],
			proto: []uint8{header.ProtoTCP, header.ProtoUDP, header.ProtoICMP}[r.next()%3], sport: 443, dport: 1024 + uint16(r.next()), tcpFlags: r.next() & 0x3f}
		if b&4 != 0 {
			p.src = []([4]byte){client1, client2, fwIP}[r.next()%3] // claiming a client's or our own address
		}
		frame = p.bytes()
	}
	if b&0x20 != 0 && len(frame) > 0 {
		frame[int(r.next())%len(frame)] ^= 1 << (r.next() % 8)
	}
	if b&0x40 != 0 && frame[header.EthernetLen] == 0x45 && header.IPv4(frame[header.EthernetLen:]).IsValid() {
		// As a fragment train, in order or not.
		var fs []link.Frame
		for _, fr := range fragment(frame, 16+8*int(r.next()%8)) {
			fs = append(fs, link.Frame{Data: fr})
		}
		if len(fs) > 1 && b&0x80 != 0 {
			fs[0], fs[len(fs)-1] = fs[len(fs)-1], fs[0]
		}
		w.n.up.Input(fs)
	} else {
		w.n.up.Input([]link.Frame{{Data: frame}})
	}
	w.drain(2)
}

// drain reads what the firewall sent after a step whose frames came from
// port from (0, 1: a client; 2: the uplink; -1: none) and checks (a)-(c).
func (w *fuzzWorld) drain(from int) {
	t := w.t
	ips, macs := [][4]byte{client1, client2}, [][6]byte{c1MAC, c2MAC}
	for _, f := range w.n.upPeer.TryRead() {
		var p header.Parsed
		p.Decode(f.Data)
		switch p.Kind {
		case header.KindARP:
			if a := header.ARP(f.Data[header.EthernetLen:]); a.SenderIP() != w.up {
				t.Fatalf("uplink ARP from %v, uplink address %v", a.SenderIP(), w.up)
			}
			continue
		case header.KindIPv4:
		default:
			t.Fatalf("uplink got a %v frame: %x", p.Kind, f.Data)
		}
		if p.Src != w.up {
			t.Fatalf("(a) uplink frame from %v, the uplink address is %v: %x", p.Src, w.up, f.Data)
		}
		if from == 0 || from == 1 {
			isErr := p.Proto == header.ProtoICMP && header.ICMPIsError(p.ICMPType)
			if !w.hasRemote(from, p.Dst) && (isErr || !w.accepts(from, &p)) && !p.Fragment {
				t.Fatalf("(a) client %d's frame to %v: no rule accepts it and no flow of the client has that remote: %x", from, p.Dst, f.Data)
			}
		}
		w.record(f.Data)
	}
	for i := range 2 {
		for _, f := range w.n.cPeer[i].TryRead() {
			if from == 1-i {
				t.Fatalf("(c) client %d's frame reached client %d: %x", from, i, f.Data)
			}
			if header.Ethernet(f.Data).Dst() != macs[i] {
				t.Fatalf("(b) frame to client %d with destination MAC %x", i, header.Ethernet(f.Data).Dst())
			}
			var p header.Parsed
			p.Decode(f.Data)
			if p.Kind == header.KindARP {
				continue
			}
			if p.Kind != header.KindIPv4 || p.Dst != ips[i] {
				t.Fatalf("(b) frame to client %d for %v: %x", i, p.Dst, f.Data)
			}
			from := p.Src
			if p.Proto == header.ProtoICMP && header.ICMPIsError(p.ICMPType) && p.End-p.L4Off >= 8+20 {
				// An error from a router on the way: what matters is
				// the flow it quotes, whose remote is the quoted
				// destination.
				from = [4]byte(f.Data[p.L4Off+8+16 : p.L4Off+8+20])
			}
			if !(p.Src == w.up && p.Proto == header.ProtoICMP) && !w.hasRemote(i, from) && !p.Fragment {
				t.Fatalf("(b) client %d got a frame from %v, not a remote of its flows: %x", i, p.Src, f.Data)
			}
			w.record(f.Data)
		}
	}
}

func (w *fuzzWorld) record(f []byte) {
	if len(w.sent) == 16 {
		w.sent = append(w.sent[:0], w.sent[1:]...)
	}
	w.sent = append(w.sent, append([]byte(nil), f...))
}

// bounds checks (d).
func (w *fuzzWorld) bounds() {
	t := w.t
	d := w.n.d
	d.mu.Lock()
	defer d.mu.Unlock()
	if n := d.nat.Len(); n > fuzzNATSize {
		t.Fatalf("(d) %d NAT entries, table of %d", n, fuzzNATSize)
	}
	others := d.nat.Len()
	for _, ip := range [][4]byte{client1, client2} {
		if c := d.nat.ClientEntries(ip); c > fuzzClientMax && c < others {
			t.Fatalf("(d) client %v holds %d entries while others have flows, share %d", ip, c, fuzzClientMax)
		}
	}
	for p := range d.ports {
		if s := p.frag.Stats(); s.Bytes > fuzzFragBytes {
			t.Fatalf("(d) reassembly holds %d bytes, bound %d", s.Bytes, fuzzFragBytes)
		}
	}
	if len(d.later.lines) != 0 || len(d.later.frames) != 0 {
		t.Fatal("(d) deferred work left behind after unlocking")
	}
}
