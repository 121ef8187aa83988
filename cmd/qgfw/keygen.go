package main

import (
	"errors"

	"github.com/spf13/cobra"
)

// Placeholder until the keygen command lands.
func newKeygenCmd() *cobra.Command {
	return &cobra.Command{
		Use:    "keygen",
		Short:  "(not yet implemented)",
		Hidden: true,
		RunE: func(*cobra.Command, []string) error {
			return errors.New("keygen: not implemented yet")
		},
	}
}
