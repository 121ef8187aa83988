package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/qubes-go-firewall/qubes-go-firewall/checksums"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/spf13/cobra"

	"github.com/qubes-go-firewall/qubes-go-firewall/builder/regfile"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/salt"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/sign"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/sums"
)

// Layout of checksums/ (see its README).
const (
	keysDir     = "keys"
	releasesDir = "releases"
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
	warn         io.Writer // where --checksums-dir is announced (stderr)
}

// source validates the flags and returns where the sums file, signature
// and key are; defaultSums is the sums file to use when --sums is not
// given (next to the artifacts).
func (o *trustOptions) source(defaultSums func() string) (sign.Sums, error) {
	if o.release != "" {
		if o.sums != "" || o.sig != "" || o.key != "" {
			return sign.Sums{}, errors.New("--release takes the sums file, signature and key from checksums/; do not combine it with --sums, --sig or --key")
		}
		s, _, err := releaseSums(o.checksumsDir, o.release, o.warn)
		return s, err
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

--release vX.Y.Z checks against that release's SHA256SUMS, signature and
key as built into this qgfw (the repository's checksums/ when qgfw was
built), never files found on disk: a download cannot vouch for itself. If
the directory holds a SHA256SUMS of its own, it must be the release's. It
prints the signing key's fingerprint. --checksums-dir DIR replaces the
built-in release data by DIR (laid out like checksums/), and says so.

Exit codes: 0 all good, 3 hash mismatch, 4 bad signature, 5 missing
artifact, 6 malformed sums file, signature or key (or a FIFO, device or
directory where a file belongs), 8 signature or key missing.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			o.trust.warn = cmd.ErrOrStderr()
			src, err := o.sumsSource(args)
			if err != nil {
				return withCode(exitUsage, fmt.Errorf("verify: %w", err))
			}
			var rep *verifyReport
			if o.trust.release != "" {
				// Before any hash: a download's own sums that are not the
				// release's are a signature failure, whatever its files.
				if err := downloadedSums(src, args); err != nil {
					rep = &verifyReport{Sums: src.Path, Files: []fileReport{}, Signature: sigReport{Checked: true, Path: src.Signature, Key: src.Key, BuiltIn: src.FS != nil},
						Verdict: "bad-signature", Error: err.Error(), err: withCode(exitBadSig, fmt.Errorf("verify: %w", err))}
				}
			}
			if rep == nil {
				rep = runVerify(src, args)
			}
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
	f.StringVar(&o.trust.release, "release", "", "verify against the published release vX.Y.Z built into qgfw")
	f.StringVar(&o.trust.checksumsDir, "checksums-dir", "", "OVERRIDE: trust the keys and release sums in this directory instead of those built into qgfw")
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

// releaseSums returns the published sums, signature and key of version:
// from the trust root built into qgfw (package checksums), or, only when
// --checksums-dir names one, from that directory on disk — which then
// decides what is trusted, so it is announced on stderr.
func releaseSums(checksumsDir, version string, warn io.Writer) (sign.Sums, string, error) {
	if !releaseVersion.MatchString(version) {
		return sign.Sums{}, "", fmt.Errorf("release %q: want vMAJOR.MINOR.PATCH", version)
	}
	rel := path.Join(releasesDir, version)
	var fsys fs.FS = checksums.FS
	where := "built into qgfw"
	if checksumsDir != "" {
		if !verifyIsDir(checksumsDir) {
			return sign.Sums{}, "", fmt.Errorf("checksums dir %s: not a directory", checksumsDir)
		}
		fmt.Fprintf(warn, "WARNING: --checksums-dir %s: trusting the keys and release sums in that directory, not those built into qgfw\n", checksumsDir)
		fsys, where = os.DirFS(checksumsDir), checksumsDir
	}
	if st, err := fs.Stat(fsys, rel); err != nil || !st.IsDir() {
		return sign.Sums{}, "", fmt.Errorf("release %s: no directory %s in the release data %s", version, rel, where)
	}
	fp, err := fs.ReadFile(fsys, path.Join(rel, "key"))
	if err != nil {
		return sign.Sums{}, "", fmt.Errorf("release %s: which key signed it: %w", version, err)
	}
	name := strings.TrimSpace(string(fp))
	if !keyFingerprint.MatchString(name) {
		return sign.Sums{}, "", fmt.Errorf("release %s: key %q: want a SHA-256 fingerprint in hex", version, name)
	}
	s := sign.Sums{
		Path:      path.Join(rel, "SHA256SUMS"),
		Signature: path.Join(rel, "SHA256SUMS.sig"),
		Key:       path.Join(keysDir, name+".pub"),
	}
	if checksumsDir == "" {
		s.FS = fsys
	} else {
		// On disk through the checks every user-named file gets.
		for _, p := range []*string{&s.Path, &s.Signature, &s.Key} {
			*p = filepath.Join(checksumsDir, filepath.FromSlash(*p))
		}
	}
	return s, where, nil
}

// keyFingerprint is what a release's key file holds.
var keyFingerprint = regexp.MustCompile(`^[0-9a-f]{64}$`)

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
	Checked     bool   `json:"checked"`  // a key was given
	Verified    bool   `json:"verified"` // and the signature verified with it
	Path        string `json:"path,omitempty"`
	Key         string `json:"key,omitempty"`
	Fingerprint string `json:"key_fingerprint,omitempty"` // SHA-256 of the key's DER SubjectPublicKeyInfo
	BuiltIn     bool   `json:"built_in,omitempty"`        // the release data built into qgfw
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
	rep := &verifyReport{Sums: src.Path, Signature: sigReport{Checked: src.Key != "", Path: src.Signature, Key: src.Key, BuiltIn: src.FS != nil}, Files: []fileReport{}}
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
	if rep.Signature.Checked {
		if rep.Signature.Fingerprint, err = src.KeyFingerprint(); err != nil {
			return fail(err)
		}
	}
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
	case rep.Signature.Verified && rep.Signature.BuiltIn:
		fmt.Fprintf(w, "signature  OK       %s, built into qgfw (key SHA256:%s)\n", rep.Signature.Path, rep.Signature.Fingerprint)
	case rep.Signature.Verified:
		fmt.Fprintf(w, "signature  OK       %s (key %s, SHA256:%s)\n", rep.Signature.Path, rep.Signature.Key, rep.Signature.Fingerprint)
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

// downloadedSums: with --release, a SHA256SUMS that came with the
// download must be the release's own (a hostile download ships sums and a
// key of its own, and those must not pass for the release's).
func downloadedSums(src sign.Sums, args []string) error {
	if len(args) != 1 || !verifyIsDir(args[0]) {
		return nil
	}
	name := filepath.Join(args[0], "SHA256SUMS")
	theirs, err := regfile.ReadBounded(name, sums.MaxSize)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	_, ours, _, err := src.LoadRaw()
	if err != nil {
		return err
	}
	if !bytes.Equal(theirs, ours) {
		return fmt.Errorf("%s is not the release's SHA256SUMS (%s): it is not signed by a release key (%w)", name, src.Path, sign.ErrBadSignature)
	}
	return nil
}
