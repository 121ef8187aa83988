package main

import (
	"errors"

	"github.com/spf13/cobra"
)

// Placeholder until the version command lands.
func newVersionCmd() *cobra.Command {
	return &cobra.Command{
		Use:    "version",
		Short:  "(not yet implemented)",
		Hidden: true,
		RunE: func(*cobra.Command, []string) error {
			return errors.New("version: not implemented yet")
		},
	}
}
