package main

import (
	"errors"

	"github.com/spf13/cobra"
)

// Placeholder until the clean command lands.
func newCleanCmd() *cobra.Command {
	return &cobra.Command{
		Use:    "clean",
		Short:  "(not yet implemented)",
		Hidden: true,
		RunE: func(*cobra.Command, []string) error {
			return errors.New("clean: not implemented yet")
		},
	}
}
