package inputs

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
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
	if err == nil || !strings.Contains(err.Error(), "gone.deb (sha256") || !strings.Contains(err.Error(), "HTTP 404") || !strings.Contains(err.Error(), "run apt-cache show") {
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

// A snapshot-shaped tree behind a real HTTP server on loopback: the live
// mirror drops or corrupts a file, Debian's snapshot archive keeps it.
// Sources are tried in order (cache, live, snapshot), each checked
// against the pinned hash, and a wrong hash is refused at every one.
func TestFetchFallbackOrder(t *testing.T) {
	pinned := []byte("linux-source-6.1_6.1.192-2_all.deb, the pinned bytes")
	const pool = "/pool/updates/main/l/linux/linux-source-6.1_6.1.192-2_all.deb"
	const snap = "/archive/debian-security/20261202T000000Z"
	var (
		live  []byte // nil: 404
		shot  []byte // nil: 404
		order []string
	)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var body []byte
		switch r.URL.Path {
		case "/debian-security" + pool:
			order = append(order, "live")
			body = live
		case snap + pool:
			order = append(order, "snapshot")
			body = shot
		}
		if body == nil {
			http.NotFound(w, r)
			return
		}
		w.Write(body)
	}))
	defer srv.Close()
	f := File{
		Name:      "linux-source-6.1_6.1.192-2_all.deb",
		URL:       srv.URL + "/debian-security" + pool,
		Fallbacks: []string{srv.URL + snap + pool},
		SHA256:    sha(pinned),
		RePin:     "qgfw inputs lock",
	}
	ctx := context.Background()
	c := &Cache{Dir: t.TempDir(), Logf: t.Logf}
	cached := c.FilePath(f.SHA256)
	if err := os.MkdirAll(filepath.Dir(cached), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name       string
		live, shot []byte
		damage     bool     // the cached copy is overwritten first
		order      []string // sources asked
		ok         bool
		errHas     []string
	}{
		{name: "live mirror has it", live: pinned, order: []string{"live"}, ok: true},
		{name: "cached: no network", live: nil, order: nil, ok: true},
		{name: "damaged cache, live has it", damage: true, live: pinned, order: []string{"live"}, ok: true},
		{name: "superseded: live 404, snapshot has it", damage: true, shot: pinned, order: []string{"live", "snapshot"}, ok: true},
		{name: "live serves other bytes: refused, snapshot has it", damage: true, live: []byte("newer upload"), shot: pinned, order: []string{"live", "snapshot"}, ok: true},
		{name: "both serve other bytes", damage: true, live: []byte("newer upload"), shot: []byte("tampered"), order: []string{"live", "snapshot"},
			errHas: []string{"cache: refused: sha256 " + sha([]byte("damaged")), "debian-security" + pool + ": refused: sha256 " + sha([]byte("newer upload")), snap + pool + ": refused: sha256 " + sha([]byte("tampered")), "re-pin it: qgfw inputs lock"}},
		{name: "gone everywhere", damage: true, order: []string{"live", "snapshot"},
			errHas: []string{"HTTP 404", "is in none of its sources"}},
	} {
		live, shot, order = tc.live, tc.shot, nil
		if tc.damage {
			if err := os.WriteFile(cached, []byte("damaged"), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		path, err := c.Fetch(ctx, f)
		if fmt.Sprint(order) != fmt.Sprint(tc.order) {
			t.Errorf("%s: sources asked %v, want %v", tc.name, order, tc.order)
		}
		if tc.ok {
			if err != nil {
				t.Errorf("%s: %v", tc.name, err)
			} else if got, _ := os.ReadFile(path); string(got) != string(pinned) {
				t.Errorf("%s: cached %q", tc.name, got)
			}
			continue
		}
		var ue *UnavailableError
		if !errors.As(err, &ue) {
			t.Errorf("%s: err = %v, want an UnavailableError", tc.name, err)
			continue
		}
		for _, w := range tc.errHas {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: error lacks %q:\n%v", tc.name, w, err)
			}
		}
		if _, serr := os.Stat(cached); serr == nil {
			if got, _ := os.ReadFile(cached); string(got) != "damaged" {
				t.Errorf("%s: refused bytes reached the cache: %q", tc.name, got)
			}
		}
	}
}
