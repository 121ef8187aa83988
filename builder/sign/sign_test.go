package sign

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sigstore/sigstore/pkg/cryptoutils"

	"github.com/qubes-go-firewall/qubes-go-firewall/builder/sums"
)

const sumsText = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad  initramfs\n" +
	"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855  vmlinuz\n"

var password = []byte("correct horse battery staple")

// signedDir makes a directory with SHA256SUMS, a key pair and a signature.
func signedDir(t *testing.T) (dir string, s Sums) {
	t.Helper()
	dir = t.TempDir()
	s = Sums{
		Path:      filepath.Join(dir, "SHA256SUMS"),
		Signature: filepath.Join(dir, "SHA256SUMS.sig"),
		Key:       filepath.Join(dir, "qgfw.pub"),
	}
	write(t, s.Path, sumsText)
	if err := WriteKeyPair(filepath.Join(dir, "qgfw.key"), s.Key, password); err != nil {
		t.Fatal(err)
	}
	if err := SignFile(s.Path, filepath.Join(dir, "qgfw.key"), password, s.Signature, false); err != nil {
		t.Fatal(err)
	}
	return dir, s
}

func write(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func openssl(t *testing.T, dir string, args ...string) []byte {
	t.Helper()
	if _, err := exec.LookPath("openssl"); err != nil {
		t.Skip("openssl not installed")
	}
	cmd := exec.Command("openssl", args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("openssl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func TestRoundTrip(t *testing.T) {
	dir, s := signedDir(t)
	f, err := s.Load()
	if err != nil {
		t.Fatal(err)
	}
	if got := string(f.Bytes()); got != sumsText {
		t.Fatalf("loaded %q", got)
	}
	st, err := os.Stat(filepath.Join(dir, "qgfw.key"))
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("private key mode %v, %v", st.Mode(), err)
	}
	priv, err := os.ReadFile(filepath.Join(dir, "qgfw.key"))
	if err != nil || !bytes.HasPrefix(priv, []byte("-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----")) {
		t.Fatalf("private key is not an encrypted sigstore key: %.60q", priv)
	}
	sig, _ := os.ReadFile(s.Signature)
	if bytes.ContainsAny(sig, "\n") {
		t.Fatalf("signature file has a newline: %q", sig)
	}
	// Refuses to overwrite the key pair and the signature.
	if err := WriteKeyPair(filepath.Join(dir, "qgfw.key"), filepath.Join(dir, "other.pub"), password); err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Fatalf("WriteKeyPair over an existing key: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "other.pub")); err == nil {
		t.Fatal("WriteKeyPair left a public key behind after refusing")
	}
	if err := SignFile(s.Path, filepath.Join(dir, "qgfw.key"), password, s.Signature, false); err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Fatalf("SignFile over an existing signature: %v", err)
	}
	if err := SignFile(s.Path, filepath.Join(dir, "qgfw.key"), password, s.Signature, true); err != nil {
		t.Fatalf("SignFile with overwrite: %v", err)
	}
	if _, _, err := GenerateKeyPair(nil); err == nil {
		t.Fatal("GenerateKeyPair accepted an empty password")
	}
}

// A signature made here verifies with openssl, and one made by openssl
// verifies here.
func TestOpenSSLInterop(t *testing.T) {
	dir, s := signedDir(t)
	sig, err := os.ReadFile(s.Signature)
	if err != nil {
		t.Fatal(err)
	}
	der, err := base64.StdEncoding.DecodeString(string(sig))
	if err != nil {
		t.Fatal(err)
	}
	write(t, filepath.Join(dir, "sig.der"), string(der))
	out := openssl(t, dir, "dgst", "-sha256", "-verify", "qgfw.pub", "-signature", "sig.der", "SHA256SUMS")
	if !strings.Contains(string(out), "Verified OK") {
		t.Fatalf("openssl: %s", out)
	}

	// openssl -> here, with an openssl key pair.
	openssl(t, dir, "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ossl.key")
	openssl(t, dir, "pkey", "-in", "ossl.key", "-pubout", "-out", "ossl.pub")
	openssl(t, dir, "dgst", "-sha256", "-sign", "ossl.key", "-out", "ossl.der", "SHA256SUMS")
	osslDER, err := os.ReadFile(filepath.Join(dir, "ossl.der"))
	if err != nil {
		t.Fatal(err)
	}
	write(t, filepath.Join(dir, "ossl.sig"), base64.StdEncoding.EncodeToString(osslDER)+"\n") // base64(1) style, with newline
	o := Sums{Path: s.Path, Signature: filepath.Join(dir, "ossl.sig"), Key: filepath.Join(dir, "ossl.pub")}
	if _, err := o.Load(); err != nil {
		t.Fatalf("openssl signature: %v", err)
	}
	// The openssl key is not ours: our signature must not verify with it.
	o.Signature = s.Signature
	if _, err := o.Load(); !errors.Is(err, ErrBadSignature) {
		t.Fatalf("wrong key: %v", err)
	}

	// An openssl encrypted PKCS#8 private key signs here.
	openssl(t, dir, "pkcs8", "-topk8", "-v2", "aes-256-cbc", "-in", "ossl.key", "-out", "ossl-enc.key", "-passout", "pass:"+string(password))
	sig2 := filepath.Join(dir, "ossl2.sig")
	if err := SignFile(s.Path, filepath.Join(dir, "ossl-enc.key"), password, sig2, false); err != nil {
		t.Fatalf("sign with openssl key: %v", err)
	}
	if _, err := (Sums{Path: s.Path, Signature: sig2, Key: filepath.Join(dir, "ossl.pub")}).Load(); err != nil {
		t.Fatal(err)
	}
	if err := SignFile(s.Path, filepath.Join(dir, "ossl-enc.key"), []byte("wrong"), filepath.Join(dir, "x.sig"), false); !errors.Is(err, ErrWrongPassword) {
		t.Fatalf("openssl key, wrong password: %v", err)
	}
}

func pemKey(t *testing.T, pub any) string {
	t.Helper()
	b, err := cryptoutils.MarshalPublicKeyToPEM(pub)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestRefusals(t *testing.T) {
	dir, s := signedDir(t)
	sig, _ := os.ReadFile(s.Signature)
	pubPEM, _ := os.ReadFile(s.Key)
	rsaKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	edPub, _, _ := ed25519.GenerateKey(rand.Reader)
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := base64.StdEncoding.DecodeString(string(sig))
	flipped := bytes.Clone(der)
	flipped[len(flipped)-1] ^= 1

	cases := []struct {
		name            string
		sums, sig, key  string // "" = keep the good one
		want            error
		wantMsgContains string
	}{
		{name: "good"},
		{name: "tampered sums", sums: strings.Replace(sumsText, "ba78", "ba79", 1), want: ErrBadSignature},
		{name: "extra line in sums", sums: sumsText + sumsText[:66] + "extra\n", want: ErrBadSignature},
		{name: "truncated signature", sig: string(sig[:len(sig)-8]), want: ErrMalformed},
		{name: "flipped signature bit", sig: base64.StdEncoding.EncodeToString(flipped), want: ErrBadSignature},
		{name: "signature not base64", sig: "!!!!", want: ErrMalformed},
		{name: "signature CRLF", sig: string(sig) + "\r\n", want: ErrMalformed},
		// As `base64` writes it: wrapped at 76 columns.
		{name: "signature wrapped at 76 columns", sig: wrap76(strings.TrimSuffix(string(sig), "\n")) + "\n"},
		{name: "signature with a blank line", sig: string(sig[:10]) + "\n\n" + string(sig[10:]), want: ErrMalformed},
		{name: "signature trailing DER", sig: base64.StdEncoding.EncodeToString(append(bytes.Clone(der), 0)), want: ErrMalformed},
		{name: "empty signature", sig: "\n", want: ErrMalformed},
		{name: "huge signature", sig: strings.Repeat("A", 1<<20), want: ErrMalformed},
		{name: "wrong key", key: pemKey(t, &other.PublicKey), want: ErrBadSignature},
		{name: "RSA key", key: pemKey(t, &rsaKey.PublicKey), want: ErrKeyType},
		{name: "ed25519 key", key: pemKey(t, edPub), want: ErrKeyType},
		{name: "P-384 key", key: pemKey(t, &p384.PublicKey), want: ErrKeyType},
		{name: "non-PEM key", key: "ssh-ed25519 AAAA... user@host\n", want: ErrMalformed},
		{name: "private key as public", key: "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", want: ErrMalformed},
		{name: "key with trailing block", key: string(pubPEM) + pemKey(t, &other.PublicKey), want: ErrMalformed},
		{name: "garbage PEM body", key: "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", want: ErrMalformed},
		{name: "huge key", key: strings.Repeat("A", MaxKeySize+1), want: ErrMalformed},
		{name: "sums with bad hex (still signed)", wantMsgContains: "bad hex digit"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			x := Sums{Path: s.Path, Signature: s.Signature, Key: s.Key}
			if c.sums != "" {
				x.Path = filepath.Join(dir, "alt-sums")
				write(t, x.Path, c.sums)
			}
			if c.sig != "" {
				x.Signature = filepath.Join(dir, "alt.sig")
				write(t, x.Signature, c.sig)
			}
			if c.key != "" {
				x.Key = filepath.Join(dir, "alt.pub")
				write(t, x.Key, c.key)
			}
			if c.wantMsgContains != "" {
				// A sums file that is malformed but correctly signed: the
				// signature passes, parsing still refuses it.
				x.Path = filepath.Join(dir, "bad-hex")
				write(t, x.Path, "zz"+sumsText[2:])
				key, err := ReadPrivateKey(filepath.Join(dir, "qgfw.key"), password)
				if err != nil {
					t.Fatal(err)
				}
				data, _ := os.ReadFile(x.Path)
				sg, err := Sign(key, data)
				if err != nil {
					t.Fatal(err)
				}
				x.Signature = filepath.Join(dir, "bad-hex.sig")
				write(t, x.Signature, string(sg))
				_, err = x.Load()
				var pe *sums.ParseError
				if !errors.As(err, &pe) || !strings.Contains(err.Error(), c.wantMsgContains) {
					t.Fatalf("Load = %v", err)
				}
				return
			}
			_, err := x.Load()
			if !errors.Is(err, c.want) {
				t.Fatalf("Load = %v, want %v", err, c.want)
			}
			if err != nil {
				t.Logf("%v", err) // the message a user sees
			}
		})
	}

	if _, err := ReadPrivateKey(filepath.Join(dir, "qgfw.key"), []byte("wrong")); !errors.Is(err, ErrWrongPassword) {
		t.Errorf("wrong password: %v", err)
	}
	if _, err := ReadPrivateKey(filepath.Join(dir, "qgfw.key"), nil); !errors.Is(err, ErrWrongPassword) {
		t.Errorf("no password: %v", err)
	}
	if _, err := ReadPrivateKey(s.Key, password); !errors.Is(err, ErrMalformed) {
		t.Errorf("public key as private: %v", err)
	}
	// Signing refuses a file that is not a sums file.
	write(t, filepath.Join(dir, "notsums"), "hello\n")
	if err := SignFile(filepath.Join(dir, "notsums"), filepath.Join(dir, "qgfw.key"), password, filepath.Join(dir, "n.sig"), false); err == nil {
		t.Error("SignFile signed a non-sums file")
	}
}

func FuzzParseSignature(f *testing.F) {
	f.Add([]byte("MEUCIQDk7Mm9a7Jw1dX0bqD4zq7cI1l4wH9x3qUq1w3Qe3rTqgIgY2x8w1r6m8S3fQZy9q2Q2v7k0o8q3b0m5c6a3w2u1vQ=\n"))
	f.Add([]byte("MAYCAQECAQE="))
	f.Add([]byte(""))
	f.Fuzz(func(t *testing.T, data []byte) {
		der, err := ParseSignature(data)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error not ErrMalformed: %v", err)
			}
			return
		}
		if len(der) == 0 || len(der) > MaxSignatureSize {
			t.Fatalf("accepted %d DER bytes", len(der))
		}
	})
}

func FuzzParseKeys(f *testing.F) {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	pub, _ := cryptoutils.MarshalPublicKeyToPEM(&k.PublicKey)
	priv, _ := cryptoutils.MarshalPrivateKeyToPEM(k)
	f.Add(pub)
	f.Add(priv)
	f.Add([]byte("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		if key, err := ParsePublicKey(data); err == nil && key.Curve != elliptic.P256() {
			t.Fatal("accepted a non-P-256 public key")
		}
		// Unencrypted key types only: decrypting with scrypt per input would
		// make the fuzzer crawl without exercising more of our code.
		if bytes.Contains(data, []byte("ENCRYPTED")) {
			return
		}
		if key, err := ParsePrivateKey(data, nil); err == nil && key.Curve != elliptic.P256() {
			t.Fatal("accepted a non-P-256 private key")
		}
	})
}

func wrap76(s string) string {
	var b strings.Builder
	for len(s) > 76 {
		b.WriteString(s[:76] + "\n")
		s = s[76:]
	}
	b.WriteString(s)
	return b.String()
}
