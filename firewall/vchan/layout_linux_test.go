package vchan

import (
	"testing"
	"unsafe"
)

// The C layouts, derived by hand from include/uapi/xen/*.h (x86-64 and
// arm64: __u64 aligned to 8, unsigned int 4 bytes, struct size rounded up to
// its largest alignment):
//
//	ioctl_gntdev_map_grant_ref     count@0 pad@4 index@8 refs[1]@16 (8 each)  = 24
//	ioctl_gntdev_unmap_grant_ref   index@0 count@8 pad@12                     = 16
//	ioctl_gntdev_unmap_notify      index@0 action@8 event_channel_port@12     = 16
//	ioctl_gntalloc_alloc_gref      domid@0 flags@2 count@4 index@8 gref_ids@16 = 20 -> 24
//	ioctl_gntalloc_dealloc_gref    index@0 count@8                            = 12 -> 16
//	ioctl_evtchn_bind_interdomain  remote_domain@0 remote_port@4              = 8
//	ioctl_evtchn_bind_unbound_port remote_domain@0                            = 4
//	ioctl_evtchn_notify            port@0                                     = 4
//
// and the request numbers _IOC(_IOC_NONE=0, type, nr, size) =
// size<<16 | type<<8 | nr, with 'G' = 0x47 and 'E' = 0x45.
func TestIoctlLayout(t *testing.T) {
	for _, c := range []struct {
		name      string
		got, want uintptr
	}{
		{"sizeof map_grant_ref", unsafe.Sizeof(gntdevMapGrantRef{}), 24},
		{"offsetof map_grant_ref.index", unsafe.Offsetof(gntdevMapGrantRef{}.Index), 8},
		{"offsetof map_grant_ref.refs", unsafe.Offsetof(gntdevMapGrantRef{}.Refs), 16},
		{"sizeof grant_ref", unsafe.Sizeof(gntdevGrantRef{}), 8},
		{"sizeof unmap_grant_ref", unsafe.Sizeof(gntdevUnmapGrantRef{}), 16},
		{"offsetof unmap_grant_ref.count", unsafe.Offsetof(gntdevUnmapGrantRef{}.Count), 8},
		{"sizeof unmap_notify", unsafe.Sizeof(unmapNotify{}), 16},
		{"offsetof unmap_notify.action", unsafe.Offsetof(unmapNotify{}.Action), 8},
		{"offsetof unmap_notify.port", unsafe.Offsetof(unmapNotify{}.Port), 12},
		{"sizeof alloc_gref", unsafe.Sizeof(gntallocAllocGref{}), 24},
		{"offsetof alloc_gref.flags", unsafe.Offsetof(gntallocAllocGref{}.Flags), 2},
		{"offsetof alloc_gref.count", unsafe.Offsetof(gntallocAllocGref{}.Count), 4},
		{"offsetof alloc_gref.index", unsafe.Offsetof(gntallocAllocGref{}.Index), 8},
		{"offsetof alloc_gref.gref_ids", unsafe.Offsetof(gntallocAllocGref{}.GrefIDs), 16},
		{"sizeof dealloc_gref", unsafe.Sizeof(gntallocDeallocGref{}), 16},
		{"sizeof bind_interdomain", unsafe.Sizeof(evtchnBindInterdomain{}), 8},
		{"sizeof evtchn port", unsafe.Sizeof(evtchnPort{}), 4},

		{"IOCTL_GNTDEV_MAP_GRANT_REF", ioctlGntdevMapGrantRef, 0x00184700},
		{"IOCTL_GNTDEV_UNMAP_GRANT_REF", ioctlGntdevUnmapGrantRef, 0x00104701},
		{"IOCTL_GNTDEV_SET_UNMAP_NOTIFY", ioctlGntdevSetUnmapNotify, 0x00104707},
		{"IOCTL_GNTALLOC_ALLOC_GREF", ioctlGntallocAllocGref, 0x00184705},
		{"IOCTL_GNTALLOC_DEALLOC_GREF", ioctlGntallocDeallocGref, 0x00104706},
		{"IOCTL_GNTALLOC_SET_UNMAP_NOTIFY", ioctlGntallocSetUnmapNotfy, 0x00104707},
		{"IOCTL_EVTCHN_BIND_INTERDOMAIN", ioctlEvtchnBindInterdomain, 0x00084501},
		{"IOCTL_EVTCHN_BIND_UNBOUND_PORT", ioctlEvtchnBindUnboundPort, 0x00044502},
		{"IOCTL_EVTCHN_NOTIFY", ioctlEvtchnNotify, 0x00044504},
	} {
		if c.got != c.want {
			t.Errorf("%s = %#x, want %#x", c.name, c.got, c.want)
		}
	}
}

// The interface page offsets against struct vchan_interface (libxenvchan.h):
// two ring_shared {u32 cons, prod} (8 bytes each), two u16 orders, four u8
// flags, then the u32 grants.
func TestInterfaceLayout(t *testing.T) {
	type ringShared struct{ Cons, Prod uint32 }
	type vchanInterface struct {
		Left, Right                            ringShared
		LeftOrder, RightOrder                  uint16
		CliLive, SrvLive, CliNotify, SrvNotify uint8
		Grants                                 [0]uint32
	}
	var v vchanInterface
	for _, c := range []struct {
		name      string
		got, want uintptr
	}{
		{"left.cons", unsafe.Offsetof(v.Left) + unsafe.Offsetof(v.Left.Cons), offLeft + offCons},
		{"left.prod", unsafe.Offsetof(v.Left) + unsafe.Offsetof(v.Left.Prod), offLeft + offProd},
		{"right", unsafe.Offsetof(v.Right), offRight},
		{"left_order", unsafe.Offsetof(v.LeftOrder), offLeftOrder},
		{"right_order", unsafe.Offsetof(v.RightOrder), offRightOrder},
		{"cli_live", unsafe.Offsetof(v.CliLive), offCliLive},
		{"srv_live", unsafe.Offsetof(v.SrvLive), offSrvLive},
		{"cli_notify", unsafe.Offsetof(v.CliNotify), offCliNotify},
		{"srv_notify", unsafe.Offsetof(v.SrvNotify), offSrvNotify},
		{"grants", unsafe.Offsetof(v.Grants), offGrants},
	} {
		if c.got != c.want {
			t.Errorf("offset of %s = %d, constant says %d", c.name, c.got, c.want)
		}
	}
	// The byte helpers address bytes in memory order.
	pg, _ := newPage(alignedBytes(PageSize))
	pg.setByte(offSrvLive, 0x5a)
	if pg.b[offSrvLive] != 0x5a || pg.b[offCliLive] != 0 || pg.loadByte(offSrvLive) != 0x5a {
		t.Fatalf("setByte wrote % x", pg.b[20:24])
	}
	if old := pg.updateByte(offSrvLive, 0xf0, 0x01); old != 0x5a || pg.b[offSrvLive] != 0x51 {
		t.Fatalf("updateByte: old %#x, now %#x", old, pg.b[offSrvLive])
	}
}
