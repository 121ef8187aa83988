// Package inputs downloads the build's pinned inputs (Debian packages, the Go
// toolchain, Go modules) on the host, checks them against their pinned
// hashes and keeps them in a cache so that rebuilds work offline.
package inputs

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"

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
	Name   string // what it is, for messages
	URL    string
	SHA256 string // lower-case hex
	RePin  string // how to re-pin it when the mirror no longer has it
}

// Fetch returns the path of f in the cache, downloading it if needed.
// Cached copies are re-hashed, so a damaged cache is detected.
func (c *Cache) Fetch(ctx context.Context, f File) (string, error) {
	path := filepath.Join(c.Dir, "files", "sha256-"+f.SHA256)
	if got, err := c.hashFile(path, "checking cached "+f.Name); err == nil {
		if got == f.SHA256 {
			return path, nil
		}
		c.Logf("cached %s is damaged (sha256 %s), downloading it again", f.Name, got)
	}
	if err := c.download(ctx, f.Name, f.URL, path, f.SHA256, f.RePin); err != nil {
		return "", err
	}
	return path, nil
}

// download writes url to path via a temporary file, checking the SHA-256
// if want is set, and returns an error that names the input when the
// server no longer has it.
func (c *Cache) download(ctx context.Context, name, url, path, want, rePin string) error {
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
	case resp.StatusCode == http.StatusNotFound || resp.StatusCode == http.StatusGone:
		return fmt.Errorf("pinned input %s is no longer available at %s (HTTP %d); re-pin it: %s", name, url, resp.StatusCode, rePin)
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
		return fmt.Errorf("download %s from %s: sha256 %s, pinned %s: the mirror serves different bytes; re-pin only after checking why: %s", name, url, got, want, rePin)
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
