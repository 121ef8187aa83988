package salt

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sigstore/sigstore/pkg/cryptoutils"
	"gopkg.in/yaml.v3"

	"github.com/qubes-go-firewall/qubes-go-firewall/builder/sign"
)

// signedTree writes the state tree for dist's artifacts with sums signed
// by a new key, as `qgfw salt --release` or `--key` does.
func signedTree(t *testing.T) (tree string, o Options) {
	t.Helper()
	dist, f := fixture(t)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	data := f.Bytes()
	sig, err := sign.Sign(key, data)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := cryptoutils.MarshalPublicKeyToPEM(&key.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	o = DefaultOptions()
	o.Clients = []string{"work"}
	tree = filepath.Join(t.TempDir(), "tree")
	src := Source{Dir: dist, Sums: f, Label: "the signed sums", PublicKey: pub,
		Extra: map[string][]byte{"SHA256SUMS": data, "SHA256SUMS.sig": sig}}
	if err := WriteTree(tree, o, src); err != nil {
		t.Fatal(err)
	}
	return tree, o
}

// installScript is the shell of the install state, with dom0's paths
// moved under root.
func installScript(t *testing.T, tree string, o Options, root string) string {
	t.Helper()
	var states map[string]map[string][]map[string]any
	b, err := os.ReadFile(filepath.Join(tree, o.Name, "init.sls"))
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, &states); err != nil {
		t.Fatal(err)
	}
	var script string
	for _, a := range states[o.Name+"-install"]["cmd.run"] {
		if s, ok := a["name"].(string); ok {
			script = s
		}
	}
	if script == "" {
		t.Fatalf("no install script in\n%s", b)
	}
	script = strings.ReplaceAll(script, "/srv/salt/", root+"/srv/salt/")
	return strings.ReplaceAll(script, "/var/lib/qubes/vm-kernels/", root+"/kernels/")
}

// TestInstallVerifiesInDom0: the state's install step, run with sh and
// dom0's tools (sha256sum, base64, openssl) on a good tree, installs; on a
// tree changed after review — an artifact, the sums, the signature, the
// key of the signature — it fails and installs nothing. Before, the states
// relied on Salt's source_hash, which Salt does not compare for salt://
// sources.
func TestInstallVerifiesInDom0(t *testing.T) {
	tree, o := signedTree(t)
	other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	for _, c := range []struct {
		name   string
		tamper func(dir string) // the state's directory under /srv/salt
		ok     bool
	}{
		{"as reviewed", func(string) {}, true},
		{"artifact swapped", func(d string) { os.WriteFile(filepath.Join(d, "vmlinuz"), []byte("evil kernel"), 0o644) }, false},
		{"sums edited", func(d string) {
			b, _ := os.ReadFile(filepath.Join(d, "SHA256SUMS"))
			os.WriteFile(filepath.Join(d, "SHA256SUMS"), append(b, []byte(strings.Repeat("0", 64)+"  extra\n")...), 0o644)
		}, false},
		{"signature by another key", func(d string) {
			b, _ := os.ReadFile(filepath.Join(d, "SHA256SUMS"))
			sig, _ := sign.Sign(other, b)
			os.WriteFile(filepath.Join(d, "SHA256SUMS.sig"), sig, 0o644)
		}, false},
		{"signature removed", func(d string) { os.Remove(filepath.Join(d, "SHA256SUMS.sig")) }, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			root := t.TempDir()
			state := filepath.Join(root, "srv", "salt", o.Name)
			if err := os.CopyFS(state, os.DirFS(filepath.Join(tree, o.Name))); err != nil {
				t.Fatal(err)
			}
			kernels := filepath.Join(root, "kernels", o.Name)
			os.MkdirAll(kernels, 0o755) // the kernel-dir state
			c.tamper(state)
			out, err := exec.Command("sh", "-c", installScript(t, tree, o, root)).CombinedOutput()
			installed, _ := os.ReadFile(filepath.Join(kernels, "vmlinuz"))
			want, _ := os.ReadFile(filepath.Join(tree, o.Name, "vmlinuz"))
			switch {
			case c.ok && (err != nil || !bytes.Equal(installed, want)):
				t.Fatalf("the reviewed tree did not install: %v\n%s", err, out)
			case !c.ok && err == nil:
				t.Fatalf("a tampered tree installed:\n%s", out)
			case !c.ok && installed != nil:
				t.Fatalf("a tampered tree left files in %s", kernels)
			}
			t.Logf("%v: %s", err, strings.TrimSpace(string(out)))
		})
	}
}

// TestInstallRequisites: nothing acts before the install step succeeded —
// the VM requires it, the client switches require the VM.
func TestInstallRequisites(t *testing.T) {
	tree, o := signedTree(t)
	b, _ := os.ReadFile(filepath.Join(tree, o.Name, "init.sls"))
	var states map[string]map[string][]map[string]any
	if err := yaml.Unmarshal(b, &states); err != nil {
		t.Fatal(err)
	}
	requires := func(id, fun string) string {
		for _, a := range states[id][fun] {
			if r, ok := a["require"]; ok {
				return fmt.Sprint(r)
			}
		}
		return ""
	}
	for id, want := range map[string]string{
		o.Name + "-install":     "[map[file:" + o.Name + "-kernel-dir]]",
		o.Name:                  "[map[cmd:" + o.Name + "-install]]",
		o.Name + "-client-work": "[map[qvm:" + o.Name + "]]",
	} {
		fun := map[bool]string{true: "cmd.run", false: "qvm.vm"}[strings.HasSuffix(id, "-install")]
		if strings.Contains(id, "-client-") {
			fun = "qvm.prefs"
		}
		if got := requires(id, fun); got != want {
			t.Errorf("%s requires %s, want %s", id, got, want)
		}
	}
	for id, st := range states {
		if _, ok := st["file.managed"]; ok {
			t.Errorf("%s: file.managed (Salt would not compare its source_hash)", id)
		}
	}
}
