// Package vchan speaks the Xen vchan protocol (libxenvchan, which Qubes OS
// uses for QubesDB and qrexec): a byte stream between two domains over
// shared memory and one event channel.
//
// The protocol logic (indexes, notify bits, live flags, ring placement) works
// on plain byte slices and a Notifier, so that it runs and is tested without
// Xen (Pipe); the Linux device access (/dev/xen/gntdev, gntalloc, evtchn)
// only maps the pages and binds the event channel (xen_linux.go).
//
// Everything in shared memory is written by the peer too, at any time: every
// value read from it is validated before use, and our own indexes are kept
// in private copies that the peer cannot change.
package vchan

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync/atomic"
	"unsafe"
)

// PageSize is Xen's page size, the unit of grants.
const PageSize = 4096

// The interface page (Xen include/public/io/libxenvchan.h, struct
// vchan_interface; little endian, as on every Xen architecture):
//
//	offset size field
//	 0     4    left.cons   \ left ring: the client writes, the server reads
//	 4     4    left.prod   /
//	 8     4    right.cons  \ right ring: the server writes, the client reads
//	12     4    right.prod  /
//	16     2    left_order   ring sizes (log2), constant once shared
//	18     2    right_order
//	20     1    cli_live     0 exited, 1 connected, 2 client not yet connected
//	21     1    srv_live
//	22     1    cli_notify   bits the server asks the client to notify on
//	23     1    srv_notify   bits the client asks the server to notify on
//	24     4*n  grants[]     the left ring's pages, then the right ring's
const (
	offLeft       = 0
	offRight      = 8
	offLeftOrder  = 16
	offRightOrder = 18
	offCliLive    = 20
	offSrvLive    = 21
	offCliNotify  = 22
	offSrvNotify  = 23
	offGrants     = 24

	// Within a ring_shared.
	offCons = 0
	offProd = 4
)

// Notify bits (VCHAN_NOTIFY_WRITE, VCHAN_NOTIFY_READ): set in the peer's
// notify byte to ask for an event when it writes (we wait for data) or
// reads (we wait for space).
const (
	NotifyWrite = 1
	NotifyRead  = 2
)

// Live flag values.
const (
	liveExited    = 0
	liveConnected = 1
	liveWaiting   = 2
)

// Ring orders (Xen tools/libs/vchan/init.c): 10 and 11 place the ring inside
// the interface page at offsets 1024 and 2048; 12 and above use 2^(order-12)
// separately granted pages. The client refuses orders outside 10..20.
const (
	minOrder       = 10
	maxOrder       = 20
	pageOrder      = 12
	smallRingStart = 1024 // order 10
	largeRingStart = 2048 // order 11
)

// ErrBroken reports that the peer left the shared state inconsistent (an
// index out of range, an unknown live flag, an impossible ring layout).
var ErrBroken = errors.New("vchan: peer broke the protocol")

// page is the interface page. Indexes are accessed with sync/atomic, whose
// operations are sequentially consistent (the Go memory model) and compile
// on amd64 to MOV for loads (acquire under x86-TSO) and XCHG/LOCK CMPXCHG for
// stores and read-modify-writes (full barriers). That is at least what
// libxenvchan's xen_rmb/xen_wmb/xen_mb pairs provide: see Conn for where the
// ordering matters.
type page struct{ b []byte }

// newPage checks that b can serve as an interface page: one page, aligned so
// that 32-bit atomics on it are legal.
func newPage(b []byte) (page, error) {
	if len(b) != PageSize || uintptr(unsafe.Pointer(&b[0]))%8 != 0 {
		return page{}, fmt.Errorf("vchan: interface page must be %d aligned bytes, have %d", PageSize, len(b))
	}
	return page{b}, nil
}

func (p page) word(off int) *uint32 { return (*uint32)(unsafe.Pointer(&p.b[off])) }

func (p page) load(off int) uint32     { return atomic.LoadUint32(p.word(off)) }
func (p page) store(off int, v uint32) { atomic.StoreUint32(p.word(off), v) }

// The live and notify bytes share the aligned word at offset 20. Go has no
// 8-bit atomics, so a byte is changed with a compare-and-swap of its word: a
// concurrent change of any byte of the word by the peer (its own byte
// atomics, or the kernel clearing a live flag on unmap) makes the swap fail
// and retry, so no update is lost. Byte order within the word does not
// matter: the byte is addressed in memory order.

func (p page) loadByte(off int) uint8 {
	w := p.load(off &^ 3)
	return (*[4]byte)(unsafe.Pointer(&w))[off&3]
}

// updateByte sets the byte at off to old&and|or and returns old.
func (p page) updateByte(off int, and, or uint8) (old uint8) {
	w := p.word(off &^ 3)
	for {
		o := atomic.LoadUint32(w)
		n := o
		b := &(*[4]byte)(unsafe.Pointer(&n))[off&3]
		old = *b
		*b = old&and | or
		if atomic.CompareAndSwapUint32(w, o, n) {
			return old
		}
	}
}

func (p page) setByte(off int, v uint8) { p.updateByte(off, 0, v) }

// placement says where one ring lives.
type placement struct {
	order  int
	offset int // in the interface page (orders 10, 11), else 0
	pages  int // granted pages (order >= 12), else 0
}

func (pl placement) size() int { return 1 << pl.order }

func place(order int) (placement, error) {
	switch {
	case order < minOrder || order > maxOrder:
		return placement{}, fmt.Errorf("%w: ring order %d outside %d..%d", ErrBroken, order, minOrder, maxOrder)
	case order == minOrder:
		return placement{order: order, offset: smallRingStart}, nil
	case order == minOrder+1:
		return placement{order: order, offset: largeRingStart}, nil
	}
	return placement{order: order, pages: 1 << (order - pageOrder)}, nil
}

// layout validates a pair of orders as the interface page announces them:
// both in range, not both in the same in-page slot, and the grant list ending
// before the first in-page ring (or the page end).
func layout(leftOrder, rightOrder int) (left, right placement, err error) {
	if left, err = place(leftOrder); err != nil {
		return left, right, fmt.Errorf("left: %w", err)
	}
	if right, err = place(rightOrder); err != nil {
		return left, right, fmt.Errorf("right: %w", err)
	}
	if left.offset != 0 && left.offset == right.offset {
		return left, right, fmt.Errorf("%w: both rings at page offset %d", ErrBroken, left.offset)
	}
	end := PageSize
	for _, pl := range []placement{left, right} {
		if pl.offset != 0 {
			end = min(end, pl.offset)
		}
	}
	if n := left.pages + right.pages; offGrants+4*n > end {
		return left, right, fmt.Errorf("%w: %d grants overlap the ring at offset %d", ErrBroken, n, end)
	}
	return left, right, nil
}

// readLayout reads and validates the orders and the grant list. The grants
// are copied out, so a later change by the peer cannot affect the mapping.
func (p page) readLayout() (left, right placement, grants []uint32, err error) {
	lo := int(binary.LittleEndian.Uint16(p.b[offLeftOrder:]))
	ro := int(binary.LittleEndian.Uint16(p.b[offRightOrder:]))
	if left, right, err = layout(lo, ro); err != nil {
		return left, right, nil, err
	}
	grants = make([]uint32, left.pages+right.pages)
	for i := range grants {
		grants[i] = binary.LittleEndian.Uint32(p.b[offGrants+4*i:])
	}
	return left, right, grants, nil
}

// ring returns the in-page ring of pl, or nil if it lives in granted pages.
func (p page) ring(pl placement) []byte {
	if pl.offset == 0 {
		return nil
	}
	return p.b[pl.offset : pl.offset+pl.size()]
}

// initServer writes the state a server publishes before the client maps the
// page (Xen init.c init_gnt_srv): everything zero, the orders, the grants,
// cli_live = 2 (not yet connected), srv_live = 1, and a request to be
// notified when the client writes.
func (p page) initServer(left, right placement, grants []uint32) {
	clear(p.b)
	binary.LittleEndian.PutUint16(p.b[offLeftOrder:], uint16(left.order))
	binary.LittleEndian.PutUint16(p.b[offRightOrder:], uint16(right.order))
	for i, g := range grants {
		binary.LittleEndian.PutUint32(p.b[offGrants+4*i:], g)
	}
	p.setByte(offCliLive, liveWaiting)
	p.setByte(offSrvLive, liveConnected)
	p.setByte(offCliNotify, NotifyWrite)
}

// serverOrders picks ring orders for a server that wants at least readMin
// bytes in the ring it reads (left) and writeMin in the one it writes
// (right), the way libxenvchan_server_init does: in-page rings when both
// fit (one 1024, one 2048 bytes), else the smallest whole-page order.
func serverOrders(readMin, writeMin int) (left, right int, err error) {
	if readMin > 1<<maxOrder || writeMin > 1<<maxOrder || readMin < 0 || writeMin < 0 {
		return 0, 0, fmt.Errorf("vchan: ring sizes %d/%d outside 0..%d", readMin, writeMin, 1<<maxOrder)
	}
	pageMin := func(n int) int {
		o := pageOrder
		for n > 1<<o {
			o++
		}
		return o
	}
	left, right = pageMin(readMin), pageMin(writeMin)
	const small, large = 1 << minOrder, 1 << (minOrder + 1)
	switch {
	case readMin <= small && writeMin <= large:
		left, right = minOrder, minOrder+1
	case readMin <= large && writeMin <= small:
		left, right = minOrder+1, minOrder
	case readMin <= large:
		left = minOrder + 1
	case writeMin <= large:
		right = minOrder + 1
	}
	return left, right, nil
}
