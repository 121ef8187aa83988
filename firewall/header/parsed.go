package header

// Kind says what Parsed.Decode found in a frame.
type Kind uint8

const (
	KindInvalid Kind = iota // truncated or inconsistent: drop
	KindARP                 // a valid Ethernet/IPv4 ARP packet
	KindIPv4                // a valid IPv4 packet; transport fields valid unless Fragment
	KindIPv6                // any IPv6 frame (not parsed further)
	KindOther               // another EtherType
)

var kindNames = [...]string{"invalid", "arp", "ipv4", "ipv6", "other"}

func (k Kind) String() string {
	if int(k) < len(kindNames) {
		return kindNames[k]
	}
	return "unknown"
}

// Parsed is a decoded Ethernet frame. Decode fills it without allocating;
// the caller owns it and typically reuses one per goroutine.
type Parsed struct {
	Kind      Kind
	EtherType uint16

	// IPv4 fields, valid when Kind == KindIPv4.
	IPOff    int // offset of the IP header in the frame
	L4Off    int // offset of the transport header
	End      int // offset just past the IP packet (frames may carry padding)
	Proto    uint8
	Src, Dst [4]byte
	TTL      uint8
	Fragment bool // a fragment (MF set or offset > 0): no transport fields

	// Transport fields, valid when Kind == KindIPv4 && !Fragment.
	SrcPort, DstPort uint16 // TCP and UDP ports
	TCPFlags         uint8
	TCPSeq, TCPAck   uint32
	ICMPType         uint8
	ICMPCode         uint8
	ICMPIdent        uint16 // for ICMP queries
	Options          bool   // the IPv4 header carries options
}

// Decode parses frame. Every offset it records lies within frame, and
// every header it reports is complete: a frame that is truncated, whose
// lengths disagree, whose IP header checksum is wrong, or whose transport
// header does not fit is KindInvalid.
func (p *Parsed) Decode(frame []byte) {
	*p = Parsed{}
	if len(frame) < EthernetLen {
		return
	}
	eth := Ethernet(frame)
	p.EtherType = eth.Type()
	switch p.EtherType {
	case EtherTypeARP:
		if ARP(frame[EthernetLen:]).IsValid() {
			p.Kind = KindARP
		}
		return
	case EtherTypeIPv6:
		p.Kind = KindIPv6
		return
	case EtherTypeIPv4:
	default:
		p.Kind = KindOther
		return
	}
	ip := IPv4(frame[EthernetLen:])
	if !ip.IsValid() || !ip.ChecksumValid() {
		// A corrupt header is not forwarded with a fresh checksum
		// after NAT rewrites it.
		return
	}
	p.Options = ip.HeaderLen() > IPv4MinLen
	p.IPOff = EthernetLen
	p.L4Off = EthernetLen + ip.HeaderLen()
	p.End = EthernetLen + int(ip.TotalLen())
	p.Proto = ip.Protocol()
	p.Src, p.Dst = ip.Src(), ip.Dst()
	p.TTL = ip.TTL()
	if ip.IsFragment() {
		p.Fragment = true
		p.Kind = KindIPv4
		return
	}
	if !p.decodeTransport(frame[p.L4Off:p.End]) {
		return
	}
	p.Kind = KindIPv4
}

// decodeTransport fills the transport fields from l4, the IP payload, and
// reports whether its header is complete. Protocols other than TCP, UDP and
// ICMP are valid with no transport fields.
func (p *Parsed) decodeTransport(l4 []byte) bool {
	switch p.Proto {
	case ProtoTCP:
		t := TCP(l4)
		if len(t) < TCPMinLen || t.DataOffset() < TCPMinLen || t.DataOffset() > len(t) {
			return false
		}
		p.SrcPort, p.DstPort, p.TCPFlags = t.SrcPort(), t.DstPort(), t.Flags()
		p.TCPSeq, p.TCPAck = t.Seq(), t.Ack()
	case ProtoUDP:
		u := UDP(l4)
		if len(u) < UDPLen || int(u.Length()) < UDPLen || int(u.Length()) > len(u) {
			return false
		}
		p.SrcPort, p.DstPort = u.SrcPort(), u.DstPort()
	case ProtoICMP:
		m := ICMPv4(l4)
		if len(m) < ICMPv4MinLen {
			return false
		}
		p.ICMPType, p.ICMPCode = m.Type(), m.Code()
		if ICMPIsQuery(p.ICMPType) {
			p.ICMPIdent = m.Ident()
		}
	}
	return true
}

// Checksum state of a transport header being rewritten.
type CsumMode uint8

const (
	// CsumFull: the transport checksum is complete; update it for every
	// change (pseudo-header and ports).
	CsumFull CsumMode = iota
	// CsumPartial: checksum offload will complete it (virtio NEEDS_CSUM);
	// the field holds the pseudo-header sum only, so only address changes
	// are applied to it.
	CsumPartial
)

// RewriteSrc changes the source address and, for TCP/UDP, the source port
// (or, for ICMP queries, the identifier) of the IPv4 packet p describes in
// frame, keeping the IP and transport checksums right. p is updated too.
func (p *Parsed) RewriteSrc(frame []byte, addr [4]byte, port uint16, mode CsumMode) {
	old := p.Src
	IPv4(frame[p.IPOff:]).SetSrc(addr)
	p.Src = addr
	p.fixTransport(frame, old, addr, true, port, mode)
}

// RewriteDst is RewriteSrc for the destination address and port.
func (p *Parsed) RewriteDst(frame []byte, addr [4]byte, port uint16, mode CsumMode) {
	old := p.Dst
	IPv4(frame[p.IPOff:]).SetDst(addr)
	p.Dst = addr
	p.fixTransport(frame, old, addr, false, port, mode)
}

func (p *Parsed) fixTransport(frame []byte, oldAddr, newAddr [4]byte, src bool, port uint16, mode CsumMode) {
	if p.Fragment {
		return
	}
	l4 := frame[p.L4Off:p.End]
	switch p.Proto {
	case ProtoTCP, ProtoUDP:
		off := TCPChecksumOffset
		if p.Proto == ProtoUDP {
			off = UDPChecksumOffset
		}
		portOff := 2
		oldPort := p.DstPort
		if src {
			portOff, oldPort = 0, p.SrcPort
		}
		c := uint16(l4[off])<<8 | uint16(l4[off+1])
		switch {
		case mode == CsumPartial:
			c = UpdatePartial32(c, oldAddr, newAddr)
		case p.Proto == ProtoUDP && c == 0:
			// No checksum was sent; keep it that way.
		default:
			c = Update16(Update32(c, oldAddr, newAddr), oldPort, port)
			if p.Proto == ProtoUDP && c == 0 {
				c = 0xffff
			}
		}
		l4[off], l4[off+1] = byte(c>>8), byte(c)
		l4[portOff], l4[portOff+1] = byte(port>>8), byte(port)
		if src {
			p.SrcPort = port
		} else {
			p.DstPort = port
		}
	case ProtoICMP:
		// The ICMP checksum has no pseudo-header: only the identifier of
		// a query changes it.
		if ICMPIsQuery(p.ICMPType) && port != p.ICMPIdent {
			ICMPv4(l4).SetIdent(port)
			p.ICMPIdent = port
		}
	}
}
