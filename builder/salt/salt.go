// Package salt renders the dom0 Salt state tree that installs the image as
// a Qubes firewall VM: the templates of the repository's salt/ directory,
// filled in with validated settings and with SHA-256 values that this
// package computed itself from the bytes it copied into the tree.
//
// Everything rendered ends up in YAML that Salt first passes through Jinja
// and in qvm-* command lines, so every value is checked against a narrow
// character set before it is used (no quoting tricks to get right).
package salt

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"text/template"

	"github.com/qubes-go-firewall/qubes-go-firewall/builder/regfile"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/sums"
	salttemplates "github.com/qubes-go-firewall/qubes-go-firewall/salt"
)

// Artifacts are the files installed into /var/lib/qubes/vm-kernels/<name>/.
var artifacts = []string{"initramfs", "vmlinuz"}

// ErrMismatch: an artifact's bytes differ from its SHA256SUMS entry.
var ErrMismatch = errors.New("artifact does not match SHA256SUMS")

// Labels Qubes accepts (qvm-prefs label choices in the qvm state module).
var labels = []string{"red", "orange", "yellow", "green", "gray", "blue", "purple", "black"}

// Memory bounds in MB: the firewall needs 32; more than 1024 is a mistake.
const (
	MinMemory = 32
	MaxMemory = 1024
)

// maxKernelopts is Qubes' limit for the kernelopts property.
const maxKernelopts = 512

// Qubes' VM name rule (qubes/vm/__init__.py validate_name).
var vmName = regexp.MustCompile(`^[a-zA-Z][a-zA-Z0-9_-]{0,30}$`)

// kernelopts may hold options like the BSD-mode "--ipv4=10.137.0.5
// --ipv4-gw=10.137.0.1" or "console=hvc0 loglevel=4"; nothing that YAML,
// Jinja ({{ {% {#) or a shell could read specially.
var kerneloptsChars = regexp.MustCompile(`^[A-Za-z0-9 =.,:_/+-]*$`)

// labelChars is what a name shown in a comment of the states may hold:
// printable ASCII without YAML's comment, quoting and flow characters.
var labelChars = regexp.MustCompile(`^[A-Za-z0-9 ._/()+:=@-]{1,256}$`)

// Options are the settings of the firewall VM.
type Options struct {
	Name            string   // VM name, also the kernel directory name
	Label           string   // Qubes label colour
	Memory          int      // MB; memory = maxmem (no balloon driver)
	NetVM           string   // upstream VM; "" or "none" for none
	KernelOpts      string   // kernel command line additions
	Clients         []string // VMs to switch to the new firewall
	SetDefaultNetVM bool     // make it the system's default netvm
}

// DefaultOptions returns the defaults of `qgfw salt`.
func DefaultOptions() Options {
	return Options{Name: "sys-go-firewall", Label: "green", Memory: 64, NetVM: "sys-net"}
}

// CheckVMName applies Qubes' VM name rules, plus names that must not be
// used here (dom0, the reserved "none"/"default", the "-dm" suffix Qubes
// keeps for device-model stubdomains).
func CheckVMName(name string) error {
	if !vmName.MatchString(name) {
		return fmt.Errorf("VM name %q: want a letter followed by at most 30 letters, digits, '-' or '_'", name)
	}
	switch {
	case name == "none" || name == "default" || name == "dom0" || name == "Domain-0":
		return fmt.Errorf("VM name %q is reserved", name)
	case strings.HasSuffix(name, "-dm"):
		return fmt.Errorf("VM name %q: names ending in -dm are reserved for stubdomains", name)
	}
	return nil
}

// Validate checks every option.
func (o Options) Validate() error {
	if err := CheckVMName(o.Name); err != nil {
		return fmt.Errorf("--name: %w", err)
	}
	if !slices.Contains(labels, o.Label) {
		return fmt.Errorf("--label %q: want one of %s", o.Label, strings.Join(labels, ", "))
	}
	if o.Memory < MinMemory || o.Memory > MaxMemory {
		return fmt.Errorf("--memory %d: want %d..%d (MB)", o.Memory, MinMemory, MaxMemory)
	}
	if o.NetVM != "" && o.NetVM != "none" {
		if err := CheckVMName(o.NetVM); err != nil {
			return fmt.Errorf("--netvm: %w", err)
		}
		if o.NetVM == o.Name {
			return fmt.Errorf("--netvm %q: the firewall cannot be its own netvm", o.NetVM)
		}
	}
	if len(o.KernelOpts) > maxKernelopts {
		return fmt.Errorf("--kernelopts: %d characters, Qubes allows %d", len(o.KernelOpts), maxKernelopts)
	}
	if !kerneloptsChars.MatchString(o.KernelOpts) {
		return fmt.Errorf("--kernelopts %q: only letters, digits, spaces and = . , : _ / + - are allowed", o.KernelOpts)
	}
	seen := map[string]bool{}
	for _, c := range o.Clients {
		if err := CheckVMName(c); err != nil {
			return fmt.Errorf("--clients: %w", err)
		}
		if c == o.Name {
			return fmt.Errorf("--clients: %q is the firewall itself", c)
		}
		if c == o.NetVM {
			// Its netvm would be the firewall, whose netvm it is: a loop.
			return fmt.Errorf("--clients: %q is the firewall's --netvm (a loop)", c)
		}
		if seen[c] {
			return fmt.Errorf("--clients: %q given twice", c)
		}
		seen[c] = true
	}
	return nil
}

// File is one installed artifact and its SHA-256 (hex).
type File struct{ Name, Sum string }

// data is what the templates see.
type data struct {
	Options
	Files      []File
	Start      bool // clients and the default netvm need a running firewall
	SumsSource string
	KeyLines   []string // the PEM public key the signature must verify with; none: unsigned
}

// pemLine is what a line of a PEM public key may hold, and so all that
// reaches the state's shell from the key.
var pemLine = regexp.MustCompile(`^(-----(BEGIN|END) PUBLIC KEY-----|[A-Za-z0-9+/=]{1,76})$`)

// Render fills the templates and returns the state tree's text files by
// relative path: "<name>.top" and "<name>/init.sls". files are the
// artifacts with their digests; sumsSource is named in a comment.
func Render(o Options, files []File, sumsSource string) (map[string][]byte, error) {
	return RenderSigned(o, files, sumsSource, nil)
}

// RenderSigned is Render for sums signed with the PEM public key pub: the
// state checks that signature in dom0 too (nil: no signature check).
func RenderSigned(o Options, files []File, sumsSource string, pub []byte) (map[string][]byte, error) {
	var keyLines []string
	if pub != nil {
		keyLines = strings.Split(strings.TrimSpace(string(pub)), "\n")
		for _, l := range keyLines {
			if !pemLine.MatchString(l) {
				return nil, fmt.Errorf("render: the public key is not a plain PEM public key (line %q)", l)
			}
		}
	}
	if err := o.Validate(); err != nil {
		return nil, err
	}
	for _, f := range files {
		if _, err := hex.DecodeString(f.Sum); err != nil || len(f.Sum) != 64 || !slices.Contains(artifacts, f.Name) {
			return nil, fmt.Errorf("render: bad artifact %q sha256 %q", f.Name, f.Sum)
		}
	}
	if !labelChars.MatchString(sumsSource) {
		// A path the user chose: YAML breaks lines at U+0085, U+2028
		// and U+2029 too, so anything but plain ASCII could end the
		// comment and start a state. The comment loses the name.
		sumsSource = "the sums file qgfw verified (its path has other characters)"
	}
	if o.NetVM == "none" {
		o.NetVM = ""
	}
	d := data{Options: o, Files: files, Start: len(o.Clients) > 0 || o.SetDefaultNetVM, SumsSource: sumsSource, KeyLines: keyLines}
	tmpl, err := template.New("").Option("missingkey=error").ParseFS(salttemplates.Templates, "*.tmpl")
	if err != nil {
		return nil, fmt.Errorf("render: %w", err)
	}
	out := map[string][]byte{}
	for file, name := range map[string]string{"top.tmpl": o.Name + ".top", "init.sls.tmpl": o.Name + "/init.sls"} {
		var b bytes.Buffer
		if err := tmpl.ExecuteTemplate(&b, file, d); err != nil {
			return nil, fmt.Errorf("render %s: %w", file, err)
		}
		// Defence in depth: the states are printable ASCII and newlines,
		// whatever a future field lets through.
		if i := bytes.IndexFunc(b.Bytes(), func(r rune) bool { return r != '\n' && (r < ' ' || r > '~') }); i >= 0 {
			return nil, fmt.Errorf("render %s: a character outside printable ASCII at byte %d", file, i)
		}
		out[name] = b.Bytes()
	}
	return out, nil
}

// Source says where the artifacts come from and what vouches for them.
type Source struct {
	Dir   string     // holds vmlinuz and initramfs
	Sums  *sums.File // verified (and, if so configured, signature-checked) sums
	Label string     // how to name Sums in the state's comment, e.g. "dist/SHA256SUMS"
	// Extra files copied verbatim into <name>/ so that dom0 can re-check
	// them (e.g. SHA256SUMS and SHA256SUMS.sig), by base name.
	Extra map[string][]byte
	// PublicKey (PEM) signed Sums: the state checks SHA256SUMS.sig (in
	// Extra) with it in dom0. Nil: the sums were not signed.
	PublicKey []byte
}

// WriteTree writes the state tree into out, which must not exist or be an
// empty directory. It copies each artifact into the tree while hashing the
// copied bytes, refuses (ErrMismatch) if a digest differs from src.Sums,
// and renders the states with the digests it computed. The tree appears
// at out only when complete.
func WriteTree(out string, o Options, src Source) error {
	if err := o.Validate(); err != nil {
		return err
	}
	if entries, err := os.ReadDir(out); err == nil && len(entries) > 0 {
		return fmt.Errorf("write salt tree: %s exists and is not empty", out)
	} else if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("write salt tree: %w", err)
	}
	tmp, err := os.MkdirTemp(filepath.Dir(filepath.Clean(out)), ".qgfw-salt-*")
	if err != nil {
		return fmt.Errorf("write salt tree: %w", err)
	}
	defer os.RemoveAll(tmp) // no-op once renamed
	if err := os.Chmod(tmp, 0o755); err != nil {
		return fmt.Errorf("write salt tree: %w", err)
	}
	stateDir := filepath.Join(tmp, o.Name)
	if err := os.Mkdir(stateDir, 0o755); err != nil {
		return fmt.Errorf("write salt tree: %w", err)
	}
	root, err := os.OpenRoot(src.Dir)
	if err != nil {
		return fmt.Errorf("write salt tree: %w", err)
	}
	defer root.Close()
	var files []File
	for _, name := range artifacts {
		want, ok := src.Sums.Lookup(name)
		if !ok {
			return fmt.Errorf("write salt tree: %s is not listed in %s", name, src.Label)
		}
		got, err := copyHashed(root, name, filepath.Join(stateDir, name))
		if err != nil {
			return fmt.Errorf("write salt tree: %w", err)
		}
		if got != want.Sum {
			return fmt.Errorf("write salt tree: %s/%s: %w: sha256 %x, want %s", src.Dir, name, ErrMismatch, got, want.Hex())
		}
		files = append(files, File{Name: name, Sum: hex.EncodeToString(got[:])})
	}
	if src.PublicKey != nil && (src.Extra["SHA256SUMS"] == nil || src.Extra["SHA256SUMS.sig"] == nil) {
		return errors.New("write salt tree: a public key without SHA256SUMS and SHA256SUMS.sig to check in dom0")
	}
	rendered, err := RenderSigned(o, files, src.Label, src.PublicKey)
	if err != nil {
		return err
	}
	for name, content := range src.Extra {
		if filepath.Base(name) != name || slices.Contains(artifacts, name) || name == "init.sls" {
			return fmt.Errorf("write salt tree: bad extra file name %q", name)
		}
		rendered[o.Name+"/"+name] = content
	}
	for name, content := range rendered {
		if err := os.WriteFile(filepath.Join(tmp, name), content, 0o644); err != nil {
			return fmt.Errorf("write salt tree: %w", err)
		}
	}
	if err := os.Remove(out); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("write salt tree: %w", err)
	}
	if err := os.Rename(tmp, out); err != nil {
		return fmt.Errorf("write salt tree: %w", err)
	}
	return nil
}

// copyHashed copies a regular file from root to dst and returns the SHA-256
// of the bytes written, so the digest describes the copy, not a file that
// might change after it was hashed.
func copyHashed(root *os.Root, name, dst string) ([32]byte, error) {
	var sum [32]byte
	in, err := regfile.OpenIn(root, name)
	if err != nil {
		return sum, err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return sum, err
	}
	if !st.Mode().IsRegular() {
		return sum, fmt.Errorf("%s: not a regular file", name)
	}
	outF, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return sum, err
	}
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(outF, h), io.LimitReader(in, st.Size()+1))
	if cerr := outF.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return sum, fmt.Errorf("copy %s: %w", name, err)
	}
	if n != st.Size() {
		return sum, fmt.Errorf("copy %s: size changed while reading", name)
	}
	h.Sum(sum[:0])
	return sum, nil
}
