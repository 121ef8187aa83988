package inputs

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"

	"github.com/qubes-go-firewall/qubes-go-firewall/builder/progress"
)

func sha(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

func TestFetch(t *testing.T) {
	body := []byte("kernel source package")
	hits := 0
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits++
		if r.URL.Path == "/pkg.deb" {
			w.Write(body)
			return
		}
		http.NotFound(w, r)
	}))
	c := &Cache{Dir: t.TempDir(), Logf: t.Logf}
	ctx := context.Background()
	f := File{Name: "pkg.deb", URL: srv.URL + "/pkg.deb", SHA256: sha(body), RePin: "edit pins.go"}

	path, err := c.Fetch(ctx, f)
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(path); string(got) != string(body) {
		t.Fatalf("cached content = %q", got)
	}
	// Offline: the cached copy is used.
	srv.Close()
	if _, err := c.Fetch(ctx, f); err != nil {
		t.Fatalf("offline fetch of a cached input: %v", err)
	}
	if hits != 1 {
		t.Errorf("server hits = %d, want 1", hits)
	}
	// A damaged cache is detected and, offline, reported.
	if err := os.WriteFile(path, []byte("damaged"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Fetch(ctx, f); err == nil {
		t.Fatal("damaged cache accepted")
	}
}

func TestFetchErrors(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/other.deb" {
			w.Write([]byte("other bytes"))
			return
		}
		http.NotFound(w, r)
	}))
	defer srv.Close()
	c := &Cache{Dir: t.TempDir(), Logf: t.Logf}
	ctx := context.Background()

	_, err := c.Fetch(ctx, File{Name: "gone.deb", URL: srv.URL + "/gone.deb", SHA256: sha([]byte("x")), RePin: "run apt-cache show"})
	if err == nil || !strings.Contains(err.Error(), "gone.deb is no longer available") || !strings.Contains(err.Error(), "run apt-cache show") {
		t.Errorf("missing input: err = %v, want it to name the input and how to re-pin", err)
	}
	want := sha([]byte("pinned bytes"))
	_, err = c.Fetch(ctx, File{Name: "other.deb", URL: srv.URL + "/other.deb", SHA256: want})
	if err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), sha([]byte("other bytes"))) {
		t.Errorf("hash mismatch: err = %v, want both hashes", err)
	}
	if ents, _ := os.ReadDir(c.Dir + "/files"); len(ents) != 0 {
		t.Errorf("failed downloads left files: %v", ents)
	}
}

// On a terminal, a download and the re-hash of a cached input each draw a
// bar and clear it; the log gets no progress lines either way.
func TestFetchProgress(t *testing.T) {
	body := make([]byte, 5<<20)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "5242880")
		w.Write(body)
	}))
	defer srv.Close()
	var term, log strings.Builder
	c := &Cache{Dir: t.TempDir(), Logf: func(f string, a ...any) { fmt.Fprintf(&log, f+"\n", a...) }, Progress: progress.New(&term)}
	f := File{Name: "linux-source", URL: srv.URL + "/x.deb", SHA256: sha(body)}
	for range 2 { // downloaded, then found in the cache
		if _, err := c.Fetch(context.Background(), f); err != nil {
			t.Fatal(err)
		}
	}
	for _, want := range []string{"\rdownloading linux-source: ", "of 5.0 MB", "\rchecking cached linux-source: ", "\r\x1b[K"} {
		if !strings.Contains(term.String(), want) {
			t.Errorf("terminal output %q lacks %q", term.String(), want)
		}
	}
	if !strings.HasSuffix(term.String(), "\r\x1b[K") {
		t.Errorf("the last bar was not cleared: %q", term.String())
	}
	if log.String() != "downloading linux-source (5 MB)\n" {
		t.Errorf("log = %q, want one line for the download", log.String())
	}
}
