package xenstoretest

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"slices"
	"strconv"
	"sync"
	"syscall"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/xenstore"
)

// Xenbus models the Linux 6.1 guest kernel's /dev/xen/xenbus in front of a
// FakeServer, so that a client is tested against the device's constraints
// and not only xenstored's. Each Open is one fd; all fds share the kernel's
// one connection to xenstored, as in a guest. What it reproduces, by the
// kernel function it models (drivers/xen/xenbus/):
//
//   - xenbus_file_write (xenbus_dev_frontend.c): the fd's msgbuffer_mutex
//     is held for the whole processing of a written message. Partial writes
//     are buffered until the message is complete; a message of more than
//     4096 bytes fails with E2BIG (a single write that overflows the buffer,
//     with EINVAL); bytes a write holds beyond its message are dropped.
//   - xenbus_write_watch: WATCH and UNWATCH are synchronous. The kernel
//     registers a watch of its own on its connection, under a token of its
//     own (a pointer printed in hex: register_xenbus_watch, xs_watch), and
//     waits for xenstored's reply with the mutex held; xenbus_command_reply
//     then synthesises the fd's reply from the request's header, payload
//     "OK" (EINVAL for a malformed request; a refused watch fails the write
//     with the errno). UNWATCH of an unknown watch answers OK too.
//   - xenbus_write_transaction, xenbus_dev_request_and_reply, xs_send:
//     every other request is sent asynchronously under a kernel req_id and
//     the write returns at once; a tx_id the fd did not start gets ENOENT,
//     a TRANSACTION_END other than "T" or "F" EINVAL.
//   - xenbus_thread, process_msg (xenbus_comms.c): ONE reader for all fds
//     takes xenstored's messages in order. A reply to an fd's request goes
//     to xenbus_dev_queue_reply, which takes that fd's msgbuffer_mutex (to
//     update the fd's transaction list) before queueing the reply with the
//     caller's req_id restored. Events go to the xenwatch queue (xs_watch_msg).
//   - xenwatch_thread, watch_fired: a separate goroutine delivers events as
//     WATCH_EVENT with the caller's token, under the fd's reply_mutex only;
//     only type and len of the header are set (req_id and tx_id are
//     0xdeadbeef here). unregister_xenbus_watch drops events still queued.
//   - xenbus_file_read: the queued bytes as a stream, across message
//     boundaries.
//   - xenbus_file_release, xenbus_worker: once the fd is closed and no
//     write or reply holds it, its transactions are aborted and its watches
//     removed.
//
// Hence the deadlock, which the model reaches exactly as the kernel does
// (see Deadlocked): a WATCH or UNWATCH written while the reply of an
// earlier request on the same fd is undelivered holds the mutex that the
// reader needs to deliver that earlier reply, which xenstored sent before
// the WATCH's; the reader stops, and with it every fd and the kernel's own
// xenstore users. Only Close ends it.
type Xenbus struct {
	kconn io.ReadWriteCloser // the kernel's connection to xenstored
	wmu   sync.Mutex         // one message at a time on kconn (xb_write_mutex)
	done  chan struct{}      // closed by Close

	mu        sync.Mutex
	stopped   bool
	nextReq   uint32             // xs_request_id
	reqs      map[uint32]*kreq   // requests sent on kconn, by kernel req_id
	watches   map[string]*kwatch // registered watches, by kernel token
	nextWatch uint64             // makes the kernel's "pointers"
	files     map[*xenbusFile]struct{}
	blockedOn *xenbusFile // whose msgbuffer_mutex the reader waits for
	stats     XenbusStats

	// xenwatch: events wait in evq (watch_events) for their delivery,
	// which runs under xenwatchMu (xenwatch_mutex).
	evmu       sync.Mutex
	evcond     *sync.Cond
	evq        []kevent
	evStopped  bool
	xenwatchMu sync.Mutex

	wg sync.WaitGroup
}

// XenbusStats counts what the fds of a Xenbus were asked to do.
type XenbusStats struct {
	// Requests counts complete messages written, on all fds.
	Requests uint64
	// Pipelined counts requests written while the reply of an earlier
	// request on the same fd had not been delivered (queued for read).
	Pipelined uint64
	// Hazards counts the WATCH and UNWATCH among Pipelined. Each one
	// deadlocks the kernel: the earlier reply comes first from xenstored
	// and cannot be delivered until the WATCH's is, which waits behind it.
	Hazards uint64
}

// kreq is a request sent on the kernel's connection (struct xb_req_data).
type kreq struct {
	typ    xenstore.Type
	caller uint32 // the fd's req_id, restored in the reply
	tx     uint32 // the request's tx_id, which the reply keeps
	// Exactly one of file (an fd's asynchronous request) and reply (the
	// kernel's own synchronous one, xs_talkv) is set.
	file   *xenbusFile
	reply  chan xenstore.Message
	waiter *xenbusFile // the fd whose msgbuffer_mutex is held while reply is awaited
}

// kwatch is a watch the kernel registered for an fd (struct watch_adapter).
type kwatch struct {
	file        *xenbusFile
	node        string
	token       string // the kernel's, on the wire
	callerToken string // the fd's, in its events
}

type kevent struct {
	w    *kwatch
	path string
}

// ktx is an fd's transaction; id 0 until TRANSACTION_START is answered.
type ktx struct{ id uint32 }

// xenbusFile is one open fd (struct xenbus_file_priv).
type xenbusFile struct {
	x *Xenbus

	// Guarded by msgbuffer (msgbuffer_mutex).
	msgbuffer   sync.Mutex
	buf         []byte    // the partial message (u->u.buffer)
	txs         []*ktx    // u->transactions
	watches     []*kwatch // u->watches
	outstanding int       // requests sent whose reply is not delivered

	syncWaiting bool // guarded by x.mu: a WATCH or UNWATCH awaits its reply

	// Guarded by replyMu (reply_mutex).
	replyMu sync.Mutex
	readCh  *sync.Cond // read_waitq
	rbuf    []byte     // u->read_buffers
	closed  bool
	refs    int // the open fd, writes in progress, replies awaited (u->kref)
}

var _ io.ReadWriteCloser = (*xenbusFile)(nil)

// xenbusBuffer is sizeof(u->u.buffer): XENSTORE_PAYLOAD_MAX, header included.
const xenbusBuffer = xenstore.MaxPayload

// garbage fills the header fields watch_fired leaves uninitialised.
const garbage = 0xdeadbeef

// NewXenbus starts the kernel side: its connection to s, its reader and
// its xenwatch goroutine. Close it before s.
func NewXenbus(s *FakeServer) *Xenbus {
	x := &Xenbus{kconn: s.pipe(), done: make(chan struct{}), reqs: make(map[uint32]*kreq),
		watches: make(map[string]*kwatch), files: make(map[*xenbusFile]struct{})}
	x.evcond = sync.NewCond(&x.evmu)
	x.wg.Add(2)
	go x.readLoop()
	go x.xenwatch()
	return x
}

// Open opens the device: a new fd.
func (x *Xenbus) Open() io.ReadWriteCloser {
	f := &xenbusFile{x: x, refs: 1}
	f.readCh = sync.NewCond(&f.replyMu)
	x.mu.Lock()
	x.files[f] = struct{}{}
	x.mu.Unlock()
	return f
}

// Client returns a client on a new fd.
func (x *Xenbus) Client() *xenstore.Client { return xenstore.New(x.Open()) }

// Stats returns the counters.
func (x *Xenbus) Stats() XenbusStats {
	x.mu.Lock()
	defer x.mu.Unlock()
	return x.stats
}

// Deadlocked reports whether the model is in the kernel's deadlock: the
// reader waits for an fd's msgbuffer_mutex, whose holder waits for a reply
// that only the reader can deliver. The kernel never leaves this state.
func (x *Xenbus) Deadlocked() bool {
	x.mu.Lock()
	defer x.mu.Unlock()
	return x.blockedOn != nil && x.blockedOn.syncWaiting
}

// Close ends the model, deadlock or not: waiting writes fail, reads on
// every fd end, and the goroutines exit.
func (x *Xenbus) Close() {
	x.mu.Lock()
	if x.stopped {
		x.mu.Unlock()
		return
	}
	x.stopped = true
	files := make([]*xenbusFile, 0, len(x.files))
	for f := range x.files {
		files = append(files, f)
	}
	x.mu.Unlock()
	// The connection first: when a deadlock unwinds, nothing more is read.
	x.kconn.Close()
	close(x.done)
	x.evmu.Lock()
	x.evStopped = true
	x.evcond.Broadcast()
	x.evmu.Unlock()
	for _, f := range files {
		f.replyMu.Lock()
		f.closed = true
		f.readCh.Broadcast()
		f.replyMu.Unlock()
	}
	x.wg.Wait()
}

var errStopped = errors.New("xenbus model closed")

// deviceError is how a failed system call on the device looks in Go.
func deviceError(op string, err error) error {
	return &fs.PathError{Op: op, Path: xenstore.DevicePath, Err: err}
}

// send writes m on the kernel's connection as request r (xs_send).
func (x *Xenbus) send(r *kreq, m xenstore.Message) error {
	x.mu.Lock()
	if x.stopped {
		x.mu.Unlock()
		return errStopped
	}
	id := x.nextReq
	x.nextReq++
	r.typ, r.caller, r.tx = m.Type, m.ReqID, m.TxID
	x.reqs[id] = r
	if r.waiter != nil {
		r.waiter.syncWaiting = true
	}
	x.mu.Unlock()

	m.ReqID = id
	x.wmu.Lock()
	_, err := x.kconn.Write(m.Append(nil))
	x.wmu.Unlock()
	if err != nil {
		x.mu.Lock()
		delete(x.reqs, id)
		if r.waiter != nil {
			r.waiter.syncWaiting = false
		}
		x.mu.Unlock()
		return err
	}
	return nil
}

// talk sends one of the kernel's own requests and waits for its reply
// (xs_talkv). waiter is the fd whose msgbuffer_mutex the caller holds.
func (x *Xenbus) talk(waiter *xenbusFile, typ xenstore.Type, tx uint32, args ...string) (xenstore.Message, error) {
	r := &kreq{reply: make(chan xenstore.Message, 1), waiter: waiter}
	if err := x.send(r, xenstore.Message{Type: typ, TxID: tx, Payload: xenstore.JoinStrings(args...)}); err != nil {
		return xenstore.Message{}, err
	}
	select {
	case m := <-r.reply:
		if m.Type == xenstore.TypeError {
			return m, errno(m.Payload)
		}
		return m, nil
	case <-x.done:
		x.mu.Lock()
		if waiter != nil {
			waiter.syncWaiting = false
		}
		x.mu.Unlock()
		return xenstore.Message{}, errStopped
	}
}

// errno turns xenstored's error name into the errno the kernel returns
// (xenbus_xs.c get_error: an unknown name becomes EINVAL).
func errno(p []byte) syscall.Errno {
	switch xenstore.Error(bytes.TrimRight(p, "\x00")) {
	case xenstore.ENOENT:
		return syscall.ENOENT
	case xenstore.EACCES:
		return syscall.EACCES
	case xenstore.EEXIST:
		return syscall.EEXIST
	case xenstore.EISDIR:
		return syscall.EISDIR
	case xenstore.ENOSPC:
		return syscall.ENOSPC
	case xenstore.E2BIG:
		return syscall.E2BIG
	case xenstore.ENOSYS:
		return syscall.ENOSYS
	case xenstore.EBUSY:
		return syscall.EBUSY
	case xenstore.EAGAIN:
		return syscall.EAGAIN
	case xenstore.EIO:
		return syscall.EIO
	case xenstore.ENOMEM:
		return syscall.ENOMEM
	case xenstore.EROFS:
		return syscall.EROFS
	case xenstore.EISCONN:
		return syscall.EISCONN
	}
	return syscall.EINVAL
}

// registerWatch registers w under a new kernel token and waits for
// xenstored's answer (register_xenbus_watch). The watch is listed before
// the request is sent, so its first event may be delivered before the reply.
func (x *Xenbus) registerWatch(w *kwatch, waiter *xenbusFile) error {
	x.mu.Lock()
	x.nextWatch++
	w.token = fmt.Sprintf("%X", 0xffff888000000000+x.nextWatch*0x40) // "%lX" of the watch
	x.watches[w.token] = w
	x.mu.Unlock()
	if _, err := x.talk(waiter, xenstore.TypeWatch, 0, w.node, w.token); err != nil {
		x.mu.Lock()
		delete(x.watches, w.token)
		x.mu.Unlock()
		return err
	}
	return nil
}

// unregisterWatch removes w (unregister_xenbus_watch): from the list, then
// from xenstored (errors are only logged by the kernel), then its events
// still waiting for xenwatch.
func (x *Xenbus) unregisterWatch(w *kwatch, waiter *xenbusFile) {
	x.mu.Lock()
	delete(x.watches, w.token)
	x.mu.Unlock()
	x.talk(waiter, xenstore.TypeUnwatch, 0, w.node, w.token)
	x.xenwatchMu.Lock()
	x.evmu.Lock()
	x.evq = slices.DeleteFunc(x.evq, func(e kevent) bool { return e.w == w })
	x.evmu.Unlock()
	x.xenwatchMu.Unlock()
}

// readLoop is the kernel's one reader of its connection (xenbus_thread,
// process_msg).
func (x *Xenbus) readLoop() {
	defer x.wg.Done()
	r := bufio.NewReader(x.kconn)
	for {
		m, err := xenstore.ReadMessage(r)
		if errors.Is(err, xenstore.ErrUnknownType) {
			continue
		}
		if err != nil {
			return
		}
		if m.Type == xenstore.TypeWatchEvent {
			x.watchMsg(m)
			continue
		}
		x.mu.Lock()
		req := x.reqs[m.ReqID]
		delete(x.reqs, m.ReqID)
		if req != nil && req.waiter != nil {
			req.waiter.syncWaiting = false
		}
		x.mu.Unlock()
		if req == nil {
			continue // nobody asked: dropped
		}
		m.ReqID, m.TxID = req.caller, req.tx
		if req.file == nil {
			req.reply <- m // xs_wake_up
			continue
		}
		req.file.queueReply(req, m)
	}
}

// watchMsg queues an event for xenwatch if its watch is registered
// (xs_watch_msg).
func (x *Xenbus) watchMsg(m xenstore.Message) {
	parts, err := xenstore.SplitStrings(m.Payload)
	if err != nil || len(parts) < 2 {
		return
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	w := x.watches[parts[1]]
	if w == nil {
		return
	}
	x.evmu.Lock()
	x.evq = append(x.evq, kevent{w: w, path: parts[0]})
	x.evcond.Broadcast()
	x.evmu.Unlock()
}

// xenwatch delivers events one at a time (xenwatch_thread).
func (x *Xenbus) xenwatch() {
	defer x.wg.Done()
	for {
		x.evmu.Lock()
		for len(x.evq) == 0 && !x.evStopped {
			x.evcond.Wait()
		}
		stopped := x.evStopped
		x.evmu.Unlock()
		if stopped {
			return
		}
		x.xenwatchMu.Lock()
		x.evmu.Lock()
		var ev kevent
		if len(x.evq) > 0 { // unregisterWatch may have taken it
			ev, x.evq = x.evq[0], x.evq[1:]
		}
		x.evmu.Unlock()
		if ev.w != nil {
			ev.w.fired(ev.path)
		}
		x.xenwatchMu.Unlock()
	}
}

// fired queues an event for the fd under its token (watch_fired).
func (w *kwatch) fired(path string) {
	m := xenstore.Message{Type: xenstore.TypeWatchEvent, ReqID: garbage, TxID: garbage,
		Payload: xenstore.JoinStrings(path, w.callerToken)}
	w.file.queue(m.Append(nil))
}

// queue appends a message for read() (queue_reply under reply_mutex).
func (f *xenbusFile) queue(msg []byte) {
	f.replyMu.Lock()
	defer f.replyMu.Unlock()
	f.rbuf = append(f.rbuf, msg...)
	f.readCh.Broadcast()
}

// queueReply delivers the reply to one of the fd's requests
// (xenbus_dev_queue_reply). It runs on the reader and takes the fd's
// msgbuffer_mutex: the model's deadlock. A transaction reply that matches
// none of the fd's transactions is dropped, as the kernel's WARN_ON path
// drops it (and keeps its reference to the fd).
func (f *xenbusFile) queueReply(r *kreq, m xenstore.Message) {
	x := f.x
	x.mu.Lock()
	x.blockedOn = f
	x.mu.Unlock()
	f.msgbuffer.Lock()
	x.mu.Lock()
	x.blockedOn = nil
	x.mu.Unlock()
	drop := false
	switch r.typ {
	case xenstore.TypeTransactionStart:
		i := f.tx(0)
		id, err := strconv.ParseUint(string(bytes.TrimRight(m.Payload, "\x00")), 10, 32)
		switch {
		case i < 0:
			drop = true
		case m.Type == xenstore.TypeError:
			f.txs = slices.Delete(f.txs, i, i+1)
		case err != nil:
			drop = true
		default:
			f.txs[i].id = uint32(id)
		}
	case xenstore.TypeTransactionEnd:
		if i := f.tx(m.TxID); i >= 0 {
			f.txs = slices.Delete(f.txs, i, i+1)
		} else {
			drop = true
		}
	}
	if drop {
		f.msgbuffer.Unlock()
		return
	}
	f.outstanding--
	f.msgbuffer.Unlock()
	f.queue(m.Append(nil))
	f.put()
}

// tx returns the index of the fd's transaction id, or -1.
func (f *xenbusFile) tx(id uint32) int {
	return slices.IndexFunc(f.txs, func(t *ktx) bool { return t.id == id })
}

// get takes a reference for a write (fdget); it fails once the fd is closed.
func (f *xenbusFile) get() bool {
	f.replyMu.Lock()
	defer f.replyMu.Unlock()
	if f.closed {
		return false
	}
	f.refs++
	return true
}

// put drops a reference; the last one releases the fd.
func (f *xenbusFile) put() {
	f.replyMu.Lock()
	f.refs--
	last := f.refs == 0
	f.replyMu.Unlock()
	if !last {
		return
	}
	x := f.x
	x.mu.Lock()
	defer x.mu.Unlock()
	delete(x.files, f)
	if x.stopped {
		return
	}
	x.wg.Add(1)
	go f.release()
}

// release aborts the fd's transactions and removes its watches
// (xenbus_worker). Nothing else uses the fd any more, so no lock is held.
func (f *xenbusFile) release() {
	defer f.x.wg.Done()
	for _, t := range f.txs {
		f.x.talk(nil, xenstore.TypeTransactionEnd, t.id, "F")
	}
	for _, w := range f.watches {
		f.x.unregisterWatch(w, nil)
	}
}

// Read returns queued reply and event bytes as a stream (xenbus_file_read).
func (f *xenbusFile) Read(p []byte) (int, error) {
	f.replyMu.Lock()
	defer f.replyMu.Unlock()
	for len(f.rbuf) == 0 && !f.closed && len(p) > 0 {
		f.readCh.Wait()
	}
	if f.closed {
		return 0, deviceError("read", fs.ErrClosed)
	}
	n := copy(p, f.rbuf)
	f.rbuf = f.rbuf[n:]
	return n, nil
}

// Close closes the fd; it is released once no write or reply holds it.
func (f *xenbusFile) Close() error {
	f.replyMu.Lock()
	if f.closed {
		f.replyMu.Unlock()
		return deviceError("close", fs.ErrClosed)
	}
	f.closed = true
	f.rbuf = nil
	f.readCh.Broadcast()
	f.replyMu.Unlock()
	f.put()
	return nil
}

// Write buffers p and acts on the message once it is complete
// (xenbus_file_write), all under the fd's msgbuffer_mutex.
func (f *xenbusFile) Write(p []byte) (int, error) {
	if !f.get() {
		return 0, deviceError("write", fs.ErrClosed)
	}
	defer f.put()
	f.msgbuffer.Lock()
	defer f.msgbuffer.Unlock()
	if len(p) == 0 {
		return 0, nil
	}
	if len(p) > xenbusBuffer-len(f.buf) {
		f.buf = f.buf[:0]
		return 0, deviceError("write", syscall.EINVAL)
	}
	f.buf = append(f.buf, p...)
	if len(f.buf) < xenstore.HeaderLen {
		return len(p), nil
	}
	n := int(binary.LittleEndian.Uint32(f.buf[12:]))
	if xenstore.HeaderLen+n > xenbusBuffer {
		f.buf = f.buf[:0]
		return 0, deviceError("write", syscall.E2BIG)
	}
	if len(f.buf) < xenstore.HeaderLen+n {
		return len(p), nil
	}
	m := xenstore.Message{
		Type:    xenstore.Type(binary.LittleEndian.Uint32(f.buf[0:])),
		ReqID:   binary.LittleEndian.Uint32(f.buf[4:]),
		TxID:    binary.LittleEndian.Uint32(f.buf[8:]),
		Payload: slices.Clone(f.buf[xenstore.HeaderLen : xenstore.HeaderLen+n]),
	}
	f.buf = f.buf[:0] // consumed, with whatever followed the message

	watch := m.Type == xenstore.TypeWatch || m.Type == xenstore.TypeUnwatch
	f.x.mu.Lock()
	f.x.stats.Requests++
	if f.outstanding > 0 {
		f.x.stats.Pipelined++
		if watch {
			f.x.stats.Hazards++
		}
	}
	f.x.mu.Unlock()

	var err error
	if watch {
		err = f.writeWatch(m)
	} else {
		err = f.writeTransaction(m)
	}
	if err != nil {
		return 0, deviceError("write", err)
	}
	return len(p), nil
}

// commandReply queues a reply made by the kernel itself from the request's
// header (xenbus_command_reply).
func (f *xenbusFile) commandReply(req xenstore.Message, typ xenstore.Type, body string) {
	r := xenstore.Message{Type: typ, ReqID: req.ReqID, TxID: req.TxID, Payload: xenstore.JoinStrings(body)}
	f.queue(r.Append(nil))
}

// writeWatch handles WATCH and UNWATCH synchronously (xenbus_write_watch).
func (f *xenbusFile) writeWatch(m xenstore.Message) error {
	path, rest, ok := bytes.Cut(m.Payload, []byte{0})
	token, _, ok2 := bytes.Cut(rest, []byte{0})
	if !ok || !ok2 {
		f.commandReply(m, xenstore.TypeError, string(xenstore.EINVAL))
		return nil
	}
	if m.Type == xenstore.TypeWatch {
		w := &kwatch{file: f, node: string(path), callerToken: string(token)}
		if err := f.x.registerWatch(w, f); err != nil {
			return err
		}
		f.watches = append(f.watches, w)
	} else if i := slices.IndexFunc(f.watches, func(w *kwatch) bool {
		return w.callerToken == string(token) && w.node == string(path)
	}); i >= 0 {
		f.x.unregisterWatch(f.watches[i], f)
		f.watches = slices.Delete(f.watches, i, i+1)
	}
	f.commandReply(m, m.Type, "OK")
	return nil
}

// writeTransaction checks the fd's transactions and sends any other request
// asynchronously (xenbus_write_transaction, xenbus_dev_request_and_reply).
func (f *xenbusFile) writeTransaction(m xenstore.Message) error {
	switch {
	case m.Type == xenstore.TypeTransactionStart:
		f.txs = append(f.txs, &ktx{})
	case m.TxID != 0 && f.tx(m.TxID) < 0:
		f.commandReply(m, xenstore.TypeError, string(xenstore.ENOENT))
		return nil
	case m.Type == xenstore.TypeTransactionEnd && string(m.Payload) != "T\x00" && string(m.Payload) != "F\x00":
		f.commandReply(m, xenstore.TypeError, string(xenstore.EINVAL))
		return nil
	}
	f.replyMu.Lock()
	f.refs++ // held by the reply (kref_get)
	f.replyMu.Unlock()
	f.outstanding++
	if err := f.x.send(&kreq{file: f}, m); err != nil {
		f.outstanding--
		if m.Type == xenstore.TypeTransactionStart {
			f.txs = f.txs[:len(f.txs)-1]
		}
		f.put()
		return fmt.Errorf("xenbus send: %w", err)
	}
	return nil
}
