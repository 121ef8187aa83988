package main

import (
	"bytes"
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/qubes-go-firewall/qubes-go-firewall/builder/sign"
)

// passwordEnv names the environment variable that holds a private key's
// password. Passwords are never flags: flags show up in ps and in shell
// history.
const passwordEnv = "QGFW_PASSWORD"

type keygenOptions struct {
	privateKey string
	publicKey  string
}

func newKeygenCmd() *cobra.Command {
	o := &keygenOptions{}
	cmd := &cobra.Command{
		Use:   "keygen",
		Short: "Create an ECDSA P-256 key pair for signing SHA256SUMS",
		Long: `keygen writes an encrypted private key (PEM "ENCRYPTED SIGSTORE PRIVATE KEY",
the format cosign uses) and its public key (PEM "PUBLIC KEY"). Existing files
are never overwritten.

The password comes from $` + passwordEnv + `, or is asked for twice on the
terminal; it is never taken from the command line, and it must not be empty.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if o.privateKey == "" || o.publicKey == "" || o.privateKey == o.publicKey {
				return withCode(exitUsage, errors.New("keygen: --key and --pub must be two different paths"))
			}
			pw, err := readPassword(cmd, true)
			if err != nil {
				return withCode(exitUsage, fmt.Errorf("keygen: %w", err))
			}
			if err := sign.WriteKeyPair(o.privateKey, o.publicKey, pw); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "private key: %s (encrypted, mode 0600)\npublic key:  %s\n", o.privateKey, o.publicKey)
			return nil
		},
	}
	cmd.Flags().StringVar(&o.privateKey, "key", "qgfw.key", "where to write the encrypted private key")
	cmd.Flags().StringVar(&o.publicKey, "pub", "qgfw.pub", "where to write the public key")
	return cmd
}

// readPassword returns the password from $QGFW_PASSWORD or, when stdin is a
// terminal, from a prompt on stderr (asked twice when confirm is set).
func readPassword(cmd *cobra.Command, confirm bool) ([]byte, error) {
	if pw, ok := os.LookupEnv(passwordEnv); ok {
		return []byte(pw), nil
	}
	f, ok := cmd.InOrStdin().(*os.File)
	if !ok || !term.IsTerminal(int(f.Fd())) {
		return nil, fmt.Errorf("no password: set $%s or run on a terminal", passwordEnv)
	}
	ask := func(prompt string) ([]byte, error) {
		fmt.Fprint(cmd.ErrOrStderr(), prompt)
		pw, err := term.ReadPassword(int(f.Fd()))
		fmt.Fprintln(cmd.ErrOrStderr())
		if err != nil {
			return nil, fmt.Errorf("read password: %w", err)
		}
		return pw, nil
	}
	pw, err := ask("Password for the private key: ")
	if err != nil || !confirm {
		return pw, err
	}
	again, err := ask("Again: ")
	if err != nil {
		return nil, err
	}
	if !bytes.Equal(pw, again) {
		return nil, errors.New("passwords do not match")
	}
	return pw, nil
}
