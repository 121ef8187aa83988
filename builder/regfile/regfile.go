// Package regfile opens files named by the user — artifacts, sums,
// signatures, keys — so that a special file cannot hang the tool: a FIFO
// opened for reading blocks until someone writes to it, and a device
// reads forever. The file is opened non-blocking and without following a
// final symlink, and refused unless fstat says it is a regular file,
// before a byte is read.
package regfile

import (
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"
)

// ErrNotRegular is returned for a FIFO, device, socket, directory or
// symlink where a regular file is wanted.
var ErrNotRegular = errors.New("not a regular file")

const flags = os.O_RDONLY | syscall.O_NONBLOCK | syscall.O_NOFOLLOW

// Open opens path for reading if it is a regular file.
func Open(path string) (*os.File, error) {
	f, err := os.OpenFile(path, flags, 0)
	return check(f, path, err)
}

// OpenIn is Open for name under root (os.Root: neither the name nor a
// symlink can reach outside it; a symlink to a regular file inside it is
// followed).
func OpenIn(root *os.Root, name string) (*os.File, error) {
	f, err := root.OpenFile(name, flags, 0)
	return check(f, name, err)
}

func check(f *os.File, name string, err error) (*os.File, error) {
	if errors.Is(err, syscall.ELOOP) {
		return nil, fmt.Errorf("%s: %w (a symbolic link: give the file it points to)", name, ErrNotRegular)
	}
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	if !st.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("%s: %w (%s)", name, ErrNotRegular, describe(st.Mode()))
	}
	return f, nil
}

func describe(m os.FileMode) string {
	switch {
	case m&os.ModeNamedPipe != 0:
		return "a FIFO"
	case m&os.ModeDevice != 0:
		return "a device"
	case m&os.ModeSocket != 0:
		return "a socket"
	case m.IsDir():
		return "a directory"
	}
	return "type " + m.Type().String()
}

// ReadBounded reads all of the regular file path, refusing one larger than
// limit without reading more than limit+1 bytes of it.
func ReadBounded(path string, limit int64) ([]byte, error) {
	f, err := Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	if int64(len(data)) > limit {
		return nil, fmt.Errorf("read %s: %w", path, ErrTooLarge{limit})
	}
	return data, nil
}

// ErrTooLarge says a file is over the limit its reader allows.
type ErrTooLarge struct{ Limit int64 }

func (e ErrTooLarge) Error() string { return fmt.Sprintf("larger than %d bytes", e.Limit) }
