package main

import (
	"errors"

	"github.com/spf13/cobra"
)

// Placeholder until the salt command lands.
func newSaltCmd() *cobra.Command {
	return &cobra.Command{
		Use:    "salt",
		Short:  "(not yet implemented)",
		Hidden: true,
		RunE: func(*cobra.Command, []string) error {
			return errors.New("salt: not implemented yet")
		},
	}
}
