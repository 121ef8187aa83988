package pipeline

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/qubes-go-firewall/qubes-go-firewall/builder/debs"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/inputs"
)

// prepareContext lays out the build context the Containerfile expects:
//
//	Containerfile
//	inputs/linux-source.deb       pinned Debian kernel source package
//	inputs/go-toolchain.zip       pinned golang.org/toolchain module zip
//	inputs/goproxy-firewall/      offline module proxy for firewall/
//	inputs/goproxy-root/          offline module proxy for cmd/mkinitramfs
//	src/builder/kernel/           kernel config fragment and build script
//	src/firewall/                 the firewall packages /init is built from
//	src/root/                     the root module packages of mkinitramfs
//
// Only the packages a stage builds are copied, so that a change elsewhere
// does not invalidate its cached layers.
func prepareContext(ctx context.Context, cache *inputs.Cache, opts Options, lock *debs.Lock, dir string, info *BuildInfo) error {
	src := opts.SourceDir
	if err := copyFile(filepath.Join(src, "Containerfile"), filepath.Join(dir, "Containerfile")); err != nil {
		return err
	}
	// The kernel source comes from the snapshot at the lock's time too:
	// the security archive keeps only the newest upload.
	deb, err := opts.Sources.fetchDebian(ctx, cache, opts.Pins.LinuxSource, lock.Snapshot)
	if err != nil {
		return err
	}
	if err := linkOrCopy(deb, filepath.Join(dir, "inputs", "linux-source.deb")); err != nil {
		return err
	}
	info.addFile(opts.Sources.file(opts.Pins.LinuxSource, lock.Snapshot))

	proxy := &inputs.GoProxy{Cache: cache, URL: opts.GoProxy}
	tc := opts.Pins.GoToolchain
	zip, err := proxy.Ensure(ctx, &tc, true)
	if err != nil {
		return err
	}
	if err := linkOrCopy(zip, filepath.Join(dir, "inputs", "go-toolchain.zip")); err != nil {
		return err
	}
	info.addModule("toolchain", &tc)

	for _, m := range []struct{ name, modDir, pkg string }{
		{"firewall", filepath.Join(src, "firewall"), "cmd/firewall"},
		{"root", src, "cmd/mkinitramfs"},
	} {
		proxyDir := filepath.Join(dir, "inputs", "goproxy-"+m.name)
		if err := os.MkdirAll(proxyDir, 0o755); err != nil {
			return fmt.Errorf("build context: %w", err)
		}
		mods, local, err := proxy.Offline(ctx, m.modDir, []string{m.pkg}, proxyDir)
		if err != nil {
			return fmt.Errorf("offline Go modules for %s: %w", m.name, err)
		}
		for _, mod := range mods {
			info.addModule(m.name, mod)
		}
		dst := filepath.Join(dir, "src", m.name)
		for _, f := range []string{"go.mod", "go.sum"} {
			if _, err := os.Stat(filepath.Join(m.modDir, f)); err == nil {
				if err := copyFile(filepath.Join(m.modDir, f), filepath.Join(dst, f)); err != nil {
					return err
				}
			}
		}
		for _, rel := range local {
			if err := copyDir(filepath.Join(m.modDir, filepath.FromSlash(rel)), filepath.Join(dst, filepath.FromSlash(rel)), notTest); err != nil {
				return err
			}
		}
	}
	return copyDir(filepath.Join(src, "builder", "kernel"), filepath.Join(dir, "src", "builder", "kernel"), notDoc)
}

// notTest skips Go test files, which no stage builds.
func notTest(name string) bool { return !strings.HasSuffix(name, "_test.go") }

// notDoc skips documentation: editing the kernel's README must not
// invalidate the kernel stage's cached layers (a 10-minute build).
func notDoc(name string) bool { return !strings.HasSuffix(name, ".md") }

// copyDir copies the regular files directly in from (not subdirectories)
// that keep accepts.
func copyDir(from, to string, keep func(name string) bool) error {
	ents, err := os.ReadDir(from)
	if err != nil {
		return fmt.Errorf("build context: %w", err)
	}
	for _, e := range ents {
		n := e.Name()
		if !e.Type().IsRegular() || !keep(n) {
			continue
		}
		if err := copyFile(filepath.Join(from, n), filepath.Join(to, n)); err != nil {
			return err
		}
	}
	return nil
}

// copyFile copies a file with mode 0755 if it is executable, else 0644,
// whatever the umask.
func copyFile(from, to string) error {
	in, err := os.Open(from)
	if err != nil {
		return fmt.Errorf("build context: %w", err)
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return fmt.Errorf("build context: %w", err)
	}
	mode := os.FileMode(0o644)
	if st.Mode()&0o111 != 0 {
		mode = 0o755
	}
	if err := os.MkdirAll(filepath.Dir(to), 0o755); err != nil {
		return fmt.Errorf("build context: %w", err)
	}
	out, err := os.OpenFile(to, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, mode)
	if err != nil {
		return fmt.Errorf("build context: %w", err)
	}
	_, err = io.Copy(out, in)
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(to, mode)
	}
	if err != nil {
		return fmt.Errorf("build context %s: %w", to, err)
	}
	return nil
}

// linkOrCopy hard-links a cached input into the context (they share the
// cache's file system), copying if that fails.
func linkOrCopy(from, to string) error {
	if err := os.MkdirAll(filepath.Dir(to), 0o755); err != nil {
		return fmt.Errorf("build context: %w", err)
	}
	if os.Link(from, to) == nil {
		return nil
	}
	return copyFile(from, to)
}
