// Package checksums is the trust root built into qgfw: every release key
// (keys/<fingerprint>.pub) and every published release (releases/<version>/:
// SHA256SUMS, its signature, and the fingerprint of the key that signed it
// in the file key). `qgfw verify --release` and `qgfw salt --release` trust
// these, embedded when qgfw was built, and never a checksums/ directory
// found on disk: a download that ships its own keys and signed sums would
// otherwise vouch for itself. See README.md in this directory.
package checksums

import "embed"

// FS holds keys/ and releases/.
//
//go:embed keys releases
var FS embed.FS
