package debs

import (
	"bytes"
	"errors"
	"os"
	"strings"
	"testing"
)

const sampleIndex = `Package: cpp-12
Source: gcc-12
Version: 12.2.0-14+deb12u1
Architecture: amd64
Description: GNU C preprocessor
 A macro processor that is used automatically
 .
 by the GNU C compiler.
SHA256: fedbb98e877adde83c983c607c5b5e7ef3ddf6b8b1bbb4d4ec1b9c7b3e3a8f60

Package: bison
Version: 2:3.8.2+dfsg-1+b1
Architecture: amd64

`

func TestScanStanzas(t *testing.T) {
	var got []Stanza
	if err := ScanStanzas(strings.NewReader(sampleIndex), func(s Stanza) error { got = append(got, s); return nil }); err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 {
		t.Fatalf("%d paragraphs, want 2", len(got))
	}
	if v := got[0].Get("version"); v != "12.2.0-14+deb12u1" {
		t.Errorf("Version = %q", v)
	}
	if d := got[0].Get("Description"); !strings.HasPrefix(d, "GNU C preprocessor\n A macro") || !strings.HasSuffix(d, "compiler.") {
		t.Errorf("Description = %q", d)
	}
	var b bytes.Buffer
	got[0].Format(&b)
	if !strings.Contains(b.String(), "Description: GNU C preprocessor\n A macro processor") {
		t.Errorf("Format lost the continuation lines:\n%s", b.String())
	}
	for _, bad := range []string{" continuation first\n", "no colon here\n", "Bad Name: x\n", strings.Repeat("x", maxLine+1) + ": y\n"} {
		err := ScanStanzas(strings.NewReader(bad), func(Stanza) error { return nil })
		if !errors.Is(err, ErrMalformed) {
			t.Errorf("%.40q: err = %v, want ErrMalformed", bad, err)
		}
	}
}

func TestLockRoundTrip(t *testing.T) {
	data, err := os.ReadFile("../pipeline/base.lock")
	if err != nil {
		t.Fatal(err)
	}
	l, err := ParseLock(data)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(l.Format(), data) {
		t.Error("the committed lock is not in the form Format writes")
	}
	if _, ok := l.Find("gcc-12"); !ok {
		t.Error("gcc-12 is not locked")
	}
	if len(Diff(l, l)) != 0 {
		t.Error("a lock differs from itself")
	}
}

func TestParseLockRefuses(t *testing.T) {
	good := "suite bookworm\nmirror http://deb.debian.org/debian\nsnapshot 20261202T072019Z\ninclude make\n" +
		"pkg make 4.3-4.1 amd64 " + strings.Repeat("a", 64) + " 1000 pool/main/m/make-dfsg/make_4.3-4.1_amd64.deb\n"
	if _, err := ParseLock([]byte(good)); err != nil {
		t.Fatalf("good lock: %v", err)
	}
	for name, edit := range map[string][2]string{
		"short hash":      {strings.Repeat("a", 64), "abc"},
		"path escape":     {"pool/main/m/make-dfsg/", "pool/../../etc/"},
		"not pool":        {"pool/main/m/make-dfsg/make", "dists/make"},
		"bad size":        {" 1000 ", " -1 "},
		"bad snapshot":    {"20261202T072019Z", "yesterday"},
		"include missing": {"include make", "include make,gcc"},
		"bad mirror":      {"http://deb", "ftp://deb"},
		"unknown keyword": {"suite bookworm", "suit bookworm"},
		"bad version":     {"4.3-4.1", "4.3;rm"},
		"duplicate":       {"pool/main/m/make-dfsg/make_4.3-4.1_amd64.deb\n", "pool/main/m/make-dfsg/make_4.3-4.1_amd64.deb\npkg make 4.3-4.1 amd64 " + strings.Repeat("a", 64) + " 1000 pool/main/m/make-dfsg/make_4.3-4.1_amd64.deb\n"},
	} {
		if _, err := ParseLock([]byte(strings.Replace(good, edit[0], edit[1], 1))); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestDiff(t *testing.T) {
	mk := func(pk ...Entry) *Lock { return &Lock{Packages: pk} }
	a := mk(Entry{Name: "gcc-12", Version: "12.2.0-14+deb12u1", SHA256: "1"}, Entry{Name: "old", Version: "1"})
	b := mk(Entry{Name: "gcc-12", Version: "12.2.0-14+deb12u2", SHA256: "2"}, Entry{Name: "new", Version: "2"})
	got := strings.Join(Diff(a, b), "|")
	if got != "~ gcc-12 12.2.0-14+deb12u1 -> 12.2.0-14+deb12u2|+ new 2|- old 1" {
		t.Errorf("Diff = %s", got)
	}
}

func FuzzParseLock(f *testing.F) {
	if data, err := os.ReadFile("../pipeline/base.lock"); err == nil {
		f.Add(data)
	}
	f.Add([]byte("suite x\nmirror http://m\nsnapshot 20261202T072019Z\ninclude a0\npkg a0 1 all " + strings.Repeat("0", 64) + " 1 pool/a.deb\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		l, err := ParseLock(data)
		if err != nil {
			return
		}
		// What parses formats to something that parses the same.
		again, err := ParseLock(l.Format())
		if err != nil {
			t.Fatalf("formatted lock does not parse: %v", err)
		}
		if again.Digest() != l.Digest() {
			t.Fatal("format is not stable")
		}
	})
}

func FuzzScanStanzas(f *testing.F) {
	f.Add([]byte(sampleIndex))
	f.Add([]byte("A: b\n c\n\n\nD: e\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		_ = ScanStanzas(bytes.NewReader(data), func(s Stanza) error {
			if len(s) == 0 || len(s) > maxFields {
				t.Fatalf("paragraph of %d fields", len(s))
			}
			return nil
		})
	})
}
