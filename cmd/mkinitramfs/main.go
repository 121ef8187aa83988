// Command mkinitramfs writes the firewall image's initramfs: the standard
// tree of builder/initramfs with the given binary as /init, as a
// reproducible gzip-compressed newc cpio archive.
//
//	mkinitramfs -init firewall -o initramfs
package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/qubes-go-firewall/qubes-go-firewall/builder/initramfs"
)

func main() {
	if err := run(os.Args[1:], os.Stderr); err != nil {
		fmt.Fprintf(os.Stderr, "mkinitramfs: %v\n", err)
		os.Exit(1)
	}
}

func run(args []string, stderr io.Writer) error {
	fl := flag.NewFlagSet("mkinitramfs", flag.ContinueOnError)
	fl.SetOutput(stderr)
	initPath := fl.String("init", "", "`path` of the static binary that becomes /init")
	out := fl.String("o", "", "output `file` (gzip-compressed newc cpio)")
	if err := fl.Parse(args); err != nil {
		return err
	}
	if *initPath == "" || *out == "" || fl.NArg() != 0 {
		fl.Usage()
		return fmt.Errorf("need -init and -o and no other arguments")
	}
	init, err := os.ReadFile(*initPath)
	if err != nil {
		return fmt.Errorf("read init: %w", err)
	}
	// Write next to the target and rename, so a failed run never leaves a
	// truncated initramfs under the final name.
	tmp, err := os.CreateTemp(filepath.Dir(*out), ".mkinitramfs-*")
	if err != nil {
		return fmt.Errorf("create output: %w", err)
	}
	defer os.Remove(tmp.Name())
	if err := initramfs.Build(tmp, init); err != nil {
		tmp.Close()
		return fmt.Errorf("build %s: %w", *out, err)
	}
	// A fixed mode, whatever the umask: the file is published as is.
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return fmt.Errorf("chmod %s: %w", tmp.Name(), err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", tmp.Name(), err)
	}
	if err := os.Rename(tmp.Name(), *out); err != nil {
		return fmt.Errorf("rename to %s: %w", *out, err)
	}
	return nil
}
