package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/qubes-go-firewall/qubes-go-firewall/builder/initramfs"
)

func TestRun(t *testing.T) {
	dir := t.TempDir()
	initPath := filepath.Join(dir, "firewall")
	if err := os.WriteFile(initPath, []byte("not really an ELF"), 0o700); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "initramfs")
	var stderr bytes.Buffer
	if err := run([]string{"-init", initPath, "-o", out}, &stderr); err != nil {
		t.Fatalf("run: %v\n%s", err, stderr.String())
	}
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	var want bytes.Buffer
	if err := initramfs.Build(&want, []byte("not really an ELF")); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want.Bytes()) {
		t.Error("output differs from initramfs.Build")
	}
	if fi, err := os.Stat(out); err != nil || fi.Mode().Perm() != 0o644 {
		t.Errorf("output mode: %v %v, want 0644", fi.Mode(), err)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, ".mkinitramfs-*")); len(left) != 0 {
		t.Errorf("temporary files left: %v", left)
	}
}

func TestRunErrors(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"no flags", nil, "need -init and -o"},
		{"extra argument", []string{"-init", "x", "-o", "y", "z"}, "need -init and -o"},
		{"missing init", []string{"-init", filepath.Join(dir, "nope"), "-o", filepath.Join(dir, "out")}, "read init"},
		{"bad output dir", []string{"-init", "main.go", "-o", filepath.Join(dir, "no", "out")}, "create output"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := run(tt.args, &bytes.Buffer{})
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("run: %v, want an error containing %q", err, tt.want)
			}
		})
	}
}
