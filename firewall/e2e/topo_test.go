package e2e

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// Addresses of the topology (Qubes conventions: /32 clients, the
// firewall's own IP is their gateway, 10.139.1.x are the virtual DNS).
const (
	fwIP1     = "10.137.0.5" // firewall behind netvm 1
	netvm1IP  = "10.137.0.1"
	fwIP2     = "10.138.0.7" // firewall behind netvm 2
	netvm2IP  = "10.138.0.1"
	client1IP = "10.137.0.20"
	client2IP = "10.137.0.21"
	dnsIP     = "10.139.1.1"
	dns2IP    = "10.139.1.2"
	serverIP  = "192.0.2.10" // echo + iperf3, behind both netvms
	otherIP   = "192.0.2.20" // echo, behind both netvms
	thirdIP   = "192.0.2.30" // echo, behind both netvms
	onlyNet2  = "192.0.2.40" // echo, behind netvm 2 only
)

// waitLimit only guards against a hang; it says nothing about speed.
const waitLimit = 60 * time.Second

// tag makes this run's namespace names unique.
var tag = fmt.Sprintf("qgfw%d-", os.Getpid())

// buildBinaries compiles the firewall and the QubesDB tool.
func buildBinaries(t *testing.T, dir string) (firewall, qubesdb string) {
	t.Helper()
	for _, name := range []string{"firewall", "qubesdb"} {
		cmd := exec.Command("go", "build", "-o", filepath.Join(dir, name), "./cmd/"+name)
		cmd.Dir = ".."
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("build %s: %v\n%s", name, err, out)
		}
	}
	return filepath.Join(dir, "firewall"), filepath.Join(dir, "qubesdb")
}

// rssKB reads a process's resident set size.
func rssKB(pid int) int {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return -1
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		var kb int
		if _, err := fmt.Sscanf(s.Text(), "VmRSS: %d kB", &kb); err == nil {
			return kb
		}
	}
	return -1
}
