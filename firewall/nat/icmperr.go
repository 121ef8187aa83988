package nat

import (
	"encoding/binary"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/header"
)

// ICMP errors quote the IP header and at least the first 8 bytes of the
// datagram that caused them (RFC 792; RFC 1812 4.3.2.3 allows more). NAT
// must translate the quote as well as the outer header (RFC 5508 REQ-4):
// the quoted address and port, the quoted IP checksum, the quoted
// transport checksum when it was quoted, and the outer ICMP checksum,
// which covers all of them.

// quote is the datagram an ICMP error quotes, located within the ICMP
// message m (offsets relative to m).
type quote struct {
	l4    int   // offset of the quoted transport header
	l4Len int   // transport bytes quoted (>= 8)
	key   Tuple // as quoted; ICMP: SrcPort = identifier
	icmp  uint8 // quoted ICMP type
}

// quotedIP is where the quoted IP header starts in an ICMP error.
const quotedIP = header.ICMPv4MinLen

// MaxClientErrorLen bounds the IP length of an ICMP error a client may send
// out: RFC 1812 4.3.2.3 keeps errors within 576 bytes, and a longer quote
// is only room for data the rules did not allow out.
const MaxClientErrorLen = 576

// icmpError returns the ICMP message of an error packet p describes in
// frame, if it is a well-formed one with a correct checksum: the quote is
// hostile input, and translating a corrupt message would launder it.
// Redirects and source quench are never translated: a redirect across NAT
// would point a host at a router on another network, and source quench is
// deprecated (RFC 6633); Linux conntrack's NAT does not pass them either.
func icmpError(frame []byte, p *header.Parsed) ([]byte, bool) {
	if p.Kind != header.KindIPv4 || p.Fragment || p.Proto != header.ProtoICMP || !header.ICMPIsError(p.ICMPType) ||
		p.ICMPType == header.ICMPRedirect || p.ICMPType == header.ICMPSourceQuench {
		return nil, false
	}
	m := frame[p.L4Off:p.End]
	return m, header.Fold(header.Sum(m, 0)) == 0xffff
}

// parseQuote checks the quoted datagram of ICMP error m: an IPv4 header
// whose lengths agree, not a non-first fragment, and at least 8 bytes of
// a TCP or UDP header or of an ICMP query (never an error about an error).
func parseQuote(m []byte) (q quote, ok bool) {
	ip := header.IPv4(m[quotedIP:])
	if len(ip) < header.IPv4MinLen || ip[0]>>4 != 4 {
		return q, false
	}
	hl, tl := ip.HeaderLen(), int(ip.TotalLen())
	if hl < header.IPv4MinLen || tl < hl+8 || len(ip) < hl+8 || ip.FragOffset() != 0 {
		return q, false
	}
	// Bytes after the original datagram's end (RFC 4884 extensions,
	// padding) are not part of the quote.
	l4 := ip[hl:min(len(ip), tl)]
	q.l4, q.l4Len = quotedIP+hl, len(l4)
	q.key = Tuple{Proto: ip.Protocol(), Src: ip.Src(), Dst: ip.Dst()}
	switch q.key.Proto {
	case header.ProtoTCP:
		// Only the first 8 bytes are sure to be quoted; check the data
		// offset when it is there.
		if t := header.TCP(l4); len(t) > 12 && t.DataOffset() < header.TCPMinLen {
			return q, false
		}
		q.key.SrcPort, q.key.DstPort = header.TCP(l4).SrcPort(), header.TCP(l4).DstPort()
	case header.ProtoUDP:
		u := header.UDP(l4)
		if u.Length() < header.UDPLen {
			return q, false
		}
		q.key.SrcPort, q.key.DstPort = u.SrcPort(), u.DstPort()
	case header.ProtoICMP:
		q.icmp = header.ICMPv4(l4).Type()
		if !header.ICMPIsQuery(q.icmp) {
			return q, false
		}
		q.key.SrcPort = header.ICMPv4(l4).Ident()
	default:
		return q, false
	}
	return q, true
}

// TranslateICMPErrorIn translates an ICMP error from the uplink about a
// packet we sent (uplinkIP:natport -> remote) for the client: the quote
// becomes client:port -> remote and the outer destination the client.
// It returns the flow's entry, or nil if the packet must be dropped
// (malformed, bad checksum, unknown flow, not addressed to the address the
// quoted packet came from). It does not refresh the entry.
func (t *Table) TranslateICMPErrorIn(frame []byte, p *header.Parsed, now int64) *Entry {
	e := t.ICMPErrorIn(frame, p, now)
	if e != nil {
		RewriteICMPErrorIn(e, frame, p)
	}
	return e
}

// ICMPErrorIn is the decision half of TranslateICMPErrorIn: the entry of
// the flow an inbound ICMP error is about, or nil if it must be dropped.
// It changes nothing (but may reap an expired entry).
func (t *Table) ICMPErrorIn(frame []byte, p *header.Parsed, now int64) *Entry {
	m, ok := icmpError(frame, p)
	if !ok {
		return nil
	}
	q, ok := parseQuote(m)
	if !ok || q.key.Src != p.Dst || (q.key.Proto == header.ProtoICMP && !header.ICMPIsRequest(q.icmp)) {
		return nil
	}
	return t.getIn(q.key, now)
}

// RewriteICMPErrorIn is the acting half of TranslateICMPErrorIn, for the
// entry ICMPErrorIn returned for this frame: the quote and the outer
// destination name the client again. False (nothing changed) for a frame
// ICMPErrorIn did not accept.
func RewriteICMPErrorIn(e *Entry, frame []byte, p *header.Parsed) bool {
	m, ok := icmpError(frame, p)
	if !ok {
		return false
	}
	q, ok := parseQuote(m)
	if !ok {
		return false
	}
	rewriteQuote(m, q, header.IPv4SrcOffset, header.SrcPortOffset, e.ct.Src, e.ct.SrcPort)
	header.IPv4(frame[p.IPOff:]).SetDst(e.ct.Src)
	p.Dst = e.ct.Src
	return true
}

// TranslateICMPErrorOut translates an ICMP error from a client about a
// packet it received through NAT (remote -> client:port): the quote
// becomes remote -> uplinkIP:natport and the outer source the uplink
// address. It returns the flow's entry, or nil if the packet must be
// dropped: malformed, longer than MaxClientErrorLen, not quoting a packet
// the client received, or not addressed to the flow's remote end. The last
// is what keeps errors from being a way around the rules: a client may only
// tell the remote end of one of its flows about that flow, as conntrack
// requires of related ICMP.
func (t *Table) TranslateICMPErrorOut(frame []byte, p *header.Parsed, now int64) *Entry {
	e := t.ICMPErrorOut(frame, p, now)
	if e != nil {
		RewriteICMPErrorOut(e, frame, p)
	}
	return e
}

// ICMPErrorOut is the decision half of TranslateICMPErrorOut: the entry of
// the flow a client's ICMP error is about, or nil if it must be dropped.
// It changes nothing (but may reap an expired entry).
func (t *Table) ICMPErrorOut(frame []byte, p *header.Parsed, now int64) *Entry {
	if p.End-p.IPOff > MaxClientErrorLen {
		return nil
	}
	m, ok := icmpError(frame, p)
	if !ok {
		return nil
	}
	q, ok := parseQuote(m)
	if !ok || q.key.Dst != p.Src || q.key.Src != p.Dst {
		return nil
	}
	k := Tuple{Proto: q.key.Proto, Src: q.key.Dst, Dst: q.key.Src, SrcPort: q.key.DstPort, DstPort: q.key.SrcPort}
	if k.Proto == header.ProtoICMP {
		// The client quotes a query reply it received.
		if header.ICMPIsRequest(q.icmp) {
			return nil
		}
		k.SrcPort, k.DstPort = q.key.SrcPort, 0
	}
	return t.getOut(k, now)
}

// RewriteICMPErrorOut is the acting half of TranslateICMPErrorOut, for the
// entry ICMPErrorOut returned for this frame: the quote names our address
// and port, and so does the outer source. False (nothing changed) for a
// frame ICMPErrorOut did not accept.
func RewriteICMPErrorOut(e *Entry, frame []byte, p *header.Parsed) bool {
	m, ok := icmpError(frame, p)
	if !ok {
		return false
	}
	q, ok := parseQuote(m)
	if !ok {
		return false
	}
	rewriteQuote(m, q, header.IPv4DstOffset, header.DstPortOffset, e.uplink, e.natPort)
	header.IPv4(frame[p.IPOff:]).SetSrc(e.uplink)
	p.Src = e.uplink
	return true
}

// rewriteQuote sets the quoted address at offset addrOff of the quoted IP
// header (header.IPv4SrcOffset or IPv4DstOffset) and the quoted port at
// portOff of the transport header (header.SrcPortOffset or DstPortOffset;
// ICMP queries: the identifier, whichever portOff), updating the quoted checksums and the ICMP checksum of m.
func rewriteQuote(m []byte, q quote, addrOff, portOff int, addr [4]byte, port uint16) {
	w := wordEditor{m: m, sum: header.ICMPv4(m).Checksum()}
	ipOff := quotedIP
	old := [4]byte(m[ipOff+addrOff:])
	w.put(ipOff+addrOff, binary.BigEndian.Uint16(addr[0:]))
	w.put(ipOff+addrOff+2, binary.BigEndian.Uint16(addr[2:]))
	w.put(ipOff+header.IPv4ChecksumOffset, header.Update32(w.get(ipOff+header.IPv4ChecksumOffset), old, addr))
	switch q.key.Proto {
	case header.ProtoTCP, header.ProtoUDP:
		oldPort := w.get(q.l4 + portOff)
		w.put(q.l4+portOff, port)
		cs := q.l4 + header.TCPChecksumOffset
		if q.key.Proto == header.ProtoUDP {
			cs = q.l4 + header.UDPChecksumOffset
		}
		if cs+2 > q.l4+q.l4Len {
			break // a TCP quote of 8 bytes stops before its checksum
		}
		c := w.get(cs)
		if q.key.Proto == header.ProtoUDP && c == 0 {
			break // sent without a checksum
		}
		c = header.Update16(header.Update32(c, old, addr), oldPort, port)
		if q.key.Proto == header.ProtoUDP && c == 0 {
			c = 0xffff
		}
		w.put(cs, c)
	case header.ProtoICMP:
		oldID := w.get(q.l4 + header.ICMPv4IdentOffset)
		w.put(q.l4+header.ICMPv4IdentOffset, port)
		cs := q.l4 + header.ICMPv4ChecksumOffset
		w.put(cs, header.Update16(w.get(cs), oldID, port))
	}
	header.ICMPv4(m).SetChecksum(w.sum)
}

// wordEditor changes 16-bit words of an ICMP message, keeping its
// checksum sum up to date. Every offset is even: the quote starts 8 bytes
// in and its header lengths are multiples of 4.
type wordEditor struct {
	m   []byte
	sum uint16
}

func (w *wordEditor) get(off int) uint16 { return binary.BigEndian.Uint16(w.m[off:]) }

func (w *wordEditor) put(off int, v uint16) {
	w.sum = header.Update16(w.sum, w.get(off), v)
	binary.BigEndian.PutUint16(w.m[off:], v)
}
