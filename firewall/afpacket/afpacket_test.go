package afpacket

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"sync"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/link"
)

// testEtherType is the IEEE "local experimental" EtherType: the peer's
// kernel ignores it, so only the test sockets see these frames.
const testEtherType = 0x88b5

var (
	macF0 = [6]byte{2, 0, 0, 0, 0, 0xf0}
	macP0 = [6]byte{2, 0, 0, 0, 0, 0x90}
)

func macString(m [6]byte) string { return net.HardwareAddr(m[:]).String() }

// pairTopo is namespace fw (interface f0, no addresses) joined to namespace
// peer (interface p0).
func pairTopo(t *testing.T) (fw, peer string) {
	needRoot(t)
	fw, peer = newNetns(t, "fw"), newNetns(t, "peer")
	veth(t, fw, "f0", macString(macF0), peer, "p0", macString(macP0))
	return fw, peer
}

// testFrame is an Ethernet frame of n bytes with testEtherType whose
// payload encodes tag and i, so misordered or foreign frames show.
func testFrame(dst, src [6]byte, n int, tag byte, i int) []byte {
	b := make([]byte, n)
	copy(b, dst[:])
	copy(b[6:], src[:])
	binary.BigEndian.PutUint16(b[12:], testEtherType)
	for j := 14; j < n; j++ {
		b[j] = byte(j*7) ^ tag ^ byte(i)
	}
	b[14], b[15] = tag, byte(i)
	return b
}

// rawSocket is an ordinary AF_PACKET socket (no virtio_net_hdr) on ifname
// in ns that sees only testEtherType frames. Reads give up after 10s so a
// lost frame fails the test instead of hanging it.
func rawSocket(t *testing.T, ns, ifname string) (fd, ifindex int) {
	t.Helper()
	err := inNetns(ns, func() error {
		ifi, err := net.InterfaceByName(ifname)
		if err != nil {
			return err
		}
		ifindex = ifi.Index
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(testEtherType)))
		if err != nil {
			return err
		}
		tv := unix.Timeval{Sec: 10}
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
			return err
		}
		return unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(testEtherType), Ifindex: ifindex})
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd, ifindex
}

// readTestFrames reads from l until it has n testEtherType frames and
// returns copies of them.
func readTestFrames(t *testing.T, l *Link, n int) []link.Frame {
	t.Helper()
	var out []link.Frame
	batch := make([]link.Frame, 64)
	for len(out) < n {
		m, err := l.ReadBatch(batch)
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range batch[:m] {
			if binary.BigEndian.Uint16(f.Data[12:]) == testEtherType {
				f.Data = bytes.Clone(f.Data)
				out = append(out, f)
			}
		}
	}
	return out
}

func TestFramesBothWays(t *testing.T) {
	fw, peer := pairTopo(t)
	l := openIn(t, fw, "f0", Config{BatchSize: 64})
	if l.MAC() != macF0 || l.MTU() != 1500 || l.Name() != "f0" {
		t.Fatalf("MAC %v MTU %d name %q, want %v 1500 f0", l.MAC(), l.MTU(), l.Name(), macF0)
	}
	fd, ifindex := rawSocket(t, peer, "p0")

	// Link -> peer: a batch of 64 from minimum size to a full 1500-byte MTU.
	var frames []link.Frame
	for i := range 64 {
		n := 60 + i*(1514-60)/63
		frames = append(frames, link.Frame{Data: testFrame(macP0, macF0, n, 'L', i)})
	}
	if n, err := l.WriteBatch(frames); n != 64 || err != nil {
		t.Fatalf("WriteBatch = %d, %v", n, err)
	}
	buf := make([]byte, 2048)
	for i, f := range frames {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			t.Fatalf("peer read %d: %v", i, err)
		}
		if !bytes.Equal(buf[:n], f.Data) {
			t.Fatalf("peer frame %d: got % x\nwant % x", i, buf[:n], f.Data)
		}
	}

	// Peer -> link. If our own frames came back (PACKET_IGNORE_OUTGOING
	// broken) they would be read first and fail the comparison.
	var want [][]byte
	for i := range 64 {
		b := testFrame(macF0, macP0, 60+i*23, 'P', i)
		want = append(want, b)
		if err := unix.Sendto(fd, b, 0, &unix.SockaddrLinklayer{Ifindex: ifindex, Protocol: htons(testEtherType)}); err != nil {
			t.Fatal(err)
		}
	}
	got := readTestFrames(t, l, 64)
	for i := range want {
		if !bytes.Equal(got[i].Data, want[i]) || got[i].Offload != (link.Offload{}) {
			t.Fatalf("link frame %d: got % x %+v\nwant % x", i, got[i].Data, got[i].Offload, want[i])
		}
	}

	// A frame longer than the MTU without GSO is dropped and counted; the
	// rest of its batch still goes out and the link keeps working.
	mixed := []link.Frame{
		{Data: testFrame(macP0, macF0, 100, 'A', 0)},
		{Data: testFrame(macP0, macF0, 1515, 'B', 1)},
		{Data: make([]byte, 10)}, // a runt
		{Data: testFrame(macP0, macF0, 200, 'D', 3)},
	}
	if n, err := l.WriteBatch(mixed); n != 4 || err != nil {
		t.Fatalf("WriteBatch(mixed) = %d, %v", n, err)
	}
	for _, f := range []link.Frame{mixed[0], mixed[3]} {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err != nil || !bytes.Equal(buf[:n], f.Data) {
			t.Fatalf("peer read after drop: %v, got % x want % x", err, buf[:n], f.Data)
		}
	}
	s := l.Stats()
	t.Logf("stats: %+v", s)
	if s.TxRefused != 1 || s.Runts != 1 || s.FramesOut != 66 || s.FramesIn < 64 || s.Outgoing != 0 {
		t.Errorf("stats %+v: want TxRefused 1, Runts 1, FramesOut 66, FramesIn >= 64", s)
	}
}

func TestCloseUnblocksRead(t *testing.T) {
	fw, _ := pairTopo(t)
	l := openIn(t, fw, "f0", Config{})
	done := make(chan error, 1)
	go func() {
		_, err := l.ReadBatch(make([]link.Frame, 8))
		done <- err
	}()
	time.Sleep(100 * time.Millisecond) // let the reader block (not an assertion)
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; !errors.Is(err, link.ErrClosed) {
		t.Fatalf("blocked ReadBatch returned %v, want link.ErrClosed", err)
	}
	if _, err := l.ReadBatch(make([]link.Frame, 8)); !errors.Is(err, link.ErrClosed) {
		t.Errorf("ReadBatch after Close: %v", err)
	}
	if _, err := l.WriteBatch([]link.Frame{{Data: make([]byte, 60)}}); !errors.Is(err, link.ErrClosed) {
		t.Errorf("WriteBatch after Close: %v", err)
	}
}

// TestLinkDownAndGone: a down interface costs frames, not the link; a
// deleted one is an error (a re-plugged interface needs a new Open).
func TestLinkDownAndGone(t *testing.T) {
	fw, peer := pairTopo(t)
	l := openIn(t, fw, "f0", Config{})
	fd, _ := rawSocket(t, peer, "p0")
	f := []link.Frame{{Data: testFrame(macP0, macF0, 60, 'X', 0)}}

	run(t, "ip", "-n", fw, "link", "set", "f0", "down")
	if n, err := l.WriteBatch(f); n != 1 || err != nil {
		t.Fatalf("WriteBatch on a down link = %d, %v; want 1, nil", n, err)
	}
	if s := l.Stats(); s.TxLinkDown != 1 {
		t.Fatalf("TxLinkDown = %d, want 1", s.TxLinkDown)
	}
	run(t, "ip", "-n", fw, "link", "set", "f0", "up")
	waitUp(t, fw, "f0")
	// For a few tens of ms after that, sending still fails with ENETDOWN
	// (the queue is activated asynchronously).
	for i := 0; ; i++ {
		before := l.Stats().TxLinkDown
		if _, err := l.WriteBatch(f); err != nil {
			t.Fatal(err)
		}
		if l.Stats().TxLinkDown == before {
			break
		}
		if i == 100 {
			t.Fatal("interface still down 100 writes after it was set up")
		}
		time.Sleep(20 * time.Millisecond)
	}
	buf := make([]byte, 100)
	if n, _, err := unix.Recvfrom(fd, buf, 0); err != nil || !bytes.Equal(buf[:n], f[0].Data) {
		t.Fatalf("frame after link up: %v % x", err, buf[:n])
	}

	run(t, "ip", "-n", fw, "link", "del", "f0")
	if _, err := l.WriteBatch(f); err == nil || errors.Is(err, link.ErrClosed) {
		t.Fatalf("WriteBatch on a deleted interface: %v, want an interface-gone error", err)
	} else {
		t.Logf("as expected: %v", err)
	}
}

// TestNoAllocs: ReadBatch and WriteBatch allocate nothing per frame.
func TestNoAllocs(t *testing.T) {
	fw, peer := pairTopo(t)
	a := openIn(t, fw, "f0", Config{})
	b := openIn(t, peer, "p0", Config{})
	out := make([]link.Frame, 8)
	for i := range out {
		out[i].Data = testFrame(macP0, macF0, 60+i*100, 'N', i)
	}
	in := make([]link.Frame, 16)
	transfer := func(from, to *Link) {
		if _, err := from.WriteBatch(out); err != nil {
			t.Fatal(err)
		}
		for got := 0; got < len(out); {
			n, err := to.ReadBatch(in)
			if err != nil {
				t.Fatal(err)
			}
			got += n
		}
	}
	allocs := testing.AllocsPerRun(200, func() {
		transfer(a, b)
		transfer(b, a)
	})
	if allocs != 0 {
		t.Errorf("%v allocations per round trip of 2x8 frames, want 0", allocs)
	}
}

func TestVnetRoundTrip(t *testing.T) {
	o := link.Offload{NeedsCsum: true, DataValid: true, CsumStart: 34, CsumOffset: 16, GSOType: link.GSOTCPv4 | link.GSOECN, GSOSize: 1448, HdrLen: 66}
	var b [vnetHdrLen]byte
	putVnet(b[:], &o)
	// struct virtio_net_hdr on a little-endian host.
	want := [vnetHdrLen]byte{3, 0x81, 66, 0, 0xa8, 5, 34, 0, 16, 0}
	if binary.NativeEndian.Uint16([]byte{1, 0}) == 1 && b != want {
		t.Errorf("putVnet = % x, want % x", b, want)
	}
	if got := getVnet(b[:]); got != o {
		t.Errorf("getVnet = %+v, want %+v", got, o)
	}
}

// TestLayout checks the x/sys structures handed to recvmmsg/sendmmsg have
// the kernel's 64-bit layout (struct mmsghdr, iovec, sockaddr_ll).
func TestLayout(t *testing.T) {
	if unsafe.Sizeof(uintptr(0)) != 8 {
		t.Skip("layout figures are for 64-bit targets")
	}
	var m unix.Mmsghdr
	if unsafe.Sizeof(m) != 64 || unsafe.Offsetof(m.Len) != 56 || unsafe.Sizeof(unix.Iovec{}) != 16 ||
		unsafe.Sizeof(unix.RawSockaddrLinklayer{}) != 20 {
		t.Errorf("mmsghdr %d (len at %d), iovec %d, sockaddr_ll %d; want 64 (56), 16, 20",
			unsafe.Sizeof(m), unsafe.Offsetof(m.Len), unsafe.Sizeof(unix.Iovec{}), unsafe.Sizeof(unix.RawSockaddrLinklayer{}))
	}
}

func FuzzVnet(f *testing.F) {
	f.Add([]byte{3, 0x81, 66, 0, 0xa8, 5, 34, 0, 16, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) < vnetHdrLen {
			return
		}
		b[0] &= vnetNeedsCsum | vnetDataValid // other flags are not represented
		o := getVnet(b)
		var out [vnetHdrLen]byte
		putVnet(out[:], &o)
		if !bytes.Equal(out[:], b[:vnetHdrLen]) {
			t.Fatalf("round trip % x -> % x", b[:vnetHdrLen], out)
		}
	})
}

// TestWriteTimeout: when the send queue stays full (here a 1 kbit/s tbf
// qdisc lets a frame out every 8 s and holds the rest, so a tiny send
// buffer fills), WriteBatch drops after WriteTimeout instead of blocking
// its goroutine for as long as the peer stalls.
func TestWriteTimeout(t *testing.T) {
	fw, _ := pairTopo(t)
	run(t, "ip", "netns", "exec", fw, "tc", "qdisc", "add", "dev", "f0", "root", "tbf", "rate", "1kbit", "burst", "2kb", "limit", "1mb")
	l := openIn(t, fw, "f0", Config{SocketBuffer: 4096, WriteTimeout: 50 * time.Millisecond})
	frames := make([]link.Frame, 40)
	for i := range frames {
		frames[i].Data = testFrame(macP0, macF0, 1000, 'T', i)
	}
	if n, err := l.WriteBatch(frames); n != len(frames) || err != nil {
		t.Fatalf("WriteBatch = %d, %v", n, err)
	}
	s := l.Stats()
	t.Logf("stats %+v", s)
	if s.TxBusy == 0 || s.FramesOut+s.TxBusy+s.TxNoBuffer != uint64(len(frames)) {
		t.Fatalf("want some TxBusy drops and every frame accounted for: %+v", s)
	}
}

// TestConcurrentWrites: several goroutines write to one link at once; every
// frame is either sent or counted (run with -race).
func TestConcurrentWrites(t *testing.T) {
	fw, peer := pairTopo(t)
	a := openIn(t, fw, "f0", Config{})
	b := openIn(t, peer, "p0", Config{SocketBuffer: 1 << 20})
	const writers, perWriter = 4, 2000
	received := make(chan int)
	go func() {
		in := make([]link.Frame, 64)
		got := 0
		for {
			n, err := b.ReadBatch(in)
			if err != nil {
				t.Logf("reader: %v", err)
				received <- got
				return
			}
			got += n
		}
	}()
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			batch := make([]link.Frame, 10)
			for i := 0; i < perWriter; i += len(batch) {
				for j := range batch {
					batch[j].Data = testFrame(macP0, macF0, 60+j*50, byte(w), i+j)
				}
				if _, err := a.WriteBatch(batch); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	// The reader may still be draining; frames it has not read yet are
	// in the socket queue or counted as QueueFull, so wait for the sum.
	for i := 0; ; i++ {
		s := b.Stats()
		if s.FramesIn+s.QueueFull >= writers*perWriter || i == 500 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	b.Close()
	got := <-received
	sa, sb := a.Stats(), b.Stats()
	t.Logf("sender %+v\nreceiver %+v", sa, sb)
	if sa.FramesOut != writers*perWriter {
		t.Errorf("sent %d frames, want %d", sa.FramesOut, writers*perWriter)
	}
	if uint64(got)+sb.QueueFull != writers*perWriter {
		t.Errorf("received %d + %d dropped by the receiving socket, want %d", got, sb.QueueFull, writers*perWriter)
	}
}

// A VLAN-tagged frame reaches the socket untagged (the receiving kernel
// moves the tag into the skb); the link must drop and count it instead of
// handing it out as an ordinary frame, which the dispatcher would forward
// to another network.
func TestVLANTaggedDropped(t *testing.T) {
	fw, peer := pairTopo(t)
	l := openIn(t, fw, "f0", Config{BatchSize: 8})
	fd, ifindex := rawSocket(t, peer, "p0")
	to := &unix.SockaddrLinklayer{Ifindex: ifindex, Protocol: htons(testEtherType)}
	plain := testFrame(macF0, macP0, 100, 'U', 0)
	// The same frame with an 802.1Q tag (VLAN 5) after the MACs.
	tagged := append(append(append([]byte(nil), plain[:12]...), 0x81, 0x00, 0x00, 0x05), plain[12:]...)
	for _, b := range [][]byte{tagged, plain, tagged} {
		if err := unix.Sendto(fd, b, 0, to); err != nil {
			t.Fatal(err)
		}
	}
	marker := testFrame(macF0, macP0, 100, 'M', 1)
	if err := unix.Sendto(fd, marker, 0, to); err != nil {
		t.Fatal(err)
	}
	got := readTestFrames(t, l, 2)
	if !bytes.Equal(got[0].Data, plain) || !bytes.Equal(got[1].Data, marker) {
		t.Fatalf("frames read: % x\n% x\nwant the untagged frame and the marker only", got[0].Data, got[1].Data)
	}
	if s := l.Stats(); s.VLAN != 2 {
		t.Fatalf("VLAN drops %d, want 2", s.VLAN)
	}
}

// With a negative WriteTimeout (client links) a full send queue costs the
// frames that do not fit at once, counted as TxBusy, and WriteBatch does
// not wait for room.
func TestNoWaitOnFullQueue(t *testing.T) {
	fw, _ := pairTopo(t)
	run(t, "ip", "netns", "exec", fw, "tc", "qdisc", "add", "dev", "f0", "root", "tbf", "rate", "1kbit", "burst", "2kb", "limit", "1mb")
	l := openIn(t, fw, "f0", Config{SocketBuffer: 4096, WriteTimeout: -1})
	frames := make([]link.Frame, 40)
	for i := range frames {
		frames[i].Data = testFrame(macP0, macF0, 1000, 'N', i)
	}
	for range 3 {
		if n, err := l.WriteBatch(frames); n != len(frames) || err != nil {
			t.Fatalf("WriteBatch = %d, %v", n, err)
		}
	}
	s := l.Stats()
	t.Logf("stats %+v", s)
	if s.TxBusy == 0 || s.FramesOut+s.TxBusy+s.TxNoBuffer != 3*uint64(len(frames)) {
		t.Fatalf("want TxBusy drops and every frame accounted for: %+v", s)
	}
}
