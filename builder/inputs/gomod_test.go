package inputs

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"golang.org/x/mod/module"
	"golang.org/x/mod/sumdb/dirhash"
	modzip "golang.org/x/mod/zip"
)

func TestGoSum(t *testing.T) {
	data := []byte("golang.org/x/sys v0.50.0 h1:dkKZEFTEKaLr1sjhs0WiKqoi8Jj5nHbS3Njmx1UoMJs=\n" +
		"golang.org/x/sys v0.50.0/go.mod h1:hNLxWAXmnKAxqDtdwIYC4bM9oQPEecfsnNMuSxOs3og=\n\n" +
		"example.com/a v1.0.0/go.mod h1:AAAA\n")
	mods, err := GoSum(data)
	if err != nil {
		t.Fatal(err)
	}
	got := mods[module.Version{Path: "golang.org/x/sys", Version: "v0.50.0"}]
	want := &Module{Path: "golang.org/x/sys", Version: "v0.50.0",
		ZipHash: "h1:dkKZEFTEKaLr1sjhs0WiKqoi8Jj5nHbS3Njmx1UoMJs=", ModHash: "h1:hNLxWAXmnKAxqDtdwIYC4bM9oQPEecfsnNMuSxOs3og="}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("x/sys = %+v, want %+v", got, want)
	}
	if m := mods[module.Version{Path: "example.com/a", Version: "v1.0.0"}]; m == nil || m.ZipHash != "" {
		t.Errorf("example.com/a = %+v", m)
	}
	for _, bad := range []string{
		"example.com/a v1.0.0\n",              // no hash
		"example.com/a v1.0.0 sha256:xx\n",    // not h1
		"example.com/a v1.0.0 h1:x extra\n",   // too many fields
		"../evil v1.0.0 h1:x\n",               // bad module path
		"example.com/a notaversion h1:x\n",    // bad version
		"example.com/a v1.0.0/../../x h1:x\n", // bad version suffix
	} {
		if _, err := GoSum([]byte(bad)); err == nil {
			t.Errorf("GoSum(%q) accepted", bad)
		}
	}
}

func FuzzGoSum(f *testing.F) {
	f.Add([]byte("golang.org/x/sys v0.50.0 h1:dkKZEFTEKaLr1sjhs0WiKqoi8Jj5nHbS3Njmx1UoMJs=\n"))
	f.Add([]byte("example.com/a v1.0.0/go.mod h1:AAAA\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		mods, err := GoSum(data)
		if err != nil {
			return
		}
		for k, m := range mods {
			if module.Check(k.Path, k.Version) != nil || (m.ZipHash == "" && m.ModHash == "") {
				t.Fatalf("accepted bad entry %+v", m)
			}
		}
	})
}

// testModule is a module served by the fake proxy.
type testModule struct {
	path, version string
	files         map[string]string // name -> content
}

// zipOf returns the module zip and its h1 hash.
func zipOf(t *testing.T, m testModule) ([]byte, string) {
	t.Helper()
	dir := t.TempDir()
	for name, content := range m.files {
		p := filepath.Join(dir, filepath.FromSlash(name))
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	var buf bytes.Buffer
	if err := modzip.CreateFromDir(&buf, module.Version{Path: m.path, Version: m.version}, dir); err != nil {
		t.Fatal(err)
	}
	zf := filepath.Join(t.TempDir(), "m.zip")
	os.WriteFile(zf, buf.Bytes(), 0o644)
	h, err := dirhash.HashZip(zf, dirhash.Hash1)
	if err != nil {
		t.Fatal(err)
	}
	return buf.Bytes(), h
}

func modHash(t *testing.T, gomod string) string {
	h, err := dirhash.Hash1([]string{"go.mod"}, func(string) (io.ReadCloser, error) {
		return io.NopCloser(strings.NewReader(gomod)), nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// TestOffline builds a main module that imports a package of dep, which
// imports leaf; unused is in go.sum but imported by nothing. The offline
// proxy must hold every go.mod, the zips of dep and leaf, not unused.
func TestOffline(t *testing.T) {
	mods := []testModule{
		{"example.com/dep", "v1.0.0", map[string]string{
			"go.mod":        "module example.com/dep\n",
			"sub/s.go":      "package sub\nimport _ \"example.com/leaf\"\n",
			"sub/s_test.go": "package sub\nimport _ \"example.com/unused\"\n",
			"other.go":      "package dep\nimport _ \"example.com/unused\"\n",
		}},
		{"example.com/leaf", "v1.2.0", map[string]string{"go.mod": "module example.com/leaf\n", "l.go": "package leaf\nimport \"fmt\"\nvar _ = fmt.Sprint\n"}},
		{"example.com/unused", "v0.1.0", map[string]string{"go.mod": "module example.com/unused\n", "u.go": "package unused\n"}},
	}
	served := map[string][]byte{}
	var gosum, require strings.Builder
	for _, m := range mods {
		z, h := zipOf(t, m)
		gm := m.files["go.mod"]
		base := "/" + m.path + "/@v/" + m.version
		served[base+".zip"], served[base+".mod"] = z, []byte(gm)
		served[base+".info"] = []byte(`{"Version":"` + m.version + `"}`)
		gosum.WriteString(m.path + " " + m.version + " " + h + "\n")
		gosum.WriteString(m.path + " " + m.version + "/go.mod " + modHash(t, gm) + "\n")
		require.WriteString("require " + m.path + " " + m.version + "\n")
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if b, ok := served[r.URL.Path]; ok {
			w.Write(b)
			return
		}
		http.NotFound(w, r)
	}))
	defer srv.Close()

	mainDir := t.TempDir()
	write := func(name, content string) {
		p := filepath.Join(mainDir, name)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("go.mod", "module example.com/main\n\ngo 1.22\n\n"+require.String())
	write("go.sum", gosum.String())
	write("cmd/tool/main.go", "package main\nimport _ \"example.com/main/lib\"\nfunc main() {}\n")
	write("lib/lib.go", "package lib\nimport _ \"example.com/dep/sub\"\n")
	write("lib/lib_test.go", "package lib\nimport _ \"example.com/unused\"\n")
	write("unrelated/u.go", "package unrelated\nimport _ \"example.com/unused\"\n")

	p := &GoProxy{Cache: &Cache{Dir: t.TempDir(), Logf: t.Logf}, URL: srv.URL}
	dst := t.TempDir()
	zips, local, err := p.Offline(context.Background(), mainDir, []string{"cmd/tool"}, dst)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, m := range zips {
		names = append(names, m.Path)
	}
	if want := []string{"example.com/dep", "example.com/leaf"}; !reflect.DeepEqual(names, want) {
		t.Errorf("zips = %v, want %v", names, want)
	}
	if want := []string{"cmd/tool", "lib"}; !reflect.DeepEqual(local, want) {
		t.Errorf("local packages = %v, want %v", local, want)
	}
	for _, f := range []string{"example.com/dep/@v/v1.0.0.zip", "example.com/leaf/@v/v1.2.0.zip", "example.com/unused/@v/v0.1.0.mod", "example.com/unused/@v/v0.1.0.info"} {
		if _, err := os.Stat(filepath.Join(dst, f)); err != nil {
			t.Errorf("offline proxy lacks %s", f)
		}
	}
	if _, err := os.Stat(filepath.Join(dst, "example.com/unused/@v/v0.1.0.zip")); err == nil {
		t.Error("offline proxy holds the zip of an unused module")
	}

	// A proxy serving other bytes than go.sum pins is refused.
	served["/example.com/leaf/@v/v1.2.0.zip"], _ = zipOf(t, testModule{"example.com/leaf", "v1.2.0", map[string]string{"go.mod": "module example.com/leaf\n", "l.go": "package leaf // changed\n"}})
	p2 := &GoProxy{Cache: &Cache{Dir: t.TempDir(), Logf: t.Logf}, URL: srv.URL}
	if _, _, err := p2.Offline(context.Background(), mainDir, []string{"cmd/tool"}, t.TempDir()); err == nil || !strings.Contains(err.Error(), "example.com/leaf") {
		t.Errorf("tampered zip: err = %v", err)
	}
}
