package regfile

import (
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// Every kind of file a hostile download or a typo can name: only the
// regular file opens, and none of the others blocks (a FIFO with no
// writer would, opened the usual way).
func TestOnlyRegularFiles(t *testing.T) {
	dir := t.TempDir()
	write := func(name, s string) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("file", "data")
	if err := syscall.Mkfifo(filepath.Join(dir, "fifo"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(dir, "dir"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("file", filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	for _, c := range []struct {
		name string
		ok   bool
	}{{"file", true}, {"fifo", false}, {"dir", false}, {"link", false}} {
		for how, open := range map[string]func() (*os.File, error){
			"Open":   func() (*os.File, error) { return Open(filepath.Join(dir, c.name)) },
			"OpenIn": func() (*os.File, error) { return OpenIn(root, c.name) },
		} {
			ok := c.ok || how == "OpenIn" && c.name == "link" // within the root, to a regular file
			f, err := open()
			if ok != (err == nil) || !ok && !errors.Is(err, ErrNotRegular) {
				t.Errorf("%s(%s): %v", how, c.name, err)
			}
			if f != nil {
				f.Close()
			}
		}
	}
	if _, err := Open("/dev/zero"); !errors.Is(err, ErrNotRegular) {
		t.Errorf("a device: %v", err)
	}
	if b, err := ReadBounded(filepath.Join(dir, "file"), 4); err != nil || string(b) != "data" {
		t.Errorf("ReadBounded at the limit: %q %v", b, err)
	}
	if _, err := ReadBounded(filepath.Join(dir, "file"), 3); err == nil {
		t.Error("ReadBounded over the limit: no error")
	}
}
