package frag

import (
	"bytes"
	"encoding/binary"
	"math/rand/v2"
	"testing"
	"unsafe"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/header"
)

var (
	srcA = [4]byte{10, 137, 0, 5}
	dstA = [4]byte{192, 0, 2, 1}
)

// Options used in tests (RFC 791 §3.1): a NOP, loose source route (copied
// flag set, 7 bytes), record route (not copied, 7 bytes), end of list.
var testOpts = []byte{
	1,                           // NOP
	0x83, 7, 4, 198, 51, 100, 9, // LSRR, copied
	0x07, 7, 4, 0, 0, 0, 0, // record route, not copied
	0, // end of list
}

// packet returns a valid unfragmented UDP packet with n data bytes that
// depend on their position and id, and the given options.
func packet(id uint16, n int, opts []byte) []byte {
	hl := header.IPv4MinLen + len(opts)
	b := make([]byte, hl+n)
	header.PutIPv4(b, uint16(hl+n), id, 64, header.ProtoUDP, srcA, dstA)
	b[0] = 0x40 | byte(hl/4)
	copy(b[header.IPv4MinLen:], opts)
	for i := range n {
		b[hl+i] = pattern(id, i)
	}
	fixChecksum(b)
	return b
}

func pattern(id uint16, i int) byte { return byte(i*7+i>>8) ^ byte(id) }

func fixChecksum(b []byte) {
	ip := header.IPv4(b)
	ip.SetChecksum(0)
	ip.SetChecksum(ip.CalculateChecksum())
}

// piece cuts the fragment with data [off, off+n) out of the unfragmented
// packet pkt by hand, independently of Fragment: offset 0 keeps pkt's
// header, others get a bare 20-byte header.
func piece(pkt []byte, off, n int, mf bool) []byte {
	ip := header.IPv4(pkt)
	hl := header.IPv4MinLen
	if off == 0 {
		hl = ip.HeaderLen()
	}
	b := make([]byte, hl+n)
	copy(b, pkt[:hl])
	b[0] = 0x40 | byte(hl/4)
	copy(b[hl:], pkt[ip.HeaderLen()+off:][:n])
	f := header.IPv4(b)
	f.SetTotalLen(uint16(hl + n))
	f.SetFragment(ip.DontFragment(), mf, off)
	fixChecksum(b)
	return b
}

// split cuts pkt into k fragments of equal size (a multiple of 8) but
// the last.
func split(pkt []byte, k int) [][]byte {
	data := len(header.IPv4(pkt).Payload())
	size := (data/k + 7) &^ 7
	var fs [][]byte
	for off := 0; off < data; off += size {
		n := min(size, data-off)
		fs = append(fs, piece(pkt, off, n, off+n < data))
	}
	return fs
}

// feed adds fs in order and returns the result of the last Add; all
// earlier ones must be Pending.
func feed(t *testing.T, r *Reassembler, fs [][]byte, now int64) ([]byte, Result) {
	t.Helper()
	for i, f := range fs {
		d, res := r.Add(f, now)
		if i == len(fs)-1 {
			return d, res
		}
		if res != Pending {
			t.Fatalf("fragment %d of %d: %v, want pending", i, len(fs), res)
		}
	}
	return nil, Pending
}

func checkEmpty(t *testing.T, r *Reassembler) {
	t.Helper()
	if s := r.Stats(); s.Datagrams != 0 || s.Bytes != 0 {
		t.Fatalf("left behind: %d datagrams, %d bytes", s.Datagrams, s.Bytes)
	}
}

func TestReassembleOrders(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	r := New(Config{})
	for k := 2; k <= 45; k++ {
		pkt := packet(uint16(k), k*48-5, nil)
		fs := split(pkt, k)
		if len(fs) != k {
			t.Fatalf("split into %d, want %d", len(fs), k)
		}
		rev := make([][]byte, k)
		for i := range fs {
			rev[k-1-i] = fs[i]
		}
		shuf := append([][]byte(nil), fs...)
		rng.Shuffle(k, func(i, j int) { shuf[i], shuf[j] = shuf[j], shuf[i] })
		for name, order := range map[string][][]byte{"in order": fs, "reverse": rev, "random": shuf} {
			d, res := feed(t, r, order, 0)
			if res != Complete {
				t.Fatalf("%d fragments %s: %v", k, name, res)
			}
			if !bytes.Equal(d, pkt) || !header.IPv4(d).ChecksumValid() {
				t.Fatalf("%d fragments %s: reassembled differs\n got %x\nwant %x", k, name, d, pkt)
			}
			checkEmpty(t, r)
		}
	}
	if s := r.Stats(); s.Complete != 44*3 || s.Fragments != 3*(45*46/2-1) {
		t.Errorf("stats %+v", s)
	}
}

func TestReassembleOptions(t *testing.T) {
	pkt := packet(7, 1000, testOpts)
	pkt[6] = 0x40 // DF survives reassembly
	fixChecksum(pkt)
	fs := split(pkt, 4)
	r := New(Config{})
	// The first fragment, the only one with all options, arrives last.
	d, res := feed(t, r, append(fs[1:], fs[0]), 0)
	if res != Complete || !bytes.Equal(d, pkt) {
		t.Fatalf("%v\n got %x\nwant %x", res, d, pkt)
	}
}

// TestInterleaved reassembles several datagrams whose fragments are mixed,
// including two that differ only in protocol (part of the key).
func TestInterleaved(t *testing.T) {
	pkts := [][]byte{packet(1, 3000, nil), packet(2, 1500, testOpts), packet(1, 2000, nil)}
	header.IPv4(pkts[2]).SetProtocol(header.ProtoTCP)
	fixChecksum(pkts[2])
	var all [][]byte
	var owner []int
	for i, p := range pkts {
		for _, f := range split(p, 5) {
			all = append(all, f)
			owner = append(owner, i)
		}
	}
	rng := rand.New(rand.NewPCG(3, 4))
	perm := rng.Perm(len(all))
	r := New(Config{})
	done := 0
	for _, j := range perm {
		d, res := r.Add(all[j], 0)
		if res == Complete {
			done++
			if !bytes.Equal(d, pkts[owner[j]]) {
				t.Fatalf("datagram %d differs", owner[j])
			}
		} else if res != Pending {
			t.Fatal(res)
		}
	}
	if done != 3 {
		t.Fatalf("%d complete", done)
	}
	checkEmpty(t, r)
}

func TestDrops(t *testing.T) {
	pkt := packet(9, 64, nil)
	big := packet(9, 200, testOpts) // 36-byte header
	notFrag := packet(9, 40, nil)
	badSum := piece(pkt, 0, 16, true)
	badSum[10] ^= 1
	truncated := piece(pkt, 0, 16, true)[:30]
	zero := piece(pkt, 16, 0, true)
	odd := piece(pkt, 0, 12, true)
	// Fragments far out: a copy of pkt's header with an arbitrary offset.
	far := func(off, n int, mf bool, hdr []byte) []byte {
		hl := header.IPv4(hdr).HeaderLen()
		b := make([]byte, hl+n)
		copy(b, hdr[:hl])
		f := header.IPv4(b)
		f.SetTotalLen(uint16(hl + n))
		f.SetFragment(false, mf, off)
		fixChecksum(b)
		return b
	}
	cases := []struct {
		name string
		fs   [][]byte
		want Result
	}{
		{"exact duplicate", [][]byte{piece(pkt, 0, 16, true), piece(pkt, 0, 16, true)}, DropOverlap},
		{"duplicate last", [][]byte{piece(pkt, 48, 16, false), piece(pkt, 48, 16, false)}, DropOverlap},
		{"partial overlap", [][]byte{piece(pkt, 0, 24, true), piece(pkt, 16, 16, true)}, DropOverlap},
		{"overlap across block", [][]byte{piece(packet(9, 2000, nil), 0, 600, true), piece(packet(9, 2000, nil), 504, 16, true)}, DropOverlap},
		{"covering", [][]byte{piece(pkt, 16, 8, true), piece(pkt, 0, 32, true)}, DropOverlap},
		{"not a fragment", [][]byte{notFrag}, DropInvalid},
		{"bad checksum", [][]byte{badSum}, DropInvalid},
		{"truncated", [][]byte{truncated}, DropInvalid},
		{"zero length", [][]byte{piece(pkt, 0, 16, true), zero}, DropInvalid},
		{"non-last not multiple of 8", [][]byte{piece(pkt, 16, 16, true), odd}, DropInvalid},
		{"second last fragment", [][]byte{piece(pkt, 48, 16, false), piece(pkt, 32, 8, false)}, DropInvalid},
		{"last before data", [][]byte{piece(pkt, 48, 16, true), piece(pkt, 32, 8, false)}, DropInvalid},
		{"data beyond last", [][]byte{piece(pkt, 32, 8, false), piece(pkt, 48, 16, true)}, DropInvalid},
		{"end beyond 65535", [][]byte{far(65528, 8, false, pkt)}, DropOversize},
		{"end beyond 65515", [][]byte{far(65512, 8, false, pkt)}, DropOversize},
		{"first header makes it too long", [][]byte{far(65496, 8, false, pkt), far(0, 8, true, big)}, DropOversize},
		{"late fragment makes it too long", [][]byte{far(0, 8, true, big), far(65496, 8, false, pkt)}, DropOversize},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := New(Config{})
			if _, res := feed(t, r, c.fs, 0); res != c.want {
				t.Fatalf("got %v, want %v", res, c.want)
			}
			checkEmpty(t, r)
			// Nothing is remembered: another fragment of the same
			// datagram makes a new, incomplete one.
			if _, res := r.Add(piece(pkt, 32, 8, true), 0); res != Pending {
				t.Fatalf("after drop: %v", res)
			}
		})
	}
	// The largest datagram that fits still reassembles: 20-byte header,
	// 65515 data bytes.
	r := New(Config{MaxBytes: 1 << 20})
	largest := packet(3, maxData, nil)
	if d, res := feed(t, r, split(largest, 45), 0); res != Complete || !bytes.Equal(d, largest) {
		t.Fatalf("largest datagram: %v", res)
	}
}

func TestExpire(t *testing.T) {
	const timeout = 1000
	pkt := packet(4, 100, nil)
	fs := split(pkt, 3)
	r := New(Config{Timeout: timeout})
	r.Add(fs[0], 5)
	r.Add(split(packet(5, 100, nil), 3)[0], 500)
	if n := r.Expire(5 + timeout); n != 0 {
		t.Fatalf("expired %d at the timeout", n)
	}
	if n := r.Expire(6 + timeout); n != 1 || r.Stats().Datagrams != 1 {
		t.Fatalf("expired %d, %d left", n, r.Stats().Datagrams)
	}
	// Add expires too: the rest of the first datagram, late, starts anew.
	if _, res := feed(t, r, fs[1:], 501+timeout); res != Pending {
		t.Fatalf("late fragments: %v", res)
	}
	if s := r.Stats(); s.Expired != 2 || s.Datagrams != 1 {
		t.Fatalf("stats %+v", s)
	}
	// Within the timeout it completes.
	r = New(Config{Timeout: timeout})
	r.Add(fs[0], 0)
	if _, res := feed(t, r, fs[1:], timeout); res != Complete {
		t.Fatalf("%v", res)
	}
}

func TestMemoryLimit(t *testing.T) {
	const maxBytes = 16 << 10
	r := New(Config{MaxBytes: maxBytes, MaxDatagrams: 1000})
	const n = 40
	var rest [][][]byte
	for id := range n {
		fs := split(packet(uint16(id), 3000, nil), 3) // 1000 bytes per fragment
		if _, res := r.Add(fs[0], int64(id)); res != Pending {
			t.Fatalf("datagram %d: %v", id, res)
		}
		if s := r.Stats(); s.Bytes > maxBytes {
			t.Fatalf("%d bytes after datagram %d", s.Bytes, id)
		}
		rest = append(rest, fs[1:])
	}
	s := r.Stats()
	if s.PeakBytes > maxBytes || s.Evicted == 0 || s.Datagrams >= n {
		t.Fatalf("stats %+v", s)
	}
	// The oldest were evicted; the newest complete.
	if _, res := feed(t, r, rest[n-1], n); res != Complete {
		t.Fatalf("newest: %v", res)
	}
	if d, res := feed(t, r, rest[0], n); res == Complete || d != nil {
		t.Fatalf("oldest completed")
	}
	// One datagram larger than the limit cannot be held at all.
	r = New(Config{MaxBytes: 4 << 10})
	res := Pending
	for _, f := range split(packet(1, 6000, nil), 6) {
		if _, res = r.Add(f, 0); res != Pending {
			break
		}
	}
	if res != DropLimit {
		t.Fatalf("too large: %v", res)
	}
	if s := r.Stats(); s.Limit != 1 || s.PeakBytes > 4<<10 {
		t.Fatalf("stats %+v", s)
	}
	checkEmpty(t, r)
	// A limit below one datagram's record holds nothing.
	r = New(Config{MaxBytes: 100})
	if _, res := r.Add(piece(packet(1, 64, nil), 0, 8, true), 0); res != DropLimit {
		t.Fatalf("tiny limit: %v", res)
	}
	checkEmpty(t, r)
}

// TestTinyFragments: 8-byte fragments are each charged a block and a
// record, so they cannot hold more than MaxBytes between them.
func TestTinyFragments(t *testing.T) {
	const maxBytes = 32 << 10
	r := New(Config{MaxBytes: maxBytes, MaxDatagrams: 1000})
	for id := range 1000 {
		if _, res := r.Add(piece(packet(uint16(id), 64, nil), 0, 8, true), 0); res != Pending {
			t.Fatal(res)
		}
	}
	s := r.Stats()
	per := blockSize + dgramCost
	if s.Datagrams != maxBytes/per || s.Bytes != s.Datagrams*per || s.PeakBytes > maxBytes {
		t.Fatalf("stats %+v", s)
	}
}

func TestMaxDatagrams(t *testing.T) {
	r := New(Config{MaxDatagrams: 4})
	var fss [][][]byte
	for id := range 6 {
		fs := split(packet(uint16(id), 100, nil), 2)
		r.Add(fs[0], 0)
		fss = append(fss, fs)
		if d := r.Stats().Datagrams; d > 4 {
			t.Fatalf("%d datagrams", d)
		}
	}
	if s := r.Stats(); s.Datagrams != 4 || s.Evicted != 2 {
		t.Fatalf("stats %+v", s)
	}
	if _, res := r.Add(fss[0][1], 0); res != Pending { // evicted: starts anew
		t.Fatalf("oldest: %v", res)
	}
	if _, res := r.Add(fss[5][1], 0); res != Complete {
		t.Fatalf("newest: %v", res)
	}
}

func TestDgramCost(t *testing.T) {
	if n := int(unsafe.Sizeof(dgram{})); n > dgramCost {
		t.Fatalf("dgram is %d bytes, charged %d", n, dgramCost)
	}
}

func TestAddNoAllocs(t *testing.T) {
	r := New(Config{})
	fs := split(packet(1, 4000, testOpts), 3)
	feed(t, r, fs, 0) // warm up
	allocs := testing.AllocsPerRun(100, func() {
		for _, f := range fs {
			r.Add(f, 0)
		}
	})
	if allocs != 0 {
		t.Fatalf("%v allocs per datagram", allocs)
	}
}

func TestResultString(t *testing.T) {
	for r, want := range map[Result]string{Pending: "pending", DropOverlap: "overlap", DropLimit: "limit", 99: "unknown"} {
		if r.String() != want {
			t.Errorf("%d: %q", r, r.String())
		}
	}
}

// checkFragments checks what Fragment returned for pkt and mtu.
func checkFragments(t testing.TB, fs [][]byte, pkt []byte, mtu int) {
	ip := header.IPv4(pkt)
	end := 0
	for i, f := range fs {
		h := header.IPv4(f)
		if !h.IsValid() || int(h.TotalLen()) != len(f) || len(f) > mtu || !h.ChecksumValid() {
			t.Fatalf("fragment %d of %d: bad length or checksum: %x", i, len(fs), f)
		}
		last := i == len(fs)-1
		if h.FragOffset() != ip.FragOffset()+end || h.MoreFragments() != (!last || ip.MoreFragments()) ||
			h.DontFragment() != ip.DontFragment() || (!last && len(h.Payload())%8 != 0) {
			t.Fatalf("fragment %d of %d: offset %d, flags %#x", i, len(fs), h.FragOffset(), binary.BigEndian.Uint16(f[6:]))
		}
		if i > 0 && !bytes.Equal(h.Options(), copiedOptions(ip.Options())) {
			t.Fatalf("fragment %d options %x", i, h.Options())
		}
		if !bytes.Equal(h.Payload(), ip.Payload()[end:end+len(h.Payload())]) {
			t.Fatalf("fragment %d data differs", i)
		}
		end += len(h.Payload())
	}
	if end != len(ip.Payload()) {
		t.Fatalf("fragments carry %d of %d bytes", end, len(ip.Payload()))
	}
}

// copiedOptions is the options of a non-first fragment, written plainly.
func copiedOptions(opts []byte) []byte {
	var c []byte
	for i := 0; i < len(opts) && opts[i] != 0; {
		if opts[i] == 1 {
			i++
			continue
		}
		l := int(opts[i+1])
		if opts[i]&0x80 != 0 {
			c = append(c, opts[i:i+l]...)
		}
		i += l
	}
	for len(c)%4 != 0 {
		c = append(c, 0)
	}
	return c
}

func TestFragmentRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	r := New(Config{MaxBytes: 1 << 20})
	var fs [][]byte
	for _, opts := range [][]byte{nil, testOpts, {0x82, 11, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0}} {
		for _, mtu := range []int{68, 69, 75, 76, 100, 576, 1280, 1500, 9000} {
			for _, n := range []int{1, 7, 8, 9, 47, 48, 49, 100, 1472, 1481, 3000, 8999, 20000, 65000} {
				pkt := packet(uint16(n), n, opts)
				if len(pkt) > 0xffff {
					continue
				}
				var err error
				fs, err = Fragment(fs, pkt, mtu)
				if err != nil {
					t.Fatalf("mtu %d, %d bytes: %v", mtu, n, err)
				}
				if len(pkt) <= mtu {
					if len(fs) != 1 || !bytes.Equal(fs[0], pkt) {
						t.Fatalf("mtu %d, %d bytes: not one copy", mtu, n)
					}
					continue
				}
				checkFragments(t, fs, pkt, mtu)
				rng.Shuffle(len(fs), func(i, j int) { fs[i], fs[j] = fs[j], fs[i] })
				d, res := feed(t, r, fs, 0)
				if res != Complete || !bytes.Equal(d, pkt) {
					t.Fatalf("mtu %d, %d bytes, %d fragments: %v", mtu, n, len(fs), res)
				}
			}
		}
	}
}

// TestFragmentFragment fragments a fragment again: offsets continue from
// its own and the last piece keeps its MF.
func TestFragmentFragment(t *testing.T) {
	pkt := packet(1, 3000, nil)
	mid := piece(pkt, 800, 1600, true)
	fs, err := Fragment(nil, mid, 576)
	if err != nil {
		t.Fatal(err)
	}
	checkFragments(t, fs, mid, 576)
	r := New(Config{})
	fs = append(fs, piece(pkt, 0, 800, true), piece(pkt, 2400, 600, false))
	if d, res := feed(t, r, fs, 0); res != Complete || !bytes.Equal(d, pkt) {
		t.Fatalf("%v", res)
	}
}

func TestFragmentErrors(t *testing.T) {
	pkt := packet(1, 1000, nil)
	badOpts := packet(1, 1000, []byte{0x83, 9, 0, 0}) // length beyond the header
	shortOpt := packet(1, 1000, []byte{1, 1, 1, 0x83})
	zeroLen := packet(1, 1000, []byte{0x44, 0, 0, 0})
	farOff := piece(packet(1, 2000, nil), 0, 1000, false)
	header.IPv4(farOff).SetFragment(false, false, 65000)
	fixChecksum(farOff)
	for _, c := range []struct {
		pkt []byte
		mtu int
	}{{pkt[:100], 1500}, {pkt, 67}, {badOpts, 576}, {shortOpt, 576}, {zeroLen, 576}, {farOff, 576}} {
		if fs, err := Fragment(nil, c.pkt, c.mtu); err == nil {
			t.Errorf("%x mtu %d: %d fragments, no error", c.pkt[:24], c.mtu, len(fs))
		}
	}
}

func TestFragmentNoAllocs(t *testing.T) {
	pkt := packet(1, 9000, testOpts)
	fs, _ := Fragment(nil, pkt, 1500)
	allocs := testing.AllocsPerRun(100, func() { fs, _ = Fragment(fs, pkt, 1500) })
	if allocs != 0 {
		t.Fatalf("%v allocs", allocs)
	}
}

func BenchmarkAdd(b *testing.B) {
	r := New(Config{})
	fs, _ := Fragment(nil, packet(1, 4000, nil), 1500) // 3 fragments
	b.ReportAllocs()
	b.SetBytes(4020)
	for b.Loop() {
		for _, f := range fs {
			r.Add(f, 0)
		}
	}
}

// BenchmarkAddBusy adds to a reassembler holding 63 incomplete datagrams:
// the lookup scans all of them.
func BenchmarkAddBusy(b *testing.B) {
	r := New(Config{})
	for id := range 63 {
		r.Add(piece(packet(uint16(id+100), 64, nil), 0, 8, true), 0)
	}
	fs, _ := Fragment(nil, packet(1, 4000, nil), 1500)
	b.ReportAllocs()
	b.SetBytes(4020)
	for b.Loop() {
		for _, f := range fs {
			r.Add(f, 0)
		}
	}
}

func BenchmarkFragment(b *testing.B) {
	pkt := packet(1, 9000, nil)
	fs, _ := Fragment(nil, pkt, 1500)
	b.ReportAllocs()
	b.SetBytes(int64(len(pkt)))
	for b.Loop() {
		fs, _ = Fragment(fs, pkt, 1500)
	}
}
