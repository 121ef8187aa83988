// Package afpacket implements link.Link on a Linux AF_PACKET socket bound to
// one interface (veth in tests; netfront eth0 and netback vifN.M in Qubes).
//
// The socket is SOCK_RAW with PACKET_VNET_HDR, so GSO super-frames (up to
// 64 KiB) and partial checksums cross the firewall whole: the receiving
// kernel does not segment them and the transmitting kernel (or the other
// side of the virtual NIC) does. Frames move in batches with recvmmsg and
// sendmmsg on a non-blocking socket that waits in the Go runtime poller, so
// blocked links cost no threads and Close wakes a blocked reader.
//
// Memory: each link owns BatchSize receive slots of FrameSize+10 bytes
// (default 16 x 65559 bytes, about 1 MiB), plus what the kernel queues on
// the socket (SocketBuffer, default the kernel's rmem_default/wmem_default).
// A VM with an uplink and four clients therefore spends about 5 MiB on
// receive buffers with the defaults, and one with thirty clients more than
// 30 MiB: in a Qubes firewall VM the links share a Budget instead, which
// gives each a part of a fixed total and shrinks the parts as links are
// added.
//
// The kernel's default receive queue (rmem_default, typically 212992
// bytes, counted by skb truesize) holds only a few super-frames, so a TCP
// burst can overflow it (Stats.QueueFull) and TCP retransmits; a larger
// SocketBuffer trades kernel memory for fewer such drops.
//
// Why recvmmsg/sendmmsg and not TPACKET_V3 rings: a ring must reserve
// room for 64 KiB super-frames in kernel-pinned memory whatever the
// traffic, a block is only returned to the kernel when every frame in it is
// done (at odds with handing frames to the caller until the next
// ReadBatch), and a TX ring means copying every frame into it, while
// sendmmsg sends from the caller's buffers. PACKET_QDISC_BYPASS is not
// used: it would turn a full driver queue into drops instead of
// queueing, and veth has no qdisc to bypass.
//
// The interface's MAC address and MTU are read at Open; later changes are
// not followed (Qubes does not change them; a re-plugged netfront is a new
// interface and needs a new Open). Writing to a deleted interface returns
// an error; a reader of one notices only if it was woken by the kernel's
// ENETDOWN after the interface was gone, otherwise it waits until Close.
package afpacket

import (
	"errors"
	"fmt"
	"math/bits"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/link"
)

// Config tunes a link. The zero value gives the defaults.
type Config struct {
	// BatchSize is the most frames one ReadBatch returns and one sendmmsg
	// call carries. Default 16.
	BatchSize int
	// FrameSize is the receive buffer of one frame, Ethernet header
	// included. Longer frames are dropped and counted as Truncated.
	// Default link.MaxFrame, which fits any GSO super-frame; with a smaller
	// value super-frames are lost, so only lower it on links known not to
	// carry GSO.
	FrameSize int
	// SocketBuffer, when positive, sets the kernel's receive and send
	// queue limits for the socket (SO_RCVBUFFORCE, SO_SNDBUFFORCE; the
	// kernel doubles the value for its bookkeeping). Zero keeps the
	// kernel's defaults.
	SocketBuffer int
	// WriteTimeout bounds how long WriteBatch waits for the kernel to
	// accept more frames when the socket's send queue is full (a stalled
	// peer); after it the waiting frames are dropped and counted as Busy,
	// so one stuck link cannot stall the goroutine feeding it forever.
	// Default 100ms; negative: never wait, drop at once. Client links
	// do not wait: a client VM that stops draining its queue must cost
	// only its own frames, not delay the reader that serves every other
	// link.
	WriteTimeout time.Duration
	// Budget, when set, shares memory among the links that name it: it
	// sets this link's receive slots (up to BatchSize) and, unless
	// SocketBuffer is set, its socket queues, and changes both as links
	// open and close. Weight is the link's part of it relative to the
	// others (default 1; an uplink, which carries every client's
	// traffic, deserves more).
	Budget *Budget
	Weight int
	// Reserved links are always admitted by the Budget, which keeps room
	// for one (the uplink); others are refused with ErrBudget when it has
	// none left.
	Reserved bool
	// Logf receives rare events (errors that cost frames, with
	// exponential back-off). Default: discard.
	Logf func(format string, args ...any)
}

const (
	defaultBatch        = 16
	defaultWriteTimeout = 100 * time.Millisecond
)

// Stats counts a link's traffic. Bytes are Ethernet frame bytes.
type Stats struct {
	FramesIn, BytesIn   uint64
	FramesOut, BytesOut uint64

	// Frames dropped, by cause.
	Truncated  uint64 // frame longer than Config.FrameSize
	RxErrors   uint64 // frames the kernel failed to hand over (e.g. unknown GSO type) and link-down events
	Outgoing   uint64 // frames we or the kernel sent, which PACKET_IGNORE_OUTGOING should already hide
	QueueFull  uint64 // frames the kernel dropped because the socket's receive queue was full
	Runts      uint64 // frames shorter than an Ethernet header, read or asked to be written
	VLAN       uint64 // frames that carried an 802.1Q tag (the kernel strips it into PACKET_AUXDATA)
	TxRefused  uint64 // frames the kernel refused to send (too large, bad offload metadata)
	TxLinkDown uint64 // frames not sent because the interface was down
	TxNoBuffer uint64 // frames the queueing discipline or driver dropped (ENOBUFS)
	TxBusy     uint64 // frames dropped after waiting WriteTimeout for a full send queue
}

// Link is an AF_PACKET socket bound to one interface; see link.Link.
type Link struct {
	name    string
	ifindex int
	mac     [6]byte
	mtu     int
	cfg     Config
	file    *os.File
	rc      syscall.RawConn
	closed  atomic.Bool

	loop   atomic.Pointer[Loop] // the Loop serving the link, if one does
	rx     rxState
	rxWant atomic.Int32 // receive slots the budget gives; the reader resizes
	rxHave atomic.Int32 // receive slots the reader has
	// fullReads counts reads that filled every slot (the socket held
	// more): the Budget's sign of a link that wants a larger share.
	fullReads atomic.Uint32
	tx        txState

	// Counters. The reader updates the receive ones once per batch.
	framesIn, bytesIn, framesOut, bytesOut atomic.Uint64
	truncated, rxErrors, outgoing, runts   atomic.Uint64
	vlanTagged                             atomic.Uint64
	txRefused, txLinkDown, txNoBuf, txBusy atomic.Uint64
	queueFullMu                            sync.Mutex
	queueFull                              uint64
}

var _ link.Link = (*Link)(nil)

// rxState is the reader's: recvmmsg headers, each with one iovec pointing
// at its slot of buf ([virtio_net_hdr][frame]) and a sockaddr_ll that tells
// the packet type.
type rxState struct {
	slot  int
	buf   []byte
	hdrs  []unix.Mmsghdr
	iovs  []unix.Iovec
	addrs []unix.RawSockaddrLinklayer
	ctrl  []byte // auxDataSpace bytes per message for the PACKET_AUXDATA cmsg

	recv  func(fd uintptr) bool // prebuilt so that ReadBatch does not allocate a closure
	wait  bool                  // recv lets the poller wait on EAGAIN
	vlen  int
	n     int
	errno unix.Errno
}

// txState is the writers', guarded by mu: sendmmsg headers with two iovecs
// each, the virtio_net_hdr in vnet and the caller's frame.
type txState struct {
	mu   sync.Mutex
	hdrs []unix.Mmsghdr
	iovs []unix.Iovec
	vnet []byte
	lens []int

	send  func(fd uintptr) bool
	off   int  // first header to send
	vlen  int  // headers to send from off
	wait  bool // let the poller wait for writability on EAGAIN
	n     int
	errno unix.Errno
}

// Open binds a new AF_PACKET socket to the interface ifname in the caller's
// network namespace (that of the calling thread) and puts the interface in
// promiscuous mode for the socket's lifetime.
func Open(ifname string, cfg Config) (*Link, error) {
	if cfg.BatchSize <= 0 {
		cfg.BatchSize = defaultBatch
	}
	if cfg.FrameSize <= 0 {
		cfg.FrameSize = link.MaxFrame
	}
	if cfg.FrameSize < 14 || cfg.FrameSize > link.MaxFrame {
		return nil, fmt.Errorf("open %s: frame size %d outside 14..%d", ifname, cfg.FrameSize, link.MaxFrame)
	}
	if cfg.WriteTimeout == 0 {
		cfg.WriteTimeout = defaultWriteTimeout
	}
	if cfg.Logf == nil {
		cfg.Logf = func(string, ...any) {}
	}
	if cfg.Weight <= 0 {
		cfg.Weight = 1
	}
	// Protocol 0 until bind: a socket created with ETH_P_ALL would queue
	// frames of every interface in the meantime.
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: socket: %w", ifname, err)
	}
	l := &Link{name: ifname, cfg: cfg}
	if err := l.setup(fd); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("open %s: %w", ifname, err)
	}
	l.file = os.NewFile(uintptr(fd), "afpacket:"+ifname)
	if l.rc, err = l.file.SyscallConn(); err != nil {
		l.file.Close()
		return nil, fmt.Errorf("open %s: %w", ifname, err)
	}
	l.rx.slot = vnetHdrLen + cfg.FrameSize
	l.rxWant.Store(int32(cfg.BatchSize))
	if cfg.Budget != nil {
		if err := cfg.Budget.join(l); err != nil {
			l.file.Close()
			return nil, fmt.Errorf("open %s: %w", ifname, err)
		}
	}
	l.initRx(int(l.rxWant.Load()))
	l.initTx()
	return l, nil
}

func (l *Link) setup(fd int) error {
	ifr, err := unix.NewIfreq(l.name)
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFINDEX, ifr); err != nil {
		return fmt.Errorf("interface index: %w", err)
	}
	l.ifindex = int(ifr.Uint32())
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFMTU, ifr); err != nil {
		return fmt.Errorf("interface MTU: %w", err)
	}
	l.mtu = int(ifr.Uint32())

	type opt struct {
		level, name, value int
		what               string
	}
	opts := []opt{
		{unix.SOL_PACKET, unix.PACKET_VNET_HDR, 1, "PACKET_VNET_HDR"},
		{unix.SOL_PACKET, unix.PACKET_IGNORE_OUTGOING, 1, "PACKET_IGNORE_OUTGOING"},
		// The kernel strips a VLAN tag into the skb before packet_rcv, so
		// a tagged frame reads as untagged; only the auxiliary data say
		// it was tagged (tp_status TP_STATUS_VLAN_VALID).
		{unix.SOL_PACKET, unix.PACKET_AUXDATA, 1, "PACKET_AUXDATA"},
	}
	if b := l.cfg.SocketBuffer; b > 0 {
		opts = append(opts,
			opt{unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, b, "SO_RCVBUFFORCE"},
			opt{unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, b, "SO_SNDBUFFORCE"})
	}
	for _, o := range opts {
		if err := unix.SetsockoptInt(fd, o.level, o.name, o.value); err != nil {
			return fmt.Errorf("setsockopt %s: %w", o.what, err)
		}
	}
	mreq := unix.PacketMreq{Ifindex: int32(l.ifindex), Type: unix.PACKET_MR_PROMISC}
	if err := unix.SetsockoptPacketMreq(fd, unix.SOL_PACKET, unix.PACKET_ADD_MEMBERSHIP, &mreq); err != nil {
		return fmt.Errorf("promiscuous membership: %w", err)
	}
	sa := &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: l.ifindex}
	if err := unix.Bind(fd, sa); err != nil {
		return fmt.Errorf("bind: %w", err)
	}
	// The bound address carries the device's hardware address.
	got, err := unix.Getsockname(fd)
	if err != nil {
		return fmt.Errorf("getsockname: %w", err)
	}
	ll, ok := got.(*unix.SockaddrLinklayer)
	if !ok || ll.Halen != 6 {
		return fmt.Errorf("not an Ethernet interface")
	}
	copy(l.mac[:], ll.Addr[:6])
	return nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// initRx (re)builds the receive state for n slots.
func (l *Link) initRx(n int) {
	r := &l.rx
	slot := r.slot
	l.rxHave.Store(int32(n))
	r.buf = make([]byte, n*slot)
	r.hdrs = make([]unix.Mmsghdr, n)
	r.iovs = make([]unix.Iovec, n)
	r.addrs = make([]unix.RawSockaddrLinklayer, n)
	r.ctrl = make([]byte, n*auxDataSpace)
	for i := range n {
		r.iovs[i].Base = &r.buf[i*slot]
		r.iovs[i].SetLen(slot)
		h := &r.hdrs[i].Hdr
		h.Iov = &r.iovs[i]
		h.SetIovlen(1)
		h.Name = (*byte)(unsafe.Pointer(&r.addrs[i]))
		h.Control = &r.ctrl[i*auxDataSpace]
	}
	r.recv = func(fd uintptr) bool {
		n, _, e := unix.Syscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&r.hdrs[0])), uintptr(r.vlen), 0, 0, 0)
		if e == unix.EAGAIN && r.wait {
			return false
		}
		r.n, r.errno = int(n), e
		return true
	}
}

func (l *Link) initTx() {
	n := l.cfg.BatchSize
	t := &l.tx
	t.hdrs = make([]unix.Mmsghdr, n)
	t.iovs = make([]unix.Iovec, 2*n)
	t.vnet = make([]byte, n*vnetHdrLen)
	t.lens = make([]int, n)
	for i := range n {
		t.iovs[2*i].Base = &t.vnet[i*vnetHdrLen]
		t.iovs[2*i].SetLen(vnetHdrLen)
		h := &t.hdrs[i].Hdr
		h.Iov = &t.iovs[2*i]
		h.SetIovlen(2)
	}
	t.send = func(fd uintptr) bool {
		n, _, e := unix.Syscall6(unix.SYS_SENDMMSG, fd, uintptr(unsafe.Pointer(&t.hdrs[t.off])), uintptr(t.vlen), 0, 0, 0)
		if e == unix.EAGAIN && t.wait {
			return false
		}
		t.n, t.errno = int(n), e
		return true
	}
}

func (l *Link) Name() string { return l.name }

// Closed reports whether Close was called.
func (l *Link) Closed() bool { return l.closed.Load() }
func (l *Link) MAC() [6]byte { return l.mac }
func (l *Link) MTU() int     { return l.mtu }

// Close closes the socket; a ReadBatch or WriteBatch blocked on it returns
// link.ErrClosed.
func (l *Link) Close() error {
	if l.closed.Swap(true) {
		return nil
	}
	if l.cfg.Budget != nil {
		l.cfg.Budget.leave(l)
	}
	err := l.file.Close()
	if lp := l.loop.Load(); lp != nil {
		lp.poke() // a closed socket leaves the epoll set silently
	}
	if err != nil {
		return fmt.Errorf("close %s: %w", l.name, err)
	}
	return nil
}

// Stats returns the link's counters.
func (l *Link) Stats() Stats {
	l.queueFullMu.Lock()
	// PACKET_STATISTICS resets the kernel's counters on every read, so
	// they are accumulated here.
	_ = l.rc.Control(func(fd uintptr) {
		if s, err := unix.GetsockoptTpacketStats(int(fd), unix.SOL_PACKET, unix.PACKET_STATISTICS); err == nil {
			l.queueFull += uint64(s.Drops)
		}
	})
	qf := l.queueFull
	l.queueFullMu.Unlock()
	return Stats{
		FramesIn: l.framesIn.Load(), BytesIn: l.bytesIn.Load(),
		FramesOut: l.framesOut.Load(), BytesOut: l.bytesOut.Load(),
		Truncated: l.truncated.Load(), RxErrors: l.rxErrors.Load(), VLAN: l.vlanTagged.Load(),
		Outgoing: l.outgoing.Load(), QueueFull: qf, Runts: l.runts.Load(),
		TxRefused: l.txRefused.Load(), TxLinkDown: l.txLinkDown.Load(),
		TxNoBuffer: l.txNoBuf.Load(), TxBusy: l.txBusy.Load(),
	}
}

// count adds n to c and logs what happened with exponential back-off: on
// the 1st, 2nd, 4th, 8th ... event of that counter.
func (l *Link) count(c *atomic.Uint64, n uint64, what string) {
	after := c.Add(n)
	if p := uint64(1) << (63 - bits.LeadingZeros64(after)); p > after-n {
		l.cfg.Logf("%s: %s (%d so far)", l.name, what, after)
	}
}

// closedErr turns an error of the runtime poller into link.ErrClosed when
// the link was closed.
func (l *Link) closedErr(op string, err error) error {
	if l.closed.Load() || errors.Is(err, os.ErrClosed) {
		return link.ErrClosed
	}
	return fmt.Errorf("%s %s: %w", op, l.name, err)
}
