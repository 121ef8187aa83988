// Package netnstest builds network namespaces, veth pairs and small
// servers for the firewall's root-only tests (AF_PACKET, Qubes mode, the
// namespace end-to-end tests, the QEMU image test). It is test
// infrastructure: nothing in the firewall binary imports it.
package netnstest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// NeedRoot skips t unless it runs as root, naming what needs it.
func NeedRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for network namespaces (make test runs as root)")
	}
}

// Run runs a command and fails t with its output if it fails.
func Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// NS is a network namespace made by a test.
type NS struct{ Name string }

// New creates namespace name (deleted at cleanup) with lo up and IPv6 off,
// so the kernel adds no router solicitations or MLD noise.
func New(t testing.TB, name string) *NS {
	t.Helper()
	n := &NS{Name: name}
	Run(t, "ip", "netns", "add", n.Name)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", n.Name).Run() })
	n.IP(t, "link", "set", "lo", "up")
	n.Sysctl(t, "net.ipv6.conf.all.disable_ipv6=1")
	n.Sysctl(t, "net.ipv6.conf.default.disable_ipv6=1")
	return n
}

// IP runs `ip ARGS` inside the namespace.
func (n *NS) IP(t testing.TB, args ...string) {
	t.Helper()
	Run(t, "ip", append([]string{"-n", n.Name}, args...)...)
}

// Command returns a command that runs inside the namespace.
func (n *NS) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
}

// Sysctl sets a sysctl inside the namespace.
func (n *NS) Sysctl(t testing.TB, kv string) {
	t.Helper()
	if out, err := n.Command(context.Background(), "sysctl", "-qw", kv).CombinedOutput(); err != nil {
		t.Fatalf("sysctl %s in %s: %v: %s", kv, n.Name, err, out)
	}
}

// Do runs f on an OS thread switched into the namespace; sockets f creates
// belong to the namespace for their whole life. The thread is discarded
// afterwards (the goroutine exits locked to it), so nothing else runs in it.
func (n *NS) Do(f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		fd, err := unix.Open("/var/run/netns/"+n.Name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			errc <- err
			return
		}
		defer unix.Close(fd)
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns %s: %w", n.Name, err)
			return
		}
		errc <- f()
	}()
	return <-errc
}

// Dial opens a connection from inside the namespace.
func (n *NS) Dial(network, addr string, timeout time.Duration) (net.Conn, error) {
	var c net.Conn
	err := n.Do(func() (err error) { c, err = net.DialTimeout(network, addr, timeout); return })
	return c, err
}

// Listen opens a listener inside the namespace, closed at cleanup.
func (n *NS) Listen(t testing.TB, network, addr string) net.Listener {
	t.Helper()
	var l net.Listener
	if err := n.Do(func() (err error) { l, err = net.Listen(network, addr); return }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// ListenPacket opens a packet socket inside the namespace, closed at cleanup.
func (n *NS) ListenPacket(t testing.TB, network, addr string) net.PacketConn {
	t.Helper()
	var pc net.PacketConn
	if err := n.Do(func() (err error) { pc, err = net.ListenPacket(network, addr); return }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	return pc
}

// Veth connects interface a in namespace na with b in nb.
func Veth(t testing.TB, na *NS, a string, nb *NS, b string) {
	t.Helper()
	tmp := fmt.Sprintf("nt%d", time.Now().UnixNano()%1e9)
	Run(t, "ip", "link", "add", tmp+"a", "type", "veth", "peer", "name", tmp+"b")
	Run(t, "ip", "link", "set", tmp+"a", "netns", na.Name, "name", a)
	Run(t, "ip", "link", "set", tmp+"b", "netns", nb.Name, "name", b)
}

// WaitFor polls cond until it holds. The limit only guards against a hang
// and says nothing about speed.
func WaitFor(t testing.TB, what string, limit time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Process is a background command whose output is kept for failure reports.
type Process struct {
	Cmd  *exec.Cmd
	out  Buffer
	done chan error
}

// Output is everything the process printed so far.
func (p *Process) Output() string { return p.out.String() }

// Done delivers the result of the command's Wait.
func (p *Process) Done() <-chan error { return p.done }

// Start runs cmd in the background (see StartOwned): SIGTERM (then
// SIGKILL) at cleanup, its output logged when t failed.
func Start(t testing.TB, what string, cmd *exec.Cmd) *Process {
	t.Helper()
	p := &Process{Cmd: cmd}
	cmd.Stdout, cmd.Stderr = &p.out, &p.out
	done, err := StartOwned(cmd)
	if err != nil {
		t.Fatalf("start %s: %v", what, err)
	}
	p.done = make(chan error, 1)
	go func() { p.done <- <-done }()
	t.Cleanup(func() {
		cmd.Process.Signal(unix.SIGTERM)
		select {
		case err := <-p.done:
			p.done <- err // keep it for Done
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
		}
		if t.Failed() {
			t.Logf("--- %s output:\n%s", what, Tail(p.Output(), 60))
		}
	})
	return p
}

// StartOwned starts cmd so that it is killed when the test process dies
// (cleanups do not run after Ctrl-C or a -timeout panic), and returns a
// channel that delivers the result of cmd.Wait. The parent-death signal
// follows the thread that forked, not the process, and Go destroys
// threads (those locked by Do, for one): the child is started and waited
// for on a thread locked for its whole life.
func StartOwned(cmd *exec.Cmd) (<-chan error, error) {
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

// Tail is the last lines of s (a serial console's CRs dropped).
func Tail(s string, lines int) string {
	l := strings.Split(strings.ReplaceAll(s, "\r", ""), "\n")
	if len(l) > lines {
		l = l[len(l)-lines:]
	}
	return strings.Join(l, "\n")
}

// Buffer collects a process's output; safe for concurrent use.
type Buffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *Buffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *Buffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// Len is the number of bytes written so far.
func (s *Buffer) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Len()
}

// Echo answers TCP and UDP with what it received and records the sources
// and payloads it saw.
type Echo struct {
	mu   sync.Mutex
	seen []string // "src payload"
}

func (e *Echo) record(src net.Addr, b []byte) {
	e.mu.Lock()
	e.seen = append(e.seen, fmt.Sprintf("%s %s", src, b))
	e.mu.Unlock()
}

// Saw reports whether a recorded "source payload" line contains substr.
func (e *Echo) Saw(substr string) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, s := range e.seen {
		if strings.Contains(s, substr) {
			return true
		}
	}
	return false
}

// Start serves TCP and UDP echo on addr inside n. Bind a specific address:
// a UDP server on 0.0.0.0 answers from its interface's address, not the
// one it was asked on.
func (e *Echo) Start(t testing.TB, n *NS, addr string) {
	t.Helper()
	l := n.Listen(t, "tcp4", addr)
	pc := n.ListenPacket(t, "udp4", addr)
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

// EchoOnce writes msg on c and checks that it comes back.
func EchoOnce(c net.Conn, msg string) error {
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte(msg)); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	for k := 0; k < len(buf); {
		m, err := c.Read(buf[k:])
		k += m
		if err != nil {
			return err
		}
	}
	if string(buf) != msg {
		return fmt.Errorf("echo %q, want %q", buf, msg)
	}
	return nil
}

// TCPEcho connects from n to addr and checks that a message comes back.
func TCPEcho(n *NS, addr string) error { return echo(n, "tcp4", addr) }

// UDPEcho is TCPEcho over UDP.
func UDPEcho(n *NS, addr string) error { return echo(n, "udp4", addr) }

func echo(n *NS, network, addr string) error {
	c, err := n.Dial(network, addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	return EchoOnce(c, fmt.Sprintf("%s-%d", network, time.Now().UnixNano()))
}

// Ping sends one echo request from n.
func Ping(n *NS, ip string) error {
	out, err := n.Command(context.Background(), "ping", "-c", "1", "-W", "5", ip).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ping %s: %v: %s", ip, err, out)
	}
	return nil
}

// Lookup resolves name from n through the DNS server at dnsAddr.
func Lookup(n *NS, dnsAddr, name string) ([]string, error) {
	r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		return n.Dial(network, dnsAddr+":53", 5*time.Second)
	}}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return r.LookupHost(ctx, name)
}

// Rejected reports whether err is what an ICMP reject produces (and not a
// timeout, which would mean a silent drop).
func Rejected(err error) bool {
	return errors.Is(err, unix.EHOSTUNREACH) || errors.Is(err, unix.ECONNREFUSED) ||
		errors.Is(err, unix.ENETUNREACH) || errors.Is(err, unix.EACCES)
}
