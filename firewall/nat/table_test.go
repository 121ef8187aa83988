package nat

import (
	"errors"
	"runtime"
	"testing"
	"time"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/header"
)

// pkt is a packet of a test flow in one direction.
type pkt struct {
	out   bool
	flags uint8 // TCP flags
}

// flow drives a flow from client:cport to remote:443 (TCP/UDP) or an
// echo with identifier cport, through the given packets at time now.
type flow struct {
	tb    *Table
	proto uint8
	cip   [4]byte
	cport uint16
	e     *Entry
}

func (fl *flow) frame(t testing.TB, out bool, flags uint8) []byte {
	var src, dst [4]byte
	var l4 []byte
	if out {
		src, dst = fl.cip, remote
	} else {
		src, dst = remote, uplink
	}
	nat := uint16(0)
	if fl.e != nil {
		nat = fl.e.NATPort()
	}
	switch {
	case fl.proto == header.ProtoTCP && out:
		l4 = tcpSeg(fl.cport, 443, flags, "")
	case fl.proto == header.ProtoTCP:
		l4 = tcpSeg(443, nat, flags, "")
	case fl.proto == header.ProtoUDP && out:
		l4 = udpDgram(fl.cport, 443, "")
	case fl.proto == header.ProtoUDP:
		l4 = udpDgram(443, nat, "")
	case out:
		l4 = icmpEcho(header.ICMPEcho, fl.cport, 1, "")
	default:
		l4 = icmpEcho(header.ICMPEchoReply, nat, 1, "")
	}
	return ipFrame(fl.proto, src, dst, l4)
}

// send passes one packet through the table; it reports whether the flow
// had (or, for the first outbound packet, got) an entry.
func (fl *flow) send(t testing.TB, pk pkt, now int64) bool {
	t.Helper()
	f := fl.frame(t, pk.out, pk.flags)
	p := decode(t, f)
	if !pk.out {
		e := fl.tb.LookupIn(p, now)
		if e == nil {
			return false
		}
		fl.tb.TranslateIn(e, f, p, header.CsumFull, now)
		return true
	}
	e := fl.tb.LookupOut(p, now)
	if e == nil {
		var err error
		if e, err = fl.tb.Create(p, uplink, now); err != nil {
			t.Fatalf("Create: %v", err)
		}
	}
	fl.e = e
	fl.tb.TranslateOut(e, f, p, header.CsumFull, now)
	return true
}

func TestTimeoutsByState(t *testing.T) {
	d := DefaultTimeouts()
	const (
		syn    = header.TCPSyn
		ack    = header.TCPAck
		synack = header.TCPSyn | header.TCPAck
		fin    = header.TCPFin | header.TCPAck
		rst    = header.TCPRst
	)
	for _, tc := range []struct {
		name    string
		proto   uint8
		pkts    []pkt
		state   State
		timeout time.Duration
	}{
		{"tcp syn", header.ProtoTCP, []pkt{{true, syn}}, TCPSynSent, d.TCPSynSent},
		{"tcp syn retransmitted", header.ProtoTCP, []pkt{{true, syn}, {true, syn}}, TCPSynSent, d.TCPSynSent},
		{"tcp established", header.ProtoTCP, []pkt{{true, syn}, {false, synack}, {true, ack}}, TCPEstablished, d.TCPEstablished},
		{"tcp fin out", header.ProtoTCP, []pkt{{true, syn}, {false, synack}, {true, fin}}, TCPFinWait, d.TCPFinWait},
		{"tcp fin in", header.ProtoTCP, []pkt{{true, syn}, {false, synack}, {false, fin}}, TCPFinWait, d.TCPFinWait},
		{"tcp fin both", header.ProtoTCP, []pkt{{true, syn}, {false, synack}, {true, fin}, {false, fin}, {true, ack}}, TCPClosing, d.TCPClosing},
		{"tcp rst in", header.ProtoTCP, []pkt{{true, syn}, {false, rst}}, TCPReset, d.TCPReset},
		{"tcp rst out after data", header.ProtoTCP, []pkt{{true, syn}, {false, synack}, {true, ack}, {true, rst}}, TCPReset, d.TCPReset},
		{"tcp ack after rst", header.ProtoTCP, []pkt{{true, syn}, {false, synack}, {false, rst}, {true, ack}}, TCPReset, d.TCPReset},
		{"tcp port reused after rst", header.ProtoTCP, []pkt{{true, syn}, {false, synack}, {false, rst}, {true, syn}}, TCPSynSent, d.TCPSynSent},
		{"udp unreplied", header.ProtoUDP, []pkt{{true, 0}, {true, 0}}, StateNew, d.UDP},
		{"udp replied", header.ProtoUDP, []pkt{{true, 0}, {false, 0}}, StateReplied, d.UDPReplied},
		{"icmp", header.ProtoICMP, []pkt{{true, 0}}, StateNew, d.ICMP},
		{"icmp replied", header.ProtoICMP, []pkt{{true, 0}, {false, 0}}, StateReplied, d.ICMP},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tb := newTable(t, Config{MaxEntries: 4})
			fl := &flow{tb: tb, proto: tc.proto, cip: client, cport: 40000}
			now := int64(0)
			for _, pk := range tc.pkts {
				now += sec
				if !fl.send(t, pk, now) {
					t.Fatalf("packet %+v found no entry", pk)
				}
			}
			e := fl.e
			if e.State() != tc.state {
				t.Fatalf("state %v, want %v", e.State(), tc.state)
			}
			if got := time.Duration(e.Expires() - now); got != tc.timeout {
				t.Fatalf("timeout %v, want %v", got, tc.timeout)
			}
			// Alive one nanosecond before, gone at the deadline.
			p := decode(t, fl.frame(t, true, header.TCPAck))
			if tb.LookupOut(p, now+int64(tc.timeout)-1) == nil {
				t.Fatal("expired early")
			}
			if tb.LookupOut(p, now+int64(tc.timeout)) != nil || tb.Len() != 0 || tb.Stats().Expired != 1 {
				t.Fatalf("not expired: len %d stats %+v", tb.Len(), tb.Stats())
			}
			mustCheck(t, tb)
		})
	}
}

func TestTimeoutsConfigured(t *testing.T) {
	tb := newTable(t, Config{MaxEntries: 4, Timeouts: Timeouts{UDP: 5 * time.Second}})
	fl := &flow{tb: tb, proto: header.ProtoUDP, cip: client, cport: 1}
	fl.send(t, pkt{out: true}, 0)
	if fl.e.Expires() != 5*sec {
		t.Errorf("expires %d", fl.e.Expires())
	}
	fl.send(t, pkt{}, sec)
	if fl.e.Expires() != sec+int64(DefaultTimeouts().UDPReplied) {
		t.Errorf("replied: expires %d, want the default", fl.e.Expires())
	}
}

func TestExpire(t *testing.T) {
	tb := newTable(t, Config{MaxEntries: 64})
	for i := range 10 {
		(&flow{tb: tb, proto: header.ProtoUDP, cip: client, cport: uint16(i + 1)}).send(t, pkt{out: true}, 0)
	}
	for i := range 5 {
		(&flow{tb: tb, proto: header.ProtoTCP, cip: client, cport: uint16(i + 1)}).send(t, pkt{true, header.TCPSyn}, 0)
	}
	if n := tb.Expire(int64(DefaultTimeouts().UDP) - 1); n != 0 {
		t.Fatalf("Expire removed %d live entries", n)
	}
	if n := tb.Expire(int64(DefaultTimeouts().UDP)); n != 10 || tb.Len() != 5 {
		t.Fatalf("Expire = %d, Len %d; want 10 and 5", n, tb.Len())
	}
	mustCheck(t, tb)
	if n := tb.Expire(int64(DefaultTimeouts().TCPSynSent)); n != 5 || tb.Len() != 0 {
		t.Fatalf("Expire = %d, Len %d", n, tb.Len())
	}
	if tb.Stats().Expired != 15 {
		t.Errorf("stats %+v", tb.Stats())
	}
	mustCheck(t, tb)
}

// Expire examines a bounded number of slots per call, round robin.
func TestExpireBounded(t *testing.T) {
	tb := newTable(t, Config{MaxEntries: 3 * expireBatch})
	for i := range 3 * expireBatch {
		(&flow{tb: tb, proto: header.ProtoUDP, cip: client, cport: uint16(i + 1)}).send(t, pkt{out: true}, 0)
	}
	late := int64(time.Hour)
	for i := range 3 {
		if n := tb.Expire(late); n != expireBatch {
			t.Fatalf("call %d removed %d", i, n)
		}
	}
	if tb.Len() != 0 {
		t.Fatal(tb.Len())
	}
	mustCheck(t, tb)
}

func TestEvictionPrefersUnassured(t *testing.T) {
	tb := newTable(t, Config{MaxEntries: 4})
	mk := func(port uint16) *flow {
		return &flow{tb: tb, proto: header.ProtoTCP, cip: client, cport: port}
	}
	a, b, c, d := mk(1), mk(2), mk(3), mk(4)
	now := int64(0)
	step := func() int64 { now += sec; return now }
	for _, fl := range []*flow{a, b, c, d} {
		fl.send(t, pkt{true, header.TCPSyn}, step())
	}
	// a and b are answered; c and d stay half-open.
	a.send(t, pkt{false, header.TCPSyn | header.TCPAck}, step())
	b.send(t, pkt{false, header.TCPSyn | header.TCPAck}, step())
	alive := func(fls ...*flow) {
		t.Helper()
		for _, fl := range fls {
			if tb.LookupOut(decode(t, fl.frame(t, true, header.TCPAck)), now) == nil {
				t.Fatalf("flow %d was evicted", fl.cport)
			}
		}
	}
	gone := func(fl *flow) {
		t.Helper()
		if tb.LookupOut(decode(t, fl.frame(t, true, header.TCPAck)), now) != nil {
			t.Fatalf("flow %d was not evicted", fl.cport)
		}
	}
	// A flood of new flows evicts only unassured ones, oldest first.
	e := mk(5)
	e.send(t, pkt{true, header.TCPSyn}, step())
	gone(c)
	alive(a, b, d, e)
	for port := uint16(100); port < 200; port++ {
		mk(port).send(t, pkt{true, header.TCPSyn}, step())
		alive(a, b)
		mustCheck(t, tb)
	}
	if tb.Stats().Evicted != 101 || tb.Len() != 4 {
		t.Fatalf("stats %+v len %d", tb.Stats(), tb.Len())
	}

	// With only assured entries the least recently used goes.
	tb2 := newTable(t, Config{MaxEntries: 3})
	tb = tb2
	x, y, z := mk(1), mk(2), mk(3)
	for _, fl := range []*flow{x, y, z} {
		fl.send(t, pkt{true, header.TCPSyn}, step())
		fl.send(t, pkt{false, header.TCPSyn | header.TCPAck}, step())
	}
	x.send(t, pkt{true, header.TCPAck}, step()) // x is now the most recent
	mk(4).send(t, pkt{true, header.TCPSyn}, step())
	gone(y)
	alive(x, z)
	mustCheck(t, tb)
}

// Eviction takes an expired entry before a live one, even an assured
// expired one over an unassured live one.
func TestEvictionExpiredFirst(t *testing.T) {
	tb := newTable(t, Config{MaxEntries: 2, Timeouts: Timeouts{UDPReplied: time.Second, UDP: time.Hour}})
	a := &flow{tb: tb, proto: header.ProtoUDP, cip: client, cport: 1}
	b := &flow{tb: tb, proto: header.ProtoUDP, cip: client, cport: 2}
	a.send(t, pkt{out: true}, 0)
	a.send(t, pkt{}, 0) // assured, expires at 1 s
	b.send(t, pkt{out: true}, 0)
	(&flow{tb: tb, proto: header.ProtoUDP, cip: client, cport: 3}).send(t, pkt{out: true}, 2*sec)
	if tb.Stats().Evicted != 0 || tb.Stats().Expired != 1 {
		t.Fatalf("stats %+v", tb.Stats())
	}
	if tb.LookupOut(decode(t, b.frame(t, true, 0)), 2*sec) == nil {
		t.Fatal("live entry evicted")
	}
}

func TestPortExhaustion(t *testing.T) {
	tb := newTable(t, Config{MaxEntries: 100, PortMin: 2000, PortMax: 2003, Timeouts: Timeouts{UDP: time.Minute}})
	seen := map[uint16]bool{}
	for i := range 4 {
		fl := &flow{tb: tb, proto: header.ProtoUDP, cip: client, cport: uint16(i + 1)}
		fl.send(t, pkt{out: true}, 0)
		if p := fl.e.NATPort(); p < 2000 || p > 2003 || seen[p] {
			t.Fatalf("port %d", p)
		}
		seen[fl.e.NATPort()] = true
		fl.send(t, pkt{}, 0) // answered: not to be taken over
	}
	for range 1000 {
		p := decode(t, ipFrame(header.ProtoUDP, client2, remote, udpDgram(9, 443, "")))
		if _, err := tb.Create(p, uplink, sec); !errors.Is(err, ErrPortsExhausted) {
			t.Fatalf("Create = %v, want ErrPortsExhausted", err)
		}
	}
	if tb.Stats().Exhausted != 1000 || tb.Len() != 4 {
		t.Fatalf("stats %+v", tb.Stats())
	}
	// Ports are per protocol and per uplink address.
	tcp := decode(t, ipFrame(header.ProtoTCP, client2, remote, tcpSeg(9, 443, header.TCPSyn, "")))
	if _, err := tb.Create(tcp, uplink, sec); err != nil {
		t.Fatal(err)
	}
	udp := decode(t, ipFrame(header.ProtoUDP, client2, remote, udpDgram(9, 443, "")))
	if _, err := tb.Create(udp, uplink2, sec); err != nil {
		t.Fatal(err)
	}
	// Once expired entries are swept their ports return.
	p := decode(t, ipFrame(header.ProtoUDP, client2, remote, udpDgram(10, 443, "")))
	if _, err := tb.Create(p, uplink, 2*int64(time.Minute)); err != nil {
		t.Fatalf("after expiry: %v", err)
	}
	mustCheck(t, tb)
}

// With no free port, a new flow takes over the port of the least recently
// used unanswered flow of the same protocol and uplink address.
func TestPortTakeover(t *testing.T) {
	tb := newTable(t, Config{MaxEntries: 100, PortMin: 2000, PortMax: 2002})
	mk := func(proto uint8, port uint16, up [4]byte, now int64) (*Entry, error) {
		l4 := udpDgram(port, 443, "")
		if proto == header.ProtoTCP {
			l4 = tcpSeg(port, 443, header.TCPSyn, "")
		}
		return tb.Create(decode(t, ipFrame(proto, client, remote, l4)), up, now)
	}
	old, _ := mk(header.ProtoUDP, 1, uplink, 0)
	oldPort := old.NATPort()
	mk(header.ProtoTCP, 2, uplink, 1)  // other protocol
	mk(header.ProtoUDP, 3, uplink2, 2) // other address
	mk(header.ProtoUDP, 4, uplink, 3)
	mk(header.ProtoUDP, 5, uplink, 4)
	e, err := mk(header.ProtoUDP, 6, uplink, 5)
	if err != nil || e.NATPort() != oldPort || tb.Stats().Evicted != 1 {
		t.Fatalf("Create = %v, port %d (want %d), stats %+v", err, e.NATPort(), oldPort, tb.Stats())
	}
	if tb.LookupOut(decode(t, ipFrame(header.ProtoUDP, client, remote, udpDgram(1, 443, ""))), 5) != nil {
		t.Fatal("the oldest UDP flow survived")
	}
	mustCheck(t, tb)
}

func TestReservedPorts(t *testing.T) {
	tb := newTable(t, Config{MaxEntries: 100, PortMin: 3000, PortMax: 3007})
	r1, err := tb.ReservePort(header.ProtoUDP)
	if err != nil {
		t.Fatal(err)
	}
	r2, _ := tb.ReservePort(header.ProtoUDP)
	if r1 == r2 || r1 < 3000 || r1 > 3007 {
		t.Fatalf("reserved %d %d", r1, r2)
	}
	for i := range 6 {
		fl := &flow{tb: tb, proto: header.ProtoUDP, cip: client, cport: uint16(i + 1)}
		fl.send(t, pkt{out: true}, 0)
		if p := fl.e.NATPort(); p == r1 || p == r2 {
			t.Fatalf("handed out reserved port %d", p)
		}
	}
	for i := range 6 { // answered, so that no port is taken over
		(&flow{tb: tb, proto: header.ProtoUDP, cip: client, cport: uint16(i + 1), e: &tb.slab[i]}).send(t, pkt{}, 0)
	}
	p := decode(t, ipFrame(header.ProtoUDP, client, remote, udpDgram(99, 443, "")))
	if _, err := tb.Create(p, uplink, 0); !errors.Is(err, ErrPortsExhausted) {
		t.Fatalf("Create = %v", err)
	}
	if _, err := tb.ReservePort(header.ProtoUDP); !errors.Is(err, ErrPortsExhausted) {
		t.Fatalf("ReservePort with all in use = %v", err)
	}
	// Replies to the firewall's own port are not NAT's.
	in := decode(t, ipFrame(header.ProtoUDP, remote, uplink, udpDgram(443, r1, "")))
	if tb.LookupIn(in, 0) != nil {
		t.Fatal("LookupIn matched a reserved port")
	}
	tb.ReleasePort(header.ProtoUDP, r1)
	if _, err := tb.Create(p, uplink, 0); err != nil {
		t.Fatalf("after release: %v", err)
	}
	// A reserved port is free on every uplink address.
	tb2 := newTable(t, Config{MaxEntries: 100, PortMin: 3000, PortMax: 3001})
	(&flow{tb: tb2, proto: header.ProtoTCP, cip: client, cport: 1}).send(t, pkt{true, header.TCPSyn}, 0)
	r, err := tb2.ReservePort(header.ProtoTCP)
	if err != nil || r == tb2.slab[tb2.head[listUnassured]].natPort {
		t.Fatalf("ReservePort = %d, %v", r, err)
	}
	mustCheck(t, tb)
	mustCheck(t, tb2)
}

// Many random creates, removals and expiries never give two live entries
// the same port on the same uplink address.
func TestNoPortCollisions(t *testing.T) {
	for seed := range uint64(4) {
		tb := New(Config{MaxEntries: 3000, PortMin: 1024, PortMax: 3071, Rand: testRand(seed)})
		r := testRand(seed + 100)
		now := int64(0)
		for i := range 20000 {
			now += int64(r()%8) * sec / 4
			proto := []uint8{header.ProtoTCP, header.ProtoUDP, header.ProtoICMP}[r()%3]
			var l4 []byte
			switch proto {
			case header.ProtoTCP:
				l4 = tcpSeg(uint16(r()), 443, header.TCPSyn, "")
			case header.ProtoUDP:
				l4 = udpDgram(uint16(r()), 53, "")
			default:
				l4 = icmpEcho(header.ICMPEcho, uint16(r()), 0, "")
			}
			src := [4]byte{10, 137, 0, byte(r() % 8)}
			up := [][4]byte{uplink, uplink2}[r()%2]
			_, err := tb.Create(decode(t, ipFrame(proto, src, remote, l4)), up, now)
			if err != nil && !errors.Is(err, ErrPortsExhausted) {
				t.Fatal(err)
			}
			if i%97 == 0 {
				tb.FlushClient([4]byte{10, 137, 0, byte(r() % 8)})
			}
			if i%500 == 0 {
				mustCheck(t, tb)
			}
		}
		mustCheck(t, tb)
		if tb.Stats().Created < 10000 {
			t.Fatalf("only %d created", tb.Stats().Created)
		}
	}
}

func TestFlush(t *testing.T) {
	tb := newTable(t, Config{MaxEntries: 64})
	mk := func(cip, up [4]byte, proto uint8, port uint16) {
		p := decode(t, ipFrame(proto, cip, remote, udpDgram(port, 53, "")))
		if _, err := tb.Create(p, up, 0); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 5 {
		mk(client, uplink, header.ProtoUDP, uint16(i+1))
		mk(client2, uplink, header.ProtoUDP, uint16(i+1))
		mk(client2, uplink2, header.ProtoUDP, uint16(i+100))
	}
	if n := tb.FlushClient(client); n != 5 || tb.Len() != 10 {
		t.Fatalf("FlushClient = %d, len %d", n, tb.Len())
	}
	mustCheck(t, tb)
	if n := tb.FlushUplink(uplink2); n != 5 || tb.Len() != 5 {
		t.Fatalf("FlushUplink = %d, len %d", n, tb.Len())
	}
	mustCheck(t, tb)
	if n := tb.FlushIf(func(e *Entry) bool { return e.ClientTuple().SrcPort%2 == 0 }); n != 2 || tb.Len() != 3 {
		t.Fatalf("FlushIf = %d, len %d", n, tb.Len())
	}
	for _, e := range tb.slab {
		if e.flags&flagLive != 0 && (e.ct.Src != client2 || e.uplink != uplink || e.ct.SrcPort%2 == 0) {
			t.Errorf("survivor %+v", e)
		}
	}
	if tb.Stats().Flushed != 12 {
		t.Errorf("stats %+v", tb.Stats())
	}
	mustCheck(t, tb)
	// The uplink's port map is reused by a new address once empty.
	tb.FlushUplink(uplink)
	mk(client, [4]byte{192, 0, 2, 1}, header.ProtoUDP, 1)
	if len(tb.uplinks) != 2 {
		t.Errorf("%d port maps, want 2", len(tb.uplinks))
	}
	mustCheck(t, tb)
}

func TestTooManyUplinks(t *testing.T) {
	tb := newTable(t, Config{MaxEntries: 64})
	p := decode(t, ipFrame(header.ProtoUDP, client, remote, udpDgram(1, 53, "")))
	for i := range maxUplinks {
		p.SrcPort = uint16(i + 1)
		if _, err := tb.Create(p, [4]byte{192, 0, 2, byte(i)}, 0); err != nil {
			t.Fatal(err)
		}
	}
	p.SrcPort = 100
	if _, err := tb.Create(p, [4]byte{192, 0, 2, 100}, 0); !errors.Is(err, ErrPortsExhausted) {
		t.Fatalf("Create = %v", err)
	}
	mustCheck(t, tb)
}

func TestCreateExisting(t *testing.T) {
	tb := newTable(t, Config{MaxEntries: 4})
	p := decode(t, ipFrame(header.ProtoUDP, client, remote, udpDgram(1, 53, "")))
	a, _ := tb.Create(p, uplink, 0)
	b, _ := tb.Create(p, uplink, 0)
	if a != b || tb.Len() != 1 {
		t.Fatal("Create duplicated a flow")
	}
	for _, f := range [][]byte{
		ipFrame(47, client, remote, make([]byte, 8)),
		ipFrame(header.ProtoICMP, client, remote, icmpErr(header.ICMPDestUnreach, 3, 0, make([]byte, 28))),
	} {
		if _, err := tb.Create(decode(t, f), uplink, 0); !errors.Is(err, ErrUnsupported) {
			t.Errorf("Create = %v", err)
		}
	}
}

func TestZeroAllocs(t *testing.T) {
	tb := newTable(t, Config{MaxEntries: 1024})
	out := ipFrame(header.ProtoTCP, client, remote, tcpSeg(40000, 443, header.TCPAck, "data"))
	po := decode(t, out)
	e, _ := tb.Create(po, uplink, 0)
	in := ipFrame(header.ProtoTCP, remote, uplink, tcpSeg(443, e.NATPort(), header.TCPAck, "data"))
	pi := decode(t, in)
	fast := testing.AllocsPerRun(1000, func() {
		po.Decode(out)
		e := tb.LookupOut(po, sec)
		tb.TranslateOut(e, out, po, header.CsumFull, sec)
		pi.Decode(in)
		e = tb.LookupIn(pi, sec)
		tb.TranslateIn(e, in, pi, header.CsumFull, sec)
		// Undo, so that the next round finds the same packets.
		po.RewriteSrc(out, client, 40000, header.CsumFull)
		pi.RewriteDst(in, uplink, e.NATPort(), header.CsumFull)
	})
	if fast != 0 {
		t.Errorf("fast path: %v allocs", fast)
	}

	// Create in a full table: every call evicts one entry and adds one.
	full := newTable(t, Config{MaxEntries: 1024})
	f := ipFrame(header.ProtoUDP, client, remote, udpDgram(1, 53, ""))
	p := decode(t, f)
	port := uint16(0)
	create := func() {
		port++
		p.SrcPort = port
		if _, err := full.Create(p, uplink, 0); err != nil {
			t.Fatal(err)
		}
	}
	for range 5000 {
		create()
	}
	if n := testing.AllocsPerRun(10000, create); n != 0 {
		t.Errorf("Create: %v allocs", n)
	}
	mustCheck(t, full)
	// Long churn allocates nothing at all (AllocsPerRun above would round
	// an allocation every few thousand calls down to 0).
	churn := func() {
		for range 200000 {
			create()
		}
	}
	if n := testing.AllocsPerRun(1, churn); n != 0 {
		t.Errorf("200,000 Creates in a full table: %v allocations", n)
	}
	mustCheck(t, full)

	er := ipFrame(header.ProtoICMP, remote, uplink, icmpErr(header.ICMPDestUnreach, 3, 0, in[14:14+28]))
	pe := decode(t, er)
	if n := testing.AllocsPerRun(100, func() { tb.TranslateICMPErrorIn(er, pe, sec) }); n != 0 {
		t.Errorf("ICMP error: %v allocs", n)
	}
}

// TestMemoryPerEntry measures what a table costs per entry (slab and both
// maps, preallocated by New).
func TestMemoryPerEntry(t *testing.T) {
	const n = 65536
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	tb := New(Config{MaxEntries: n})
	runtime.GC()
	runtime.ReadMemStats(&after)
	per := float64(after.HeapAlloc-before.HeapAlloc) / n
	t.Logf("%d entries: %.0f bytes per entry, %.1f MiB in all", n, per, float64(after.HeapAlloc-before.HeapAlloc)/(1<<20))
	if per > 200 {
		t.Errorf("%.0f bytes per entry: more than the 200 the package documents", per)
	}
	runtime.KeepAlive(tb)
}

// One client whose flows are all answered cannot push the other clients'
// flows out of the table: while others have entries it holds at most
// ClientMax (default half the table), and the entries it loses to its new
// flows are its own. Alone it may use the whole table.
func TestClientQuota(t *testing.T) {
	tb := newTable(t, Config{MaxEntries: 16})
	answered := func(src [4]byte, sport uint16) *Entry {
		t.Helper()
		f := ipFrame(header.ProtoUDP, src, remote, udpDgram(sport, 53, "q"))
		p := decode(t, f)
		e, err := tb.Create(p, uplink, sec)
		if err != nil {
			return nil
		}
		tb.TranslateOut(e, f, p, header.CsumFull, sec)
		r := ipFrame(header.ProtoUDP, remote, uplink, udpDgram(53, e.NATPort(), "a"))
		inbound(t, tb, r, e, sec)
		return e
	}
	var others []*Entry
	for i := range 4 {
		others = append(others, answered(client2, uint16(30000+i)))
	}
	for i := range 100 {
		if answered(client, uint16(40000+i)) == nil {
			t.Fatalf("flow %d of the busy client refused: it should evict its own", i)
		}
		mustCheck(t, tb)
		if n := tb.ClientEntries(client); n > 8 {
			t.Fatalf("the busy client holds %d entries, want at most 8 of 16", n)
		}
	}
	if n := tb.ClientEntries(client2); n != 4 {
		t.Fatalf("the quiet client lost flows: %d of 4 left", n)
	}
	for _, e := range others {
		if e.ClientIP() != client2 {
			t.Fatal("a quiet client's entry was reused for the busy one")
		}
	}
	// Alone, a client may fill the table.
	tb.FlushClient(client2)
	for i := range 16 {
		answered(client, uint16(50000+i))
	}
	if n := tb.ClientEntries(client); n != 16 {
		t.Fatalf("alone, the client holds %d of 16 entries", n)
	}
	mustCheck(t, tb)
}

// ClientMax sets the share; at it, a client's new flow evicts its own
// oldest entry, not another client's.
func TestClientQuotaConfigured(t *testing.T) {
	tb := newTable(t, Config{MaxEntries: 8, ClientMax: 2})
	for i := range 2 {
		if _, err := tb.Create(decode(t, ipFrame(header.ProtoUDP, client, remote, udpDgram(uint16(40000+i), 53, "q"))), uplink, sec); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := tb.Create(decode(t, ipFrame(header.ProtoUDP, client2, remote, udpDgram(30000, 53, "q"))), uplink, sec); err != nil {
		t.Fatal(err)
	}
	// The third flow of client evicts its own oldest.
	if _, err := tb.Create(decode(t, ipFrame(header.ProtoUDP, client, remote, udpDgram(40002, 53, "q"))), uplink, sec); err != nil {
		t.Fatal(err)
	}
	if tb.ClientEntries(client) != 2 || tb.ClientEntries(client2) != 1 || tb.Stats().Evicted != 1 {
		t.Fatalf("entries %d/%d, evicted %d; want 2/1, 1", tb.ClientEntries(client), tb.ClientEntries(client2), tb.Stats().Evicted)
	}
	mustCheck(t, tb)
}

// A RST from the remote ends a flow only with a plausible sequence number:
// in reply to the SYN it must acknowledge it, later it must be near what
// the client last acknowledged. A blind RST with a guessed number is
// refused and the flow goes on.
func TestBlindResetRefused(t *testing.T) {
	tb := newTable(t, Config{MaxEntries: 16})
	seg := func(out bool, flags uint8, seq, ack uint32) *header.Parsed {
		src, dst, sp, dp := client, remote, uint16(40000), uint16(443)
		if !out {
			src, dst, sp, dp = remote, uplink, 443, 0
		}
		p := decode(t, ipFrame(header.ProtoTCP, src, dst, tcpSeg(sp, dp, flags, "")))
		p.TCPSeq, p.TCPAck = seq, ack
		return p
	}
	syn := seg(true, header.TCPSyn, 5000, 0)
	e, err := tb.Create(syn, uplink, 0)
	if err != nil {
		t.Fatal(err)
	}
	if e.AcceptsIn(seg(false, header.TCPRst|header.TCPAck, 0, 4242)) {
		t.Error("RST not acknowledging the SYN accepted")
	}
	if e.AcceptsIn(seg(false, header.TCPRst, 0, 0)) {
		t.Error("RST without ACK in reply to a SYN accepted")
	}
	if !e.AcceptsIn(seg(false, header.TCPRst|header.TCPAck, 0, 5001)) {
		t.Error("the remote's refusal of the SYN refused")
	}
	// Handshake: SYN-ACK with the remote's ISN 90000, the client's ACK.
	synack := seg(false, header.TCPSyn|header.TCPAck, 90000, 5001)
	tb.refresh(e, synack, false, sec)
	tb.refresh(e, seg(true, header.TCPAck, 5001, 90001), true, sec)
	// Data from the remote, acknowledged by the client up to 190001.
	tb.refresh(e, seg(true, header.TCPAck, 5001, 190001), true, sec)
	for _, seq := range []uint32{190001 + 5<<20, 190001 + 3<<20, 190001 + 1<<31, 0x80000000} {
		if e.AcceptsIn(seg(false, header.TCPRst, seq, 0)) {
			t.Errorf("blind RST at seq %d accepted (client acknowledged 190001)", seq)
		}
	}
	for _, seq := range []uint32{190001, 190001 + 65535, 190001 - 1000} {
		if !e.AcceptsIn(seg(false, header.TCPRst, seq, 0)) {
			t.Errorf("RST at seq %d (in window) refused", seq)
		}
	}
	if !e.AcceptsIn(seg(false, header.TCPAck, 7, 7)) {
		t.Error("a segment without RST refused")
	}
	if e.State() != TCPEstablished {
		t.Fatalf("state %v, want established", e.State())
	}
}

// A packet moves its flow to the front of its LRU list at most once per
// lruTick (about a second), unless the flow changes lists: within a tick
// the eviction order stays as it was, a tick later the packet counts.
func TestLRUMovedOncePerTick(t *testing.T) {
	const tick = int64(1) << 30
	tb := newTable(t, Config{MaxEntries: 3})
	mk := func(port uint16) *flow { return &flow{tb: tb, proto: header.ProtoUDP, cip: client, cport: port} }
	x, y, z := mk(1), mk(2), mk(3)
	now := 10 * tick
	for _, fl := range []*flow{x, y, z} {
		fl.send(t, pkt{out: true}, now)
		fl.send(t, pkt{out: false}, now) // a reply: on the assured list at once
		mustCheck(t, tb)
	}
	if tb.slab[x.e.idx].list() != listAssured || tb.tail[listAssured] != x.e.idx {
		t.Fatalf("x is not the least recent assured entry")
	}
	// Same tick: x's packets leave it last, so a new flow evicts it.
	x.send(t, pkt{out: true}, now+tick/2)
	mustCheck(t, tb)
	if tb.tail[listAssured] != x.e.idx {
		t.Fatal("x moved within its tick")
	}
	// The next tick: y's packet moves it to the front; x stays the tail.
	y.send(t, pkt{out: true}, now+tick)
	mustCheck(t, tb)
	if tb.head[listAssured] != y.e.idx || tb.tail[listAssured] != x.e.idx {
		t.Fatalf("after the tick: head %d (y %d), tail %d (x %d)", tb.head[listAssured], y.e.idx, tb.tail[listAssured], x.e.idx)
	}
	w := mk(4)
	w.send(t, pkt{out: true}, now+tick)
	if tb.LookupOut(decode(t, x.frame(t, true, 0)), now+tick) != nil {
		t.Error("x survived: eviction did not take the least recent entry")
	}
	for _, fl := range []*flow{y, z, w} {
		if tb.LookupOut(decode(t, fl.frame(t, true, 0)), now+tick) == nil {
			t.Errorf("flow %d evicted", fl.cport)
		}
	}
	mustCheck(t, tb)
}
