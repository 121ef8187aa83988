package salt

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

// pyYAMLStates parses each document with PyYAML (what Salt's loader uses)
// and returns, per document, its state IDs with the function keys of each.
// PyYAML breaks lines at U+0085, U+2028 and U+2029, which Go's YAML
// packages do not, so only it can show an injection through them.
func pyYAMLStates(t *testing.T, docs [][]byte) []map[string][]string {
	t.Helper()
	if _, err := exec.LookPath("python3"); err != nil {
		t.Fatal("python3 with python3-yaml is needed (scripts/setup-host.sh installs it)")
	}
	in, err := json.Marshal(func() []string {
		s := []string{}
		for _, d := range docs {
			s = append(s, string(d))
		}
		return s
	}())
	if err != nil {
		t.Fatal(err)
	}
	const prog = `
import json, sys, yaml
out = []
for doc in json.load(sys.stdin):
    try:
        tree = yaml.safe_load(doc)
    except yaml.YAMLError as e:
        out.append({"<error>": [str(e)[:200]]})
        continue
    out.append({str(k): sorted(str(f) for f in (v or {})) if isinstance(v, dict) else ["<not a map>"]
                for k, v in (tree or {}).items()})
json.dump(out, sys.stdout)
`
	cmd := exec.Command("python3", "-c", prog)
	cmd.Stdin = bytes.NewReader(in)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	b, err := cmd.Output()
	if err != nil {
		t.Fatalf("python3 yaml: %v\n%s", err, stderr.String())
	}
	var res []map[string][]string
	if err := json.Unmarshal(b, &res); err != nil {
		t.Fatal(err)
	}
	return res
}

// wantStates is the state IDs and functions init.sls must have for o.
func wantStates(o Options) map[string][]string {
	w := map[string][]string{
		o.Name + "-kernel-dir": {"file.directory"},
		o.Name + "-install":    {"cmd.run"},
		o.Name:                 {"qvm.vm"},
	}
	for _, c := range o.Clients {
		w[o.Name+"-client-"+c] = []string{"qvm.prefs"}
	}
	if o.SetDefaultNetVM {
		w[o.Name+"-default-netvm"] = []string{"cmd.run"}
	}
	return w
}

// hostile are the pieces random values are made of: YAML's line breaks
// (including those only PyYAML knows), its syntax, Jinja, quotes, and
// ordinary text.
var hostile = []string{"\n", "\r", "\u0085", "\u2028", "\u2029", "\t", " ", ":", "- ", "#", "'", "\"", "{{", "}}", "{%", "%}",
	"[", "]", "{", "}", "&a", "*a", "!!python/object", "|", ">", "---", "...", "\\", "evil", "cmd.run", "x", "0", "é", "\u202e", "\x00",
	"  - name: touch /tmp/PWNED", "sys-net", "work", "/tmp/x", "=", ",", "."}

func randomValue(r *rand.Rand) string {
	var b strings.Builder
	for range r.IntN(6) {
		b.WriteString(hostile[r.IntN(len(hostile))])
	}
	return b.String()
}

// TestRenderedYAMLHasOnlyExpectedStates renders random values — valid ones
// mostly, hostile Unicode often — for every option and for the sums
// source's name (a path the user chose), and checks with PyYAML that every
// tree Render accepts has exactly the expected state IDs and functions.
// Before, a directory named with U+2028 added a cmd.run state.
func TestRenderedYAMLHasOnlyExpectedStates(t *testing.T) {
	r := rand.New(rand.NewPCG(12, 2026))
	files := []File{{Name: "vmlinuz", Sum: hex.EncodeToString(make([]byte, 32))}, {Name: "initramfs", Sum: strings.Repeat("ab", 32)}}
	var docs [][]byte
	var opts []Options
	pick := func(valid string) string {
		if r.IntN(3) == 0 {
			return randomValue(r)
		}
		return valid
	}
	// The case from the report first, then random ones.
	cases := []struct {
		o   Options
		src string
	}{{DefaultOptions(), "/tmp/x\u2028evil:\u2028  cmd.run:\u2028    - name: touch /tmp/PWNED\u2028/SHA256SUMS"}}
	for range 400 {
		o := DefaultOptions()
		o.Name, o.Label, o.NetVM, o.KernelOpts = pick(o.Name), pick(o.Label), pick(o.NetVM), pick("--ipv4-dns=10.139.1.1")
		for range r.IntN(3) {
			o.Clients = append(o.Clients, pick(fmt.Sprintf("work%d", len(o.Clients))))
		}
		o.SetDefaultNetVM = r.IntN(2) == 0
		cases = append(cases, struct {
			o   Options
			src string
		}{o, pick("dist/SHA256SUMS")})
	}
	refused := 0
	for _, c := range cases {
		tree, err := Render(c.o, files, c.src)
		if err != nil {
			refused++
			continue
		}
		docs = append(docs, tree[c.o.Name+"/init.sls"], tree[c.o.Name+".top"])
		opts = append(opts, c.o)
	}
	got := pyYAMLStates(t, docs)
	for i, o := range opts {
		sls, top := got[2*i], got[2*i+1]
		if want := wantStates(o); !mapsEqual(sls, want) {
			t.Errorf("options %+v: init.sls states %v, want %v\n%s", o, sls, want, docs[2*i])
		}
		if !mapsEqual(top, map[string][]string{"base": {"dom0"}}) {
			t.Errorf("options %+v: top file %v\n%s", o, top, docs[2*i+1])
		}
	}
	t.Logf("%d option sets: %d rendered and parsed by PyYAML, %d refused", len(cases), len(opts), refused)
	if len(opts) < 50 || refused < 50 {
		t.Fatalf("the generator should give both kinds: %d rendered, %d refused", len(opts), refused)
	}
}

func mapsEqual(a, b map[string][]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if !slices.Equal(v, b[k]) {
			return false
		}
	}
	return true
}
