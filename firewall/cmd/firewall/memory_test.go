package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/internal/netnstest"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/qubesdb/qubesdbtest"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/xenstore/xenstoretest"
)

// TestClientsPerVMSize: the firewall in Qubes mode, sized as in a VM of 32
// MB with 10 client VMs and of 64 MB with 30 (-memory: the MemTotal such a
// VM's kernel reports, measured under Xen by make bench-xen), in a memory
// cgroup whose limit is what that VM leaves the firewall after its
// unpacked initramfs and the kernel's own needs. Every client must forward
// when attached and after all of them pushed a burst through at once, and
// the cgroup must never have killed the firewall. With a fixed 1 MiB of
// receive slots per link (before afpacket.Budget) the 32 MB case is killed
// at about ten clients, as the VM was.
//
// It models the firewall's own memory only: under Xen the kernel's netback
// takes about 1.75 MiB more per client, so a real 32 MB VM takes three
// clients at most (vifRoom admits no more; make bench-xen measures it).
func TestClientsPerVMSize(t *testing.T) {
	netnstest.NeedRoot(t)
	dir := t.TempDir()
	bin := filepath.Join(dir, "firewall")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	st, err := os.Stat(bin)
	if err != nil {
		t.Fatal(err)
	}
	// claim: the clients the README promises for that size; beyond it
	// (the third case) the firewall refuses the vifs its memory cannot
	// carry and keeps forwarding for the others.
	type size struct{ vm, memTotal, clients, claim int }
	sizes := []size{{32, 20, 10, 10}, {64, 52, 30, 30}, {32, 20, 40, 10}}
	if v := os.Getenv("QGFW_VM_SIZES"); v != "" {
		// VM:MEMTOTAL:CLIENTS,... (MiB), to find where a size stops
		// forwarding: e.g. 32:20:40,64:52:90.
		sizes = nil
		for _, f := range strings.Split(v, ",") {
			var s size
			if _, err := fmt.Sscanf(f, "%d:%d:%d", &s.vm, &s.memTotal, &s.clients); err != nil {
				t.Fatalf("QGFW_VM_SIZES: %q: %v", f, err)
			}
			s.claim = min(s.clients, map[int]int{32: 10, 64: 30}[s.vm])
			sizes = append(sizes, s)
		}
	}
	for _, c := range sizes {
		t.Run(fmt.Sprintf("%dMB-%dclients", c.vm, c.clients), func(t *testing.T) {
			// The VM holds the unpacked initramfs (the binary and little
			// else) in RAM, and its kernel needs about 3 MiB beyond the
			// socket queues (netback, slab, page tables).
			limit := int64(c.memTotal)<<20 - st.Size() - 1<<20 - 3<<20
			clientsInVM(t, bin, c.memTotal, c.clients, c.claim, limit)
		})
	}
}

func clientsInVM(t *testing.T, bin string, memTotal, n, claim int, limit int64) {
	cg := newMemCgroup(t, limit)
	tag := fmt.Sprintf("qgm%d-", os.Getpid())
	fw, up := netnstest.New(t, tag+"fw"), netnstest.New(t, tag+"up")
	netnstest.Veth(t, fw, "eth0", up, "eth0")
	up.IP(t, "addr", "add", "10.137.0.1/24", "dev", "eth0")
	up.IP(t, "addr", "add", "192.0.2.10/32", "dev", "lo")
	up.IP(t, "link", "set", "eth0", "up")
	(&netnstest.Echo{}).Start(t, up, "192.0.2.10:7")

	xs, xsSock, db, dbSock := fakeDom0(t)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(db.Write("/qubes-ip", "10.137.0.5"))
	must(db.Write("/qubes-gateway", "10.137.0.1"))
	must(db.Write("/qubes-primary-dns", "10.139.1.1"))
	type client struct {
		ns  *netnstest.NS
		ip  string
		dom int
	}
	var clients []client
	for i := range n {
		c := client{ns: netnstest.New(t, fmt.Sprintf("%sc%d", tag, i)), ip: fmt.Sprintf("10.137.0.%d", 100+i), dom: 10 + i}
		vif := fmt.Sprintf("vif%d.0", c.dom)
		mac := fmt.Sprintf("00:16:3e:5e:%02x:00", c.dom)
		netnstest.Veth(t, fw, vif, c.ns, "eth0")
		fw.IP(t, "link", "set", vif, "address", "fe:ff:ff:ff:ff:ff")
		for _, args := range [][]string{
			{"link", "set", "eth0", "address", mac},
			{"addr", "add", c.ip + "/32", "dev", "eth0"},
			{"link", "set", "eth0", "up"},
			{"route", "add", "10.137.0.5", "dev", "eth0"},
			{"route", "add", "default", "via", "10.137.0.5", "dev", "eth0", "onlink"},
		} {
			c.ns.IP(t, args...)
		}
		must(db.Write("/qubes-firewall/"+c.ip+"/policy", "drop"))
		must(db.Write("/qubes-firewall/"+c.ip+"/0000", "action=accept"))
		must(db.Write("/qubes-firewall/"+c.ip, ""))
		clients = append(clients, c)
	}

	// The firewall joins the cgroup before it runs: sh waits until the
	// test has moved it (ip netns exec mounts its own /sys, so sh cannot
	// do it itself), then execs it.
	joined := filepath.Join(t.TempDir(), "joined")
	cmd := fw.Command(context.Background(), "sh", "-c", `while [ ! -e "$1" ]; do sleep 0.05; done; exec "$2" xen -xenstore "$3" -qubesdb-peer "$4" -memory "$5"`,
		"sh", joined, bin, xsSock, dbSock, strconv.Itoa(memTotal))
	proc := netnstest.Start(t, "firewall", cmd)
	cg.join(t, proc.Cmd.Process.Pid)
	must(os.WriteFile(joined, nil, 0o644))
	alive := func(when string) {
		t.Helper()
		select {
		case err := <-proc.Done():
			t.Fatalf("%s: the firewall exited (%v; cgroup: %s)\n%s", when, err, cg, netnstest.Tail(proc.Output(), 20))
		default:
		}
	}
	for _, c := range clients {
		vif := fmt.Sprintf("backend/vif/%d/0", c.dom)
		xs.WriteAll(map[string]string{vif + "/ip": c.ip, vif + "/mac": fmt.Sprintf("00:16:3e:5e:%02x:00", c.dom),
			vif + "/state": "2", vif + "/frontend-id": strconv.Itoa(c.dom)})
	}
	// Every vif ends connected (hotplug-status) or refused by the link
	// budget (logged); the firewall must be alive throughout.
	var refused []client
	connected := func(c client) bool {
		v, _ := xs.Read(fmt.Sprintf("backend/vif/%d/0/hotplug-status", c.dom))
		return v == "connected"
	}
	isRefused := func(c client) bool {
		return strings.Contains(proc.Output(), fmt.Sprintf("vif%d.0: open vif%d.0: open vif%d.0: memory budget exhausted", c.dom, c.dom, c.dom))
	}
	netnstest.WaitFor(t, "every vif connected or refused", 3*time.Minute, func() bool {
		select {
		case <-proc.Done():
			return true // alive says why, below
		default:
		}
		for _, c := range clients {
			if !connected(c) && !isRefused(c) {
				return false
			}
		}
		return true
	})
	alive("attaching")
	var admitted []client
	for _, c := range clients {
		if connected(c) {
			admitted = append(admitted, c)
			xs.Write(fmt.Sprintf("backend/vif/%d/0/state", c.dom), "4")
		} else {
			refused = append(refused, c)
		}
	}
	if len(admitted) < min(n, claim) {
		t.Fatalf("%d of %d clients attached, want at least %d", len(admitted), n, min(n, claim))
	}
	if len(refused) > 0 {
		t.Logf("%d clients attached, %d refused by the link budget (no hotplug-status: their VMs fail to start, the others keep going)", len(admitted), len(refused))
	}
	clients = admitted
	everyone := func(when string) {
		t.Helper()
		for _, c := range clients {
			netnstest.WaitFor(t, when+": TCP echo from "+c.ip, time.Minute, func() bool { return netnstest.TCPEcho(c.ns, "192.0.2.10:7") == nil })
			if err := netnstest.UDPEcho(c.ns, "192.0.2.10:7"); err != nil {
				t.Fatalf("%s: UDP echo from %s: %v", when, c.ip, err)
			}
		}
		alive(when)
	}
	everyone("attached")

	// All clients at once, 4 MiB each way through the echo server: every
	// link's slots and queues in use together.
	start := time.Now()
	var wg sync.WaitGroup
	errs := make([]error, len(clients))
	for i, c := range clients {
		wg.Go(func() { errs[i] = echoBurst(c.ns, 4<<20) })
	}
	wg.Wait()
	failed := 0
	for i, err := range errs {
		if err != nil {
			failed++
			t.Logf("burst from %s: %v", clients[i].ip, err)
		}
	}
	t.Logf("burst: %d clients x 4 MiB both ways in %.1f s, %d cut short", len(clients), time.Since(start).Seconds(), failed)
	alive("after the burst")
	everyone("after the burst")
	t.Logf("%d of %d clients as a VM with MemTotal %d MiB: cgroup %s; %s", len(clients), n, memTotal, cg, logLine(proc.Output(), "link budget:"))
	if k := cg.oomKills(); k != 0 {
		t.Fatalf("the cgroup killed %d times (%s)", k, cg)
	}
}

// echoBurst sends size bytes to the echo server from n and reads them back.
func echoBurst(n *netnstest.NS, size int) error {
	c, err := n.Dial("tcp4", "192.0.2.10:7", 30*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Minute)) // a hang guard
	go func() {
		b := make([]byte, 32<<10)
		for sent := 0; sent < size; sent += len(b) {
			if _, err := c.Write(b); err != nil {
				return
			}
		}
		c.(*net.TCPConn).CloseWrite()
	}()
	got, err := io.Copy(io.Discard, c)
	if err == nil && got != int64(size) {
		err = fmt.Errorf("echoed %d bytes of %d", got, size)
	}
	return err
}

func logLine(out, marker string) string {
	for _, l := range strings.Split(out, "\n") {
		if i := strings.Index(l, marker); i >= 0 {
			return strings.TrimSpace(l[i:])
		}
	}
	return "no " + strconv.Quote(marker) + " line"
}

// fakeDom0 serves the in-repo xenstore and QubesDB (dom0 peer) fakes on
// unix sockets.
func fakeDom0(t *testing.T) (*xenstoretest.FakeServer, string, *qubesdbtest.Server, string) {
	t.Helper()
	dir := t.TempDir()
	xs := xenstoretest.NewFakeServer(3)
	t.Cleanup(xs.Close)
	xsSock := filepath.Join(dir, "xenstore.sock")
	l, err := net.Listen("unix", xsSock)
	if err != nil {
		t.Fatal(err)
	}
	go xs.Serve(l)
	db := qubesdbtest.NewServer(t.Logf)
	t.Cleanup(func() { db.Close() })
	dbSock := filepath.Join(dir, "qubesdb.sock")
	dl, err := net.Listen("unix", dbSock)
	if err != nil {
		t.Fatal(err)
	}
	go db.ServePeerListener(dl)
	return xs, xsSock, db, dbSock
}

// memCgroup is a memory cgroup (v2, or v1's memory controller) with a
// hard limit, removed at the end of the test.
type memCgroup struct {
	dir   string
	v2    bool
	limit int64
}

func newMemCgroup(t *testing.T, limit int64) *memCgroup {
	t.Helper()
	name := fmt.Sprintf("qgfw-test-%d-%d", os.Getpid(), time.Now().UnixNano())
	cg := &memCgroup{limit: limit}
	switch {
	case hasController("/sys/fs/cgroup/cgroup.controllers", "memory"):
		cg.dir, cg.v2 = filepath.Join("/sys/fs/cgroup", name), true
	case fileExists("/sys/fs/cgroup/memory/memory.limit_in_bytes"):
		cg.dir = filepath.Join("/sys/fs/cgroup/memory", name)
	default:
		t.Fatal("no memory cgroup controller (cgroup v2 with memory, or v1's memory hierarchy)")
	}
	if err := os.Mkdir(cg.dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// The firewall is gone by now (its process is killed in an
		// earlier cleanup); a cgroup with no task can be removed.
		for range 50 {
			if os.Remove(cg.dir) == nil {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
	})
	files := map[string]string{"memory.limit_in_bytes": strconv.FormatInt(limit, 10)}
	if cg.v2 {
		files = map[string]string{"memory.max": strconv.FormatInt(limit, 10), "memory.swap.max": "0"}
	}
	for f, v := range files {
		if err := os.WriteFile(filepath.Join(cg.dir, f), []byte(v), 0o644); err != nil && f != "memory.swap.max" {
			t.Fatalf("%s: %v", f, err)
		}
	}
	return cg
}

func (c *memCgroup) join(t *testing.T, pid int) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(c.dir, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0o644); err != nil {
		t.Fatalf("join the cgroup: %v", err)
	}
}

func (c *memCgroup) read(f string) string {
	b, _ := os.ReadFile(filepath.Join(c.dir, f))
	return strings.TrimSpace(string(b))
}

// oomKills is how often the kernel killed a task of the cgroup.
func (c *memCgroup) oomKills() int {
	f := "memory.oom_control"
	if c.v2 {
		f = "memory.events"
	}
	for _, l := range strings.Split(c.read(f), "\n") {
		if v, ok := strings.CutPrefix(l, "oom_kill "); ok {
			n, _ := strconv.Atoi(v)
			return n
		}
	}
	return 0
}

func (c *memCgroup) String() string {
	peak := c.read("memory.max_usage_in_bytes")
	if c.v2 {
		peak = c.read("memory.peak")
	}
	p, _ := strconv.ParseInt(peak, 10, 64)
	return fmt.Sprintf("limit %.1f MiB, peak %.1f MiB, oom kills %d", float64(c.limit)/(1<<20), float64(p)/(1<<20), c.oomKills())
}

func hasController(file, name string) bool {
	b, err := os.ReadFile(file)
	return err == nil && slices.Contains(strings.Fields(string(b)), name)
}

func fileExists(name string) bool {
	_, err := os.Stat(name)
	return err == nil
}
