package main

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/ulikunitz/xz"

	"github.com/qubes-go-firewall/qubes-go-firewall/builder/debs"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/inputs"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/pipeline"
)

// archive is a Debian archive on a real HTTP server on loopback, shaped
// like deb.debian.org (/debian/pool/…, /debian-security/pool/…) or like
// snapshot.debian.org (/archive/debian/TIME/pool/…). It serves the real
// cached files of the real lock, except where a test says otherwise.
type archive struct {
	srv    *httptest.Server
	prefix map[string]string // archive name -> URL path prefix
	files  map[string]string // pool path -> cached file
	gone   map[string]bool   // pool path -> 404
	bad    map[string]bool   // pool path -> other bytes
	index  []byte            // Packages.xz of dists/bookworm/main/binary-amd64

	mu  sync.Mutex
	got []string // pool paths asked for
}

func newArchive(t *testing.T, files map[string]string, prefix map[string]string) *archive {
	a := &archive{prefix: prefix, files: files, gone: map[string]bool{}, bad: map[string]bool{}}
	a.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasSuffix(r.URL.Path, "/dists/bookworm/main/binary-amd64/Packages.xz") && a.index != nil {
			w.Write(a.index)
			return
		}
		for _, p := range a.prefix {
			pool, ok := strings.CutPrefix(r.URL.Path, p)
			if !ok {
				continue
			}
			a.mu.Lock()
			a.got = append(a.got, pool)
			a.mu.Unlock()
			switch {
			case a.gone[pool]:
			case a.bad[pool]:
				w.Write([]byte("a newer upload under the same name"))
				return
			case a.files[pool] != "":
				http.ServeFile(w, r, a.files[pool])
				return
			}
		}
		http.NotFound(w, r)
	}))
	t.Cleanup(a.srv.Close)
	return a
}

func (a *archive) asked(pool string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, g := range a.got {
		if g == pool {
			return true
		}
	}
	return false
}

// The fallback order and the hash checks with the real lock and the real
// inputs (run after `make image` has filled the cache: make test-inputs):
// the live mirror has dropped one package and serves other bytes for
// another, the snapshot has both; then the snapshot serves other bytes
// too and the build's input step stops, naming the package, every
// source's answer, what the archive now offers and how to re-pin.
func TestInputsFallback(t *testing.T) {
	realCache, src, pins, lock, _ := realInputs(t)
	files := map[string]string{pins.LinuxSource.Path: filepath.Join(realCache, "files", "sha256-"+pins.LinuxSource.SHA256)}
	for _, e := range lock.Packages {
		files[e.Path] = filepath.Join(realCache, "files", "sha256-"+e.SHA256)
	}
	for _, f := range files {
		if _, err := os.Stat(f); err != nil {
			t.Fatalf("the input cache lacks %s: run make image first", f)
		}
	}
	at := lock.Snapshot.Format(debs.SnapshotFormat)
	live := newArchive(t, files, map[string]string{"debian": "/debian/", "debian-security": "/debian-security/"})
	snap := newArchive(t, files, map[string]string{"debian": "/archive/debian/" + at + "/", "debian-security": "/archive/debian-security/" + at + "/"})
	mk, _ := lock.Find("make")
	pa, _ := lock.Find("patch")
	live.gone[mk.Path] = true               // superseded
	live.bad[pa.Path] = true                // same name, other bytes
	live.gone[pins.LinuxSource.Path] = true // the security archive moved on

	// An empty cache but for the Go modules (they come from the module
	// proxy, whose order is tested in builder/inputs).
	cache := t.TempDir()
	if err := linkTree(filepath.Join(realCache, "goproxy"), filepath.Join(cache, "goproxy")); err != nil {
		t.Fatal(err)
	}
	args := []string{"inputs", "fetch", "--source", src, "--cache", cache, "--debian-mirror", live.srv.URL, "--snapshot", snap.srv.URL}
	var out, errb bytes.Buffer
	if code := run(context.Background(), args, nil, &out, &errb); code != 0 {
		t.Fatalf("inputs fetch: exit %d\n%s", code, errb.String())
	}
	for _, p := range []string{mk.Path, pa.Path, pins.LinuxSource.Path} {
		if !live.asked(p) || !snap.asked(p) {
			t.Errorf("%s: live asked %v, snapshot asked %v; want both, in that order", p, live.asked(p), snap.asked(p))
		}
	}
	if e, _ := lock.Find("gcc-12"); snap.asked(e.Path) {
		t.Error("the snapshot was asked for a file the live mirror served")
	}
	if !strings.Contains(errb.String(), "patch "+pa.Version+": "+live.srv.URL+"/debian/"+pa.Path+" refused: sha256") {
		t.Errorf("the log does not say the live mirror's bytes were refused:\n%s", errb.String())
	}
	for p, f := range files {
		if _, err := os.Stat(filepath.Join(cache, "files", filepath.Base(f))); err != nil {
			t.Errorf("%s not in the cache after fetch: %v", p, err)
		}
	}

	// Both sources refuse: the user's message.
	snap.bad[pa.Path] = true
	live.index = xzOf(t, "Package: patch\nVersion: 2.7.6-7+deb12u1\nArchitecture: amd64\n\n")
	os.Remove(filepath.Join(cache, "files", "sha256-"+pa.SHA256))
	out.Reset()
	errb.Reset()
	code := run(context.Background(), args, nil, &out, &errb)
	msg := errb.String()
	t.Logf("what a user sees:\n%s", msg)
	if code == 0 {
		t.Fatal("fetch succeeded with no source serving the pinned bytes")
	}
	for _, want := range []string{
		"base package patch",
		"cache: not there",
		live.srv.URL + "/debian/" + pa.Path + ": refused: sha256",
		snap.srv.URL + "/archive/debian/" + at + "/" + pa.Path + ": refused: sha256",
		"bookworm now offers patch 2.7.6-7+deb12u1 (locked: " + pa.Version + ")",
		"re-pin it: `qgfw inputs lock`",
	} {
		if !strings.Contains(msg, want) {
			t.Errorf("the error lacks %q", want)
		}
	}
}

// A lock entry edited by hand (another .deb under the same version) is
// refused by every source, and the build stops in its input step: before
// it contacts the container engine, so before any container runs.
func TestInputsChangedLockStopsBuild(t *testing.T) {
	realCache, repo, pins, lock, data := realInputs(t)
	src := t.TempDir()
	if err := linkTree(repo, src); err != nil {
		t.Fatal(err)
	}
	lockFile := filepath.Join(src, pins.BaseLock)
	gcc, _ := lock.Find("gcc-12")
	forged := strings.Repeat("0", 64)
	os.Remove(lockFile) // a link into the checkout: replace, do not write through
	if err := os.WriteFile(lockFile, bytes.Replace(data, []byte(gcc.SHA256), []byte(forged), 1), 0o644); err != nil {
		t.Fatal(err)
	}
	cache := t.TempDir()
	for _, d := range []string{"files", "goproxy"} {
		if err := linkTree(filepath.Join(realCache, d), filepath.Join(cache, d)); err != nil {
			t.Fatal(err)
		}
	}
	live := newArchive(t, map[string]string{gcc.Path: filepath.Join(realCache, "files", "sha256-"+gcc.SHA256)}, map[string]string{"debian": "/debian/"})
	var out, errb bytes.Buffer
	code := run(context.Background(), []string{"build", "--source", src, "--cache", cache, "--dist", t.TempDir(),
		"--debian-mirror", live.srv.URL, "--snapshot", ""}, nil, &out, &errb)
	msg := errb.String()
	if code == 0 {
		t.Fatal("the build accepted a forged lock entry")
	}
	for _, want := range []string{"base package gcc-12", "refused: sha256 " + gcc.SHA256 + ", pinned " + forged} {
		if !strings.Contains(msg, want) {
			t.Errorf("the error lacks %q:\n%s", want, msg)
		}
	}
	for _, never := range []string{"connecting to", "STEP", "creating base image"} {
		if strings.Contains(msg, never) {
			t.Errorf("the build got as far as %q before refusing the lock", never)
		}
	}
}

// realInputs skips unless QGFW_TEST_INPUTS=1 and returns the input
// cache, the checkout, its pins and its lock (parsed and as bytes).
func realInputs(t *testing.T) (string, string, pipeline.Pins, *debs.Lock, []byte) {
	if os.Getenv("QGFW_TEST_INPUTS") != "1" {
		t.Skip("QGFW_TEST_INPUTS=1 (make test-inputs) runs it against the filled input cache")
	}
	cache, err := inputs.DefaultDir()
	if err != nil {
		t.Fatal(err)
	}
	src, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	pins := pipeline.DefaultPins()
	data, err := os.ReadFile(filepath.Join(src, pins.BaseLock))
	if err != nil {
		t.Fatal(err)
	}
	lock, err := debs.ParseLock(data)
	if err != nil {
		t.Fatal(err)
	}
	return cache, src, pins, lock, data
}

func xzOf(t *testing.T, s string) []byte {
	var b bytes.Buffer
	w, err := xz.NewWriter(&b)
	if err != nil {
		t.Fatal(err)
	}
	w.Write([]byte(s))
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// linkTree mirrors the regular files under from into to as hard links
// (copies across file systems), skipping what a test must not share.
func linkTree(from, to string) error {
	return filepath.Walk(from, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(from, p)
		if fi.IsDir() {
			switch filepath.Base(p) {
			case ".git", "dist", "bin":
				return filepath.SkipDir
			}
			return os.MkdirAll(filepath.Join(to, rel), 0o755)
		}
		if !fi.Mode().IsRegular() {
			return nil
		}
		dst := filepath.Join(to, rel)
		if os.Link(p, dst) == nil {
			return nil
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(dst, data, fi.Mode().Perm())
	})
}
