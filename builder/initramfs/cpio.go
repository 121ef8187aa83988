// Package initramfs writes the firewall image's initramfs: a newc cpio
// archive, compressed with gzip, whose bytes depend only on the files put
// into it — not on the build host's clock, umask, user, locale or time zone.
//
// The archive is laid out exactly as the Linux kernel's usr/gen_init_cpio
// lays out the same tree (first inode 721, device 3:1 on every entry,
// nlink 2 for directories, mtime 0, uid/gid 0, no checksums, trailer padded
// to 512 bytes), so the kernel's own tool serves as the reference in tests.
package initramfs

import (
	"fmt"
	"io"
	"io/fs"
	"path"
	"slices"
	"strings"
)

// Entry is one file of the archive.
type Entry struct {
	// Path is absolute and clean ("/dev/console"); it is stored without
	// the leading slash, as the kernel expects.
	Path string
	// Mode holds the type (regular file, fs.ModeDir, or fs.ModeDevice|
	// fs.ModeCharDevice) and the permission bits; nothing else.
	Mode fs.FileMode
	// Data is the content of a regular file; empty for anything else.
	Data []byte
	// Major and Minor are the device numbers of a character device.
	Major, Minor uint32
}

const (
	newcMagic   = "070701"
	headerLen   = 110
	trailerName = "TRAILER!!!"
	// gen_init_cpio numbers entries from 721 and records every entry as
	// living on device 3:1; copying that keeps the output byte-identical.
	firstIno            = 721
	fsMajor, fsMinor    = 3, 1
	maxPath             = 4095 // PATH_MAX without the NUL
	maxFileSize         = 1<<32 - 1
	sIFREG, sIFDIR      = 0o100000, 0o040000
	sIFCHR              = 0o020000
	charDevice          = fs.ModeDevice | fs.ModeCharDevice
	blockSize           = 512
	permMask            = fs.ModePerm
	allowedTypeAndPerms = fs.ModeDir | charDevice | permMask
)

// WriteCPIO writes entries as a newc cpio archive, sorted by path (which
// puts every directory before its contents). It rejects, before writing
// anything, an archive the kernel would unpack differently from what the
// caller meant: unclean or relative paths, "..", duplicates, a missing
// parent directory, unsupported file types, data on a non-regular file.
func WriteCPIO(w io.Writer, entries []Entry) error {
	sorted := slices.Clone(entries)
	slices.SortFunc(sorted, func(a, b Entry) int { return strings.Compare(a.Path, b.Path) })
	if err := validate(sorted); err != nil {
		return err
	}
	cw := &countingWriter{w: w}
	for i, e := range sorted {
		mode, nlink := unixMode(e)
		h := header{
			ino: firstIno + uint32(i), mode: mode, nlink: nlink,
			size: uint32(len(e.Data)), devMajor: fsMajor, devMinor: fsMinor,
			rdevMajor: e.Major, rdevMinor: e.Minor,
		}
		if err := h.write(cw, e.Path[1:]); err != nil {
			return fmt.Errorf("cpio: write %s: %w", e.Path, err)
		}
		cw.Write(e.Data)
		cw.pad(4)
	}
	(&header{nlink: 1}).write(cw, trailerName)
	cw.pad(blockSize)
	if cw.err != nil {
		return fmt.Errorf("cpio: write: %w", cw.err)
	}
	return nil
}

func validate(sorted []Entry) error {
	dirs := map[string]bool{"/": true}
	for i, e := range sorted {
		p := e.Path
		switch {
		case p == "" || p[0] != '/' || p == "/":
			return fmt.Errorf("cpio: entry %q: path must be absolute and not /", p)
		case path.Clean(p) != p:
			return fmt.Errorf("cpio: entry %q: path is not clean", p)
		case strings.ContainsRune(p, 0):
			return fmt.Errorf("cpio: entry %q: path contains NUL", p)
		case len(p)-1 > maxPath:
			return fmt.Errorf("cpio: entry %.40q...: path longer than %d bytes", p, maxPath)
		case slices.Contains(strings.Split(p, "/"), ".."):
			return fmt.Errorf("cpio: entry %q: path contains ..", p)
		case i > 0 && sorted[i-1].Path == p:
			return fmt.Errorf("cpio: entry %q: duplicate path", p)
		case !dirs[path.Dir(p)]:
			return fmt.Errorf("cpio: entry %q: parent directory %s is not in the archive", p, path.Dir(p))
		case e.Mode&^allowedTypeAndPerms != 0:
			return fmt.Errorf("cpio: entry %q: unsupported mode %v", p, e.Mode)
		}
		typ := e.Mode.Type()
		switch {
		case typ != 0 && typ != fs.ModeDir && typ != charDevice:
			return fmt.Errorf("cpio: entry %q: unsupported file type %v", p, typ)
		case typ != 0 && len(e.Data) != 0:
			return fmt.Errorf("cpio: entry %q: data on a %v entry", p, typ)
		case typ != charDevice && (e.Major != 0 || e.Minor != 0):
			return fmt.Errorf("cpio: entry %q: device numbers on a non-device entry", p)
		case len(e.Data) > maxFileSize:
			return fmt.Errorf("cpio: entry %q: %d bytes exceed the cpio size field", p, len(e.Data))
		}
		if typ == fs.ModeDir {
			dirs[p] = true
		}
	}
	return nil
}

// unixMode maps an entry's fs.FileMode to st_mode and gives the link count
// gen_init_cpio records for that type.
func unixMode(e Entry) (mode, nlink uint32) {
	perm := uint32(e.Mode.Perm())
	switch e.Mode.Type() {
	case fs.ModeDir:
		return sIFDIR | perm, 2
	case charDevice:
		return sIFCHR | perm, 1
	default:
		return sIFREG | perm, 1
	}
}

// header is a newc header; fields not listed (uid, gid, mtime, check) are 0.
type header struct {
	ino, mode, nlink, size uint32
	devMajor, devMinor     uint32
	rdevMajor, rdevMinor   uint32
}

// write emits the header, the NUL-terminated name and the padding that
// aligns the following data to 4 bytes.
func (h *header) write(cw *countingWriter, name string) error {
	fmt.Fprintf(cw, "%s%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		newcMagic, h.ino, h.mode, 0, 0, h.nlink, 0, h.size,
		h.devMajor, h.devMinor, h.rdevMajor, h.rdevMinor, len(name)+1, 0)
	io.WriteString(cw, name)
	cw.Write([]byte{0})
	cw.pad(4)
	return cw.err
}

// countingWriter tracks the archive offset for padding and keeps the first
// write error so the layout code reads straight through.
type countingWriter struct {
	w   io.Writer
	n   int64
	err error
}

func (c *countingWriter) Write(p []byte) (int, error) {
	if c.err != nil {
		return 0, c.err
	}
	n, err := c.w.Write(p)
	c.n += int64(n)
	c.err = err
	return n, err
}

var zeros [blockSize]byte

func (c *countingWriter) pad(align int64) {
	if r := c.n % align; r != 0 {
		c.Write(zeros[:align-r])
	}
}
