package main

import (
	"errors"

	"github.com/spf13/cobra"
)

// Placeholder until the sign command lands.
func newSignCmd() *cobra.Command {
	return &cobra.Command{
		Use:    "sign",
		Short:  "(not yet implemented)",
		Hidden: true,
		RunE: func(*cobra.Command, []string) error {
			return errors.New("sign: not implemented yet")
		},
	}
}
