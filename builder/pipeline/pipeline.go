// Package pipeline builds the firewall VM image: it fetches the pinned
// inputs, prepares an offline build context, builds the Containerfile with
// podman, copies the artifacts into dist/ and compares their hashes with
// the published checksums.
package pipeline

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/qubes-go-firewall/qubes-go-firewall/builder/base"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/docker"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/engine"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/inputs"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/podman"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/progress"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/sums"
)

// Artifacts are what SHA256SUMS lists: what dom0 installs.
var artifacts = []string{"initramfs", "vmlinuz"}

// Image tags the builder keeps between builds; stage tags keep the stages'
// layers out of the dangling-image cleanup so warm builds reuse them.
const (
	imageTag     = "localhost/qgfw-image:latest"
	kernelTag    = "localhost/qgfw-cache:kernel"
	toolchainTag = "localhost/qgfw-cache:toolchain"
)

// Options configure one build.
type Options struct {
	SourceDir string  // the repository checkout
	DistDir   string  // where the artifacts go
	Checksums string  // published SHA256SUMS to compare with ("" = none)
	CacheDir  string  // downloaded inputs and work files
	GoProxy   string  // module proxy URL for the toolchain and modules
	Sources   Sources // where pinned Debian files come from after the cache
	Pins      Pins
	Engine    string    // "podman" (API bindings) or "docker" (docker CLI)
	Log       io.Writer // progress and build output
	Quiet     bool      // only errors (the tail of the build log on failure)
	// Progress draws how far long hashing and downloading steps got (on
	// a terminal; nil draws nothing).
	Progress *progress.Meter
}

// Result describes a finished build.
type Result struct {
	Dist        string            `json:"dist"`
	Sums        map[string]string `json:"sha256"`
	Checksums   string            `json:"checksums,omitempty"`
	Match       bool              `json:"match"`
	Differences []sums.Difference `json:"differences,omitempty"`
	Elapsed     float64           `json:"elapsed_seconds"`
	BuildInfo   *BuildInfo        `json:"-"`
}

// MismatchError is returned when the artifacts differ from the checksums.
type MismatchError struct{ Differences []sums.Difference }

func (e *MismatchError) Error() string {
	msg := "the image differs from the published checksums:"
	for _, d := range e.Differences {
		msg += "\n  " + d.String()
	}
	return msg
}

// Run builds the image. A mismatch with opts.Checksums returns the result
// and a *MismatchError; lack of disk space a *NoSpaceError.
func Run(ctx context.Context, opts Options) (*Result, error) {
	start := time.Now()
	lg := newLogger(opts.Log, opts.Quiet, start)
	defer lg.flush()
	for _, p := range []string{"Containerfile", "go.mod", "firewall/go.mod", "builder/kernel/build.sh"} {
		if _, err := os.Stat(filepath.Join(opts.SourceDir, p)); err != nil {
			return nil, fmt.Errorf("source tree %s: %w", opts.SourceDir, err)
		}
	}
	for _, d := range []string{opts.CacheDir, opts.DistDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("build: %w", err)
		}
	}
	// A failed build must not leave the sums of an earlier one behind.
	for _, n := range []string{"SHA256SUMS", "buildinfo.json"} {
		if err := os.Remove(filepath.Join(opts.DistDir, n)); err != nil && !os.IsNotExist(err) {
			return nil, fmt.Errorf("build: %w", err)
		}
	}
	// The lock is checked before anything else runs: a lock made for
	// other packages, or unreadable, stops the build here.
	lock, spec, err := loadLock(&opts)
	if err != nil {
		return nil, err
	}
	if err := checkSpace(opts.CacheDir, needWorkDir, "free space there or point XDG_CACHE_HOME at a larger file system"); err != nil {
		return nil, err
	}

	// Every input is fetched and verified before the engine is even
	// contacted: a changed or superseded pin stops the build before any
	// container runs.
	info := newBuildInfo(ctx, opts)
	info.BaseSpec, info.BaseLockSHA256 = spec, spec.LockSHA256
	lg.step("fetching pinned inputs")
	work, err := os.MkdirTemp(opts.CacheDir, "work-")
	if err != nil {
		return nil, fmt.Errorf("build: %w", err)
	}
	defer os.RemoveAll(work)
	cache := &inputs.Cache{Dir: opts.CacheDir, Logf: lg.logf, Progress: opts.Progress}
	ctxDir := filepath.Join(work, "context")
	debPaths, err := gather(ctx, cache, opts, lock, ctxDir, info)
	if err != nil {
		return nil, err
	}

	lg.step("connecting to " + opts.Engine)
	svc, err := Connect(ctx, opts.Engine, lg.logf)
	if err != nil {
		return nil, err
	}
	defer svc.Close()
	graph, err := svc.GraphRoot()
	if err != nil {
		return nil, err
	}
	if err := checkSpace(graph, needImageStore, "free space there ("+svc.Name()+" system prune, qgfw clean) or move the engine's storage (graphroot in storage.conf, data-root for docker) to a larger file system"); err != nil {
		return nil, err
	}
	if svc.Name() == "podman" {
		if err := checkSpace(engineTmp(), needEngineTmp, "podman unpacks the build context there; free space or point TMPDIR at a larger file system"); err != nil {
			return nil, err
		}
	}
	if err := info.addEngine(svc); err != nil {
		return nil, err
	}

	lg.step("base image")
	baseTag, pkgs, err := base.Ensure(ctx, svc, spec, lock, debPaths, work, lg.logf, lg.output())
	if err != nil {
		return nil, err
	}
	info.BaseImage, info.BasePackages = baseTag, pkgs

	// Stale stages and failed builds' layers go, whatever happens.
	defer func() {
		if n, err := svc.PruneDangling(); err != nil {
			lg.logf("warning: %v", err)
		} else if n > 0 {
			lg.logf("removed %d dangling build images", n)
		}
	}()
	if err := buildStages(svc, opts, ctxDir, baseTag, lg); err != nil {
		return nil, err
	}
	lg.step("copying artifacts to " + opts.DistDir)
	if err := collect(svc, filepath.Join(work, "out"), opts.DistDir, lg.logf); err != nil {
		return nil, err
	}
	got, err := sums.Compute(opts.DistDir, artifacts)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(opts.DistDir, "SHA256SUMS"), got.Bytes(), 0o644); err != nil {
		return nil, fmt.Errorf("write SHA256SUMS: %w", err)
	}
	if err := info.addOutputs(opts.DistDir); err != nil {
		return nil, err
	}
	if err := info.write(filepath.Join(opts.DistDir, "buildinfo.json")); err != nil {
		return nil, err
	}

	res := &Result{Dist: opts.DistDir, Sums: map[string]string{}, Checksums: opts.Checksums, Match: true, BuildInfo: info}
	for _, e := range got.Entries {
		res.Sums[e.Name] = e.Hex()
	}
	res.Elapsed = time.Since(start).Seconds()
	if opts.Checksums == "" {
		return res, nil
	}
	want, err := sums.ReadFile(opts.Checksums)
	if err != nil {
		return res, fmt.Errorf("published checksums: %w", err)
	}
	if res.Differences = sums.Compare(want, got); len(res.Differences) > 0 {
		res.Match = false
		return res, &MismatchError{Differences: res.Differences}
	}
	lg.step("done")
	return res, nil
}

// buildStages builds the kernel and toolchain stages under tags of their
// own (keeping their layers for the next build), then the image.
func buildStages(eng engine.Engine, opts Options, ctxDir, baseTag string, lg *logger) error {
	args := map[string]string{
		"BASE":              baseTag,
		"SOURCE_DATE_EPOCH": strconv.FormatInt(opts.Pins.SourceDateEpoch, 10),
		"GO_TOOLCHAIN":      opts.Pins.GoToolchain.Version,
	}
	for _, st := range []struct{ target, tag, what string }{
		{"kernel", kernelTag, "kernel stage (a few minutes when the kernel inputs changed)"},
		{"toolchain", toolchainTag, "Go toolchain stage"},
		{"", imageTag, "firewall, initramfs and image"},
	} {
		lg.step("building " + st.what)
		if _, err := eng.Build(engine.BuildRequest{
			ContextDir: ctxDir, File: "Containerfile", Tag: st.tag, Target: st.target,
			Args: args, Epoch: time.Unix(opts.Pins.SourceDateEpoch, 0), Out: lg.output(),
		}); err != nil {
			return fmt.Errorf("%w%s", err, lg.tail())
		}
	}
	return nil
}

// collect copies the image's artifacts into dist (through tmp, so that a
// failure leaves no half-written artifact) and removes the image.
func collect(eng engine.Engine, tmp, dist string, logf func(string, ...any)) error {
	if err := os.Mkdir(tmp, 0o755); err != nil {
		return fmt.Errorf("build: %w", err)
	}
	if err := exportArtifacts(eng, imageTag, tmp); err != nil {
		return err
	}
	// Housekeeping only: the artifacts are out. Podman 4.3 sometimes still
	// counts the just-removed export container as a user of the image
	// ("does not exist in database"); the next build replaces the tag and
	// `qgfw clean` removes it, so a failure here must not fail the build.
	if err := eng.RemoveImage(imageTag); err != nil {
		logf("warning: %v (left for the next build or `qgfw clean`)", err)
	}
	for _, name := range append([]string{"vmlinux"}, artifacts...) {
		if err := moveFile(filepath.Join(tmp, name), filepath.Join(dist, name)); err != nil {
			return fmt.Errorf("build output %s: %w", name, err)
		}
	}
	return nil
}

// Connect returns the named engine: "podman" through its API (starting a
// private service if none answers) or "docker" through its CLI.
func Connect(ctx context.Context, name string, logf engine.Logf) (engine.Engine, error) {
	switch name {
	case "", "podman":
		return podman.Connect(ctx, logf)
	case "docker":
		return docker.Connect(ctx)
	}
	return nil, fmt.Errorf("unknown container engine %q (podman or docker)", name)
}

// exportArtifacts copies the files under /out of image into dir.
func exportArtifacts(eng engine.Engine, image, dir string) error {
	pr, pw := io.Pipe()
	go func() { pw.CloseWithError(eng.ExportDir(image, "/out", pw)) }()
	_, err := untarFlat(pr, dir)
	pr.CloseWithError(err) // unblocks the export if untar stopped early
	return err
}

// moveFile renames, or copies across file systems.
func moveFile(from, to string) error {
	if err := os.Rename(from, to); err == nil {
		return nil
	}
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	o, err := os.Create(to)
	if err != nil {
		return err
	}
	_, err = io.Copy(o, in)
	if cerr := o.Close(); err == nil {
		err = cerr
	}
	return errors.Join(err, os.Remove(from))
}
