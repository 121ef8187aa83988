// Package bundle writes and reads an input bundle: one tar file holding
// cache files of the build's pinned inputs at their cache-relative paths
// (files/sha256-…, goproxy/…), so that a machine without network can
// build, and a release's inputs can be archived next to its sums.
//
// A bundle is untrusted: Import checks each entry's name and size, hands
// its bytes to a verifier that knows the pins before anything reaches
// the cache, and refuses what the verifier does not know.
package bundle

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"
)

// Limits on what Import reads: the build's inputs are about 250 files
// and 300 MB, the kernel source .deb the largest at about 140 MB.
const (
	MaxEntries   = 20000
	MaxEntrySize = 1 << 30
	MaxTotal     = 8 << 30
)

// manifestName is the bundle's first entry: a line saying what it is.
const manifestName = "QGFW-INPUTS"

// Export writes the named cache files (relative, slash-separated) from
// cacheDir to w as a tar stream. Entries carry no owner, time or mode of
// this machine, so the same inputs give the same bundle.
func Export(w io.Writer, cacheDir string, files []string) error {
	tw := tar.NewWriter(w)
	hdr := func(name string, size int64) *tar.Header {
		return &tar.Header{Name: name, Size: size, Mode: 0o644, Typeflag: tar.TypeReg, ModTime: time.Unix(0, 0), Format: tar.FormatPAX}
	}
	head := fmt.Sprintf("qubes-go-firewall build inputs, %d files; load with `qgfw inputs import`\n", len(files))
	if err := tw.WriteHeader(hdr(manifestName, int64(len(head)))); err != nil {
		return fmt.Errorf("bundle: %w", err)
	}
	if _, err := io.WriteString(tw, head); err != nil {
		return fmt.Errorf("bundle: %w", err)
	}
	for _, name := range files {
		if err := checkName(name); err != nil {
			return err
		}
		f, err := os.Open(filepath.Join(cacheDir, filepath.FromSlash(name)))
		if err != nil {
			return fmt.Errorf("bundle: %w", err)
		}
		st, err := f.Stat()
		if err == nil {
			err = tw.WriteHeader(hdr(name, st.Size()))
		}
		if err == nil {
			_, err = io.Copy(tw, f)
		}
		f.Close()
		if err != nil {
			return fmt.Errorf("bundle %s: %w", name, err)
		}
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("bundle: %w", err)
	}
	return nil
}

// checkName accepts only the cache layout's relative paths.
func checkName(name string) error {
	switch {
	case name == "" || len(name) > 512 || strings.ContainsAny(name, "\\\x00") || path.IsAbs(name) || path.Clean(name) != name || strings.HasPrefix(name, "../") || name == "..":
		return fmt.Errorf("bundle entry %q: not a cache path", name)
	case strings.HasPrefix(name, "files/sha256-") && !strings.Contains(name[len("files/"):], "/"):
	case strings.HasPrefix(name, "goproxy/") && strings.Contains(name, "/@v/"):
	default:
		return fmt.Errorf("bundle entry %q: not an input (files/sha256-… or goproxy/…/@v/…)", name)
	}
	return nil
}

// Verify checks one entry's bytes, already written to the file tmp,
// against what the source tree pins for name; an error refuses it.
type Verify func(name, tmp string) error

// ErrNotBundle is returned for a stream that is not an input bundle.
var ErrNotBundle = errors.New("not a qgfw input bundle")

// Import reads a bundle from r into cacheDir. Each entry goes to a
// temporary file, is verified, and only then renamed into place; the
// first bad entry stops the import with an error naming it (entries
// already moved were verified). It returns how many files it loaded.
func Import(r io.Reader, cacheDir string, verify Verify) (int, error) {
	tr := tar.NewReader(r)
	tmpDir := filepath.Join(cacheDir, "import-tmp")
	if err := os.MkdirAll(tmpDir, 0o755); err != nil {
		return 0, fmt.Errorf("bundle: %w", err)
	}
	defer os.RemoveAll(tmpDir)
	var n, total int64
	for i := 0; ; i++ {
		h, err := tr.Next()
		if err == io.EOF {
			if i == 0 {
				return 0, ErrNotBundle
			}
			return int(n), nil
		}
		if err != nil {
			return int(n), fmt.Errorf("bundle: %w", err)
		}
		if i == 0 {
			if h.Name != manifestName {
				return 0, fmt.Errorf("%w (first entry %q)", ErrNotBundle, h.Name)
			}
			continue
		}
		if i > MaxEntries {
			return int(n), fmt.Errorf("bundle: more than %d entries", MaxEntries)
		}
		if h.Typeflag != tar.TypeReg {
			return int(n), fmt.Errorf("bundle entry %q: not a regular file", h.Name)
		}
		if err := checkName(h.Name); err != nil {
			return int(n), err
		}
		if h.Size < 0 || h.Size > MaxEntrySize {
			return int(n), fmt.Errorf("bundle entry %q: size %d out of bounds", h.Name, h.Size)
		}
		if total += h.Size; total > MaxTotal {
			return int(n), fmt.Errorf("bundle: more than %d bytes", int64(MaxTotal))
		}
		tmp, err := os.CreateTemp(tmpDir, "entry-")
		if err != nil {
			return int(n), fmt.Errorf("bundle: %w", err)
		}
		_, err = io.Copy(tmp, io.LimitReader(tr, h.Size))
		if cerr := tmp.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return int(n), fmt.Errorf("bundle entry %q: %w", h.Name, err)
		}
		if err := verify(h.Name, tmp.Name()); err != nil {
			return int(n), fmt.Errorf("bundle entry %q refused: %w", h.Name, err)
		}
		dst := filepath.Join(cacheDir, filepath.FromSlash(h.Name))
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return int(n), fmt.Errorf("bundle: %w", err)
		}
		if err := os.Rename(tmp.Name(), dst); err != nil {
			return int(n), fmt.Errorf("bundle: %w", err)
		}
		n++
	}
}
