package bundle

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// hashVerify accepts files/sha256-X whose bytes hash to X, and goproxy
// files whose content is "ok".
func hashVerify(name, tmp string) error {
	data, err := os.ReadFile(tmp)
	if err != nil {
		return err
	}
	if sha, ok := strings.CutPrefix(name, "files/sha256-"); ok {
		if got := fmt.Sprintf("%x", sha256.Sum256(data)); got != sha {
			return fmt.Errorf("sha256 %s", got)
		}
		return nil
	}
	if string(data) != "ok" {
		return errors.New("not ok")
	}
	return nil
}

func writeCache(t *testing.T, files map[string]string) string {
	dir := t.TempDir()
	for name, body := range files {
		p := filepath.Join(dir, filepath.FromSlash(name))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func TestExportImport(t *testing.T) {
	deb := "a .deb"
	files := map[string]string{
		fmt.Sprintf("files/sha256-%x", sha256.Sum256([]byte(deb))): deb,
		"goproxy/golang.org/x/sys/@v/v0.1.0.zip":                   "ok",
	}
	var names []string
	for n := range files {
		names = append(names, n)
	}
	var a, b bytes.Buffer
	if err := Export(&a, writeCache(t, files), names); err != nil {
		t.Fatal(err)
	}
	// Nothing of this machine (mode, owner, time) goes in: another cache
	// with the same files gives the same bytes.
	if err := Export(&b, writeCache(t, files), names); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a.Bytes(), b.Bytes()) {
		t.Error("two exports of the same inputs differ")
	}
	dst := t.TempDir()
	n, err := Import(bytes.NewReader(a.Bytes()), dst, hashVerify)
	if err != nil || n != 2 {
		t.Fatalf("Import = %d, %v", n, err)
	}
	for name, body := range files {
		if got, err := os.ReadFile(filepath.Join(dst, name)); err != nil || string(got) != body {
			t.Errorf("%s: %q, %v", name, got, err)
		}
	}
	if _, err := os.Stat(filepath.Join(dst, "import-tmp")); !os.IsNotExist(err) {
		t.Error("import left its temporary directory")
	}
}

// tarOf builds a bundle by hand, for entries Export would never write.
func tarOf(t testing.TB, manifest bool, entries ...tar.Header) []byte {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	if manifest {
		tw.WriteHeader(&tar.Header{Name: manifestName, Mode: 0o644, Size: 1, Typeflag: tar.TypeReg})
		tw.Write([]byte("\n"))
	}
	for _, h := range entries {
		h := h
		body := []byte(h.Linkname)
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(body))
			h.Linkname = ""
		}
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			tw.Write(body)
		}
	}
	tw.Close()
	return buf.Bytes()
}

func TestImportRefuses(t *testing.T) {
	reg := func(name, body string) tar.Header {
		return tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Linkname: body}
	}
	for name, tc := range map[string]struct {
		data []byte
		want string
	}{
		"empty":        {nil, "not a qgfw input bundle"},
		"no manifest":  {tarOf(t, false, reg("files/sha256-"+strings.Repeat("0", 64), "x")), "not a qgfw input bundle"},
		"wrong hash":   {tarOf(t, true, reg("files/sha256-"+strings.Repeat("0", 64), "x")), "refused: sha256"},
		"traversal":    {tarOf(t, true, reg("../../etc/passwd", "x")), "not a cache path"},
		"absolute":     {tarOf(t, true, reg("/etc/passwd", "x")), "not a cache path"},
		"other file":   {tarOf(t, true, reg("keys/release.key", "x")), "not an input"},
		"nested files": {tarOf(t, true, reg("files/sha256-x/../../y", "x")), "not a cache path"},
		"symlink":      {tarOf(t, true, tar.Header{Name: "goproxy/a/@v/v1.zip", Typeflag: tar.TypeSymlink, Linkname: "/etc/passwd"}), "not a regular file"},
		"bad module":   {tarOf(t, true, reg("goproxy/a/@v/v1.zip", "tampered")), "refused: not ok"},
	} {
		dst := t.TempDir()
		_, err := Import(bytes.NewReader(tc.data), dst, hashVerify)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err = %v, want %q", name, err, tc.want)
		}
		// Nothing refused reaches the cache.
		var left []string
		filepath.WalkDir(dst, func(p string, d os.DirEntry, err error) error {
			if err == nil && !d.IsDir() {
				left = append(left, p)
			}
			return nil
		})
		if len(left) > 0 {
			t.Errorf("%s: refused entries left %v", name, left)
		}
	}
}

func FuzzImport(f *testing.F) {
	f.Add(tarOf(f, true, tar.Header{Name: "goproxy/a/@v/v1.zip", Typeflag: tar.TypeReg, Mode: 0o644, Linkname: "ok"}))
	f.Add(tarOf(f, true, tar.Header{Name: "files/sha256-" + strings.Repeat("0", 64), Typeflag: tar.TypeReg, Mode: 0o644, Linkname: "x"}))
	f.Fuzz(func(t *testing.T, data []byte) {
		dst := t.TempDir()
		n, err := Import(bytes.NewReader(data), dst, hashVerify)
		if err == nil && n < 0 {
			t.Fatal("negative count")
		}
		// Whatever was loaded is inside the cache and passed the verifier.
		filepath.WalkDir(dst, func(p string, d os.DirEntry, err error) error {
			if err != nil || d.IsDir() {
				return nil
			}
			rel, _ := filepath.Rel(dst, p)
			if strings.HasPrefix(rel, "..") || hashVerify(filepath.ToSlash(rel), p) != nil {
				t.Fatalf("%s reached the cache", rel)
			}
			return nil
		})
	})
}
