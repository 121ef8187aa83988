package imagetest

import (
	"compress/gzip"
	"debug/elf"
	"io"
	"os"
	"path/filepath"
	"testing"
)

// TestImageFitsSmallVM checks the layout Xen's PVH domain builder gives the
// image: libxc loads the kernel ELF at its physical addresses and puts the
// initramfs, decompressed, after it, then its own structures. With the
// kernel at Linux's default 16 MiB that ran past 32 MiB and a 32 MiB VM
// could not be built at all ("segment module0 too large"), which only
// real Xen showed; this catches it without Xen. The margin covers start
// info, command line and the first page tables.
func TestImageFitsSmallVM(t *testing.T) {
	dist := os.Getenv("QGFW_IMAGE_DIST")
	if dist == "" {
		t.Skip("reads the built image: run by `make image-test` (QGFW_IMAGE_DIST=/path/to/dist)")
	}
	const vmMiB, marginMiB = 32, 4
	vmlinux := filepath.Join(dist, "vmlinux")
	if _, err := os.Stat(vmlinux); err != nil {
		vmlinux = filepath.Join(t.TempDir(), "vmlinux")
		if err := extractVmlinux(filepath.Join(dist, "vmlinuz"), vmlinux); err != nil {
			t.Fatal(err)
		}
	}
	f, err := elf.Open(vmlinux)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var kernelEnd uint64
	for _, p := range f.Progs {
		if p.Type == elf.PT_LOAD {
			kernelEnd = max(kernelEnd, p.Paddr+p.Memsz)
		}
	}
	rd, err := os.Open(filepath.Join(dist, "initramfs"))
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	zr, err := gzip.NewReader(rd)
	if err != nil {
		t.Fatal(err)
	}
	ramdisk, err := io.Copy(io.Discard, zr)
	if err != nil {
		t.Fatal(err)
	}
	need := kernelEnd + uint64(ramdisk) + marginMiB<<20
	t.Logf("kernel ends at %.1f MiB, initramfs %.1f MiB decompressed: %.1f MiB with the margin",
		float64(kernelEnd)/(1<<20), float64(ramdisk)/(1<<20), float64(need)/(1<<20))
	if need > vmMiB<<20 {
		t.Errorf("a %d MiB PVH VM cannot hold kernel and initramfs (%.1f MiB needed): lower CONFIG_PHYSICAL_START or shrink the initramfs",
			vmMiB, float64(need)/(1<<20))
	}
}
