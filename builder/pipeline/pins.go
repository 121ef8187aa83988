package pipeline

import (
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/base"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/inputs"
)

// Pins are the build's pinned inputs. Changing any of them changes the
// image bytes, so checksums/SHA256SUMS must be regenerated (make checksums).
type Pins struct {
	LinuxSource DebianFile
	GoToolchain inputs.Module // golang.org/toolchain, checked by its h1 hash
	Base        base.Spec
	// BaseLock is the lock file of the base image, relative to the source
	// tree: every package with its version and .deb sha256.
	BaseLock        string
	SourceDateEpoch int64
}

// DefaultPins returns the pins of this source tree.
func DefaultPins() Pins {
	const epoch = 1735689600 // 2025-01-01T00:00:00Z; fixes every embedded time
	return Pins{
		LinuxSource: DebianFile{
			Package: "linux-source-6.1",
			Version: "6.1.192-2",
			Archive: "debian-security",
			Suite:   "bookworm-security",
			Path:    "pool/updates/main/l/linux/linux-source-6.1_6.1.192-2_all.deb",
			SHA256:  "ae95fe63d4c553f8d0e6c86cb1ab566f3894a43743eb19ab585cd97d82f26514",
			RePin: "pick the current version with `apt-cache show linux-source-6.1` (Version, Filename, SHA256) " +
				"and update LinuxSource in builder/pipeline/pins.go, then `make checksums`",
		},
		GoToolchain: inputs.Module{
			Path:    "golang.org/toolchain",
			Version: "v0.0.1-go1.26.8.linux-amd64",
			ZipHash: "h1:ZOmGe1OnfREDMIdb1Qi4G9JSuDPBLGExZMQ4nis1RXM=",
		},
		Base: base.Spec{
			Suite:  "bookworm",
			Mirror: "http://deb.debian.org/debian",
			// What tinyconfig + builder/kernel/qgfw.config needs on top of
			// Debian's essential set: the compiler, objtool's libelf, the
			// Kconfig parser generators, bc for timeconst, xz for the
			// source tarball, unzip for the Go toolchain zip, patch for
			// builder/kernel/*.patch.
			Packages:        []string{"gcc", "libc6-dev", "make", "bc", "bison", "flex", "libelf-dev", "xz-utils", "mawk", "unzip", "patch"},
			SourceDateEpoch: epoch,
		},
		BaseLock:        "builder/pipeline/base.lock",
		SourceDateEpoch: epoch,
	}
}
