package main

import (
	"bufio"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"github.com/qubes-go-firewall/qubes-go-firewall/builder/base"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/bundle"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/debs"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/inputs"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/pipeline"
)

// sourceFlags are the flags every command that reads pinned inputs shares.
type sourceFlags struct {
	source, cache, goProxy, mirror, snapshot string
}

func (s *sourceFlags) register(cmd *cobra.Command) {
	f := cmd.Flags()
	f.StringVar(&s.source, "source", ".", "repository checkout whose pins and lock to use")
	f.StringVar(&s.cache, "cache", "", "cache of downloaded inputs (default $XDG_CACHE_HOME/qgfw)")
	f.StringVar(&s.goProxy, "go-proxy", "", "Go module proxy for the toolchain and modules (default: first entry of $GOPROXY, else https://proxy.golang.org)")
	d := pipeline.DefaultSources()
	f.StringVar(&s.mirror, "debian-mirror", d.Mirror, "Debian mirror serving /debian and /debian-security, tried after the cache")
	f.StringVar(&s.snapshot, "snapshot", d.Snapshot, `Debian snapshot archive, tried after the mirror at the lock's time ("" to skip)`)
	_ = cmd.MarkFlagDirname("source")
	_ = cmd.MarkFlagDirname("cache")
}

// options fills the pipeline options these flags set.
func (s *sourceFlags) options(o *pipeline.Options) error {
	src, err := filepath.Abs(s.source)
	if err != nil {
		return err
	}
	o.SourceDir = src
	o.CacheDir = s.cache
	if o.CacheDir == "" {
		if o.CacheDir, err = inputs.DefaultDir(); err != nil {
			return err
		}
	}
	o.GoProxy = s.goProxy
	if o.GoProxy == "" {
		o.GoProxy = goProxyFromEnv()
	}
	o.Sources = pipeline.Sources{Mirror: s.mirror, Snapshot: s.snapshot}
	o.Pins = pipeline.DefaultPins()
	return nil
}

// fetch runs pipeline.FetchInputs with these flags, logging to the
// command's standard error.
func (s *sourceFlags) fetch(cmd *cobra.Command) (pipeline.Options, []string, error) {
	var o pipeline.Options
	if err := s.options(&o); err != nil {
		return o, nil, err
	}
	o.Log = cmd.ErrOrStderr()
	files, err := pipeline.FetchInputs(cmd.Context(), o)
	return o, files, err
}

func newInputsCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "inputs",
		Short: "Lock, fetch, export and import the build's pinned inputs",
		Long: `inputs manages what a build reads besides the source tree: the kernel source
package, the base image's Debian packages (locked by version and sha256 in
builder/pipeline/base.lock), the Go toolchain and the Go modules. Each comes
from the cache, then the live archive or module proxy, then (Debian files)
Debian's snapshot archive at the lock's time, and is checked against its
sha256 or go.sum hash before use.`,
	}
	cmd.AddCommand(newInputsLockCmd(), newInputsFetchCmd(), newInputsExportCmd(), newInputsImportCmd())
	return cmd
}

func newInputsLockCmd() *cobra.Command {
	var s sourceFlags
	cmd := &cobra.Command{
		Use:   "lock",
		Short: "Resolve the base image again from the live archive and rewrite its lock file",
		Long: `lock runs mmdebstrap against the live Debian archive for the pinned suite and
package names (apt checks the archive's signatures), hashes every .deb it
installed, matches each with the suite's Packages index and rewrites
builder/pipeline/base.lock with every package's version, sha256, size and
pool path, and the snapshot time (now). The .debs go into the cache. Run
` + "`make checksums`" + ` afterwards: new compiler versions change vmlinuz.
Needs root (mmdebstrap) and network.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var o pipeline.Options
			if err := s.options(&o); err != nil {
				return err
			}
			logf := func(format string, args ...any) { fmt.Fprintf(cmd.ErrOrStderr(), format+"\n", args...) }
			spec := o.Pins.Base
			lock, err := base.Resolve(cmd.Context(), http.DefaultClient, spec, o.CacheDir, filepath.Join(o.CacheDir, "files"), time.Now(), logf, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			name := filepath.Join(o.SourceDir, filepath.FromSlash(o.Pins.BaseLock))
			var old *debs.Lock
			if data, err := os.ReadFile(name); err == nil {
				old, _ = debs.ParseLock(data)
			}
			if err := os.WriteFile(name, lock.Format(), 0o644); err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			fmt.Fprintf(out, "wrote %s: %d packages, snapshot %s\n", name, len(lock.Packages), lock.Snapshot.Format(debs.SnapshotFormat))
			if old != nil {
				for _, line := range debs.Diff(old, lock) {
					fmt.Fprintln(out, "  "+line)
				}
			}
			return nil
		},
	}
	s.register(cmd)
	return cmd
}

func newInputsFetchCmd() *cobra.Command {
	var s sourceFlags
	cmd := &cobra.Command{
		Use:   "fetch",
		Short: "Fetch and verify every pinned input into the cache (no container engine)",
		Long: `fetch makes every input a build of the source tree reads present in the cache
and verified, trying the cache, then the live archive or module proxy, then
Debian's snapshot archive, and prints how many files that is. A source whose
bytes do not match the pin is refused and the next one tried.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			o, files, err := s.fetch(cmd)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%d input files present and verified in %s\n", len(files), o.CacheDir)
			return nil
		},
	}
	s.register(cmd)
	return cmd
}

func newInputsExportCmd() *cobra.Command {
	var s sourceFlags
	cmd := &cobra.Command{
		Use:   "export FILE",
		Short: "Write every pinned input, verified, into one tar file",
		Long: `export fetches (as ` + "`qgfw inputs fetch`" + `) and verifies every input a build of
the source tree reads, then writes them into FILE (a tar, "-" for standard
output) at their cache paths. ` + "`qgfw inputs import FILE`" + ` loads it on a machine
without network; keep it next to a release's SHA256SUMS to rebuild it later.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			o, files, err := s.fetch(cmd)
			if err != nil {
				return err
			}
			if args[0] == "-" {
				w := bufio.NewWriterSize(cmd.OutOrStdout(), 1<<20)
				if err := bundle.Export(w, o.CacheDir, files); err != nil {
					return err
				}
				return w.Flush()
			}
			tmp := args[0] + ".tmp"
			f, err := os.Create(tmp)
			if err != nil {
				return err
			}
			defer os.Remove(tmp)
			w := bufio.NewWriterSize(f, 1<<20)
			err = bundle.Export(w, o.CacheDir, files)
			if err == nil {
				err = w.Flush()
			}
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return err
			}
			if err := os.Rename(tmp, args[0]); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "wrote %s: %d input files\n", args[0], len(files))
			return nil
		},
	}
	s.register(cmd)
	return cmd
}

func newInputsImportCmd() *cobra.Command {
	var s sourceFlags
	cmd := &cobra.Command{
		Use:   "import FILE",
		Short: "Check an input bundle against the source tree's pins and load it into the cache",
		Long: `import reads a bundle written by ` + "`qgfw inputs export`" + ` (FILE, "-" for standard
input). Every entry must be an input the source tree pins (the kernel source,
a locked base package, the Go toolchain, a module in go.sum) and match its
sha256 or go.sum hash; the first entry that is not stops the import with an
error naming it, before its bytes reach the cache. Needs no network.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var o pipeline.Options
			if err := s.options(&o); err != nil {
				return err
			}
			verify, err := pipeline.InputVerifier(o)
			if err != nil {
				return err
			}
			in := cmd.InOrStdin()
			if args[0] != "-" {
				f, err := os.Open(args[0])
				if err != nil {
					return err
				}
				defer f.Close()
				in = f
			}
			n, err := bundle.Import(bufio.NewReaderSize(in, 1<<20), o.CacheDir, verify)
			if err != nil {
				return withCode(exitMalformed, err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "imported %d verified input files into %s\n", n, o.CacheDir)
			return nil
		},
	}
	s.register(cmd)
	return cmd
}
