package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/qubes-go-firewall/qubes-go-firewall/builder/engine"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/inputs"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/pipeline"
)

func newCleanCmd() *cobra.Command {
	var cache, engineName string
	var keepInputs bool
	cmd := &cobra.Command{
		Use:   "clean",
		Short: "Remove the builder's podman images and its cache of downloaded inputs",
		Long: `clean removes every image the builder created (base image, cached stages,
leftovers; all carry the label ` + engine.Label + `) and the cache
directory of downloaded inputs. The next build starts cold.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if cache == "" {
				var err error
				if cache, err = inputs.DefaultDir(); err != nil {
					return err
				}
			}
			out := cmd.OutOrStdout()
			logf := func(format string, args ...any) { fmt.Fprintf(cmd.ErrOrStderr(), format+"\n", args...) }
			svc, err := pipeline.Connect(cmd.Context(), engineName, logf)
			if err != nil {
				return err
			}
			defer svc.Close()
			n, err := svc.RemoveAll()
			if err != nil {
				return err
			}
			fmt.Fprintf(out, "removed %d builder images\n", n)
			if !keepInputs {
				if err := os.RemoveAll(cache); err != nil {
					return fmt.Errorf("remove cache: %w", err)
				}
				fmt.Fprintf(out, "removed %s\n", cache)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&cache, "cache", "", "cache directory (default $XDG_CACHE_HOME/qgfw)")
	cmd.Flags().StringVar(&engineName, "engine", "podman", "container engine: podman or docker")
	cmd.Flags().BoolVar(&keepInputs, "keep-inputs", false, "keep the downloaded inputs (remove only images)")
	_ = cmd.MarkFlagDirname("cache")
	_ = cmd.RegisterFlagCompletionFunc("engine", cobra.FixedCompletions([]string{"podman", "docker"}, cobra.ShellCompDirectiveNoFileComp))
	return cmd
}
