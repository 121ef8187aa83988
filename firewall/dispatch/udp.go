package dispatch

import (
	"context"
	"errors"
	"fmt"
	"net/netip"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/header"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/link"
)

// ErrNoUplink is returned when sending needs a netvm and there is none.
var ErrNoUplink = errors.New("no uplink")

// UDPConn is a UDP socket of the firewall's own on the uplink address,
// used by its DNS client. Its port is reserved in the NAT table so no flow
// ever takes it. It always sends through the current uplink, so it follows
// netvm changes.
type UDPConn struct {
	d     *Dispatcher
	port  uint16
	queue chan datagram
	done  chan struct{}
}

type datagram struct {
	src  netip.AddrPort
	data []byte
}

// udpQueueLen bounds the datagrams waiting to be read from a UDPConn.
const udpQueueLen = 64

// ListenUDP opens a UDP socket on a random port of the uplink address.
func (d *Dispatcher) ListenUDP() (*UDPConn, error) {
	d.mu.Lock()
	defer d.unlock()
	port, err := d.nat.ReservePort(header.ProtoUDP)
	if err != nil {
		return nil, fmt.Errorf("reserve UDP port: %w", err)
	}
	c := &UDPConn{d: d, port: port, queue: make(chan datagram, udpQueueLen), done: make(chan struct{})}
	d.local[port] = c
	return c, nil
}

// LocalPort is the socket's port.
func (c *UDPConn) LocalPort() uint16 { return c.port }

// WriteTo sends b to dst from the uplink address.
func (c *UDPConn) WriteTo(b []byte, dst netip.AddrPort) error {
	if !dst.Addr().Is4() {
		return fmt.Errorf("send to %v: not IPv4", dst)
	}
	d := c.d
	d.mu.Lock()
	u := d.uplink
	if u == nil {
		d.unlock()
		return ErrNoUplink
	}
	total := header.IPv4MinLen + header.UDPLen + len(b)
	if total > u.Port.mtu {
		d.unlock()
		return fmt.Errorf("send %d bytes to %v: larger than MTU %d", len(b), dst, u.Port.mtu)
	}
	f := make([]byte, header.EthernetLen+total)
	header.PutEthernet(f, d.gwMAC, u.Port.mac, header.EtherTypeIPv4)
	d.ipID++
	header.PutIPv4(f[header.EthernetLen:], uint16(total), d.ipID, 64, header.ProtoUDP, u.IP, dst.Addr().As4())
	l4 := f[header.EthernetLen+header.IPv4MinLen:]
	copy(l4[header.UDPLen:], b)
	header.PutUDP(l4, u.IP, dst.Addr().As4(), c.port, dst.Port(), len(b))
	out := u.Port.link
	d.unlock()
	_, err := out.WriteBatch([]link.Frame{{Data: f}})
	return err
}

// ReadFrom waits for a datagram, copies it into b and returns its length
// (truncated to len(b)) and source.
func (c *UDPConn) ReadFrom(ctx context.Context, b []byte) (int, netip.AddrPort, error) {
	select {
	case dg := <-c.queue:
		return copy(b, dg.data), dg.src, nil
	case <-c.done:
		return 0, netip.AddrPort{}, link.ErrClosed
	case <-ctx.Done():
		return 0, netip.AddrPort{}, ctx.Err()
	}
}

// Close releases the port.
func (c *UDPConn) Close() error {
	d := c.d
	d.mu.Lock()
	defer d.unlock()
	if d.local[c.port] != c {
		return nil
	}
	delete(d.local, c.port)
	d.nat.ReleasePort(header.ProtoUDP, c.port)
	close(c.done)
	return nil
}

// deliver queues a datagram addressed to the socket (called with d.mu held
// by the uplink's reader). A full queue drops it.
func (c *UDPConn) deliver(pk *header.Parsed, f *link.Frame) {
	u := header.UDP(f.Data[pk.L4Off:pk.End])
	if cs := u.Checksum(); cs != 0 && !f.Offload.NeedsCsum && !f.Offload.DataValid {
		l4 := u[:u.Length()]
		if header.Fold(header.Sum(l4, header.PseudoHeaderSum(pk.Src, pk.Dst, header.ProtoUDP, uint16(len(l4))))) != 0xffff {
			c.d.drop(nil, ReasonInvalid)
			return
		}
	}
	payload := u[header.UDPLen:u.Length()]
	dg := datagram{
		src:  netip.AddrPortFrom(netip.AddrFrom4(pk.Src), pk.SrcPort),
		data: append([]byte(nil), payload...),
	}
	select {
	case c.queue <- dg:
	default:
		c.d.drop(nil, ReasonLocal)
	}
}
