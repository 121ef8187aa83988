package afpacket

import (
	"errors"
	"fmt"
	"os"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/link"
)

// ReadBatch implements link.Link. It waits in the runtime poller until the
// socket has frames and returns at most Config.BatchSize of them; frames
// point into the link's receive slots.
func (l *Link) ReadBatch(frames []link.Frame) (int, error) {
	return l.read(frames, true)
}

// read is ReadBatch; without wait (a Loop's read of a link it was told is
// readable) it makes one recvmmsg call and returns what that gave, perhaps
// nothing, so that one link's flood of frames it drops cannot keep the
// loop from the others.
func (l *Link) read(frames []link.Frame, wait bool) (int, error) {
	r := &l.rx
	if len(frames) == 0 {
		return 0, nil
	}
	r.wait = wait
	for {
		if l.closed.Load() {
			return 0, link.ErrClosed
		}
		if w := int(l.rxWant.Load()); w != len(r.hdrs) {
			l.initRx(w) // the budget changed this link's share
		}
		n := min(len(frames), len(r.hdrs))
		for i := range n {
			h := &r.hdrs[i]
			h.Hdr.Namelen = unix.SizeofSockaddrLinklayer
			h.Hdr.SetControllen(auxDataSpace)
			h.Hdr.Flags = 0
			h.Len = 0
		}
		r.vlen = n
		if err := l.rc.Read(r.recv); err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) && !l.closed.Load() {
				// The budget's wake-up: resize at the top.
				if err := l.file.SetReadDeadline(time.Time{}); err != nil {
					return 0, l.closedErr("read", err)
				}
				continue
			}
			return 0, l.closedErr("read", err)
		}
		switch r.errno {
		case 0:
			if r.n == r.vlen && l.cfg.Budget != nil {
				l.fullReads.Add(1)
			}
			if got := l.takeFrames(frames); got > 0 || !wait {
				return got, nil
			}
		case unix.EAGAIN: // only without wait
			return 0, nil
		case unix.EINTR:
		case unix.EINVAL:
			// The kernel could not describe a frame in a virtio_net_hdr
			// (af_packet.c packet_rcv_vnet); the frame is gone.
			l.count(&l.rxErrors, 1, "receive error EINVAL (frame not representable with a virtio_net_hdr)")
		case unix.ENETDOWN:
			// Reported once when the interface goes down; reads resume
			// when it comes back up, unless it was unregistered.
			l.count(&l.rxErrors, 1, "interface down")
			if err := l.checkInterface(); err != nil {
				return 0, fmt.Errorf("read %s: %w", l.name, err)
			}
			if !wait {
				return 0, nil
			}
		default:
			return 0, fmt.Errorf("read %s: recvmmsg: %w", l.name, r.errno)
		}
	}
}

// takeFrames turns the messages of the last recvmmsg into frames, skipping
// (and counting) those the caller must not see.
func (l *Link) takeFrames(frames []link.Frame) int {
	r := &l.rx
	got := 0
	var bytes, truncated, runts, outgoing, tagged uint64
	for i := range r.n {
		h := &r.hdrs[i]
		ln := int(h.Len)
		switch {
		case h.Hdr.Flags&unix.MSG_TRUNC != 0:
			truncated++
			continue
		case ln < vnetHdrLen+14:
			runts++
			continue
		case r.addrs[i].Pkttype == unix.PACKET_OUTGOING:
			outgoing++
			continue
		case vlanTagged(r.ctrl[i*auxDataSpace:(i+1)*auxDataSpace], int(h.Hdr.Controllen)):
			// Qubes links carry no VLANs; forwarding the frame untagged
			// would move it between networks.
			tagged++
			continue
		}
		off := i * r.slot
		frames[got] = link.Frame{
			Data:    r.buf[off+vnetHdrLen : off+ln : off+r.slot],
			Offload: getVnet(r.buf[off:]),
		}
		got++
		bytes += uint64(ln - vnetHdrLen)
	}
	l.framesIn.Add(uint64(got))
	l.bytesIn.Add(bytes)
	if truncated > 0 {
		l.count(&l.truncated, truncated, "frames longer than the frame size dropped")
	}
	if runts > 0 {
		l.count(&l.runts, runts, "runt frames dropped")
	}
	if outgoing > 0 {
		l.count(&l.outgoing, outgoing, "outgoing frames ignored")
	}
	if tagged > 0 {
		l.count(&l.vlanTagged, tagged, "VLAN-tagged frames dropped")
	}
	return got
}

// auxDataSpace is the control buffer of one message: a cmsghdr with a
// struct tpacket_auxdata.
var auxDataSpace = unix.CmsgSpace(sizeofAuxdata)

const sizeofAuxdata = int(unsafe.Sizeof(unix.TpacketAuxdata{}))

// vlanTagged reports whether the control data of one received message (n
// bytes of ctrl) hold a PACKET_AUXDATA saying the frame had a VLAN tag.
// Without the control message (truncated control data) the frame counts
// as tagged: fail closed.
func vlanTagged(ctrl []byte, n int) bool {
	if n < unix.CmsgLen(sizeofAuxdata) || n > len(ctrl) {
		return true
	}
	h := (*unix.Cmsghdr)(unsafe.Pointer(&ctrl[0]))
	if h.Level != unix.SOL_PACKET || h.Type != unix.PACKET_AUXDATA || int(h.Len) < unix.CmsgLen(sizeofAuxdata) {
		return true
	}
	a := (*unix.TpacketAuxdata)(unsafe.Pointer(&ctrl[unix.CmsgLen(0)]))
	return a.Status&unix.TP_STATUS_VLAN_VALID != 0 || a.Vlan_tci != 0
}

// checkInterface reports an error when the interface the socket is bound
// to no longer exists: the kernel then unbinds the socket for good
// (packet_notifier, NETDEV_UNREGISTER).
func (l *Link) checkInterface() error {
	var err error
	cerr := l.rc.Control(func(fd uintptr) {
		var ifr *unix.Ifreq
		if ifr, err = unix.NewIfreq(l.name); err != nil {
			return
		}
		if err = unix.IoctlIfreq(int(fd), unix.SIOCGIFINDEX, ifr); err == nil && int(ifr.Uint32()) != l.ifindex {
			err = errors.New("replaced by another interface")
		}
	})
	if cerr != nil {
		return l.closedErr("check", cerr)
	}
	if err != nil {
		return fmt.Errorf("interface gone: %w", err)
	}
	return nil
}

// WriteBatch implements link.Link. Concurrent callers take turns (one
// sendmmsg at a time per link). Frames the kernel refuses are dropped and
// counted, as are the rest of the call's frames once the send queue stayed
// full for WriteTimeout; it returns an error only when the socket or the
// interface is gone.
func (l *Link) WriteBatch(frames []link.Frame) (int, error) {
	if l.closed.Load() {
		return 0, link.ErrClosed
	}
	t := &l.tx
	t.mu.Lock()
	defer t.mu.Unlock()
	for i := 0; i < len(frames); {
		start, k := i, 0
		for ; i < len(frames) && k < len(t.hdrs); i++ {
			f := &frames[i]
			switch {
			case len(f.Data) < 14:
				l.count(&l.runts, 1, "runt frame not sent")
				continue
			case len(f.Data) > link.MaxFrame:
				l.count(&l.txRefused, 1, "oversized frame not sent")
				continue
			}
			putVnet(t.vnet[k*vnetHdrLen:], &f.Offload)
			iov := &t.iovs[2*k+1]
			iov.Base = &f.Data[0]
			iov.SetLen(len(f.Data))
			t.lens[k] = len(f.Data)
			k++
		}
		stalled, err := l.send(k)
		for j := range k {
			t.iovs[2*j+1].Base = nil // do not keep the caller's buffers alive
		}
		if err != nil {
			return start, err
		}
		if stalled && i < len(frames) {
			// Waiting again for each further chunk would hold up the
			// caller for a multiple of WriteTimeout.
			l.count(&l.txBusy, uint64(len(frames)-i), "send queue stayed full, frames dropped")
			break
		}
	}
	return len(frames), nil
}

// send transmits the first k prepared messages with as few sendmmsg calls
// as the kernel allows. It reports whether it gave up on a full send queue.
func (l *Link) send(k int) (stalled bool, err error) {
	t := &l.tx
	var sent, bytes uint64
	defer func() {
		l.framesOut.Add(sent)
		l.bytesOut.Add(bytes)
	}()
	for t.off = 0; t.off < k; {
		t.vlen = k - t.off
		t.wait = false
		err = l.rc.Write(t.send)
		if err == nil && t.errno == unix.EAGAIN && l.cfg.WriteTimeout < 0 {
			l.count(&l.txBusy, uint64(k-t.off), "send queue full, frames dropped")
			return true, nil
		}
		if err == nil && t.errno == unix.EAGAIN {
			// The send queue is full. Wait for room, but not forever.
			if err = l.file.SetWriteDeadline(time.Now().Add(l.cfg.WriteTimeout)); err == nil {
				t.wait = true
				err = l.rc.Write(t.send)
				if derr := l.file.SetWriteDeadline(time.Time{}); err == nil {
					err = derr
				}
			}
			if errors.Is(err, os.ErrDeadlineExceeded) {
				l.count(&l.txBusy, uint64(k-t.off), "send queue stayed full, frames dropped")
				return true, nil
			}
		}
		if err != nil {
			return false, l.closedErr("write", err)
		}
		switch t.errno {
		case 0:
			for _, n := range t.lens[t.off : t.off+t.n] {
				bytes += uint64(n)
			}
			sent += uint64(t.n)
			t.off += t.n
		case unix.EINTR:
		case unix.EMSGSIZE, unix.EINVAL:
			// This frame: longer than the MTU without GSO, or offload
			// metadata the kernel rejects.
			l.count(&l.txRefused, 1, "frame refused by the kernel: "+t.errno.Error())
			t.off++
		case unix.ENOBUFS:
			l.count(&l.txNoBuf, 1, "frame dropped by the queueing discipline or driver")
			t.off++
		case unix.ENETDOWN:
			// Every other frame would fail the same way; the netvm
			// may come back, so this is not the link's end.
			l.count(&l.txLinkDown, uint64(k-t.off), "interface down, frames dropped")
			return false, nil
		case unix.ENXIO, unix.ENODEV:
			return false, fmt.Errorf("write %s: interface gone: %w", l.name, t.errno)
		default:
			return false, fmt.Errorf("write %s: sendmmsg: %w", l.name, t.errno)
		}
	}
	return false, nil
}
