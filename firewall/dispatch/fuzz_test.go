package dispatch

import (
	"fmt"
	"testing"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/header"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/link"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/rules"
)

// FuzzDispatcher feeds random frames to random links. Whatever comes in,
// the dispatcher must not panic, and every frame it puts on the uplink must
// come from our uplink address: NAT never leaks a client address and
// nothing is forwarded untranslated.
func FuzzDispatcher(f *testing.F) {
	seeds := [][]byte{
		pkt{srcMAC: c1MAC, src: client1, dst: remote, proto: header.ProtoTCP, sport: 40000, dport: 443, tcpFlags: header.TCPSyn}.bytes(),
		pkt{srcMAC: c1MAC, src: client1, dst: remote, proto: header.ProtoUDP, sport: 40000, dport: 53}.bytes(),
		pkt{srcMAC: c1MAC, src: client1, dst: remote, proto: header.ProtoICMP, sport: uint16(header.ICMPEcho), dport: 5}.bytes(),
		pkt{srcMAC: gwMAC, src: remote, dst: fwIP, proto: header.ProtoICMP, sport: uint16(header.ICMPDestUnreach), icmpCode: 3}.bytes(),
	}
	for i, s := range seeds {
		f.Add(uint8(i), s)
	}
	f.Fuzz(func(t *testing.T, which uint8, frame []byte) {
		n := newTestNet(t)
		n.d.logf = func(string, ...any) {}
		n.d.log.logf = n.d.logf
		n.d.SetRules(client2, mustRules(map[string]string{"policy": "drop", "0000": "action=accept proto=udp", "0001": "action=drop dsthost=example.com"}))
		// Open a flow first so inbound frames can match something.
		n.c[0].Input(toFrames([][]byte{seeds[0], seeds[1], seeds[2]}))
		n.upPeer.TryRead()
		ports := []*Port{n.c[0], n.c[1], n.up}
		p := ports[int(which)%len(ports)]
		p.Input([]link.Frame{{Data: frame, Offload: link.Offload{NeedsCsum: which&8 != 0, GSOType: uint8(which>>4) & 1}}})
		for _, out := range n.upPeer.TryRead() {
			var pk header.Parsed
			pk.Decode(out.Data)
			switch pk.Kind {
			case header.KindIPv4:
				if pk.Src != fwIP {
					t.Fatalf("uplink frame from %v: %x", pk.Src, out.Data)
				}
			case header.KindARP:
				if header.ARP(out.Data[14:]).SenderIP() != fwIP {
					t.Fatalf("uplink ARP for another address: %x", out.Data)
				}
			default:
				t.Fatalf("uplink got a %v frame: %x", pk.Kind, out.Data)
			}
		}
	})
}

// BenchmarkFastPath forwards packets of an existing flow client -> uplink.
func BenchmarkFastPath(b *testing.B) {
	n := newTestNet(b)
	frame := pkt{srcMAC: c1MAC, src: client1, dst: remote, proto: header.ProtoUDP, sport: 40000, dport: 443, payload: make([]byte, 1400)}.bytes()
	n.c[0].Input(toFrames([][]byte{frame}))
	n.upPeer.TryRead()
	frames := []link.Frame{{Data: frame}}
	sink := nullLink{}
	n.d.mu.Lock()
	n.d.uplink.Port.link = sink // measure the dispatcher, not the pipe's copy
	n.d.mu.Unlock()
	b.ReportAllocs()
	b.SetBytes(int64(len(frame)))
	for b.Loop() {
		// Undo the previous iteration's rewrite so the frame is the
		// client's again.
		var p header.Parsed
		p.Decode(frame)
		p.RewriteSrc(frame, client1, 40000, header.CsumFull)
		header.IPv4(frame[14:])[8] = 64
		header.IPv4(frame[14:]).SetChecksum(0)
		header.IPv4(frame[14:]).SetChecksum(header.IPv4(frame[14:]).CalculateChecksum())
		n.c[0].Input(frames)
	}
	if n.d.Stats().Forwarded < uint64(b.N) {
		b.Fatal("frames were not forwarded")
	}
}

// BenchmarkNewFlow1000Rules measures the first packet of a new flow for a
// client with 1000 rules, none of which match until the last.
func BenchmarkNewFlow1000Rules(b *testing.B) {
	n := newTestNet(b)
	m := map[string]string{"policy": "drop"}
	for i := 0; i < 999; i++ {
		m[fmt.Sprintf("%04d", i)] = fmt.Sprintf("action=accept dst4=192.0.%d.%d/32 proto=tcp dstports=1-1024", i/250, i%250)
	}
	m["0999"] = "action=accept"
	rs, err := rules.Parse(m)
	if err != nil {
		b.Fatal(err)
	}
	n.d.SetRules(client1, rs)
	n.d.mu.Lock()
	n.d.uplink.Port.link = nullLink{}
	n.d.mu.Unlock()
	base := pkt{srcMAC: c1MAC, src: client1, dst: remote, proto: header.ProtoUDP, sport: 1, dport: 443}.bytes()
	frame := make([]byte, len(base))
	frames := []link.Frame{{Data: frame}}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		copy(frame, base)
		var p header.Parsed
		p.Decode(frame)
		i++
		p.RewriteSrc(frame, client1, uint16(1024+i%60000), header.CsumFull)
		n.c[0].Input(frames)
		if i%30000 == 0 {
			b.StopTimer()
			n.d.mu.Lock()
			n.d.nat.FlushClient(client1)
			n.d.mu.Unlock()
			b.StartTimer()
		}
	}
}

// nullLink discards what is written to it.
type nullLink struct{}

func (nullLink) Name() string                           { return "null" }
func (nullLink) MAC() [6]byte                           { return upMAC }
func (nullLink) MTU() int                               { return 1500 }
func (nullLink) ReadBatch([]link.Frame) (int, error)    { return 0, link.ErrClosed }
func (nullLink) WriteBatch(f []link.Frame) (int, error) { return len(f), nil }
func (nullLink) Close() error                           { return nil }
