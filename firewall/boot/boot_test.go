package boot

import (
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestParseCmdline(t *testing.T) {
	o, err := ParseCmdline("console=hvc0 sysctl.vm.overcommit_memory=1 --ipv4=10.137.0.5 --ipv4-gw=10.137.0.1 --ipv4-dns=10.139.1.1 --ipv4-dns2=10.139.1.2 --nat-table-size=5000 qgfw.nat-client-max=1000 qgfw.log=debug qgfw.qubesdb=virtio:qubesdb\n")
	if err != nil {
		t.Fatal(err)
	}
	if !o.BSD() || o.IPv4 != netip.MustParseAddr("10.137.0.5") || o.Gateway != netip.MustParseAddr("10.137.0.1") {
		t.Errorf("addresses %+v", o)
	}
	if !slices.Equal(o.DNS, []netip.Addr{netip.MustParseAddr("10.139.1.1"), netip.MustParseAddr("10.139.1.2")}) {
		t.Errorf("dns %v", o.DNS)
	}
	if o.NATTableSize != 5000 || o.NATClientMax != 1000 || o.LogLevel != "debug" || o.QubesDB != "virtio:qubesdb" || o.Xenstore != "xenbus" {
		t.Errorf("options %+v", o)
	}
	r, err := ParseCmdline("qgfw.ifname=52:54:00:00:00:02=vif2.0 qgfw.ifname=52:54:00:00:00:03=vif3.0")
	if err != nil || len(r.Rename) != 2 || r.Rename[1] != (Rename{MAC: [6]byte{0x52, 0x54, 0, 0, 0, 3}, Name: "vif3.0"}) {
		t.Errorf("renames %+v, %v", r.Rename, err)
	}
	d, err := ParseCmdline("root=/dev/xvda ro quiet")
	if err != nil || d.BSD() || d.QubesDB != "vchan" || d.LogLevel != "info" {
		t.Errorf("defaults %+v, %v", d, err)
	}
}

func TestParseCmdlineRefusesBadValues(t *testing.T) {
	for _, c := range []string{
		"--ipv4=10.137.0.300 --ipv4-gw=10.137.0.1",
		"--ipv4=::1 --ipv4-gw=10.137.0.1",
		"--ipv4=10.137.0.5", // gateway missing
		"--ipv4-dns=example.com",
		"--nat-table-size=12",
		"--nat-table-size=many",
		"--nat-table-size",
		"qgfw.nat-client-max=0",
		"qgfw.nat-client-max=half",
		"qgfw.log=loud",
		"qgfw.qubesdb=virtio:",
		"qgfw.qubesdb=virtio:../x",
		"qgfw.xenstore=tcp:1.2.3.4",
		"qgfw.ifname=52:54:00:00:00:02",
		"qgfw.ifname=zz=vif2.0",
		"qgfw.ifname=52:54:00:00:00:02=averyveryverylongname",
	} {
		if _, err := ParseCmdline(c); err == nil {
			t.Errorf("%q accepted", c)
		} else if !strings.Contains(err.Error(), "command line") {
			t.Errorf("%q: error %q does not say where", c, err)
		}
	}
}

func FuzzParseCmdline(f *testing.F) {
	f.Add("--ipv4=10.137.0.5 --ipv4-gw=10.137.0.1 qgfw.qubesdb=virtio:q")
	f.Fuzz(func(t *testing.T, s string) {
		o, err := ParseCmdline(s)
		if err == nil && o.IPv4.IsValid() && !o.IPv4.Is4() {
			t.Fatalf("non-IPv4 address accepted from %q", s)
		}
	})
}

func TestLinkSelf(t *testing.T) {
	root := t.TempDir()
	if err := LinkSelf(root, "/sbin/reboot"); err != nil {
		t.Fatal(err)
	}
	// Again, over the existing link: the helper paths are recreated at
	// every boot.
	if err := LinkSelf(root, "/sbin/reboot"); err != nil {
		t.Fatal(err)
	}
	if got, err := os.Readlink(filepath.Join(root, "sbin", "reboot")); err != nil || got != "/init" {
		t.Fatalf("link = %q, %v; want /init", got, err)
	}
}
