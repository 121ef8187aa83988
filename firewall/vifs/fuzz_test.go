package vifs

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
)

// FuzzParseAddrs: whatever the backend directory holds, an accepted
// address is one that appears verbatim in it.
func FuzzParseAddrs(f *testing.F) {
	f.Add("10.137.0.5", mac)
	f.Add("fd09::1 10.137.0.9", "00-16-3e-5e-6c-00")
	f.Add("", "")
	f.Fuzz(func(t *testing.T, ips, macs string) {
		ip, m, err := parseAddrs(ips, macs)
		if err != nil {
			return
		}
		if !strings.Contains(" "+strings.Join(strings.Fields(ips), " ")+" ", " "+netip.AddrFrom4(ip).String()+" ") {
			t.Fatalf("IP %v not in %q", netip.AddrFrom4(ip), ips)
		}
		if !strings.EqualFold(formatMAC(m), macs) {
			t.Fatalf("mac %s from %q", formatMAC(m), macs)
		}
		_ = fmt.Sprint(m)
	})
}
