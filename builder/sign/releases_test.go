package sign

import (
	"os"
	"path/filepath"
	"testing"
)

// TestPublishedReleases checks every release committed under
// checksums/releases against the committed release key: a tampered sums
// file, a wrong signature or a rotated key without re-signing fails here
// before a user's `qgfw verify --release` would.
func TestPublishedReleases(t *testing.T) {
	root := filepath.Join("..", "..", "checksums")
	dirs, err := filepath.Glob(filepath.Join(root, "releases", "v*"))
	if err != nil {
		t.Fatal(err)
	}
	if len(dirs) == 0 {
		t.Skip("no releases published yet")
	}
	for _, dir := range dirs {
		s := Sums{
			Path:      filepath.Join(dir, "SHA256SUMS"),
			Signature: filepath.Join(dir, "SHA256SUMS.sig"),
			Key:       filepath.Join(root, "release-key.pub"),
		}
		f, err := s.Load()
		if err != nil {
			t.Errorf("release %s: %v", filepath.Base(dir), err)
			continue
		}
		for _, want := range []string{"initramfs", "vmlinuz"} {
			if _, ok := f.Lookup(want); !ok {
				t.Errorf("release %s: no sum for %s", filepath.Base(dir), want)
			}
		}
	}
	if _, err := os.Stat(filepath.Join(root, "release-key.pub")); err != nil {
		t.Fatal(err)
	}
}
