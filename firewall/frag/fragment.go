package frag

import (
	"errors"
	"fmt"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/header"
)

// MinMTU is the smallest MTU every IPv4 link must carry (RFC 791): a
// 60-byte header and 8 bytes of data.
const MinMTU = 68

// Errors of Fragment.
var (
	ErrInvalid    = errors.New("invalid IPv4 packet")
	ErrMTU        = errors.New("MTU below 68")
	ErrOptions    = errors.New("malformed IPv4 options")
	ErrOffsetSize = errors.New("fragment offset beyond 65535")
)

// Fragment splits the IPv4 packet pkt into fragments of at most mtu bytes
// (RFC 791 §3.2) and returns them. It ignores DF — the caller decides —
// and keeps it in every fragment. The first fragment carries all of pkt's
// options; later ones only those with the copied flag, packed and padded
// with end-of-list to a multiple of 4. Offsets are multiples of 8; MF is
// set on all but the last, which keeps pkt's own MF, so a fragment can be
// fragmented again. A packet that already fits is returned as one copy.
//
// The fragments are written into the buffers of dst[:cap(dst)] that are
// large enough — passing the previous result back makes Fragment
// allocation-free — and into new buffers otherwise.
func Fragment(dst [][]byte, pkt []byte, mtu int) ([][]byte, error) {
	ip := header.IPv4(pkt)
	if !ip.IsValid() {
		return dst[:0], fmt.Errorf("fragment: %w", ErrInvalid)
	}
	if mtu < MinMTU {
		return dst[:0], fmt.Errorf("fragment to %d: %w", mtu, ErrMTU)
	}
	hl, tl := ip.HeaderLen(), int(ip.TotalLen())
	reuse := dst[:cap(dst)]
	out := dst[:0]
	if tl <= mtu {
		b := buffer(reuse, 0, tl)
		copy(b, pkt)
		return append(out, b), nil
	}

	// Options copied into later fragments.
	var copied [header.IPv4MaxLen - header.IPv4MinLen]byte
	nc := 0
	opts := ip.Options()
	for j := 0; j < len(opts); {
		t := opts[j]
		if t == 0 { // end of list
			break
		}
		if t == 1 { // no-operation: not copied
			j++
			continue
		}
		if j+1 >= len(opts) || opts[j+1] < 2 || j+int(opts[j+1]) > len(opts) {
			return out, fmt.Errorf("fragment: option %d at %d: %w", t, j, ErrOptions)
		}
		l := int(opts[j+1])
		if t&0x80 != 0 {
			nc += copy(copied[nc:], opts[j:j+l])
		}
		j += l
	}
	hn := header.IPv4MinLen + (nc+3)&^3

	data := pkt[hl:tl]
	base := ip.FragOffset()
	if base+len(data) > 0xffff {
		return out, fmt.Errorf("fragment at offset %d with %d bytes: %w", base, len(data), ErrOffsetSize)
	}
	df, lastMF := ip.DontFragment(), ip.MoreFragments()
	for pos := 0; pos < len(data); {
		h := hn
		if pos == 0 {
			h = hl
		}
		n := min((mtu-h)&^7, len(data)-pos) // >= 8: h <= 60, mtu >= 68
		b := buffer(reuse, len(out), h+n)
		if pos == 0 {
			copy(b, pkt[:hl])
		} else {
			copy(b, pkt[:header.IPv4MinLen])
			copy(b[header.IPv4MinLen:], copied[:hn-header.IPv4MinLen])
			b[0] = 0x40 | byte(hn/4)
		}
		copy(b[h:], data[pos:pos+n])
		f := header.IPv4(b)
		f.SetTotalLen(uint16(h + n))
		f.SetFragment(df, pos+n < len(data) || lastMF, base+pos)
		f.SetChecksum(0)
		f.SetChecksum(f.CalculateChecksum())
		out = append(out, b)
		pos += n
	}
	return out, nil
}

// buffer returns reuse[i] resized to n bytes if it has the capacity, else
// a new buffer.
func buffer(reuse [][]byte, i, n int) []byte {
	if i < len(reuse) && cap(reuse[i]) >= n {
		return reuse[i][:n]
	}
	return make([]byte, n)
}
