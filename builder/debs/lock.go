package debs

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"path"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Lock pins the base image: the suite and package names it was resolved
// from, and every package that resolution installed, each at an exact
// version with the sha256 of its .deb.
//
// The file is line-oriented so that a re-pin reads as a diff:
//
//	# comment
//	suite bookworm
//	mirror http://deb.debian.org/debian
//	snapshot 20261202T000000Z
//	include gcc,libc6-dev,make
//	pkg NAME VERSION ARCH SHA256 SIZE POOL-PATH
type Lock struct {
	Suite    string
	Mirror   string    // the live archive the lock was resolved from
	Snapshot time.Time // Debian's snapshot archive at this time has every entry
	Include  []string  // package names asked for on top of the essential set
	Packages []Entry   // sorted by name
}

// Entry is one locked package.
type Entry struct {
	Name, Version, Arch string
	SHA256              string // of the .deb, lower-case hex
	Size                int64
	Path                string // in the archive, e.g. pool/main/g/gcc-12/cpp-12_…_amd64.deb
}

// SnapshotFormat is how snapshot.debian.org names a point in time.
const SnapshotFormat = "20060102T150405Z"

var (
	nameRE    = regexp.MustCompile(`^[a-z0-9][a-z0-9+.-]+$`)
	versionRE = regexp.MustCompile(`^[0-9A-Za-z.+~:-]+$`)
	archRE    = regexp.MustCompile(`^[a-z0-9-]+$`)
	hexRE     = regexp.MustCompile(`^[0-9a-f]{64}$`)
	poolRE    = regexp.MustCompile(`^pool/[A-Za-z0-9+._/~%-]+\.deb$`)
)

// maxPackages bounds a lock: a base image of a few hundred packages is
// already far more than the build's.
const maxPackages = 4096

// ParseLock parses and checks a lock file.
func ParseLock(data []byte) (*Lock, error) {
	l := &Lock{}
	seen := map[string]bool{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		f := strings.Fields(line)
		bad := func(why string) error { return fmt.Errorf("lock line %d: %s", n, why) }
		switch f[0] {
		case "suite", "mirror", "snapshot", "include":
			if len(f) != 2 {
				return nil, bad(f[0] + " takes one value")
			}
		}
		switch f[0] {
		case "suite":
			l.Suite = f[1]
		case "mirror":
			if !strings.HasPrefix(f[1], "http://") && !strings.HasPrefix(f[1], "https://") {
				return nil, bad("mirror is not an http(s) URL")
			}
			l.Mirror = strings.TrimSuffix(f[1], "/")
		case "snapshot":
			t, err := time.Parse(SnapshotFormat, f[1])
			if err != nil {
				return nil, bad("snapshot is not a time like " + SnapshotFormat)
			}
			l.Snapshot = t
		case "include":
			l.Include = strings.Split(f[1], ",")
			for _, p := range l.Include {
				if !nameRE.MatchString(p) {
					return nil, bad(fmt.Sprintf("include: %q is not a package name", p))
				}
			}
		case "pkg":
			if len(f) != 7 {
				return nil, bad("pkg takes NAME VERSION ARCH SHA256 SIZE PATH")
			}
			e := Entry{Name: f[1], Version: f[2], Arch: f[3], SHA256: f[4], Path: f[6]}
			size, err := strconv.ParseInt(f[5], 10, 64)
			switch {
			case !nameRE.MatchString(e.Name):
				return nil, bad(fmt.Sprintf("%q is not a package name", e.Name))
			case !versionRE.MatchString(e.Version):
				return nil, bad(fmt.Sprintf("%s: %q is not a version", e.Name, e.Version))
			case !archRE.MatchString(e.Arch):
				return nil, bad(fmt.Sprintf("%s: %q is not an architecture", e.Name, e.Arch))
			case !hexRE.MatchString(e.SHA256):
				return nil, bad(fmt.Sprintf("%s: %q is not a sha256", e.Name, e.SHA256))
			case err != nil || size <= 0 || size > 1<<30:
				return nil, bad(fmt.Sprintf("%s: %q is not a size", e.Name, f[5]))
			case !poolRE.MatchString(e.Path) || strings.Contains(e.Path, "..") || path.Clean(e.Path) != e.Path:
				return nil, bad(fmt.Sprintf("%s: %q is not a pool path", e.Name, e.Path))
			case seen[e.Name]:
				return nil, bad(e.Name + " is locked twice")
			case len(l.Packages) >= maxPackages:
				return nil, bad(fmt.Sprintf("more than %d packages", maxPackages))
			}
			e.Size = size
			seen[e.Name] = true
			l.Packages = append(l.Packages, e)
		default:
			return nil, bad(fmt.Sprintf("unknown keyword %q", f[0]))
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("lock: %w", err)
	}
	switch {
	case l.Suite == "" || l.Mirror == "" || l.Snapshot.IsZero() || len(l.Include) == 0:
		return nil, fmt.Errorf("lock: suite, mirror, snapshot and include are all required")
	case len(l.Packages) == 0:
		return nil, fmt.Errorf("lock: no packages")
	}
	for _, p := range l.Include {
		if !seen[p] {
			return nil, fmt.Errorf("lock: %s is included but not locked", p)
		}
	}
	slices.SortFunc(l.Packages, func(a, b Entry) int { return strings.Compare(a.Name, b.Name) })
	return l, nil
}

// Format renders the lock with a header saying what it is and how to
// regenerate it.
func (l *Lock) Format() []byte {
	var b bytes.Buffer
	b.WriteString("# The build's base image, locked: every package mmdebstrap installed, at\n")
	b.WriteString("# the version and .deb sha256 it got. The build installs exactly these .debs\n")
	b.WriteString("# (from the cache, the mirror, then Debian's snapshot archive at the time\n")
	b.WriteString("# below). Regenerate from the live archive with `qgfw inputs lock`, then\n")
	b.WriteString("# `make checksums`. Fields: pkg NAME VERSION ARCH SHA256 SIZE POOL-PATH.\n")
	fmt.Fprintf(&b, "suite %s\nmirror %s\nsnapshot %s\ninclude %s\n", l.Suite, l.Mirror, l.Snapshot.UTC().Format(SnapshotFormat), strings.Join(l.Include, ","))
	for _, e := range l.Packages {
		fmt.Fprintf(&b, "pkg %s %s %s %s %d %s\n", e.Name, e.Version, e.Arch, e.SHA256, e.Size, e.Path)
	}
	return b.Bytes()
}

// Digest is the sha256 of the formatted lock: it names the base image and
// goes into buildinfo.json.
func (l *Lock) Digest() string {
	h := sha256.Sum256(l.Format())
	return hex.EncodeToString(h[:])
}

// Find returns the entry for a package name.
func (l *Lock) Find(name string) (Entry, bool) {
	i, ok := slices.BinarySearchFunc(l.Packages, name, func(e Entry, n string) int { return strings.Compare(e.Name, n) })
	if !ok {
		return Entry{}, false
	}
	return l.Packages[i], true
}

// FileName is the .deb's name in a flat repository.
func (e Entry) FileName() string { return path.Base(e.Path) }

// Diff lists what changed from old to new, a line per package.
func Diff(old, new *Lock) []string {
	var out []string
	for _, e := range new.Packages {
		o, ok := old.Find(e.Name)
		switch {
		case !ok:
			out = append(out, fmt.Sprintf("+ %s %s", e.Name, e.Version))
		case o.Version != e.Version:
			out = append(out, fmt.Sprintf("~ %s %s -> %s", e.Name, o.Version, e.Version))
		case o.SHA256 != e.SHA256:
			out = append(out, fmt.Sprintf("! %s %s: same version, other .deb (sha256 %s -> %s)", e.Name, e.Version, o.SHA256, e.SHA256))
		}
	}
	for _, o := range old.Packages {
		if _, ok := new.Find(o.Name); !ok {
			out = append(out, fmt.Sprintf("- %s %s", o.Name, o.Version))
		}
	}
	return out
}
