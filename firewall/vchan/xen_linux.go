package vchan

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Linux Xen device interface (include/uapi/xen/gntdev.h, gntalloc.h,
// evtchn.h). Request numbers are _IOC(_IOC_NONE, type, nr, size): on x86
// and arm (the architectures Xen runs on) _IOC_NONE is 0 and the size sits
// at bit 16, the type at bit 8, the number at bit 0.
func ioc(typ byte, nr, size uintptr) uintptr { return size<<16 | uintptr(typ)<<8 | nr }

// The structures, with the C layout (derived by hand in layout_linux_test.go).
type (
	gntdevGrantRef struct{ Domid, Ref uint32 }
	// Followed in memory by Count-1 more gntdevGrantRef.
	gntdevMapGrantRef struct {
		Count, Pad uint32
		Index      uint64 // out: the mmap offset
		Refs       [1]gntdevGrantRef
	}
	gntdevUnmapGrantRef struct {
		Index      uint64
		Count, Pad uint32
	}
	// ioctl_gntdev_unmap_notify and ioctl_gntalloc_unmap_notify.
	unmapNotify struct {
		Index        uint64 // mmap offset of the byte to clear
		Action, Port uint32
	}
	// Followed in memory by Count-1 more grant IDs.
	gntallocAllocGref struct {
		Domid, Flags uint16
		Count        uint32
		Index        uint64 // out: the mmap offset
		GrefIDs      [1]uint32
	}
	gntallocDeallocGref struct {
		Index uint64
		Count uint32
	}
	evtchnBindInterdomain struct{ RemoteDomain, RemotePort uint32 }
	evtchnPort            struct{ Port uint32 } // bind_unbound_port (remote_domain), notify
)

var (
	ioctlGntdevMapGrantRef     = ioc('G', 0, unsafe.Sizeof(gntdevMapGrantRef{}))
	ioctlGntdevUnmapGrantRef   = ioc('G', 1, unsafe.Sizeof(gntdevUnmapGrantRef{}))
	ioctlGntdevSetUnmapNotify  = ioc('G', 7, unsafe.Sizeof(unmapNotify{}))
	ioctlGntallocAllocGref     = ioc('G', 5, unsafe.Sizeof(gntallocAllocGref{}))
	ioctlGntallocDeallocGref   = ioc('G', 6, unsafe.Sizeof(gntallocDeallocGref{}))
	ioctlGntallocSetUnmapNotfy = ioc('G', 7, unsafe.Sizeof(unmapNotify{}))
	ioctlEvtchnBindInterdomain = ioc('E', 1, unsafe.Sizeof(evtchnBindInterdomain{}))
	ioctlEvtchnBindUnboundPort = ioc('E', 2, unsafe.Sizeof(evtchnPort{}))
	ioctlEvtchnNotify          = ioc('E', 4, unsafe.Sizeof(evtchnPort{}))
)

const (
	unmapNotifyClearByte = 1
	unmapNotifySendEvent = 2
	gntallocWritable     = 1
)

func ioctl(fd uintptr, req uintptr, arg unsafe.Pointer) (uintptr, error) {
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, fd, req, uintptr(arg))
	if errno != 0 {
		return 0, errno
	}
	return r, nil
}

// evtchn is a Notifier over /dev/xen/evtchn with one bound port. The file
// goes through Go's poller, so a blocked Wait parks no thread and Close
// interrupts it.
type evtchn struct {
	f    *os.File
	port uint32
}

func openEvtchn() (*evtchn, error) {
	f, err := os.OpenFile("/dev/xen/evtchn", os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	return &evtchn{f: f}, nil
}

func (e *evtchn) ioctl(req uintptr, arg unsafe.Pointer) (uintptr, error) {
	rc, err := e.f.SyscallConn() // not Fd(): that would make the file blocking
	if err != nil {
		return 0, err
	}
	var r uintptr
	var ierr error
	if err := rc.Control(func(fd uintptr) { r, ierr = ioctl(fd, req, arg) }); err != nil {
		return 0, err
	}
	return r, ierr
}

// bind binds the port: to remotePort of domain remote (the client), or a
// fresh unbound port that domain remote may bind to (the server). A new
// port starts unmasked (drivers/xen/evtchn.c evtchn_bind_to_user).
func (e *evtchn) bind(remote, remotePort uint32, server bool) error {
	var r uintptr
	var err error
	if server {
		arg := evtchnPort{Port: remote}
		r, err = e.ioctl(ioctlEvtchnBindUnboundPort, unsafe.Pointer(&arg))
	} else {
		arg := evtchnBindInterdomain{RemoteDomain: remote, RemotePort: remotePort}
		r, err = e.ioctl(ioctlEvtchnBindInterdomain, unsafe.Pointer(&arg))
	}
	if err != nil {
		return fmt.Errorf("bind event channel: %w", err)
	}
	e.port = uint32(r)
	return nil
}

// Wait reads one pending port and unmasks it again by writing it back (the
// driver masks a port when it delivers it).
func (e *evtchn) Wait() error {
	var b [4]byte
	if _, err := e.f.Read(b[:]); err != nil {
		return fmt.Errorf("event channel read: %w", err)
	}
	if _, err := e.f.Write(b[:]); err != nil {
		return fmt.Errorf("event channel unmask: %w", err)
	}
	return nil
}

func (e *evtchn) Notify() error {
	arg := evtchnPort{Port: e.port}
	_, err := e.ioctl(ioctlEvtchnNotify, unsafe.Pointer(&arg))
	return err
}

// Close unbinds the port (the driver does on release).
func (e *evtchn) Close() error { return e.f.Close() }

// grantMaps tracks what one gntdev or gntalloc file descriptor mapped, for
// release in reverse order.
type grantMaps struct {
	fd   int
	mems [][]byte
	idx  []uint64 // gntdev: the map index to unmap after munmap
}

func (g *grantMaps) release(gntdev bool) error {
	var errs []error
	for i := len(g.mems) - 1; i >= 0; i-- {
		errs = append(errs, unix.Munmap(g.mems[i]))
		if gntdev {
			arg := gntdevUnmapGrantRef{Index: g.idx[i], Count: uint32(len(g.mems[i]) / PageSize)}
			_, err := ioctl(uintptr(g.fd), ioctlGntdevUnmapGrantRef, unsafe.Pointer(&arg))
			errs = append(errs, err)
		}
	}
	errs = append(errs, unix.Close(g.fd))
	return errors.Join(errs...)
}

// mapGrants maps the peer's pages refs contiguously with /dev/xen/gntdev.
// If notifyOff >= 0, the kernel clears that byte and signals port when the
// mapping goes away, even if we crash (IOCTL_GNTDEV_SET_UNMAP_NOTIFY).
func (g *grantMaps) mapGrants(domid uint32, refs []uint32, writable bool, notifyOff int, port uint32) ([]byte, error) {
	n := len(refs)
	buf := make([]uint64, max(3, 2+n)) // header, then one 8-byte ref each
	hdr := (*gntdevMapGrantRef)(unsafe.Pointer(&buf[0]))
	hdr.Count = uint32(n)
	out := unsafe.Slice(&hdr.Refs[0], n)
	for i, r := range refs {
		out[i] = gntdevGrantRef{Domid: domid, Ref: r}
	}
	if _, err := ioctl(uintptr(g.fd), ioctlGntdevMapGrantRef, unsafe.Pointer(hdr)); err != nil {
		return nil, fmt.Errorf("gntdev map %v: %w", refs, err)
	}
	unmapIdx := func() {
		arg := gntdevUnmapGrantRef{Index: hdr.Index, Count: uint32(n)}
		ioctl(uintptr(g.fd), ioctlGntdevUnmapGrantRef, unsafe.Pointer(&arg))
	}
	prot := unix.PROT_READ
	if writable {
		prot |= unix.PROT_WRITE
	}
	mem, err := unix.Mmap(g.fd, int64(hdr.Index), n*PageSize, prot, unix.MAP_SHARED)
	if err != nil {
		unmapIdx()
		return nil, fmt.Errorf("gntdev mmap: %w", err)
	}
	if notifyOff >= 0 {
		arg := unmapNotify{Index: hdr.Index + uint64(notifyOff), Action: unmapNotifyClearByte | unmapNotifySendEvent, Port: port}
		if _, err := ioctl(uintptr(g.fd), ioctlGntdevSetUnmapNotify, unsafe.Pointer(&arg)); err != nil {
			unix.Munmap(mem)
			unmapIdx()
			return nil, fmt.Errorf("gntdev unmap notify: %w", err)
		}
	}
	g.mems = append(g.mems, mem)
	g.idx = append(g.idx, hdr.Index)
	return mem, nil
}

// share allocates n pages that domid may map, with /dev/xen/gntalloc, and
// returns them with their grant references. The allocation is released
// from the descriptor at once: the pages live until they are unmapped.
func (g *grantMaps) share(domid uint16, n int, notifyOff int, port uint32) ([]byte, []uint32, error) {
	buf := make([]uint64, max(3, 2+(n+1)/2)) // header, then 4-byte IDs
	hdr := (*gntallocAllocGref)(unsafe.Pointer(&buf[0]))
	*hdr = gntallocAllocGref{Domid: domid, Flags: gntallocWritable, Count: uint32(n)}
	if _, err := ioctl(uintptr(g.fd), ioctlGntallocAllocGref, unsafe.Pointer(hdr)); err != nil {
		return nil, nil, fmt.Errorf("gntalloc %d pages: %w", n, err)
	}
	refs := slices.Clone(unsafe.Slice(&hdr.GrefIDs[0], n))
	defer func() {
		arg := gntallocDeallocGref{Index: hdr.Index, Count: uint32(n)}
		ioctl(uintptr(g.fd), ioctlGntallocDeallocGref, unsafe.Pointer(&arg))
	}()
	mem, err := unix.Mmap(g.fd, int64(hdr.Index), n*PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, nil, fmt.Errorf("gntalloc mmap: %w", err)
	}
	if notifyOff >= 0 {
		arg := unmapNotify{Index: hdr.Index + uint64(notifyOff), Action: unmapNotifyClearByte | unmapNotifySendEvent, Port: port}
		if _, err := ioctl(uintptr(g.fd), ioctlGntallocSetUnmapNotfy, unsafe.Pointer(&arg)); err != nil {
			unix.Munmap(mem)
			return nil, nil, fmt.Errorf("gntalloc unmap notify: %w", err)
		}
	}
	g.mems = append(g.mems, mem)
	return mem, refs, nil
}

func openGrants(dev string) (*grantMaps, error) {
	fd, err := unix.Open(dev, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", dev, err)
	}
	return &grantMaps{fd: fd}, nil
}

// dialXen is the client side (Xen init.c libxenvchan_client_init): bind the
// event channel, map the interface page with an unmap notification that
// clears cli_live, then attach (which maps the rings).
func dialXen(server int, ref, remotePort uint32) (c *Conn, err error) {
	ev, err := openEvtchn()
	if err != nil {
		return nil, err
	}
	if err := ev.bind(uint32(server), remotePort, false); err != nil {
		ev.Close()
		return nil, err
	}
	g, err := openGrants("/dev/xen/gntdev")
	if err != nil {
		ev.Close()
		return nil, err
	}
	release := func() error { return g.release(true) }
	defer func() {
		if err != nil {
			ev.Close()
			release()
		}
	}()
	mem, err := g.mapGrants(uint32(server), []uint32{ref}, true, offCliLive, ev.port)
	if err != nil {
		return nil, err
	}
	pg, err := newPage(mem)
	if err != nil {
		return nil, err
	}
	mapRing := func(refs []uint32, writable bool) ([]byte, error) {
		return g.mapGrants(uint32(server), refs, writable, -1, 0)
	}
	return attachClient(pg, mapRing, ev, release)
}

// listenXen is the server side (Xen init.c libxenvchan_server_init): an
// unbound event channel for client, a shared interface page whose unmap
// clears srv_live, granted rings for orders >= 12, the page initialised.
func listenXen(client, leftOrder, rightOrder int) (c *Conn, ref, port uint32, err error) {
	left, right, err := layout(leftOrder, rightOrder)
	if err != nil {
		return nil, 0, 0, err
	}
	ev, err := openEvtchn()
	if err != nil {
		return nil, 0, 0, err
	}
	if err := ev.bind(uint32(client), 0, true); err != nil {
		ev.Close()
		return nil, 0, 0, err
	}
	g, err := openGrants("/dev/xen/gntalloc")
	if err != nil {
		ev.Close()
		return nil, 0, 0, err
	}
	release := func() error { return g.release(false) }
	defer func() {
		if err != nil {
			ev.Close()
			release()
		}
	}()
	mem, refs, err := g.share(uint16(client), 1, offSrvLive, ev.port)
	if err != nil {
		return nil, 0, 0, err
	}
	pg, err := newPage(mem)
	if err != nil {
		return nil, 0, 0, err
	}
	var grants []uint32
	ring := func(pl placement) ([]byte, error) {
		if b := pg.ring(pl); b != nil {
			return b, nil
		}
		b, r, err := g.share(uint16(client), pl.pages, -1, 0)
		grants = append(grants, r...)
		return b, err
	}
	rd, err := ring(left)
	if err != nil {
		return nil, 0, 0, err
	}
	wr, err := ring(right)
	if err != nil {
		return nil, 0, 0, err
	}
	pg.initServer(left, right, grants)
	return newConn(pg, true, rd, wr, ev, release), refs[0], ev.port, nil
}
