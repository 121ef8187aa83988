package pipeline

import (
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// TestCopyDirFilters: the build context gets the kernel's build files but
// not its README (an edit there would rebuild the kernel stage for
// nothing), and the firewall's packages without their tests;
// subdirectories are never copied.
func TestCopyDirFilters(t *testing.T) {
	from := t.TempDir()
	for _, n := range []string{"build.sh", "qgfw.config", "fix.patch", "README.md", "link.go", "link_test.go"} {
		if err := os.WriteFile(filepath.Join(from, n), []byte(n), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(from, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		keep func(string) bool
		want []string
	}{
		{"kernel", notDoc, []string{"build.sh", "fix.patch", "link.go", "link_test.go", "qgfw.config"}},
		{"package", notTest, []string{"README.md", "build.sh", "fix.patch", "link.go", "qgfw.config"}},
	} {
		to := filepath.Join(t.TempDir(), "out")
		if err := copyDir(from, to, tc.keep); err != nil {
			t.Fatal(err)
		}
		ents, err := os.ReadDir(to)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, e := range ents {
			got = append(got, e.Name())
		}
		if !slices.Equal(got, tc.want) {
			t.Errorf("%s: copied %v, want %v", tc.name, got, tc.want)
		}
	}
}
