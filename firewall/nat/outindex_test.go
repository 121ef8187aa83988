package nat

import (
	"math/rand/v2"
	"testing"
)

// The index against a map, through random inserts and removes in a small
// index whose probe runs wrap around its end and merge: after every step
// each live key is found at its entry, every removed one is not, and no
// probe run has a hole before one of its keys.
func TestOutIndexAgainstMap(t *testing.T) {
	for _, seed := range []uint64{1, 2, 3, 4} {
		r := rand.New(rand.NewPCG(seed, 0))
		const n = 64 // 128 slots
		slab := make([]Entry, n)
		x := newOutIndex(n, r.Uint32)
		if len(x.slots) != 128 {
			t.Fatalf("%d slots for %d entries, want 128", len(x.slots), n)
		}
		want := map[Tuple]int32{}
		free := make([]int32, n)
		for i := range free {
			free[i] = int32(i)
		}
		// Few distinct tuples, so that removed keys come back.
		key := func() Tuple {
			return Tuple{Proto: 6 + uint8(r.IntN(2))*11, Src: [4]byte{10, 137, 0, byte(r.IntN(3))},
				Dst: [4]byte{192, 0, 2, byte(r.IntN(4))}, SrcPort: uint16(r.IntN(8)), DstPort: 443}
		}
		for step := range 20000 {
			k := key()
			if i, ok := want[k]; ok {
				x.remove(k, i)
				delete(want, k)
				slab[i] = Entry{}
				free = append(free, i)
			} else if len(free) > 0 {
				i := free[len(free)-1]
				free = free[:len(free)-1]
				slab[i].ct = k
				x.insert(k, i)
				want[k] = i
			}
			if x.n != len(want) {
				t.Fatalf("seed %d step %d: n = %d, want %d", seed, step, x.n, len(want))
			}
			for k, i := range want {
				if got := x.find(k, slab); got != i {
					t.Fatalf("seed %d step %d: find(%v) = %d, want %d", seed, step, k, got, i)
				}
			}
			if got := x.find(key(), slab); got >= 0 && slab[got].ct != (Tuple{}) {
				if _, ok := want[slab[got].ct]; !ok {
					t.Fatalf("seed %d step %d: found removed key %v", seed, step, slab[got].ct)
				}
			}
		}
	}
}

// Removing a key the index does not hold changes nothing.
func TestOutIndexRemoveAbsent(t *testing.T) {
	slab := make([]Entry, 4)
	x := newOutIndex(4, rand.New(rand.NewPCG(1, 2)).Uint32)
	k := Tuple{Proto: 17, Src: [4]byte{10, 137, 0, 1}, Dst: [4]byte{9, 9, 9, 9}, SrcPort: 1, DstPort: 53}
	slab[0].ct = k
	x.insert(k, 0)
	x.remove(Tuple{Proto: 17}, 3)
	if x.n != 1 || x.find(k, slab) != 0 {
		t.Fatalf("n = %d, find = %d after removing an absent key", x.n, x.find(k, slab))
	}
}

// With the index full to its limit, the probe runs of one client's flows
// stay short: the keyed hash spreads tuples that differ in one port.
func TestOutIndexSpreadsOneClient(t *testing.T) {
	const n = 1 << 14
	slab := make([]Entry, n)
	x := newOutIndex(n, rand.New(rand.NewPCG(7, 7)).Uint32)
	for i := range int32(n) {
		k := Tuple{Proto: 6, Src: [4]byte{10, 137, 0, 5}, Dst: [4]byte{192, 0, 2, 1}, SrcPort: uint16(i), DstPort: 443}
		slab[i].ct = k
		x.insert(k, i)
	}
	longest, run := 0, 0
	for _, s := range x.slots {
		if s.idx == 0 {
			run = 0
			continue
		}
		run++
		longest = max(longest, run)
	}
	// At load 1/2 linear probing's longest run is O(log n): about 30 for
	// 2^15 slots. A hash that lined the ports up would give thousands.
	if longest > 200 {
		t.Errorf("longest probe run %d slots for %d sequential ports", longest, n)
	}
}
