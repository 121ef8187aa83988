package afpacket

import (
	"encoding/binary"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/link"
)

// vnetHdrLen is the size of struct virtio_net_hdr (without num_buffers),
// which the kernel puts before every frame read from, and expects before
// every frame written to, a socket with PACKET_VNET_HDR set.
//
//	offset 0: flags       u8  (VIRTIO_NET_HDR_F_NEEDS_CSUM 1, _DATA_VALID 2)
//	offset 1: gso_type    u8
//	offset 2: hdr_len     u16
//	offset 4: gso_size    u16
//	offset 6: csum_start  u16
//	offset 8: csum_offset u16
//
// Packet sockets use the legacy virtio byte order, which is the host's
// (af_packet.c vio_le() is virtio_legacy_is_little_endian()).
//
// csum_start is relative to the first byte the socket hands out, which for
// a SOCK_RAW socket is the Ethernet header, in both directions: on receive
// packet_rcv pushes skb->data back to the MAC header and
// virtio_net_hdr_from_skb reports skb_checksum_start_offset (relative to
// skb->data) with vlan_hlen 0; on send packet_snd copies the frame to
// skb->data and virtio_net_hdr_to_skb calls skb_partial_csum_set with
// csum_start relative to skb->data. That is link.Offload's base, so no
// conversion is needed.
const vnetHdrLen = 10

const (
	vnetNeedsCsum = 1
	vnetDataValid = 2
)

// getVnet decodes a virtio_net_hdr; b has at least vnetHdrLen bytes.
func getVnet(b []byte) link.Offload {
	e := binary.NativeEndian
	return link.Offload{
		NeedsCsum:  b[0]&vnetNeedsCsum != 0,
		DataValid:  b[0]&vnetDataValid != 0,
		GSOType:    b[1],
		HdrLen:     e.Uint16(b[2:]),
		GSOSize:    e.Uint16(b[4:]),
		CsumStart:  e.Uint16(b[6:]),
		CsumOffset: e.Uint16(b[8:]),
	}
}

// putVnet encodes o into b, which has at least vnetHdrLen bytes.
func putVnet(b []byte, o *link.Offload) {
	e := binary.NativeEndian
	var flags byte
	if o.NeedsCsum {
		flags |= vnetNeedsCsum
	}
	if o.DataValid {
		flags |= vnetDataValid
	}
	b[0], b[1] = flags, o.GSOType
	e.PutUint16(b[2:], o.HdrLen)
	e.PutUint16(b[4:], o.GSOSize)
	e.PutUint16(b[6:], o.CsumStart)
	e.PutUint16(b[8:], o.CsumOffset)
}
