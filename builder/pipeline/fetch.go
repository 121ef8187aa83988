package pipeline

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"time"

	"golang.org/x/mod/module"

	"github.com/qubes-go-firewall/qubes-go-firewall/builder/debs"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/inputs"
)

// gather fetches every input a build reads: the build context's (kernel
// source, toolchain, Go modules, laid out in ctxDir) and the locked base
// .debs, whose paths it returns by package name.
func gather(ctx context.Context, cache *inputs.Cache, opts Options, lock *debs.Lock, ctxDir string, info *BuildInfo) (map[string]string, error) {
	if err := prepareContext(ctx, cache, opts, lock, ctxDir, info); err != nil {
		return nil, err
	}
	return fetchLocked(ctx, cache, opts.Sources, lock)
}

// FetchInputs makes every pinned input of the source tree present and
// verified in the cache, as a build would, without a container engine:
// the kernel source, the locked base .debs, the Go toolchain and the Go
// modules of both stages. It returns the cache files a build reads,
// relative to the cache directory and sorted: what `qgfw inputs export`
// bundles.
func FetchInputs(ctx context.Context, opts Options) ([]string, error) {
	lock, _, err := loadLock(&opts)
	if err != nil {
		return nil, err
	}
	logf := func(string, ...any) {}
	if opts.Log != nil {
		logf = newLogger(opts.Log, opts.Quiet, time.Now()).logf
	}
	cache := &inputs.Cache{Dir: opts.CacheDir, Logf: logf, Progress: opts.Progress}
	if err := os.MkdirAll(opts.CacheDir, 0o755); err != nil {
		return nil, fmt.Errorf("inputs: %w", err)
	}
	work, err := os.MkdirTemp(opts.CacheDir, "work-")
	if err != nil {
		return nil, fmt.Errorf("inputs: %w", err)
	}
	defer os.RemoveAll(work)
	ctxDir := filepath.Join(work, "context")
	debPaths, err := gather(ctx, cache, opts, lock, ctxDir, &BuildInfo{Outputs: map[string]string{}})
	if err != nil {
		return nil, err
	}
	set := map[string]bool{}
	add := func(abs string) error {
		rel, err := filepath.Rel(opts.CacheDir, abs)
		if err != nil {
			return err
		}
		set[filepath.ToSlash(rel)] = true
		return nil
	}
	if err := add(cache.FilePath(opts.Pins.LinuxSource.SHA256)); err != nil {
		return nil, err
	}
	for _, p := range debPaths {
		if err := add(p); err != nil {
			return nil, err
		}
	}
	tc, err := inputs.CachePaths(module.Version{Path: opts.Pins.GoToolchain.Path, Version: opts.Pins.GoToolchain.Version})
	if err != nil {
		return nil, err
	}
	for _, ext := range []string{".info", ".zip"} {
		set[tc+ext] = true
	}
	// The stages' offline proxies are copies of cache files, at the same
	// relative paths.
	for _, d := range []string{"goproxy-firewall", "goproxy-root"} {
		root := filepath.Join(ctxDir, "inputs", d)
		err := filepath.WalkDir(root, func(p string, e fs.DirEntry, err error) error {
			if err != nil || e.IsDir() {
				return err
			}
			rel, err := filepath.Rel(root, p)
			if err != nil {
				return err
			}
			set["goproxy/"+filepath.ToSlash(rel)] = true
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("inputs: %w", err)
		}
	}
	out := make([]string, 0, len(set))
	for f := range set {
		out = append(out, f)
	}
	sort.Strings(out)
	return out, nil
}
