package imagetest

import (
	"bufio"
	"fmt"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/qubesdb/qubesdbtest"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/internal/netnstest"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/xenstore"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/xenstore/xenstoretest"
)

// bootMarker is the firewall's first console line as PID 1.
const bootMarker = "qubes-go-firewall: started (pid 1)"

// firewallVM is the image booted as a Qubes firewall VM: xenstore and
// QubesDB fakes on its virtio-serial ports, one uplink NIC and client NICs.
type firewallVM struct {
	t    *testing.T
	vm   *vm
	xs   *xenstoretest.FakeServer
	db   *qubesdbtest.Server
	host *netnstest.Buffer // the fakes' own log
}

// clientVM is a Qubes client: its domain ID (the NIC is vif<domid>.0),
// address and namespace.
type clientVM struct {
	domid int
	ip    string
	ns    *netnstest.NS
	nic   *nic
}

// bootFirewall boots the image with mem MB, serves xenstore and QubesDB
// (holding qdb) to it, and announces the clients once the firewall runs.
func bootFirewall(t *testing.T, img *image, tag string, mem int, uplink *nic, clients []*clientVM, qdb map[string]string) *firewallVM {
	t.Helper()
	f := &firewallVM{t: t, xs: xenstoretest.NewFakeServer(1), host: &netnstest.Buffer{}}
	logf := func(format string, args ...any) { fmt.Fprintf(f.host, format+"\n", args...) }
	f.db = qubesdbtest.NewServer(logf)
	for k, v := range qdb {
		if err := f.db.Write(k, v); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		f.xs.Close()
		f.db.Close()
		if t.Failed() && f.host.Len() > 0 {
			t.Logf("--- xenstore/QubesDB fakes:\n%s", netnstest.Tail(f.host.String(), 40))
		}
	})
	nics := []*nic{uplink}
	for _, c := range clients {
		nics = append(nics, c.nic)
	}
	f.vm = startVM(t, img, tag, vmConfig{mem: mem, nics: nics, serial: true})
	serveXenbus(t, f.xs, f.vm.xs)
	go func() {
		if err := f.db.ServePeer(f.vm.qdb); err != nil {
			logf("QubesDB peer: %v", err)
		}
	}()
	for _, c := range clients {
		// The toolstack creates the backend directory; the firewall must
		// answer with hotplug-status before the frontend connects.
		dir := fmt.Sprintf("backend/vif/%d/0", c.domid)
		f.xs.WriteAll(map[string]string{dir + "/frontend-id": strconv.Itoa(c.domid), dir + "/ip": c.ip,
			dir + "/mac": clientMAC, dir + "/state": "2"})
	}
	return f
}

// connectClients waits for the firewall's hotplug-status on every client's
// backend and then marks the backends Connected, as netback would.
func (f *firewallVM) connectClients(clients []*clientVM) {
	f.t.Helper()
	f.waitConsole(bootMarker)
	for _, c := range clients {
		dir := fmt.Sprintf("backend/vif/%d/0", c.domid)
		f.waitFor("hotplug-status of "+dir, func() bool { v, _ := f.xs.Read(dir + "/hotplug-status"); return v == "connected" })
		f.xs.Write(dir+"/state", "4")
	}
}

// waitFor is waitFor that also fails at once when the VM has stopped.
func (f *firewallVM) waitFor(what string, cond func() bool) {
	f.t.Helper()
	waitFor(f.t, what, func() bool {
		if !f.vm.running() {
			f.t.Fatalf("the VM stopped (%v) while waiting for %s", f.vm.exitErr, what)
		}
		return cond()
	})
}

func (f *firewallVM) waitConsole(s string) {
	f.t.Helper()
	f.waitFor(fmt.Sprintf("%q on the console", s), func() bool { return strings.Contains(f.vm.console.String(), s) })
}

// setRules replaces the rules of client ip the way dom0 does — remove the
// directory, write policy and NNNN entries (sparse), then the commit
// marker — and waits until the firewall has logged the new rules.
func (f *firewallVM) setRules(ip string, rules ...string) {
	f.t.Helper()
	mark := "rules of " + ip
	before := strings.Count(f.vm.console.String(), mark)
	f.db.Remove("/qubes-firewall/" + ip + "/")
	f.must(f.db.Write("/qubes-firewall/"+ip+"/policy", "drop"))
	for i, r := range rules {
		f.must(f.db.Write(fmt.Sprintf("/qubes-firewall/%s/%04d", ip, i*2), r))
	}
	f.must(f.db.Write("/qubes-firewall/"+ip, ""))
	f.waitFor("rules of "+ip+" applied", func() bool { return strings.Count(f.vm.console.String(), mark) > before })
}

func (f *firewallVM) must(err error) {
	f.t.Helper()
	if err != nil {
		f.t.Fatal(err)
	}
}

// qubesDB is what dom0 writes for a firewall behind netvm 1 with the
// given clients, each allowed everything.
func qubesDB(clients []*clientVM) map[string]string {
	m := map[string]string{"/qubes-ip": fwIP1, "/qubes-gateway": netvm1IP, "/qubes-netmask": "255.255.255.0",
		"/qubes-primary-dns": dnsIP, "/qubes-secondary-dns": dns2IP}
	var ips []string
	for _, c := range clients {
		ips = append(ips, c.ip)
		m["/qubes-firewall/"+c.ip+"/policy"] = "drop"
		m["/qubes-firewall/"+c.ip+"/0000"] = "action=accept"
		m["/qubes-firewall/"+c.ip] = ""
	}
	m["/connected-ips"] = strings.Join(ips, " ")
	return m
}

func testMem() int {
	if m, err := strconv.Atoi(os.Getenv("QGFW_QEMU_MEM")); err == nil && m > 0 {
		return m
	}
	return 64
}

// tagFor names a test's namespaces and taps: a prefix (qg and one letter)
// and the test process's ID, so that sweepStale recognises leftovers of a
// killed run. With the suffixes added to it at most 14 bytes (IFNAMSIZ).
func tagFor(prefix string) string { return fmt.Sprintf("%s%d", prefix, os.Getpid()) }

// TestImage boots the image as a Qubes firewall VM between a netvm and two
// client VMs and checks what the namespace tests check of the binary, on
// the artifact users install.
func TestImage(t *testing.T) {
	img := needImage(t)
	tag := tagFor("qgi")
	up1, up2 := netnstest.New(t, tag+"u1"), netnstest.New(t, tag+"u2")
	clients := []*clientVM{
		{domid: 2, ip: client2IP, ns: netnstest.New(t, tag+"c2"), nic: &nic{mac: "52:54:00:00:02:00", rename: "vif2.0"}},
		{domid: 3, ip: client3IP, ns: netnstest.New(t, tag+"c3"), nic: &nic{mac: "52:54:00:00:03:00", rename: "vif3.0"}},
	}
	for _, c := range clients {
		c.nic.ns = c.ns
	}
	uplink := &nic{mac: "00:16:3e:5e:6c:05", ns: up1}
	f := bootFirewall(t, img, tag, testMem(), uplink, clients, qubesDB(clients))
	net1 := newNetvm(t, up1, uplink.tap, netvm1IP, []string{serverIP, otherIP},
		map[string]string{"allowed.test": serverIP, "blocked.test": otherIP})
	for _, c := range clients {
		makeClient(t, c.ns, c.nic.tap, c.ip)
	}
	f.connectClients(clients)
	cl2, cl3 := clients[0].ns, clients[1].ns
	f.waitFor("the first TCP echo through the VM", func() bool { return netnstest.TCPEcho(cl2, serverIP+":7") == nil })
	t.Logf("first TCP echo %.1f s after QEMU started", time.Since(f.vm.started).Seconds())
	top := t // owns what must outlive a subtest, such as netvm 2

	t.Run("accept all: tcp, udp, ping, both clients, NAT", func(t *testing.T) {
		f.t = t
		for _, c := range clients {
			if err := netnstest.TCPEcho(c.ns, serverIP+":7"); err != nil {
				t.Fatalf("tcp from %s: %v", c.ip, err)
			}
			if err := netnstest.UDPEcho(c.ns, serverIP+":7"); err != nil {
				t.Fatalf("udp from %s: %v", c.ip, err)
			}
			if err := netnstest.Ping(c.ns, serverIP); err != nil {
				t.Fatalf("from %s: %v", c.ip, err)
			}
		}
		if !net1.echo.Saw(fwIP1+":") || net1.echo.Saw(client2IP) || net1.echo.Saw(client3IP) {
			t.Fatalf("the netvm must see only the firewall's address %s", fwIP1)
		}
	})

	t.Run("deny rule rejects with ICMP, other ports and clients unaffected", func(t *testing.T) {
		f.t = t
		f.setRules(client2IP, "action=drop proto=tcp dstports=8005-8005", "action=drop proto=udp dstports=8005-8005", "action=accept")
		if err := netnstest.TCPEcho(cl2, serverIP+":8005"); !netnstest.Rejected(err) {
			t.Fatalf("tcp to a denied port: %v, want connection refused/unreachable", err)
		}
		if err := netnstest.UDPEcho(cl2, serverIP+":8005"); !netnstest.Rejected(err) {
			t.Fatalf("udp to a denied port: %v, want unreachable", err)
		}
		if err := netnstest.TCPEcho(cl2, serverIP+":7"); err != nil {
			t.Fatalf("tcp to an allowed port: %v", err)
		}
		if err := netnstest.TCPEcho(cl3, serverIP+":8005"); err != nil {
			t.Fatalf("the other client: %v", err)
		}
	})

	t.Run("dsthost resolved through the netvm's dnsmasq", func(t *testing.T) {
		f.t = t
		f.setRules(client2IP, "action=accept dsthost=allowed.test", "action=accept specialtarget=dns")
		f.waitFor("allowed.test to resolve in the firewall", func() bool { return netnstest.TCPEcho(cl2, serverIP+":7") == nil })
		if err := netnstest.TCPEcho(cl2, otherIP+":7"); !netnstest.Rejected(err) {
			t.Fatalf("an address no rule names: %v, want a reject", err)
		}
		addrs, err := netnstest.Lookup(cl2, dnsIP, "blocked.test")
		if err != nil || len(addrs) != 1 || addrs[0] != otherIP {
			t.Fatalf("client DNS through the firewall: %v %v", addrs, err)
		}
	})

	t.Run("rule reload cuts established flows", func(t *testing.T) {
		f.t = t
		f.setRules(client2IP, "action=accept")
		c, err := cl2.Dial("tcp4", serverIP+":7", 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := netnstest.EchoOnce(c, "before"); err != nil {
			t.Fatal(err)
		}
		f.setRules(client2IP, "action=accept dst4="+otherIP+"/32")
		if err := netnstest.EchoOnce(c, "after"); err == nil {
			t.Fatal("an established flow survived rules that deny it")
		}
		if err := netnstest.TCPEcho(cl2, otherIP+":7"); err != nil {
			t.Fatalf("the newly allowed address: %v", err)
		}
		if err := netnstest.TCPEcho(cl2, serverIP+":7"); !netnstest.Rejected(err) {
			t.Fatalf("the no longer allowed address: %v, want a reject", err)
		}
	})

	t.Run("netvm change", func(t *testing.T) {
		f.t = t
		f.setRules(client2IP, "action=accept dsthost=net2.test", "action=accept specialtarget=dns")
		// dom0 points the firewall at another netvm: here the uplink
		// tap moves to a namespace with other addresses and servers.
		netnstest.Run(t, "ip", "-n", up1.Name, "link", "set", uplink.tap, "netns", up2.Name)
		up2.IP(t, "link", "set", uplink.tap, "up")
		net2 := newNetvm(top, up2, uplink.tap, netvm2IP, []string{serverIP, onlyNet2},
			map[string]string{"net2.test": onlyNet2})
		f.must(f.db.Write("/qubes-ip", fwIP2))
		f.must(f.db.Write("/qubes-gateway", netvm2IP))
		f.waitFor("client 3 through netvm 2", func() bool { return netnstest.TCPEcho(cl3, serverIP+":7") == nil })
		if !net2.echo.Saw(fwIP2 + ":") {
			t.Fatalf("netvm 2 did not see the firewall's new address %s", fwIP2)
		}
		f.waitFor("dsthost resolved through netvm 2", func() bool { return netnstest.TCPEcho(cl2, onlyNet2+":7") == nil })
	})

	t.Run("control/shutdown is left to the guest kernel", func(t *testing.T) {
		// On Xen the kernel's own handler answers dom0's request and runs
		// /sbin/poweroff (make test-xen covers that path); QEMU has no
		// xenbus, so here the request must simply stay unanswered by the
		// firewall, which keeps forwarding.
		f.t = t
		f.xs.Write("control/shutdown", "poweroff")
		time.Sleep(3 * time.Second)
		if v, _ := f.xs.Read("control/shutdown"); v != "poweroff" {
			t.Fatalf("control/shutdown = %q: the firewall answered a request that is the kernel's", v)
		}
		f.waitFor("client 3 still forwarding", func() bool { return netnstest.TCPEcho(cl3, serverIP+":7") == nil })
	})
}

// serveXenbus serves the firewall's xenstore port through a model of the
// guest kernel's /dev/xen/xenbus in front of the fake xenstored, so that the
// firewall meets the device's constraints (one reply delivered at a time,
// synchronous WATCH) here too. The port is a byte stream: messages are
// framed again and written one per write, as the firewall wrote them.
func serveXenbus(t *testing.T, s *xenstoretest.FakeServer, port net.Conn) {
	xb := xenstoretest.NewXenbus(s)
	dev := xb.Open()
	t.Cleanup(xb.Close)
	go func() {
		defer dev.Close()
		r := bufio.NewReader(port)
		for {
			m, err := xenstore.ReadMessage(r)
			if err != nil {
				return
			}
			if _, err := dev.Write(m.Append(nil)); err != nil {
				return
			}
		}
	}()
	go io.Copy(port, dev)
}
