package pipeline

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Space a build needs, measured from a cold build (see the Makefile's
// repro target): the image store holds the base image, the kernel source
// unpacked next to its objects, and the Go toolchain; the work directory
// holds the build context (kernel source package, toolchain zip).
// A local podman service also unpacks the build context (about 250 MB)
// in its temporary directory: $TMPDIR, else /var/tmp.
const (
	needImageStore = 4 << 30
	needWorkDir    = 1 << 30
	needEngineTmp  = 1 << 30
)

func engineTmp() string {
	if d := os.Getenv("TMPDIR"); d != "" {
		return d
	}
	return "/var/tmp"
}

// NoSpaceError says where a build lacks disk space and how to get it.
type NoSpaceError struct {
	Path       string
	Need, Have uint64
	Hint       string
}

func (e *NoSpaceError) Error() string {
	return fmt.Sprintf("not enough free disk space in %s: the build needs %.1f GiB, %.1f GiB are free; %s",
		e.Path, gib(e.Need), gib(e.Have), e.Hint)
}

func gib(n uint64) float64 { return float64(n) / (1 << 30) }

// checkSpace returns a NoSpaceError if the file system holding path has
// less than need bytes available.
func checkSpace(path string, need uint64, hint string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return fmt.Errorf("free space of %s: %w", path, err)
	}
	have := st.Bavail * uint64(st.Bsize)
	if have < need {
		return &NoSpaceError{Path: path, Need: need, Have: have, Hint: hint}
	}
	return nil
}
