package pipeline

import (
	"bytes"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"
)

// logger prefixes every line with the elapsed time. In quiet mode it keeps
// only the last lines of the build output, for the error message.
type logger struct {
	mu    sync.Mutex
	w     io.Writer
	quiet bool
	start time.Time
	part  []byte
	last  []string
}

const tailLines = 40

func newLogger(w io.Writer, quiet bool, start time.Time) *logger {
	if w == nil {
		w = io.Discard
	}
	return &logger{w: w, quiet: quiet, start: start}
}

func (l *logger) line(s string) {
	l.last = append(l.last, s)
	if len(l.last) > tailLines {
		l.last = l.last[1:]
	}
	if !l.quiet {
		el := time.Since(l.start).Round(time.Second)
		fmt.Fprintf(l.w, "[%02d:%02d] %s\n", int(el.Minutes()), int(el.Seconds())%60, s)
	}
}

func (l *logger) step(s string) { l.logf("==> %s", s) }

func (l *logger) logf(format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.line(fmt.Sprintf(format, args...))
}

// Write takes command output (build log) and logs it line by line.
func (l *logger) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.part = append(l.part, b...)
	for {
		i := bytes.IndexByte(l.part, '\n')
		if i < 0 {
			break
		}
		l.line(strings.TrimRight(string(l.part[:i]), "\r"))
		l.part = l.part[i+1:]
	}
	return len(b), nil
}

func (l *logger) output() io.Writer { return l }

func (l *logger) flush() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.part) > 0 {
		l.line(string(l.part))
		l.part = nil
	}
}

// tail returns the last lines of output for an error message in quiet
// mode (otherwise they were just printed).
func (l *logger) tail() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.quiet || len(l.last) == 0 {
		return ""
	}
	return "\nlast lines of the build log:\n  " + strings.Join(l.last, "\n  ")
}
