package main

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/spf13/cobra"
)

// run executes the CLI with explicit arguments and stdio so that tests can
// call it in-process, and returns the process exit code.
func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	root := newRootCmd()
	root.SetArgs(args)
	root.SetIn(stdin)
	root.SetOut(stdout)
	root.SetErr(stderr)
	err := root.ExecuteContext(ctx)
	if err == nil {
		return exitOK
	}
	fmt.Fprintln(stderr, "qgfw:", err)
	var ce *codedError
	if errors.As(err, &ce) {
		return ce.code
	}
	if isUsageError(err) {
		return exitUsage
	}
	return exitFailure
}

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:   "qgfw",
		Short: "Build, verify, sign and install the qubes-go-firewall VM image",
		Long: `qgfw builds the qubes-go-firewall VM image (vmlinuz + initramfs) bit for bit
reproducibly with podman, checks it against the published hash sums in
checksums/, signs and verifies those sums, and emits the dom0 Salt states that
install the image as a Qubes firewall VM.

Exit codes:
  0  success
  1  error (I/O, podman, network, ...)
  2  usage error (bad flags or arguments)
  3  hash mismatch: an artifact differs from the published SHA256SUMS
  4  bad signature: SHA256SUMS is not signed by the given key
  5  missing file: an artifact listed in SHA256SUMS is absent
  6  malformed input: a sums file, signature or key that cannot be parsed
  7  not enough free disk space to build
  8  no signature: the signature or the key to check it is missing`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error {
		return &codedError{code: exitUsage, err: err}
	})
	root.AddCommand(
		newBuildCmd(),
		newInputsCmd(),
		newCleanCmd(),
		newVersionCmd(),
		newKeygenCmd(),
		newSignCmd(),
		newVerifyCmd(),
		newSaltCmd(),
	)
	return root
}
