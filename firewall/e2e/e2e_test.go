// Package e2e runs the firewall binary end to end between real network
// namespaces: two client VMs, the firewall, and two netvms with real
// servers (dnsmasq, TCP/UDP echo, iperf3), configured through the in-repo
// QubesDB server. It needs root; `make test` runs it.
package e2e

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/internal/netnstest"
	"golang.org/x/sys/unix"
)

// env is the whole topology:
//
//	cl1 (10.137.0.20) --vif1-+              +-- eth0 -- up1 (netvm 1: 10.137.0.1, dnsmasq, echo, iperf3)
//	                         fw (firewall) -+
//	cl2 (10.137.0.21) --vif2-+              +.. eth0 .. up2 (netvm 2: 10.138.0.1), after the netvm change
type env struct {
	t               *testing.T
	dir             string
	fw, up1, up2    *netnstest.NS
	cl1, cl2        *netnstest.NS
	qdbBin, qdbSock string
	firewall        *netnstest.Process
	echo1, echo2    *netnstest.Echo
	hosts1          string
	dnsmasq1        *netnstest.Process
	rulesApplied    map[string]int
}

func setup(t *testing.T) *env {
	netnstest.NeedRoot(t)
	e := &env{t: t, dir: t.TempDir(), echo1: &netnstest.Echo{}, echo2: &netnstest.Echo{}}
	fwBin, qdbBin := buildBinaries(t, e.dir)
	e.qdbBin, e.qdbSock = qdbBin, filepath.Join(e.dir, "qubesdb.sock")

	e.fw, e.up1, e.up2 = netnstest.New(t, tag+"fw"), netnstest.New(t, tag+"up1"), netnstest.New(t, tag+"up2")
	e.cl1, e.cl2 = netnstest.New(t, tag+"cl1"), netnstest.New(t, tag+"cl2")

	// The firewall's interfaces carry no addresses; the kernel must not
	// answer or route anything there.
	netnstest.Veth(t, e.fw, "eth0", e.up1, "eth0")
	netnstest.Veth(t, e.fw, "vif1", e.cl1, "eth0")
	netnstest.Veth(t, e.fw, "vif2", e.cl2, "eth0")
	e.fw.Sysctl(t, "net.ipv6.conf.all.disable_ipv6=1")
	e.fw.Sysctl(t, "net.ipv6.conf.default.disable_ipv6=1")
	for _, ifc := range []string{"eth0", "vif1", "vif2"} {
		if ifc != "eth0" {
			e.fw.IP(t, "link", "set", ifc, "address", "fe:ff:ff:ff:ff:ff")
		}
		e.fw.IP(t, "link", "set", ifc, "up")
	}
	for _, c := range []struct {
		n  *netnstest.NS
		ip string
	}{{e.cl1, client1IP}, {e.cl2, client2IP}} {
		c.n.Sysctl(t, "net.ipv6.conf.all.disable_ipv6=1")
		c.n.IP(t, "link", "set", "eth0", "address", "00:16:3e:5e:6c:00")
		c.n.IP(t, "addr", "add", c.ip+"/32", "dev", "eth0")
		c.n.IP(t, "link", "set", "eth0", "up")
		c.n.IP(t, "route", "add", fwIP1, "dev", "eth0")
		c.n.IP(t, "route", "add", "default", "via", fwIP1, "dev", "eth0", "onlink")
	}
	e.netvm(t, e.up1, netvm1IP, fwIP1, e.echo1, "allowed.test", serverIP)
	e.hosts1 = filepath.Join(e.dir, "hosts-"+e.up1.Name)

	// QubesDB as dom0 would have it for a firewall behind netvm 1.
	initFile := filepath.Join(e.dir, "qubesdb.init")
	var init strings.Builder
	for _, kv := range [][2]string{
		{"/qubes-ip", fwIP1}, {"/qubes-gateway", netvm1IP}, {"/qubes-netmask", "255.255.255.0"},
		{"/qubes-primary-dns", dnsIP}, {"/qubes-secondary-dns", dns2IP},
	} {
		fmt.Fprintf(&init, "%s %s\n", kv[0], kv[1])
	}
	for _, ip := range []string{client1IP, client2IP} {
		fmt.Fprintf(&init, "/qubes-firewall/%s/policy drop\n/qubes-firewall/%s/0000 action=accept\n/qubes-firewall/%s \n", ip, ip, ip)
	}
	if err := os.WriteFile(initFile, []byte(init.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	netnstest.Start(t, "qubesdb", exec.Command(qdbBin, "serve", "-socket", e.qdbSock, "-init", initFile))
	netnstest.WaitFor(t, "qubesdb socket", waitLimit, func() bool { _, err := os.Stat(e.qdbSock); return err == nil })

	e.firewall = netnstest.Start(t, "firewall", e.fw.Command(context.Background(), fwBin,
		"-uplink", "eth0", "-client", "vif1="+client1IP, "-client", "vif2="+client2IP,
		"-qubesdb", e.qdbSock, "-nat-table-size", "4096", "-stats-interval", "5s"))
	netnstest.WaitFor(t, "firewall to take its rules", waitLimit, func() bool {
		out := e.firewall.Output()
		return strings.Contains(out, "rules of "+client1IP) && strings.Contains(out, "rules of "+client2IP) &&
			strings.Contains(out, "uplink eth0")
	})
	netnstest.WaitFor(t, "first TCP echo through the firewall", waitLimit, func() bool { return netnstest.TCPEcho(e.cl1, serverIP+":7") == nil })
	return e
}

// netvm configures namespace n as a netvm at gwIP serving firewall fwIP:
// the server addresses, dnsmasq on the virtual DNS addresses answering
// name -> addr, echo servers and routes back to the clients.
func (e *env) netvm(t *testing.T, n *netnstest.NS, gwIP, fwIP string, echo *netnstest.Echo, name, addr string) *netnstest.Process {
	n.Sysctl(t, "net.ipv6.conf.all.disable_ipv6=1")
	n.IP(t, "addr", "add", gwIP+"/24", "dev", "eth0")
	n.IP(t, "link", "set", "eth0", "up")
	for _, a := range []string{serverIP, otherIP, thirdIP, onlyNet2, dnsIP, dns2IP} {
		if a == onlyNet2 && n == e.up1 {
			continue
		}
		n.IP(t, "addr", "add", a+"/32", "dev", "lo")
	}
	for _, c := range []string{client1IP, client2IP} {
		n.IP(t, "route", "add", c+"/32", "via", fwIP, "dev", "eth0")
	}
	hosts := filepath.Join(e.dir, "hosts-"+n.Name)
	if err := os.WriteFile(hosts, []byte(fmt.Sprintf("%s %s\n%s blocked.test\n", addr, name, otherIP)), 0o644); err != nil {
		t.Fatal(err)
	}
	p := netnstest.Start(t, "dnsmasq "+n.Name, n.Command(context.Background(), "dnsmasq", "-k", "--log-facility=-",
		"--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--addn-hosts="+hosts, "--local-ttl=2",
		"--listen-address="+dnsIP, "--listen-address="+dns2IP, "--bind-interfaces", "--pid-file=", "--user=root"))
	if n == e.up1 {
		e.dnsmasq1 = p
	}
	// Bound to each address, not the wildcard: a UDP server on 0.0.0.0
	// answers from its interface's address, not the one it was asked on.
	for _, a := range []string{serverIP, otherIP, thirdIP, onlyNet2} {
		if a == onlyNet2 && n == e.up1 {
			continue
		}
		for _, port := range []string{"7", "8005", "8011"} {
			echo.Start(t, n, a+":"+port)
		}
	}
	netnstest.Start(t, "iperf3 "+n.Name, n.Command(context.Background(), "iperf3", "-s", "-B", serverIP))
	return p
}

// qdb changes QubesDB through the in-repo tool, as dom0 would.
func (e *env) qdb(args ...string) {
	e.t.Helper()
	netnstest.Run(e.t, e.qdbBin, append([]string{args[0], "-socket", e.qdbSock}, args[1:]...)...)
}

// setRules replaces the rules of client ip the way dom0 does: remove the
// directory, write policy and NNNN entries, then the commit marker; and
// waits until the firewall has applied them.
func (e *env) setRules(ip string, rules ...string) {
	e.t.Helper()
	before := strings.Count(e.firewall.Output(), "rules of "+ip)
	e.qdb("rm", "/qubes-firewall/"+ip+"/")
	e.qdb("write", "/qubes-firewall/"+ip+"/policy", "drop")
	for i, r := range rules {
		e.qdb("write", fmt.Sprintf("/qubes-firewall/%s/%04d", ip, i*2), r) // sparse numbering, as dom0 may write
	}
	e.qdb("write", "/qubes-firewall/"+ip, "")
	netnstest.WaitFor(e.t, "rules of "+ip+" applied", waitLimit, func() bool {
		return strings.Count(e.firewall.Output(), "rules of "+ip) > before
	})
}

func TestFirewallEndToEnd(t *testing.T) {
	e := setup(t)

	t.Run("accept all: tcp, udp, ping, dns, iperf3", func(t *testing.T) {
		e.t = t
		e.setRules(client1IP, "action=accept specialtarget=dns", "action=accept")
		if err := netnstest.TCPEcho(e.cl1, serverIP+":7"); err != nil {
			t.Fatalf("tcp: %v", err)
		}
		if err := netnstest.UDPEcho(e.cl1, serverIP+":7"); err != nil {
			t.Fatalf("udp: %v", err)
		}
		if err := netnstest.Ping(e.cl1, serverIP); err != nil {
			t.Fatal(err)
		}
		addrs, err := netnstest.Lookup(e.cl1, dnsIP, "allowed.test")
		if err != nil || len(addrs) != 1 || addrs[0] != serverIP {
			t.Fatalf("dns via %s: %v %v", dnsIP, addrs, err)
		}
		if !e.echo1.Saw(fwIP1) {
			t.Fatal("upstream never saw the firewall's address: no NAT?")
		}
		out, err := e.cl1.Command(context.Background(), "iperf3", "-c", serverIP, "-t", "2", "-J").CombinedOutput()
		if err != nil {
			t.Fatalf("iperf3 through the firewall: %v\n%s", err, netnstest.Tail(string(out), 20))
		}
	})

	t.Run("ping the firewall from the netvm and from clients", func(t *testing.T) {
		e.t = t
		// The client's rules are not consulted for ping of its gateway
		// (as in the Linux firewall's input chain), even when they drop
		// echo requests.
		e.setRules(client1IP, "action=drop proto=icmp icmptype=8", "action=accept")
		for _, from := range []*netnstest.NS{e.up1, e.cl1, e.cl2} {
			if err := pingAll(from, fwIP1, 3); err != nil {
				t.Errorf("from %s: %v", from.Name, err)
			}
		}
		// Nothing else addressed to the firewall is answered.
		if c, err := e.cl1.Dial("tcp4", fwIP1+":7", 2*time.Second); err == nil {
			c.Close()
			t.Fatal("a TCP connection to the firewall's address was answered")
		}
	})

	t.Run("dns needs a specialtarget rule", func(t *testing.T) {
		e.t = t
		e.setRules(client1IP, "action=accept proto=tcp")
		if _, err := netnstest.Lookup(e.cl1, dnsIP, "allowed.test"); err == nil {
			t.Fatal("DNS worked without an accept rule for it")
		}
	})

	t.Run("drop rules reject fast; dstports; icmptype", func(t *testing.T) {
		e.t = t
		e.setRules(client1IP, "action=drop proto=tcp dstports=8000-8010", "action=drop proto=udp dstports=8005-8005",
			"action=drop proto=icmp icmptype=8", "action=accept")
		if err := netnstest.TCPEcho(e.cl1, serverIP+":8005"); !netnstest.Rejected(err) {
			t.Fatalf("tcp to a dropped port: %v, want a reject", err)
		}
		if err := netnstest.UDPEcho(e.cl1, serverIP+":8005"); !netnstest.Rejected(err) {
			t.Fatalf("udp to a dropped port: %v, want a reject", err)
		}
		if err := netnstest.TCPEcho(e.cl1, serverIP+":8011"); err != nil {
			t.Fatalf("tcp to a port outside the range: %v", err)
		}
		if err := netnstest.UDPEcho(e.cl1, serverIP+":8011"); err != nil {
			t.Fatalf("udp to a port outside the range: %v", err)
		}
		if err := netnstest.Ping(e.cl1, serverIP); err == nil {
			t.Fatal("echo request went through an icmptype=8 drop rule")
		}
		// The other client is not affected.
		if err := netnstest.TCPEcho(e.cl2, serverIP+":8005"); err != nil {
			t.Fatalf("client 2: %v", err)
		}
	})

	t.Run("one stalled client does not stall the other", func(t *testing.T) {
		e.t = t
		oneStalledClient(t, e)
	})

	t.Run("ICMP errors only to the remote of the flow they quote", func(t *testing.T) {
		e.t = t
		icmpErrorsOnlyToTheFlowsRemote(t, e)
	})

	t.Run("frag-needed for a DF packet over the uplink MTU lowers the client's path MTU", func(t *testing.T) {
		// Defect 3 of the data-path review: the error must quote the
		// packet as the client sent it (before NAT), or its kernel
		// cannot match it and path MTU discovery black-holes.
		e.t = t
		e.setRules(client2IP, "action=accept")
		for _, l := range []struct {
			n   *netnstest.NS
			dev string
		}{{e.fw, "vif2"}, {e.cl2, "eth0"}} {
			l.n.IP(t, "link", "set", l.dev, "mtu", "3000")
			defer l.n.IP(t, "link", "set", l.dev, "mtu", "1500")
		}
		defer e.cl2.IP(t, "route", "flush", "cache")
		// 2028 bytes with DF set; the uplink's MTU is 1500.
		out, _ := e.cl2.Command(context.Background(), "ping", "-M", "do", "-s", "2000", "-c", "2", "-W", "2", serverIP).CombinedOutput()
		route, err := e.cl2.Command(context.Background(), "ip", "route", "get", serverIP).CombinedOutput()
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(route), "mtu 1500") {
			t.Fatalf("the client's route to %s has no path MTU of 1500:\n%s\nping said:\n%s", serverIP, route, out)
		}
		t.Logf("client's route after the error: %s", strings.TrimSpace(string(route)))
		// Data larger than the uplink's MTU now flows (TCP sizes its
		// segments by the path MTU).
		if err := netnstest.TCPEcho(e.cl2, serverIP+":7"); err != nil {
			t.Fatalf("tcp after the path MTU change: %v", err)
		}
	})

	t.Run("dsthost accept and drop, followed after a change", func(t *testing.T) {
		e.t = t
		e.setRules(client1IP, "action=drop dsthost=blocked.test", "action=accept dsthost=allowed.test", "action=accept specialtarget=dns")
		netnstest.WaitFor(t, "allowed.test to resolve", waitLimit, func() bool { return netnstest.TCPEcho(e.cl1, serverIP+":7") == nil })
		if err := netnstest.TCPEcho(e.cl1, otherIP+":7"); !netnstest.Rejected(err) {
			t.Fatalf("blocked.test: %v, want a reject", err)
		}
		if err := netnstest.TCPEcho(e.cl1, thirdIP+":7"); !netnstest.Rejected(err) {
			t.Fatalf("unlisted address: %v, want a reject", err)
		}
		// A connection open while the name still has its first address.
		live, err := e.cl1.Dial("tcp4", serverIP+":7", 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer live.Close()
		if err := netnstest.EchoOnce(live, "before the move"); err != nil {
			t.Fatal(err)
		}
		// allowed.test moves to thirdIP (a CDN answering with another
		// address); the firewall follows after the TTL.
		if err := os.WriteFile(e.hosts1, []byte(fmt.Sprintf("%s allowed.test\n%s blocked.test\n", thirdIP, otherIP)), 0o644); err != nil {
			t.Fatal(err)
		}
		e.dnsmasq1.Cmd.Process.Signal(unix.SIGHUP)
		netnstest.WaitFor(t, "allowed.test to move", waitLimit, func() bool { return netnstest.TCPEcho(e.cl1, thirdIP+":7") == nil })
		netnstest.WaitFor(t, "old address to be denied", waitLimit, func() bool { return netnstest.Rejected(netnstest.TCPEcho(e.cl1, serverIP+":7")) })
		// New connections to the old address are refused, the one that
		// was open stays up (it was cut on every refresh before).
		if err := netnstest.EchoOnce(live, "after the move"); err != nil {
			t.Fatalf("the established connection after the name moved: %v", err)
		}
		// A rule change that keeps the dsthost rule keeps it too.
		e.setRules(client1IP, "action=drop dsthost=blocked.test", "action=accept dsthost=allowed.test", "action=accept specialtarget=dns", "action=accept proto=icmp")
		if err := netnstest.EchoOnce(live, "after a rule change"); err != nil {
			t.Fatalf("the established connection after an unrelated rule change: %v", err)
		}
		os.WriteFile(e.hosts1, []byte(fmt.Sprintf("%s allowed.test\n%s blocked.test\n", serverIP, otherIP)), 0o644)
		e.dnsmasq1.Cmd.Process.Signal(unix.SIGHUP)
	})

	t.Run("rule reload cuts flows; malformed rules deny that client only", func(t *testing.T) {
		e.t = t
		e.setRules(client1IP, "action=accept")
		c, err := e.cl1.Dial("tcp4", serverIP+":7", 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := netnstest.EchoOnce(c, "before"); err != nil {
			t.Fatal(err)
		}
		e.setRules(client1IP, "action=accept dst4="+otherIP+"/32")
		if err := netnstest.EchoOnce(c, "after"); err == nil {
			t.Fatal("an established flow survived rules that deny it")
		}
		e.setRules(client1IP, "action=accept bogus=key")
		if err := netnstest.TCPEcho(e.cl1, otherIP+":7"); err == nil {
			t.Fatal("client with malformed rules still reaches the outside")
		}
		if err := netnstest.TCPEcho(e.cl2, otherIP+":7"); err != nil {
			t.Fatalf("client 2 affected by client 1's broken rules: %v", err)
		}
		e.setRules(client1IP, "action=accept")
	})

	t.Run("spoofing, client to client, inbound connections", func(t *testing.T) {
		e.t = t
		e.cl1.IP(t, "addr", "add", "10.137.0.99/32", "dev", "eth0")
		defer e.cl1.IP(t, "addr", "del", "10.137.0.99/32", "dev", "eth0")
		var spoofErr error
		e.cl1.Do(func() error {
			d := net.Dialer{LocalAddr: &net.UDPAddr{IP: net.ParseIP("10.137.0.99")}, Timeout: time.Second}
			c, err := d.Dial("udp4", serverIP+":7")
			if err != nil {
				spoofErr = err
				return nil
			}
			defer c.Close()
			spoofErr = netnstest.EchoOnce(c, "spoofed-source")
			return nil
		})
		if spoofErr == nil || e.echo1.Saw("spoofed-source") {
			t.Fatal("a spoofed source got through")
		}
		cl2echo := &netnstest.Echo{}
		cl2echo.Start(t, e.cl2, client2IP+":2222")
		if err := netnstest.TCPEcho(e.cl1, client2IP+":2222"); err == nil || cl2echo.Saw("tcp") {
			t.Fatalf("client 1 reached client 2: %v", err)
		}
		cl1echo := &netnstest.Echo{}
		cl1echo.Start(t, e.cl1, client1IP+":2223")
		if c, err := e.up1.Dial("tcp4", client1IP+":2223", 3*time.Second); err == nil {
			c.Close()
			t.Fatal("the netvm opened a connection to a client")
		}
	})

	t.Run("flood of 20000 new flows", func(t *testing.T) {
		e.t = t
		c, err := e.cl1.Dial("tcp4", serverIP+":7", 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		pid := e.firewall.Cmd.Process.Pid
		before := rssKB(pid)
		pc := e.cl1.ListenPacket(t, "udp4", client1IP+":0")
		for i := 0; i < 20000; i++ {
			dst := &net.UDPAddr{IP: net.ParseIP(otherIP), Port: 10000 + i}
			pc.WriteTo([]byte("flood"), dst)
		}
		// The flood went through NAT and filled client 1's share of the
		// 4096-entry table (half, while client 2 has flows): the
		// firewall's next counters line says so.
		mark := len(e.firewall.Output())
		netnstest.WaitFor(t, "counters after the flood", waitLimit, func() bool {
			out := e.firewall.Output()[mark:]
			i := strings.Index(out, ", nat ")
			var n int
			return i >= 0 && func() bool { fmt.Sscanf(out[i+len(", nat "):], "%d", &n); return n >= 2000 }()
		})
		if err := netnstest.EchoOnce(c, "still-here"); err != nil {
			t.Fatalf("existing flow after the flood: %v", err)
		}
		if err := netnstest.TCPEcho(e.cl2, serverIP+":7"); err != nil {
			t.Fatalf("other client after the flood: %v", err)
		}
		after := rssKB(pid)
		t.Logf("firewall RSS %d kB before, %d kB after the flood", before, after)
		// The image claims to forward in a 32 MiB VM, where the kernel
		// and the page cache take their part: the process must stay
		// well inside that.
		if after <= 0 || after > 24<<10 {
			t.Fatalf("firewall RSS %d kB after the flood, want at most 24 MiB", after)
		}
	})

	t.Run("netvm change", func(t *testing.T) {
		e.t = t
		e.setRules(client1IP, "action=accept dsthost=net2.test", "action=accept specialtarget=dns")
		// dom0 rewrites the addressing and hot-plugs a new netfront: here
		// the old interface goes away and a new eth0 appears.
		e.fw.IP(t, "link", "del", "eth0")
		netnstest.Veth(t, e.fw, "eth0", e.up2, "eth0")
		e.fw.IP(t, "link", "set", "eth0", "up")
		e.netvm(t, e.up2, netvm2IP, fwIP2, e.echo2, "net2.test", onlyNet2)
		e.qdb("write", "/qubes-ip", fwIP2)
		e.qdb("write", "/qubes-gateway", netvm2IP)
		netnstest.WaitFor(t, "clients to work through netvm 2", waitLimit, func() bool { return netnstest.TCPEcho(e.cl2, serverIP+":7") == nil })
		if !e.echo2.Saw(fwIP2) {
			t.Fatal("netvm 2 did not see the firewall's new address")
		}
		netnstest.WaitFor(t, "dsthost resolved through netvm 2", waitLimit, func() bool { return netnstest.TCPEcho(e.cl1, onlyNet2+":7") == nil })
		// Ping follows the new address.
		for _, from := range []*netnstest.NS{e.up2, e.cl1} {
			if err := pingAll(from, fwIP2, 3); err != nil {
				t.Errorf("from %s: %v", from.Name, err)
			}
		}
	})
}

// pingAll sends count echo requests from n to ip with iputils ping and
// fails unless every one is answered.
func pingAll(n *netnstest.NS, ip string, count int) error {
	c := strconv.Itoa(count)
	out, err := n.Command(context.Background(), "ping", "-n", "-c", c, "-i", "0.2", "-W", "5", ip).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ping -c %s %s: %v\n%s", c, ip, err, out)
	}
	if want := c + " packets transmitted, " + c + " received"; !strings.Contains(string(out), want) {
		return fmt.Errorf("ping -c %s %s: not all answered\n%s", c, ip, out)
	}
	return nil
}
