package main

import (
	"encoding/json"
	"fmt"
	"path"
	"runtime"
	"runtime/debug"

	"github.com/spf13/cobra"

	"github.com/qubes-go-firewall/qubes-go-firewall/builder/pipeline"
)

type versionInfo struct {
	Version     string `json:"version"`
	Go          string `json:"go"`
	GoToolchain string `json:"image_go_toolchain"`
	LinuxSource string `json:"image_linux_source"`
	BaseImage   string `json:"image_base"`
}

func newVersionCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "version",
		Short: "Print qgfw's version and the image's pinned inputs",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			pins := pipeline.DefaultPins()
			v := versionInfo{
				Version:     "(devel)",
				Go:          runtime.Version(),
				GoToolchain: pins.GoToolchain.Version,
				LinuxSource: path.Base(pins.LinuxSource.Path),
				BaseImage:   pins.Base.Suite + ", locked in " + pins.BaseLock,
			}
			if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" {
				v.Version = bi.Main.Version
			}
			out := cmd.OutOrStdout()
			if asJSON {
				enc := json.NewEncoder(out)
				enc.SetIndent("", "  ")
				return enc.Encode(v)
			}
			fmt.Fprintf(out, "qgfw %s (%s)\nimage inputs: %s, Go toolchain %s, base %s\n",
				v.Version, v.Go, v.LinuxSource, v.GoToolchain, v.BaseImage)
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print as JSON")
	return cmd
}
