package pipeline

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/mod/module"

	"github.com/qubes-go-firewall/qubes-go-firewall/builder/bundle"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/inputs"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/sums"
)

// InputVerifier returns the check `qgfw inputs import` applies to each
// bundle entry: a file must be one the source tree pins (the kernel
// source, a locked base .deb, the Go toolchain, a module of either
// go.sum) and hash to its pin. Nothing else reaches the cache.
func InputVerifier(opts Options) (bundle.Verify, error) {
	lock, err := readLock(opts)
	if err != nil {
		return nil, err
	}
	files := map[string]string{opts.Pins.LinuxSource.SHA256: "the kernel source " + opts.Pins.LinuxSource.Version}
	for _, e := range lock.Packages {
		files[e.SHA256] = "base package " + e.Name + " " + e.Version
	}
	tc := opts.Pins.GoToolchain
	mods := map[module.Version]*inputs.Module{{Path: tc.Path, Version: tc.Version}: &tc}
	for _, dir := range []string{opts.SourceDir, filepath.Join(opts.SourceDir, "firewall")} {
		data, err := os.ReadFile(filepath.Join(dir, "go.sum"))
		if err != nil {
			return nil, fmt.Errorf("inputs: %w", err)
		}
		sums, err := inputs.GoSum(data)
		if err != nil {
			return nil, fmt.Errorf("inputs %s: %w", dir, err)
		}
		for k, m := range sums {
			mods[k] = m
		}
	}
	return func(name, tmp string) error {
		if sha, ok := strings.CutPrefix(name, "files/sha256-"); ok {
			what, ok := files[sha]
			if !ok {
				return fmt.Errorf("no pin of this source tree has sha256 %s", sha)
			}
			h, err := sums.HashFile(tmp)
			if err != nil {
				return err
			}
			if got := fmt.Sprintf("%x", h); got != sha {
				return fmt.Errorf("%s: sha256 %s, pinned %s", what, got, sha)
			}
			return nil
		}
		rest := strings.TrimPrefix(name, "goproxy/")
		escPath, file, ok := strings.Cut(rest, "/@v/")
		if !ok {
			return fmt.Errorf("not a module proxy path")
		}
		ext := filepath.Ext(file)
		p, err1 := module.UnescapePath(escPath)
		v, err2 := module.UnescapeVersion(strings.TrimSuffix(file, ext))
		if err1 != nil || err2 != nil {
			return fmt.Errorf("not a module proxy path")
		}
		m := mods[module.Version{Path: p, Version: v}]
		if m == nil {
			return fmt.Errorf("module %s@%s is in no go.sum of this source tree", p, v)
		}
		switch ext {
		case ".zip":
			if m.ZipHash == "" {
				return fmt.Errorf("go.sum has no hash of the zip of %s@%s", p, v)
			}
			return inputs.CheckZip(tmp, p+"@"+v, m.ZipHash)
		case ".mod":
			if m.ModHash == "" {
				return fmt.Errorf("go.sum has no hash of the go.mod of %s@%s", p, v)
			}
			return inputs.CheckMod(tmp, p+"@"+v, m.ModHash)
		case ".info":
			// Not hashed by go.sum; the go command reads only its
			// Version (and Time, which no output embeds).
			data, err := os.ReadFile(tmp)
			if err != nil {
				return err
			}
			var info struct{ Version string }
			if len(data) > 4096 || json.Unmarshal(data, &info) != nil || info.Version != v {
				return fmt.Errorf("not the .info of %s@%s", p, v)
			}
			return nil
		}
		return fmt.Errorf("not a module proxy file (.info, .mod, .zip)")
	}, nil
}
