package imagetest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Addresses (Qubes conventions: /32 clients whose gateway is the
// firewall's own IP, 10.139.1.x the virtual DNS servers).
const (
	fwIP1     = "10.137.0.5" // the firewall behind netvm 1
	netvm1IP  = "10.137.0.1"
	fwIP2     = "10.138.0.7" // the firewall behind netvm 2
	netvm2IP  = "10.138.0.1"
	client2IP = "10.137.0.20" // domain 2, vif2.0
	client3IP = "10.137.0.21" // domain 3, vif3.0
	dnsIP     = "10.139.1.1"
	dns2IP    = "10.139.1.2"
	serverIP  = "192.0.2.10" // echo and iperf3 behind every netvm; allowed.test
	otherIP   = "192.0.2.20" // echo behind every netvm; blocked.test
	onlyNet2  = "192.0.2.40" // echo behind netvm 2 only; net2.test
	clientMAC = "00:16:3e:5e:6c:00"
	// gatewayMAC is the static neighbour a Qubes client uses for its
	// gateway (the firewall).
	gatewayMAC = "fe:ff:ff:ff:ff:ff"
)

// netns is a network namespace made by the test.
type netns struct{ name string }

func newNetns(t *testing.T, name string) *netns {
	t.Helper()
	n := &netns{name: name}
	run(t, "ip", "netns", "add", n.name)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", n.name).Run() })
	n.ip(t, "link", "set", "lo", "up")
	n.exec(context.Background(), "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1").Run()
	return n
}

func (n *netns) ip(t *testing.T, args ...string) {
	t.Helper()
	run(t, "ip", append([]string{"-n", n.name}, args...)...)
}

func (n *netns) exec(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.name, name}, args...)...)
}

// do runs f on an OS thread switched into the namespace; sockets f creates
// stay there. The thread is discarded afterwards (the goroutine exits
// locked to it).
func (n *netns) do(f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		fd, err := unix.Open("/var/run/netns/"+n.name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			errc <- err
			return
		}
		defer unix.Close(fd)
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns %s: %w", n.name, err)
			return
		}
		errc <- f()
	}()
	return <-errc
}

func (n *netns) dial(network, addr string, timeout time.Duration) (net.Conn, error) {
	var c net.Conn
	err := n.do(func() (err error) { c, err = net.DialTimeout(network, addr, timeout); return })
	return c, err
}

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// client makes n a Qubes client VM on tap: its address, the static
// gateway neighbour, the default route via the firewall.
func (n *netns) client(t *testing.T, tap, ip string) {
	t.Helper()
	n.ip(t, "link", "set", tap, "address", clientMAC)
	n.ip(t, "addr", "add", ip+"/32", "dev", tap)
	n.ip(t, "route", "add", fwIP1, "dev", tap)
	n.ip(t, "neigh", "replace", fwIP1, "lladdr", gatewayMAC, "dev", tap, "nud", "permanent")
	n.ip(t, "route", "add", "default", "via", fwIP1, "dev", tap, "onlink")
}

// netvm is a namespace playing the netvm: the firewall's gateway with
// dnsmasq on the virtual DNS addresses, echo servers and iperf3.
type netvm struct {
	*netns
	hosts string
	echo  *echoServer
}

// newNetvm configures n (whose uplink tap is up) as the netvm at gwIP;
// dnsmasq answers the names in hosts ("name addr").
func newNetvm(t *testing.T, n *netns, tap, gwIP string, servers []string, hosts map[string]string) *netvm {
	t.Helper()
	v := &netvm{netns: n, echo: &echoServer{}}
	n.ip(t, "addr", "add", gwIP+"/24", "dev", tap)
	for _, a := range append([]string{dnsIP, dns2IP}, servers...) {
		n.ip(t, "addr", "add", a+"/32", "dev", "lo")
	}
	var h strings.Builder
	for name, addr := range hosts {
		fmt.Fprintf(&h, "%s %s\n", addr, name)
	}
	v.hosts = filepath.Join(t.TempDir(), "hosts")
	if err := os.WriteFile(v.hosts, []byte(h.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	start(t, "dnsmasq", n.exec(context.Background(), "dnsmasq", "-k", "--log-facility=-",
		"--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--addn-hosts="+v.hosts, "--local-ttl=2",
		"--listen-address="+dnsIP, "--listen-address="+dns2IP, "--bind-interfaces", "--pid-file=", "--user=root"))
	// Each server bound to its address: a UDP server on 0.0.0.0 would
	// answer from another source address than the one it was asked on.
	for _, a := range servers {
		for _, port := range []string{"7", "8005"} {
			v.echo.start(t, n, a+":"+port)
		}
	}
	return v
}

// echoServer answers TCP and UDP with what it received and records who
// sent what.
type echoServer struct {
	mu   sync.Mutex
	seen []string // "src payload"
}

func (e *echoServer) record(src net.Addr, b []byte) {
	e.mu.Lock()
	e.seen = append(e.seen, fmt.Sprintf("%s %s", src, b))
	e.mu.Unlock()
}

func (e *echoServer) saw(substr string) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, s := range e.seen {
		if strings.Contains(s, substr) {
			return true
		}
	}
	return false
}

func (e *echoServer) start(t *testing.T, n *netns, addr string) {
	t.Helper()
	var l net.Listener
	var pc net.PacketConn
	if err := n.do(func() (err error) {
		if l, err = net.Listen("tcp4", addr); err != nil {
			return err
		}
		pc, err = net.ListenPacket("udp4", addr)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close(); pc.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 4096)
				for {
					k, err := c.Read(buf)
					if k > 0 {
						e.record(c.RemoteAddr(), buf[:min(k, 64)])
						if _, err := c.Write(buf[:k]); err != nil {
							return
						}
					}
					if err != nil {
						return
					}
				}
			}()
		}
	}()
	go func() {
		buf := make([]byte, 4096)
		for {
			k, src, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			e.record(src, buf[:min(k, 64)])
			pc.WriteTo(buf[:k], src)
		}
	}()
}

// start runs a background command, stopped at cleanup; its output is
// shown when the test failed.
func start(t *testing.T, what string, cmd *exec.Cmd) {
	t.Helper()
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	done, err := startOwned(cmd)
	if err != nil {
		t.Fatalf("start %s: %v", what, err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(unix.SIGTERM)
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			t.Logf("--- %s output:\n%s", what, tail(out.String(), 30))
		}
	})
}

// startOwned starts cmd so that it is killed when the test process dies
// (cleanups do not run after Ctrl-C or go test -timeout), and returns a
// channel that delivers the result of cmd.Wait. The parent-death signal
// follows the thread that forked, not the process, and Go destroys
// threads (those locked by namespace switches, for one): the child is
// started and waited for on a thread locked for its whole life.
func startOwned(cmd *exec.Cmd) (<-chan error, error) {
	cmd.SysProcAttr = &unix.SysProcAttr{Pdeathsig: unix.SIGKILL}
	done := make(chan error, 1)
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		done <- cmd.Wait()
	}()
	return done, <-started
}

// tcpEcho connects from n to addr and checks that a message comes back.
func tcpEcho(n *netns, addr string) error {
	c, err := n.dial("tcp4", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	return echoOnce(c, fmt.Sprintf("tcp-%d", time.Now().UnixNano()))
}

func udpEcho(n *netns, addr string) error {
	c, err := n.dial("udp4", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	return echoOnce(c, fmt.Sprintf("udp-%d", time.Now().UnixNano()))
}

func echoOnce(c net.Conn, msg string) error {
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte(msg)); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	for n := 0; n < len(buf); {
		k, err := c.Read(buf[n:])
		n += k
		if err != nil {
			return err
		}
	}
	if string(buf) != msg {
		return fmt.Errorf("echo %q, want %q", buf, msg)
	}
	return nil
}

func ping(n *netns, ip string) error {
	out, err := n.exec(context.Background(), "ping", "-c", "1", "-W", "5", ip).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ping %s: %v: %s", ip, err, out)
	}
	return nil
}

// lookup resolves name from n through the virtual DNS server.
func lookup(n *netns, name string) ([]string, error) {
	r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		return n.dial(network, dnsIP+":53", 5*time.Second)
	}}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return r.LookupHost(ctx, name)
}

// rejected reports whether err is what an ICMP reject produces, and not
// a timeout (a silent drop).
func rejected(err error) bool {
	return errors.Is(err, unix.EHOSTUNREACH) || errors.Is(err, unix.ECONNREFUSED) ||
		errors.Is(err, unix.ENETUNREACH) || errors.Is(err, unix.EACCES)
}

// waitFor polls cond until it holds; the limit only guards against a hang
// (TCG is slow) and says nothing about speed.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
