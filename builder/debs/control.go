// Package debs holds what the build knows of Debian packages: the control
// format of the archive's Packages indexes and of a .deb's control file,
// the base image's lock file (every package at an exact version and .deb
// hash), and the flat local repository the locked .debs are installed
// from.
package debs

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"strings"
)

// Field is one field of a control paragraph. Value keeps continuation
// lines, joined by "\n" with their leading space.
type Field struct{ Name, Value string }

// Stanza is one paragraph of a control file, fields in file order.
type Stanza []Field

// Get returns the value of the named field (names are case-insensitive in
// Debian's format), or "".
func (s Stanza) Get(name string) string {
	for _, f := range s {
		if strings.EqualFold(f.Name, name) {
			return f.Value
		}
	}
	return ""
}

// Limits on what ScanStanzas accepts: bookworm's main Packages index has
// lines under 64 KiB (long Description and Provides fields) and paragraphs
// of well under a hundred fields.
const (
	maxLine   = 1 << 20
	maxFields = 512
)

// ErrMalformed marks input that is not in the control format.
var ErrMalformed = errors.New("malformed control data")

// ScanStanzas calls fn for each paragraph of r, stopping at fn's first
// error. It reads one paragraph at a time, so a 60,000-package index costs
// the memory of its largest paragraph.
func ScanStanzas(r io.Reader, fn func(Stanza) error) error {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), maxLine)
	var cur Stanza
	flush := func() error {
		if len(cur) == 0 {
			return nil
		}
		s := cur
		cur = nil
		return fn(s)
	}
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		switch {
		case strings.TrimSpace(line) == "":
			if err := flush(); err != nil {
				return err
			}
		case line[0] == '#':
			// Comments are allowed in control files (not in indexes).
		case line[0] == ' ' || line[0] == '\t':
			if len(cur) == 0 {
				return fmt.Errorf("line %d: continuation without a field: %w", n, ErrMalformed)
			}
			cur[len(cur)-1].Value += "\n" + line
		default:
			name, value, ok := strings.Cut(line, ":")
			if !ok || name == "" || strings.ContainsAny(name, " \t") {
				return fmt.Errorf("line %d: not a field: %w", n, ErrMalformed)
			}
			if len(cur) >= maxFields {
				return fmt.Errorf("line %d: more than %d fields in a paragraph: %w", n, maxFields, ErrMalformed)
			}
			cur = append(cur, Field{Name: name, Value: strings.TrimSpace(value)})
		}
	}
	if err := sc.Err(); err != nil {
		if errors.Is(err, bufio.ErrTooLong) {
			return fmt.Errorf("line longer than %d bytes: %w", maxLine, ErrMalformed)
		}
		return err
	}
	return flush()
}

// Format writes s as one paragraph (without the blank separator line).
func (s Stanza) Format(w io.Writer) error {
	for _, f := range s {
		if _, err := fmt.Fprintf(w, "%s: %s\n", f.Name, f.Value); err != nil {
			return err
		}
	}
	return nil
}
