package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestSaltFromDist(t *testing.T) {
	dir := verifyFixture(t)
	dist := filepath.Join(dir, "dist")
	out := filepath.Join(dir, "tree")
	code, stdout, stderr := verifyRun(t, "salt", "--from", dist, "--out", out, "--key", filepath.Join(dir, "k.pub"),
		"--name", "sys-gofw", "--clients", "work,personal", "--memory", "48")
	if code != exitOK {
		t.Fatalf("salt: %d\n%s%s", code, stdout, stderr)
	}
	for _, f := range []string{"sys-gofw.top", "sys-gofw/init.sls", "sys-gofw/vmlinuz", "sys-gofw/initramfs", "sys-gofw/SHA256SUMS", "sys-gofw/SHA256SUMS.sig"} {
		if _, err := os.Stat(filepath.Join(out, f)); err != nil {
			t.Errorf("tree lacks %s: %v", f, err)
		}
	}
	sls, _ := os.ReadFile(filepath.Join(out, "sys-gofw", "init.sls"))
	for _, want := range []string{"- memory: 48", "- name: personal", "- start: []"} {
		if !strings.Contains(string(sls), want) {
			t.Errorf("init.sls lacks %q", want)
		}
	}
	// Unsigned: works, with a warning.
	code, stdout, _ = verifyRun(t, "salt", "--from", dist, "--out", filepath.Join(dir, "tree2"))
	if code != exitOK || !strings.Contains(stdout, "not signature-checked") {
		t.Fatalf("unsigned salt: %d %s", code, stdout)
	}
	// Existing tree is not overwritten.
	if code, _, stderr := verifyRun(t, "salt", "--from", dist, "--out", out); code == exitOK || !strings.Contains(stderr, "not empty") {
		t.Fatalf("overwrite: %d %s", code, stderr)
	}
}

func TestSaltRefusals(t *testing.T) {
	dir := verifyFixture(t)
	dist := filepath.Join(dir, "dist")
	pub := filepath.Join(dir, "k.pub")
	cases := []struct {
		name  string
		setup func(t *testing.T)
		args  []string
		code  int
		msg   string
	}{
		{"bad name", nil, []string{"--name", "a b"}, exitUsage, "--name"},
		{"injection in kernelopts", nil, []string{"--kernelopts", "x'\n- netvm: evil"}, exitUsage, "--kernelopts"},
		{"bad memory", nil, []string{"--memory", "8"}, exitUsage, "--memory"},
		{"non-numeric memory", nil, []string{"--memory", "64M"}, exitUsage, "invalid argument"},
		{"bad client", nil, []string{"--clients", "work,{{x}}"}, exitUsage, "--clients"},
		{"netvm among the clients", nil, []string{"--netvm", "sys-net", "--clients", "work,sys-net"}, exitUsage, "a loop"},
		{"tampered artifact", func(t *testing.T) { verifyWrite(t, filepath.Join(dist, "vmlinuz"), "evil") },
			[]string{"--key", pub}, exitMismatch, "does not match"},
		{"tampered sums", func(t *testing.T) {
			b, _ := os.ReadFile(filepath.Join(dist, "SHA256SUMS"))
			verifyWrite(t, filepath.Join(dist, "SHA256SUMS"), string(b)+strings.Repeat("0", 64)+"  extra\n")
		}, []string{"--key", pub}, exitBadSig, "signature does not verify"},
		{"missing artifact", func(t *testing.T) { os.Remove(filepath.Join(dist, "initramfs")) }, nil, exitMissingFile, "no such file"},
		{"FIFO artifact", func(t *testing.T) { mkfifo(t, filepath.Join(dist, "initramfs")) }, nil, exitMalformed, "not a regular file (a FIFO)"},
		{"FIFO sums", func(t *testing.T) { mkfifo(t, filepath.Join(dist, "SHA256SUMS")) }, nil, exitMalformed, "not a regular file (a FIFO)"},
		{"FIFO signature", func(t *testing.T) { mkfifo(t, filepath.Join(dist, "SHA256SUMS.sig")) }, []string{"--key", pub}, exitMalformed, "not a regular file (a FIFO)"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			orig := filepath.Join(t.TempDir(), "orig")
			if err := os.CopyFS(orig, os.DirFS(dist)); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.RemoveAll(dist); os.CopyFS(dist, os.DirFS(orig)) })
			if c.setup != nil {
				c.setup(t)
			}
			out := filepath.Join(t.TempDir(), "tree")
			args := append([]string{"salt", "--from", dist, "--out", out}, c.args...)
			code, stdout, stderr := runGuarded(t, args...)
			if code != c.code || !strings.Contains(stderr, c.msg) {
				t.Fatalf("exit %d (want %d), stderr lacks %q:\n%s%s", code, c.code, c.msg, stdout, stderr)
			}
			if _, err := os.Stat(out); !os.IsNotExist(err) {
				t.Fatal("a state tree was written despite the refusal")
			}
		})
	}
}

func TestSaltRelease(t *testing.T) {
	dir := verifyFixture(t)
	dist := filepath.Join(dir, "dist")
	cs := filepath.Join(dir, "checksums")
	releaseTree(t, cs, "v0.1.0", dist, filepath.Join(dir, "k.pub"))
	out := filepath.Join(dir, "tree")
	if code, stdout, stderr := verifyRun(t, "salt", "--checksums-dir", cs, "--release", "v0.1.0", "--from", dist, "--out", out); code != exitOK {
		t.Fatalf("salt --release: %d\n%s%s", code, stdout, stderr)
	}
	sls, _ := os.ReadFile(filepath.Join(out, "sys-go-firewall", "init.sls"))
	if !strings.Contains(string(sls), "signed release v0.1.0") {
		t.Errorf("init.sls does not name the release:\n%s", sls)
	}
}
