package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/internal/netnstest"
)

// TestXenModeAgainstFakes runs the firewall binary in Qubes mode against
// the in-repo xenstore and QubesDB (dom0 peer) fakes on unix sockets: when
// the fake xenstore announces vif7.0, the firewall must write
// hotplug-status, attach the veth of that name as the client, forward its
// traffic under QubesDB's rules, remove the backend directory when the
// toolstack takes the vif away, and stop on SIGTERM.
func TestXenModeAgainstFakes(t *testing.T) {
	netnstest.NeedRoot(t)
	dir := t.TempDir()
	bin := filepath.Join(dir, "firewall")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	tag := fmt.Sprintf("qgfwx%d-", os.Getpid())
	fw, cl, up := netnstest.New(t, tag+"fw"), netnstest.New(t, tag+"cl"), netnstest.New(t, tag+"up")
	netnstest.Veth(t, fw, "vif7.0", cl, "eth0")
	netnstest.Veth(t, fw, "eth0", up, "eth0")
	fw.IP(t, "link", "set", "vif7.0", "address", "fe:ff:ff:ff:ff:ff")
	// Left down: the firewall brings its interfaces up, as in the VM.
	for _, c := range []struct {
		n    *netnstest.NS
		args []string
	}{
		{cl, []string{"link", "set", "eth0", "address", "00:16:3e:5e:6c:07"}},
		{cl, []string{"addr", "add", "10.137.0.30/32", "dev", "eth0"}},
		{cl, []string{"link", "set", "eth0", "up"}},
		{cl, []string{"route", "add", "10.137.0.5", "dev", "eth0"}},
		{cl, []string{"route", "add", "default", "via", "10.137.0.5", "dev", "eth0", "onlink"}},
		{up, []string{"addr", "add", "10.137.0.1/24", "dev", "eth0"}},
		{up, []string{"addr", "add", "192.0.2.10/32", "dev", "lo"}},
		{up, []string{"link", "set", "eth0", "up"}},
	} {
		c.n.IP(t, c.args...)
	}
	(&netnstest.Echo{}).Start(t, up, "192.0.2.10:7")

	xs, xsSock, db, dbSock := fakeDom0(t)
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

	fwProc := netnstest.Start(t, "firewall", fw.Command(context.Background(), bin, "xen", "-xenstore", xsSock, "-qubesdb-peer", dbSock))

	// The toolstack creates the backend; netback waits for hotplug-status.
	vif := "backend/vif/7/0"
	xs.WriteAll(map[string]string{vif + "/ip": "10.137.0.30", vif + "/mac": "00:16:3e:5e:6c:07", vif + "/state": "2", vif + "/frontend-id": "7"})
	netnstest.WaitFor(t, "hotplug-status", time.Minute, func() bool { v, _ := xs.Read(vif + "/hotplug-status"); return v == "connected" })
	xs.Write(vif+"/state", "4")
	netnstest.WaitFor(t, "TCP through the discovered client link", time.Minute, func() bool { return netnstest.TCPEcho(cl, "192.0.2.10:7") == nil })
	if err := netnstest.UDPEcho(cl, "192.0.2.10:7"); err == nil {
		t.Fatal("UDP passed although QubesDB's rules allow only TCP")
	}

	// The toolstack takes the vif away (libxl: online=0, Closing; netback:
	// Closed): the firewall, as the driver domain, must remove the backend
	// directory, which libxl waits for.
	xs.WriteAll(map[string]string{vif + "/online": "0", vif + "/state": "6"})
	netnstest.WaitFor(t, "backend directory removed", time.Minute, func() bool { _, ok := xs.Read(vif); return !ok })

	// control/shutdown belongs to the guest kernel's handler: the firewall
	// leaves it alone and stops on the signal the kernel would send PID 1.
	xs.Write("control/shutdown", "poweroff")
	time.Sleep(time.Second)
	if v, _ := xs.Read("control/shutdown"); v != "poweroff" {
		t.Errorf("control/shutdown = %q, want it left to the kernel's handler", v)
	}
	fwProc.Cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-fwProc.Done():
		if err != nil {
			t.Fatalf("firewall exited with %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("firewall ignored SIGTERM")
	}
	for _, want := range []string{"vif7.0: client 10.137.0.30 removed", "backend directory removed", "firewall: stopped"} {
		if !strings.Contains(fwProc.Output(), want) {
			t.Errorf("no %q in the firewall's log", want)
		}
	}
}
