package main

import (
	"strings"
)

// Exit codes; documented in the root command's help.
const (
	exitOK          = 0
	exitFailure     = 1
	exitUsage       = 2
	exitMismatch    = 3
	exitBadSig      = 4
	exitMissingFile = 5
	exitMalformed   = 6
	exitNoSpace     = 7
	exitNoSignature = 8
)

// codedError carries the exit code a command wants for an error.
type codedError struct {
	code int
	err  error
}

func (e *codedError) Error() string { return e.err.Error() }
func (e *codedError) Unwrap() error { return e.err }

// withCode marks err so that the process exits with code.
func withCode(code int, err error) error {
	if err == nil {
		return nil
	}
	return &codedError{code: code, err: err}
}

// isUsageError recognises cobra's argument validation errors, which it
// returns as plain errors.
func isUsageError(err error) bool {
	msg := err.Error()
	return strings.HasPrefix(msg, "unknown command") ||
		strings.HasPrefix(msg, "accepts ") ||
		strings.HasPrefix(msg, "requires at least") ||
		strings.HasPrefix(msg, "requires at most")
}
