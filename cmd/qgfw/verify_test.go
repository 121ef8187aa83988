package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sigstore/sigstore/pkg/cryptoutils"

	"github.com/qubes-go-firewall/qubes-go-firewall/builder/sign"
)

const verifyTestPassword = "test password"

// verifyRun runs the CLI in-process and returns exit code, stdout, stderr.
func verifyRun(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code := run(context.Background(), args, strings.NewReader(""), &out, &errOut)
	return code, out.String(), errOut.String()
}

// verifyFixture builds dist/ with two artifacts, SHA256SUMS written by
// sha256sum itself, and a key pair and signature made through the CLI.
func verifyFixture(t *testing.T) (dir string) {
	t.Helper()
	t.Setenv(passwordEnv, verifyTestPassword)
	dir = t.TempDir()
	dist := filepath.Join(dir, "dist")
	if err := os.Mkdir(dist, 0o755); err != nil {
		t.Fatal(err)
	}
	verifyWrite(t, filepath.Join(dist, "vmlinuz"), "kernel bytes")
	verifyWrite(t, filepath.Join(dist, "initramfs"), strings.Repeat("cpio", 1000))
	cmd := exec.Command("sha256sum", "initramfs", "vmlinuz")
	cmd.Dir = dist
	sums, err := cmd.Output()
	if err != nil {
		t.Fatalf("sha256sum: %v", err)
	}
	verifyWrite(t, filepath.Join(dist, "SHA256SUMS"), string(sums))
	if code, _, stderr := verifyRun(t, "keygen", "--key", filepath.Join(dir, "k.pem"), "--pub", filepath.Join(dir, "k.pub")); code != 0 {
		t.Fatalf("keygen: %d %s", code, stderr)
	}
	if code, _, stderr := verifyRun(t, "sign", "--key", filepath.Join(dir, "k.pem"), filepath.Join(dist, "SHA256SUMS")); code != 0 {
		t.Fatalf("sign: %d %s", code, stderr)
	}
	return dir
}

func verifyWrite(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestVerifyRoundTrip(t *testing.T) {
	dir := verifyFixture(t)
	dist := filepath.Join(dir, "dist")
	code, out, stderr := verifyRun(t, "verify", "--key", filepath.Join(dir, "k.pub"), dist)
	if code != exitOK {
		t.Fatalf("verify: %d\n%s%s", code, out, stderr)
	}
	for _, want := range []string{"signature  OK", "ok         " + filepath.Join(dist, "vmlinuz"), "verdict    OK: 2 files"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	// Explicit files, each looked up by base name.
	if code, out, _ := verifyRun(t, "verify", "--key", filepath.Join(dir, "k.pub"), filepath.Join(dist, "vmlinuz")); code != exitOK || !strings.Contains(out, "1 files") {
		t.Fatalf("verify FILE: %d\n%s", code, out)
	}
	// Without a key: hashes are checked, and the output says the signature was not.
	if code, out, _ := verifyRun(t, "verify", dist); code != exitOK || !strings.Contains(out, "NOT CHECKED") {
		t.Fatalf("unsigned verify: %d\n%s", code, out)
	}
	// The sums file still passes sha256sum -c after all this.
	cmd := exec.Command("sha256sum", "--strict", "-c", "SHA256SUMS")
	cmd.Dir = dist
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("sha256sum -c: %v\n%s", err, b)
	}
	// JSON.
	code, out, _ = verifyRun(t, "verify", "--json", "--key", filepath.Join(dir, "k.pub"), dist)
	var rep verifyReport
	if err := json.Unmarshal([]byte(out), &rep); err != nil || code != 0 {
		t.Fatalf("json: %d %v\n%s", code, err, out)
	}
	if rep.Verdict != "ok" || !rep.Signature.Verified || len(rep.Files) != 2 || rep.Files[0].Name != "initramfs" || rep.Files[0].Got != rep.Files[0].Want {
		t.Fatalf("json report: %+v", rep)
	}
}

func TestVerifyOpenSSLInterop(t *testing.T) {
	if _, err := exec.LookPath("openssl"); err != nil {
		t.Skip("openssl not installed")
	}
	dir := verifyFixture(t)
	dist := filepath.Join(dir, "dist")
	sig, err := os.ReadFile(filepath.Join(dist, "SHA256SUMS.sig"))
	if err != nil {
		t.Fatal(err)
	}
	// qgfw sign -> openssl, exactly as the README tells users.
	script := `openssl dgst -sha256 -verify k.pub -signature <(base64 -d dist/SHA256SUMS.sig) dist/SHA256SUMS`
	cmd := exec.Command("bash", "-c", script)
	cmd.Dir = dir
	if b, err := cmd.CombinedOutput(); err != nil || !strings.Contains(string(b), "Verified OK") {
		t.Fatalf("openssl verify of %q: %v\n%s", sig, err, b)
	}
	// openssl -> qgfw verify.
	script = `set -e
openssl ecparam -name prime256v1 -genkey -noout -out o.key
openssl pkey -in o.key -pubout -out o.pub
openssl dgst -sha256 -sign o.key dist/SHA256SUMS | base64 -w0 > o.sig`
	cmd = exec.Command("bash", "-c", script)
	cmd.Dir = dir
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("openssl sign: %v\n%s", err, b)
	}
	if code, out, stderr := verifyRun(t, "verify", "--key", filepath.Join(dir, "o.pub"), "--sig", filepath.Join(dir, "o.sig"), dist); code != exitOK {
		t.Fatalf("verify openssl signature: %d\n%s%s", code, out, stderr)
	}
	// And the openssl key does not vouch for the qgfw signature.
	if code, _, stderr := verifyRun(t, "verify", "--key", filepath.Join(dir, "o.pub"), dist); code != exitBadSig {
		t.Fatalf("wrong key: %d %s", code, stderr)
	}
}

func TestVerifyRefusals(t *testing.T) {
	dir := verifyFixture(t)
	dist := filepath.Join(dir, "dist")
	pub := filepath.Join(dir, "k.pub")
	sums, _ := os.ReadFile(filepath.Join(dist, "SHA256SUMS"))
	sig, _ := os.ReadFile(filepath.Join(dist, "SHA256SUMS.sig"))
	cases := []struct {
		name   string
		change func(t *testing.T, alt string) // alt: a copy of dist/
		args   []string                       // "ALT" is replaced by the copy
		code   int
		msg    string
	}{
		{"tampered artifact", func(t *testing.T, alt string) { verifyWrite(t, filepath.Join(alt, "vmlinuz"), "evil kernel") },
			[]string{"--key", pub, "ALT"}, exitMismatch, "MISMATCH"},
		{"missing artifact", func(t *testing.T, alt string) { os.Remove(filepath.Join(alt, "initramfs")) },
			[]string{"--key", pub, "ALT"}, exitMissingFile, "MISSING"},
		{"unlisted file", func(t *testing.T, alt string) { verifyWrite(t, filepath.Join(alt, "extra"), "x") },
			[]string{"--key", pub, "ALT/vmlinuz", "ALT/extra"}, exitMismatch, "not listed"},
		{"tampered sums", func(t *testing.T, alt string) {
			b := bytes.Clone(sums)
			b[0] = map[bool]byte{true: '1', false: '0'}[b[0] == '0']
			verifyWrite(t, filepath.Join(alt, "SHA256SUMS"), string(b))
		}, []string{"--key", pub, "ALT"}, exitBadSig, "signature  BAD"},
		{"truncated signature", func(t *testing.T, alt string) { verifyWrite(t, filepath.Join(alt, "SHA256SUMS.sig"), string(sig[:20])) },
			[]string{"--key", pub, "ALT"}, exitMalformed, "malformed"},
		{"missing signature", func(t *testing.T, alt string) { os.Remove(filepath.Join(alt, "SHA256SUMS.sig")) },
			[]string{"--key", pub, "ALT"}, exitNoSignature, "signature or key missing"},
		{"missing key", nil, []string{"--key", "ALT/nonexistent.pub", "ALT"}, exitNoSignature, "signature or key missing"},
		{"non-PEM key", func(t *testing.T, alt string) { verifyWrite(t, filepath.Join(alt, "bad.pub"), "not a key\n") },
			[]string{"--key", "ALT/bad.pub", "ALT"}, exitMalformed, "not PEM"},
		{"sums with absolute path", func(t *testing.T, alt string) {
			verifyWrite(t, filepath.Join(alt, "SHA256SUMS"), strings.Repeat("0", 64)+"  /etc/passwd\n")
		}, []string{"ALT"}, exitMalformed, "absolute"},
		{"sums with dotdot", func(t *testing.T, alt string) {
			verifyWrite(t, filepath.Join(alt, "SHA256SUMS"), strings.Repeat("0", 64)+"  ../k.pem\n")
		}, []string{"ALT"}, exitMalformed, "clean relative path"},
		{"huge sums", func(t *testing.T, alt string) {
			verifyWrite(t, filepath.Join(alt, "SHA256SUMS"), strings.Repeat(string(sums), 1<<20/len(sums)+1))
		}, []string{"ALT"}, exitMalformed, "larger than"},
		// Special files must not hang the tool (a FIFO blocks the reader
		// until someone writes to it): refused before a byte is read.
		{"FIFO artifact", func(t *testing.T, alt string) { mkfifo(t, filepath.Join(alt, "vmlinuz")) },
			[]string{"--key", pub, "ALT"}, exitMalformed, "not a regular file (a FIFO)"},
		{"FIFO sums", func(t *testing.T, alt string) { mkfifo(t, filepath.Join(alt, "SHA256SUMS")) },
			[]string{"--key", pub, "ALT"}, exitMalformed, "not a regular file (a FIFO)"},
		{"FIFO signature", func(t *testing.T, alt string) { mkfifo(t, filepath.Join(alt, "SHA256SUMS.sig")) },
			[]string{"--key", pub, "ALT"}, exitMalformed, "not a regular file (a FIFO)"},
		{"FIFO key", func(t *testing.T, alt string) { mkfifo(t, filepath.Join(alt, "fifo.pub")) },
			[]string{"--key", "ALT/fifo.pub", "ALT"}, exitMalformed, "not a regular file (a FIFO)"},
		{"sig without key", nil, []string{"--sig", "x", "ALT"}, exitUsage, "--sig needs --key"},
		{"bad release name", nil, []string{"--release", "../../etc", "ALT"}, exitUsage, "want vMAJOR"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			alt := filepath.Join(t.TempDir(), "dist")
			if err := os.CopyFS(alt, os.DirFS(dist)); err != nil {
				t.Fatal(err)
			}
			if c.change != nil {
				c.change(t, alt)
			}
			args := []string{"verify"}
			for _, a := range c.args {
				args = append(args, strings.ReplaceAll(a, "ALT", alt))
			}
			code, out, stderr := runGuarded(t, args...)
			if code != c.code || !strings.Contains(out+stderr, c.msg) {
				t.Fatalf("exit %d (want %d), output lacks %q:\n%s%s", code, c.code, c.msg, out, stderr)
			}
			t.Logf("%s", stderr)
		})
	}
}

// releaseTree lays out a checksums/ directory (keys/<fingerprint>.pub,
// releases/<version>/{SHA256SUMS,SHA256SUMS.sig,key}) with dist's signed
// sums as release version, signed by the key pub.
func releaseTree(t *testing.T, cs, version, dist, pub string) {
	t.Helper()
	rel := filepath.Join(cs, "releases", version)
	if err := os.MkdirAll(rel, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"SHA256SUMS", "SHA256SUMS.sig"} {
		b, _ := os.ReadFile(filepath.Join(dist, f))
		verifyWrite(t, filepath.Join(rel, f), string(b))
	}
	b, _ := os.ReadFile(pub)
	k, err := sign.ParsePublicKey(b)
	if err != nil {
		t.Fatal(err)
	}
	fp, _ := sign.Fingerprint(k)
	os.MkdirAll(filepath.Join(cs, "keys"), 0o755)
	verifyWrite(t, filepath.Join(cs, "keys", fp+".pub"), string(b))
	verifyWrite(t, filepath.Join(rel, "key"), fp+"\n")
}

func TestVerifyRelease(t *testing.T) {
	dir := verifyFixture(t)
	dist := filepath.Join(dir, "dist")
	cs := filepath.Join(dir, "repo", "checksums")
	releaseTree(t, cs, "v1.2.3", dist, filepath.Join(dir, "k.pub"))
	// --checksums-dir replaces the built-in release data, loudly.
	code, out, stderr := verifyRun(t, "verify", "--checksums-dir", cs, "--release", "v1.2.3", dist)
	if code != exitOK || !strings.Contains(stderr, "WARNING: --checksums-dir") || !strings.Contains(out, "SHA256:") {
		t.Fatalf("release from --checksums-dir: %d\n%s%s", code, out, stderr)
	}
	// A checksums/ next to the working directory is never used: v1.2.3
	// is not built in.
	t.Chdir(filepath.Join(dir, "repo"))
	if code, _, stderr := verifyRun(t, "verify", "--release", "v1.2.3", dist); code != exitUsage || !strings.Contains(stderr, "built into qgfw") {
		t.Fatalf("a release only on disk: %d %s", code, stderr)
	}
	// A release signed by some other key fails.
	t.Chdir(dir)
	other := filepath.Join(dir, "other")
	if code, _, _ := verifyRun(t, "keygen", "--key", filepath.Join(dir, "o.pem"), "--pub", filepath.Join(dir, "o.pub")); code != 0 {
		t.Fatal("keygen")
	}
	releaseTree(t, other, "v1.2.3", dist, filepath.Join(dir, "o.pub"))
	if code, _, stderr := verifyRun(t, "verify", "--checksums-dir", other, "--release", "v1.2.3", dist); code != exitBadSig {
		t.Fatalf("foreign key: %d %s", code, stderr)
	}
}

// TestVerifyHostileDownload: a download that ships its own checksums/ (its
// own key, its own signed sums of its own artifacts), verified from inside
// it as a user would. Before, --release found that checksums/ and said OK.
func TestVerifyHostileDownload(t *testing.T) {
	dir := verifyFixture(t) // dist/: artifacts with sums signed by k.pem
	dist := filepath.Join(dir, "dist")
	releaseTree(t, filepath.Join(dist, "checksums"), "v0.1.0", dist, filepath.Join(dir, "k.pub"))
	t.Chdir(dist)
	code, out, stderr := verifyRun(t, "verify", "--release", "v0.1.0", ".")
	if code != exitBadSig || !strings.Contains(stderr, "not the release's SHA256SUMS") {
		t.Fatalf("hostile download: exit %d (want %d)\n%s%s", code, exitBadSig, out, stderr)
	}
	// Without its own SHA256SUMS the artifacts meet the real release's
	// sums, signed by the built-in key, and do not match.
	os.Remove(filepath.Join(dist, "SHA256SUMS"))
	if code, out, stderr := verifyRun(t, "verify", "--release", "v0.1.0", "."); code != exitMismatch || !strings.Contains(out, "built into qgfw (key SHA256:") {
		t.Fatalf("artifacts against the built-in release: exit %d\n%s%s", code, out, stderr)
	}
}

func TestKeygenSignRefusals(t *testing.T) {
	dir := verifyFixture(t)
	key := filepath.Join(dir, "k.pem")
	// keygen refuses to overwrite.
	if code, _, stderr := verifyRun(t, "keygen", "--key", key, "--pub", filepath.Join(dir, "new.pub")); code == 0 || !strings.Contains(stderr, "already exists") {
		t.Fatalf("keygen overwrite: %d %s", code, stderr)
	}
	// sign refuses to overwrite the signature unless --force.
	sums := filepath.Join(dir, "dist", "SHA256SUMS")
	if code, _, stderr := verifyRun(t, "sign", "--key", key, sums); code == 0 || !strings.Contains(stderr, "already exists") {
		t.Fatalf("sign overwrite: %d %s", code, stderr)
	}
	if code, _, stderr := verifyRun(t, "sign", "--force", "--key", key, sums); code != 0 {
		t.Fatalf("sign --force: %d %s", code, stderr)
	}
	// Wrong password.
	t.Setenv(passwordEnv, "wrong")
	if code, _, stderr := verifyRun(t, "sign", "--force", "--key", key, sums); code == 0 || !strings.Contains(stderr, "wrong password") {
		t.Fatalf("wrong password: %d %s", code, stderr)
	}
	// No password source (stdin is not a terminal in tests).
	os.Unsetenv(passwordEnv)
	if code, _, stderr := verifyRun(t, "keygen", "--key", filepath.Join(dir, "a"), "--pub", filepath.Join(dir, "b")); code != exitUsage || !strings.Contains(stderr, passwordEnv) {
		t.Fatalf("no password: %d %s", code, stderr)
	}
	// A signature made with the wrong key type cannot be produced: an RSA key is refused.
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	rsaPEM, err := cryptoutils.MarshalPrivateKeyToPEM(rsaKey)
	if err != nil {
		t.Fatal(err)
	}
	verifyWrite(t, filepath.Join(dir, "rsa.pem"), string(rsaPEM))
	t.Setenv(passwordEnv, verifyTestPassword)
	if code, _, stderr := verifyRun(t, "sign", "--force", "--key", filepath.Join(dir, "rsa.pem"), sums); code != exitMalformed || !strings.Contains(stderr, "wrong key type") ||
		!strings.Contains(stderr, "an RSA key") || strings.Contains(stderr, "*rsa.") {
		t.Fatalf("RSA key (the message names the algorithm, not a Go type): %d %s", code, stderr)
	}
	// An unencrypted key (openssl's PKCS#8) signs without a password:
	// none in the environment, no terminal.
	plain := filepath.Join(dir, "plain.pem")
	if out, err := exec.Command("openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", plain).CombinedOutput(); err != nil {
		t.Fatalf("openssl genpkey: %v %s", err, out)
	}
	os.Unsetenv(passwordEnv)
	if code, _, stderr := verifyRun(t, "sign", "--force", "--key", plain, sums); code != 0 {
		t.Fatalf("unencrypted key without a password: %d %s", code, stderr)
	}
}

func mkfifo(t *testing.T, path string) {
	t.Helper()
	os.Remove(path)
	if err := syscall.Mkfifo(path, 0o644); err != nil {
		t.Fatal(err)
	}
}

// runGuarded is verifyRun that fails the test instead of hanging it when
// the command blocks (on a FIFO, say).
func runGuarded(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	type res struct {
		code        int
		out, stderr string
	}
	done := make(chan res, 1)
	go func() {
		code, out, stderr := verifyRun(t, args...)
		done <- res{code, out, stderr}
	}()
	select {
	case r := <-done:
		return r.code, r.out, r.stderr
	case <-time.After(30 * time.Second): // a hang guard, not a timing assertion
		t.Fatalf("qgfw %s still running after 30 s (blocked?)", strings.Join(args, " "))
		return 0, "", ""
	}
}
