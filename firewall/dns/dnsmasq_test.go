package dns

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"sync"
	"testing"
	"time"
)

// The integration test runs the resolver (Run goroutine, real clock) against
// real dnsmasq processes on 127.0.0.1. The resolver always queries port 53
// of its servers; udpAdapter maps each virtual server address (as a netvm
// would hand out in /qubes-primary-dns) to the dnsmasq's random local port
// and back, over a real UDP socket.

// dnsmasqPath finds dnsmasq (Debian: dnsmasq-base, /usr/sbin is often not
// in PATH for non-root users).
func dnsmasqPath() string {
	if p, err := exec.LookPath("dnsmasq"); err == nil {
		return p
	}
	if _, err := os.Stat("/usr/sbin/dnsmasq"); err == nil {
		return "/usr/sbin/dnsmasq"
	}
	return ""
}

// dnsmasq is a running dnsmasq answering hostRecord ("name,addr") with the
// given TTL, and NXDOMAIN for other names under example.
type dnsmasq struct {
	cmd  *exec.Cmd
	addr netip.AddrPort
	out  bytes.Buffer
}

func startDnsmasq(t *testing.T, hostRecord string) *dnsmasq {
	t.Helper()
	path := dnsmasqPath()
	if path == "" {
		t.Skip("dnsmasq not installed (Debian: apt-get install dnsmasq-base); skipping the integration test")
	}
	// A free port: bind, note, release. dnsmasq binds it right after.
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := pc.LocalAddr().(*net.UDPAddr).AddrPort()
	pc.Close()
	d := &dnsmasq{addr: addr}
	d.cmd = exec.Command(path, "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
		"--listen-address=127.0.0.1", "--bind-interfaces", fmt.Sprintf("--port=%d", addr.Port()),
		"--host-record="+hostRecord, "--local=/example/", "--local-ttl=1", "--pid-file=",
		"--log-facility=-", "--log-queries")
	d.cmd.Stdout, d.cmd.Stderr = &d.out, &d.out
	if err := d.cmd.Start(); err != nil {
		t.Fatalf("start dnsmasq: %v", err)
	}
	t.Cleanup(func() { d.stop(t) })
	// Ready once it answers a query.
	c, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(addr))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	q, err := buildQuery(nil, 1, testQName)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1500)
	for deadline := time.Now().Add(30 * time.Second); ; { // failure guard only
		if time.Now().After(deadline) {
			t.Fatalf("dnsmasq on %v never answered; output:\n%s", addr, d.out.String())
		}
		c.Write(q)
		c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		if _, err := c.Read(buf); err == nil {
			return d
		}
	}
}

func (d *dnsmasq) stop(t *testing.T) {
	if d.cmd.ProcessState != nil {
		return
	}
	d.cmd.Process.Kill()
	d.cmd.Wait()
	t.Logf("dnsmasq %v output:\n%s", d.addr, d.out.String())
}

// udpAdapter is a Conn over a real UDP socket.
type udpAdapter struct {
	c      *net.UDPConn
	mu     *sync.Mutex
	routes map[netip.Addr]netip.AddrPort // virtual server -> dnsmasq
}

func (a *udpAdapter) LocalPort() uint16 { return a.c.LocalAddr().(*net.UDPAddr).AddrPort().Port() }
func (a *udpAdapter) Close() error      { return a.c.Close() }

func (a *udpAdapter) WriteTo(b []byte, dst netip.AddrPort) error {
	a.mu.Lock()
	real, ok := a.routes[dst.Addr()]
	a.mu.Unlock()
	if !ok || dst.Port() != 53 {
		return fmt.Errorf("no route to %v", dst)
	}
	_, err := a.c.WriteToUDPAddrPort(b, real)
	return err
}

func (a *udpAdapter) ReadFrom(ctx context.Context, b []byte) (int, netip.AddrPort, error) {
	if dl, ok := ctx.Deadline(); ok {
		a.c.SetReadDeadline(dl)
	}
	n, src, err := a.c.ReadFromUDPAddrPort(b)
	if err != nil {
		if ctx.Err() != nil {
			return 0, netip.AddrPort{}, ctx.Err()
		}
		return 0, netip.AddrPort{}, err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	for virt, real := range a.routes {
		if real == netip.AddrPortFrom(src.Addr().Unmap(), src.Port()) {
			return n, netip.AddrPortFrom(virt, 53), nil
		}
	}
	return n, src, nil
}

func TestDnsmasq(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	virt1, virt2 := netip.MustParseAddr("10.139.1.1"), netip.MustParseAddr("10.200.0.53")
	first := startDnsmasq(t, "test.example,10.1.2.3")
	second := startDnsmasq(t, "test.example,10.9.9.9")

	var mu sync.Mutex
	routes := map[netip.Addr]netip.AddrPort{virt1: first.addr, virt2: second.addr}
	servers := []netip.Addr{virt1}
	changed := make(chan struct{}, 100)
	r := New(Config{
		Servers: func() []netip.Addr {
			mu.Lock()
			defer mu.Unlock()
			return slices.Clone(servers)
		},
		Listen: func() (Conn, error) {
			c, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.MustParseAddrPort("127.0.0.1:0")))
			if err != nil {
				return nil, err
			}
			return &udpAdapter{c: c, mu: &mu, routes: routes}, nil
		},
		OnChange: func() { changed <- struct{}{} },
		Logf:     t.Logf,
		MinTTL:   time.Second,
		Grace:    time.Second,
		Timeout:  time.Second,
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("Run returned %v", err)
		}
	}()

	// waitFor waits, event by event, until name has the wanted state.
	waitFor := func(what, name string, want ...string) {
		t.Helper()
		guard := time.After(time.Minute) // failure guard only
		for {
			got, ok := r.Lookup(name)
			var s []string
			for _, a := range got {
				s = append(s, a.String())
			}
			if ok == (want != nil) && slices.Equal(s, want) {
				t.Logf("%s: %s -> %v, %v", what, name, got, ok)
				return
			}
			select {
			case <-changed:
			case <-guard:
				t.Fatalf("%s: %s is %v, %v; want %v", what, name, got, ok, want)
			}
		}
	}

	r.SetNames([]string{"test.example", "missing.example"})
	waitFor("initial resolution", "test.example", "10.1.2.3")
	if _, ok := r.Lookup("missing.example"); ok {
		t.Error("NXDOMAIN name resolved")
	}

	// The record changes: restart the server with another address. The
	// resolver must follow after the 1 s TTL.
	first.stop(t)
	third := startDnsmasq(t, "test.example,10.1.2.4")
	mu.Lock()
	routes[virt1] = third.addr
	mu.Unlock()
	waitFor("address change", "test.example", "10.1.2.4")

	// netvm change: new DNS server, Kick.
	mu.Lock()
	servers = []netip.Addr{virt2}
	mu.Unlock()
	r.Kick()
	waitFor("netvm change", "test.example", "10.9.9.9")

	// The server goes away: after TTL + grace the name is unresolved.
	second.stop(t)
	waitFor("server gone", "test.example")

	s := r.Stats()
	t.Logf("stats %+v", s)
	if s.Ignored != 0 || s.Answers == 0 {
		t.Errorf("stats %+v", s)
	}
}
