package sums

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

const (
	hexA = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad" // sha256("abc")
	hexB = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" // sha256("")
)

func TestParseAccepts(t *testing.T) {
	in := hexB + "  vmlinuz\n" + hexA + " *initramfs\n" + hexA + "  sub/dir/file.json\n"
	f, err := Parse([]byte(in))
	if err != nil {
		t.Fatal(err)
	}
	if got, want := f.Names(), []string{"initramfs", "sub/dir/file.json", "vmlinuz"}; !reflect.DeepEqual(got, want) {
		t.Fatalf("names %v, want %v", got, want)
	}
	e, ok := f.Lookup("vmlinuz")
	if !ok || e.Sum != sha256.Sum256(nil) {
		t.Fatalf("Lookup(vmlinuz) = %v, %v", e, ok)
	}
	if _, ok := f.Lookup("nope"); ok {
		t.Fatal("Lookup(nope) found something")
	}
	want := hexA + "  initramfs\n" + hexA + "  sub/dir/file.json\n" + hexB + "  vmlinuz\n"
	if got := string(f.Bytes()); got != want {
		t.Fatalf("Bytes:\n%s\nwant:\n%s", got, want)
	}
	again, err := Parse(f.Bytes())
	if err != nil || !reflect.DeepEqual(again, f) {
		t.Fatalf("canonical form does not round-trip: %v", err)
	}
}

func TestParseRefuses(t *testing.T) {
	cases := []struct {
		name, in string
		line     int
		why      string
	}{
		{"empty", "", 0, "empty"},
		{"no final newline", hexA + "  a", 1, "missing final newline"},
		{"blank line", hexA + "  a\n\n", 2, "empty line"},
		{"upper-case hex", strings.ToUpper(hexA) + "  a\n", 1, "bad hex digit"},
		{"non-hex", "g" + hexA[1:] + "  a\n", 1, "bad hex digit"},
		{"short digest", hexA[:63] + "  a\n", 1, "bad hex digit ' ' at column 64"},
		{"long digest", hexA + "0  a\n", 1, "bad separator"},
		{"too short", "abc  a\n", 1, "too short"},
		{"one space", hexA + " a\n", 1, "bad separator"},
		{"tab", hexA + "\t a\n", 1, "bad separator"},
		{"three spaces", hexA + "   a\n", 1, "space"},
		{"trailing space", hexA + "  a \n", 1, "space"},
		{"leading space", " " + hexA + "  a\n", 1, "bad hex digit"},
		{"CRLF", hexA + "  a\r\n", 1, "control character"},
		{"NUL", hexA + "  a\x00b\n", 1, "control character"},
		{"escape", hexA + "  a\x1b[31m\n", 1, "control character"},
		{"C1 control", hexA + "  a\u0085\n", 1, "control character"},
		{"bad utf8", hexA + "  a\xff\n", 1, "UTF-8"},
		{"empty name", hexA + "  \n", 1, "empty name"},
		{"absolute", hexA + "  /etc/passwd\n", 1, "absolute"},
		{"dotdot", hexA + "  ../x\n", 1, "clean relative path"},
		{"inner dotdot", hexA + "  a/../../x\n", 1, "clean relative path"},
		{"dot", hexA + "  ./a\n", 1, "clean relative path"},
		{"double slash", hexA + "  a//b\n", 1, "clean relative path"},
		{"trailing slash", hexA + "  a/\n", 1, "clean relative path"},
		{"backslash", hexA + "  \\a\n", 1, "backslash"},
		{"duplicate", hexA + "  a\n" + hexB + "  b\n" + hexB + " *a\n", 3, "duplicate name \"a\" (first on line 1)"},
		{"comment", "# comment\n" + hexA + "  a\n", 1, "too short"},
		{"huge", strings.Repeat(hexA+"  a\n", MaxSize/67+1), 0, "larger than"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f, err := Parse([]byte(c.in))
			var pe *ParseError
			if !errors.As(err, &pe) {
				t.Fatalf("Parse = %v, %v; want *ParseError", f, err)
			}
			if pe.Line != c.line || !strings.Contains(pe.Msg, c.why) {
				t.Fatalf("error %q (line %d), want line %d containing %q", err, pe.Line, c.line, c.why)
			}
		})
	}
}

func TestReadFileBounded(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "SHA256SUMS")
	if err := os.WriteFile(p, bytes.Repeat([]byte("x"), MaxSize+10), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := ReadFile(p)
	var pe *ParseError
	if !errors.As(err, &pe) || !strings.Contains(err.Error(), "larger than") {
		t.Fatalf("ReadFile(huge) = %v", err)
	}
	if _, err := ReadFile(filepath.Join(dir, "absent")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("ReadFile(absent) = %v, want ErrNotExist", err)
	}
}

func writeFiles(t *testing.T, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for name, content := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func TestComputeMatchesSha256sum(t *testing.T) {
	dir := writeFiles(t, map[string]string{"vmlinuz": "abc", "initramfs": "", "sub/x": strings.Repeat("y", 1<<17)})
	f, err := Compute(dir, []string{"vmlinuz", "sub/x", "initramfs"})
	if err != nil {
		t.Fatal(err)
	}
	if e, _ := f.Lookup("vmlinuz"); e.Hex() != hexA {
		t.Fatalf("vmlinuz digest %s", e.Hex())
	}
	sumsPath := filepath.Join(dir, "SHA256SUMS")
	if err := os.WriteFile(sumsPath, f.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := exec.LookPath("sha256sum"); err != nil {
		t.Skip("sha256sum not installed")
	}
	cmd := exec.Command("sha256sum", "--strict", "-c", "SHA256SUMS")
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("sha256sum -c: %v\n%s", err, out)
	}
	// And the other direction: sha256sum's own output parses to the same File.
	cmd = exec.Command("sha256sum", "vmlinuz", "sub/x", "initramfs")
	cmd.Dir = dir
	out, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	theirs, err := Parse(out)
	if err != nil {
		t.Fatal(err)
	}
	if d := Compare(f, theirs); d != nil {
		t.Fatalf("sha256sum disagrees: %v", d)
	}
}

func TestComputeRefuses(t *testing.T) {
	dir := writeFiles(t, map[string]string{"a": "abc"})
	outside := writeFiles(t, map[string]string{"secret": "s"})
	if err := os.Symlink(filepath.Join(outside, "secret"), filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(dir, "d"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		names []string
		why   string
	}{
		{[]string{"../secret"}, "clean relative path"},
		{[]string{"/etc/passwd"}, "absolute"},
		{[]string{"link"}, "escapes"},
		{[]string{"absent"}, "no such file"},
		{[]string{"d"}, "not a regular file"},
		{[]string{"a", "a"}, "duplicate"},
	} {
		if _, err := Compute(dir, c.names); err == nil || !strings.Contains(err.Error(), c.why) {
			t.Errorf("Compute(%v) = %v, want error containing %q", c.names, err, c.why)
		}
	}
	if _, err := HashFile("/dev/zero"); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Errorf("HashFile(/dev/zero) = %v", err)
	}
}

func TestCompare(t *testing.T) {
	sum := func(s string) [32]byte { return sha256.Sum256([]byte(s)) }
	want, err := New([]Entry{{"c", sum("c")}, {"a", sum("a")}, {"b", sum("b")}})
	if err != nil {
		t.Fatal(err)
	}
	if d := Compare(want, want); d != nil {
		t.Fatalf("Compare(same) = %v", d)
	}
	got := &File{Entries: []Entry{{"d", sum("d")}, {"b", sum("B")}, {"a", sum("a")}}} // unsorted on purpose
	d := Compare(want, got)
	h := func(s string) string { e := Entry{Sum: sum(s)}; return e.Hex() }
	wantD := []Difference{
		{Name: "b", Want: h("b"), Got: h("B")},
		{Name: "c", Want: h("c")},
		{Name: "d", Got: h("d")},
	}
	if !reflect.DeepEqual(d, wantD) {
		t.Fatalf("Compare = %v\nwant %v", d, wantD)
	}
	for i, s := range []string{"b: sha256", "c: missing", "d: unexpected"} {
		if !strings.HasPrefix(d[i].String(), s) {
			t.Errorf("%q does not start with %q", d[i], s)
		}
	}
	if _, err := New([]Entry{{"a", sum("a")}, {"a", sum("b")}}); err == nil {
		t.Error("New accepted duplicate names")
	}
	if _, err := New([]Entry{{"../a", sum("a")}}); err == nil {
		t.Error("New accepted ../a")
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(hexA + "  vmlinuz\n" + hexB + " *initramfs\n"))
	f.Add([]byte(hexA + "  a\n" + hexA + "  a\n"))
	f.Add([]byte(hexA + "  ../a\n"))
	f.Add([]byte(""))
	f.Fuzz(func(t *testing.T, data []byte) {
		file, err := Parse(data)
		if err != nil {
			var pe *ParseError
			if !errors.As(err, &pe) {
				t.Fatalf("error is not a *ParseError: %v", err)
			}
			return
		}
		// Whatever parses must re-serialise to something that parses to the same thing.
		again, err := Parse(file.Bytes())
		if err != nil {
			t.Fatalf("canonical form of accepted input fails: %v", err)
		}
		if !reflect.DeepEqual(file, again) {
			t.Fatal("canonical form does not round-trip")
		}
		for _, e := range file.Entries {
			if CheckName(e.Name) != nil || !fs.ValidPath(e.Name) {
				t.Fatalf("accepted unsafe name %q", e.Name)
			}
		}
	})
}

func TestCheck(t *testing.T) {
	dir := writeFiles(t, map[string]string{"good": "abc", "bad": "tampered"})
	if err := os.Mkdir(filepath.Join(dir, "dir"), 0o755); err != nil {
		t.Fatal(err)
	}
	f, err := Parse([]byte(hexA + "  good\n" + hexA + "  bad\n" + hexA + "  gone\n" + hexA + "  dir\n"))
	if err != nil {
		t.Fatal(err)
	}
	res, err := Check(dir, f)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]Status{"good": OK, "bad": Mismatch, "gone": Missing, "dir": Failed}
	if len(res) != len(want) {
		t.Fatalf("%d results, want %d", len(res), len(want))
	}
	for _, r := range res {
		if r.Status != want[r.Name] {
			t.Errorf("%s: %s (%v), want %s", r.Name, r.Status, r.Err, want[r.Name])
		}
		if r.Want != hexA {
			t.Errorf("%s: want %s", r.Name, r.Want)
		}
	}
}
