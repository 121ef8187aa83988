package dispatch

import (
	"net/netip"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/frag"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/header"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/link"
)

// Input processes frames read from p's link: it decides the fate of each
// under the dispatcher's lock, then writes what is to be sent. The frames'
// buffers are rewritten in place and must stay valid until Input returns.
func (p *Port) Input(frames []link.Frame) {
	d := p.d
	p.pending = p.pending[:0]
	p.arena = p.arena[:0]
	now := d.clock()
	p.gather(frames, now)
	d.mu.Lock()
	if _, attached := d.ports[p]; attached {
		for i := range frames {
			if p.early[i] != earlyHeld {
				p.input(&frames[i], p.early[i], now)
			}
		}
	}
	d.unlock()
	if p.cut {
		p.fragmentPending()
	}
	p.flush()
}

// fragmentPending replaces each pending packet marked cut by its
// fragments, outside the dispatcher's lock (only this port's goroutine
// uses its arena and buffers), then takes the lock once to count the
// outcome.
func (p *Port) fragmentPending() {
	d := p.d
	p.cut = false
	out := p.spare[:0]
	type outcome struct {
		c  *client
		ok bool
		r  Reason
	}
	var outcomes []outcome
	for _, q := range p.pending {
		if !q.cut {
			out = append(out, q)
			continue
		}
		var o outcome
		out, o.ok, o.r = p.fragment(q, out)
		o.c = q.c
		outcomes = append(outcomes, o)
	}
	p.pending, p.spare = out, p.pending
	d.mu.Lock()
	for _, o := range outcomes {
		if o.ok {
			d.stats.Forwarded++
		} else {
			d.drop(o.c, o.r)
		}
	}
	d.unlock()
}

// fragment appends q's fragments to out, or says why it could not.
func (p *Port) fragment(q pending, out []pending) (_ []pending, ok bool, why Reason) {
	f := &q.frame
	if f.Offload.NeedsCsum {
		// Fragments cannot carry a partial checksum: complete it first.
		completeChecksum(f, len(f.Data))
	}
	frags, err := frag.Fragment(p.fragBufs[:0], header.IPv4(f.Data[header.EthernetLen:]), q.to.mtu)
	p.fragBufs = frags
	if err != nil {
		return out, false, ReasonTooBig
	}
	need := 0
	for _, fr := range frags {
		need += header.EthernetLen + len(fr)
	}
	if !p.room(need) {
		// All fragments or none: a partial train only wastes the
		// receiver's reassembly memory.
		return out, false, ReasonNoBuffer
	}
	eth := f.Data[:header.EthernetLen]
	for _, fr := range frags {
		b := p.alloc(header.EthernetLen + len(fr))
		copy(b, eth)
		copy(b[header.EthernetLen:], fr)
		out = append(out, pending{to: q.to, frame: link.Frame{Data: b}})
	}
	return out, true, 0
}

// flush writes the pending frames, one batch per destination port.
func (p *Port) flush() {
	for i := 0; i < len(p.pending); i++ {
		to := p.pending[i].to
		if to == nil {
			continue
		}
		p.batch = p.batch[:0]
		for j := i; j < len(p.pending); j++ {
			if p.pending[j].to == to {
				p.batch = append(p.batch, p.pending[j].frame)
				p.pending[j].to = nil
			}
		}
		// A link that fails is the owner's to notice (its reader gets
		// the error); here the frames are simply lost.
		_, _ = to.link.WriteBatch(p.batch)
	}
}

// send queues frame for transmission on to.
func (p *Port) send(to *Port, f link.Frame) {
	p.pending = append(p.pending, pending{to: to, frame: f})
}

// alloc returns n bytes of the port's per-batch arena, or nil when it is
// exhausted.
func (p *Port) alloc(n int) []byte {
	if p.arena == nil {
		p.arena = make([]byte, 0, ArenaSize)
	}
	if len(p.arena)+n > cap(p.arena) {
		return nil
	}
	b := p.arena[len(p.arena) : len(p.arena)+n]
	p.arena = p.arena[:len(p.arena)+n]
	return b
}

// room reports whether alloc(n) would succeed.
func (p *Port) room(n int) bool {
	return p.arena == nil && n <= ArenaSize || p.arena != nil && len(p.arena)+n <= cap(p.arena)
}

// drop counts a dropped frame against c (nil: not attributable).
func (d *Dispatcher) drop(c *client, r Reason) {
	d.stats.Drops[r]++
	if c != nil {
		c.drops[r]++
	}
}

func (p *Port) input(f *link.Frame, early uint8, now int64) {
	d := p.d
	pk := &p.parsed
	pk.Decode(f.Data)
	switch early {
	case earlyNoFragment:
		d.drop(p.clientLocked(pk), ReasonFragment)
		return
	case earlyNoBuffer:
		d.drop(p.clientLocked(pk), ReasonNoBuffer)
		return
	}
	u := d.uplink
	isUplink := u != nil && u.Port == p
	if pk.Kind == header.KindIPv4 && pk.Options {
		// Neither side needs options, and a source route could name
		// another client as the next hop.
		d.drop(p.clientLocked(pk), ReasonIPOptions)
		return
	}
	if f.Offload != (link.Offload{}) && !checkOffload(&f.Offload, pk) {
		d.drop(p.clientLocked(pk), ReasonOffload)
		return
	}
	if isUplink && (pk.Kind == header.KindARP || pk.Kind == header.KindIPv4 && pk.Dst == u.IP) {
		p.fromUplink(f, now)
		return
	}
	c := p.clientLocked(pk)
	if c == nil {
		if !isUplink || pk.Kind != header.KindIPv4 {
			d.drop(nil, kindReason(pk.Kind, ReasonUnknownPort))
		} else {
			d.drop(nil, ReasonNotForUs)
		}
		return
	}
	p.fromClient(c, f, now)
}

// checkOffload reports whether the offload metadata the kernel gave with a
// frame agree with its headers. The metadata come from the peer VM through
// netback or netfront and are passed on to the next kernel, so they are
// untrusted like the frame: a partial checksum must point at the TCP or
// UDP checksum field of this packet, and a segmentation type must be the
// packet's protocol over IPv4 with a segment size and a header length
// within the frame.
func checkOffload(o *link.Offload, pk *header.Parsed) bool {
	if pk.Kind != header.KindIPv4 {
		// ARP and the rest carry no offload; the frame is dropped or
		// answered without forwarding anyway.
		return !o.NeedsCsum && o.GSOType == link.GSONone
	}
	if o.NeedsCsum {
		want := header.TCPChecksumOffset
		switch {
		case pk.Fragment:
			return false
		case pk.Proto == header.ProtoUDP:
			want = header.UDPChecksumOffset
		case pk.Proto != header.ProtoTCP:
			return false
		}
		if int(o.CsumStart) != pk.L4Off || int(o.CsumOffset) != want {
			return false
		}
	}
	switch o.GSOType &^ link.GSOECN {
	case link.GSONone:
		return o.GSOType == link.GSONone
	case link.GSOTCPv4:
		if pk.Proto != header.ProtoTCP {
			return false
		}
	case link.GSOUDPL4, link.GSOUDP:
		if pk.Proto != header.ProtoUDP {
			return false
		}
	default: // IPv6 segmentation on an IPv4 packet, unknown types
		return false
	}
	return !pk.Fragment && o.GSOSize > 0 && int(o.HdrLen) <= pk.End
}

// kindReason is the drop reason for a frame that is not IPv4 or ARP, or
// def for one that is.
func kindReason(k header.Kind, def Reason) Reason {
	switch k {
	case header.KindInvalid:
		return ReasonInvalid
	case header.KindIPv6:
		return ReasonIPv6
	case header.KindOther:
		return ReasonEtherType
	}
	return def
}

// clientLocked finds the client a frame from p belongs to: the one whose
// IP is its source, or for frames without one (ARP, invalid) any client
// behind p.
func (p *Port) clientLocked(pk *header.Parsed) *client {
	d := p.d
	if pk.Kind == header.KindIPv4 {
		if c, ok := d.clients[pk.Src]; ok && c.port == p {
			return c
		}
	}
	// The port's own clients (one, or two with an HVM's emulated NIC),
	// not a scan of every client: spoofed and ARP frames cost O(1).
	if len(p.clients) > 0 {
		return p.clients[0]
	}
	return nil
}

// fromClient handles a frame a client sent: the checks that need no
// verdict (its MAC, ARP, its source address), reassembly, then
// classifyOut and applyOut.
func (p *Port) fromClient(c *client, f *link.Frame, now int64) {
	d := p.d
	pk := &p.parsed
	if len(f.Data) < header.EthernetLen {
		d.drop(c, ReasonInvalid)
		return
	}
	if src := header.Ethernet(f.Data).Src(); src[0]&1 != 0 || src != c.mac && c.mac != [6]byte{} {
		// The client's MAC is the one its netfront has (xenstore);
		// a group address is never a sender's.
		d.drop(c, ReasonSourceMAC)
		return
	}
	switch pk.Kind {
	case header.KindARP:
		p.clientARP(c, f.Data)
		return
	case header.KindIPv4:
	default:
		d.drop(c, kindReason(pk.Kind, ReasonInvalid))
		return
	}
	if pk.Src != c.ip {
		d.drop(c, ReasonSpoof)
		d.log.log(now, "dispatch: client %v sent from %v: dropped (spoofed source)", netip.AddrFrom4(c.ip), netip.AddrFrom4(pk.Src))
		return
	}
	if pk.Fragment {
		// gather reassembles every fragment it may; this one it left
		// (a datagram that reassembled into a fragment).
		d.drop(c, ReasonFragment)
		return
	}
	p.applyOut(c, f, p.classifyOut(c, f, now), now)
}

// fromUplink handles ARP on the uplink and IPv4 addressed to our uplink IP:
// after the source checks and reassembly, classifyIn and applyIn.
func (p *Port) fromUplink(f *link.Frame, now int64) {
	d := p.d
	u := d.uplink
	pk := &p.parsed
	if header.Ethernet(f.Data).Src()[0]&1 != 0 { // ARP or IPv4: a whole Ethernet header
		d.drop(nil, ReasonSourceMAC)
		return
	}
	if pk.Kind == header.KindARP {
		p.uplinkARP(u, f.Data)
		return
	}
	if _, isClient := d.clients[pk.Src]; (isClient && !d.isBSDGatewayIP(pk.Src)) || pk.Src == u.IP {
		d.drop(nil, ReasonUplinkSpoof)
		d.log.log(now, "dispatch: uplink packet from %v: dropped (client or own source)", netip.AddrFrom4(pk.Src))
		return
	}
	if pk.Fragment {
		d.drop(nil, ReasonFragment)
		return
	}
	p.applyIn(f, p.classifyIn(f, now), now)
}

// isBSDGateway reports whether c is the netvm in BSD mode, which receives
// outbound traffic as our gateway.
func (d *Dispatcher) isBSDGateway(c *client) bool {
	return d.uplink != nil && d.uplink.Port == c.port && d.uplink.Gateway == c.ip
}

func (d *Dispatcher) isBSDGatewayIP(ip [4]byte) bool {
	return d.uplink != nil && d.uplink.Gateway == ip && d.uplink.Port != nil &&
		d.clients[ip] != nil && d.clients[ip].port == d.uplink.Port
}

// csumMode says how a frame's transport checksum is to be updated.
func csumMode(f *link.Frame) header.CsumMode {
	if f.Offload.NeedsCsum {
		return header.CsumPartial
	}
	return header.CsumFull
}

// tooBig reports whether f cannot go out on a link of the given MTU: it
// is larger, may not be fragmented, and has no segmentation offload (the
// transmitting kernel cuts those to size).
func tooBig(f *link.Frame, pk *header.Parsed, mtu int) bool {
	return f.Offload.GSOType == link.GSONone && pk.End-pk.IPOff > mtu &&
		header.IPv4(f.Data[pk.IPOff:pk.End]).DontFragment()
}

// forward sends the rewritten frame f to port to, fragmenting it when it
// exceeds the link's MTU. Frames with segmentation offload are cut by the
// transmitting kernel and go as they are. Outbound DF packets that do not
// fit were answered before NAT (fromClient); an inbound one is dropped.
func (p *Port) forward(c *client, to *Port, f *link.Frame) {
	d := p.d
	pk := &p.parsed
	ipLen := pk.End - pk.IPOff
	if f.Offload.GSOType != link.GSONone || ipLen <= to.mtu {
		f.Data = f.Data[:pk.End]
		p.send(to, *f)
		d.stats.Forwarded++
		return
	}
	ip := header.IPv4(f.Data[pk.IPOff:pk.End])
	if ip.DontFragment() {
		d.drop(c, ReasonTooBig)
		return
	}
	// Cut after the lock is released (fragmentPending).
	f.Data = f.Data[:pk.End]
	p.pending = append(p.pending, pending{to: to, frame: *f, cut: true, c: c})
	p.cut = true
}

// completeChecksum finishes a partial transport checksum in software over
// the packet, which ends at end (the frame may carry padding after it).
// checkOffload has matched CsumStart and CsumOffset with the headers.
func completeChecksum(f *link.Frame, end int) {
	start, off := int(f.Offload.CsumStart), int(f.Offload.CsumOffset)
	if start+off+2 > end {
		return
	}
	sum := header.Checksum(f.Data[start:end])
	f.Data[start+off], f.Data[start+off+1] = byte(sum>>8), byte(sum)
	f.Offload.NeedsCsum = false
}

// What gather made of a frame.
const (
	earlyGo         uint8 = iota // not a fragment, or reassembled into a whole datagram
	earlyHeld                    // a fragment kept until its datagram is complete
	earlyNoFragment              // reassembly refused or gave up
	earlyNoBuffer                // reassembled, but no room in the arena
)

// gather runs fragment reassembly for a batch before the dispatcher's lock
// is taken (the copies are byte work; the reassembler is the port's): a
// fragment is kept, or the frame becomes the whole datagram, in the
// arena. What it says of each frame is in p.early. Fragments that cannot
// be forwarded anyway (options, offload metadata, not IPv4) are left for
// the locked path to drop.
func (p *Port) gather(frames []link.Frame, now int64) {
	p.early = p.early[:0]
	for i := range frames {
		e := earlyGo
		if mayBeFragment(frames[i].Data) {
			e = p.reassemble(&frames[i], now)
		}
		p.early = append(p.early, e)
	}
}

// mayBeFragment is the cheap test of gather's fast path: an IPv4 frame
// with More Fragments or a fragment offset.
func mayBeFragment(b []byte) bool {
	return len(b) >= header.EthernetLen+header.IPv4MinLen && b[12] == 0x08 && b[13] == 0x00 &&
		(b[header.EthernetLen+6]&0x3f != 0 || b[header.EthernetLen+7] != 0)
}

func (p *Port) reassemble(f *link.Frame, now int64) uint8 {
	pk := &p.parsed
	pk.Decode(f.Data)
	if pk.Kind != header.KindIPv4 || !pk.Fragment || pk.Options || !checkOffload(&f.Offload, pk) {
		return earlyGo
	}
	p.fragMu.Lock()
	defer p.fragMu.Unlock() // dg is the reassembler's until copied
	dg, res := p.frag.Add(f.Data[pk.IPOff:pk.End], now)
	switch {
	case res == frag.Pending:
		return earlyHeld
	case dg == nil:
		return earlyNoFragment
	}
	b := p.alloc(header.EthernetLen + len(dg))
	if b == nil {
		return earlyNoBuffer
	}
	copy(b, f.Data[:header.EthernetLen])
	copy(b[header.EthernetLen:], dg)
	f.Data, f.Offload = b, link.Offload{}
	return earlyGo
}
