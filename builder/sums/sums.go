// Package sums reads, writes, computes and compares SHA256SUMS files in the
// format of `sha256sum` / `sha256sum -c`.
//
// A sums file may come from an untrusted download, so Parse is strict and
// accepts only what the project itself writes, plus the binary-mode marker:
//
//	<64 lower-case hex digits><space><space><name>\n   (text mode, written)
//	<64 lower-case hex digits><space>*<name>\n          (binary mode, read only)
//
// Every line, including the last, ends in "\n" (a missing final newline is
// how a truncated download looks). There are no blank lines or comments, at
// least one entry, and each name occurs once. Names are slash-separated paths
// relative to the directory that holds the artifacts: no leading "/", no "."
// or ".." elements, no empty elements, no backslashes (sha256sum would escape
// them), no spaces, no control characters, valid UTF-8. Entries are kept
// sorted by name; Bytes writes that canonical form.
package sums

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"slices"
	"strings"
	"unicode/utf8"

	"github.com/qubes-go-firewall/qubes-go-firewall/builder/regfile"
)

// MaxSize bounds how much of a sums file is read; a real one is a few lines.
const MaxSize = 1 << 20

// Entry is one line of a sums file.
type Entry struct {
	Name string
	Sum  [32]byte
}

// Hex returns the digest as lower-case hex.
func (e Entry) Hex() string { return hex.EncodeToString(e.Sum[:]) }

// File is a parsed sums file: Entries sorted by Name, names unique.
type File struct {
	Entries []Entry
}

// ParseError says which line of a sums file is wrong and why.
type ParseError struct {
	Line int // 1-based; 0 for whole-file problems
	Msg  string
}

func (e *ParseError) Error() string {
	if e.Line == 0 {
		return "sums file: " + e.Msg
	}
	return fmt.Sprintf("sums file line %d: %s", e.Line, e.Msg)
}

// Parse parses a sums file strictly (see the package comment).
func Parse(data []byte) (*File, error) {
	if len(data) > MaxSize {
		return nil, &ParseError{Msg: fmt.Sprintf("larger than %d bytes", MaxSize)}
	}
	if len(data) == 0 {
		return nil, &ParseError{Msg: "empty"}
	}
	if data[len(data)-1] != '\n' {
		return nil, &ParseError{Line: bytes.Count(data, []byte("\n")) + 1, Msg: "missing final newline (truncated?)"}
	}
	lines := strings.Split(string(data[:len(data)-1]), "\n")
	f := &File{Entries: make([]Entry, 0, len(lines))}
	seen := make(map[string]int, len(lines))
	for i, line := range lines {
		n := i + 1
		e, msg := parseLine(line)
		if msg != "" {
			return nil, &ParseError{Line: n, Msg: msg}
		}
		if first, dup := seen[e.Name]; dup {
			return nil, &ParseError{Line: n, Msg: fmt.Sprintf("duplicate name %q (first on line %d)", e.Name, first)}
		}
		seen[e.Name] = n
		f.Entries = append(f.Entries, e)
	}
	f.sort()
	return f, nil
}

// parseLine returns the entry of one line, or why the line is malformed.
func parseLine(line string) (Entry, string) {
	var e Entry
	if line == "" {
		return e, "empty line"
	}
	if len(line) < 64+2 {
		return e, "too short: want <64 hex digits>, two spaces (or space and '*'), name"
	}
	digest, sep, name := line[:64], line[64:66], line[66:]
	for i := 0; i < len(digest); i++ {
		c := digest[i]
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return e, fmt.Sprintf("bad hex digit %q at column %d (want 64 lower-case hex digits)", c, i+1)
		}
	}
	if sep != "  " && sep != " *" {
		return e, fmt.Sprintf("bad separator %q after the digest (want two spaces or \" *\")", sep)
	}
	if err := CheckName(name); err != nil {
		return e, err.Error()
	}
	if _, err := hex.Decode(e.Sum[:], []byte(digest)); err != nil {
		return e, "bad hex digest" // unreachable after the digit check; kept for safety
	}
	e.Name = name
	return e, ""
}

// CheckName reports whether name is acceptable as an artifact name in a sums
// file: a local, slash-separated path without spaces or control characters.
func CheckName(name string) error {
	switch {
	case name == "":
		return errors.New("empty name")
	case !utf8.ValidString(name):
		return fmt.Errorf("name %q is not valid UTF-8", name)
	case strings.HasPrefix(name, "/"):
		return fmt.Errorf("absolute name %q", name)
	case strings.ContainsRune(name, '\\'):
		return fmt.Errorf("backslash in name %q", name)
	}
	for _, r := range name {
		if r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0) {
			return fmt.Errorf("control character %U in name %q", r, name)
		}
		if r == ' ' || r == utf8.RuneError {
			return fmt.Errorf("space or invalid character in name %q", name)
		}
	}
	if !fs.ValidPath(name) {
		return fmt.Errorf("name %q is not a clean relative path (\"..\", \".\" or empty elements)", name)
	}
	return nil
}

// ReadFile reads at most MaxSize bytes of path and parses them.
func ReadFile(path string) (*File, error) {
	data, err := readBounded(path, MaxSize)
	if err != nil {
		return nil, err
	}
	f, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("read sums %s: %w", path, err)
	}
	return f, nil
}

// readBounded reads a whole file, refusing files larger than limit without
// reading past limit+1 bytes.
func readBounded(path string, limit int64) ([]byte, error) {
	fh, err := regfile.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read sums: %w", err)
	}
	defer fh.Close()
	data, err := io.ReadAll(io.LimitReader(fh, limit+1))
	if err != nil {
		return nil, fmt.Errorf("read sums %s: %w", path, err)
	}
	if int64(len(data)) > limit {
		return nil, fmt.Errorf("read sums %s: %w", path, &ParseError{Msg: fmt.Sprintf("larger than %d bytes", limit)})
	}
	return data, nil
}

// Bytes returns the canonical text form: sorted, text mode, one line each.
func (f *File) Bytes() []byte {
	var b bytes.Buffer
	for _, e := range f.Entries {
		b.WriteString(e.Hex())
		b.WriteString("  ")
		b.WriteString(e.Name)
		b.WriteByte('\n')
	}
	return b.Bytes()
}

// Lookup returns the entry for name. A linear scan: sums files hold a
// handful of entries, and it stays correct for a File built by hand.
func (f *File) Lookup(name string) (Entry, bool) {
	for _, e := range f.Entries {
		if e.Name == name {
			return e, true
		}
	}
	return Entry{}, false
}

// Names returns the entry names in order.
func (f *File) Names() []string {
	names := make([]string, len(f.Entries))
	for i, e := range f.Entries {
		names[i] = e.Name
	}
	return names
}

// New checks entries (names as in CheckName, unique) and returns them as a
// File sorted by name.
func New(entries []Entry) (*File, error) {
	f := &File{Entries: slices.Clone(entries)}
	seen := make(map[string]bool, len(entries))
	for _, e := range f.Entries {
		if err := CheckName(e.Name); err != nil {
			return nil, err
		}
		if seen[e.Name] {
			return nil, fmt.Errorf("duplicate name %q", e.Name)
		}
		seen[e.Name] = true
	}
	f.sort()
	return f, nil
}

func (f *File) sort() {
	slices.SortFunc(f.Entries, func(a, b Entry) int { return strings.Compare(a.Name, b.Name) })
}

// HashFile returns the SHA-256 of a regular file, streaming it. Devices,
// pipes and directories are refused so that a hostile name cannot make the
// reader block or run forever; a file that grows while it is hashed is an
// error rather than a digest of an unknown prefix.
func HashFile(path string) ([32]byte, error) {
	fh, err := regfile.Open(path)
	if err != nil {
		return [32]byte{}, fmt.Errorf("hash: %w", err)
	}
	defer fh.Close()
	return hashOpen(fh, path)
}

func hashOpen(fh *os.File, path string) ([32]byte, error) {
	var sum [32]byte
	st, err := fh.Stat()
	if err != nil {
		return sum, fmt.Errorf("hash %s: %w", path, err)
	}
	if !st.Mode().IsRegular() {
		return sum, fmt.Errorf("hash %s: not a regular file (%s)", path, st.Mode().Type())
	}
	h := sha256.New()
	n, err := io.Copy(h, io.LimitReader(fh, st.Size()+1))
	if err != nil {
		return sum, fmt.Errorf("hash %s: %w", path, err)
	}
	if n != st.Size() {
		return sum, fmt.Errorf("hash %s: size changed while reading (%d bytes, expected %d)", path, n, st.Size())
	}
	h.Sum(sum[:0])
	return sum, nil
}

// Compute hashes the named files under dir. Names are checked with
// CheckName and opened through os.Root, so neither a name nor a symlink in
// dir can reach outside dir.
func Compute(dir string, names []string) (*File, error) {
	root, err := os.OpenRoot(dir)
	if err != nil {
		return nil, fmt.Errorf("compute sums: %w", err)
	}
	defer root.Close()
	f := &File{Entries: make([]Entry, 0, len(names))}
	seen := make(map[string]bool, len(names))
	for _, name := range names {
		if err := CheckName(name); err != nil {
			return nil, fmt.Errorf("compute sums in %s: %w", dir, err)
		}
		if seen[name] {
			return nil, fmt.Errorf("compute sums in %s: duplicate name %q", dir, name)
		}
		seen[name] = true
		sum, err := hashIn(root, dir, name)
		if err != nil {
			return nil, fmt.Errorf("compute sums in %s: %w", dir, err)
		}
		f.Entries = append(f.Entries, Entry{Name: name, Sum: sum})
	}
	f.sort()
	return f, nil
}

// Difference is one name on which two sums files disagree. Want and Got are
// lower-case hex, or "" when the name is absent from that side.
type Difference struct {
	Name      string
	Want, Got string
}

func (d Difference) String() string {
	switch {
	case d.Got == "":
		return d.Name + ": missing (want " + d.Want + ")"
	case d.Want == "":
		return d.Name + ": unexpected (got " + d.Got + ")"
	default:
		return d.Name + ": sha256 " + d.Got + ", want " + d.Want
	}
}

// Compare lists every name whose digest differs, that is missing from got,
// or that is extra in got, sorted by name. Nil means the files agree.
func Compare(want, got *File) []Difference {
	// Work on sorted copies so that a File built by hand compares correctly.
	want = &File{Entries: slices.Clone(want.Entries)}
	got = &File{Entries: slices.Clone(got.Entries)}
	want.sort()
	got.sort()
	var diffs []Difference
	i, j := 0, 0
	for i < len(want.Entries) || j < len(got.Entries) {
		switch {
		case j == len(got.Entries) || i < len(want.Entries) && want.Entries[i].Name < got.Entries[j].Name:
			diffs = append(diffs, Difference{Name: want.Entries[i].Name, Want: want.Entries[i].Hex()})
			i++
		case i == len(want.Entries) || got.Entries[j].Name < want.Entries[i].Name:
			diffs = append(diffs, Difference{Name: got.Entries[j].Name, Got: got.Entries[j].Hex()})
			j++
		default:
			if want.Entries[i].Sum != got.Entries[j].Sum {
				diffs = append(diffs, Difference{Name: want.Entries[i].Name, Want: want.Entries[i].Hex(), Got: got.Entries[j].Hex()})
			}
			i++
			j++
		}
	}
	return diffs
}

// Status is the outcome of checking one artifact.
type Status string

// Check outcomes.
const (
	OK       Status = "ok"
	Mismatch Status = "mismatch"
	Missing  Status = "missing"
	Failed   Status = "error" // unreadable, not a regular file, outside dir, ...
)

// Result is the outcome of checking one entry of a sums file.
type Result struct {
	Name   string
	Status Status
	Want   string // hex from the sums file
	Got    string // hex computed; "" unless the file was hashed
	Err    error  // for Missing and Failed
}

// Check hashes each entry of f under dir (through os.Root, so neither names
// nor symlinks reach outside dir) and reports one Result per entry, in the
// order of f. It does not stop at the first problem.
func Check(dir string, f *File) ([]Result, error) {
	root, err := os.OpenRoot(dir)
	if err != nil {
		return nil, fmt.Errorf("check sums: %w", err)
	}
	defer root.Close()
	results := make([]Result, 0, len(f.Entries))
	for _, e := range f.Entries {
		r := Result{Name: e.Name, Want: e.Hex()}
		sum, err := hashIn(root, dir, e.Name)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			r.Status, r.Err = Missing, err
		case err != nil:
			r.Status, r.Err = Failed, err
		default:
			r.Got = hex.EncodeToString(sum[:])
			r.Status = OK
			if sum != e.Sum {
				r.Status = Mismatch
			}
		}
		results = append(results, r)
	}
	return results, nil
}

func hashIn(root *os.Root, dir, name string) ([32]byte, error) {
	if err := CheckName(name); err != nil {
		return [32]byte{}, err
	}
	fh, err := regfile.OpenIn(root, name)
	if err != nil {
		return [32]byte{}, fmt.Errorf("hash: %w", err)
	}
	defer fh.Close()
	return hashOpen(fh, dir+"/"+name)
}
