// Package progress shows how far a long hashing, copying or downloading
// step has got, on one terminal line that it rewrites in place. When the
// output is not a terminal (a CI log, a pipe) it writes nothing at all: the
// build's step lines say what ran, and a log full of carriage returns or
// percentages helps nobody.
package progress

import (
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"golang.org/x/term"
)

// Meter draws bars on a terminal. The nil *Meter is valid and draws
// nothing, so callers need no checks.
type Meter struct {
	w     io.Writer
	every time.Duration // at most one redraw per interval
	now   func() time.Time

	mu sync.Mutex // guards the line and every bar's counts
}

// ForFile returns a Meter drawing on f if f is a terminal, else nil.
func ForFile(f *os.File) *Meter {
	if f == nil || !term.IsTerminal(int(f.Fd())) {
		return nil
	}
	return New(f)
}

// New returns a Meter that draws on w as if it were a terminal.
func New(w io.Writer) *Meter {
	return &Meter{w: w, every: 200 * time.Millisecond, now: time.Now}
}

// Bar is one step's progress; write the bytes it processes through it (it
// is an io.Writer that keeps nothing) and call Done at the end.
type Bar struct {
	m     *Meter
	label string
	total int64 // <= 0: unknown
	done  int64
	items bool // counts things, not bytes
	drawn time.Time
	shown bool
}

// Start begins a bar for a step that processes total bytes (0 when the
// size is not known).
func (m *Meter) Start(label string, total int64) *Bar {
	return &Bar{m: m, label: label, total: total}
}

// StartCount begins a bar for a step over total things (Go modules,
// files), counted with Add.
func (m *Meter) StartCount(label string, total int64) *Bar {
	return &Bar{m: m, label: label, total: total, items: true}
}

// Write counts len(b) bytes and redraws the line when it is due.
func (b *Bar) Write(p []byte) (int, error) {
	b.Add(int64(len(p)))
	return len(p), nil
}

// Add counts n more bytes (things, for a bar from StartCount). It may be
// called from several goroutines.
func (b *Bar) Add(n int64) {
	if b == nil || b.m == nil {
		return
	}
	b.m.mu.Lock()
	defer b.m.mu.Unlock()
	b.done += n
	now := b.m.now()
	if b.shown && now.Sub(b.drawn) < b.m.every {
		return
	}
	b.drawn, b.shown = now, true
	b.m.draw(b.text())
}

// Done clears the bar's line, leaving the terminal as it was before it.
func (b *Bar) Done() {
	if b == nil || b.m == nil {
		return
	}
	b.m.mu.Lock()
	defer b.m.mu.Unlock()
	if b.shown {
		b.m.draw("")
		b.shown = false
	}
}

func (b *Bar) text() string {
	if b.items {
		return fmt.Sprintf("%s: %d of %d", b.label, b.done, b.total)
	}
	if b.total > 0 {
		return fmt.Sprintf("%s: %s of %s (%d%%)", b.label, size(b.done), size(b.total), b.done*100/b.total)
	}
	return fmt.Sprintf("%s: %s", b.label, size(b.done))
}

// draw replaces the current line with s: carriage return, the text, and
// "erase to end of line" for what a longer earlier text left. m.mu is held.
func (m *Meter) draw(s string) {
	fmt.Fprintf(m.w, "\r%s\x1b[K", s)
}

func size(n int64) string {
	switch {
	case n >= 10<<20:
		return fmt.Sprintf("%d MB", n>>20)
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MB", float64(n)/(1<<20))
	default:
		return fmt.Sprintf("%d kB", n>>10)
	}
}
