// Package frag reassembles IPv4 fragments (RFC 791 §3.2, RFC 815) in
// bounded memory and splits packets into fragments that fit an MTU.
//
// The firewall filters and translates only whole datagrams: a link's
// dispatcher hands every fragment to its Reassembler and processes the
// datagram that comes out, never a fragment on its own. That is why this
// package does not reject tiny first fragments (RFC 1858 §3.1): the rules
// see the complete transport header of the reassembled datagram, and a
// datagram whose transport header is still truncated is invalid when the
// dispatcher decodes it. The overlapping-fragment attack (RFC 1858 §3.2)
// cannot rewrite a header already inspected either, because any overlap
// drops the whole datagram (as RFC 5722 requires for IPv6), even an exact
// duplicate.
//
// Memory: fragment data is kept in 512-byte blocks placed by offset, so a
// datagram in progress costs its blocks plus a fixed record (dgramCost),
// all counted against Config.MaxBytes. A tiny fragment is charged a whole
// block; it pins no more than it is charged for, and what it is charged
// evicts the oldest datagrams, never grows memory. Blocks and records are
// allocated on first use and then recycled, so a link that never sees a
// fragment costs nothing and a busy one stops allocating once warm.
package frag

import (
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/header"
)

// Defaults for zero Config fields.
const (
	DefaultMaxBytes     = 256 << 10
	DefaultMaxDatagrams = 64
	// DefaultTimeout is Linux's net.ipv4.ipfrag_time (30 s); RFC 791
	// suggests 15 s as the initial timer but lets fragments' TTLs raise
	// it. Losing a fragment loses the datagram either way; the memory
	// bound, not the timeout, protects the VM.
	DefaultTimeout = 30e9
)

const (
	blockSize = 512 // bytes; one uint64 coverage mask of 8-byte units each
	// maxData is the most data a datagram can carry: 65535 minus the
	// shortest header. Fragments ending beyond it can never complete.
	maxData   = 0xffff - header.IPv4MinLen
	maxBlocks = (maxData + blockSize - 1) / blockSize
	// dgramCost is what a datagram in progress is charged besides its
	// blocks: at least the size of its dgram record (asserted in tests).
	dgramCost = 384
	// maxTotalBlocks keeps block indexes within uint16.
	maxTotalBlocks = 0xffff
	maxDatagrams   = 1024 // lookup is a linear scan
)

// Config bounds a Reassembler. Zero fields take the defaults above.
type Config struct {
	MaxBytes     int   // bytes buffered across all datagrams in progress, records included
	MaxDatagrams int   // datagrams in progress at once (at most 1024)
	Timeout      int64 // ns from a datagram's first fragment until it is dropped
}

// Result says what Add did with a fragment.
type Result uint8

const (
	Pending      Result = iota // stored; the datagram is not complete yet
	Complete                   // the datagram is complete and returned
	DropInvalid                // malformed fragment or inconsistent lengths: datagram dropped
	DropOverlap                // fragment overlaps data already held: datagram dropped
	DropOversize               // datagram would exceed 65535 bytes: datagram dropped
	DropLimit                  // no room within MaxBytes even after evicting the others
)

var resultNames = [...]string{"pending", "complete", "invalid", "overlap", "oversize", "limit"}

func (r Result) String() string {
	if int(r) < len(resultNames) {
		return resultNames[r]
	}
	return "unknown"
}

// Stats counts what a Reassembler did. Bytes never exceeds Config.MaxBytes.
type Stats struct {
	Datagrams int // in progress now
	Bytes     int // charged now: blocks plus per-datagram records
	PeakBytes int // highest Bytes so far

	Fragments uint64 // Add calls
	Complete  uint64 // datagrams reassembled
	Invalid   uint64 // Add results by kind of drop
	Overlap   uint64
	Oversize  uint64
	Limit     uint64
	Evicted   uint64 // datagrams dropped, oldest first, to make room for another
	Expired   uint64 // datagrams dropped by the timeout
}

// key identifies a datagram (RFC 791: source, destination, protocol, ID).
type key struct {
	src, dst [4]byte
	proto    uint8
	id       uint16
}

// dgram is a datagram in progress. Its data lives in blocks: table[i]
// holds 1 + the index of the block with data bytes [i*512, (i+1)*512).
type dgram struct {
	key        key
	used       bool
	hdrLen     uint8 // header of the offset-0 fragment; 0 until it arrives
	prev, next int16 // age list, oldest first; -1 ends it
	created    int64
	lastEnd    int32 // end of the data, known from the MF=0 fragment; -1 until then
	maxEnd     int32 // highest fragment end seen
	units      int32 // 8-byte units received
	nblocks    int32
	hdr        [header.IPv4MaxLen]byte
	table      [maxBlocks]uint16
}

// Reassembler reassembles the fragments of one link. It is not safe for
// concurrent use.
type Reassembler struct {
	cfg   Config
	slots []dgram // grows to cfg.MaxDatagrams
	head  int     // oldest datagram, -1 if none
	tail  int     // newest

	blocks    [][]byte // grows to the most MaxBytes allows
	mask      []uint64 // per block: which of its 64 8-byte units hold data
	free      []uint16 // unused blocks
	maxBlocks int

	out   []byte // the last completed datagram
	stats Stats
}

// New returns a Reassembler bounded by cfg.
func New(cfg Config) *Reassembler {
	if cfg.MaxBytes <= 0 {
		cfg.MaxBytes = DefaultMaxBytes
	}
	if cfg.MaxDatagrams <= 0 {
		cfg.MaxDatagrams = DefaultMaxDatagrams
	}
	cfg.MaxDatagrams = min(cfg.MaxDatagrams, maxDatagrams)
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	return &Reassembler{
		cfg:       cfg,
		head:      -1,
		tail:      -1,
		maxBlocks: min(cfg.MaxBytes/blockSize, maxTotalBlocks),
	}
}

// Stats returns the counters.
func (r *Reassembler) Stats() Stats { return r.stats }

// Expire drops the datagrams whose first fragment arrived more than
// Timeout before now, and returns how many.
func (r *Reassembler) Expire(now int64) int {
	n := 0
	for r.head >= 0 && now-r.slots[r.head].created > r.cfg.Timeout {
		r.release(r.head)
		r.stats.Expired++
		n++
	}
	return n
}

// Add takes one fragment: pkt is an IPv4 packet with MF set or a non-zero
// offset, received at now (monotonic ns). A packet that is not a valid
// fragment, including one with a bad header checksum (the reassembled
// header gets a fresh one, which must not launder corruption), is
// DropInvalid.
//
// When the fragment completes its datagram, Add returns it with result
// Complete: the header of the offset-0 fragment, options included, with MF
// cleared, offset 0, total length and checksum set, followed by the data.
// The headers of the other fragments (TTL, TOS, options) are ignored.
// The slice belongs to the Reassembler and is valid until the next Add.
// Any drop discards everything held for the datagram; later fragments of
// it start afresh.
func (r *Reassembler) Add(pkt []byte, now int64) ([]byte, Result) {
	r.stats.Fragments++
	r.Expire(now)
	ip := header.IPv4(pkt)
	if !ip.IsValid() || !ip.IsFragment() || !ip.ChecksumValid() {
		return r.drop(-1, DropInvalid)
	}
	hl := ip.HeaderLen()
	data := pkt[hl:ip.TotalLen()]
	off := ip.FragOffset()
	end := off + len(data)
	mf := ip.MoreFragments()
	k := key{ip.Src(), ip.Dst(), ip.Protocol(), ip.ID()}
	i := r.lookup(k)

	switch {
	case len(data) == 0, mf && len(data)%8 != 0:
		return r.drop(i, DropInvalid)
	case end > maxData:
		return r.drop(i, DropOversize)
	}
	if i < 0 {
		if i = r.create(k, now); i < 0 {
			return r.drop(-1, DropLimit)
		}
	}
	d := &r.slots[i]

	// Coverage is tracked in 8-byte units: every fragment starts on a unit
	// boundary and only the last may end inside one, so two fragments
	// share a unit exactly when they share a byte.
	u0, u1 := off/8, (end+7)/8
	need := 0
	for b := u0 / 64; b <= (u1-1)/64; b++ {
		t := d.table[b]
		if t == 0 {
			need++
		} else if r.mask[t-1]&unitMask(u0, u1, b) != 0 {
			return r.drop(i, DropOverlap)
		}
	}

	switch {
	case !mf && (d.lastEnd >= 0 || int(d.maxEnd) > end):
		// A second last fragment, or data beyond this one's end.
		return r.drop(i, DropInvalid)
	case mf && d.lastEnd >= 0 && end > int(d.lastEnd):
		return r.drop(i, DropInvalid)
	case off == 0 && hl+max(end, int(d.maxEnd)) > 0xffff,
		d.hdrLen > 0 && int(d.hdrLen)+end > 0xffff:
		return r.drop(i, DropOversize)
	}

	if !r.reserve(i, need*blockSize) {
		return r.drop(i, DropLimit)
	}
	for b := u0 / 64; b <= (u1-1)/64; b++ {
		if d.table[b] == 0 {
			d.table[b] = r.allocBlock() + 1
			d.nblocks++
		}
		t := d.table[b] - 1
		r.mask[t] |= unitMask(u0, u1, b)
		lo, hi := max(off, b*blockSize), min(end, (b+1)*blockSize)
		copy(r.blocks[t][lo-b*blockSize:], data[lo-off:hi-off])
	}
	d.units += int32(u1 - u0)
	d.maxEnd = int32(max(end, int(d.maxEnd)))
	if !mf {
		d.lastEnd = int32(end)
	}
	if off == 0 {
		d.hdrLen = uint8(hl)
		copy(d.hdr[:], pkt[:hl])
	}
	if d.hdrLen == 0 || d.lastEnd < 0 || int(d.units) != (int(d.lastEnd)+7)/8 {
		return nil, Pending
	}
	return r.assemble(i), Complete
}

// unitMask returns the bits of block b's mask covering units [u0, u1).
func unitMask(u0, u1, b int) uint64 {
	lo, hi := max(u0-b*64, 0), min(u1-b*64, 64)
	if hi-lo == 64 {
		return ^uint64(0)
	}
	return (1<<(hi-lo) - 1) << lo
}

// assemble copies datagram i into r.out, fixes its header and releases i.
func (r *Reassembler) assemble(i int) []byte {
	d := &r.slots[i]
	hl, n := int(d.hdrLen), int(d.lastEnd)
	if cap(r.out) < hl+n {
		r.out = make([]byte, hl+n)
	}
	out := r.out[:hl+n]
	copy(out, d.hdr[:hl])
	for b := 0; b*blockSize < n; b++ {
		copy(out[hl+b*blockSize:], r.blocks[d.table[b]-1][:min(blockSize, n-b*blockSize)])
	}
	ip := header.IPv4(out)
	ip.SetTotalLen(uint16(hl + n))
	ip.SetFragment(ip.DontFragment(), false, 0)
	ip.SetChecksum(0)
	ip.SetChecksum(ip.CalculateChecksum())
	r.release(i)
	r.stats.Complete++
	return out
}

// drop releases datagram i (if i >= 0) and counts res.
func (r *Reassembler) drop(i int, res Result) ([]byte, Result) {
	if i >= 0 {
		r.release(i)
	}
	switch res {
	case DropInvalid:
		r.stats.Invalid++
	case DropOverlap:
		r.stats.Overlap++
	case DropOversize:
		r.stats.Oversize++
	case DropLimit:
		r.stats.Limit++
	}
	return nil, res
}

func (r *Reassembler) lookup(k key) int {
	for i := range r.slots {
		if r.slots[i].used && r.slots[i].key == k {
			return i
		}
	}
	return -1
}

// create starts a datagram for k, evicting the oldest ones if the slots or
// the bytes are exhausted. It returns its slot, or -1 if there is no room.
func (r *Reassembler) create(k key, now int64) int {
	if r.stats.Datagrams >= r.cfg.MaxDatagrams {
		r.release(r.head)
		r.stats.Evicted++
	}
	if !r.reserve(-1, dgramCost) {
		return -1
	}
	i := -1
	for j := range r.slots {
		if !r.slots[j].used {
			i = j
			break
		}
	}
	if i < 0 {
		r.slots = append(r.slots, dgram{})
		i = len(r.slots) - 1
	}
	d := &r.slots[i]
	*d = dgram{key: k, used: true, prev: int16(r.tail), next: -1, created: now, lastEnd: -1}
	if r.tail >= 0 {
		r.slots[r.tail].next = int16(i)
	} else {
		r.head = i
	}
	r.tail = i
	r.stats.Datagrams++
	r.charge(dgramCost)
	return i
}

// reserve makes room for n more bytes by evicting the oldest datagrams
// other than keep, and reports whether it succeeded. On success with
// blocks requested, enough blocks can be allocated.
func (r *Reassembler) reserve(keep, n int) bool {
	for r.stats.Bytes+n > r.cfg.MaxBytes || r.blocksInUse()+n/blockSize > r.maxBlocks {
		v := r.head
		if v >= 0 && v == keep {
			v = int(r.slots[v].next)
		}
		if v < 0 {
			return false
		}
		r.release(v)
		r.stats.Evicted++
	}
	return true
}

func (r *Reassembler) blocksInUse() int { return len(r.blocks) - len(r.free) }

func (r *Reassembler) allocBlock() uint16 {
	if n := len(r.free); n > 0 {
		b := r.free[n-1]
		r.free = r.free[:n-1]
		r.charge(blockSize)
		return b
	}
	r.blocks = append(r.blocks, make([]byte, blockSize))
	r.mask = append(r.mask, 0)
	r.charge(blockSize)
	return uint16(len(r.blocks) - 1)
}

func (r *Reassembler) charge(n int) {
	r.stats.Bytes += n
	r.stats.PeakBytes = max(r.stats.PeakBytes, r.stats.Bytes)
}

// release frees datagram i: its blocks, its record and its place in the
// age list.
func (r *Reassembler) release(i int) {
	d := &r.slots[i]
	for b, t := range d.table {
		if t != 0 {
			r.mask[t-1] = 0
			r.free = append(r.free, t-1)
			d.table[b] = 0
		}
	}
	r.stats.Bytes -= int(d.nblocks)*blockSize + dgramCost
	if d.prev >= 0 {
		r.slots[d.prev].next = d.next
	} else {
		r.head = int(d.next)
	}
	if d.next >= 0 {
		r.slots[d.next].prev = d.prev
	} else {
		r.tail = int(d.prev)
	}
	d.used = false
	r.stats.Datagrams--
}
