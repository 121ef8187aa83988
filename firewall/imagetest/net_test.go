package imagetest

import (
	"context"
	"fmt"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/internal/netnstest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
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

// makeClient makes n a Qubes client VM on tap: its address, the static
// gateway neighbour, the default route via the firewall.
func makeClient(t *testing.T, n *netnstest.NS, tap, ip string) {
	t.Helper()
	n.IP(t, "link", "set", tap, "address", clientMAC)
	n.IP(t, "addr", "add", ip+"/32", "dev", tap)
	n.IP(t, "route", "add", fwIP1, "dev", tap)
	n.IP(t, "neigh", "replace", fwIP1, "lladdr", gatewayMAC, "dev", tap, "nud", "permanent")
	n.IP(t, "route", "add", "default", "via", fwIP1, "dev", tap, "onlink")
}

// netvm is a namespace playing the netvm: the firewall's gateway with
// dnsmasq on the virtual DNS addresses, echo servers and iperf3.
type netvm struct {
	*netnstest.NS
	hosts string
	echo  *netnstest.Echo
}

// newNetvm configures n (whose uplink tap is up) as the netvm at gwIP;
// dnsmasq answers the names in hosts ("name addr").
func newNetvm(t *testing.T, n *netnstest.NS, tap, gwIP string, servers []string, hosts map[string]string) *netvm {
	t.Helper()
	v := &netvm{NS: n, echo: &netnstest.Echo{}}
	n.IP(t, "addr", "add", gwIP+"/24", "dev", tap)
	for _, a := range append([]string{dnsIP, dns2IP}, servers...) {
		n.IP(t, "addr", "add", a+"/32", "dev", "lo")
	}
	var h strings.Builder
	for name, addr := range hosts {
		fmt.Fprintf(&h, "%s %s\n", addr, name)
	}
	v.hosts = filepath.Join(t.TempDir(), "hosts")
	if err := os.WriteFile(v.hosts, []byte(h.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	netnstest.Start(t, "dnsmasq", n.Command(context.Background(), "dnsmasq", "-k", "--log-facility=-",
		"--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--addn-hosts="+v.hosts, "--local-ttl=2",
		"--listen-address="+dnsIP, "--listen-address="+dns2IP, "--bind-interfaces", "--pid-file=", "--user=root"))
	// Each server bound to its address: a UDP server on 0.0.0.0 would
	// answer from another source address than the one it was asked on.
	for _, a := range servers {
		for _, port := range []string{"7", "8005"} {
			v.echo.Start(t, n, a+":"+port)
		}
	}
	return v
}

// waitFor polls cond until it holds; the limit only guards against a hang
// (TCG is slow) and says nothing about speed.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	netnstest.WaitFor(t, what, 90*time.Second, cond)
}
