package main

import (
	"strings"
	"testing"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/afpacket"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/internal/netnstest"
)

// A closed link (an uplink replaced after a netvm change) leaves the link
// set at the next describe, so its receive slots can be freed; its counters
// stay in the totals.
func TestLinkSetForgetsClosedLinks(t *testing.T) {
	netnstest.NeedRoot(t)
	ns := netnstest.New(t, "qgls")
	ns.IP(t, "link", "add", "d0", "type", "veth", "peer", "name", "d1")
	ns.IP(t, "link", "set", "d0", "up")
	ns.IP(t, "link", "set", "d1", "up")
	ls := &linkSet{}
	for _, name := range []string{"d0", "d1"} {
		var l *afpacket.Link
		if err := ns.Do(func() (err error) { l, err = afpacket.Open(name, afpacket.Config{}); return err }); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		ls.add(l)
	}
	if s := ls.describe(); !strings.Contains(s, "d0 in") || !strings.Contains(s, "d1 in") {
		t.Fatalf("describe = %q", s)
	}
	ls.links[0].Close()
	s := ls.describe()
	if strings.Contains(s, "d0 in") || !strings.Contains(s, "d1 in") || !strings.Contains(s, "1 closed links in") {
		t.Fatalf("describe after closing d0 = %q", s)
	}
	if len(ls.links) != 1 {
		t.Fatalf("%d links kept, want 1", len(ls.links))
	}
}
