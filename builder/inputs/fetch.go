// Package inputs downloads the build's pinned inputs (Debian packages, the Go
// toolchain, Go modules) on the host, checks them against their pinned
// hashes and keeps them in a cache so that rebuilds work offline.
package inputs

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"

	"github.com/qubes-go-firewall/qubes-go-firewall/builder/progress"
)

// Logf reports progress.
type Logf func(format string, args ...any)

// Cache is a directory of verified downloads.
type Cache struct {
	Dir    string
	Client *http.Client
	Logf   Logf
	// Progress shows hashing and downloading on a terminal; nil draws
	// nothing.
	Progress *progress.Meter
}

// DefaultDir is $XDG_CACHE_HOME/qgfw (or ~/.cache/qgfw).
func DefaultDir() (string, error) {
	d, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("cache directory: %w", err)
	}
	return filepath.Join(d, "qgfw"), nil
}

// File is a pinned download identified by its SHA-256.
type File struct {
	Name string // what it is, for messages
	URL  string // the live archive
	// Fallbacks are tried in order when URL does not give the pinned
	// bytes: Debian's snapshot archive at the pinned time, which keeps
	// every file it ever saw after the live archive drops it.
	Fallbacks []string
	SHA256    string // lower-case hex
	RePin     string // how to re-pin it when no source has it
}

// Sources are the URLs Fetch tries after the cache, in order.
func (f File) Sources() []string { return append([]string{f.URL}, f.Fallbacks...) }

// Attempt is what one source gave for a file.
type Attempt struct {
	Source string // "cache" or a URL
	Err    error
}

// UnavailableError says that no source gave a pinned file's bytes, and
// what each one did.
type UnavailableError struct {
	File     File
	Attempts []Attempt
}

func (e *UnavailableError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "pinned input %s (sha256 %s) is in none of its sources:", e.File.Name, e.File.SHA256)
	for _, a := range e.Attempts {
		fmt.Fprintf(&b, "\n  %s: %v", a.Source, a.Err)
	}
	if e.File.RePin != "" {
		fmt.Fprintf(&b, "\nre-pin it: %s", e.File.RePin)
	}
	return b.String()
}

// HashError is a source that served other bytes than the pinned ones.
type HashError struct{ Got, Want string }

func (e *HashError) Error() string {
	return fmt.Sprintf("refused: sha256 %s, pinned %s", e.Got, e.Want)
}

// Fetch returns the path of f in the cache. Sources come in order: the
// cache (re-hashed, so a damaged copy is noticed), then f.URL, then each
// fallback; a source whose bytes do not hash to f.SHA256 is refused and
// the next one tried. When none gives the file the error is an
// *UnavailableError listing every source's answer.
func (c *Cache) Fetch(ctx context.Context, f File) (string, error) {
	path := c.FilePath(f.SHA256)
	var tried []Attempt
	if got, err := c.hashFile(path, "checking cached "+f.Name); err == nil {
		if got == f.SHA256 {
			return path, nil
		}
		c.Logf("cached %s is damaged (sha256 %s), fetching it again", f.Name, got)
		tried = append(tried, Attempt{"cache", &HashError{got, f.SHA256}})
	} else {
		tried = append(tried, Attempt{"cache", errors.New("not there")})
	}
	for i, u := range f.Sources() {
		if ctx.Err() != nil {
			return "", ctx.Err()
		}
		err := c.download(ctx, f.Name, u, path, f.SHA256)
		if err == nil {
			if i > 0 {
				c.Logf("%s came from %s", f.Name, u)
			}
			return path, nil
		}
		tried = append(tried, Attempt{u, err})
		var he *HashError
		if errors.As(err, &he) {
			c.Logf("%s: %s %v", f.Name, u, err)
		}
	}
	return "", &UnavailableError{File: f, Attempts: tried}
}

// FilePath is where the cache keeps the file of that sha256.
func (c *Cache) FilePath(sha string) string { return filepath.Join(c.Dir, "files", "sha256-"+sha) }

// download writes url to path via a temporary file, checking the SHA-256
// if want is set, and returns an error that names the input when the
// server no longer has it.
func (c *Cache) download(ctx context.Context, name, url, path, want string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("download %s: %w", name, err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return fmt.Errorf("download %s: %w", name, err)
	}
	client := c.Client
	if client == nil {
		client = http.DefaultClient
	}
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("download %s from %s (is the network reachable? a rebuild needs it only for inputs not yet in %s): %w", name, url, c.Dir, err)
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode != http.StatusOK:
		return fmt.Errorf("download %s from %s: HTTP %s", name, url, resp.Status)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".download-*")
	if err != nil {
		return fmt.Errorf("download %s: %w", name, err)
	}
	defer os.Remove(tmp.Name())
	h := sha256.New()
	// A line for the large inputs (not for every Go module's go.mod).
	if resp.ContentLength >= 4<<20 {
		c.Logf("downloading %s (%d MB)", name, resp.ContentLength>>20)
	}
	bar := c.Progress.Start("downloading "+name, resp.ContentLength)
	_, err = io.Copy(io.MultiWriter(tmp, h, bar), resp.Body)
	bar.Done()
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("download %s from %s: %w", name, url, err)
	}
	if got := hex.EncodeToString(h.Sum(nil)); want != "" && got != want {
		return &HashError{Got: got, Want: want}
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("download %s: %w", name, err)
	}
	return nil
}

// hashFile returns the hex SHA-256 of a file, showing progress as label.
func (c *Cache) hashFile(path, label string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	var size int64
	if st, err := f.Stat(); err == nil {
		size = st.Size()
	}
	bar := c.Progress.Start(label, size)
	defer bar.Done()
	h := sha256.New()
	if _, err := io.Copy(io.MultiWriter(h, bar), f); err != nil {
		return "", fmt.Errorf("hash %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
