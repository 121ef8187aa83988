package afpacket

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Helpers for tests that need root: private network namespaces joined by
// veth pairs, built with iproute2.

var nsSeq atomic.Int32

func needRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces and AF_PACKET sockets (make test runs as root)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs ip from iproute2")
	}
}

// newNetns creates a namespace that is deleted when the test ends. IPv6 is
// off in it so that the kernel sends no router or neighbour solicitations
// the tests would have to ignore.
func newNetns(t testing.TB, role string) string {
	t.Helper()
	name := fmt.Sprintf("afp%d-%d-%s", os.Getpid(), nsSeq.Add(1), role)
	run(t, "ip", "netns", "add", name)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	sysctl(t, name, "net/ipv6/conf/all/disable_ipv6", "1")
	sysctl(t, name, "net/ipv6/conf/default/disable_ipv6", "1")
	run(t, "ip", "-n", name, "link", "set", "lo", "up")
	return name
}

// sysctl sets /proc/sys/key in namespace ns (net sysctls belong to the
// namespace of the thread that opens them).
func sysctl(t testing.TB, ns, key, value string) {
	t.Helper()
	if err := inNetns(ns, func() error { return os.WriteFile("/proc/sys/"+key, []byte(value), 0o644) }); err != nil {
		t.Fatal(err)
	}
}

// veth creates the pair nsA:a <-> nsB:b with fixed MACs and brings both up.
func veth(t testing.TB, nsA, a, macA, nsB, b, macB string) {
	t.Helper()
	run(t, "ip", "-n", nsA, "link", "add", a, "address", macA, "type", "veth", "peer", "name", b, "address", macB, "netns", nsB)
	run(t, "ip", "-n", nsA, "link", "set", a, "up")
	run(t, "ip", "-n", nsB, "link", "set", b, "up")
	waitUp(t, nsA, a)
	waitUp(t, nsB, b)
}

// waitUp waits until the kernel's link watcher has activated dev: until
// then it has the noop qdisc, which silently discards what is sent.
func waitUp(t testing.TB, ns, dev string) {
	t.Helper()
	for i := 0; ; i++ {
		out := run(t, "ip", "-n", ns, "-o", "link", "show", "dev", dev)
		if strings.Contains(out, "state UP") && !strings.Contains(out, "qdisc noop") {
			return
		}
		if i == 200 {
			t.Fatalf("%s in %s not up: %s", dev, ns, out)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// run runs a command and fails the test with its output if it fails.
func run(t testing.TB, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// inNetns runs fn on a thread that joined namespace ns. Sockets fn
// creates stay in ns and can be used from any goroutine afterwards. The
// thread is never returned to the scheduler: the goroutine exits locked,
// so the runtime discards the thread.
func inNetns(ns string, fn func() error) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		f, err := os.Open("/run/netns/" + ns)
		if err != nil {
			done <- err
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			done <- fmt.Errorf("setns %s: %w", ns, err)
			return
		}
		done <- fn()
	}()
	return <-done
}

// openIn opens a link on ifname in namespace ns, closed when the test ends.
func openIn(t testing.TB, ns, ifname string, cfg Config) *Link {
	t.Helper()
	if cfg.Logf == nil {
		cfg.Logf = t.Logf
	}
	var l *Link
	err := inNetns(ns, func() (err error) {
		l, err = Open(ifname, cfg)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}
