package pipeline

import (
	"archive/tar"
	"bytes"
	"os"
	"path/filepath"
	"sort"
	"testing"
)

type entry struct {
	name string
	typ  byte
	body string
}

func tarOf(t testing.TB, entries ...entry) []byte {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := &tar.Header{Name: e.name, Typeflag: e.typ, Mode: 0o644, Size: int64(len(e.body))}
		if e.typ != tar.TypeReg {
			h.Size = 0
		}
		if e.typ == tar.TypeSymlink {
			h.Linkname = "/etc/passwd"
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if e.typ == tar.TypeReg {
			tw.Write([]byte(e.body))
		}
	}
	tw.Close()
	return buf.Bytes()
}

func TestUntarFlat(t *testing.T) {
	dir := t.TempDir()
	names, err := untarFlat(bytes.NewReader(tarOf(t,
		entry{"out/", tar.TypeDir, ""},
		entry{"out/vmlinuz", tar.TypeReg, "kernel"},
		entry{"out/initramfs", tar.TypeReg, "cpio"},
	)), dir)
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(names)
	if len(names) != 2 || names[0] != "initramfs" || names[1] != "vmlinuz" {
		t.Fatalf("names = %v", names)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "vmlinuz")); string(b) != "kernel" {
		t.Errorf("vmlinuz = %q", b)
	}

	for name, data := range map[string][]byte{
		"symlink":   tarOf(t, entry{"out/vmlinuz", tar.TypeSymlink, ""}),
		"duplicate": tarOf(t, entry{"out/a", tar.TypeReg, "1"}, entry{"other/a", tar.TypeReg, "2"}),
		"dotdot":    tarOf(t, entry{"out/..", tar.TypeReg, "1"}),
		"truncated": tarOf(t, entry{"out/a", tar.TypeReg, "1234"})[:514],
	} {
		if _, err := untarFlat(bytes.NewReader(data), t.TempDir()); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func FuzzUntarFlat(f *testing.F) {
	f.Add(tarOf(f, entry{"out/vmlinuz", tar.TypeReg, "kernel"}))
	f.Add(tarOf(f, entry{"out/", tar.TypeDir, ""}, entry{"out/x", tar.TypeSymlink, ""}))
	f.Fuzz(func(t *testing.T, data []byte) {
		dir := t.TempDir()
		names, err := untarFlat(bytes.NewReader(data), dir)
		if err != nil {
			return
		}
		ents, _ := os.ReadDir(dir)
		if len(ents) != len(names) {
			t.Fatalf("wrote %d files, reported %v", len(ents), names)
		}
	})
}
