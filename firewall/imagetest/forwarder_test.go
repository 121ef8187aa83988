package imagetest

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/boot"
	"golang.org/x/sys/unix"
)

// The comparison VM for the throughput benchmark runs the image's kernel
// with this test binary as /init: as PID 1 it does what a Linux
// sys-firewall's kernel does for forwarding — addresses, routes,
// ip_forward=1 — and nothing else. The kernel has no netfilter, so it
// routes without NAT (the netvm has a route back to the client).

func TestMain(m *testing.M) {
	if os.Getpid() == 1 {
		runForwarder()
	}
	os.Exit(m.Run())
}

// forwarderReady is the comparison VM's console line once it forwards.
const forwarderReady = "linux-forwarder: ready"

// runForwarder configures the bench topology's routing as PID 1 and
// sleeps; the test ends the VM.
func runForwarder() {
	err := setupForwarder()
	if err != nil {
		fmt.Printf("linux-forwarder: %v\n", err)
		boot.Halt(false)
	}
	fmt.Println(forwarderReady)
	for {
		// Not select{}: with no other goroutine the runtime would call
		// that a deadlock and exit, and PID 1 exiting panics the kernel.
		time.Sleep(time.Hour)
	}
}

func setupForwarder() error {
	if err := boot.Mount(); err != nil {
		return err
	}
	cmdline, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return err
	}
	opts, err := boot.ParseCmdline(string(cmdline))
	if err != nil {
		return err
	}
	if err := boot.RenameInterfaces(opts.Rename); err != nil {
		return err
	}
	// The firewall's address on both sides, as a Linux sys-firewall has
	// it: the client reaches its gateway on vif2.0 by a /32 route.
	fw := netip.MustParseAddr(fwIP1)
	for _, a := range []struct {
		dev    string
		prefix int
	}{{"eth0", 24}, {"vif2.0", 32}} {
		if err := boot.InterfaceUp(a.dev); err != nil {
			return err
		}
		if err := addAddr(a.dev, fw, a.prefix); err != nil {
			return err
		}
	}
	if err := addRoute("vif2.0", netip.MustParsePrefix(client2IP+"/32"), netip.Addr{}); err != nil {
		return err
	}
	if err := addRoute("eth0", netip.MustParsePrefix("0.0.0.0/0"), netip.MustParseAddr(netvm1IP)); err != nil {
		return err
	}
	return os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0)
}

// addAddr adds addr/prefix to dev (RTM_NEWADDR).
func addAddr(dev string, addr netip.Addr, prefix int) error {
	ifc, err := net.InterfaceByName(dev)
	if err != nil {
		return err
	}
	a := addr.As4()
	// struct ifaddrmsg: family, prefixlen, flags, scope, index.
	body := []byte{unix.AF_INET, byte(prefix), 0, unix.RT_SCOPE_UNIVERSE}
	body = binary.NativeEndian.AppendUint32(body, uint32(ifc.Index))
	body = appendAttr(body, unix.IFA_LOCAL, a[:])
	body = appendAttr(body, unix.IFA_ADDRESS, a[:])
	if err := netlinkDo(unix.RTM_NEWADDR, body); err != nil {
		return fmt.Errorf("add %v/%d to %s: %w", addr, prefix, dev, err)
	}
	return nil
}

// addRoute adds a route to dst through dev, via gw if it is valid
// (RTM_NEWROUTE).
func addRoute(dev string, dst netip.Prefix, gw netip.Addr) error {
	ifc, err := net.InterfaceByName(dev)
	if err != nil {
		return err
	}
	scope := byte(unix.RT_SCOPE_LINK)
	if gw.IsValid() {
		scope = unix.RT_SCOPE_UNIVERSE
	}
	// struct rtmsg: family, dst_len, src_len, tos, table, protocol,
	// scope, type, flags.
	body := []byte{unix.AF_INET, byte(dst.Bits()), 0, 0, unix.RT_TABLE_MAIN, unix.RTPROT_BOOT, scope, unix.RTN_UNICAST, 0, 0, 0, 0}
	d := dst.Addr().As4()
	body = appendAttr(body, unix.RTA_DST, d[:])
	body = appendAttr(body, unix.RTA_OIF, binary.NativeEndian.AppendUint32(nil, uint32(ifc.Index)))
	if gw.IsValid() {
		g := gw.As4()
		body = appendAttr(body, unix.RTA_GATEWAY, g[:])
	}
	if err := netlinkDo(unix.RTM_NEWROUTE, body); err != nil {
		return fmt.Errorf("route %v dev %s via %v: %w", dst, dev, gw, err)
	}
	return nil
}

func appendAttr(b []byte, typ uint16, data []byte) []byte {
	b = binary.NativeEndian.AppendUint16(b, uint16(unix.SizeofRtAttr+len(data)))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = append(b, data...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

// netlinkDo sends one rtnetlink request and waits for its acknowledgement.
func netlinkDo(typ uint16, body []byte) error {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("netlink socket: %w", err)
	}
	defer unix.Close(fd)
	msg := binary.NativeEndian.AppendUint32(nil, uint32(unix.SizeofNlMsghdr+len(body)))
	msg = binary.NativeEndian.AppendUint16(msg, typ)
	msg = binary.NativeEndian.AppendUint16(msg, unix.NLM_F_REQUEST|unix.NLM_F_ACK|unix.NLM_F_CREATE|unix.NLM_F_EXCL)
	msg = binary.NativeEndian.AppendUint32(msg, 1) // sequence
	msg = binary.NativeEndian.AppendUint32(msg, 0) // port: the kernel
	msg = append(msg, body...)
	if err := unix.Sendto(fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("netlink send: %w", err)
	}
	buf := make([]byte, 4096)
	n, _, err := unix.Recvfrom(fd, buf, 0)
	if err != nil {
		return fmt.Errorf("netlink receive: %w", err)
	}
	// The answer is NLMSG_ERROR: the header, then a negative errno (0
	// acknowledges).
	if n < unix.SizeofNlMsghdr+4 || binary.NativeEndian.Uint16(buf[4:6]) != unix.NLMSG_ERROR {
		return fmt.Errorf("netlink: unexpected answer (%d bytes)", n)
	}
	if e := int32(binary.NativeEndian.Uint32(buf[unix.SizeofNlMsghdr:])); e != 0 {
		return unix.Errno(-e)
	}
	return nil
}

// forwarderInitramfs writes an initramfs (uncompressed newc cpio) with
// this test binary as /init, which must be static (CGO_ENABLED=0).
func forwarderInitramfs(dst string) error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	f, err := elf.Open(self)
	if err != nil {
		return fmt.Errorf("read test binary: %w", err)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			f.Close()
			return fmt.Errorf("the test binary is dynamically linked; build it with CGO_ENABLED=0 to use it as /init")
		}
	}
	f.Close()
	bin, err := os.ReadFile(self)
	if err != nil {
		return err
	}
	var b bytes.Buffer
	ino := 1
	entry := func(name string, mode uint32, rdev [2]int, data []byte) {
		fmt.Fprintf(&b, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
			ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name)+1, 0)
		ino++
		b.WriteString(name)
		b.WriteByte(0)
		for b.Len()%4 != 0 {
			b.WriteByte(0)
		}
		b.Write(data)
		for b.Len()%4 != 0 {
			b.WriteByte(0)
		}
	}
	for _, d := range []string{"dev", "proc", "sys"} {
		entry(d, unix.S_IFDIR|0o755, [2]int{}, nil)
	}
	entry("dev/console", unix.S_IFCHR|0o600, [2]int{5, 1}, nil)
	entry("init", unix.S_IFREG|0o755, [2]int{}, bin)
	entry("TRAILER!!!", 0, [2]int{}, nil)
	return os.WriteFile(dst, b.Bytes(), 0o644)
}
