package netns

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

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
	fw, up1, up2    *ns
	cl1, cl2        *ns
	qdbBin, qdbSock string
	firewall        *process
	echo1, echo2    *echoServer
	hosts1          string
	dnsmasq1        *process
	rulesApplied    map[string]int
}

func setup(t *testing.T) *env {
	if os.Getenv("QGFW_INTEGRATION") == "" {
		t.Skip("network namespace tests: run by `make test` (set QGFW_INTEGRATION=1, as root)")
	}
	if os.Geteuid() != 0 {
		t.Fatal("QGFW_INTEGRATION is set but not running as root")
	}
	e := &env{t: t, dir: t.TempDir(), echo1: &echoServer{}, echo2: &echoServer{}}
	fwBin, qdbBin := buildBinaries(t, e.dir)
	e.qdbBin, e.qdbSock = qdbBin, filepath.Join(e.dir, "qubesdb.sock")

	e.fw, e.up1, e.up2 = newNS(t, "fw"), newNS(t, "up1"), newNS(t, "up2")
	e.cl1, e.cl2 = newNS(t, "cl1"), newNS(t, "cl2")

	// The firewall's interfaces carry no addresses; the kernel must not
	// answer or route anything there.
	veth(t, e.fw, "eth0", e.up1, "eth0")
	veth(t, e.fw, "vif1", e.cl1, "eth0")
	veth(t, e.fw, "vif2", e.cl2, "eth0")
	e.fw.sysctl(t, "net.ipv6.conf.all.disable_ipv6=1")
	e.fw.sysctl(t, "net.ipv6.conf.default.disable_ipv6=1")
	for _, ifc := range []string{"eth0", "vif1", "vif2"} {
		if ifc != "eth0" {
			e.fw.ip(t, "link", "set", ifc, "address", "fe:ff:ff:ff:ff:ff")
		}
		e.fw.ip(t, "link", "set", ifc, "up")
	}
	for _, c := range []struct {
		n  *ns
		ip string
	}{{e.cl1, client1IP}, {e.cl2, client2IP}} {
		c.n.sysctl(t, "net.ipv6.conf.all.disable_ipv6=1")
		c.n.ip(t, "link", "set", "eth0", "address", "00:16:3e:5e:6c:00")
		c.n.ip(t, "addr", "add", c.ip+"/32", "dev", "eth0")
		c.n.ip(t, "link", "set", "eth0", "up")
		c.n.ip(t, "route", "add", fwIP1, "dev", "eth0")
		c.n.ip(t, "route", "add", "default", "via", fwIP1, "dev", "eth0", "onlink")
	}
	e.netvm(t, e.up1, netvm1IP, fwIP1, e.echo1, "allowed.test", serverIP)
	e.hosts1 = filepath.Join(e.dir, "hosts-"+e.up1.name)

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
	start(t, "qubesdb", exec.Command(qdbBin, "serve", "-socket", e.qdbSock, "-init", initFile))
	waitFor(t, "qubesdb socket", func() bool { _, err := os.Stat(e.qdbSock); return err == nil })

	e.firewall = start(t, "firewall", e.fw.exec(context.Background(), fwBin,
		"-uplink", "eth0", "-client", "vif1="+client1IP, "-client", "vif2="+client2IP,
		"-qubesdb", e.qdbSock, "-nat-table-size", "4096", "-stats-interval", "5s"))
	waitFor(t, "firewall to take its rules", func() bool {
		out := e.firewall.out.String()
		return strings.Contains(out, "rules of "+client1IP) && strings.Contains(out, "rules of "+client2IP) &&
			strings.Contains(out, "uplink eth0")
	})
	waitFor(t, "first TCP echo through the firewall", func() bool { return e.tcpEcho(e.cl1, serverIP+":7") == nil })
	return e
}

// netvm configures namespace n as a netvm at gwIP serving firewall fwIP:
// the server addresses, dnsmasq on the virtual DNS addresses answering
// name -> addr, echo servers and routes back to the clients.
func (e *env) netvm(t *testing.T, n *ns, gwIP, fwIP string, echo *echoServer, name, addr string) *process {
	n.sysctl(t, "net.ipv6.conf.all.disable_ipv6=1")
	n.ip(t, "addr", "add", gwIP+"/24", "dev", "eth0")
	n.ip(t, "link", "set", "eth0", "up")
	for _, a := range []string{serverIP, otherIP, thirdIP, onlyNet2, dnsIP, dns2IP} {
		if a == onlyNet2 && n == e.up1 {
			continue
		}
		n.ip(t, "addr", "add", a+"/32", "dev", "lo")
	}
	for _, c := range []string{client1IP, client2IP} {
		n.ip(t, "route", "add", c+"/32", "via", fwIP, "dev", "eth0")
	}
	hosts := filepath.Join(e.dir, "hosts-"+n.name)
	if err := os.WriteFile(hosts, []byte(fmt.Sprintf("%s %s\n%s blocked.test\n", addr, name, otherIP)), 0o644); err != nil {
		t.Fatal(err)
	}
	p := start(t, "dnsmasq "+n.name, n.exec(context.Background(), "dnsmasq", "-k", "--log-facility=-",
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
			echo.start(t, n, a+":"+port)
		}
	}
	start(t, "iperf3 "+n.name, n.exec(context.Background(), "iperf3", "-s", "-B", serverIP))
	return p
}

// qdb changes QubesDB through the in-repo tool, as dom0 would.
func (e *env) qdb(args ...string) {
	e.t.Helper()
	run(e.t, e.qdbBin, append([]string{args[0], "-socket", e.qdbSock}, args[1:]...)...)
}

// setRules replaces the rules of client ip the way dom0 does: remove the
// directory, write policy and NNNN entries, then the commit marker; and
// waits until the firewall has applied them.
func (e *env) setRules(ip string, rules ...string) {
	e.t.Helper()
	before := strings.Count(e.firewall.out.String(), "rules of "+ip)
	e.qdb("rm", "/qubes-firewall/"+ip+"/")
	e.qdb("write", "/qubes-firewall/"+ip+"/policy", "drop")
	for i, r := range rules {
		e.qdb("write", fmt.Sprintf("/qubes-firewall/%s/%04d", ip, i*2), r) // sparse numbering, as dom0 may write
	}
	e.qdb("write", "/qubes-firewall/"+ip, "")
	waitFor(e.t, "rules of "+ip+" applied", func() bool {
		return strings.Count(e.firewall.out.String(), "rules of "+ip) > before
	})
}

// tcpEcho opens a connection from n to addr and checks that a message comes back.
func (e *env) tcpEcho(n *ns, addr string) error {
	c, err := n.dial("tcp4", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	return echoOnce(c, fmt.Sprintf("tcp-%d", time.Now().UnixNano()))
}

func echoOnce(c net.Conn, msg string) error {
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte(msg)); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	if _, err := readFull(c, buf); err != nil {
		return err
	}
	if string(buf) != msg {
		return fmt.Errorf("echo %q, want %q", buf, msg)
	}
	return nil
}

func readFull(c net.Conn, b []byte) (int, error) {
	n := 0
	for n < len(b) {
		k, err := c.Read(b[n:])
		n += k
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

func (e *env) udpEcho(n *ns, addr string) error {
	c, err := n.dial("udp4", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	return echoOnce(c, fmt.Sprintf("udp-%d", time.Now().UnixNano()))
}

func (e *env) ping(n *ns, ip string) error {
	out, err := n.exec(context.Background(), "ping", "-c", "1", "-W", "3", ip).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ping %s: %v: %s", ip, err, out)
	}
	return nil
}

// lookup resolves name from n through the virtual DNS server.
func (e *env) lookup(n *ns, name string) ([]string, error) {
	r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		return n.dial(network, dnsIP+":53", 5*time.Second)
	}}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return r.LookupHost(ctx, name)
}

// rejected reports whether err is what an ICMP reject produces (and not
// a timeout, which would mean a silent drop).
func rejected(err error) bool {
	return errors.Is(err, unix.EHOSTUNREACH) || errors.Is(err, unix.ECONNREFUSED) ||
		errors.Is(err, unix.ENETUNREACH) || errors.Is(err, unix.EACCES)
}

func TestFirewallEndToEnd(t *testing.T) {
	e := setup(t)

	t.Run("accept all: tcp, udp, ping, dns, iperf3", func(t *testing.T) {
		e.t = t
		e.setRules(client1IP, "action=accept specialtarget=dns", "action=accept")
		if err := e.tcpEcho(e.cl1, serverIP+":7"); err != nil {
			t.Fatalf("tcp: %v", err)
		}
		if err := e.udpEcho(e.cl1, serverIP+":7"); err != nil {
			t.Fatalf("udp: %v", err)
		}
		if err := e.ping(e.cl1, serverIP); err != nil {
			t.Fatal(err)
		}
		addrs, err := e.lookup(e.cl1, "allowed.test")
		if err != nil || len(addrs) != 1 || addrs[0] != serverIP {
			t.Fatalf("dns via %s: %v %v", dnsIP, addrs, err)
		}
		if !e.echo1.saw(fwIP1) {
			t.Fatal("upstream never saw the firewall's address: no NAT?")
		}
		out, err := e.cl1.exec(context.Background(), "iperf3", "-c", serverIP, "-t", "2", "-J").CombinedOutput()
		if err != nil {
			t.Fatalf("iperf3 through the firewall: %v\n%s", err, tail(string(out), 20))
		}
	})

	t.Run("dns needs a specialtarget rule", func(t *testing.T) {
		e.t = t
		e.setRules(client1IP, "action=accept proto=tcp")
		if _, err := e.lookup(e.cl1, "allowed.test"); err == nil {
			t.Fatal("DNS worked without an accept rule for it")
		}
	})

	t.Run("drop rules reject fast; dstports; icmptype", func(t *testing.T) {
		e.t = t
		e.setRules(client1IP, "action=drop proto=tcp dstports=8000-8010", "action=drop proto=udp dstports=8005-8005",
			"action=drop proto=icmp icmptype=8", "action=accept")
		if err := e.tcpEcho(e.cl1, serverIP+":8005"); !rejected(err) {
			t.Fatalf("tcp to a dropped port: %v, want a reject", err)
		}
		if err := e.udpEcho(e.cl1, serverIP+":8005"); !rejected(err) {
			t.Fatalf("udp to a dropped port: %v, want a reject", err)
		}
		if err := e.tcpEcho(e.cl1, serverIP+":8011"); err != nil {
			t.Fatalf("tcp to a port outside the range: %v", err)
		}
		if err := e.udpEcho(e.cl1, serverIP+":8011"); err != nil {
			t.Fatalf("udp to a port outside the range: %v", err)
		}
		if err := e.ping(e.cl1, serverIP); err == nil {
			t.Fatal("echo request went through an icmptype=8 drop rule")
		}
		// The other client is not affected.
		if err := e.tcpEcho(e.cl2, serverIP+":8005"); err != nil {
			t.Fatalf("client 2: %v", err)
		}
	})

	t.Run("dsthost accept and drop, followed after a change", func(t *testing.T) {
		e.t = t
		e.setRules(client1IP, "action=drop dsthost=blocked.test", "action=accept dsthost=allowed.test", "action=accept specialtarget=dns")
		waitFor(t, "allowed.test to resolve", func() bool { return e.tcpEcho(e.cl1, serverIP+":7") == nil })
		if err := e.tcpEcho(e.cl1, otherIP+":7"); !rejected(err) {
			t.Fatalf("blocked.test: %v, want a reject", err)
		}
		if err := e.tcpEcho(e.cl1, thirdIP+":7"); !rejected(err) {
			t.Fatalf("unlisted address: %v, want a reject", err)
		}
		// allowed.test moves to thirdIP; the firewall follows after the TTL.
		if err := os.WriteFile(e.hosts1, []byte(fmt.Sprintf("%s allowed.test\n%s blocked.test\n", thirdIP, otherIP)), 0o644); err != nil {
			t.Fatal(err)
		}
		e.dnsmasq1.cmd.Process.Signal(unix.SIGHUP)
		waitFor(t, "allowed.test to move", func() bool { return e.tcpEcho(e.cl1, thirdIP+":7") == nil })
		waitFor(t, "old address to be denied", func() bool { return rejected(e.tcpEcho(e.cl1, serverIP+":7")) })
		os.WriteFile(e.hosts1, []byte(fmt.Sprintf("%s allowed.test\n%s blocked.test\n", serverIP, otherIP)), 0o644)
		e.dnsmasq1.cmd.Process.Signal(unix.SIGHUP)
	})

	t.Run("rule reload cuts flows; malformed rules deny that client only", func(t *testing.T) {
		e.t = t
		e.setRules(client1IP, "action=accept")
		c, err := e.cl1.dial("tcp4", serverIP+":7", 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := echoOnce(c, "before"); err != nil {
			t.Fatal(err)
		}
		e.setRules(client1IP, "action=accept dst4="+otherIP+"/32")
		if err := echoOnce(c, "after"); err == nil {
			t.Fatal("an established flow survived rules that deny it")
		}
		e.setRules(client1IP, "action=accept bogus=key")
		if err := e.tcpEcho(e.cl1, otherIP+":7"); err == nil {
			t.Fatal("client with malformed rules still reaches the outside")
		}
		if err := e.tcpEcho(e.cl2, otherIP+":7"); err != nil {
			t.Fatalf("client 2 affected by client 1's broken rules: %v", err)
		}
		e.setRules(client1IP, "action=accept")
	})

	t.Run("spoofing, client to client, inbound connections", func(t *testing.T) {
		e.t = t
		e.cl1.ip(t, "addr", "add", "10.137.0.99/32", "dev", "eth0")
		defer e.cl1.ip(t, "addr", "del", "10.137.0.99/32", "dev", "eth0")
		var spoofErr error
		e.cl1.do(func() error {
			d := net.Dialer{LocalAddr: &net.UDPAddr{IP: net.ParseIP("10.137.0.99")}, Timeout: time.Second}
			c, err := d.Dial("udp4", serverIP+":7")
			if err != nil {
				spoofErr = err
				return nil
			}
			defer c.Close()
			spoofErr = echoOnce(c, "spoofed-source")
			return nil
		})
		if spoofErr == nil || e.echo1.saw("spoofed-source") {
			t.Fatal("a spoofed source got through")
		}
		cl2echo := &echoServer{}
		cl2echo.start(t, e.cl2, client2IP+":2222")
		if err := e.tcpEcho(e.cl1, client2IP+":2222"); err == nil || cl2echo.saw("tcp") {
			t.Fatalf("client 1 reached client 2: %v", err)
		}
		cl1echo := &echoServer{}
		cl1echo.start(t, e.cl1, client1IP+":2223")
		if c, err := e.up1.dial("tcp4", client1IP+":2223", 3*time.Second); err == nil {
			c.Close()
			t.Fatal("the netvm opened a connection to a client")
		}
	})

	t.Run("flood of 20000 new flows", func(t *testing.T) {
		e.t = t
		c, err := e.cl1.dial("tcp4", serverIP+":7", 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		pid := e.firewall.cmd.Process.Pid
		before := rssKB(pid)
		pc := e.cl1.listenPacket(t, "udp4", client1IP+":0")
		for i := 0; i < 20000; i++ {
			dst := &net.UDPAddr{IP: net.ParseIP(otherIP), Port: 10000 + i}
			pc.WriteTo([]byte("flood"), dst)
		}
		// The flood went through NAT and filled the 4096-entry table:
		// the firewall's next counters line says so.
		mark := len(e.firewall.out.String())
		waitFor(t, "counters after the flood", func() bool {
			out := e.firewall.out.String()[mark:]
			i := strings.Index(out, ", nat ")
			var n int
			return i >= 0 && func() bool { fmt.Sscanf(out[i+len(", nat "):], "%d", &n); return n >= 4000 }()
		})
		if err := echoOnce(c, "still-here"); err != nil {
			t.Fatalf("existing flow after the flood: %v", err)
		}
		if err := e.tcpEcho(e.cl2, serverIP+":7"); err != nil {
			t.Fatalf("other client after the flood: %v", err)
		}
		after := rssKB(pid)
		t.Logf("firewall RSS %d kB before, %d kB after the flood", before, after)
		if after <= 0 || after > 128<<10 {
			t.Fatalf("firewall RSS %d kB after the flood", after)
		}
	})

	t.Run("netvm change", func(t *testing.T) {
		e.t = t
		e.setRules(client1IP, "action=accept dsthost=net2.test", "action=accept specialtarget=dns")
		// dom0 rewrites the addressing and hot-plugs a new netfront: here
		// the old interface goes away and a new eth0 appears.
		e.fw.ip(t, "link", "del", "eth0")
		veth(t, e.fw, "eth0", e.up2, "eth0")
		e.fw.ip(t, "link", "set", "eth0", "up")
		e.netvm(t, e.up2, netvm2IP, fwIP2, e.echo2, "net2.test", onlyNet2)
		e.qdb("write", "/qubes-ip", fwIP2)
		e.qdb("write", "/qubes-gateway", netvm2IP)
		waitFor(t, "clients to work through netvm 2", func() bool { return e.tcpEcho(e.cl2, serverIP+":7") == nil })
		if !e.echo2.saw(fwIP2) {
			t.Fatal("netvm 2 did not see the firewall's new address")
		}
		waitFor(t, "dsthost resolved through netvm 2", func() bool { return e.tcpEcho(e.cl1, onlyNet2+":7") == nil })
	})
}
