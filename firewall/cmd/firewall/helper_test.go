package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/internal/netnstest"
)

// TestShutdownHelpers runs the binary the way the kernel runs its helpers
// for dom0's requests — as /sbin/poweroff and /sbin/reboot, links to /init —
// in a PID namespace whose PID 1 is a shell that records the signals it
// gets: poweroff must send SIGTERM, reboot SIGINT.
func TestShutdownHelpers(t *testing.T) {
	netnstest.NeedRoot(t)
	if _, err := exec.LookPath("unshare"); err != nil {
		t.Skip("unshare not installed")
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "init")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	for _, name := range []string{"poweroff", "reboot"} {
		if err := os.Symlink(bin, filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	log := filepath.Join(dir, "signals")
	// PID 1 of the new namespace traps TERM and INT, runs both helpers and
	// waits for the traps to have fired.
	script := `trap 'echo TERM >> ` + log + `' TERM; trap 'echo INT >> ` + log + `' INT
` + dir + `/poweroff; ` + dir + `/reboot
i=0; while [ $(wc -l < ` + log + ` 2>/dev/null || echo 0) -lt 2 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done`
	out, err := exec.Command("unshare", "--pid", "--fork", "sh", "-c", script).CombinedOutput()
	if err != nil {
		t.Fatalf("unshare: %v\n%s", err, out)
	}
	got, _ := os.ReadFile(log)
	if strings.Join(strings.Fields(string(got)), " ") != "TERM INT" {
		t.Fatalf("PID 1 got %q, want TERM from poweroff then INT from reboot\n%s", got, out)
	}
}
