// Package link defines how the dispatcher sees network interfaces: batches of
// Ethernet frames in and out, each with the offload metadata of a
// struct virtio_net_hdr so that GSO super-frames can cross the firewall whole.
//
// Implementations: package afpacket (Linux AF_PACKET sockets with
// PACKET_VNET_HDR) and Pipe (in memory, for tests).
package link

import "errors"

// GSO types, as in struct virtio_net_hdr (include/uapi/linux/virtio_net.h).
const (
	GSONone  uint8 = 0
	GSOTCPv4 uint8 = 1
	GSOUDP   uint8 = 3
	GSOTCPv6 uint8 = 4
	GSOUDPL4 uint8 = 5
	GSOECN   uint8 = 0x80
)

// Offload is the checksum and segmentation state of a frame, with the
// semantics of struct virtio_net_hdr.
//
// When NeedsCsum is set the transport checksum is not final: the 16-bit field
// at CsumStart+CsumOffset holds the folded, non-complemented sum of the
// pseudo-header only, and whoever transmits the frame completes it over the
// bytes from CsumStart on. A NAT that rewrites addresses must therefore adjust
// that field for the pseudo-header change only (not for port changes, which
// the final sum covers anyway). CsumStart is relative to the start of the
// Ethernet frame.
//
// When GSOType is not GSONone the frame is a super-frame larger than the MTU
// that the transmitting kernel cuts into GSOSize-byte segments; HdrLen is the
// length of the Ethernet, IP and transport headers.
type Offload struct {
	NeedsCsum  bool
	DataValid  bool // the receiving kernel already verified the checksum
	CsumStart  uint16
	CsumOffset uint16
	GSOType    uint8
	GSOSize    uint16
	HdrLen     uint16
}

// Frame is one Ethernet frame (destination MAC first) and its offload state.
type Frame struct {
	Data    []byte
	Offload Offload
}

// MaxFrame is the largest frame a link hands out: a 64 KiB GSO super-frame
// plus its Ethernet header.
const MaxFrame = 65535 + 14

// ErrClosed is returned by ReadBatch and WriteBatch after Close.
var ErrClosed = errors.New("link closed")

// Link is a network interface as the dispatcher uses it.
//
// ReadBatch blocks until at least one frame is available and fills
// frames[:n]; the Data slices point into buffers owned by the link that stay
// valid until the next ReadBatch call on the same link, so the caller may
// rewrite them in place and forward them. Only one goroutine reads a link.
//
// WriteBatch transmits frames[:n] before it returns (the link keeps no
// reference to them) and is safe for concurrent use. A frame the link cannot
// send (too large, link down) is dropped and counted by the link, not
// reported as an error; errors mean the link itself failed.
type Link interface {
	Name() string
	// MAC is the address the firewall uses as its own on this link.
	MAC() [6]byte
	// MTU is the largest IP packet (without Ethernet header) the link carries
	// without segmentation offload.
	MTU() int
	ReadBatch(frames []Frame) (n int, err error)
	WriteBatch(frames []Frame) (n int, err error)
	Close() error
}
