package main

import (
	"errors"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/qubes-go-firewall/qubes-go-firewall/builder/sign"
)

type signOptions struct {
	key    string
	output string
	force  bool
}

func newSignCmd() *cobra.Command {
	o := &signOptions{}
	cmd := &cobra.Command{
		Use:   "sign --key KEY SHA256SUMS",
		Short: "Sign a SHA256SUMS file (writes SHA256SUMS.sig)",
		Long: `sign checks that the file is a well-formed SHA256SUMS file, signs its exact
bytes with the ECDSA P-256 private key (SHA-256), checks the signature with
the key's public half and writes base64 of the DER signature — the format of
cosign sign-blob; openssl verifies it after base64 -d.

An encrypted key's password comes from $` + passwordEnv + ` or a terminal
prompt; an unencrypted key (e.g. made by openssl) needs none.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if o.key == "" {
				return withCode(exitUsage, errors.New("sign: --key is required"))
			}
			sumsPath := args[0]
			out := o.output
			if out == "" {
				out = sumsPath + ".sig"
			}
			// A password only for a key that has one.
			enc, err := sign.PrivateKeyEncrypted(o.key)
			if err != nil {
				return withCode(trustExitCode(err), fmt.Errorf("sign: %w", err))
			}
			var pw []byte
			if enc {
				if pw, err = readPassword(cmd, false); err != nil {
					return withCode(exitUsage, fmt.Errorf("sign: %w", err))
				}
			}
			if err := sign.SignFile(sumsPath, o.key, pw, out, o.force); err != nil {
				return withCode(trustExitCode(err), err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "signed %s -> %s\n", sumsPath, out)
			return nil
		},
	}
	cmd.Flags().StringVar(&o.key, "key", "", "encrypted private key (PEM)")
	cmd.Flags().StringVarP(&o.output, "output", "o", "", "signature file (default: SHA256SUMS.sig next to the input)")
	cmd.Flags().BoolVar(&o.force, "force", false, "overwrite an existing signature file")
	return cmd
}
