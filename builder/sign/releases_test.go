package sign

import (
	"io/fs"
	"os/exec"
	"path"
	"regexp"
	"strings"
	"testing"

	"github.com/qubes-go-firewall/qubes-go-firewall/checksums"
)

// TestPublishedReleases checks every release built into qgfw (package
// checksums: the repository's checksums/) against the key it names: a
// tampered sums file, a wrong signature, a key file whose name is not its
// fingerprint or a rotated key without re-signing fails here before a
// user's `qgfw verify --release` would.
func TestPublishedReleases(t *testing.T) {
	rels, err := fs.Glob(checksums.FS, "releases/v*")
	if err != nil || len(rels) == 0 {
		t.Fatalf("no releases built in (%v)", err)
	}
	for _, rel := range rels {
		fp, err := fs.ReadFile(checksums.FS, path.Join(rel, "key"))
		if err != nil {
			t.Errorf("%s: %v", rel, err)
			continue
		}
		s := Sums{FS: checksums.FS, Path: path.Join(rel, "SHA256SUMS"), Signature: path.Join(rel, "SHA256SUMS.sig"),
			Key: "keys/" + strings.TrimSpace(string(fp)) + ".pub"}
		f, err := s.Load()
		if err != nil {
			t.Errorf("release %s: %v", rel, err)
			continue
		}
		if got, err := s.KeyFingerprint(); err != nil || got != strings.TrimSpace(string(fp)) {
			t.Errorf("release %s: key %s has fingerprint %s (%v)", rel, s.Key, got, err)
		}
		for _, want := range []string{"initramfs", "vmlinuz"} {
			if _, ok := f.Lookup(want); !ok {
				t.Errorf("release %s: no sum for %s", rel, want)
			}
		}
		// The commit it was built from, whose tree says it builds
		// exactly these sums: `git checkout $(cat .../commit)` and a
		// build must reproduce them.
		c, err := fs.ReadFile(checksums.FS, path.Join(rel, "commit"))
		commit := strings.TrimSpace(string(c))
		if err != nil || !regexp.MustCompile(`^[0-9a-f]{40}$`).MatchString(commit) {
			t.Errorf("release %s: no source commit (%v): %q", rel, err, c)
			continue
		}
		if exec.Command("git", "-C", "../..", "rev-parse", "--git-dir").Run() != nil {
			t.Logf("not a git checkout: the commit of %s is not checked", rel)
			continue
		}
		built, err := exec.Command("git", "-C", "../..", "show", commit+":checksums/SHA256SUMS").Output()
		want, _ := fs.ReadFile(checksums.FS, path.Join(rel, "SHA256SUMS"))
		if err != nil || string(built) != string(want) {
			t.Errorf("release %s: commit %s's checksums/SHA256SUMS is not the release's (%v):\n%s", rel, commit, err, built)
		}
	}
	keys, _ := fs.Glob(checksums.FS, "keys/*.pub")
	for _, k := range keys {
		data, _ := fs.ReadFile(checksums.FS, k)
		pub, err := ParsePublicKey(data)
		if err != nil {
			t.Errorf("%s: %v", k, err)
			continue
		}
		if fp, _ := Fingerprint(pub); "keys/"+fp+".pub" != k {
			t.Errorf("%s is named for another key (its fingerprint is %s)", k, fp)
		}
	}
}
