package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/afpacket"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/boot"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/dispatch"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/link"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/qubesvm"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/vchan"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/xenstore"
	"golang.org/x/sys/unix"
)

// The programs the kernel runs for dom0's requests (kernel/reboot.c:
// orderly_poweroff runs poweroff_cmd, "/sbin/poweroff" by default;
// orderly_reboot runs "/sbin/reboot", a fixed path). PID 1 links both to
// itself at boot.
const poweroffHelper, rebootHelper = "/sbin/poweroff", "/sbin/reboot"

// shutdownHelper reports whether the program runs as one of the helpers,
// judging by the name it was started as, and the signal it sends PID 1.
func shutdownHelper(argv0 string) (unix.Signal, bool) {
	switch filepath.Base(argv0) {
	case filepath.Base(poweroffHelper):
		return unix.SIGTERM, true
	case filepath.Base(rebootHelper):
		return unix.SIGINT, true
	}
	return 0, false
}

// qubesDBPort is QubesDB's vchan port; dom0 is the server.
const qubesDBPort = 111

// runPID1 boots the VM and runs the firewall in Qubes mode. It never
// returns: the VM powers off (or reboots) when the firewall stops, and on
// any error that leaves it unable to filter — a firewall that cannot
// enforce its rules must not pretend to run.
func runPID1() {
	logger := log.New(os.Stderr, "qubes-go-firewall: ", log.Lmicroseconds|log.Lmsgprefix)
	logf := logger.Printf
	logf("started (pid %d)", os.Getpid())
	// If the firewall dies, the report must say why: every goroutine's
	// stack, not only the one that panicked. The runtime writes it straight
	// to the console, which the kernel's Xen console driver copies into the
	// console ring before the write returns; the kernel then panics and
	// waits (panic= in the built-in command line) so that xenconsoled reads
	// the ring before the domain is restarted or destroyed.
	debug.SetTraceback("all")
	// Shutdown has one path, the kernel's. With CONFIG_XEN the guest
	// kernel always watches control/shutdown itself (drivers/xen/manage.c
	// shutdown_handler) and acknowledges dom0's request in a transaction
	// before a user-space watcher could even read it; so the firewall does
	// not watch the key at all, and PID 1 handles what the kernel does with
	// the request instead: "poweroff" and "halt" run orderly_poweroff, which
	// executes /sbin/poweroff; "reboot" runs orderly_reboot, which executes
	// /sbin/reboot (Debian's 6.1; other kernels call ctrl_alt_del, which
	// sends SIGINT to PID 1 once ctrl-alt-del is off). Both names are links
	// to this binary, which then sends PID 1 SIGTERM or SIGINT. Without the
	// links, the kernel forces an immediate power-off or reset. Signals
	// first, so that no request is lost while PID 1 boots.
	sig := make(chan os.Signal, 2)
	signal.Notify(sig, unix.SIGTERM, unix.SIGINT)
	if err := boot.Mount(); err != nil {
		fatal(logf, err)
	}
	if err := unix.Reboot(unix.LINUX_REBOOT_CMD_CAD_OFF); err != nil {
		logf("ctrl-alt-del off: %v (a reboot request resets the VM at once)", err)
	}
	for _, h := range []string{poweroffHelper, rebootHelper} {
		if err := boot.LinkSelf("/", h); err != nil {
			logf("%v (dom0's requests will end the VM without a clean stop)", err)
		}
	}
	go boot.ReapChildren()
	cmdline, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		fatal(logf, fmt.Errorf("read kernel command line: %w", err))
	}
	opts, err := boot.ParseCmdline(string(cmdline))
	if err != nil {
		fatal(logf, err)
	}
	if err := boot.RenameInterfaces(opts.Rename); err != nil {
		fatal(logf, err)
	}
	total := memTotal()
	logf("memory limit %d MiB", boot.SetMemoryLimit(total)>>20)
	ctx, cancel := context.WithCancel(context.Background())
	var reboot atomic.Bool
	go func() {
		switch s := <-sig; s {
		case unix.SIGINT:
			reboot.Store(true)
			logf("%v: reboot requested (by the kernel's /sbin/reboot or ctrl-alt-del)", s)
		default:
			logf("%v: poweroff requested (by the kernel's /sbin/poweroff)", s)
		}
		cancel()
	}()

	xs, err := dialXenstore(opts.Xenstore)
	if err != nil {
		fatal(logf, err)
	}
	cfg := qubesvm.Config{
		XS:           xs,
		QubesDB:      qubesDBDialer(opts.QubesDB, xs),
		Uplink:       "eth0",
		BSDIP:        opts.IPv4,
		BSDGateway:   opts.Gateway,
		BSDDNS:       opts.DNS,
		NATTableSize: natSize(opts.NATTableSize, total),
		NATClientMax: opts.NATClientMax,
		StatsEvery:   time.Minute,
		Logf:         logf,
	}
	if err := qubesLinks(&cfg, total, logf); err != nil {
		fatal(logf, err)
	}
	if err := qubesvm.Run(ctx, cfg); err != nil {
		fatal(logf, err)
	}
	logf("halting (reboot %v)", reboot.Load())
	boot.Halt(reboot.Load())
}

func fatal(logf func(string, ...any), err error) {
	logf("fatal: %v; powering off", err)
	boot.Halt(false)
}

// dialXenstore opens xenstore: the xenbus device in Qubes, a virtio-serial
// port under test.
func dialXenstore(transport string) (*xenstore.Client, error) {
	if name, ok := strings.CutPrefix(transport, "virtio:"); ok {
		f, err := openVirtioPort(context.Background(), name)
		if err != nil {
			return nil, err
		}
		return xenstore.New(f), nil
	}
	return xenstore.Dial(xenstore.DevicePath)
}

// qubesDBDialer connects to dom0's QubesDB: over vchan in Qubes, over a
// virtio-serial port under test. Same protocol, same client.
func qubesDBDialer(transport string, xs *xenstore.Client) func(context.Context) (io.ReadWriteCloser, error) {
	if name, ok := strings.CutPrefix(transport, "virtio:"); ok {
		return func(ctx context.Context) (io.ReadWriteCloser, error) { return openVirtioPort(ctx, name) }
	}
	return vchan.Dialer(qubesvm.StoreAdapter{XS: xs}, 0, qubesDBPort)
}

// openVirtioPort opens the virtio-serial port named name, waiting for it
// to appear. Without udev there is no /dev/virtio-ports/NAME link: the
// name is in /sys/class/virtio-ports/vportNpM/name and the device node is
// /dev/vportNpM (devtmpfs).
func openVirtioPort(ctx context.Context, name string) (io.ReadWriteCloser, error) {
	for {
		ports, _ := filepath.Glob("/sys/class/virtio-ports/*/name")
		for _, p := range ports {
			if b, err := os.ReadFile(p); err == nil && strings.TrimSpace(string(b)) == name {
				dev := "/dev/" + filepath.Base(filepath.Dir(p))
				f, err := os.OpenFile(dev, os.O_RDWR, 0)
				if err != nil {
					return nil, fmt.Errorf("open virtio port %s (%s): %w", name, dev, err)
				}
				return f, nil
			}
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("virtio port %s: %w", name, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// runXenCommand runs Qubes mode as an ordinary process, against xenstore
// and QubesDB served on unix sockets (the in-repo fakes in tests).
func runXenCommand(args []string, logf func(string, ...any)) int {
	fs := flag.NewFlagSet("firewall xen", flag.ContinueOnError)
	xsPath := fs.String("xenstore", xenstore.DevicePath, "xenstore: the xenbus device or a unix socket")
	qdbPath := fs.String("qubesdb-peer", "", "QubesDB as dom0 serves it: a unix socket speaking the peer protocol (empty: vchan)")
	uplink := fs.String("uplink", "eth0", "netfront interface")
	bsdIP := fs.String("ipv4", "", "BSD netvm mode: our address (with -ipv4-gw)")
	bsdGW := fs.String("ipv4-gw", "", "BSD netvm mode: the netvm's address")
	natSz := fs.Int("nat-table-size", 0, "NAT table entries (0: sized from memory)")
	memMiB := fs.Int("memory", 0, "size the Go memory limit, the NAT table and the links' buffers as in a VM whose kernel reports this many MiB (0: this machine's memory, and no memory limit); for tests of a VM size")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: firewall xen [flags]\n\nRuns the firewall as in a Qubes VM: clients from xenstore backend/vif, rules\nand uplink settings from QubesDB as dom0 pushes them. SIGTERM or SIGINT\nstops it (in the VM, PID 1 gets those from the kernel's shutdown handler).\nFlags:\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	total := memTotal()
	if *memMiB > 0 {
		total = int64(*memMiB) << 20
		logf("as a VM of %d MiB: memory limit %d MiB", *memMiB, boot.SetMemoryLimit(total)>>20)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	xs, err := xenstore.Dial(*xsPath)
	if err != nil {
		logf("firewall: %v", err)
		return 1
	}
	defer xs.Close()
	dial := qubesDBDialer("vchan", xs)
	if *qdbPath != "" {
		dial = func(ctx context.Context) (io.ReadWriteCloser, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", *qdbPath)
		}
	}
	cfg := qubesvm.Config{
		XS: xs, QubesDB: dial, Uplink: *uplink,
		NATTableSize: natSize(*natSz, total), StatsEvery: 5 * time.Second, Logf: logf,
	}
	for _, a := range []struct {
		s   string
		dst *netip.Addr
	}{{*bsdIP, &cfg.BSDIP}, {*bsdGW, &cfg.BSDGateway}} {
		if a.s == "" {
			continue
		}
		v, err := netip.ParseAddr(a.s)
		if err != nil || !v.Is4() {
			logf("firewall: bad address %q", a.s)
			return 2
		}
		*a.dst = v
	}
	if cfg.BSDIP.IsValid() != cfg.BSDGateway.IsValid() {
		logf("firewall: -ipv4 and -ipv4-gw go together")
		return 2
	}
	if err := qubesLinks(&cfg, total, logf); err != nil {
		logf("firewall: %v", err)
		return 1
	}
	if err := qubesvm.Run(ctx, cfg); err != nil {
		logf("firewall: %v", err)
		return 1
	}
	logf("firewall: stopped")
	return 0
}

// qubesLinks sets how Qubes mode opens links: every link shares one
// afpacket.Budget sized from the VM's memory, so that adding client VMs
// shrinks each link's buffers instead of exhausting the VM (32 MB must
// carry 10 clients, 64 MB 30). Client links never wait for a full send
// queue; the uplink, which carries every client's traffic, has the
// largest part. One afpacket.Loop reads them all: the VM has one vCPU.
func qubesLinks(cfg *qubesvm.Config, total int64, logf func(string, ...any)) error {
	lp, err := afpacket.NewLoop()
	if err != nil {
		return fmt.Errorf("link loop: %w", err)
	}
	cfg.Loop = lp
	b := linkBudget(total, logf)
	cfg.Budget = b
	cfg.OpenLink = qubesvm.OpenAFPacket(boot.InterfaceUp, afpacket.Config{Logf: logf, Budget: b, Weight: 4, Reserved: true})
	openClient := qubesvm.OpenAFPacket(boot.InterfaceUp, afpacket.Config{Logf: logf, Budget: b, WriteTimeout: -1})
	room := &vifRoom{
		total:  total,
		growth: slotBudget(total) * 5 / 4, // the GC's slack on top
		now:    time.Now,
		links:  func() int { return len(b.Shares()) },
		memory: func() (boot.Memory, error) {
			m, err := boot.ReadMemory()
			return boot.Memory{HWM: m.HWM << 10, RSS: m.RSS << 10, Available: m.Available << 10, Total: m.Total << 10}, err
		},
	}
	cfg.OpenClientLink = func(ctx context.Context, name string) (link.Link, error) {
		if err := room.admit(name); err != nil {
			return nil, err
		}
		return openClient(ctx, name)
	}
	return nil
}

// slotBudget is the links' receive slots and arenas: an eighth of the VM.
func slotBudget(total int64) int64 { return total / 8 }

// linkBudget divides the VM's memory: an eighth for the links' receive
// slots and the dispatcher's arenas (Go heap, under the runtime's limit of
// 6/10), an eighth as the most their kernel socket queues may hold; the NAT
// table takes another eighth (natSize) and the rest is the kernel's, the
// unpacked initramfs's and the runtime's. A quarter each ran a 32 MB VM
// under Xen out of memory during a netvm change, when the kernel sets up
// the new netfront (make test-xen). TestClientsPerVMSize checks the
// sizes Qubes users run (32 MB with 10 clients, 64 MB with 30).
func linkBudget(total int64, logf func(string, ...any)) *afpacket.Budget {
	slots, queues := int(slotBudget(total)), int(total/8)
	logf("link budget: %d KiB of receive slots and arenas, %d KiB of socket queues, shared by all links", slots>>10, queues>>10)
	return afpacket.NewBudget(slots, queues, dispatch.ArenaSize)
}
