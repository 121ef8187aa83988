package vchan

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
)

// stream is a reproducible byte sequence: what the writer sends and the
// reader expects.
func stream(seed uint64, n int) []byte {
	b := make([]byte, n)
	rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)}).Read(b)
	return b
}

// pump writes data in random chunks.
func pump(w io.Writer, data []byte, seed uint64) error {
	r := rand.New(rand.NewPCG(seed, 1))
	for len(data) > 0 {
		n := min(len(data), 1+r.IntN(5000))
		k, err := w.Write(data[:n])
		if err != nil {
			return err
		}
		if k != n {
			return fmt.Errorf("short write %d of %d", k, n)
		}
		data = data[n:]
	}
	return nil
}

// drain reads n bytes in random chunks.
func drain(rd io.Reader, n int, seed uint64) ([]byte, error) {
	r := rand.New(rand.NewPCG(seed, 2))
	got := make([]byte, 0, n)
	for len(got) < n {
		buf := make([]byte, 1+r.IntN(3000))
		k, err := rd.Read(buf)
		got = append(got, buf[:k]...)
		if err != nil {
			return got, err
		}
	}
	return got, nil
}

// exchange streams size bytes each way at once and checks both.
func exchange(t *testing.T, client, server *Conn, size int) {
	t.Helper()
	up, down := stream(1, size), stream(2, size)
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	var gotUp, gotDown []byte
	wg.Add(4)
	go func() { defer wg.Done(); errs <- pump(client, up, 3) }()
	go func() { defer wg.Done(); errs <- pump(server, down, 4) }()
	go func() {
		defer wg.Done()
		var err error
		gotUp, err = drain(server, size, 5)
		errs <- err
	}()
	go func() {
		defer wg.Done()
		var err error
		gotDown, err = drain(client, size, 6)
		errs <- err
	}()
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(gotUp, up) {
		t.Errorf("client->server: %d bytes differ from the %d sent", len(gotUp), len(up))
	}
	if !bytes.Equal(gotDown, down) {
		t.Errorf("server->client: %d bytes differ from the %d sent", len(gotDown), len(down))
	}
}

func TestStreamBothWays(t *testing.T) {
	for _, o := range [][2]int{{10, 11}, {11, 10}, {10, 12}, {12, 11}, {12, 12}, {13, 12}} {
		t.Run(fmt.Sprintf("left%d_right%d", o[0], o[1]), func(t *testing.T) {
			client, server, err := Pipe(o[0], o[1])
			if err != nil {
				t.Fatal(err)
			}
			defer client.Close()
			defer server.Close()
			exchange(t, client, server, 2<<20)
		})
	}
}

func TestWrapAround(t *testing.T) {
	// Indexes start 256 bytes before they wrap at 2^32.
	client, server, err := pipe(12, 10, 0xffffff00, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	defer server.Close()
	exchange(t, client, server, 64<<10)
	if p := client.pg.load(offLeft + offProd); p >= 0xffffff00 {
		t.Fatalf("left prod %#x did not wrap", p)
	}
	if p := client.pg.load(offRight + offProd); p >= 0xffffff00 {
		t.Fatalf("right prod %#x did not wrap", p)
	}
}

// until spins until cond holds; the goroutine it waits for makes progress
// without us, so no timeout is needed.
func until(cond func() bool) {
	for !cond() {
		runtime.Gosched()
	}
}

func TestFullRing(t *testing.T) {
	client, server, err := Pipe(10, 11)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	defer server.Close()
	const size = 1 << 10
	data := stream(7, size+300)
	done := make(chan error, 1)
	go func() { _, err := client.Write(data); done <- err }()
	// The writer fills the ring, then asks to be told when we read.
	until(func() bool {
		return client.pg.load(offLeft+offProd) == size && client.pg.loadByte(offSrvNotify)&NotifyRead != 0
	})
	select {
	case err := <-done:
		t.Fatalf("write of %d bytes into a %d byte ring returned (%v) before anything was read", len(data), size, err)
	default:
	}
	got, err := drain(server, len(data), 8)
	if err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("data differs")
	}
}

func TestEmptyRing(t *testing.T) {
	client, server, err := Pipe(12, 12)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	defer server.Close()
	type result struct {
		b   []byte
		err error
	}
	server.pg.setByte(offCliNotify, 0) // the request made at setup
	done := make(chan result, 1)
	go func() {
		b := make([]byte, 100)
		n, err := server.Read(b)
		done <- result{b[:n], err}
	}()
	until(func() bool { return server.pg.loadByte(offCliNotify)&NotifyWrite != 0 })
	select {
	case r := <-done:
		t.Fatalf("read of an empty ring returned %q, %v", r.b, r.err)
	default:
	}
	if _, err := client.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	if r := <-done; r.err != nil || string(r.b) != "hello" {
		t.Fatalf("read %q, %v; want hello", r.b, r.err)
	}
	if n, err := server.Read(nil); n != 0 || err != nil {
		t.Fatalf("empty read: %d, %v", n, err)
	}
}

func TestPeerExit(t *testing.T) {
	client, server, err := Pipe(12, 12)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	if _, err := server.Write([]byte("bye")); err != nil {
		t.Fatal(err)
	}
	if err := server.Close(); err != nil {
		t.Fatal(err)
	}
	// Data written before the exit is still delivered, then EOF.
	b, err := io.ReadAll(client)
	if err != nil || string(b) != "bye" {
		t.Fatalf("read %q, %v; want bye, EOF", b, err)
	}
	if _, err := client.Write([]byte("x")); !errors.Is(err, ErrPeerClosed) {
		t.Fatalf("write to exited peer: %v", err)
	}
	if _, err := server.Read(make([]byte, 1)); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("read after close: %v", err)
	}
	if err := server.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
}

// A peer that clears its live flag without an event (killed, event lost) is
// still noticed: every wait is bounded by recheck.
func TestPeerExitWithoutEvent(t *testing.T) {
	client, server, err := Pipe(12, 12)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	defer server.Close()
	// Withdraw the request the client made when it attached, so that the
	// one we wait for is the blocked reader's.
	client.pg.setByte(offSrvNotify, 0)
	done := make(chan error, 1)
	go func() { _, err := client.Read(make([]byte, 1)); done <- err }()
	until(func() bool { return client.pg.loadByte(offSrvNotify)&NotifyWrite != 0 })
	server.pg.setByte(offSrvLive, liveExited)
	if err := <-done; err != io.EOF {
		t.Fatalf("read: %v, want EOF", err)
	}
}

func TestCloseUnblocks(t *testing.T) {
	client, server, err := Pipe(10, 11)
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()
	rd := make(chan error, 1)
	go func() { _, err := client.Read(make([]byte, 1)); rd <- err }()
	wr := make(chan error, 1)
	go func() { _, err := client.Write(make([]byte, 5000)); wr <- err }()
	until(func() bool { return client.pg.load(offLeft+offProd) == 1<<10 })
	client.Close()
	if err := <-rd; !errors.Is(err, net.ErrClosed) {
		t.Fatalf("blocked read after close: %v", err)
	}
	if err := <-wr; !errors.Is(err, net.ErrClosed) {
		t.Fatalf("blocked write after close: %v", err)
	}
	if v := server.pg.loadByte(offCliLive); v != liveExited {
		t.Fatalf("cli_live = %d after close", v)
	}
}

type countingNotifier struct {
	Notifier
	n atomic.Int32
}

func (c *countingNotifier) Notify() error { c.n.Add(1); return c.Notifier.Notify() }

// The client signals the server only when the server asked for it.
func TestNotifyOnlyWhenAsked(t *testing.T) {
	var cn *countingNotifier
	client, server, err := pipe(12, 12, 0, func(n Notifier) Notifier {
		cn = &countingNotifier{Notifier: n}
		return cn
	})
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	defer server.Close()
	if n := cn.n.Load(); n != 1 {
		t.Fatalf("%d notifications after connecting, want 1", n)
	}
	// The server asked for WRITE events when it set up the page.
	client.Write([]byte("one"))
	if n := cn.n.Load(); n != 2 {
		t.Fatalf("%d notifications after a requested write, want 2", n)
	}
	client.Write([]byte("two"))
	if n := cn.n.Load(); n != 2 {
		t.Fatalf("%d notifications after an unrequested write, want 2", n)
	}
	b := make([]byte, 6)
	if _, err := io.ReadFull(server, b); err != nil || string(b) != "onetwo" {
		t.Fatalf("read %q, %v", b, err)
	}
	// A reader finding the ring empty asks again.
	done := make(chan error, 1)
	go func() { _, err := server.Read(b); done <- err }()
	until(func() bool { return server.pg.loadByte(offCliNotify)&NotifyWrite != 0 })
	client.Write([]byte("three"))
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if n := cn.n.Load(); n != 3 {
		t.Fatalf("%d notifications after the reader asked, want 3", n)
	}
}

func TestHostilePeer(t *testing.T) {
	for _, tc := range []struct {
		name string
		poke func(pg page)
		op   func(c *Conn) error
	}{
		{"prod far ahead", func(pg page) { pg.store(offRight+offProd, 5000) },
			func(c *Conn) error { _, err := c.Read(make([]byte, 10)); return err }},
		{"prod behind cons", func(pg page) { pg.store(offRight+offProd, 0xfffffff0) },
			func(c *Conn) error { _, err := c.Read(make([]byte, 10)); return err }},
		{"cons ahead of prod", func(pg page) { pg.store(offLeft+offCons, 10) },
			func(c *Conn) error { _, err := c.Write([]byte("x")); return err }},
		{"cons far behind", func(pg page) { pg.store(offLeft+offCons, 0x80000000) },
			func(c *Conn) error { _, err := c.Write([]byte("x")); return err }},
		{"live flag 7", func(pg page) { pg.setByte(offSrvLive, 7) },
			func(c *Conn) error { _, err := c.Read(make([]byte, 10)); return err }},
		{"server waiting", func(pg page) { pg.setByte(offSrvLive, liveWaiting) },
			func(c *Conn) error { _, err := c.Write([]byte("x")); return err }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			client, server, err := Pipe(12, 12)
			if err != nil {
				t.Fatal(err)
			}
			defer client.Close()
			defer server.Close()
			tc.poke(client.pg)
			if err := tc.op(client); !errors.Is(err, ErrBroken) {
				t.Fatalf("got %v, want ErrBroken", err)
			}
		})
	}
	// Our own index scribbled on by the peer is ignored: we keep our copy.
	client, server, err := Pipe(12, 12)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	defer server.Close()
	client.pg.store(offLeft+offProd, 3000)
	if _, err := client.Write([]byte("abc")); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 3)
	if _, err := io.ReadFull(server, b); err != nil || string(b) != "abc" {
		t.Fatalf("read %q, %v", b, err)
	}
}

func TestLayout(t *testing.T) {
	for _, tc := range []struct {
		left, right int
		ok          bool
	}{
		{10, 11, true}, {11, 10, true}, {12, 12, true}, {10, 12, true}, {20, 20, true},
		{10, 10, false}, {11, 11, false}, {9, 12, false}, {12, 21, false}, {0, 0, false},
		{65535, 12, false},
		// 256 grants (1048 bytes of list) run into a ring at offset 1024.
		{10, 20, false}, {11, 20, true}, {20, 10, false},
	} {
		_, _, err := layout(tc.left, tc.right)
		if (err == nil) != tc.ok {
			t.Errorf("layout(%d, %d) = %v, want ok %v", tc.left, tc.right, err, tc.ok)
		}
	}
	for _, tc := range []struct{ readMin, writeMin, left, right int }{
		{4096, 4096, 12, 12}, // QubesDB, qrexec
		{1024, 2048, 10, 11}, {100, 100, 10, 11}, {2048, 1024, 11, 10},
		{2048, 4096, 11, 12}, {8192, 2000, 13, 11}, {5000, 70000, 13, 17},
	} {
		l, r, err := serverOrders(tc.readMin, tc.writeMin)
		if err != nil || l != tc.left || r != tc.right {
			t.Errorf("serverOrders(%d, %d) = %d, %d, %v; want %d, %d", tc.readMin, tc.writeMin, l, r, err, tc.left, tc.right)
		}
		if _, _, err := layout(l, r); err != nil {
			t.Errorf("serverOrders(%d, %d) chose a bad layout: %v", tc.readMin, tc.writeMin, err)
		}
	}
	if _, _, err := serverOrders(1<<21, 0); err == nil {
		t.Error("serverOrders accepted 2 MiB")
	}
}

func TestAttachRejectsBadPage(t *testing.T) {
	pg, err := newPage(alignedBytes(PageSize))
	if err != nil {
		t.Fatal(err)
	}
	noMap := func([]uint32, bool) ([]byte, error) { return nil, errors.New("no grants") }
	for _, o := range [][2]uint16{{10, 10}, {9, 12}, {12, 25}, {10, 20}} {
		clear(pg.b)
		pg.b[offLeftOrder], pg.b[offRightOrder] = byte(o[0]), byte(o[1])
		c, err := attachClient(pg, noMap, &memNotifier{}, nil)
		if !errors.Is(err, ErrBroken) || c != nil {
			t.Errorf("orders %v: %v", o, err)
		}
		if pg.loadByte(offCliLive) != 0 {
			t.Errorf("orders %v: page changed", o)
		}
	}
	// A mapping failure is reported, the page is left alone.
	clear(pg.b)
	pg.b[offLeftOrder], pg.b[offRightOrder] = 12, 12
	if _, err := attachClient(pg, noMap, &memNotifier{}, nil); err == nil || pg.loadByte(offCliLive) != 0 {
		t.Errorf("map failure: %v", err)
	}
	if _, err := newPage(make([]byte, 100)); err == nil {
		t.Error("newPage accepted 100 bytes")
	}
}

// waitClient is what Listen waits with: a server sees its client attach,
// exit, or gives up when told to.
func TestWaitClient(t *testing.T) {
	client, server, err := Pipe(12, 12)
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()
	if err := server.waitClient(nil); err != nil {
		t.Fatalf("connected client: %v", err)
	}
	server.pg.setByte(offCliLive, liveWaiting)
	stop := make(chan struct{})
	done := make(chan error, 1)
	go func() { done <- server.waitClient(stop) }()
	close(stop)
	if err := <-done; err == nil {
		t.Fatal("waitClient ignored done")
	}
	client.Close()
	if err := server.waitClient(nil); !errors.Is(err, ErrPeerClosed) {
		t.Fatalf("exited client: %v", err)
	}
}
