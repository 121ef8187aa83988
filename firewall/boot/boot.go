// Package boot does what PID 1 owes the kernel in the firewall VM: mount
// the pseudo filesystems, read the kernel command line, size the Go heap to
// the VM, reap children, bring interfaces up, and power the VM off (never
// exit: PID 1 exiting panics the kernel).
package boot

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Mount mounts /proc, /sys and /dev (devtmpfs, where the kernel creates
// /dev/xen/* and the vif netdevs' nodes). A filesystem already mounted
// (EBUSY) is fine; anything else fails the boot, since without them
// nothing else works.
func Mount() error {
	for _, m := range []struct{ src, dst, fstype string }{
		{"proc", "/proc", "proc"},
		{"sysfs", "/sys", "sysfs"},
		{"devtmpfs", "/dev", "devtmpfs"},
	} {
		if err := os.MkdirAll(m.dst, 0o755); err != nil {
			return fmt.Errorf("mkdir %s: %w", m.dst, err)
		}
		err := unix.Mount(m.src, m.dst, m.fstype, unix.MS_NOSUID|unix.MS_NOEXEC, "")
		if err != nil && !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("mount %s on %s: %w", m.fstype, m.dst, err)
		}
	}
	return nil
}

// Options are the firewall's settings from the kernel command line. The
// --ipv4* and --nat-table-size names are qubes-mirage-firewall's, so the
// same kernelopts work for both.
type Options struct {
	// BSD netvm mode (--ipv4, --ipv4-gw): our address and the netvm's, with
	// the netvm reached as a client instead of through a netfront.
	IPv4, Gateway netip.Addr
	DNS           []netip.Addr // --ipv4-dns, --ipv4-dns2
	NATTableSize  int          // --nat-table-size
	NATClientMax  int          // qgfw.nat-client-max: one client's share of the table (0: half)
	LogLevel      string       // qgfw.log=info|debug
	// QubesDB is where QubesDB is reached: "vchan" (Qubes, the default)
	// or "virtio:NAME" (a virtio-serial port, for testing under QEMU).
	QubesDB string
	// Xenstore is "xenbus" (the default) or "virtio:NAME".
	Xenstore string
	// Rename lists interfaces to rename by MAC before anything starts
	// (qgfw.ifname=MAC=NAME). Under QEMU the NICs come up as ethN; this
	// gives them the vif<domid>.<devid> names netback would, so that
	// discovery runs unchanged.
	Rename []Rename
}

// Rename is one qgfw.ifname option.
type Rename struct {
	MAC  [6]byte
	Name string
}

// ParseCmdline reads the options from a kernel command line. Tokens it
// does not know are ignored (they are the kernel's); a known option with a
// bad value is an error, because a firewall must not start with settings
// its owner did not ask for.
func ParseCmdline(cmdline string) (Options, error) {
	o := Options{QubesDB: "vchan", Xenstore: "xenbus", LogLevel: "info"}
	for _, tok := range strings.Fields(cmdline) {
		key, val, hasVal := strings.Cut(tok, "=")
		var err error
		switch key {
		case "--ipv4":
			o.IPv4, err = parseIPv4(val)
		case "--ipv4-gw":
			o.Gateway, err = parseIPv4(val)
		case "--ipv4-dns", "--ipv4-dns2":
			var a netip.Addr
			if a, err = parseIPv4(val); err == nil {
				o.DNS = append(o.DNS, a)
			}
		case "--nat-table-size":
			o.NATTableSize, err = strconv.Atoi(val)
			if err == nil && (o.NATTableSize < 64 || o.NATTableSize > 1<<20) {
				err = errors.New("out of range 64..1048576")
			}
		case "qgfw.nat-client-max":
			o.NATClientMax, err = strconv.Atoi(val)
			if err == nil && (o.NATClientMax < 1 || o.NATClientMax > 1<<20) {
				err = errors.New("out of range 1..1048576")
			}
		case "qgfw.log":
			if val != "info" && val != "debug" {
				err = errors.New("want info or debug")
			}
			o.LogLevel = val
		case "qgfw.qubesdb":
			o.QubesDB, err = parseTransport(val, "vchan")
		case "qgfw.xenstore":
			o.Xenstore, err = parseTransport(val, "xenbus")
		case "qgfw.ifname":
			var r Rename
			if r, err = parseRename(val); err == nil {
				o.Rename = append(o.Rename, r)
			}
		default:
			continue
		}
		if err == nil && !hasVal {
			err = errors.New("missing value")
		}
		if err != nil {
			return o, fmt.Errorf("kernel command line %q: %w", tok, err)
		}
	}
	if o.IPv4.IsValid() != o.Gateway.IsValid() {
		return o, errors.New("kernel command line: --ipv4 and --ipv4-gw go together (BSD netvm mode)")
	}
	return o, nil
}

func parseIPv4(s string) (netip.Addr, error) {
	a, err := netip.ParseAddr(s)
	if err != nil || !a.Is4() {
		return netip.Addr{}, fmt.Errorf("not an IPv4 address: %q", s)
	}
	return a, nil
}

func parseRename(s string) (Rename, error) {
	i := strings.LastIndexByte(s, '=')
	if i < 0 {
		return Rename{}, errors.New("want MAC=NAME")
	}
	var r Rename
	m, err := net.ParseMAC(s[:i])
	if err != nil || len(m) != 6 {
		return r, fmt.Errorf("bad MAC %q", s[:i])
	}
	copy(r.MAC[:], m)
	r.Name = s[i+1:]
	if r.Name == "" || len(r.Name) >= unix.IFNAMSIZ || strings.ContainsAny(r.Name, "/ \t") {
		return r, fmt.Errorf("bad interface name %q", r.Name)
	}
	return r, nil
}

// RenameInterfaces applies the renames: the interface with each MAC gets
// its new name (it must still be down).
func RenameInterfaces(renames []Rename) error {
	for _, r := range renames {
		addrs, _ := filepath.Glob("/sys/class/net/*/address")
		old := ""
		for _, a := range addrs {
			b, err := os.ReadFile(a)
			if err != nil {
				continue
			}
			if m, err := net.ParseMAC(strings.TrimSpace(string(b))); err == nil && len(m) == 6 && [6]byte(m) == r.MAC {
				old = filepath.Base(filepath.Dir(a))
			}
		}
		if old == "" {
			return fmt.Errorf("rename to %s: no interface with MAC %x", r.Name, r.MAC)
		}
		if err := renameInterface(old, r.Name); err != nil {
			return err
		}
	}
	return nil
}

func renameInterface(old, name string) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	defer unix.Close(fd)
	// struct ifreq: the old name, then ifr_newname in the union.
	var ifr [40]byte
	copy(ifr[:unix.IFNAMSIZ-1], old)
	copy(ifr[unix.IFNAMSIZ:unix.IFNAMSIZ*2-1], name)
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SIOCSIFNAME, uintptr(unsafe.Pointer(&ifr[0]))); errno != 0 {
		return fmt.Errorf("rename %s to %s: %w", old, name, errno)
	}
	return nil
}

func parseTransport(s, native string) (string, error) {
	if s == native {
		return s, nil
	}
	if name, ok := strings.CutPrefix(s, "virtio:"); ok && name != "" && !strings.ContainsAny(name, "/.") {
		return s, nil
	}
	return "", fmt.Errorf("want %s or virtio:NAME", native)
}

// BSD reports whether the options select BSD netvm mode.
func (o Options) BSD() bool { return o.IPv4.IsValid() }

// MemTotal is the memory the kernel manages (sysinfo totalram): in a VM,
// its size less what the kernel itself took at boot.
func MemTotal() (int64, error) {
	var si unix.Sysinfo_t
	if err := unix.Sysinfo(&si); err != nil {
		return 0, fmt.Errorf("sysinfo: %w", err)
	}
	return int64(si.Totalram) * int64(si.Unit), nil
}

// SetMemoryLimit sets the Go runtime's soft memory limit to a share of
// total, the VM's memory (MemTotal), so the garbage collector works harder
// instead of the kernel killing PID 1 (which takes the VM down), and
// returns the limit.
func SetMemoryLimit(total int64) int64 {
	// The kernel, socket buffers and the unpacked initramfs need the rest.
	limit := total * 6 / 10
	debug.SetMemoryLimit(limit)
	return limit
}

// ReapChildren collects exited children forever. PID 1 inherits every
// orphan; the firewall starts none, but a zombie must never accumulate.
func ReapChildren() {
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGCHLD)
	for range ch {
		for {
			var ws unix.WaitStatus
			pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}

// InterfaceUp sets the IFF_UP flag of a network interface; netfront and
// netback devices start down.
func InterfaceUp(name string) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return fmt.Errorf("interface %q: %w", name, err)
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("get flags of %s: %w", name, err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("set %s up: %w", name, err)
	}
	return nil
}

// Halt ends the VM: power off, or reboot when reboot is set. It flushes
// the (empty) filesystems first and never returns.
func Halt(reboot bool) {
	unix.Sync()
	cmd := unix.LINUX_REBOOT_CMD_POWER_OFF
	if reboot {
		cmd = unix.LINUX_REBOOT_CMD_RESTART
	}
	if err := unix.Reboot(cmd); err != nil {
		fmt.Fprintf(os.Stderr, "boot: reboot(%#x): %v\n", cmd, err)
	}
	select {}
}

// LinkSelf makes path (below root) a symbolic link to /init, the running
// program, creating its directory; an existing file there is replaced.
// The kernel runs fixed helper paths (/sbin/poweroff, /sbin/reboot) that
// the image does not ship as files.
func LinkSelf(root, path string) error {
	p := filepath.Join(root, path)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return fmt.Errorf("link %s: %w", path, err)
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("link %s: %w", path, err)
	}
	if err := os.Symlink("/init", p); err != nil {
		return fmt.Errorf("link %s: %w", path, err)
	}
	return nil
}
