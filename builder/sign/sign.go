// Package sign creates keys for, signs and verifies SHA256SUMS files with
// github.com/sigstore/sigstore: ECDSA P-256 over SHA-256, the signature
// stored as base64 of its ASN.1 DER encoding — the format `cosign
// sign-blob` writes and `openssl dgst -sha256 -verify` reads once decoded.
//
// Private keys are PEM "ENCRYPTED SIGSTORE PRIVATE KEY" blocks (scrypt +
// secretbox, as cosign writes them); public keys are PEM "PUBLIC KEY"
// (PKIX), which openssl reads. Every file this package reads is read with a
// size bound, because keys, signatures and sums files may come from the
// same untrusted download as the artifacts.
package sign

import (
	"bytes"
	"crypto"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"os"
	"slices"

	"github.com/sigstore/sigstore/pkg/cryptoutils"
	"github.com/sigstore/sigstore/pkg/signature"

	"github.com/qubes-go-firewall/qubes-go-firewall/builder/regfile"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/sums"
)

// Size bounds for the files this package reads. A P-256 PEM key is a few
// hundred bytes; a base64 DER signature at most 96 characters.
const (
	MaxKeySize       = 16 << 10
	MaxSignatureSize = 1 << 10
)

// Errors callers map to exit codes; returned wrapped with context.
var (
	// ErrBadSignature: the signature is well-formed but does not verify.
	ErrBadSignature = errors.New("signature does not verify")
	// ErrMalformed: a key or signature file cannot be parsed.
	ErrMalformed = errors.New("malformed")
	// ErrKeyType: a well-formed key that is not ECDSA P-256.
	ErrKeyType = errors.New("wrong key type (want ECDSA P-256)")
	// ErrWrongPassword: the private key could not be decrypted.
	ErrWrongPassword = errors.New("cannot decrypt private key (wrong password?)")
	// ErrNoSignature: the signature or the public key to check it with
	// does not exist — nothing vouches for the sums (not the same as a
	// missing artifact).
	ErrNoSignature = errors.New("signature or key missing")
)

// missing marks a file that is not there as ErrNoSignature.
func missing(err error) error {
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%w: %w", ErrNoSignature, err)
	}
	return err
}

// GenerateKeyPair creates a P-256 key pair and returns the private key
// encrypted with password and the public key, both PEM. An empty password is
// refused: a signing key must not sit on disk in the clear.
func GenerateKeyPair(password []byte) (privPEM, pubPEM []byte, err error) {
	if len(password) == 0 {
		return nil, nil, errors.New("generate key pair: empty password")
	}
	privPEM, pubPEM, err = cryptoutils.GeneratePEMEncodedECDSAKeyPair(elliptic.P256(), cryptoutils.StaticPasswordFunc(password))
	if err != nil {
		return nil, nil, fmt.Errorf("generate key pair: %w", err)
	}
	return privPEM, pubPEM, nil
}

// WriteKeyPair generates a key pair and writes it to privPath (mode 0600)
// and pubPath (mode 0644). Existing files are never overwritten.
func WriteKeyPair(privPath, pubPath string, password []byte) error {
	privPEM, pubPEM, err := GenerateKeyPair(password)
	if err != nil {
		return err
	}
	for _, p := range []string{privPath, pubPath} {
		if _, err := os.Lstat(p); err == nil {
			return fmt.Errorf("write key pair: %s already exists; refusing to overwrite", p)
		}
	}
	if err := WriteNew(privPath, privPEM, 0o600); err != nil {
		return fmt.Errorf("write key pair: %w", err)
	}
	if err := WriteNew(pubPath, pubPEM, 0o644); err != nil {
		os.Remove(privPath)
		return fmt.Errorf("write key pair: %w", err)
	}
	return nil
}

// WriteNew creates path with data, failing if it already exists.
func WriteNew(path string, data []byte, perm os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
	if err != nil {
		if errors.Is(err, os.ErrExist) {
			return fmt.Errorf("%s already exists; refusing to overwrite", path)
		}
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		os.Remove(path)
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		os.Remove(path)
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// ReadBounded reads a whole file, refusing one larger than limit without
// reading more than limit+1 bytes of it.
func ReadBounded(path string, limit int64) ([]byte, error) {
	data, err := regfile.ReadBounded(path, limit)
	if tl := (regfile.ErrTooLarge{}); errors.As(err, &tl) {
		return nil, fmt.Errorf("read %s: %w: larger than %d bytes", path, ErrMalformed, limit)
	}
	return data, err
}

// singlePEM returns the only PEM block in data, refusing trailing garbage
// and extra blocks that other parsers might pick instead.
func singlePEM(data []byte) (*pem.Block, error) {
	block, rest := pem.Decode(data)
	if block == nil {
		return nil, fmt.Errorf("%w: not PEM", ErrMalformed)
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		return nil, fmt.Errorf("%w: data after the PEM block", ErrMalformed)
	}
	if len(block.Headers) != 0 {
		return nil, fmt.Errorf("%w: unexpected PEM headers", ErrMalformed)
	}
	return block, nil
}

// ParsePublicKey parses a PEM "PUBLIC KEY" and requires ECDSA P-256.
func ParsePublicKey(data []byte) (*ecdsa.PublicKey, error) {
	block, err := singlePEM(data)
	if err != nil {
		return nil, fmt.Errorf("public key: %w", err)
	}
	if block.Type != string(cryptoutils.PublicKeyPEMType) {
		return nil, fmt.Errorf("public key: %w: PEM type %q, want %q", ErrMalformed, block.Type, cryptoutils.PublicKeyPEMType)
	}
	key, err := cryptoutils.UnmarshalPEMToPublicKey(pem.EncodeToMemory(block))
	if err != nil {
		return nil, fmt.Errorf("public key: %w: %v", ErrMalformed, err)
	}
	ec, ok := key.(*ecdsa.PublicKey)
	if !ok {
		return nil, fmt.Errorf("public key: %w: got %s", ErrKeyType, keyKind(key))
	}
	if ec.Curve != elliptic.P256() {
		return nil, fmt.Errorf("public key: %w: curve %s", ErrKeyType, ec.Curve.Params().Name)
	}
	return ec, nil
}

// ReadPublicKey reads and parses a public key file (bounded).
func ReadPublicKey(path string) (*ecdsa.PublicKey, error) {
	data, err := ReadBounded(path, MaxKeySize)
	if err != nil {
		return nil, fmt.Errorf("public key: %w", missing(err))
	}
	key, err := ParsePublicKey(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return key, nil
}

// ParsePrivateKey decrypts and parses a PEM private key and requires ECDSA
// P-256. Besides sigstore's encrypted format it accepts what cryptoutils
// reads (PKCS#8, encrypted PKCS#8, SEC 1), so that keys made by openssl work.
func ParsePrivateKey(data, password []byte) (*ecdsa.PrivateKey, error) {
	block, err := singlePEM(data)
	if err != nil {
		return nil, fmt.Errorf("private key: %w", err)
	}
	encrypted := isEncrypted(block.Type)
	if encrypted && len(password) == 0 {
		return nil, fmt.Errorf("private key: %w: empty password", ErrWrongPassword)
	}
	key, err := cryptoutils.UnmarshalPEMToPrivateKey(pem.EncodeToMemory(block), cryptoutils.StaticPasswordFunc(password))
	if err != nil {
		if encrypted {
			return nil, fmt.Errorf("private key: %w", ErrWrongPassword)
		}
		return nil, fmt.Errorf("private key: %w: %v", ErrMalformed, err)
	}
	ec, ok := key.(*ecdsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("private key: %w: got %s", ErrKeyType, keyKind(key))
	}
	if ec.Curve != elliptic.P256() {
		return nil, fmt.Errorf("private key: %w: curve %s", ErrKeyType, ec.Curve.Params().Name)
	}
	return ec, nil
}

// keyKind names a key's algorithm for a message (not its Go type).
func keyKind(key any) string {
	switch key.(type) {
	case *rsa.PublicKey, *rsa.PrivateKey:
		return "an RSA key"
	case ed25519.PublicKey, ed25519.PrivateKey:
		return "an Ed25519 key"
	case *ecdh.PublicKey, *ecdh.PrivateKey:
		return "an X25519/ECDH key"
	}
	return "a key of another kind"
}

// PrivateKeyEncrypted reports whether the private key file at path is
// encrypted (and so needs a password).
func PrivateKeyEncrypted(path string) (bool, error) {
	data, err := ReadBounded(path, MaxKeySize)
	if err != nil {
		return false, fmt.Errorf("private key: %w", err)
	}
	block, err := singlePEM(data)
	if err != nil {
		return false, fmt.Errorf("private key %s: %w", path, err)
	}
	return isEncrypted(block.Type), nil
}

func isEncrypted(pemType string) bool {
	return pemType == string(cryptoutils.EncryptedSigstorePrivateKeyPEMType) ||
		pemType == "ENCRYPTED COSIGN PRIVATE KEY" || pemType == "ENCRYPTED PRIVATE KEY"
}

// ReadPrivateKey reads (bounded) and decrypts a private key file.
func ReadPrivateKey(path string, password []byte) (*ecdsa.PrivateKey, error) {
	data, err := ReadBounded(path, MaxKeySize)
	if err != nil {
		return nil, fmt.Errorf("private key: %w", err)
	}
	key, err := ParsePrivateKey(data, password)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return key, nil
}

// Sign signs message and returns the signature file content: base64 of the
// DER signature, without a trailing newline (as cosign writes it).
func Sign(key *ecdsa.PrivateKey, message []byte) ([]byte, error) {
	signer, err := signature.LoadECDSASigner(key, crypto.SHA256)
	if err != nil {
		return nil, fmt.Errorf("sign: %w", err)
	}
	der, err := signer.SignMessage(bytes.NewReader(message))
	if err != nil {
		return nil, fmt.Errorf("sign: %w", err)
	}
	return []byte(base64.StdEncoding.EncodeToString(der)), nil
}

// ParseSignature decodes signature file content: standard base64 of an
// ASN.1 DER ECDSA signature with nothing after it, on one line or wrapped
// (as `base64` wraps at 76 columns), with an optional final newline. It
// returns the DER bytes.
func ParseSignature(data []byte) ([]byte, error) {
	if len(data) > MaxSignatureSize {
		return nil, fmt.Errorf("signature: %w: larger than %d bytes", ErrMalformed, MaxSignatureSize)
	}
	// Lines of base64 joined: line breaks only between characters, no
	// blank lines, no carriage returns or other white space.
	lines := bytes.Split(bytes.TrimSuffix(data, []byte("\n")), []byte("\n"))
	text := bytes.Join(lines, nil)
	if len(text) == 0 {
		return nil, fmt.Errorf("signature: %w: empty", ErrMalformed)
	}
	der := make([]byte, base64.StdEncoding.DecodedLen(len(text)))
	n, err := base64.StdEncoding.Strict().Decode(der, text)
	// (Strict decoding still skips CR and LF: refuse them, and blank
	// lines, here.)
	if err != nil || bytes.ContainsAny(text, "\r") || slices.ContainsFunc(lines, func(l []byte) bool { return len(l) == 0 }) {
		return nil, fmt.Errorf("signature: %w: not standard base64 (one line, or lines as base64 wraps them)", ErrMalformed)
	}
	der = der[:n]
	var rs struct{ R, S *big.Int }
	rest, err := asn1.Unmarshal(der, &rs)
	if err != nil {
		return nil, fmt.Errorf("signature: %w: not an ASN.1 DER ECDSA signature: %v", ErrMalformed, err)
	}
	if len(rest) != 0 {
		return nil, fmt.Errorf("signature: %w: %d bytes after the DER signature", ErrMalformed, len(rest))
	}
	if rs.R.Sign() <= 0 || rs.S.Sign() <= 0 {
		return nil, fmt.Errorf("signature: %w: non-positive r or s", ErrMalformed)
	}
	return der, nil
}

// Verify checks a DER signature over message with key.
func Verify(key *ecdsa.PublicKey, der, message []byte) error {
	v, err := signature.LoadECDSAVerifier(key, crypto.SHA256)
	if err != nil {
		return fmt.Errorf("verify: %w", err)
	}
	if err := v.VerifySignature(bytes.NewReader(der), bytes.NewReader(message)); err != nil {
		return ErrBadSignature
	}
	return nil
}

// Sums names the files that make up a (possibly signed) sums file.
type Sums struct {
	Path      string // the SHA256SUMS file
	Signature string // its detached signature; used when Key is set
	Key       string // PEM public key; "" = do not check a signature
	// FS, when set, holds the three files (the release data built into
	// qgfw); the names are paths in it. Otherwise they are on disk.
	FS fs.FS
}

// read reads name from s.FS or the disk, bounded.
func (s Sums) read(name string, limit int64) ([]byte, error) {
	if s.FS == nil {
		return ReadBounded(name, limit)
	}
	data, err := fs.ReadFile(s.FS, name)
	if err != nil {
		return nil, err
	}
	if int64(len(data)) > limit {
		return nil, fmt.Errorf("read %s: %w: larger than %d bytes", name, ErrMalformed, limit)
	}
	return data, nil
}

// KeyPEM returns the public key s.Key, checked to be one (PEM).
func (s Sums) KeyPEM() ([]byte, error) {
	kd, err := s.read(s.Key, MaxKeySize)
	if err != nil {
		return nil, fmt.Errorf("public key: %w", missing(err))
	}
	if _, err := ParsePublicKey(kd); err != nil {
		return nil, fmt.Errorf("%s: %w", s.Key, err)
	}
	return kd, nil
}

// KeyFingerprint is the Fingerprint of s.Key.
func (s Sums) KeyFingerprint() (string, error) {
	kd, err := s.read(s.Key, MaxKeySize)
	if err != nil {
		return "", fmt.Errorf("public key: %w", missing(err))
	}
	key, err := ParsePublicKey(kd)
	if err != nil {
		return "", fmt.Errorf("%s: %w", s.Key, err)
	}
	return Fingerprint(key)
}

// Fingerprint names a public key: the SHA-256 of its DER
// SubjectPublicKeyInfo, in hex — what checksums/keys/<fingerprint>.pub is
// called, and `openssl pkey -pubin -outform DER | sha256sum` prints.
func Fingerprint(pub *ecdsa.PublicKey) (string, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "", fmt.Errorf("fingerprint: %w", err)
	}
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:]), nil
}

// Load reads the sums file once (bounded); when a key is given it checks
// the signature over exactly those bytes before parsing them, so the bytes
// parsed are the bytes verified.
func (s Sums) Load() (*sums.File, error) {
	f, _, _, err := s.LoadRaw()
	return f, err
}

// LoadRaw is Load that also returns the exact bytes of the sums file and
// of the signature (nil without a key) that were checked.
func (s Sums) LoadRaw() (f *sums.File, data, sig []byte, err error) {
	data, err = s.read(s.Path, sums.MaxSize)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("sums file: %w", err)
	}
	if s.Key != "" {
		kd, err := s.read(s.Key, MaxKeySize)
		if err != nil {
			return nil, nil, nil, fmt.Errorf("public key: %w", missing(err))
		}
		key, err := ParsePublicKey(kd)
		if err != nil {
			return nil, nil, nil, fmt.Errorf("%s: %w", s.Key, err)
		}
		sig, err = s.read(s.Signature, MaxSignatureSize)
		if err != nil {
			return nil, nil, nil, fmt.Errorf("signature: %w", missing(err))
		}
		der, err := ParseSignature(sig)
		if err != nil {
			return nil, nil, nil, fmt.Errorf("%s: %w", s.Signature, err)
		}
		if err := Verify(key, der, data); err != nil {
			return nil, nil, nil, fmt.Errorf("%s over %s with key %s: %w", s.Signature, s.Path, s.Key, err)
		}
	}
	f, err = sums.Parse(data)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("%s: %w", s.Path, err)
	}
	return f, data, sig, nil
}

// SignFile checks that sumsPath is a well-formed sums file, signs its exact
// bytes with the key at keyPath, verifies the result with the key's public
// half, and writes the signature to sigPath (refusing to overwrite unless
// overwrite is set).
func SignFile(sumsPath, keyPath string, password []byte, sigPath string, overwrite bool) error {
	data, err := ReadBounded(sumsPath, sums.MaxSize)
	if err != nil {
		return fmt.Errorf("sign: %w", err)
	}
	if _, err := sums.Parse(data); err != nil {
		return fmt.Errorf("sign %s: %w", sumsPath, err)
	}
	key, err := ReadPrivateKey(keyPath, password)
	if err != nil {
		return fmt.Errorf("sign: %w", err)
	}
	sig, err := Sign(key, data)
	if err != nil {
		return err
	}
	der, err := ParseSignature(sig)
	if err == nil {
		err = Verify(&key.PublicKey, der, data)
	}
	if err != nil {
		return fmt.Errorf("sign: self-check failed: %w", err)
	}
	if overwrite {
		err = os.WriteFile(sigPath, sig, 0o644)
	} else {
		err = WriteNew(sigPath, sig, 0o644)
	}
	if err != nil {
		return fmt.Errorf("sign: %w", err)
	}
	return nil
}
