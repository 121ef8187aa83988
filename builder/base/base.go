// Package base creates the build's base image with mmdebstrap from exactly
// the .debs of its lock file (builder/pipeline/base.lock) and imports it
// into the container engine, once per lock; Resolve makes a new lock from
// the live archive.
package base

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/qubes-go-firewall/qubes-go-firewall/builder/debs"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/engine"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/sums"
)

// Spec is everything that determines the base image's contents.
type Spec struct {
	Suite           string   `json:"suite"`    // e.g. bookworm
	Mirror          string   `json:"mirror"`   // e.g. http://deb.debian.org/debian
	Packages        []string `json:"packages"` // installed on top of the essential set
	SourceDateEpoch int64    `json:"source_date_epoch"`
	// LockSHA256 is the digest of the lock the image is built from.
	LockSHA256 string `json:"lock_sha256"`
}

// PackagesLabel holds "name=version,..." of every installed package.
const PackagesLabel = "org.qubes-go-firewall.packages"

// Tag names the image by the hash of the spec, so a changed spec builds a
// new base and an unchanged one is reused.
func (s Spec) Tag() string {
	pk := append([]string(nil), s.Packages...)
	sort.Strings(pk)
	h := sha256.Sum256([]byte(strings.Join([]string{"v2", s.Suite, s.Mirror, strings.Join(pk, ","), strconv.FormatInt(s.SourceDateEpoch, 10), s.LockSHA256}, "\n")))
	return "localhost/qgfw-base:" + hex.EncodeToString(h[:8])
}

// Package is one installed Debian package.
type Package struct {
	Name    string `json:"name"`
	Version string `json:"version"`
}

// CheckLock reports whether lock was made for s: the same suite and the
// same packages asked for. reLock says how to make a new one.
func CheckLock(s Spec, lock *debs.Lock, reLock string) error {
	want := append([]string(nil), s.Packages...)
	got := append([]string(nil), lock.Include...)
	sort.Strings(want)
	sort.Strings(got)
	if lock.Suite != s.Suite || strings.Join(want, ",") != strings.Join(got, ",") {
		return fmt.Errorf("the base lock is for %s with %s, the build asks for %s with %s: %s",
			lock.Suite, strings.Join(got, ","), s.Suite, strings.Join(want, ","), reLock)
	}
	return nil
}

// Ensure returns the base image's tag and installed packages, creating
// and importing it if the image store does not have it. debPaths holds
// the verified .deb of every locked package (by name); workDir holds the
// temporary repository and root file system tarball.
func Ensure(ctx context.Context, eng engine.Engine, s Spec, lock *debs.Lock, debPaths map[string]string, workDir string, logf engine.Logf, out io.Writer) (string, []Package, error) {
	tag := s.Tag()
	ok, err := eng.ImageExists(tag)
	if err != nil {
		return "", nil, err
	}
	if !ok {
		if err := create(ctx, eng, s, lock, debPaths, tag, workDir, logf, out); err != nil {
			return "", nil, err
		}
	}
	labels, err := eng.ImageLabels(tag)
	if err != nil {
		return "", nil, err
	}
	pkgs, err := ParsePackages(labels[PackagesLabel])
	if err != nil {
		return "", nil, fmt.Errorf("base image %s: %w", tag, err)
	}
	if err := matchLock(pkgs, lock); err != nil {
		return "", nil, fmt.Errorf("base image %s: %w (remove it with `qgfw clean`)", tag, err)
	}
	return tag, pkgs, nil
}

// matchLock fails unless pkgs is exactly the lock's name=version set.
func matchLock(pkgs []Package, lock *debs.Lock) error {
	var diffs []string
	have := map[string]string{}
	for _, p := range pkgs {
		have[p.Name] = p.Version
		if e, ok := lock.Find(p.Name); !ok {
			diffs = append(diffs, p.Name+" "+p.Version+" is installed but not locked")
		} else if e.Version != p.Version {
			diffs = append(diffs, p.Name+" "+p.Version+" is installed, "+e.Version+" locked")
		}
	}
	for _, e := range lock.Packages {
		if _, ok := have[e.Name]; !ok {
			diffs = append(diffs, e.Name+" "+e.Version+" is locked but not installed")
		}
	}
	if len(diffs) > 0 {
		return fmt.Errorf("its packages differ from the lock: %s", strings.Join(diffs, "; "))
	}
	return nil
}

// mmdebstrap runs it with the reproducibility settings both uses share.
func mmdebstrap(ctx context.Context, s Spec, out io.Writer, args ...string) error {
	bin, err := exec.LookPath("mmdebstrap")
	if err != nil {
		return fmt.Errorf("the base image needs mmdebstrap (apt-get install mmdebstrap): %w", err)
	}
	// mmdebstrap's tar output is reproducible for a fixed
	// SOURCE_DATE_EPOCH and package set.
	cmd := exec.CommandContext(ctx, bin, append([]string{"--variant=essential", "--include=" + strings.Join(s.Packages, ",")}, args...)...)
	cmd.Env = append(os.Environ(), "SOURCE_DATE_EPOCH="+strconv.FormatInt(s.SourceDateEpoch, 10), "LC_ALL=C.UTF-8")
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("mmdebstrap %s: %w", s.Suite, err)
	}
	return nil
}

// listHook makes mmdebstrap write name=version of every installed package
// to file.
func listHook(file string) string {
	return "--customize-hook=chroot \"$1\" dpkg-query -W -f='${Package}=${Version}\\n' > " + file
}

func create(ctx context.Context, eng engine.Engine, s Spec, lock *debs.Lock, debPaths map[string]string, tag, workDir string, logf engine.Logf, out io.Writer) error {
	if err := os.MkdirAll(workDir, 0o755); err != nil {
		return fmt.Errorf("base image: %w", err)
	}
	dir, err := os.MkdirTemp(workDir, "base-")
	if err != nil {
		return fmt.Errorf("base image: %w", err)
	}
	defer os.RemoveAll(dir)
	// mmdebstrap's root mode reads the repository as root; the unshare
	// mode as a mapped user, which needs a+rx on the way to it.
	if err := os.Chmod(dir, 0o755); err != nil {
		return fmt.Errorf("base image: %w", err)
	}
	sources, err := debs.WriteRepo(ctx, filepath.Join(dir, "repo"), lock, debPaths)
	if err != nil {
		return err
	}
	rootfs := filepath.Join(dir, "rootfs.tar")
	list := filepath.Join(dir, "packages")
	logf("creating base image %s from the %d locked packages of %s with mmdebstrap (a few minutes, once)", tag, len(lock.Packages), s.Suite)
	if err := mmdebstrap(ctx, s, out,
		"--hook-dir=/usr/share/mmdebstrap/hooks/file-mirror-automount",
		"--format=tar", listHook(list),
		s.Suite, rootfs, sources); err != nil {
		return err
	}
	data, err := os.ReadFile(list)
	if err != nil {
		return fmt.Errorf("base image package list: %w", err)
	}
	pkgs := strings.Join(strings.Fields(string(data)), ",")
	parsed, err := ParsePackages(pkgs)
	if err != nil {
		return fmt.Errorf("base image package list: %w", err)
	}
	if err := matchLock(parsed, lock); err != nil {
		return fmt.Errorf("base image from the lock: %w", err)
	}
	f, err := os.Open(rootfs)
	if err != nil {
		return fmt.Errorf("base image: %w", err)
	}
	defer f.Close()
	logf("importing base image %s", tag)
	return eng.Import(f, tag, []string{
		"ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"LABEL " + engine.Label + "=base",
		"LABEL " + PackagesLabel + "=" + pkgs,
	})
}

// Resolve makes a new lock from the live archive: mmdebstrap resolves s
// against s.Mirror (signatures checked by apt), every .deb it installed is
// hashed and kept in keepDir (named by its sha256, as the input cache
// does), and its pool path and hash are matched against the suite's
// Packages index. The snapshot time is now: Debian's snapshot archive has
// imported everything the live archive serves within about six hours.
func Resolve(ctx context.Context, client *http.Client, s Spec, workDir, keepDir string, now time.Time, logf engine.Logf, out io.Writer) (*debs.Lock, error) {
	if err := os.MkdirAll(workDir, 0o755); err != nil {
		return nil, fmt.Errorf("lock: %w", err)
	}
	dir, err := os.MkdirTemp(workDir, "lock-")
	if err != nil {
		return nil, fmt.Errorf("lock: %w", err)
	}
	defer os.RemoveAll(dir)
	archives := filepath.Join(dir, "archives")
	list := filepath.Join(dir, "packages")
	if err := os.Mkdir(archives, 0o755); err != nil {
		return nil, fmt.Errorf("lock: %w", err)
	}
	logf("resolving %s with %s from %s (mmdebstrap, a few minutes)", strings.Join(s.Packages, ","), s.Suite, s.Mirror)
	if err := mmdebstrap(ctx, s, out,
		"--skip=essential/unlink", "--skip=cleanup/apt/cache",
		"--format=null",
		"--customize-hook=chroot \"$1\" dpkg-query -W -f='${Package} ${Version} ${Architecture}\\n' > "+list,
		"--customize-hook=sync-out /var/cache/apt/archives "+archives,
		s.Suite, "/dev/null", s.Mirror); err != nil {
		return nil, err
	}
	data, err := os.ReadFile(list)
	if err != nil {
		return nil, fmt.Errorf("lock: package list: %w", err)
	}
	type inst struct{ name, version, arch string }
	var installed []inst
	var names []string
	for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
		f := strings.Fields(line)
		if len(f) != 3 {
			return nil, fmt.Errorf("lock: package list line %q", line)
		}
		installed = append(installed, inst{f[0], f[1], f[2]})
		names = append(names, f[0])
	}
	index, err := debs.Index(ctx, client, s.Mirror, s.Suite, "amd64", names)
	if err != nil {
		return nil, fmt.Errorf("lock: %w", err)
	}
	lock := &debs.Lock{Suite: s.Suite, Mirror: s.Mirror, Snapshot: now.UTC().Truncate(time.Second), Include: append([]string(nil), s.Packages...)}
	if err := os.MkdirAll(keepDir, 0o755); err != nil {
		return nil, fmt.Errorf("lock: %w", err)
	}
	for _, p := range installed {
		st, ok := index[p.name]
		if !ok || st.Get("Version") != p.version {
			return nil, fmt.Errorf("lock: %s %s is installed but the %s index has %q", p.name, p.version, s.Suite, st.Get("Version"))
		}
		e := debs.Entry{Name: p.name, Version: p.version, Arch: p.arch, SHA256: st.Get("SHA256"), Path: st.Get("Filename")}
		// apt names a downloaded .deb NAME_VERSION_ARCH with the epoch's
		// colon escaped; the pool leaves the epoch out.
		deb := filepath.Join(archives, p.name+"_"+strings.ReplaceAll(p.version, ":", "%3a")+"_"+p.arch+".deb")
		h, err := sums.HashFile(deb)
		var fi os.FileInfo
		if err == nil {
			fi, err = os.Stat(deb)
		}
		if err != nil {
			return nil, fmt.Errorf("lock: %s: %w", p.name, err)
		}
		sum, size := hex.EncodeToString(h[:]), fi.Size()
		if sum != e.SHA256 {
			return nil, fmt.Errorf("lock: %s: the downloaded .deb has sha256 %s, the index %s", p.name, sum, e.SHA256)
		}
		e.Size = size
		if err := os.Rename(deb, filepath.Join(keepDir, "sha256-"+sum)); err != nil {
			return nil, fmt.Errorf("lock: %w", err)
		}
		lock.Packages = append(lock.Packages, e)
	}
	// Round-trip through the parser: what is written must be what a
	// build accepts.
	return debs.ParseLock(lock.Format())
}

// ParsePackages parses the PackagesLabel value.
func ParsePackages(v string) ([]Package, error) {
	var out []Package
	sc := bufio.NewScanner(strings.NewReader(strings.ReplaceAll(v, ",", "\n")))
	for sc.Scan() {
		name, ver, ok := strings.Cut(sc.Text(), "=")
		if !ok || name == "" || ver == "" {
			return nil, fmt.Errorf("malformed package entry %q", sc.Text())
		}
		out = append(out, Package{Name: name, Version: ver})
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no package list (label %s)", PackagesLabel)
	}
	return out, nil
}
