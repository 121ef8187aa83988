// Command firewall is the qubes-go-firewall VM's only process: /init in the
// image, or an ordinary process on Linux (this mode), where it forwards
// between AF_PACKET links on existing interfaces and takes its rules and
// uplink settings from a QubesDB daemon socket.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/afpacket"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/boot"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/control"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/dispatch"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/link"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/nat"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/qubesdb"
	"golang.org/x/sys/unix"
)

// defaultClientMAC is the MAC Qubes gives every client VM's interface.
var defaultClientMAC = [6]byte{0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x00}

// clientFlag collects -client IFNAME=IP[,MAC] flags.
type clientFlag []clientSpec

type clientSpec struct {
	ifname string
	ip     [4]byte
	mac    [6]byte
}

func (f *clientFlag) String() string { return fmt.Sprint(*f) }

func (f *clientFlag) Set(s string) error {
	name, rest, ok := strings.Cut(s, "=")
	if !ok || name == "" {
		return fmt.Errorf("want IFNAME=IP[,MAC], got %q", s)
	}
	ipStr, macStr, hasMAC := strings.Cut(rest, ",")
	ip, err := netip.ParseAddr(ipStr)
	if err != nil || !ip.Is4() {
		return fmt.Errorf("client %s: bad IPv4 address %q", name, ipStr)
	}
	spec := clientSpec{ifname: name, ip: ip.As4(), mac: defaultClientMAC}
	if hasMAC {
		var m [6]byte
		if _, err := fmt.Sscanf(macStr, "%02x:%02x:%02x:%02x:%02x:%02x", &m[0], &m[1], &m[2], &m[3], &m[4], &m[5]); err != nil {
			return fmt.Errorf("client %s: bad MAC %q", name, macStr)
		}
		spec.mac = m
	}
	*f = append(*f, spec)
	return nil
}

type options struct {
	uplink     string
	clients    clientFlag
	qubesdb    string
	natSize    int
	sockBuf    int
	statsEvery time.Duration
	loop       bool
}

func main() {
	if os.Getpid() == 1 {
		runPID1()
		return
	}
	if sig, ok := shutdownHelper(os.Args[0]); ok {
		// Run by the kernel as /sbin/poweroff or /sbin/reboot for one of
		// dom0's requests: pass it on to PID 1 (see runPID1).
		if err := unix.Kill(1, sig); err != nil {
			fmt.Fprintf(os.Stderr, "%s: signal PID 1: %v\n", os.Args[0], err)
			os.Exit(1)
		}
		return
	}
	logger := log.New(os.Stderr, "", log.LstdFlags|log.Lmicroseconds)
	if len(os.Args) > 1 && os.Args[1] == "xen" {
		os.Exit(runXenCommand(os.Args[2:], logger.Printf))
	}
	var o options
	fs := flag.NewFlagSet("firewall", flag.ExitOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `Usage: firewall -uplink IFNAME -client IFNAME=IP[,MAC] ... [flags]
       firewall xen [flags]      (Qubes mode against xenstore/QubesDB sockets; see firewall xen -h)

As /init (PID 1) in the VM image it runs in Qubes mode on its own: see the
README for the kernel command line options.

Runs the qubes-go-firewall forwarding engine as an ordinary Linux process:
frames are read and written on the named interfaces with AF_PACKET sockets;
the interfaces must carry no IP address of the kernel's. Rules
(/qubes-firewall/...) and uplink settings (/qubes-ip, /qubes-gateway,
/qubes-primary-dns, /qubes-secondary-dns) come from QubesDB. SIGTERM or
SIGINT shuts down cleanly. Logs go to stderr.

Flags:
`)
		fs.PrintDefaults()
	}
	fs.StringVar(&o.uplink, "uplink", "", "uplink (netvm) interface; reopened when the netvm changes")
	fs.Var(&o.clients, "client", "client interface and the client VM's address, IFNAME=IP[,MAC] (MAC defaults to 00:16:3e:5e:6c:00); repeat per client")
	fs.StringVar(&o.qubesdb, "qubesdb", "/var/run/qubes/qubesdb.sock", "QubesDB daemon unix socket")
	fs.IntVar(&o.natSize, "nat-table-size", 0, "NAT table entries (0: sized from available memory)")
	fs.IntVar(&o.sockBuf, "socket-buffer", 0, "kernel receive/send buffer per link in bytes (0: up to 4 MiB, less in small VMs); too small a buffer drops GSO super-frames under load")
	fs.DurationVar(&o.statsEvery, "stats-interval", time.Minute, "how often to log counters (0: never)")
	fs.BoolVar(&o.loop, "loop", true, "read every link from one goroutine (an epoll loop), as in the VM; false: a reader goroutine per link")
	fs.Parse(os.Args[1:])
	if o.uplink == "" || len(o.clients) == 0 || fs.NArg() != 0 {
		fs.Usage()
		os.Exit(2)
	}
	if err := run(o, logger.Printf); err != nil {
		logger.Printf("firewall: %v", err)
		os.Exit(1)
	}
}

func run(o options, logf func(string, ...any)) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	dcfg := dispatch.Config{Logf: logf, NAT: nat.Config{MaxEntries: natSize(o.natSize, memTotal())}}
	var wg sync.WaitGroup
	if o.loop {
		lp, err := afpacket.NewLoop()
		if err != nil {
			return fmt.Errorf("link loop: %w", err)
		}
		dcfg.Loop = lp
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := lp.Run(ctx); err != nil && ctx.Err() == nil {
				logf("firewall: link loop: %v", err)
				stop()
			}
		}()
	}
	d := dispatch.New(dcfg)
	var links []link.Link
	defer func() {
		stop() // the loop runs until ctx ends, also on an early error return
		for _, l := range links {
			l.Close()
		}
		wg.Wait()
	}()
	ls := &linkSet{}
	sockBuf := socketBuffer(o.sockBuf)
	// Clients' links drop on a full send queue instead of waiting: a
	// stalled client costs only its own frames (the uplink may wait).
	openLink := func(name string, client bool) (link.Link, error) {
		cfg := afpacket.Config{Logf: logf, SocketBuffer: sockBuf}
		if client {
			cfg.WriteTimeout = -1
		}
		l, err := afpacket.Open(name, cfg)
		if err == nil {
			ls.add(l)
		}
		return l, err
	}
	for _, cs := range o.clients {
		l, err := openLink(cs.ifname, true)
		if err != nil {
			return fmt.Errorf("client %s: %w", cs.ifname, err)
		}
		links = append(links, l)
		p := d.Attach(l)
		if err := d.AddClient(cs.ip, cs.mac, p); err != nil {
			return err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := d.Serve(ctx, p); err != nil {
				logf("firewall: client link %s: %v", cs.ifname, err)
			}
		}()
		logf("firewall: client %v on %s", netip.AddrFrom4(cs.ip), cs.ifname)
	}

	ctl := control.New(control.Config{Dispatcher: d, UplinkName: o.uplink, OpenLink: func(name string) (link.Link, error) { return openLink(name, false) }, Logf: logf})
	res := ctl.NewResolver()

	db := qubesdb.NewClient(qubesdb.UnixDialer(o.qubesdb), qubesdb.Daemon, logf)
	mirror := qubesdb.NewMirror(ctl.Handle)
	wg.Add(3)
	go func() { defer wg.Done(); res.Run(ctx) }()
	go func() { defer wg.Done(); ctl.Run(ctx, time.Second) }()
	go func() {
		defer wg.Done()
		if err := db.Run(ctx, mirror); err != nil && ctx.Err() == nil {
			logf("firewall: qubesdb: %v", err)
		}
	}()
	if o.statsEvery > 0 {
		go ctl.LogStats(ctx, o.statsEvery, func() string { return "links: " + ls.describe() })
	}
	logf("firewall: running (uplink %s, %d clients, qubesdb %s)", o.uplink, len(o.clients), o.qubesdb)
	<-ctx.Done()
	logf("firewall: shutting down")
	return nil
}

// linkSet remembers the open AF_PACKET links, for their counters. A closed
// link (an uplink replaced after a netvm change) is forgotten at the next
// describe, its counters kept in gone: each holds about 1 MiB of receive
// slots.
type linkSet struct {
	mu    sync.Mutex
	links []*afpacket.Link
	gone  struct{ n, in, out, drops uint64 }
}

func (s *linkSet) add(l *afpacket.Link) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.links = append(s.links, l)
}

// describe sums the drops the links (and the kernel below them) counted.
func (s *linkSet) describe() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var b strings.Builder
	open := s.links[:0]
	for _, l := range s.links {
		st := l.Stats()
		drops := st.Truncated + st.RxErrors + st.QueueFull + st.Runts + st.VLAN + st.TxRefused + st.TxLinkDown + st.TxNoBuffer + st.TxBusy
		if l.Closed() {
			s.gone.n++
			s.gone.in, s.gone.out, s.gone.drops = s.gone.in+st.FramesIn, s.gone.out+st.FramesOut, s.gone.drops+drops
			continue
		}
		open = append(open, l)
		fmt.Fprintf(&b, "%s in %d out %d dropped %d (queue-full %d); ", l.Name(), st.FramesIn, st.FramesOut, drops, st.QueueFull)
	}
	clear(s.links[len(open):])
	s.links = open
	if s.gone.n > 0 {
		fmt.Fprintf(&b, "%d closed links in %d out %d dropped %d; ", s.gone.n, s.gone.in, s.gone.out, s.gone.drops)
	}
	return strings.TrimSuffix(b.String(), "; ")
}

// socketBuffer picks the per-link kernel socket buffer: n if set, else
// 4 MiB or 1/16 of the VM's memory, whichever is smaller. The default
// 208 KiB holds only three 64 KiB GSO super-frames, and the kernel drops
// the rest of a burst before the firewall can read it.
func socketBuffer(n int) int {
	if n > 0 {
		return n
	}
	var si unix.Sysinfo_t
	if err := unix.Sysinfo(&si); err != nil {
		return 1 << 20
	}
	return min(4<<20, int(si.Totalram)*int(si.Unit)/16)
}

// natSize picks the NAT table size: n if set, else about 1/8 of total
// memory at ~256 bytes an entry, between 4096 and 65536.
func natSize(n int, total int64) int {
	if n > 0 {
		return n
	}
	return max(4096, min(int(total/8/256), 65536))
}

// memTotal is boot.MemTotal, or 256 MiB when the kernel does not say.
func memTotal() int64 {
	total, err := boot.MemTotal()
	if err != nil {
		return 256 << 20
	}
	return total
}
