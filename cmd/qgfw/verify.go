package main

import (
	"errors"

	"github.com/spf13/cobra"
)

// Placeholder until the verify command lands.
func newVerifyCmd() *cobra.Command {
	return &cobra.Command{
		Use:    "verify",
		Short:  "(not yet implemented)",
		Hidden: true,
		RunE: func(*cobra.Command, []string) error {
			return errors.New("verify: not implemented yet")
		},
	}
}
