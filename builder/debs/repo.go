package debs

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/ulikunitz/xz"
)

// WriteRepo lays out dir as a flat apt repository holding exactly the
// locked .debs (debs maps a package name to its verified file) and returns
// the sources line for it. apt reads only this repository, so mmdebstrap
// can resolve to nothing but the locked versions. Each .deb's control
// paragraph comes from dpkg-deb, which mmdebstrap needs anyway.
func WriteRepo(ctx context.Context, dir string, l *Lock, debs map[string]string) (string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("local repository: %w", err)
	}
	var idx bytes.Buffer
	for _, e := range l.Packages {
		src, ok := debs[e.Name]
		if !ok {
			return "", fmt.Errorf("local repository: no .deb for %s", e.Name)
		}
		dst := filepath.Join(dir, e.FileName())
		if err := os.Link(src, dst); err != nil {
			if err := copyFile(src, dst); err != nil {
				return "", fmt.Errorf("local repository: %w", err)
			}
		}
		out, err := exec.CommandContext(ctx, "dpkg-deb", "--field", dst).Output()
		if err != nil {
			return "", fmt.Errorf("control fields of %s: %w", e.FileName(), err)
		}
		var st Stanza
		if err := ScanStanzas(bytes.NewReader(out), func(s Stanza) error {
			if st != nil {
				return fmt.Errorf("more than one paragraph: %w", ErrMalformed)
			}
			st = s
			return nil
		}); err != nil {
			return "", fmt.Errorf("control fields of %s: %w", e.FileName(), err)
		}
		if st.Get("Package") != e.Name || st.Get("Version") != e.Version || st.Get("Architecture") != e.Arch {
			return "", fmt.Errorf("%s is %s %s %s, locked as %s %s %s", e.FileName(),
				st.Get("Package"), st.Get("Version"), st.Get("Architecture"), e.Name, e.Version, e.Arch)
		}
		st = append(st, Field{"Filename", "./" + e.FileName()}, Field{"Size", strconv.FormatInt(e.Size, 10)}, Field{"SHA256", e.SHA256})
		if err := st.Format(&idx); err != nil {
			return "", err
		}
		idx.WriteByte('\n')
	}
	if err := os.WriteFile(filepath.Join(dir, "Packages"), idx.Bytes(), 0o644); err != nil {
		return "", fmt.Errorf("local repository: %w", err)
	}
	sum := sha256.Sum256(idx.Bytes())
	release := fmt.Sprintf("Suite: %s\nCodename: %s\nSHA256:\n %s %d Packages\n", l.Suite, l.Suite, hex.EncodeToString(sum[:]), idx.Len())
	if err := os.WriteFile(filepath.Join(dir, "Release"), []byte(release), 0o644); err != nil {
		return "", fmt.Errorf("local repository: %w", err)
	}
	return "deb [trusted=yes] file://" + dir + " ./", nil
}

func copyFile(from, to string) error {
	data, err := os.ReadFile(from)
	if err != nil {
		return err
	}
	return os.WriteFile(to, data, 0o644)
}

// maxIndex bounds a decompressed Packages index (bookworm main, amd64:
// about 45 MB).
const maxIndex = 512 << 20

// Index reads the suite's main Packages index for arch from mirror and
// returns the paragraph of each of names it has (a Debian suite has one
// version of a name per architecture).
func Index(ctx context.Context, client *http.Client, mirror, suite, arch string, names []string) (map[string]Stanza, error) {
	url := strings.TrimSuffix(mirror, "/") + "/dists/" + suite + "/main/binary-" + arch + "/Packages.xz"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	if client == nil {
		client = http.DefaultClient
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("archive index: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("archive index %s: HTTP %s", url, resp.Status)
	}
	zr, err := xz.NewReader(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("archive index %s: %w", url, err)
	}
	want := map[string]bool{}
	for _, n := range names {
		want[n] = true
	}
	out := map[string]Stanza{}
	err = ScanStanzas(&limitedReader{r: zr, n: maxIndex}, func(s Stanza) error {
		if n := s.Get("Package"); want[n] {
			out[n] = s
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("archive index %s: %w", url, err)
	}
	return out, nil
}

// limitedReader fails, instead of ending quietly, past n bytes.
type limitedReader struct {
	r interface{ Read([]byte) (int, error) }
	n int64
}

func (l *limitedReader) Read(p []byte) (int, error) {
	if l.n <= 0 {
		return 0, fmt.Errorf("larger than %d bytes: %w", maxIndex, ErrMalformed)
	}
	if int64(len(p)) > l.n {
		p = p[:l.n]
	}
	n, err := l.r.Read(p)
	l.n -= int64(n)
	return n, err
}
