package salt

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/qubes-go-firewall/qubes-go-firewall/builder/sums"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

// What the qvm state module accepts (QubesOS/qubes-mgmt-salt-dom0-qvm,
// _states/ext_state_qvm.py vm() and _modules/ext_module_qvm.py create(),
// prefs(), features()); DESIGN §5.
var (
	qvmActions = []string{"exists", "running", "missing", "halted", "absent", "present", "clone", "prefs",
		"devices", "service", "features", "firewall", "tags", "unpause", "pause", "shutdown", "kill", "start", "run"}
	qvmPresent = []string{"template", "label", "class", "mem", "vcpus", "root-move-from", "root-copy-from", "flags"}
	qvmPrefs   = []string{"autostart", "debug", "default-user", "default-dispvm", "devices-denied",
		"management-dispvm", "guivm", "audiovm", "template-for-dispvms", "virt-mode", "label",
		"include-in-backups", "ip", "kernel", "kernelopts", "mac", "maxmem", "memory", "netvm",
		"pci-strictreset", "pcidevs", "provides-network", "template", "qrexec-timeout", "updateable", "vcpus"}
	qvmFeatures = []string{"enable", "disable", "default", "set"}
	// Keys Salt's state system consumes itself.
	saltRequisites = []string{"name", "require", "actions"}
)

func isPref(key string) bool {
	return slices.Contains(qvmPrefs, strings.ReplaceAll(key, "_", "-"))
}

// fixture writes dist/ with two artifacts and returns it with its sums.
func fixture(t *testing.T) (string, *sums.File) {
	t.Helper()
	dir := t.TempDir()
	for name, content := range map[string]string{"vmlinuz": "kernel image", "initramfs": "initramfs image", "buildinfo.json": "{}"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	f, err := sums.Compute(dir, []string{"vmlinuz", "initramfs", "buildinfo.json"})
	if err != nil {
		t.Fatal(err)
	}
	return dir, f
}

var goldenCases = []struct {
	name string
	opts func(*Options)
}{
	{"default", func(*Options) {}},
	{"clients", func(o *Options) {
		o.Name = "fw2"
		o.Label = "orange"
		o.Memory = 32
		o.Clients = []string{"work", "personal"}
		o.SetDefaultNetVM = true
	}},
	{"bsd-mode", func(o *Options) {
		o.NetVM = "none"
		o.KernelOpts = "--ipv4=10.137.0.5 --ipv4-gw=10.137.0.1 --ipv4-dns=10.139.1.1 --nat-table-size=5000"
	}},
}

func TestGolden(t *testing.T) {
	for _, c := range goldenCases {
		t.Run(c.name, func(t *testing.T) {
			dist, f := fixture(t)
			o := DefaultOptions()
			c.opts(&o)
			out := filepath.Join(t.TempDir(), "tree")
			src := Source{Dir: dist, Sums: f, Label: "dist/SHA256SUMS", Extra: map[string][]byte{"SHA256SUMS": f.Bytes()}}
			if err := WriteTree(out, o, src); err != nil {
				t.Fatal(err)
			}
			tree := readTree(t, out)
			golden := filepath.Join("testdata", c.name+".golden")
			got := formatTree(tree)
			if *update {
				if err := os.WriteFile(golden, got, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run go test -update to create it)", err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("tree differs from %s (go test -update rewrites it):\n%s", golden, got)
			}
			checkTree(t, o, tree, dist)
		})
	}
}

// readTree returns every file under dir by relative path.
func readTree(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	tree := map[string][]byte{}
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		rel, _ := filepath.Rel(dir, p)
		tree[rel] = b
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return tree
}

// formatTree is the golden form: text files in full, artifacts by digest.
func formatTree(tree map[string][]byte) []byte {
	names := make([]string, 0, len(tree))
	for n := range tree {
		names = append(names, n)
	}
	sort.Strings(names)
	var b bytes.Buffer
	for _, n := range names {
		if strings.HasSuffix(n, ".sls") || strings.HasSuffix(n, ".top") {
			fmt.Fprintf(&b, "=== %s\n%s", n, tree[n])
		} else {
			fmt.Fprintf(&b, "=== %s (sha256 %x)\n", n, sha256.Sum256(tree[n]))
		}
	}
	return b.Bytes()
}

// checkTree parses the rendered YAML and checks it against what the qvm
// state module accepts and against the artifacts' real digests.
func checkTree(t *testing.T, o Options, tree map[string][]byte, dist string) {
	t.Helper()
	var top map[string]map[string][]string
	if err := yaml.Unmarshal(tree[o.Name+".top"], &top); err != nil {
		t.Fatalf("top file: %v", err)
	}
	if got := top["base"]["dom0"]; !slices.Equal(got, []string{o.Name}) {
		t.Errorf("top file targets %v", got)
	}
	sls := tree[filepath.Join(o.Name, "init.sls")]
	if bytes.Contains(sls, []byte("{{")) || bytes.Contains(sls, []byte("{%")) || bytes.Contains(sls, []byte("{#")) {
		t.Error("state contains Jinja syntax; Salt would render it")
	}
	var states map[string]map[string][]any
	if err := yaml.Unmarshal(sls, &states); err != nil {
		t.Fatalf("init.sls does not parse: %v\n%s", err, sls)
	}
	seenVM, hashes := false, map[string]string{}
	for id, st := range states {
		for fun, args := range st {
			kv := argMap(t, id, args)
			switch fun {
			case "qvm.vm":
				seenVM = true
				if kv["name"] != o.Name {
					t.Errorf("%s: name %v", id, kv["name"])
				}
				for k := range kv {
					if !slices.Contains(qvmActions, k) && !slices.Contains(saltRequisites, k) {
						t.Errorf("%s: qvm.vm key %q is not an action the module accepts", id, k)
					}
				}
				for _, a := range kv["actions"].([]any) {
					if !slices.Contains(qvmActions, a.(string)) {
						t.Errorf("%s: unknown action %v", id, a)
					}
				}
				for k := range argMap(t, id, kv["present"].([]any)) {
					if !slices.Contains(qvmPresent, k) {
						t.Errorf("%s: present key %q not accepted by qvm.create", id, k)
					}
				}
				prefs := argMap(t, id, kv["prefs"].([]any))
				for k := range prefs {
					if !isPref(k) {
						t.Errorf("%s: pref %q not accepted by qvm.prefs", id, k)
					}
				}
				want := map[string]any{"label": o.Label, "include-in-backups": false, "kernel": o.Name, "virt-mode": "pvh", "vcpus": 1, "memory": o.Memory,
					"maxmem": o.Memory, "provides-network": true, "default_dispvm": "", "audiovm": "", "kernelopts": o.KernelOpts}
				for k, v := range want {
					if prefs[k] != v {
						t.Errorf("pref %s = %#v, want %#v", k, prefs[k], v)
					}
				}
				feats := argMap(t, id, kv["features"].([]any))
				for k := range feats {
					if !slices.Contains(qvmFeatures, k) {
						t.Errorf("features key %q", k)
					}
				}
				if fmt.Sprint(feats["enable"]) != "[qubes-firewall no-default-kernelopts skip-update]" || fmt.Sprint(feats["disable"]) != "[gui]" {
					t.Errorf("features %v", feats)
				}
			case "qvm.prefs":
				for k := range kv {
					if !isPref(k) && !slices.Contains(saltRequisites, k) {
						t.Errorf("%s: pref %q not accepted", id, k)
					}
				}
				if kv["netvm"] != o.Name || !slices.Contains(o.Clients, kv["name"].(string)) {
					t.Errorf("%s: %v", id, kv)
				}
			case "cmd.run":
				if id == o.Name+"-install" {
					script, _ := kv["name"].(string)
					for _, n := range []string{"vmlinuz", "initramfs"} {
						if i := strings.Index(script, " "+n); i >= 65 {
							hashes[n] = "sha256=" + script[i-64:i]
						}
					}
					req := fmt.Sprint(kv["require"])
					if req != "[map[file:"+o.Name+"-kernel-dir]]" {
						t.Errorf("%s: require %s", id, req)
					}
				}
			case "file.directory":
			default:
				t.Errorf("%s: unexpected state function %s", id, fun)
			}
		}
	}
	if !seenVM {
		t.Error("no qvm.vm state")
	}
	for _, name := range []string{"vmlinuz", "initramfs"} {
		b, err := os.ReadFile(filepath.Join(dist, name))
		if err != nil {
			t.Fatal(err)
		}
		if want := fmt.Sprintf("sha256=%x", sha256.Sum256(b)); hashes[name] != want {
			t.Errorf("%s: the install step checks %q, want %q", name, hashes[name], want)
		}
		if copied := tree[filepath.Join(o.Name, name)]; !bytes.Equal(copied, b) {
			t.Errorf("%s: copy in the tree differs", name)
		}
	}
}

// argMap turns a Salt argument list ([{k: v}, ...]) into a map.
func argMap(t *testing.T, id string, args []any) map[string]any {
	t.Helper()
	m := map[string]any{}
	for _, a := range args {
		am, ok := a.(map[string]any)
		if !ok || len(am) != 1 {
			t.Fatalf("%s: argument %#v is not a one-key mapping", id, a)
		}
		for k, v := range am {
			if _, dup := m[k]; dup {
				t.Errorf("%s: key %q twice", id, k)
			}
			m[k] = v
		}
	}
	return m
}

func TestRefusesBadOptions(t *testing.T) {
	cases := []struct {
		name string
		set  func(*Options)
		msg  string
	}{
		{"empty name", func(o *Options) { o.Name = "" }, "--name"},
		{"long name", func(o *Options) { o.Name = strings.Repeat("a", 32) }, "--name"},
		{"digit first", func(o *Options) { o.Name = "1fw" }, "--name"},
		{"dot", func(o *Options) { o.Name = "fw.v2" }, "--name"},
		{"space", func(o *Options) { o.Name = "fw x" }, "--name"},
		{"yaml injection", func(o *Options) { o.Name = "fw:\n  cmd.run: [reboot]" }, "--name"},
		{"jinja injection", func(o *Options) { o.Name = "{{salt.cmd.run('reboot')}}" }, "--name"},
		{"quote", func(o *Options) { o.Name = "fw'" }, "--name"},
		{"reserved none", func(o *Options) { o.Name = "none" }, "reserved"},
		{"dom0", func(o *Options) { o.Name = "dom0" }, "reserved"},
		{"-dm", func(o *Options) { o.Name = "fw-dm" }, "stubdomains"},
		{"label", func(o *Options) { o.Label = "pink" }, "--label"},
		{"memory 0", func(o *Options) { o.Memory = 0 }, "--memory"},
		{"memory negative", func(o *Options) { o.Memory = -64 }, "--memory"},
		{"memory too small", func(o *Options) { o.Memory = 31 }, "--memory"},
		{"memory too big", func(o *Options) { o.Memory = 100000 }, "--memory"},
		{"netvm injection", func(o *Options) { o.NetVM = "sys-net; reboot" }, "--netvm"},
		{"netvm self", func(o *Options) { o.NetVM = o.Name }, "its own netvm"},
		{"kernelopts quote", func(o *Options) { o.KernelOpts = "a' b" }, "--kernelopts"},
		{"kernelopts newline", func(o *Options) { o.KernelOpts = "a\n  - netvm: evil" }, "--kernelopts"},
		{"kernelopts jinja", func(o *Options) { o.KernelOpts = "{{ salt['cmd.run']('x') }}" }, "--kernelopts"},
		{"kernelopts shell", func(o *Options) { o.KernelOpts = "$(reboot)" }, "--kernelopts"},
		{"kernelopts comment", func(o *Options) { o.KernelOpts = "a #b" }, "--kernelopts"},
		{"kernelopts long", func(o *Options) { o.KernelOpts = strings.Repeat("a", 513) }, "512"},
		{"client bad", func(o *Options) { o.Clients = []string{"work", "x;y"} }, "--clients"},
		{"client self", func(o *Options) { o.Clients = []string{o.Name} }, "firewall itself"},
		{"client twice", func(o *Options) { o.Clients = []string{"a", "a"} }, "twice"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			o := DefaultOptions()
			c.set(&o)
			err := o.Validate()
			if err == nil || !strings.Contains(err.Error(), c.msg) {
				t.Fatalf("Validate = %v, want error containing %q", err, c.msg)
			}
			if _, err := Render(o, nil, "x"); err == nil {
				t.Fatal("Render accepted invalid options")
			}
		})
	}
	if err := DefaultOptions().Validate(); err != nil {
		t.Fatalf("defaults: %v", err)
	}
}

func TestWriteTreeRefuses(t *testing.T) {
	dist, f := fixture(t)
	o := DefaultOptions()
	// A tampered artifact: the tree must not appear.
	if err := os.WriteFile(filepath.Join(dist, "vmlinuz"), []byte("evil"), 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "tree")
	err := WriteTree(out, o, Source{Dir: dist, Sums: f, Label: "SHA256SUMS"})
	if !errors.Is(err, ErrMismatch) {
		t.Fatalf("tampered: %v", err)
	}
	if _, err := os.Stat(out); !os.IsNotExist(err) {
		t.Fatal("a tree was written for a tampered artifact")
	}
	leftovers, _ := filepath.Glob(filepath.Join(filepath.Dir(out), ".qgfw-salt-*"))
	if len(leftovers) != 0 {
		t.Fatalf("temporary directories left: %v", leftovers)
	}
	// Missing artifact.
	dist, f = fixture(t)
	os.Remove(filepath.Join(dist, "initramfs"))
	if err := WriteTree(out, o, Source{Dir: dist, Sums: f}); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing: %v", err)
	}
	// Artifact not in the sums file.
	dist, _ = fixture(t)
	partial, _ := sums.Compute(dist, []string{"vmlinuz"})
	if err := WriteTree(out, o, Source{Dir: dist, Sums: partial}); err == nil || !strings.Contains(err.Error(), "not listed") {
		t.Fatalf("unlisted: %v", err)
	}
	// Symlink out of the artifact directory.
	dist, f = fixture(t)
	os.Remove(filepath.Join(dist, "vmlinuz"))
	os.Symlink("/etc/passwd", filepath.Join(dist, "vmlinuz"))
	if err := WriteTree(out, o, Source{Dir: dist, Sums: f}); err == nil {
		t.Fatal("followed a symlink out of the artifact directory")
	}
	// Non-empty output directory.
	dist, f = fixture(t)
	if err := WriteTree(dist, o, Source{Dir: dist, Sums: f}); err == nil || !strings.Contains(err.Error(), "not empty") {
		t.Fatalf("non-empty out: %v", err)
	}
	// Render refuses digests it did not get in hex.
	if _, err := Render(o, []File{{Name: "vmlinuz", Sum: "zz"}}, "x"); err == nil {
		t.Fatal("Render accepted a bad digest")
	}
	if tree, err := Render(o, []File{{Name: "vmlinuz", Sum: hex.EncodeToString(make([]byte, 32))}}, "{{x}}"); err != nil || bytes.Contains(tree[o.Name+"/init.sls"], []byte("{{x}}")) {
		t.Fatalf("Jinja in the sums source reached the states (%v)", err)
	}
}
