package main

import (
	"errors"
	"fmt"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/qubes-go-firewall/qubes-go-firewall/builder/salt"
	"github.com/qubes-go-firewall/qubes-go-firewall/builder/sign"
)

type saltOptions struct {
	vm    salt.Options
	from  string
	out   string
	trust trustOptions
}

func newSaltCmd() *cobra.Command {
	o := &saltOptions{vm: salt.DefaultOptions()}
	cmd := &cobra.Command{
		Use:   "salt --from DIR --out DIR [--release vX.Y.Z | --key PUB] [VM options]",
		Short: "Emit the dom0 Salt states that install the image as a firewall VM",
		Long: `salt renders the salt/ templates into a state tree for dom0:

  OUT/<name>.top          top file (qubesctl top.enable <name>)
  OUT/<name>/init.sls     installs the kernel files, creates/updates the VM
  OUT/<name>/vmlinuz      the artifacts, copied from --from
  OUT/<name>/initramfs
  OUT/<name>/SHA256SUMS   the sums file they were checked against (+ .sig)

It reads SHA256SUMS (default: the one in --from; with --release the signed
release sums built into qgfw, checked with the release key built in, or
those of --checksums-dir if given; with --key, its signature), copies
vmlinuz and initramfs into the tree while hashing the copied bytes, and
refuses (exit 3) if a digest differs. The source_hash values it writes are
the digests it computed.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := o.vm.Validate(); err != nil {
				return withCode(exitUsage, fmt.Errorf("salt: %w", err))
			}
			if o.out == "" {
				return withCode(exitUsage, errors.New("salt: --out is required"))
			}
			o.trust.warn = cmd.ErrOrStderr()
			src, err := o.sumsSource()
			if err != nil {
				return withCode(exitUsage, fmt.Errorf("salt: %w", err))
			}
			f, data, sig, err := src.LoadRaw()
			if err != nil {
				return withCode(trustExitCode(err), fmt.Errorf("salt: %w", err))
			}
			extra := map[string][]byte{"SHA256SUMS": data}
			if sig != nil {
				extra["SHA256SUMS.sig"] = sig
			}
			label := src.Path
			if o.trust.release != "" {
				label = "the signed release " + o.trust.release + " sums"
			}
			var pub []byte
			if src.Key != "" {
				// dom0 checks the signature again, with this key.
				if pub, err = src.KeyPEM(); err != nil {
					return withCode(trustExitCode(err), fmt.Errorf("salt: %w", err))
				}
			}
			if err := salt.WriteTree(o.out, o.vm, salt.Source{Dir: o.from, Sums: f, Label: label, Extra: extra, PublicKey: pub}); err != nil {
				return withCode(trustExitCode(err), fmt.Errorf("salt: %w", err))
			}
			w := cmd.OutOrStdout()
			if src.Key == "" {
				fmt.Fprintf(w, "warning: %s was not signature-checked (no --key or --release)\n", src.Path)
			}
			fmt.Fprintf(w, "wrote %s: apply in dom0 with `sudo qubesctl --show-output state.apply %s` (see README: Install in Qubes)\n", o.out, o.vm.Name)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.from, "from", "dist", "directory holding vmlinuz and initramfs")
	f.StringVar(&o.out, "out", "", "directory to create the state tree in (must not exist or be empty)")
	f.StringVar(&o.trust.sums, "sums", "", "SHA256SUMS to check the artifacts against (default: FROM/SHA256SUMS)")
	f.StringVar(&o.trust.key, "key", "", "public key that must have signed the sums file")
	f.StringVar(&o.trust.sig, "sig", "", "signature of the sums file (default: SUMS.sig; needs --key)")
	f.StringVar(&o.trust.release, "release", "", "check against the published, signed release vX.Y.Z in checksums/")
	f.StringVar(&o.trust.checksumsDir, "checksums-dir", "", "OVERRIDE: trust the keys and release sums in this directory instead of those built into qgfw")
	f.StringVar(&o.vm.Name, "name", o.vm.Name, "VM name (also the kernel directory under /var/lib/qubes/vm-kernels/)")
	f.StringVar(&o.vm.Label, "label", o.vm.Label, "VM label colour")
	f.IntVar(&o.vm.Memory, "memory", o.vm.Memory, "VM memory in MB (memory = maxmem)")
	f.StringVar(&o.vm.NetVM, "netvm", o.vm.NetVM, `upstream netvm ("none" for none, e.g. in BSD mode)`)
	f.StringVar(&o.vm.KernelOpts, "kernelopts", o.vm.KernelOpts, "kernel options, e.g. the BSD-mode --ipv4=... --ipv4-gw=...")
	f.StringSliceVar(&o.vm.Clients, "clients", nil, "VMs to switch to the new firewall (comma-separated)")
	f.BoolVar(&o.vm.SetDefaultNetVM, "set-default-netvm", false, "make the new firewall the system's default netvm")
	return cmd
}

// sumsSource says which sums file, signature and key vouch for --from.
func (o *saltOptions) sumsSource() (sign.Sums, error) {
	return o.trust.source(func() string { return filepath.Join(o.from, "SHA256SUMS") })
}
