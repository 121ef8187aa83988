package pipeline

import (
	"errors"
	"strings"
	"testing"
)

func TestCheckSpace(t *testing.T) {
	dir := t.TempDir()
	if err := checkSpace(dir, 1, "hint"); err != nil {
		t.Fatalf("1 byte: %v", err)
	}
	err := checkSpace(dir, 1<<62, "free some space")
	var ns *NoSpaceError
	if !errors.As(err, &ns) {
		t.Fatalf("err = %v, want a NoSpaceError", err)
	}
	for _, want := range []string{dir, "needs 4294967296.0 GiB", "free some space"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("message %q lacks %q", err, want)
		}
	}
	if err := checkSpace(dir+"/missing", 1, ""); err == nil || errors.As(err, &ns) {
		t.Errorf("missing dir: err = %v", err)
	}
}
