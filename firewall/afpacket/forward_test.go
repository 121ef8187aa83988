package afpacket

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/header"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/link"
)

// Routed topology, the firewall's shape:
//
//	ns c: c0 10.0.0.1/24 --veth-- f0 [ns fw, no addresses] f1 --veth-- s0 10.0.1.2/24 :ns s
//
// c and s route everything else through 10.0.0.254 and 10.0.1.254, whose
// MACs (f0's and f1's) are static neighbour entries, so no ARP crosses.
// Either a user-space forwarder runs on AF_PACKET links on f0 and f1, or
// (kernel mode) f0/f1 get those gateway addresses and ip_forward is on.
type routedTopo struct {
	c, fw, s string
}

var (
	macC0 = [6]byte{2, 0, 0, 0, 0, 0xc0}
	macS0 = [6]byte{2, 0, 0, 0, 0, 0x50}
	macF1 = [6]byte{2, 0, 0, 0, 0, 0xf1}

	ipC      = [4]byte{10, 0, 0, 1}
	ipS      = [4]byte{10, 0, 1, 2}
	ipSVirt  = [4]byte{10, 0, 2, 2} // s as c sees it through the 1:1 NAT
	ipCVirt  = [4]byte{10, 0, 3, 1} // c as s sees it through the 1:1 NAT
	testPort = 5001
)

func newRoutedTopo(t testing.TB) *routedTopo {
	needRoot(t)
	r := &routedTopo{c: newNetns(t, "c"), fw: newNetns(t, "fw"), s: newNetns(t, "s")}
	veth(t, r.fw, "f0", macString(macF0), r.c, "c0", macString(macC0))
	veth(t, r.fw, "f1", macString(macF1), r.s, "s0", macString(macS0))
	for _, h := range []struct{ ns, dev, addr, gw, gwMAC string }{
		{r.c, "c0", "10.0.0.1/24", "10.0.0.254", macString(macF0)},
		{r.s, "s0", "10.0.1.2/24", "10.0.1.254", macString(macF1)},
	} {
		run(t, "ip", "-n", h.ns, "addr", "add", h.addr, "dev", h.dev)
		run(t, "ip", "-n", h.ns, "neigh", "add", h.gw, "lladdr", h.gwMAC, "dev", h.dev, "nud", "permanent")
		run(t, "ip", "-n", h.ns, "route", "add", "default", "via", h.gw)
	}
	return r
}

// kernelForwarding makes fw an ordinary Linux router.
func (r *routedTopo) kernelForwarding(t testing.TB) {
	run(t, "ip", "-n", r.fw, "addr", "add", "10.0.0.254/24", "dev", "f0")
	run(t, "ip", "-n", r.fw, "addr", "add", "10.0.1.254/24", "dev", "f1")
	sysctl(t, r.fw, "net/ipv4/ip_forward", "1")
}

// rewriteFunc edits an IPv4 frame in place before it is forwarded.
type rewriteFunc func(frame []byte, p *header.Parsed, o *link.Offload)

// gsoSeen counts the TCP super-frames a forwarder read, and how many of
// them had the offload metadata this package promises.
type gsoSeen struct {
	frames, good atomic.Int64
}

// forward runs a user-space router between a (towards c) and b (towards
// s) until the links close: IPv4 only, MACs set for the next hop, TTL
// decremented, then rewrite for each direction.
func forward(t testing.TB, a, b *Link, toS, toC rewriteFunc, seen *gsoSeen) {
	var wg sync.WaitGroup
	loop := func(from, to *Link, dst [6]byte, rw rewriteFunc) {
		defer wg.Done()
		in := make([]link.Frame, 64)
		out := make([]link.Frame, 0, 64)
		var p header.Parsed
		for {
			n, err := from.ReadBatch(in)
			if err != nil {
				return
			}
			out = out[:0]
			for i := range in[:n] {
				f := &in[i]
				p.Decode(f.Data)
				if p.Kind != header.KindIPv4 {
					continue
				}
				if seen != nil && f.Offload.GSOType&^link.GSOECN == link.GSOTCPv4 {
					seen.frames.Add(1)
					o := f.Offload
					if len(f.Data) > from.MTU()+14 && o.NeedsCsum && int(o.CsumStart) == p.L4Off &&
						o.CsumOffset == header.TCPChecksumOffset && int(o.HdrLen) <= len(f.Data) && o.GSOSize > 0 {
						seen.good.Add(1)
					}
				}
				eth := header.Ethernet(f.Data)
				eth.SetDst(dst)
				eth.SetSrc(to.MAC())
				if !header.IPv4(f.Data[p.IPOff:]).DecTTL() {
					continue
				}
				if rw != nil {
					rw(f.Data, &p, &f.Offload)
				}
				out = append(out, *f)
			}
			if _, err := to.WriteBatch(out); err != nil {
				return
			}
		}
	}
	wg.Add(2)
	go loop(a, b, macS0, toS)
	go loop(b, a, macC0, toC)
	t.Cleanup(func() {
		a.Close()
		b.Close()
		wg.Wait()
	})
}

// nat1to1 is a static 1:1 NAT as the firewall's NAT path does it: c
// reaches s as ipSVirt and s sees c as ipCVirt. Partial checksums get the
// pseudo-header change only.
func nat1to1() (toS, toC rewriteFunc) {
	mode := func(o *link.Offload) header.CsumMode {
		if o.NeedsCsum {
			return header.CsumPartial
		}
		return header.CsumFull
	}
	toS = func(f []byte, p *header.Parsed, o *link.Offload) {
		if p.Dst == ipSVirt {
			p.RewriteDst(f, ipS, p.DstPort, mode(o))
		}
		if p.Src == ipC {
			p.RewriteSrc(f, ipCVirt, p.SrcPort, mode(o))
		}
	}
	toC = func(f []byte, p *header.Parsed, o *link.Offload) {
		if p.Src == ipS {
			p.RewriteSrc(f, ipSVirt, p.SrcPort, mode(o))
		}
		if p.Dst == ipCVirt {
			p.RewriteDst(f, ipC, p.DstPort, mode(o))
		}
	}
	return toS, toC
}

// transfer sends size pseudo-random bytes from c to s over TCP to dst and
// checks that s receives exactly them from wantPeer.
func transfer(t *testing.T, r *routedTopo, dst, wantPeer [4]byte, size int64) {
	var ln net.Listener
	err := inNetns(r.s, func() (err error) {
		ln, err = net.Listen("tcp4", fmt.Sprintf("%s:%d", net.IP(ipS[:]), testPort))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type result struct {
		sum  [32]byte
		n    int64
		peer string
		err  error
	}
	done := make(chan result, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			done <- result{err: err}
			return
		}
		defer conn.Close()
		h := sha256.New()
		n, err := io.Copy(h, conn)
		res := result{n: n, peer: conn.RemoteAddr().(*net.TCPAddr).IP.String(), err: err}
		copy(res.sum[:], h.Sum(nil))
		done <- res
	}()

	var conn net.Conn
	err = inNetns(r.c, func() (err error) {
		conn, err = net.DialTimeout("tcp4", fmt.Sprintf("%s:%d", net.IP(dst[:]), testPort), 10*time.Second)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	src := io.LimitReader(rand.NewChaCha8([32]byte{1, 2, 3}), size)
	if _, err := io.Copy(io.MultiWriter(conn, h), src); err != nil {
		t.Fatal(err)
	}
	conn.Close()
	res := <-done
	if res.err != nil {
		t.Fatal(res.err)
	}
	if res.n != size || !bytes.Equal(res.sum[:], h.Sum(nil)) {
		t.Fatalf("s received %d bytes with sha256 %x, c sent %d with %x", res.n, res.sum, size, h.Sum(nil))
	}
	if want := net.IP(wantPeer[:]).String(); res.peer != want {
		t.Fatalf("s saw the connection from %s, want %s", res.peer, want)
	}
}

// TestForwardGSO: TCP from c to s through two AF_PACKET links: the links
// read TSO super-frames with their offload metadata, and writing them out
// as they are lets the kernel segment them and complete the checksums.
func TestForwardGSO(t *testing.T) {
	r := newRoutedTopo(t)
	a := openIn(t, r.fw, "f0", Config{})
	b := openIn(t, r.fw, "f1", Config{})
	var seen gsoSeen
	forward(t, a, b, nil, nil, &seen)
	transfer(t, r, ipS, ipC, 64<<20)
	t.Logf("super-frames read: %d, with the expected metadata: %d; f0 %+v; f1 %+v",
		seen.frames.Load(), seen.good.Load(), a.Stats(), b.Stats())
	if seen.good.Load() == 0 {
		t.Fatalf("no TCPv4 super-frame longer than the MTU with NEEDS_CSUM, csum_start at the TCP header and csum_offset 16 (%d GSO frames)", seen.frames.Load())
	}
	if seen.good.Load() != seen.frames.Load() {
		t.Errorf("%d of %d GSO frames had unexpected metadata", seen.frames.Load()-seen.good.Load(), seen.frames.Load())
	}
}

// TestForwardNAT is TestForwardGSO with a 1:1 NAT rewriting both addresses
// of every packet, super-frames with partial checksums included.
func TestForwardNAT(t *testing.T) {
	r := newRoutedTopo(t)
	a := openIn(t, r.fw, "f0", Config{})
	b := openIn(t, r.fw, "f1", Config{})
	var seen gsoSeen
	toS, toC := nat1to1()
	forward(t, a, b, toS, toC, &seen)
	transfer(t, r, ipSVirt, ipCVirt, 64<<20)
	t.Logf("super-frames: %d", seen.good.Load())
	if seen.good.Load() == 0 {
		t.Fatal("no GSO super-frame crossed the NAT")
	}
}

// BenchmarkForward compares one iperf3 TCP stream through the AF_PACKET
// forwarder (plain, with the 1:1 NAT, and with the NAT and a 4 MiB socket
// buffer) with Linux forwarding in the same topology. Each run takes iperf3's 5 seconds whatever b.N is; run with
// -benchtime=1x.
func BenchmarkForward(b *testing.B) {
	if _, err := exec.LookPath("iperf3"); err != nil {
		b.Skip("needs iperf3")
	}
	modes := []struct {
		name   string
		kernel bool
		nat    bool
		cfg    Config
	}{
		{name: "kernel", kernel: true},
		{name: "afpacket"},
		{name: "afpacket-nat", nat: true},
		{name: "afpacket-nat-sockbuf4M", nat: true, cfg: Config{SocketBuffer: 4 << 20}},
	}
	for _, m := range modes {
		b.Run(m.name, func(b *testing.B) {
			r := newRoutedTopo(b)
			dst := ipS
			var a, bl *Link
			if m.kernel {
				r.kernelForwarding(b)
			} else {
				a = openIn(b, r.fw, "f0", m.cfg)
				bl = openIn(b, r.fw, "f1", m.cfg)
				var toS, toC rewriteFunc
				if m.nat {
					toS, toC = nat1to1()
					dst = ipSVirt
				}
				forward(b, a, bl, toS, toC, nil)
			}
			bps, secs := iperf3(b, r, dst)
			b.ReportMetric(bps/1e9, "Gbit/s")
			if a != nil {
				s := a.Stats()
				b.ReportMetric(float64(s.FramesIn)/secs, "frames/s")
				b.ReportMetric(float64(s.BytesIn)/float64(max(s.FramesIn, 1)), "bytes/frame")
				b.ReportMetric(float64(s.QueueFull), "queuefull-drops")
			}
		})
	}
}

// iperf3 runs a 5-second TCP test from c to dst and returns the received
// bits per second and the test's duration.
func iperf3(b *testing.B, r *routedTopo, dst [4]byte) (bps, secs float64) {
	srv := exec.Command("ip", "netns", "exec", r.s, "iperf3", "-s", "-1", "-B", net.IP(ipS[:]).String())
	if err := srv.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() {
		srv.Process.Kill()
		srv.Wait()
	}()
	for i := 0; !strings.Contains(run(b, "ip", "netns", "exec", r.s, "ss", "-ltn"), ":5201"); i++ {
		if i == 100 {
			b.Fatal("iperf3 server did not start")
		}
		time.Sleep(20 * time.Millisecond)
	}
	out := run(b, "ip", "netns", "exec", r.c, "iperf3", "-c", net.IP(dst[:]).String(), "-t", "5", "-J")
	var res struct {
		End struct {
			SumReceived struct {
				Seconds       float64 `json:"seconds"`
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		b.Fatalf("iperf3 output: %v\n%s", err, out)
	}
	return res.End.SumReceived.BitsPerSecond, res.End.SumReceived.Seconds
}
