package pipeline

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/qubes-go-firewall/qubes-go-firewall/builder/base"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/debs"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/inputs"
)

// DebianFile is a pinned file of a Debian archive.
type DebianFile struct {
	Package, Version string
	Archive          string // "debian" or "debian-security": the path on deb.debian.org and on snapshot.debian.org
	Suite            string // where the live archive lists it, e.g. bookworm-security
	Path             string // pool/…
	SHA256           string
	RePin            string
}

// Sources are where pinned Debian files come from after the cache.
type Sources struct {
	// Mirror serves the archives under /debian and /debian-security
	// (default http://deb.debian.org).
	Mirror string
	// Snapshot is Debian's snapshot archive (default
	// https://snapshot.debian.org): /archive/ARCHIVE/TIME/pool/… at the
	// lock's time. "" leaves it out.
	Snapshot string
}

// DefaultSources are Debian's own servers.
func DefaultSources() Sources {
	return Sources{Mirror: "http://deb.debian.org", Snapshot: "https://snapshot.debian.org"}
}

// file is how the input cache fetches f: the live archive, then the
// snapshot at time at.
func (s Sources) file(f DebianFile, at time.Time) inputs.File {
	out := inputs.File{
		Name:   f.Package + " " + f.Version,
		URL:    strings.TrimSuffix(s.Mirror, "/") + "/" + f.Archive + "/" + f.Path,
		SHA256: f.SHA256,
		RePin:  f.RePin,
	}
	if s.Snapshot != "" {
		out.Fallbacks = []string{strings.TrimSuffix(s.Snapshot, "/") + "/archive/" + f.Archive + "/" + at.UTC().Format(debs.SnapshotFormat) + "/" + f.Path}
	}
	return out
}

// fetchDebian fetches f, and when no source has it says what the live
// archive offers instead: a superseded package is the usual reason.
func (s Sources) fetchDebian(ctx context.Context, cache *inputs.Cache, f DebianFile, at time.Time) (string, error) {
	path, err := cache.Fetch(ctx, s.file(f, at))
	var ue *inputs.UnavailableError
	if !errors.As(err, &ue) {
		return path, err
	}
	offers, ierr := debs.Index(ctx, cache.Client, strings.TrimSuffix(s.Mirror, "/")+"/"+f.Archive, f.Suite, "amd64", []string{f.Package})
	switch {
	case ierr != nil:
		return "", fmt.Errorf("%w\n(what %s offers now is unknown: %v)", err, f.Suite, ierr)
	case offers[f.Package] == nil:
		return "", fmt.Errorf("%w\n%s no longer has %s at all", err, f.Suite, f.Package)
	}
	return "", fmt.Errorf("%w\n%s now offers %s %s (locked: %s)", err, f.Suite, f.Package, offers[f.Package].Get("Version"), f.Version)
}

// readLock reads the source tree's base lock and checks it was made for
// the pinned base.
func readLock(opts Options) (*debs.Lock, error) {
	name := filepath.Join(opts.SourceDir, filepath.FromSlash(opts.Pins.BaseLock))
	data, err := os.ReadFile(name)
	if err != nil {
		return nil, fmt.Errorf("base lock: %w (make one with `qgfw inputs lock`)", err)
	}
	lock, err := debs.ParseLock(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", opts.Pins.BaseLock, err)
	}
	return lock, nil
}

// loadLock reads and checks the lock and returns it with the base spec
// that names it; it also fills in the default mirror.
func loadLock(opts *Options) (*debs.Lock, base.Spec, error) {
	lock, err := readLock(*opts)
	if err != nil {
		return nil, base.Spec{}, err
	}
	if err := base.CheckLock(opts.Pins.Base, lock, reLock); err != nil {
		return nil, base.Spec{}, err
	}
	spec := opts.Pins.Base
	spec.LockSHA256 = lock.Digest()
	if opts.Sources.Mirror == "" {
		opts.Sources.Mirror = DefaultSources().Mirror
	}
	return lock, spec, nil
}

// reLock is the advice every lock error ends with.
const reLock = "`qgfw inputs lock` (resolves the base again from the live archive), then `make checksums`"

// fetchLocked makes every locked .deb present and verified in the cache
// and returns their paths by package name. It runs before any container
// does, so a changed or superseded lock entry stops the build early.
func fetchLocked(ctx context.Context, cache *inputs.Cache, src Sources, lock *debs.Lock) (map[string]string, error) {
	paths := map[string]string{}
	for _, e := range lock.Packages {
		p, err := src.fetchDebian(ctx, cache, DebianFile{
			Package: e.Name, Version: e.Version, Archive: "debian", Suite: lock.Suite,
			Path: e.Path, SHA256: e.SHA256, RePin: reLock,
		}, lock.Snapshot)
		if err != nil {
			return nil, fmt.Errorf("base package %s: %w", e.Name, err)
		}
		paths[e.Name] = p
	}
	return paths, nil
}
