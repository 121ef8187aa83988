// Package salt holds the dom0 Salt state templates that `qgfw salt`
// renders (with text/template, see builder/salt). They live at the
// repository root so that a reviewer finds them next to the other inputs
// that reach dom0.
package salt

import "embed"

// Templates holds init.sls.tmpl (the state) and top.tmpl (its top file).
//
//go:embed *.tmpl
var Templates embed.FS
