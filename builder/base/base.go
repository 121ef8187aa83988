// Package base creates the build's base image from the Debian archive with
// mmdebstrap (used where no registry image pinned by digest can be pulled)
// and imports it into podman, once per set of inputs.
package base

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/qubes-go-firewall/qubes-go-firewall/builder/engine"
)

// Spec is everything that determines the base image's contents.
type Spec struct {
	Suite           string   `json:"suite"`    // e.g. bookworm
	Mirror          string   `json:"mirror"`   // e.g. http://deb.debian.org/debian
	Packages        []string `json:"packages"` // installed on top of the essential set
	SourceDateEpoch int64    `json:"source_date_epoch"`
}

// PackagesLabel holds "name=version,..." of every installed package.
const PackagesLabel = "org.qubes-go-firewall.packages"

// Tag names the image by the hash of the spec, so a changed spec builds a
// new base and an unchanged one is reused.
func (s Spec) Tag() string {
	pk := append([]string(nil), s.Packages...)
	sort.Strings(pk)
	h := sha256.Sum256([]byte(strings.Join([]string{"v1", s.Suite, s.Mirror, strings.Join(pk, ","), strconv.FormatInt(s.SourceDateEpoch, 10)}, "\n")))
	return "localhost/qgfw-base:" + hex.EncodeToString(h[:8])
}

// Package is one installed Debian package.
type Package struct {
	Name    string `json:"name"`
	Version string `json:"version"`
}

// Ensure returns the base image's tag and installed packages, creating and
// importing it if the image store does not have it. workDir holds the
// temporary root file system tarball.
func Ensure(ctx context.Context, eng engine.Engine, s Spec, workDir string, logf engine.Logf, out io.Writer) (string, []Package, error) {
	tag := s.Tag()
	ok, err := eng.ImageExists(tag)
	if err != nil {
		return "", nil, err
	}
	if !ok {
		if err := create(ctx, eng, s, tag, workDir, logf, out); err != nil {
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
	return tag, pkgs, nil
}

func create(ctx context.Context, eng engine.Engine, s Spec, tag, workDir string, logf engine.Logf, out io.Writer) error {
	bin, err := exec.LookPath("mmdebstrap")
	if err != nil {
		return fmt.Errorf("base image %s is not built yet and mmdebstrap is missing (apt-get install mmdebstrap): %w", tag, err)
	}
	if err := os.MkdirAll(workDir, 0o755); err != nil {
		return fmt.Errorf("base image: %w", err)
	}
	dir, err := os.MkdirTemp(workDir, "base-")
	if err != nil {
		return fmt.Errorf("base image: %w", err)
	}
	defer os.RemoveAll(dir)
	rootfs := filepath.Join(dir, "rootfs.tar")
	list := filepath.Join(dir, "packages")
	logf("creating base image %s from %s %s with mmdebstrap (a few minutes, once)", tag, s.Mirror, s.Suite)
	// mmdebstrap's tar output is reproducible for a fixed
	// SOURCE_DATE_EPOCH and package set.
	cmd := exec.CommandContext(ctx, bin,
		"--variant=essential",
		"--include="+strings.Join(s.Packages, ","),
		"--format=tar",
		"--customize-hook=chroot \"$1\" dpkg-query -W -f='${Package}=${Version}\\n' > "+list,
		s.Suite, rootfs, s.Mirror)
	cmd.Env = append(os.Environ(), "SOURCE_DATE_EPOCH="+strconv.FormatInt(s.SourceDateEpoch, 10), "LC_ALL=C.UTF-8")
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("mmdebstrap %s: %w", s.Suite, err)
	}
	data, err := os.ReadFile(list)
	if err != nil {
		return fmt.Errorf("base image package list: %w", err)
	}
	pkgs := strings.Join(strings.Fields(string(data)), ",")
	if _, err := ParsePackages(pkgs); err != nil {
		return fmt.Errorf("base image package list: %w", err)
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
