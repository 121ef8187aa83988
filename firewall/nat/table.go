package nat

import (
	crand "crypto/rand"
	"errors"
	"math/rand/v2"
	"time"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/header"
)

// Errors that refuse a new flow; the dispatcher counts a drop.
var (
	ErrTableFull      = errors.New("nat: table full")
	ErrPortsExhausted = errors.New("nat: no free port on the uplink address")
	ErrUnsupported    = errors.New("nat: packet is not a TCP/UDP packet or ICMP query request")
	ErrClientQuota    = errors.New("nat: the client holds its share of the table")
)

const (
	// DefaultMaxEntries applies when Config.MaxEntries is not positive.
	DefaultMaxEntries = 65536
	// maxUplinks bounds the uplink addresses with live entries at once (the
	// current one, and old ones until the dispatcher flushes them).
	maxUplinks = 8
	// expireBatch bounds the slots one Expire call examines.
	expireBatch = 4096
	// evictScan is how many entries from the LRU end of each list eviction
	// examines for an expired one before evicting a live one.
	evictScan = 8
	// portEvictScan is how many unassured entries from the LRU end Create
	// examines for one to take the port of when no port is free.
	portEvictScan = 64
	// clientScan is how many entries from the LRU end of each list Create
	// examines for one of a client at its quota to make room.
	clientScan = 256
	// sweepInterval rate-limits the full expiry sweep Create runs when no
	// port is free, so that a flood of refused flows costs O(1) each.
	sweepInterval = int64(time.Second)
)

// LRU lists: an entry is on the unassured list until a reply is seen.
const (
	listUnassured = iota
	listAssured
)

// Config sets up a Table.
type Config struct {
	MaxEntries int // bound on live entries; <= 0 means DefaultMaxEntries
	// ClientMax bounds one client's entries while other clients have
	// entries (alone, a client may fill the table); <= 0 means half of
	// MaxEntries.
	ClientMax        int
	PortMin, PortMax uint16 // ports (and ICMP identifiers) handed out; 0 means 1024 and 65535
	Timeouts         Timeouts
	Rand             func() uint32 // port choice; nil = a ChaCha8 generator seeded from crypto/rand
}

// Stats counts table events since New.
type Stats struct {
	Created   uint64 // entries created
	Evicted   uint64 // live entries evicted to make room
	Expired   uint64 // entries removed after their timeout
	Flushed   uint64 // entries removed by Flush*
	Exhausted uint64 // new flows refused: no free port
	Full      uint64 // new flows refused: nothing to evict
	Quota     uint64 // new flows refused: the client is at ClientMax and none of its entries could go
}

// Table is the NAT table: a fixed slab of entries with a free list, two
// intrusive LRU lists (unassured, assured) threaded through it by index, an
// open-addressing index from client tuples to slab indexes (outIndex)
// created at full capacity, and per uplink address an array indexed by
// (protocol, port) for the way back (NAT ports are unique per protocol and
// address: no hashing inbound), so that lookups, translation and entry
// creation never allocate, however long flows churn.
//
// Memory (measured, amd64, Go 1.26): the slab is 48 bytes per entry; with
// the index (8 bytes per slot, two slots per entry) a table of 65536
// entries takes 64 bytes per entry (4.0 MiB, TestMemoryPerEntry). Add
// 792 KiB per uplink address (the port bits and the inbound index of three
// protocols) and 24 KiB for reserved ports.
//
// A Table is not safe for concurrent use.
type Table struct {
	slab    []Entry
	free    int32 // head of the free list, -1 = none
	n       int
	head    [2]int32 // most recently used entry of each list
	tail    [2]int32 // least recently used
	out     outIndex // client tuple -> index
	uplinks []*uplinkPorts
	// perClient counts the entries of each client address (the map holds
	// only clients with entries); clientMax is Config.ClientMax.
	perClient map[[4]byte]int
	clientMax int
	// reserved ports are the firewall's own (its DNS client): never handed
	// out, and inbound packets to them are not NAT's.
	reserved  [nProto]portMap
	portMin   uint16
	portMax   uint16
	timeouts  Timeouts
	rand      func() uint32
	cursor    int   // next slot Expire examines
	lastSweep int64 // when Create last swept the whole slab
	stats     Stats
}

// New returns an empty table with all its memory allocated.
func New(cfg Config) *Table {
	n := cfg.MaxEntries
	if n <= 0 {
		n = DefaultMaxEntries
	}
	t := &Table{
		slab:      make([]Entry, n),
		uplinks:   make([]*uplinkPorts, 0, maxUplinks),
		perClient: make(map[[4]byte]int),
		clientMax: cfg.ClientMax,
		head:      [2]int32{-1, -1},
		tail:      [2]int32{-1, -1},
		portMin:   cfg.PortMin,
		portMax:   cfg.PortMax,
		timeouts:  cfg.Timeouts.withDefaults(),
		rand:      cfg.Rand,
		lastSweep: -sweepInterval << 1,
	}
	if t.clientMax <= 0 {
		t.clientMax = max(n/2, 1)
	}
	if t.portMin == 0 {
		t.portMin = 1024
	}
	if t.portMax == 0 {
		t.portMax = 65535
	}
	if t.portMax < t.portMin {
		t.portMax = t.portMin
	}
	if t.rand == nil {
		var seed [32]byte
		crand.Read(seed[:]) // never fails (Go 1.24+); it crashes the program instead
		t.rand = rand.New(rand.NewChaCha8(seed)).Uint32
	}
	for i := range t.slab {
		t.slab[i].idx, t.slab[i].nextLRU = int32(i), int32(i+1)
	}
	t.slab[n-1].nextLRU = -1
	t.out = newOutIndex(n, t.rand)
	return t
}

// Len is the number of entries in the table, including expired ones not
// yet removed.
func (t *Table) Len() int     { return t.n }
func (t *Table) Stats() Stats { return t.stats }

func protoIndex(proto uint8) int {
	switch proto {
	case header.ProtoTCP:
		return pTCP
	case header.ProtoUDP:
		return pUDP
	}
	return pICMP
}

// clientTuple is the key of a packet from a client, if NAT handles it.
func clientTuple(p *header.Parsed) (Tuple, bool) {
	if p.Kind != header.KindIPv4 || p.Fragment {
		return Tuple{}, false
	}
	switch p.Proto {
	case header.ProtoTCP, header.ProtoUDP:
		return Tuple{Proto: p.Proto, Src: p.Src, Dst: p.Dst, SrcPort: p.SrcPort, DstPort: p.DstPort}, true
	case header.ProtoICMP:
		if header.ICMPIsRequest(p.ICMPType) {
			return Tuple{Proto: p.Proto, Src: p.Src, Dst: p.Dst, SrcPort: p.ICMPIdent}, true
		}
	}
	return Tuple{}, false
}

// getOut returns the live entry whose client tuple is k.
func (t *Table) getOut(k Tuple, now int64) *Entry {
	i := t.out.find(k, t.slab)
	if i < 0 {
		return nil
	}
	return t.live(i, now)
}

// live returns entry i, or nil after removing it if it has expired.
func (t *Table) live(i int32, now int64) *Entry {
	if t.slab[i].expires <= now {
		t.remove(i)
		t.stats.Expired++
		return nil
	}
	return &t.slab[i]
}

// LookupOut finds the entry of a packet from a client, or nil.
func (t *Table) LookupOut(p *header.Parsed, now int64) *Entry {
	k, ok := clientTuple(p)
	if !ok {
		return nil
	}
	return t.getOut(k, now)
}

// LookupIn finds the entry of a packet from the uplink, or nil: a TCP/UDP
// packet to our port from the flow's remote, or an ICMP query reply.
// Packets to a reserved port are not NAT's.
func (t *Table) LookupIn(p *header.Parsed, now int64) *Entry {
	if p.Kind != header.KindIPv4 || p.Fragment {
		return nil
	}
	k := Tuple{Proto: p.Proto, Src: p.Dst, Dst: p.Src}
	switch p.Proto {
	case header.ProtoTCP, header.ProtoUDP:
		k.SrcPort, k.DstPort = p.DstPort, p.SrcPort
	case header.ProtoICMP:
		if !header.ICMPIsQuery(p.ICMPType) || header.ICMPIsRequest(p.ICMPType) {
			return nil
		}
		k.SrcPort = p.ICMPIdent
	default:
		return nil
	}
	if t.reserved[protoIndex(p.Proto)].has(k.SrcPort) {
		return nil
	}
	return t.getIn(k, now)
}

// getIn returns the live entry whose OutsideTuple is k, removing it if it
// has expired: the port indexes the uplink address's flow table, and the
// entry must name k's remote end.
func (t *Table) getIn(k Tuple, now int64) *Entry {
	for _, u := range t.uplinks {
		if u.ip != k.Src || u.n == 0 {
			continue
		}
		i := u.flow[protoIndex(k.Proto)][k.SrcPort] - 1
		if i < 0 {
			return nil
		}
		if e := &t.slab[i]; e.ct.Proto != k.Proto || e.ct.Dst != k.Dst || e.ct.DstPort != k.DstPort {
			return nil
		}
		return t.live(i, now)
	}
	return nil
}

// Create adds an entry for a packet from a client that the rules accepted,
// masqueraded to uplinkIP with a random free port (or ICMP identifier).
// If the flow already has a live entry, that entry is returned. When the
// table is full one entry is evicted: an expired one among the least
// recently used, else the least recently used unassured entry (no reply
// seen: what a flood of new flows creates), else the least recently used
// assured one — so a flood cannot push out answered flows while unanswered
// ones exist (the policy of Linux conntrack's early_drop).
//
// When no port is free for the protocol on uplinkIP, expired entries are
// reclaimed (a full sweep, at most once a second), else the port of the
// least recently used unassured entry of that protocol and address is
// taken over, if one is among the portEvictScan least recently used
// unassured entries; failing that the flow is refused with
// ErrPortsExhausted. Create's work is bounded in every case.
func (t *Table) Create(p *header.Parsed, uplinkIP [4]byte, now int64) (*Entry, error) {
	k, ok := clientTuple(p)
	if !ok {
		return nil, ErrUnsupported
	}
	if e := t.getOut(k, now); e != nil {
		return e, nil
	}
	if held := t.perClient[k.Src]; held >= t.clientMax && held < t.n {
		// At its share while others have flows: the client makes room
		// among its own entries, or the flow is refused. Its flows, not
		// other clients', pay for the flows it creates.
		if !t.evictClient(k.Src, now) {
			t.stats.Quota++
			return nil, ErrClientQuota
		}
	}
	slot := t.uplinkSlot(uplinkIP)
	if slot < 0 {
		t.stats.Exhausted++
		return nil, ErrPortsExhausted
	}
	pi := protoIndex(k.Proto)
	up := t.uplinks[slot]
	port, ok := pickPort(t.rand, t.portMin, t.portMax, &up.used[pi], &t.reserved[pi])
	if !ok && now-t.lastSweep >= sweepInterval {
		// Expired entries may still hold ports; reclaim them once and retry.
		t.lastSweep = now
		t.sweep(now, len(t.slab))
		port, ok = pickPort(t.rand, t.portMin, t.portMax, &up.used[pi], &t.reserved[pi])
	}
	if !ok {
		// As with a full table, a flood of unanswered flows must not lock
		// out new ones: take the port of the least recently used
		// unassured entry of this protocol and address, if one is near
		// the LRU end.
		i := t.tail[listUnassured]
		for n := 0; n < portEvictScan && i >= 0; n++ {
			if e := &t.slab[i]; int(e.slot) == slot && e.ct.Proto == k.Proto {
				port, ok = e.natPort, true
				t.remove(i)
				t.stats.Evicted++
				break
			}
			i = t.slab[i].prevLRU
		}
	}
	if !ok {
		t.stats.Exhausted++
		return nil, ErrPortsExhausted
	}
	if t.free < 0 && !t.evict(now) {
		t.stats.Full++
		return nil, ErrTableFull
	}
	i := t.free
	e := &t.slab[i]
	t.free = e.nextLRU
	*e = Entry{ct: k, natPort: port, uplink: uplinkIP, flags: flagLive, slot: uint8(slot), idx: i, tick: lruTick(now)}
	if k.Proto == header.ProtoTCP {
		e.state = TCPSynSent
	}
	e.track(p, true)
	e.expires = now + t.timeouts.of(k.Proto, e.state)
	t.pushFront(i)
	up.used[pi].set(port)
	up.n++
	t.out.insert(k, i)
	up.flow[pi][port] = i + 1
	t.perClient[k.Src]++
	t.n++
	t.stats.Created++
	return e, nil
}

// uplinkSlot returns the index of ip's port map, claiming a free one if
// needed, or -1 if maxUplinks addresses are in use.
func (t *Table) uplinkSlot(ip [4]byte) int {
	free := -1
	for i, u := range t.uplinks {
		if u.ip == ip {
			return i
		}
		if u.n == 0 && free < 0 {
			free = i
		}
	}
	if free >= 0 {
		t.uplinks[free].ip = ip
		return free
	}
	if len(t.uplinks) == maxUplinks {
		return -1
	}
	t.uplinks = append(t.uplinks, newUplinkPorts(ip))
	return len(t.uplinks) - 1
}

// TranslateOut rewrites a client's packet to leave from uplinkIP:natport,
// advances the entry's state and refreshes its timeout. The TTL is the
// caller's business.
func (t *Table) TranslateOut(e *Entry, frame []byte, p *header.Parsed, mode header.CsumMode, now int64) {
	p.RewriteSrc(frame, e.uplink, e.natPort, mode)
	t.refresh(e, p, true, now)
}

// TranslateIn rewrites a packet from the uplink back to the client's
// address and port, advances the entry's state and refreshes its timeout.
func (t *Table) TranslateIn(e *Entry, frame []byte, p *header.Parsed, mode header.CsumMode, now int64) {
	p.RewriteDst(frame, e.ct.Src, e.ct.SrcPort, mode)
	t.refresh(e, p, false, now)
}

// lruTick is the LRU lists' clock: 2^30 ns, about a second. A packet moves
// its flow to the front of its list only when the flow was last moved in
// an earlier tick or changes lists (a first reply), so that a stream of
// packets costs no list surgery (three cache lines of neighbours) per
// packet; eviction order is then exact to about a second, which is all it
// needs. (The 8-bit tick wraps every 4.6 minutes: a flow idle exactly that
// long skips one move.)
func lruTick(now int64) uint8 { return uint8(now >> 30) }

func (t *Table) refresh(e *Entry, p *header.Parsed, out bool, now int64) {
	old := e.list()
	e.track(p, out)
	e.expires = now + t.timeouts.of(e.ct.Proto, e.state)
	if tick := lruTick(now); e.tick != tick || e.list() != old {
		t.unlinkFrom(e.idx, old)
		e.tick = tick
		t.pushFront(e.idx)
	}
}

// Expire removes expired entries among the next expireBatch slots of the
// slab (round robin), so one call costs O(expireBatch) whatever the table
// size: a table of 65536 entries is swept in 16 calls. Expired entries are
// invisible to lookups and first to go on eviction before that.
func (t *Table) Expire(now int64) int { return t.sweep(now, expireBatch) }

func (t *Table) sweep(now int64, budget int) int {
	budget = min(budget, len(t.slab))
	removed := 0
	for range budget {
		if t.cursor >= len(t.slab) {
			t.cursor = 0
		}
		e := &t.slab[t.cursor]
		if e.flags&flagLive != 0 && e.expires <= now {
			t.remove(int32(t.cursor))
			removed++
		}
		t.cursor++
	}
	t.stats.Expired += uint64(removed)
	return removed
}

// evict frees one entry by the policy documented on Create.
func (t *Table) evict(now int64) bool {
	for l := range t.tail {
		i := t.tail[l]
		for range evictScan {
			if i < 0 {
				break
			}
			if t.slab[i].expires <= now {
				t.remove(i)
				t.stats.Expired++
				return true
			}
			i = t.slab[i].prevLRU
		}
	}
	for l := range t.tail {
		if i := t.tail[l]; i >= 0 {
			t.remove(i)
			t.stats.Evicted++
			return true
		}
	}
	return false
}

// evictClient removes one entry of the client with address src: an
// expired one, else its least recently used unassured one, else its least
// recently used assured one, among the clientScan entries at the LRU end
// of each list. It reports whether it removed one.
func (t *Table) evictClient(src [4]byte, now int64) bool {
	found := int32(-1)
	for l := range t.tail {
		i := t.tail[l]
		for range clientScan {
			if i < 0 {
				break
			}
			if e := &t.slab[i]; e.ct.Src == src {
				if e.expires <= now {
					t.remove(i)
					t.stats.Expired++
					return true
				}
				if found < 0 {
					found = i
				}
			}
			i = t.slab[i].prevLRU
		}
	}
	if found < 0 {
		return false
	}
	t.remove(found)
	t.stats.Evicted++
	return true
}

// ClientEntries is the number of entries of the client with address ip.
func (t *Table) ClientEntries(ip [4]byte) int { return t.perClient[ip] }

// FlushClient removes every entry of the client with address ip.
func (t *Table) FlushClient(ip [4]byte) int {
	return t.FlushIf(func(e *Entry) bool { return e.ct.Src == ip })
}

// FlushUplink removes every entry masqueraded to ip (after a netvm change).
func (t *Table) FlushUplink(ip [4]byte) int {
	return t.FlushIf(func(e *Entry) bool { return e.uplink == ip })
}

// FlushIf removes every entry for which drop returns true (after a rules
// reload: the flows the new rules deny). It costs O(MaxEntries).
func (t *Table) FlushIf(drop func(*Entry) bool) int {
	removed := 0
	for i := range t.slab {
		if e := &t.slab[i]; e.flags&flagLive != 0 && drop(e) {
			t.remove(int32(i))
			removed++
		}
	}
	t.stats.Flushed += uint64(removed)
	return removed
}

// remove frees live entry i.
func (t *Table) remove(i int32) {
	e := &t.slab[i]
	t.out.remove(e.ct, i)
	if c := t.perClient[e.ct.Src]; c > 1 {
		t.perClient[e.ct.Src] = c - 1
	} else {
		delete(t.perClient, e.ct.Src)
	}
	t.unlink(i)
	up := t.uplinks[e.slot]
	up.used[protoIndex(e.ct.Proto)].clear(e.natPort)
	up.flow[protoIndex(e.ct.Proto)][e.natPort] = 0
	up.n--
	*e = Entry{idx: i, nextLRU: t.free}
	t.free = i
	t.n--
}

func (e *Entry) list() int {
	if e.flags&flagAssured != 0 {
		return listAssured
	}
	return listUnassured
}

func (t *Table) pushFront(i int32) {
	e := &t.slab[i]
	l := e.list()
	e.prevLRU, e.nextLRU = -1, t.head[l]
	if t.head[l] >= 0 {
		t.slab[t.head[l]].prevLRU = i
	} else {
		t.tail[l] = i
	}
	t.head[l] = i
}

func (t *Table) unlink(i int32) { t.unlinkFrom(i, t.slab[i].list()) }

// unlinkFrom takes entry i out of LRU list l.
func (t *Table) unlinkFrom(i int32, l int) {
	e := &t.slab[i]
	if e.prevLRU >= 0 {
		t.slab[e.prevLRU].nextLRU = e.nextLRU
	} else {
		t.head[l] = e.nextLRU
	}
	if e.nextLRU >= 0 {
		t.slab[e.nextLRU].prevLRU = e.prevLRU
	} else {
		t.tail[l] = e.prevLRU
	}
	e.prevLRU, e.nextLRU = -1, -1
}

// ReservePort takes a random port of proto out of NAT's hands (for the
// firewall's own DNS client): it is free on every uplink address, NAT will
// not hand it out until ReleasePort, and inbound packets to it are not
// NAT's.
func (t *Table) ReservePort(proto uint8) (uint16, error) {
	pi := protoIndex(proto)
	var inUse portMap
	for _, u := range t.uplinks {
		for w := range inUse {
			inUse[w] |= u.used[pi][w]
		}
	}
	port, ok := pickPort(t.rand, t.portMin, t.portMax, &inUse, &t.reserved[pi])
	if !ok {
		return 0, ErrPortsExhausted
	}
	t.reserved[pi].set(port)
	return port, nil
}

// ReleasePort returns a port taken by ReservePort.
func (t *Table) ReleasePort(proto uint8, port uint16) {
	t.reserved[protoIndex(proto)].clear(port)
}
