package main

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"math/rand/v2"
	"net/netip"
	"strings"
	"testing"
)

func TestBuildUDP4Fixture(t *testing.T) {
	pkt, err := buildUDP4(netip.MustParseAddrPort("10.137.0.5:40000"), netip.MustParseAddrPort("10.138.0.1:7"), 0x1234, []byte("hi"))
	if err != nil {
		t.Fatal(err)
	}
	// The checksums were computed with Python's struct module.
	want := strings.Join([]string{
		"45 00 001e", // version 4, IHL 5, TOS 0, total length 30
		"1234 0000",  // ID, no flags, offset 0
		"40 11 5383", // TTL 64, UDP, header checksum
		"0a890005",   // source 10.137.0.5
		"0a8a0001",   // destination 10.138.0.1
		"9c40 0007",  // UDP: ports 40000 -> 7
		"000a e610",  // length 10, checksum
		"6869",       // "hi"
	}, "")
	if got := hex.EncodeToString(pkt); got != strings.ReplaceAll(want, " ", "") {
		t.Errorf("packet\n got %s\nwant %s", got, strings.ReplaceAll(want, " ", ""))
	}
}

// onesSum is an independent model of the Internet checksum: the ones'
// complement sum of 16-bit words is congruent to their plain sum modulo
// 0xffff, so a correct packet sums (checksum included) to a multiple of
// 0xffff.
func onesSum(parts ...[]byte) uint64 {
	b := bytes.Join(parts, nil)
	if len(b)%2 == 1 {
		b = append(b, 0)
	}
	var s uint64
	for i := 0; i < len(b); i += 2 {
		s += uint64(b[i])*256 + uint64(b[i+1])
	}
	return s
}

func TestBuildUDP4Checksums(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for i := range 2000 {
		var s, d [4]byte
		binary.BigEndian.PutUint32(s[:], r.Uint32())
		binary.BigEndian.PutUint32(d[:], r.Uint32())
		payload := make([]byte, r.IntN(maxRawPayload+1))
		for j := range payload {
			payload[j] = byte(r.Uint32())
		}
		if i < 2 {
			payload = payload[:i] // empty and one byte
		}
		src := netip.AddrPortFrom(netip.AddrFrom4(s), uint16(r.Uint32()))
		dst := netip.AddrPortFrom(netip.AddrFrom4(d), uint16(r.Uint32()))
		id := uint16(r.Uint32())
		pkt, err := buildUDP4(src, dst, id, payload)
		if err != nil {
			t.Fatal(err)
		}
		ip, udp := pkt[:20], pkt[20:]
		if ip[0] != 0x45 || binary.BigEndian.Uint16(ip[2:]) != uint16(len(pkt)) || binary.BigEndian.Uint16(ip[4:]) != id ||
			binary.BigEndian.Uint16(ip[6:]) != 0 || ip[8] != 64 || ip[9] != 17 ||
			!bytes.Equal(ip[12:16], s[:]) || !bytes.Equal(ip[16:20], d[:]) {
			t.Fatalf("bad IPv4 header % x", ip)
		}
		if binary.BigEndian.Uint16(udp[0:]) != src.Port() || binary.BigEndian.Uint16(udp[2:]) != dst.Port() ||
			binary.BigEndian.Uint16(udp[4:]) != uint16(8+len(payload)) || !bytes.Equal(udp[8:], payload) {
			t.Fatalf("bad UDP header % x", udp[:8])
		}
		if onesSum(ip)%0xffff != 0 {
			t.Fatalf("IPv4 checksum wrong: % x", ip)
		}
		pseudo := []byte{0, 17, byte(len(udp) >> 8), byte(len(udp))}
		if onesSum(s[:], d[:], pseudo, udp)%0xffff != 0 || binary.BigEndian.Uint16(udp[6:]) == 0 {
			t.Fatalf("UDP checksum %#04x wrong for %v -> %v, %d bytes", binary.BigEndian.Uint16(udp[6:]), src, dst, len(payload))
		}
	}
}
