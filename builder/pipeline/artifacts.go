package pipeline

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
)

// maxArtifact bounds each file taken from the engine's tar stream.
const maxArtifact = 512 << 20

// untarFlat writes the regular files of a tar stream into dest by base
// name and returns their names; directories are skipped, anything else
// (links, devices, duplicates) is an error: the final stage holds only
// plain files.
func untarFlat(r io.Reader, dest string) ([]string, error) {
	seen := map[string]bool{}
	var names []string
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return names, nil
		}
		if err != nil {
			return nil, fmt.Errorf("read artifacts: %w", err)
		}
		switch {
		case h.Typeflag == tar.TypeDir:
			continue
		case h.Typeflag != tar.TypeReg:
			return nil, fmt.Errorf("read artifacts: %s is not a regular file", h.Name)
		case h.Size > maxArtifact:
			return nil, fmt.Errorf("read artifacts: %s is %d bytes, more than %d", h.Name, h.Size, maxArtifact)
		}
		name := path.Base(h.Name)
		if name == "." || name == ".." || name == "/" || seen[name] {
			return nil, fmt.Errorf("read artifacts: bad or repeated name %q", h.Name)
		}
		seen[name] = true
		f, err := os.OpenFile(filepath.Join(dest, name), os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
		if err != nil {
			return nil, fmt.Errorf("read artifacts: %w", err)
		}
		_, err = io.Copy(f, io.LimitReader(tr, maxArtifact))
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return nil, fmt.Errorf("read artifacts: write %s: %w", name, err)
		}
		names = append(names, name)
	}
}
