package main

import (
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net/netip"

	"golang.org/x/sys/unix"
)

// The IPv4 header (RFC 791) without options, as udp-send writes it:
//
//	 0                   1                   2                   3
//	 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//	+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//	|Version|  IHL  |Type of Service|          Total Length         |
//	+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//	|         Identification        |Flags|      Fragment Offset    |
//	+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//	|  Time to Live |    Protocol   |         Header Checksum       |
//	+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//	|                       Source Address                          |
//	+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//	|                    Destination Address                        |
//	+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
const (
	ipVersionIHL = 0
	ipTotalLen   = 2
	ipID         = 4
	ipTTL        = 8
	ipProtocol   = 9
	ipChecksum   = 10
	ipSrc        = 12
	ipDst        = 16
	ipHeaderLen  = 20
)

// The UDP header (RFC 768) follows it:
//
//	+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//	|          Source Port          |       Destination Port        |
//	+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//	|            Length             |           Checksum            |
//	+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
const (
	udpSrcPort   = 0
	udpDstPort   = 2
	udpLength    = 4
	udpChecksum  = 6
	udpHeaderLen = 8
)

// maxRawPayload keeps a spoofed datagram in one unfragmented packet.
const maxRawPayload = 1400

// defaultSpoofPort is the source port of udp-send unless one is given.
const defaultSpoofPort = 40000

// sum16 adds b to a ones' complement sum as big-endian 16-bit words
// (RFC 1071), padding an odd last byte with zero.
func sum16(sum uint32, b []byte) uint32 {
	for len(b) >= 2 {
		sum += uint32(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		sum += uint32(b[0]) << 8
	}
	return sum
}

// fold returns the complemented 16-bit checksum of sum.
func fold(sum uint32) uint16 {
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return ^uint16(sum)
}

// buildUDP4 returns an IPv4 packet carrying one UDP datagram from src to
// dst, with both checksums set: the kernel fills in the IP checksum of a
// raw packet itself, but never the UDP one.
func buildUDP4(src, dst netip.AddrPort, id uint16, payload []byte) ([]byte, error) {
	if !src.Addr().Is4() || !dst.Addr().Is4() {
		return nil, fmt.Errorf("udp-send: %v -> %v: IPv4 addresses only", src, dst)
	}
	if len(payload) > maxRawPayload {
		return nil, fmt.Errorf("udp-send: payload of %d bytes, at most %d", len(payload), maxRawPayload)
	}
	pkt := make([]byte, ipHeaderLen+udpHeaderLen+len(payload))
	ip, udp := pkt[:ipHeaderLen], pkt[ipHeaderLen:]
	s, d := src.Addr().As4(), dst.Addr().As4()

	ip[ipVersionIHL] = 4<<4 | ipHeaderLen/4
	binary.BigEndian.PutUint16(ip[ipTotalLen:], uint16(len(pkt)))
	binary.BigEndian.PutUint16(ip[ipID:], id)
	ip[ipTTL] = 64
	ip[ipProtocol] = unix.IPPROTO_UDP
	copy(ip[ipSrc:], s[:])
	copy(ip[ipDst:], d[:])
	binary.BigEndian.PutUint16(ip[ipChecksum:], fold(sum16(0, ip)))

	binary.BigEndian.PutUint16(udp[udpSrcPort:], src.Port())
	binary.BigEndian.PutUint16(udp[udpDstPort:], dst.Port())
	binary.BigEndian.PutUint16(udp[udpLength:], uint16(len(udp)))
	copy(udp[udpHeaderLen:], payload)
	// The UDP checksum covers a pseudo-header of the addresses, the
	// protocol and the UDP length, then the datagram.
	sum := sum16(0, ip[ipSrc:ipDst+4])
	sum += unix.IPPROTO_UDP + uint32(len(udp))
	c := fold(sum16(sum, udp))
	if c == 0 {
		c = 0xffff // zero would mean "no checksum"
	}
	binary.BigEndian.PutUint16(udp[udpChecksum:], c)
	return pkt, nil
}

func runUDPSend(_ context.Context, _ *agent, c call) result {
	src, err := netip.ParseAddrPort(c.args[0])
	if err != nil {
		a, aerr := netip.ParseAddr(c.args[0])
		if aerr != nil {
			return errorf("bad source %q", c.args[0])
		}
		src = netip.AddrPortFrom(a, defaultSpoofPort)
	}
	dst, err := netip.ParseAddrPort(c.args[1])
	if err != nil {
		return errorf("bad destination %q: want ip:port", c.args[1])
	}
	pkt, err := buildUDP4(src, dst, uint16(rand.Uint32()), []byte(c.rest))
	if err != nil {
		return errorf("%v", err)
	}
	// IPPROTO_RAW implies IP_HDRINCL: the kernel sends our header, with
	// whatever source address it names.
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
	if err != nil {
		return errorf("raw socket: %v", err)
	}
	defer unix.Close(fd)
	if err := unix.Sendto(fd, pkt, 0, &unix.SockaddrInet4{Addr: dst.Addr().As4()}); err != nil {
		return classify("sendto", err)
	}
	return result{statusOK, "sent"}
}
