package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"

	"github.com/spf13/cobra"

	"github.com/qubes-go-firewall/qubes-go-firewall/builder/regfile"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/salt"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/sign"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/sums"
)

// Layout of checksums/ (see its README).
const (
	releaseKeyFile = "release-key.pub"
	releasesDir    = "releases"
)

// releaseVersion is what --release accepts; it also keeps the version from
// naming a path outside checksums/releases/.
var releaseVersion = regexp.MustCompile(`^v[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.]+)?$`)

type verifyOptions struct {
	trust trustOptions
	json  bool
}

// trustOptions are the flags, shared by verify and salt, that say which
// sums file, signature and key vouch for the artifacts.
type trustOptions struct {
	sums         string
	sig          string
	key          string
	release      string
	checksumsDir string
}

// source validates the flags and returns where the sums file, signature
// and key are; defaultSums is the sums file to use when --sums is not
// given (next to the artifacts).
func (o *trustOptions) source(defaultSums func() string) (sign.Sums, error) {
	if o.release != "" {
		if o.sums != "" || o.sig != "" || o.key != "" {
			return sign.Sums{}, errors.New("--release takes the sums file, signature and key from checksums/; do not combine it with --sums, --sig or --key")
		}
		return releaseSums(o.checksumsDir, o.release)
	}
	if o.sig != "" && o.key == "" {
		return sign.Sums{}, errors.New("--sig needs --key: a signature is only worth something against a key you trust")
	}
	s := sign.Sums{Path: o.sums, Signature: o.sig, Key: o.key}
	if s.Path == "" {
		s.Path = defaultSums()
	}
	if s.Key != "" && s.Signature == "" {
		s.Signature = s.Path + ".sig"
	}
	return s, nil
}

func newVerifyCmd() *cobra.Command {
	o := &verifyOptions{}
	cmd := &cobra.Command{
		Use:   "verify [--release vX.Y.Z | --sums SHA256SUMS [--key PUB [--sig SIG]]] DIR | FILE...",
		Short: "Check artifacts against a (signed) SHA256SUMS file, offline",
		Long: `verify first checks the signature of the SHA256SUMS file (when a key is given
or --release is used), then the SHA-256 of every artifact, and prints one line
per file and a verdict.

With a directory, every file listed in SHA256SUMS must be in it. With files,
each is looked up by its base name. --sums defaults to SHA256SUMS next to the
artifacts, --sig to the sums file with ".sig" appended.

--release vX.Y.Z takes SHA256SUMS and SHA256SUMS.sig from
checksums/releases/vX.Y.Z/ and the key from checksums/` + releaseKeyFile + `;
checksums/ is looked up from the working directory upwards unless
--checksums-dir names it.

Exit codes: 0 all good, 3 hash mismatch, 4 bad signature, 5 missing file,
6 malformed sums file, signature or key.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			src, err := o.sumsSource(args)
			if err != nil {
				return withCode(exitUsage, fmt.Errorf("verify: %w", err))
			}
			rep := runVerify(src, args)
			if o.json {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				if err := enc.Encode(rep); err != nil {
					return err
				}
			} else {
				rep.writeText(cmd.OutOrStdout())
			}
			return rep.err
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.trust.sums, "sums", "", "SHA256SUMS file (default: next to the artifacts)")
	f.StringVar(&o.trust.sig, "sig", "", "detached signature of the sums file (default: SUMS.sig; needs --key)")
	f.StringVar(&o.trust.key, "key", "", "public key (PEM) that must have signed the sums file")
	f.StringVar(&o.trust.release, "release", "", "verify against the published release vX.Y.Z in checksums/")
	f.StringVar(&o.trust.checksumsDir, "checksums-dir", "", "the repository's checksums/ directory (default: found from the working directory upwards)")
	f.BoolVar(&o.json, "json", false, "print the report as JSON")
	return cmd
}

// sumsSource says where the sums file, signature and key are; without
// --sums, next to the artifacts in args.
func (o *verifyOptions) sumsSource(args []string) (sign.Sums, error) {
	if o.trust.release != "" && len(args) == 0 {
		return sign.Sums{}, errors.New("--release needs the directory or files holding the downloaded artifacts")
	}
	return o.trust.source(func() string {
		dir := "."
		if len(args) == 1 && verifyIsDir(args[0]) {
			dir = args[0]
		} else if len(args) > 0 {
			dir = filepath.Dir(args[0])
		}
		return filepath.Join(dir, "SHA256SUMS")
	})
}

// releaseSums returns the published sums, signature and key of version.
func releaseSums(checksumsDir, version string) (sign.Sums, error) {
	if !releaseVersion.MatchString(version) {
		return sign.Sums{}, fmt.Errorf("release %q: want vMAJOR.MINOR.PATCH", version)
	}
	dir, err := findChecksumsDir(checksumsDir)
	if err != nil {
		return sign.Sums{}, err
	}
	rel := filepath.Join(dir, releasesDir, version)
	if !verifyIsDir(rel) {
		return sign.Sums{}, fmt.Errorf("release %s: no directory %s", version, rel)
	}
	return sign.Sums{
		Path:      filepath.Join(rel, "SHA256SUMS"),
		Signature: filepath.Join(rel, "SHA256SUMS.sig"),
		Key:       filepath.Join(dir, releaseKeyFile),
	}, nil
}

// findChecksumsDir returns dir if given, else the first checksums/ holding
// the release key in the working directory or one of its parents.
func findChecksumsDir(dir string) (string, error) {
	if dir != "" {
		if !verifyIsDir(dir) {
			return "", fmt.Errorf("checksums dir %s: not a directory", dir)
		}
		return dir, nil
	}
	wd, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("find checksums dir: %w", err)
	}
	for d := wd; ; d = filepath.Dir(d) {
		c := filepath.Join(d, "checksums")
		if _, err := os.Stat(filepath.Join(c, releaseKeyFile)); err == nil {
			return c, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("no checksums/%s in %s or its parents; use --checksums-dir", releaseKeyFile, wd)
		}
	}
}

func verifyIsDir(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.IsDir()
}

// verifyReport is what verify prints (as text or JSON).
type verifyReport struct {
	Sums      string       `json:"sums"`
	Signature sigReport    `json:"signature"`
	Files     []fileReport `json:"files"`
	Verdict   string       `json:"verdict"` // ok, mismatch, missing, bad-signature, malformed, error
	Error     string       `json:"error,omitempty"`
	err       error
}

type sigReport struct {
	Checked  bool   `json:"checked"`  // a key was given
	Verified bool   `json:"verified"` // and the signature verified with it
	Path     string `json:"path,omitempty"`
	Key      string `json:"key,omitempty"`
}

type fileReport struct {
	Name   string `json:"name"`
	Path   string `json:"path"`
	Status string `json:"status"` // ok, mismatch, missing, error
	Want   string `json:"want,omitempty"`
	Got    string `json:"got,omitempty"`
	Error  string `json:"error,omitempty"`
}

// runVerify checks the signature (if any), then every artifact.
func runVerify(src sign.Sums, args []string) *verifyReport {
	rep := &verifyReport{Sums: src.Path, Signature: sigReport{Checked: src.Key != "", Path: src.Signature, Key: src.Key}, Files: []fileReport{}}
	fail := func(err error) *verifyReport {
		code := trustExitCode(err)
		rep.Verdict = map[int]string{exitBadSig: "bad-signature", exitMalformed: "malformed", exitMissingFile: "missing", exitNoSignature: "no-signature"}[code]
		if rep.Verdict == "" {
			rep.Verdict = "error"
		}
		rep.Error = err.Error()
		rep.err = withCode(code, fmt.Errorf("verify: %w", err))
		return rep
	}
	f, err := src.Load()
	if err != nil {
		return fail(err)
	}
	rep.Signature.Verified = rep.Signature.Checked
	results, err := checkArtifacts(f, args, filepath.Dir(src.Path))
	if err != nil {
		return fail(err)
	}
	counts := map[sums.Status]int{}
	for _, r := range results {
		counts[r.Status]++
		fr := fileReport{Name: r.Name, Path: r.path, Status: string(r.Status), Want: r.Want, Got: r.Got}
		if r.Err != nil {
			fr.Error = r.Err.Error()
		}
		rep.Files = append(rep.Files, fr)
	}
	switch {
	case counts[sums.Mismatch] > 0:
		rep.Verdict = "mismatch"
		rep.err = withCode(exitMismatch, fmt.Errorf("verify: %d of %d files do not match %s", counts[sums.Mismatch], len(results), src.Path))
	case counts[sums.Missing] > 0:
		rep.Verdict = "missing"
		rep.err = withCode(exitMissingFile, fmt.Errorf("verify: %d of %d files listed in %s are missing", counts[sums.Missing], len(results), src.Path))
	case counts[sums.Failed] > 0:
		rep.Verdict = "error"
		code := exitFailure
		for _, r := range results {
			if r.Status == sums.Failed && errors.Is(r.Err, regfile.ErrNotRegular) {
				code, rep.Verdict = exitMalformed, "malformed" // a FIFO, device or directory where a file belongs
			}
		}
		rep.err = withCode(code, fmt.Errorf("verify: %d of %d files could not be checked", counts[sums.Failed], len(results)))
	default:
		rep.Verdict = "ok"
	}
	if rep.err != nil {
		rep.Error = rep.err.Error()
	}
	return rep
}

type artifactResult struct {
	sums.Result
	path string
}

// checkArtifacts checks a directory (every entry of f) or the given files
// (each by base name; one not listed in f is a mismatch). With no arguments
// the directory of the sums file is checked.
func checkArtifacts(f *sums.File, args []string, sumsDir string) ([]artifactResult, error) {
	if len(args) == 0 {
		args = []string{sumsDir}
	}
	if len(args) == 1 && verifyIsDir(args[0]) {
		res, err := sums.Check(args[0], f)
		if err != nil {
			return nil, err
		}
		out := make([]artifactResult, len(res))
		for i, r := range res {
			out[i] = artifactResult{r, filepath.Join(args[0], r.Name)}
		}
		return out, nil
	}
	var out []artifactResult
	for _, p := range args {
		name := filepath.Base(p)
		r := artifactResult{sums.Result{Name: name}, p}
		e, listed := f.Lookup(name)
		sum, err := sums.HashFile(p)
		switch {
		case !listed:
			r.Status, r.Err = sums.Mismatch, fmt.Errorf("%s is not listed in the sums file", name)
		case errors.Is(err, fs.ErrNotExist):
			r.Status, r.Err = sums.Missing, err
		case err != nil:
			r.Status, r.Err = sums.Failed, err
		default:
			r.Want, r.Got = e.Hex(), sums.Entry{Sum: sum}.Hex()
			r.Status = sums.OK
			if sum != e.Sum {
				r.Status = sums.Mismatch
			}
		}
		if listed {
			r.Want = e.Hex()
		}
		out = append(out, r)
	}
	return out, nil
}

func (rep *verifyReport) writeText(w io.Writer) {
	switch {
	case !rep.Signature.Checked:
		fmt.Fprintf(w, "signature  NOT CHECKED (no --key): %s proves nothing on its own\n", rep.Sums)
	case rep.Signature.Verified:
		fmt.Fprintf(w, "signature  OK       %s (key %s)\n", rep.Signature.Path, rep.Signature.Key)
	case rep.Verdict == "bad-signature":
		fmt.Fprintf(w, "signature  BAD      %s (key %s)\n", rep.Signature.Path, rep.Signature.Key)
	default:
		fmt.Fprintf(w, "signature  NOT VERIFIED: %s\n", rep.Error)
	}
	for _, f := range rep.Files {
		switch f.Status {
		case "ok":
			fmt.Fprintf(w, "ok         %s\n", f.Path)
		case "mismatch":
			if f.Got == "" {
				fmt.Fprintf(w, "MISMATCH   %s: %s\n", f.Path, f.Error)
			} else {
				fmt.Fprintf(w, "MISMATCH   %s: sha256 %s, want %s\n", f.Path, f.Got, f.Want)
			}
		case "missing":
			fmt.Fprintf(w, "MISSING    %s\n", f.Path)
		default:
			fmt.Fprintf(w, "ERROR      %s: %s\n", f.Path, f.Error)
		}
	}
	if rep.Verdict == "ok" {
		how := "signature checked"
		if !rep.Signature.Checked {
			how = "signature NOT checked"
		}
		fmt.Fprintf(w, "verdict    OK: %d files match %s (%s)\n", len(rep.Files), rep.Sums, how)
		return
	}
	fmt.Fprintf(w, "verdict    FAILED (%s)\n", rep.Verdict)
}

// trustExitCode maps errors from builder/sign, builder/sums and builder/salt
// to exit codes.
func trustExitCode(err error) int {
	var pe *sums.ParseError
	switch {
	case errors.Is(err, sign.ErrBadSignature):
		return exitBadSig
	case errors.Is(err, sign.ErrNoSignature):
		return exitNoSignature
	case errors.Is(err, salt.ErrMismatch):
		return exitMismatch
	case errors.Is(err, sign.ErrMalformed), errors.Is(err, sign.ErrKeyType), errors.As(err, &pe), errors.Is(err, regfile.ErrNotRegular):
		return exitMalformed
	case errors.Is(err, fs.ErrNotExist):
		return exitMissingFile
	default:
		return exitFailure
	}
}
