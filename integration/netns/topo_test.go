// Package netns runs the firewall binary end to end between real network
// namespaces: two client VMs, the firewall, and two netvms with real
// servers (dnsmasq, TCP/UDP echo, iperf3), configured through the in-repo
// QubesDB server. It needs root; `make test` runs it.
package netns

import (
	"bufio"
	"bytes"
	"context"
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

// Addresses of the topology (Qubes conventions: /32 clients, the
// firewall's own IP is their gateway, 10.139.1.x are the virtual DNS).
const (
	fwIP1     = "10.137.0.5" // firewall behind netvm 1
	netvm1IP  = "10.137.0.1"
	fwIP2     = "10.138.0.7" // firewall behind netvm 2
	netvm2IP  = "10.138.0.1"
	client1IP = "10.137.0.20"
	client2IP = "10.137.0.21"
	dnsIP     = "10.139.1.1"
	dns2IP    = "10.139.1.2"
	serverIP  = "192.0.2.10" // echo + iperf3, behind both netvms
	otherIP   = "192.0.2.20" // echo, behind both netvms
	thirdIP   = "192.0.2.30" // echo, behind both netvms
	onlyNet2  = "192.0.2.40" // echo, behind netvm 2 only
)

// ns is a network namespace made by the test.
type ns struct {
	name string
}

func newNS(t *testing.T, name string) *ns {
	t.Helper()
	n := &ns{name: fmt.Sprintf("qgfw-%s-%d", name, os.Getpid())}
	run(t, "ip", "netns", "add", n.name)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", n.name).Run() })
	n.ip(t, "link", "set", "lo", "up")
	return n
}

// ip runs `ip ARGS` inside the namespace.
func (n *ns) ip(t *testing.T, args ...string) {
	t.Helper()
	run(t, "ip", append([]string{"-n", n.name}, args...)...)
}

// sh runs a command inside the namespace and returns its output.
func (n *ns) exec(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.name, name}, args...)...)
}

func (n *ns) sysctl(t *testing.T, kv string) {
	t.Helper()
	out, err := n.exec(context.Background(), "sysctl", "-qw", kv).CombinedOutput()
	if err != nil {
		t.Fatalf("sysctl %s in %s: %v: %s", kv, n.name, err, out)
	}
}

// do runs f on an OS thread switched into the namespace. Sockets created by
// f belong to the namespace for their whole life. The thread is discarded
// afterwards (the goroutine exits locked), so no other code runs in it.
func (n *ns) do(f func() error) error {
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

// dial opens a connection from inside the namespace.
func (n *ns) dial(network, addr string, timeout time.Duration) (net.Conn, error) {
	var c net.Conn
	err := n.do(func() error {
		var err error
		c, err = net.DialTimeout(network, addr, timeout)
		return err
	})
	return c, err
}

// listen opens a listener inside the namespace.
func (n *ns) listen(t *testing.T, network, addr string) net.Listener {
	t.Helper()
	var l net.Listener
	if err := n.do(func() error {
		var err error
		l, err = net.Listen(network, addr)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

func (n *ns) listenPacket(t *testing.T, network, addr string) net.PacketConn {
	t.Helper()
	var pc net.PacketConn
	if err := n.do(func() error {
		var err error
		pc, err = net.ListenPacket(network, addr)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	return pc
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// veth connects interface a in namespace na with b in nb.
func veth(t *testing.T, na *ns, a string, nb *ns, b string) {
	t.Helper()
	tmp := fmt.Sprintf("qv%d", time.Now().UnixNano()%1e9)
	run(t, "ip", "link", "add", tmp+"a", "type", "veth", "peer", "name", tmp+"b")
	run(t, "ip", "link", "set", tmp+"a", "netns", na.name, "name", a)
	run(t, "ip", "link", "set", tmp+"b", "netns", nb.name, "name", b)
}

// echoServer answers TCP and UDP on addr:port with what it received, and
// records the sources and payloads it saw.
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

func (e *echoServer) start(t *testing.T, n *ns, addr string) {
	l := n.listen(t, "tcp4", addr)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 64<<10)
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
	pc := n.listenPacket(t, "udp4", addr)
	go func() {
		buf := make([]byte, 64<<10)
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

// process is a background command whose output is kept for failure reports.
type process struct {
	cmd *exec.Cmd
	out *syncBuffer
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func start(t *testing.T, what string, cmd *exec.Cmd) *process {
	t.Helper()
	p := &process{cmd: cmd, out: &syncBuffer{}}
	cmd.Stdout, cmd.Stderr = p.out, p.out
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", what, err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(unix.SIGTERM)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			t.Logf("--- %s output:\n%s", what, tail(p.out.String(), 80))
		}
	})
	return p
}

func tail(s string, lines int) string {
	l := strings.Split(s, "\n")
	if len(l) > lines {
		l = l[len(l)-lines:]
	}
	return strings.Join(l, "\n")
}

// waitFor polls cond until it holds; the timeout only guards against a
// hang and says nothing about speed.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// buildBinaries compiles the firewall and the QubesDB tool from the
// firewall module.
func buildBinaries(t *testing.T, dir string) (firewall, qubesdb string) {
	t.Helper()
	root, err := filepath.Abs("../../firewall")
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"firewall", "qubesdb"} {
		cmd := exec.Command("go", "build", "-o", filepath.Join(dir, name), "./cmd/"+name)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("build %s: %v\n%s", name, err, out)
		}
	}
	return filepath.Join(dir, "firewall"), filepath.Join(dir, "qubesdb")
}

// rssKB reads a process's resident set size.
func rssKB(pid int) int {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return -1
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		var kb int
		if _, err := fmt.Sscanf(s.Text(), "VmRSS: %d kB", &kb); err == nil {
			return kb
		}
	}
	return -1
}
