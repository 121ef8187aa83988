package main

import (
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

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/qubesdb"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/xenstore"
	"golang.org/x/sys/unix"
)

// TestXenModeAgainstFakes runs the firewall binary in Qubes mode against
// the in-repo xenstore and QubesDB (dom0 peer) fakes on unix sockets: when
// the fake xenstore announces vif7.0, the firewall must write
// hotplug-status, attach the veth of that name as the client, forward its
// traffic under QubesDB's rules, and stop when dom0 writes
// control/shutdown.
func TestXenModeAgainstFakes(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for network namespaces (make test runs as root)")
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "firewall")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	tag := fmt.Sprintf("qgfwx%d", os.Getpid())
	fw, cl, up := tag+"-fw", tag+"-cl", tag+"-up"
	for _, n := range []string{fw, cl, up} {
		sh(t, "ip", "netns", "add", n)
		t.Cleanup(func() { exec.Command("ip", "netns", "del", n).Run() })
		sh(t, "ip", "-n", n, "link", "set", "lo", "up")
	}
	sh(t, "ip", "link", "add", tag+"a", "type", "veth", "peer", "name", tag+"b")
	sh(t, "ip", "link", "set", tag+"a", "netns", fw, "name", "vif7.0")
	sh(t, "ip", "link", "set", tag+"b", "netns", cl, "name", "eth0")
	sh(t, "ip", "link", "add", tag+"c", "type", "veth", "peer", "name", tag+"d")
	sh(t, "ip", "link", "set", tag+"c", "netns", fw, "name", "eth0")
	sh(t, "ip", "link", "set", tag+"d", "netns", up, "name", "eth0")
	sh(t, "ip", "netns", "exec", fw, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
	sh(t, "ip", "-n", fw, "link", "set", "vif7.0", "address", "fe:ff:ff:ff:ff:ff")
	// Left down: the firewall brings its interfaces up, as in the VM.
	for _, c := range [][]string{
		{"-n", cl, "link", "set", "eth0", "address", "00:16:3e:5e:6c:07"},
		{"-n", cl, "addr", "add", "10.137.0.30/32", "dev", "eth0"},
		{"-n", cl, "link", "set", "eth0", "up"},
		{"-n", cl, "route", "add", "10.137.0.5", "dev", "eth0"},
		{"-n", cl, "route", "add", "default", "via", "10.137.0.5", "dev", "eth0", "onlink"},
		{"-n", up, "addr", "add", "10.137.0.1/24", "dev", "eth0"},
		{"-n", up, "addr", "add", "192.0.2.10/32", "dev", "lo"},
		{"-n", up, "link", "set", "eth0", "up"},
	} {
		sh(t, "ip", c...)
	}
	echo := listenIn(t, up, "192.0.2.10:7")
	go serveEcho(echo)

	xs := xenstore.NewFakeServer(3)
	t.Cleanup(xs.Close)
	xsSock := filepath.Join(dir, "xenstore.sock")
	l, err := net.Listen("unix", xsSock)
	if err != nil {
		t.Fatal(err)
	}
	go xs.Serve(l)

	db := qubesdb.NewServer(t.Logf)
	t.Cleanup(func() { db.Close() })
	for k, v := range map[string]string{
		"/qubes-ip": "10.137.0.5", "/qubes-gateway": "10.137.0.1", "/qubes-primary-dns": "10.139.1.1",
		"/qubes-firewall/10.137.0.30/policy": "drop", "/qubes-firewall/10.137.0.30/0000": "action=accept proto=tcp",
	} {
		if err := db.Write(k, v); err != nil {
			t.Fatal(err)
		}
	}
	if err := db.Write("/qubes-firewall/10.137.0.30", ""); err != nil {
		t.Fatal(err)
	}
	dbSock := filepath.Join(dir, "qubesdb.sock")
	dl, err := net.Listen("unix", dbSock)
	if err != nil {
		t.Fatal(err)
	}
	go db.ServePeerListener(dl)

	var out syncBuf
	cmd := exec.Command("ip", "netns", "exec", fw, bin, "xen", "-xenstore", xsSock, "-qubesdb-peer", dbSock)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		if t.Failed() {
			t.Logf("firewall output:\n%s", out.String())
		}
	})

	// The toolstack creates the backend; netback waits for hotplug-status.
	vif := "backend/vif/7/0"
	xs.WriteAll(map[string]string{vif + "/ip": "10.137.0.30", vif + "/mac": "00:16:3e:5e:6c:07", vif + "/state": "2", vif + "/frontend-id": "7"})
	waitUntil(t, "hotplug-status", func() bool { v, _ := xs.Read(vif + "/hotplug-status"); return v == "connected" })
	xs.Write(vif+"/state", "4")
	waitUntil(t, "TCP through the discovered client link", func() bool { return tcpEchoFrom(cl, "192.0.2.10:7") == nil })
	if err := udpFrom(cl, "192.0.2.10:7"); err == nil {
		t.Fatal("UDP passed although QubesDB's rules allow only TCP")
	}

	// dom0: "poweroff".
	xs.Write("control/shutdown", "poweroff")
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("firewall exited with %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("firewall ignored control/shutdown")
	}
	if v, _ := xs.Read("control/shutdown"); v != "" {
		t.Errorf("control/shutdown = %q after the request, want it acknowledged (\"\")", v)
	}
	if !strings.Contains(out.String(), "dom0 asks to poweroff") {
		t.Errorf("no shutdown log line")
	}
}

func sh(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
}

// inNS runs f on a thread switched into namespace ns; sockets it creates
// stay there. The thread is discarded afterwards.
func inNS(ns string, f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		fd, err := unix.Open("/var/run/netns/"+ns, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			errc <- err
			return
		}
		defer unix.Close(fd)
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			errc <- err
			return
		}
		errc <- f()
	}()
	return <-errc
}

func listenIn(t *testing.T, ns, addr string) net.Listener {
	var l net.Listener
	if err := inNS(ns, func() (err error) { l, err = net.Listen("tcp4", addr); return }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

func serveEcho(l net.Listener) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			buf := make([]byte, 1024)
			n, _ := c.Read(buf)
			c.Write(buf[:n])
		}()
	}
}

func tcpEchoFrom(ns, addr string) error {
	return inNS(ns, func() error {
		c, err := net.DialTimeout("tcp4", addr, 2*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		c.Write([]byte("ping"))
		buf := make([]byte, 4)
		if _, err := c.Read(buf); err != nil || string(buf) != "ping" {
			return fmt.Errorf("echo %q: %v", buf, err)
		}
		return nil
	})
}

func udpFrom(ns, addr string) error {
	return inNS(ns, func() error {
		c, err := net.Dial("udp4", addr)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(2 * time.Second))
		c.Write([]byte("ping"))
		_, err = c.Read(make([]byte, 4))
		return err
	})
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

type syncBuf struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
