package xentest

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// fakeQEMU puts a qemu-system-x86_64 first in PATH that prints script's
// output (a shell snippet) as the serial line would, ignoring its
// arguments, so that boot's reading of the serial line and its timers can
// be tested without Xen.
func fakeQEMU(t *testing.T, script string) xenEnv {
	t.Helper()
	bin := t.TempDir()
	body := "#!/bin/sh\n" + script + "\n"
	if err := os.WriteFile(filepath.Join(bin, "qemu-system-x86_64"), []byte(body), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", bin+string(os.PathListSeparator)+os.Getenv("PATH"))
	return xenEnv{cache: t.TempDir(), roundLimit: 1, dom0Deadline: time.Minute}
}

func runFake(t *testing.T, e xenEnv) (results, error) {
	t.Helper()
	dir := t.TempDir()
	return boot(e, "initrd", "1:32", filepath.Join(dir, "serial.log"), dir)
}

// The guard ends a run that goes on too long, and says so.
func TestBootGuardKills(t *testing.T) {
	e := fakeQEMU(t, `echo "QGFW-XEN dom0 up 1"; while :; do echo "QGFW-XEN heartbeat"; sleep 0.2; done`)
	e.guard = time.Second
	res, err := runFake(t, e)
	if err == nil || !strings.Contains(err.Error(), "guard") {
		t.Fatalf("err = %v, want the guard's", err)
	}
	if !res.dom0Up || res.done {
		t.Errorf("dom0Up %v done %v, want true false", res.dom0Up, res.done)
	}
}

// A round that dom0 runs again after a platform fault extends the guard by
// a round's limit and a minute, so the retry is not cut short.
func TestBootGuardExtendedByRetry(t *testing.T) {
	e := fakeQEMU(t, `echo "QGFW-XEN dom0 up 1"
echo "QGFW-XEN result 1 round INFO platform fault (XEN) d2v0 Triple fault during round, whose checks failed: run again"
i=0; while [ $i -lt 10 ]; do echo "QGFW-XEN heartbeat"; sleep 0.5; i=$((i + 1)); done
echo "QGFW-XEN result 1 a PASS firewall started"
echo "QGFW-XEN done rc=0 9"`)
	// The script runs 5 s; the retry line comes at once, well inside
	// the guard even on a loaded machine.
	e.guard = 3 * time.Second
	res, err := runFake(t, e)
	if err != nil {
		t.Fatalf("boot: %v", err)
	}
	if !res.done || res.pass[key{1, "a"}] != 1 {
		t.Errorf("done %v, pass %v: want the run to end with its result", res.done, res.pass)
	}
}

// A progress line is recorded but not counted; a FAIL is.
func TestBootCountsResults(t *testing.T) {
	e := fakeQEMU(t, `echo "QGFW-XEN dom0 up 1"
echo "QGFW-XEN progress 1 b FAIL c2 booted"
echo "QGFW-XEN result 1 b PASS c1 booted"
echo "QGFW-XEN result 1 b FAIL c2 booted timeout"
echo "QGFW-XEN done rc=1 9"`)
	e.guard = time.Minute
	res, err := runFake(t, e)
	if err != nil {
		t.Fatalf("boot: %v", err)
	}
	if res.pass[key{1, "b"}] != 1 || res.fail[key{1, "b"}] != 1 || len(res.progress) != 1 || len(res.failed) != 1 {
		t.Errorf("pass %v fail %v progress %q failed %q", res.pass, res.fail, res.progress, res.failed)
	}
}
