package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/qubes-go-firewall/qubes-go-firewall/builder/inputs"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/pipeline"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/progress"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/sums"
)

type buildOptions struct {
	source, dist, checksums, cache, goProxy, engine string
	mirror, snapshot                                string
	quiet, json, update                             bool
}

func newBuildCmd() *cobra.Command {
	o := &buildOptions{}
	cmd := &cobra.Command{
		Use:   "build",
		Short: "Build the VM image reproducibly with podman and compare it with checksums/SHA256SUMS",
		Long: `build fetches the pinned inputs (kernel source package, the base image's
locked Debian packages, Go toolchain, Go modules; cached by hash so rebuilds
work offline; Debian files fall back to snapshot.debian.org at the lock's
time), creates the base image from exactly the locked .debs if needed, builds the Containerfile through the podman API (CONTAINER_HOST, the
default socket, or a private podman service it starts and stops), and writes
dist/vmlinuz, dist/initramfs, dist/vmlinux, dist/SHA256SUMS and
dist/buildinfo.json. It then compares the artifacts with the published
checksums: a difference exits with code 3 and names each file and both hashes.
It refuses to start (code 7) when the disk is too full for a build.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runBuild(cmd, o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.source, "source", ".", "repository checkout to build")
	f.StringVar(&o.dist, "dist", "", "output directory (default SOURCE/dist)")
	f.StringVar(&o.checksums, "checksums", "", `published sums to compare with (default SOURCE/checksums/SHA256SUMS; "none" to skip)`)
	f.StringVar(&o.cache, "cache", "", "cache of downloaded inputs (default $XDG_CACHE_HOME/qgfw)")
	f.StringVar(&o.goProxy, "go-proxy", "", "Go module proxy for the toolchain and modules (default: first entry of $GOPROXY, else https://proxy.golang.org)")
	d := pipeline.DefaultSources()
	f.StringVar(&o.mirror, "debian-mirror", d.Mirror, "Debian mirror serving /debian and /debian-security, tried after the cache")
	f.StringVar(&o.snapshot, "snapshot", d.Snapshot, `Debian snapshot archive, tried after the mirror at the lock's time ("" to skip)`)
	f.StringVar(&o.engine, "engine", "podman", "container engine: podman (API bindings) or docker (docker CLI)")
	f.BoolVarP(&o.quiet, "quiet", "q", false, "print only the result (and the tail of the build log on failure)")
	f.BoolVar(&o.json, "json", false, "print the result as JSON")
	f.BoolVar(&o.update, "update-checksums", false, "write the artifacts' sums to the checksums file instead of comparing")
	_ = cmd.RegisterFlagCompletionFunc("engine", cobra.FixedCompletions([]string{"podman", "docker"}, cobra.ShellCompDirectiveNoFileComp))
	_ = cmd.MarkFlagDirname("source")
	_ = cmd.MarkFlagDirname("dist")
	_ = cmd.MarkFlagDirname("cache")
	_ = cmd.MarkFlagFilename("checksums")
	return cmd
}

func runBuild(cmd *cobra.Command, o *buildOptions) error {
	src, err := filepath.Abs(o.source)
	if err != nil {
		return err
	}
	opts := pipeline.Options{
		SourceDir: src,
		DistDir:   o.dist,
		Checksums: o.checksums,
		CacheDir:  o.cache,
		GoProxy:   o.goProxy,
		Pins:      pipeline.DefaultPins(),
		Sources:   pipeline.Sources{Mirror: o.mirror, Snapshot: o.snapshot},
		Engine:    o.engine,
		Log:       cmd.ErrOrStderr(),
		Quiet:     o.quiet,
	}
	// Progress bars only on a terminal, never in --quiet or in a log.
	if f, ok := cmd.ErrOrStderr().(*os.File); ok && !o.quiet {
		opts.Progress = progress.ForFile(f)
	}
	if opts.DistDir == "" {
		opts.DistDir = filepath.Join(src, "dist")
	}
	if opts.Checksums == "" {
		opts.Checksums = filepath.Join(src, "checksums", "SHA256SUMS")
	}
	published := opts.Checksums
	if opts.Checksums == "none" || o.update {
		opts.Checksums = ""
	}
	if opts.CacheDir == "" {
		if opts.CacheDir, err = inputs.DefaultDir(); err != nil {
			return err
		}
	}
	if opts.GoProxy == "" {
		opts.GoProxy = goProxyFromEnv()
	}
	res, err := pipeline.Run(cmd.Context(), opts)
	var nospace *pipeline.NoSpaceError
	if errors.As(err, &nospace) {
		return withCode(exitNoSpace, err)
	}
	var mismatch *pipeline.MismatchError
	if err != nil && !errors.As(err, &mismatch) {
		return err
	}
	if o.update {
		if err := writeChecksums(published, opts.DistDir); err != nil {
			return err
		}
		res.Checksums = published
	}
	printResult(cmd, o, res)
	if mismatch != nil {
		return withCode(exitMismatch, err)
	}
	return nil
}

// writeChecksums replaces the published sums with those of dist.
func writeChecksums(path, dist string) error {
	data, err := os.ReadFile(filepath.Join(dist, "SHA256SUMS"))
	if err != nil {
		return err
	}
	if _, err := sums.Parse(data); err != nil {
		return fmt.Errorf("dist/SHA256SUMS: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return os.WriteFile(path, data, 0o644)
}

func printResult(cmd *cobra.Command, o *buildOptions, res *pipeline.Result) {
	out := cmd.OutOrStdout()
	if o.json {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		_ = enc.Encode(res)
		return
	}
	for _, name := range []string{"vmlinuz", "initramfs"} {
		fmt.Fprintf(out, "%s  %s\n", res.Sums[name], filepath.Join(res.Dist, name))
	}
	fmt.Fprintf(out, "built in %s\n", time.Duration(res.Elapsed*float64(time.Second)).Round(time.Second))
	switch {
	case o.update:
		fmt.Fprintf(out, "updated %s\n", res.Checksums)
	case res.Checksums == "":
		fmt.Fprintln(out, "not compared with published checksums")
	case res.Match:
		fmt.Fprintf(out, "OK: matches %s\n", res.Checksums)
	default:
		fmt.Fprintf(out, "MISMATCH with %s\n", res.Checksums)
	}
}

// goProxyFromEnv returns the first HTTP(S) proxy of $GOPROXY.
func goProxyFromEnv() string {
	for _, p := range strings.FieldsFunc(os.Getenv("GOPROXY"), func(r rune) bool { return r == ',' || r == '|' }) {
		if strings.HasPrefix(p, "https://") || strings.HasPrefix(p, "http://") {
			return p
		}
	}
	return "https://proxy.golang.org"
}
