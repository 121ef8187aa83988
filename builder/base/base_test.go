package base

import (
	"strings"
	"testing"
)

func TestTag(t *testing.T) {
	a := Spec{Suite: "bookworm", Mirror: "http://m", Packages: []string{"gcc", "make"}, SourceDateEpoch: 1}
	b := a
	b.Packages = []string{"make", "gcc"}
	if a.Tag() != b.Tag() {
		t.Errorf("package order changes the tag: %s %s", a.Tag(), b.Tag())
	}
	if !strings.HasPrefix(a.Tag(), "localhost/qgfw-base:") {
		t.Errorf("tag %s", a.Tag())
	}
	for _, c := range []Spec{
		{Suite: "trixie", Mirror: a.Mirror, Packages: a.Packages, SourceDateEpoch: 1},
		{Suite: a.Suite, Mirror: "http://other", Packages: a.Packages, SourceDateEpoch: 1},
		{Suite: a.Suite, Mirror: a.Mirror, Packages: []string{"gcc"}, SourceDateEpoch: 1},
		{Suite: a.Suite, Mirror: a.Mirror, Packages: a.Packages, SourceDateEpoch: 2},
	} {
		if c.Tag() == a.Tag() {
			t.Errorf("%+v has the same tag as %+v", c, a)
		}
	}
}

func TestParsePackages(t *testing.T) {
	got, err := ParsePackages("bison=2:3.8.2+dfsg-1+b1,gcc-12=12.2.0-14+deb12u1")
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0] != (Package{"bison", "2:3.8.2+dfsg-1+b1"}) || got[1].Name != "gcc-12" {
		t.Errorf("got %+v", got)
	}
	for _, bad := range []string{"", "gcc", "=1", "gcc=", "gcc=1,,make=2"} {
		if _, err := ParsePackages(bad); err == nil {
			t.Errorf("ParsePackages(%q) accepted", bad)
		}
	}
}
