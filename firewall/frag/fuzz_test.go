package frag

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"testing"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/header"
)

// An Add fuzz input is a sequence of 5-byte fragment descriptions:
//
//	byte 0: bits 0-1 datagram ID, bit 2 TCP instead of UDP, bit 3 MF,
//	        bit 4 options (offset 0 only), bits 5-7 time step (x 20 ns);
//	        0xff: the next 40 bytes are added as they are
//	bytes 1-2: offset in 8-byte units (13 bits; small unless bit 5 of byte 1)
//	bytes 3-4: data length (11 bits; at most 255 unless bit 6 of byte 3)
//
// Data bytes are pattern(ID, position), so a reassembled datagram shows
// whether any byte landed in the wrong place.
const fuzzMaxBytes = 8 << 10

func fragOp(op []byte) (id uint16, proto uint8, mf, opts bool, step int64, off, n int) {
	id = uint16(op[0] & 3)
	proto = header.ProtoUDP
	if op[0]&4 != 0 {
		proto = header.ProtoTCP
	}
	off = int(binary.BigEndian.Uint16(op[1:]) & 0x1fff)
	if op[1]&0x20 == 0 {
		off &= 0x3f
	}
	n = int(binary.BigEndian.Uint16(op[3:]) & 0x7ff)
	if op[3]&0x40 == 0 {
		n &= 0xff
	}
	return id, proto, op[0]&8 != 0, op[0]&16 != 0, int64(op[0]>>5) * 20, off * 8, n
}

// encodeOp is fragOp's inverse for seeds.
func encodeOp(id uint16, mf bool, off, n int) []byte {
	b0 := byte(id & 3)
	if mf {
		b0 |= 8
	}
	u := uint16(off / 8)
	if u > 0x3f {
		u |= 0x2000
	}
	l := uint16(n)
	if l > 0xff {
		l |= 0x4000
	}
	return []byte{b0, byte(u >> 8), byte(u), byte(l >> 8), byte(l)}
}

func FuzzAdd(f *testing.F) {
	var inOrder, overlap []byte
	for _, p := range [][3]int{{0, 256, 1}, {256, 256, 1}, {512, 100, 0}} {
		inOrder = append(inOrder, encodeOp(1, p[2] == 1, p[0], p[1])...)
	}
	for _, p := range [][3]int{{0, 64, 1}, {32, 64, 1}, {96, 8, 0}} {
		overlap = append(overlap, encodeOp(2, p[2] == 1, p[0], p[1])...)
	}
	f.Add(inOrder)
	f.Add(overlap)
	f.Add(append(encodeOp(0, true, 0, 2000), encodeOp(0, false, 2000, 10)...))
	f.Add(append([]byte{0xff}, packet(1, 30, nil)...))

	f.Fuzz(func(t *testing.T, in []byte) {
		r := New(Config{MaxBytes: fuzzMaxBytes, MaxDatagrams: 4, Timeout: 100})
		var buf [header.IPv4MaxLen + 0x7ff]byte
		var now int64
		for len(in) >= 5 {
			var pkt []byte
			if in[0] == 0xff {
				pkt = in[1:min(len(in), 41)]
				in = in[len(pkt)+1:]
			} else {
				id, proto, mf, opts, step, off, n := fragOp(in)
				in = in[5:]
				now += step
				hl := header.IPv4MinLen
				if opts && off == 0 {
					hl += len(testOpts)
				}
				pkt = buf[:hl+n]
				header.PutIPv4(pkt, uint16(hl+n), id, 64, proto, srcA, dstA)
				pkt[0] = 0x40 | byte(hl/4)
				copy(pkt[header.IPv4MinLen:], testOpts[:hl-header.IPv4MinLen])
				header.IPv4(pkt).SetFragment(false, mf, off)
				fixChecksum(pkt)
				for i := range n {
					pkt[hl+i] = pattern(id, off+i)
				}
			}
			d, res := r.Add(pkt, now)
			s := r.Stats()
			if s.Bytes > fuzzMaxBytes || s.PeakBytes > fuzzMaxBytes || s.Bytes < 0 || s.Datagrams > 4 || s.Datagrams < 0 {
				t.Fatalf("stats %+v", s)
			}
			if (res == Complete) != (d != nil) {
				t.Fatalf("%v with %d bytes", res, len(d))
			}
			if res != Complete {
				continue
			}
			ip := header.IPv4(d)
			if !ip.IsValid() || int(ip.TotalLen()) != len(d) || !ip.ChecksumValid() || ip.IsFragment() {
				t.Fatalf("bad datagram %x", d)
			}
			for i, c := range ip.Payload() {
				if c != pattern(ip.ID(), i) {
					t.Fatalf("datagram %d: byte %d is %#x, want %#x", ip.ID(), i, c, pattern(ip.ID(), i))
				}
			}
		}
	})
}

// FuzzFragment fragments a packet with arbitrary options, size and MTU and
// reassembles the fragments in a random order.
func FuzzFragment(f *testing.F) {
	f.Add(testOpts, uint16(3000), uint16(576), false, uint64(1))
	f.Add([]byte{0x82, 11, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0}, uint16(65000), uint16(68), true, uint64(2))
	f.Add([]byte{0x83, 9, 0, 0}, uint16(1000), uint16(100), false, uint64(3))
	f.Fuzz(func(t *testing.T, opts []byte, n, mtu uint16, df bool, seed uint64) {
		opts = opts[:min(len(opts), 40)&^3]
		hl := header.IPv4MinLen + len(opts)
		pkt := packet(uint16(seed), min(int(n), 0xffff-hl), opts)
		if df {
			pkt[6] |= 0x40
			fixChecksum(pkt)
		}
		fs, err := Fragment(nil, pkt, int(mtu))
		if err != nil {
			if !errors.Is(err, ErrMTU) && !errors.Is(err, ErrOptions) {
				t.Fatal(err)
			}
			return
		}
		if len(pkt) <= int(mtu) {
			if len(fs) != 1 || !bytes.Equal(fs[0], pkt) {
				t.Fatal("packet that fits not copied")
			}
			return
		}
		checkFragments(t, fs, pkt, int(mtu))
		rand.New(rand.NewPCG(seed, 0)).Shuffle(len(fs), func(i, j int) { fs[i], fs[j] = fs[j], fs[i] })
		r := New(Config{MaxBytes: 128 << 10})
		for i, fr := range fs {
			d, res := r.Add(fr, 0)
			if i < len(fs)-1 {
				if res != Pending {
					t.Fatalf("fragment %d: %v", i, res)
				}
			} else if res != Complete || !bytes.Equal(d, pkt) {
				t.Fatalf("reassembled %v\n got %x\nwant %x", res, d, pkt)
			}
		}
	})
}
