package initramfs

import (
	"fmt"
	"io"
	"io/fs"

	"github.com/klauspost/compress/gzip"
)

// gzipLevel is part of the output's identity: changing it (or the pinned
// klauspost/compress version) changes the published initramfs hash.
const gzipLevel = gzip.BestCompression

// Tree is the image's file tree: the firewall as /init, the console device
// the kernel opens for /init's stdio before any devtmpfs is mounted, and
// the mount points /init uses. No /tmp: the firewall writes no files.
func Tree(init []byte) []Entry {
	const dir = fs.ModeDir | 0o755
	return []Entry{
		{Path: "/dev", Mode: dir},
		{Path: "/dev/console", Mode: fs.ModeDevice | fs.ModeCharDevice | 0o600, Major: 5, Minor: 1},
		{Path: "/init", Mode: 0o755, Data: init},
		{Path: "/proc", Mode: dir},
		{Path: "/sys", Mode: dir},
	}
}

// WriteGzip writes entries as a gzip-compressed cpio archive with a fixed
// gzip header (no name, mtime 0, OS "unknown").
func WriteGzip(w io.Writer, entries []Entry) error {
	zw, err := gzip.NewWriterLevel(w, gzipLevel)
	if err != nil {
		return fmt.Errorf("gzip: %w", err)
	}
	zw.Header = gzip.Header{OS: 255}
	if err := WriteCPIO(zw, entries); err != nil {
		return err
	}
	if err := zw.Close(); err != nil {
		return fmt.Errorf("gzip: close: %w", err)
	}
	return nil
}

// Build writes the image's initramfs with init as /init.
func Build(w io.Writer, init []byte) error {
	return WriteGzip(w, Tree(init))
}
