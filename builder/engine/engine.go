// Package engine defines what the image build needs from a container
// engine; builder/podman (API bindings) and builder/docker (docker CLI)
// implement it.
package engine

import (
	"io"
	"time"
)

// Label marks every image the builder creates (inherited by build stages
// and intermediate layers), so that cleaning touches nothing else.
const Label = "org.qubes-go-firewall.builder"

// Ulimits are set for every build: engines' defaults (nofile 1048576)
// exceed what unprivileged or nested hosts may set, and the build needs no
// more than this.
func Ulimits() []string { return []string{"nofile=1024:1024", "nproc=4096:4096"} }

// Logf reports progress; tests pass t.Logf.
type Logf func(format string, args ...any)

// BuildRequest is one image build. The build has no network, uses cached
// layers, removes its intermediate containers and never pulls.
type BuildRequest struct {
	ContextDir string
	File       string // Containerfile path inside ContextDir
	Tag        string
	Target     string // stage to stop at; "" builds the last stage
	Args       map[string]string
	Epoch      time.Time // created-time of the image metadata
	Out        io.Writer // build log
}

// Engine is a container engine.
type Engine interface {
	Name() string
	Version() (string, error)
	GraphRoot() (string, error) // where images and containers are stored
	ImageExists(name string) (bool, error)
	ImageLabels(name string) (map[string]string, error)
	// Import creates image ref from a root file system tarball; changes
	// are Containerfile instructions (ENV, LABEL).
	Import(rootfs io.Reader, ref string, changes []string) error
	Build(BuildRequest) (id string, err error)
	// ExportDir writes a tar stream of dir in image to w.
	ExportDir(image, dir string, w io.Writer) error
	RemoveImage(name string) error // a missing image is no error
	PruneDangling() (int, error)   // untagged images carrying Label
	RemoveAll() (int, error)       // every image carrying Label
	Close() error
}
