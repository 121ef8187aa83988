// Package imagetest boots the built image — dist/vmlinux (or the bzImage)
// and dist/initramfs, exactly as shipped — in QEMU and sends real traffic
// through it. The VM's NICs are virtio-net devices on tap interfaces that
// are moved into network namespaces (a netvm with real servers, Qubes
// clients); xenstore and QubesDB are the in-repo fakes, reached by the
// firewall through virtio-serial ports instead of xenbus and vchan. Those
// transports (qgfw.xenstore=, qgfw.qubesdb=) and the NIC names
// (qgfw.ifname=, giving QEMU's NICs netback's vif<domid>.<devid> names) are
// the only differences from the Qubes code path.
//
// Root only, and slow (TCG): skipped unless QGFW_IMAGE_DIST names the
// directory with the built image. `make image-test` runs TestImage,
// `make bench-image` runs TestImageBench (QGFW_IMAGE_BENCH=1). The console
// is printed when a test fails, or always with QGFW_SHOW_CONSOLE=1;
// QGFW_QEMU_MACHINE=pc boots the bzImage on -M pc instead of vmlinux on
// -M microvm, QGFW_QEMU_MEM sets -m (default 64).
package imagetest

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/internal/netnstest"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// image is the artifact under test.
type image struct {
	dist    string
	machine string // "microvm" or "pc"
	kernel  string // vmlinux (microvm) or vmlinuz (pc)
	initrd  string
}

// needImage skips the test unless the environment asks for the image
// tests, and finds the kernel to boot.
func needImage(t *testing.T) *image {
	t.Helper()
	dist := os.Getenv("QGFW_IMAGE_DIST")
	if dist == "" {
		t.Skip("boots the built image in QEMU: run by `make image-test` (set QGFW_IMAGE_DIST=/path/to/dist, as root)")
	}
	if os.Geteuid() != 0 {
		t.Fatal("QGFW_IMAGE_DIST is set but not running as root (taps and network namespaces)")
	}
	for _, tool := range []string{"qemu-system-x86_64", "ip", "dnsmasq", "ping"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not found (run ./scripts/setup-host.sh)", tool)
		}
	}
	sweepStale()
	img := &image{dist: dist, machine: os.Getenv("QGFW_QEMU_MACHINE"), initrd: filepath.Join(dist, "initramfs")}
	if img.machine == "" {
		img.machine = "microvm"
	}
	switch img.machine {
	case "microvm":
		// The PVH entry of the ELF kernel is the closest thing to how Xen
		// starts the VM. Older builds ship only the bzImage: its payload
		// is the same ELF, gzip-compressed.
		img.kernel = filepath.Join(dist, "vmlinux")
		if _, err := os.Stat(img.kernel); err != nil {
			img.kernel = filepath.Join(t.TempDir(), "vmlinux")
			if err := extractVmlinux(filepath.Join(dist, "vmlinuz"), img.kernel); err != nil {
				t.Fatal(err)
			}
		}
	case "pc":
		img.kernel = filepath.Join(dist, "vmlinuz")
	default:
		t.Fatalf("QGFW_QEMU_MACHINE=%q: want microvm or pc", img.machine)
	}
	for _, f := range []string{img.kernel, img.initrd} {
		if _, err := os.Stat(f); err != nil {
			t.Fatalf("%v (build the image first: make image)", err)
		}
	}
	return img
}

// staleNetns matches the namespaces tagFor names: prefix, test process ID,
// suffix.
var staleNetns = regexp.MustCompile(`^qg[a-z]([0-9]+)(u|c|u1|u2|c2|c3)$`)

// sweepStale deletes the namespaces of earlier runs whose test process is
// gone (killed before its cleanups ran), and the processes left in them:
// QEMU and the taps went with the test process, but dnsmasq changes its
// credentials, which clears its parent-death signal.
func sweepStale() {
	entries, _ := os.ReadDir("/var/run/netns")
	for _, e := range entries {
		m := staleNetns.FindStringSubmatch(e.Name())
		if m == nil {
			continue
		}
		if _, err := os.Stat("/proc/" + m[1]); err == nil {
			continue // still running
		}
		out, _ := exec.Command("ip", "netns", "pids", e.Name()).Output()
		for _, pid := range strings.Fields(string(out)) {
			if p, err := strconv.Atoi(pid); err == nil {
				syscall.Kill(p, syscall.SIGKILL)
			}
		}
		exec.Command("ip", "netns", "del", e.Name()).Run()
	}
}

// extractVmlinux writes the ELF kernel inside a gzip-compressed bzImage
// (CONFIG_KERNEL_GZIP) to dst: the first gzip member that inflates to an
// ELF file.
func extractVmlinux(bzImage, dst string) error {
	b, err := os.ReadFile(bzImage)
	if err != nil {
		return fmt.Errorf("extract vmlinux: %w", err)
	}
	magic := []byte{0x1f, 0x8b, 0x08}
	for off := 0; ; off++ {
		i := bytes.Index(b[off:], magic)
		if i < 0 {
			return fmt.Errorf("extract vmlinux from %s: no gzip-compressed ELF inside", bzImage)
		}
		off += i
		zr, err := gzip.NewReader(bytes.NewReader(b[off:]))
		if err != nil {
			continue
		}
		zr.Multistream(false)
		var out bytes.Buffer
		// The member is followed by other data: a trailing error is
		// expected once the ELF is out.
		io.Copy(&out, io.LimitReader(zr, 256<<20))
		if bytes.HasPrefix(out.Bytes(), []byte("\x7fELF")) {
			return os.WriteFile(dst, out.Bytes(), 0o644)
		}
	}
}

// nic is one virtio-net NIC of the VM: a tap in the host namespace when
// QEMU opens it, moved into ns afterwards and brought up there.
type nic struct {
	mac    string // the guest side's MAC
	rename string // qgfw.ifname: the guest's name for it ("" keeps ethN)
	ns     *netnstest.NS
	tap    string // set by startVM
}

// vmConfig is one boot.
type vmConfig struct {
	initrd string // default: the image's
	mem    int    // MB
	nics   []*nic
	// serial adds the virtio-serial ports "qubesdb" and "xenstore"; the
	// returned vm has them connected.
	serial bool
	append []string // more kernel parameters
}

// vm is a running QEMU.
type vm struct {
	cmd     *exec.Cmd
	console *netnstest.Buffer // serial console and QEMU's own messages
	started time.Time
	exited  chan struct{}
	exitErr error
	qdb, xs net.Conn // host ends of the virtio-serial ports
}

// startVM boots the image. QEMU's chardev sockets wait for their client
// (wait=on), so the ports are connected before the guest runs; the taps
// are moved into their namespaces as soon as QEMU has created them, while
// the guest kernel boots.
func startVM(t *testing.T, img *image, tag string, cfg vmConfig) *vm {
	t.Helper()
	if cfg.initrd == "" {
		cfg.initrd = img.initrd
	}
	dir, err := os.MkdirTemp("", "qgfw-vm")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	cmdline := []string{"console=ttyS0", "panic=1"}
	args := []string{"-M", img.machine, "-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", strconv.Itoa(cfg.mem),
		"-kernel", img.kernel, "-initrd", cfg.initrd,
		"-nographic", "-monitor", "none", "-serial", "stdio", "-no-reboot", "-nodefaults"}
	netdev, serialdev := "virtio-net-device", "virtio-serial-device"
	if img.machine == "pc" {
		// romfile=: no iPXE option ROM, -kernel boots directly.
		netdev, serialdev = "virtio-net-pci,romfile=", "virtio-serial-pci"
	} else if khz := hostTSCkHz(); khz > 0 {
		// microvm has no HPET or PM timer: under TCG on a busy host the
		// TSC calibration against the PIT can fail and hang the boot.
		cmdline = append(cmdline, fmt.Sprintf("tsc_early_khz=%d", khz))
	}
	for i, n := range cfg.nics {
		n.tap = fmt.Sprintf("%st%d", tag, i)
		args = append(args, "-netdev", fmt.Sprintf("tap,id=n%d,ifname=%s,script=no,downscript=no", i, n.tap),
			"-device", fmt.Sprintf("%s,netdev=n%d,mac=%s", netdev, i, n.mac))
		if n.rename != "" {
			cmdline = append(cmdline, fmt.Sprintf("qgfw.ifname=%s=%s", n.mac, n.rename))
		}
	}
	qdbSock, xsSock := filepath.Join(dir, "qdb"), filepath.Join(dir, "xs")
	if cfg.serial {
		args = append(args, "-device", serialdev,
			"-chardev", "socket,id=qdb,path="+qdbSock+",server=on,wait=on",
			"-device", "virtserialport,chardev=qdb,name=qubesdb",
			"-chardev", "socket,id=xs,path="+xsSock+",server=on,wait=on",
			"-device", "virtserialport,chardev=xs,name=xenstore")
		cmdline = append(cmdline, "qgfw.qubesdb=virtio:qubesdb", "qgfw.xenstore=virtio:xenstore")
	}
	cmdline = append(cmdline, cfg.append...)
	args = append(args, "-append", strings.Join(cmdline, " "))

	v := &vm{console: &netnstest.Buffer{}, exited: make(chan struct{})}
	v.cmd = exec.Command("qemu-system-x86_64", args...)
	v.cmd.Stdout, v.cmd.Stderr = v.console, v.console
	v.started = time.Now()
	done, err := netnstest.StartOwned(v.cmd)
	if err != nil {
		t.Fatalf("start qemu: %v", err)
	}
	go func() {
		v.exitErr = <-done
		close(v.exited)
	}()
	t.Cleanup(func() {
		v.cmd.Process.Kill()
		<-v.exited
		if v.qdb != nil {
			v.qdb.Close()
			v.xs.Close()
		}
		if t.Failed() || os.Getenv("QGFW_SHOW_CONSOLE") != "" {
			t.Logf("--- console (%s, -m %d):\n%s\n--- end of console", img.machine, cfg.mem, strings.ReplaceAll(v.console.String(), "\r", ""))
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if cfg.serial {
		var wg sync.WaitGroup
		var qerr, xerr error
		wg.Go(func() { v.qdb, qerr = v.dialPort(ctx, qdbSock) })
		wg.Go(func() { v.xs, xerr = v.dialPort(ctx, xsSock) })
		wg.Wait()
		if err := errors.Join(qerr, xerr); err != nil {
			t.Fatal(err)
		}
	}
	for _, n := range cfg.nics {
		for {
			if _, err := os.Stat("/sys/class/net/" + n.tap); err == nil {
				break
			}
			select {
			case <-v.exited:
				t.Fatalf("qemu exited before creating %s: %v", n.tap, v.exitErr)
			case <-ctx.Done():
				t.Fatalf("qemu did not create %s", n.tap)
			case <-time.After(10 * time.Millisecond):
			}
		}
		// The tap stays attached to QEMU's file descriptor in its new
		// namespace; it is deleted when QEMU closes it.
		for _, c := range [][]string{{"link", "set", n.tap, "netns", n.ns.Name}, {"-n", n.ns.Name, "link", "set", n.tap, "up"}} {
			if out, err := exec.Command("ip", c...).CombinedOutput(); err != nil {
				if v.waitExit(time.Second) {
					return v // the guest died early: the caller sees it stopped
				}
				t.Fatalf("ip %s: %v\n%s", strings.Join(c, " "), err, out)
			}
		}
	}
	return v
}

// dialPort connects to a chardev socket QEMU is waiting on.
func (v *vm) dialPort(ctx context.Context, path string) (net.Conn, error) {
	for {
		c, err := net.Dial("unix", path)
		if err == nil {
			return c, nil
		}
		select {
		case <-v.exited:
			return nil, fmt.Errorf("qemu exited before %s was connected: %v", path, v.exitErr)
		case <-ctx.Done():
			return nil, fmt.Errorf("connect %s: %w", path, err)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// waitExit waits for QEMU to end; false if it is still running after d.
func (v *vm) waitExit(d time.Duration) bool {
	select {
	case <-v.exited:
		return true
	case <-time.After(d):
		return false
	}
}

func (v *vm) running() bool {
	select {
	case <-v.exited:
		return false
	default:
		return true
	}
}

// exitStatus describes how QEMU ended (once it has).
func (v *vm) exitStatus() string {
	if v.exitErr == nil {
		return "qemu exited with status 0"
	}
	return "qemu: " + v.exitErr.Error()
}

// hostTSCkHz is the host's TSC rate, which TCG passes through to the guest.
func hostTSCkHz() int {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return 0
	}
	for line := range strings.Lines(string(b)) {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "cpu MHz" {
			mhz, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err == nil {
				return int(mhz * 1000)
			}
		}
	}
	return 0
}
