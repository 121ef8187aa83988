package initramfs

import (
	"bytes"
	stdgzip "compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// goldenEntries is the tree of testdata/gen_init_cpio.golden (see
// testdata/README.md), deliberately out of order: WriteCPIO must sort.
func goldenEntries() []Entry {
	return []Entry{
		{Path: "/sys", Mode: fs.ModeDir | 0o555},
		{Path: "/init", Mode: 0o755, Data: []byte("#!/bin/sh\necho hello from init\n")},
		{Path: "/etc/empty", Mode: 0o400},
		{Path: "/dev/console", Mode: fs.ModeDevice | fs.ModeCharDevice | 0o600, Major: 5, Minor: 1},
		{Path: "/etc/abc", Mode: 0o644, Data: []byte("abc")},
		{Path: "/dev", Mode: fs.ModeDir | 0o755},
		{Path: "/proc", Mode: fs.ModeDir | 0o755},
		{Path: "/etc", Mode: fs.ModeDir | 0o700},
	}
}

func TestWriteCPIOMatchesGenInitCPIO(t *testing.T) {
	want, err := os.ReadFile("testdata/gen_init_cpio.golden")
	if err != nil {
		t.Fatal(err)
	}
	var got bytes.Buffer
	if err := WriteCPIO(&got, goldenEntries()); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got.Bytes(), want) {
		i := 0
		for i < min(got.Len(), len(want)) && got.Bytes()[i] == want[i] {
			i++
		}
		t.Fatalf("archive differs from gen_init_cpio's at byte %d (got %d bytes, want %d)\ngot  %q\nwant %q",
			i, got.Len(), len(want), window(got.Bytes(), i), window(want, i))
	}
}

func window(b []byte, i int) []byte { return b[max(0, i-16):min(len(b), i+16)] }

// cpioFile is one entry read back from an archive by readCPIO.
type cpioFile struct {
	name                                         string
	ino, mode, uid, gid, nlink, mtime            uint32
	devMajor, devMinor, rdevMajor, rdevMinor, ck uint32
	data                                         []byte
}

// readCPIO parses a newc archive independently of the writer, checking
// the alignment rules the kernel's unpacker relies on.
func readCPIO(t *testing.T, b []byte) []cpioFile {
	t.Helper()
	var files []cpioFile
	off := 0
	for {
		if off%4 != 0 || off+110 > len(b) {
			t.Fatalf("header at %d: misaligned or truncated (len %d)", off, len(b))
		}
		h := b[off : off+110]
		if string(h[:6]) != "070701" {
			t.Fatalf("header at %d: magic %q", off, h[:6])
		}
		var f [13]uint32
		for i := range f {
			v, err := strconv.ParseUint(string(h[6+8*i:14+8*i]), 16, 32)
			if err != nil {
				t.Fatalf("header at %d field %d: %v", off, i, err)
			}
			f[i] = uint32(v)
		}
		size, namesize := int(f[6]), int(f[11])
		name := b[off+110 : off+110+namesize]
		if name[namesize-1] != 0 {
			t.Fatalf("header at %d: name not NUL-terminated", off)
		}
		off = align4(off + 110 + namesize)
		file := cpioFile{
			name: string(name[:namesize-1]), ino: f[0], mode: f[1], uid: f[2], gid: f[3],
			nlink: f[4], mtime: f[5], devMajor: f[7], devMinor: f[8], rdevMajor: f[9],
			rdevMinor: f[10], ck: f[12], data: b[off : off+size],
		}
		off = align4(off + size)
		if file.name == "TRAILER!!!" {
			if off > len(b) || len(b)%512 != 0 || strings.Trim(string(b[off:]), "\x00") != "" {
				t.Fatalf("trailer ends at %d, archive %d bytes: want zero padding to 512", off, len(b))
			}
			return files
		}
		files = append(files, file)
	}
}

func align4(n int) int { return (n + 3) &^ 3 }

func TestTreeRoundTrip(t *testing.T) {
	init := bytes.Repeat([]byte{0x7f, 'E', 'L', 'F', 1}, 1001) // length not a multiple of 4
	var buf bytes.Buffer
	if err := WriteCPIO(&buf, Tree(init)); err != nil {
		t.Fatal(err)
	}
	want := []struct {
		name        string
		mode, nlink uint32
		rmaj, rmin  uint32
		data        []byte
	}{
		{"dev", 0o040755, 2, 0, 0, nil},
		{"dev/console", 0o020600, 1, 5, 1, nil},
		{"init", 0o100755, 1, 0, 0, init},
		{"proc", 0o040755, 2, 0, 0, nil},
		{"sys", 0o040755, 2, 0, 0, nil},
	}
	got := readCPIO(t, buf.Bytes())
	if len(got) != len(want) {
		t.Fatalf("got %d entries, want %d", len(got), len(want))
	}
	for i, w := range want {
		g := got[i]
		if g.name != w.name || g.mode != w.mode || g.nlink != w.nlink || g.rdevMajor != w.rmaj ||
			g.rdevMinor != w.rmin || !bytes.Equal(g.data, w.data) {
			t.Errorf("entry %d: got %s mode %o nlink %d rdev %d:%d %d bytes; want %s mode %o nlink %d rdev %d:%d %d bytes",
				i, g.name, g.mode, g.nlink, g.rdevMajor, g.rdevMinor, len(g.data),
				w.name, w.mode, w.nlink, w.rmaj, w.rmin, len(w.data))
		}
		if g.ino != uint32(721+i) || g.uid != 0 || g.gid != 0 || g.mtime != 0 || g.ck != 0 ||
			g.devMajor != 3 || g.devMinor != 1 {
			t.Errorf("entry %s: ino %d uid %d gid %d mtime %d check %d dev %d:%d; want ino %d, zeros, dev 3:1",
				g.name, g.ino, g.uid, g.gid, g.mtime, g.ck, g.devMajor, g.devMinor, 721+i)
		}
	}
}

func TestWriteCPIORejects(t *testing.T) {
	dir := Entry{Path: "/d", Mode: fs.ModeDir | 0o755}
	tests := []struct {
		name    string
		entries []Entry
		want    string
	}{
		{"relative", []Entry{{Path: "init", Mode: 0o755}}, "absolute"},
		{"root", []Entry{{Path: "/", Mode: fs.ModeDir | 0o755}}, "absolute"},
		{"empty", []Entry{{Mode: 0o644}}, "absolute"},
		{"dotdot", []Entry{{Path: "/../etc", Mode: 0o644}}, "not clean"},
		{"trailing slash", []Entry{{Path: "/d/", Mode: fs.ModeDir}}, "not clean"},
		{"dot", []Entry{dir, {Path: "/d/./f", Mode: 0o644}}, "not clean"},
		{"dotdot file", []Entry{{Path: "/..", Mode: 0o644}}, "not clean"},
		{"nul", []Entry{{Path: "/a\x00b", Mode: 0o644}}, "NUL"},
		{"too long", []Entry{{Path: "/" + strings.Repeat("a", 4096), Mode: 0o644}}, "longer"},
		{"duplicate", []Entry{dir, {Path: "/d", Mode: fs.ModeDir | 0o700}}, "duplicate"},
		{"missing parent", []Entry{{Path: "/d/f", Mode: 0o644}}, "parent"},
		{"parent is a file", []Entry{{Path: "/d", Mode: 0o644}, {Path: "/d/f", Mode: 0o644}}, "parent"},
		{"symlink", []Entry{{Path: "/l", Mode: fs.ModeSymlink | 0o777, Data: []byte("x")}}, "unsupported"},
		{"block device", []Entry{{Path: "/b", Mode: fs.ModeDevice | 0o600}}, "unsupported"},
		{"setuid", []Entry{{Path: "/f", Mode: fs.ModeSetuid | 0o755}}, "unsupported"},
		{"data on dir", []Entry{{Path: "/d", Mode: fs.ModeDir | 0o755, Data: []byte("x")}}, "data"},
		{"rdev on file", []Entry{{Path: "/f", Mode: 0o644, Major: 1}}, "device numbers"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var buf bytes.Buffer
			err := WriteCPIO(&buf, tt.entries)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("WriteCPIO: %v; want an error containing %q", err, tt.want)
			}
			if buf.Len() != 0 {
				t.Errorf("wrote %d bytes before rejecting", buf.Len())
			}
		})
	}
}

type failingWriter struct{ after int }

func (f *failingWriter) Write(p []byte) (int, error) {
	if f.after < len(p) {
		return 0, fmt.Errorf("disk full")
	}
	f.after -= len(p)
	return len(p), nil
}

func TestWriteCPIOReportsWriteErrors(t *testing.T) {
	for _, after := range []int{0, 50, 200, 1000} {
		err := WriteCPIO(&failingWriter{after: after}, goldenEntries())
		if err == nil || !strings.Contains(err.Error(), "disk full") {
			t.Errorf("failing after %d bytes: got %v, want the write error", after, err)
		}
	}
}

// buildHash is sha256(Build(hashInit)). It changes only when the archive
// layout, the gzip level or the pinned klauspost/compress version changes —
// each of which changes the published image hash, so it must be deliberate.
const (
	hashInit  = "qubes-go-firewall test init\n"
	buildHash = "a2cd24a47447ae9fa27bd131d64d584892efa37c067474e14a5ec28f5067d835"
)

func TestBuildIsDeterministic(t *testing.T) {
	build := func() []byte {
		var buf bytes.Buffer
		if err := Build(&buf, []byte(hashInit)); err != nil {
			t.Fatal(err)
		}
		return buf.Bytes()
	}
	first := build()

	// Nothing of the host may leak in: change what a careless writer reads.
	t.Setenv("TZ", "Pacific/Kiritimati")
	t.Setenv("LANG", "de_DE.UTF-8")
	old := syscall.Umask(0o077)
	second := build()
	syscall.Umask(old)
	if !bytes.Equal(first, second) {
		t.Fatal("two builds of the same input differ")
	}

	// Fixed gzip header: magic, deflate, no flags (no name), mtime 0, OS 255.
	if want := []byte{0x1f, 0x8b, 8, 0, 0, 0, 0, 0}; !bytes.Equal(first[:8], want) || first[9] != 255 {
		t.Errorf("gzip header % x, want % x .. ff", first[:10], want)
	}

	// The standard library's decoder must read back exactly the cpio.
	zr, err := stdgzip.NewReader(bytes.NewReader(first))
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	var want bytes.Buffer
	if err := WriteCPIO(&want, Tree([]byte(hashInit))); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want.Bytes()) {
		t.Error("decompressed initramfs differs from WriteCPIO's output")
	}

	sum := sha256.Sum256(first)
	if h := hex.EncodeToString(sum[:]); h != buildHash {
		t.Errorf("Build output sha256 %s, want %s: the layout, gzip level or klauspost/compress version changed; the image hash changes with it", h, buildHash)
	}
}
