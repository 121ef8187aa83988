package pipeline

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"

	"github.com/qubes-go-firewall/qubes-go-firewall/builder/base"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/engine"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/inputs"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/sums"
)

// BuildInfo records everything the image was built from; it is written
// next to the artifacts as buildinfo.json. It holds no time or host name,
// so two builds of the same tree give the same file.
type BuildInfo struct {
	SourceCommit    string            `json:"source_commit"`
	SourceDirty     bool              `json:"source_dirty"`
	SourceDateEpoch int64             `json:"source_date_epoch"`
	Files           []FileInput       `json:"files"`
	GoModules       []ModuleInput     `json:"go_modules"`
	BaseImage       string            `json:"base_image"`
	BaseSpec        base.Spec         `json:"base_spec"`
	BaseLockSHA256  string            `json:"base_lock_sha256"`
	BasePackages    []base.Package    `json:"base_packages"`
	Tools           map[string]string `json:"tools"`
	Outputs         map[string]string `json:"outputs_sha256"`
}

// FileInput is a pinned download.
type FileInput struct {
	Name   string `json:"name"`
	URL    string `json:"url"`
	SHA256 string `json:"sha256"`
}

// ModuleInput is a Go module zip used by a stage.
type ModuleInput struct {
	Stage   string `json:"stage"`
	Path    string `json:"path"`
	Version string `json:"version"`
	H1      string `json:"h1"`
}

func newBuildInfo(ctx context.Context, opts Options) *BuildInfo {
	info := &BuildInfo{
		SourceDateEpoch: opts.Pins.SourceDateEpoch,
		Tools:           map[string]string{"qgfw-go": runtime.Version()},
		Outputs:         map[string]string{},
	}
	// The commit is informational: a tree without git still builds.
	if out, err := exec.CommandContext(ctx, "git", "-C", opts.SourceDir, "rev-parse", "HEAD").Output(); err == nil {
		info.SourceCommit = strings.TrimSpace(string(out))
		st, _ := exec.CommandContext(ctx, "git", "-C", opts.SourceDir, "status", "--porcelain", "--untracked-files=no").Output()
		info.SourceDirty = len(st) > 0
	}
	return info
}

// addEngine records the container engine's version.
func (b *BuildInfo) addEngine(eng engine.Engine) error {
	pv, err := eng.Version()
	if err != nil {
		return err
	}
	b.Tools[eng.Name()] = pv
	return nil
}

func (b *BuildInfo) addFile(f inputs.File) {
	b.Files = append(b.Files, FileInput{Name: f.Name, URL: f.URL, SHA256: f.SHA256})
}

func (b *BuildInfo) addModule(stage string, m *inputs.Module) {
	b.GoModules = append(b.GoModules, ModuleInput{Stage: stage, Path: m.Path, Version: m.Version, H1: m.ZipHash})
}

func (b *BuildInfo) addOutputs(dist string) error {
	for _, n := range []string{"vmlinuz", "initramfs", "vmlinux"} {
		h, err := sums.HashFile(filepath.Join(dist, n))
		if err != nil {
			return err
		}
		b.Outputs[n] = fmt.Sprintf("%x", h)
	}
	return nil
}

func (b *BuildInfo) write(path string) error {
	data, err := json.MarshalIndent(b, "", "  ")
	if err != nil {
		return fmt.Errorf("buildinfo: %w", err)
	}
	if err := os.WriteFile(path, append(data, '\n'), 0o644); err != nil {
		return fmt.Errorf("buildinfo: %w", err)
	}
	return nil
}
