package vifs

import (
	"context"
	"fmt"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/link/linktest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/link"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/xenstore"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/xenstore/xenstoretest"
)

// fakeLinks hands out in-memory links for devices the test creates.
type fakeLinks struct {
	mu   sync.Mutex
	devs map[string]chan struct{} // closed once the device exists
}

func (f *fakeLinks) dev(name string) chan struct{} {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.devs == nil {
		f.devs = make(map[string]chan struct{})
	}
	if f.devs[name] == nil {
		f.devs[name] = make(chan struct{})
	}
	return f.devs[name]
}

func (f *fakeLinks) create(name string) { close(f.dev(name)) }

// Open looks for the device before it looks at ctx, like a real
// implementation that checks once before waiting.
func (f *fakeLinks) Open(ctx context.Context, name string) (link.Link, error) {
	select {
	case <-f.dev(name):
	default:
		select {
		case <-f.dev(name):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	fw, _ := linktest.NewPipe(name, [6]byte{0xfe, 0xff, 0xff, 0xff, 0xff, 0xff}, "vm", [6]byte{}, 1500)
	return fw, nil
}

// fakeAttacher reports AddClient and detach calls as lines on a channel.
type fakeAttacher struct{ calls chan string }

func (a *fakeAttacher) AddClient(ip [4]byte, mac [6]byte, l link.Link) (func(), error) {
	name := l.Name()
	a.calls <- fmt.Sprintf("add %d.%d.%d.%d %s %s", ip[0], ip[1], ip[2], ip[3], formatMAC(mac), name)
	return func() {
		l.Close()
		a.calls <- fmt.Sprintf("detach %d.%d.%d.%d %s", ip[0], ip[1], ip[2], ip[3], name)
	}, nil
}

type env struct {
	t     *testing.T
	s     *xenstoretest.FakeServer
	xs    *xenstore.Client
	links *fakeLinks
	att   *fakeAttacher
	logs  chan string
	stop  func() error
}

func start(t *testing.T, linkWait time.Duration) *env {
	t.Helper()
	e := &env{t: t, s: xenstoretest.NewFakeServer(2), links: &fakeLinks{},
		att: &fakeAttacher{calls: make(chan string, 100)}, logs: make(chan string, 1000)}
	e.xs = e.s.Client()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- Run(ctx, Config{XS: e.xs, Attacher: e.att, Links: e.links, LinkWait: linkWait,
			Logf: func(f string, a ...any) {
				msg := fmt.Sprintf(f, a...)
				t.Log(msg)
				select {
				case e.logs <- msg:
				default:
				}
			}})
	}()
	var once sync.Once
	var err error
	e.stop = func() error {
		once.Do(func() {
			cancel()
			err = <-done
			e.xs.Close()
			e.s.Close()
		})
		return err
	}
	t.Cleanup(func() { e.stop() })
	return e
}

// addVif writes a backend directory the way the toolstack does: at once.
func (e *env) addVif(domid, devid int, ip, mac string) string {
	dir := fmt.Sprintf("backend/vif/%d/%d", domid, devid)
	e.s.WriteAll(map[string]string{
		dir + "/frontend-id": fmt.Sprint(domid),
		dir + "/handle":      fmt.Sprint(devid),
		dir + "/ip":          ip,
		dir + "/mac":         mac,
		dir + "/state":       "2", // netback: InitWait
	})
	return dir
}

func (e *env) expect(want string) {
	e.t.Helper()
	if got := <-e.att.calls; got != want {
		e.t.Fatalf("attacher call %q, want %q", got, want)
	}
}

func (e *env) waitLog(sub string) {
	e.t.Helper()
	for l := range e.logs {
		if strings.Contains(l, sub) {
			return
		}
	}
}

// waitHotplug waits, through a watch of its own, until dir holds
// hotplug-status=connected.
func (e *env) waitHotplug(dir string) {
	e.t.Helper()
	c := e.s.Client()
	defer c.Close()
	ch, cancel, err := c.Watch(dir, "hp")
	if err != nil {
		e.t.Fatal(err)
	}
	defer cancel()
	for range ch {
		if v, _ := e.s.Read(dir + "/hotplug-status"); v == "connected" {
			return
		}
	}
	e.t.Fatal("watch ended")
}

const mac = "00:16:3e:5e:6c:00"

func TestVifLifecycle(t *testing.T) {
	e := start(t, time.Hour)
	dir := e.addVif(3, 0, "fd09:24ef:4179::a89:5 10.137.0.5 10.137.0.6", mac)
	e.links.create("vif3.0")
	e.waitHotplug(dir)
	if _, ok := e.s.Read("/local/domain/2/" + dir + "/hotplug-status"); !ok {
		t.Fatal("hotplug-status not in our domain's backend directory")
	}
	e.s.Write(dir+"/state", "4") // the frontend connected
	e.expect("add 10.137.0.5 " + mac + " vif3.0")

	// The frontend disconnects: netback goes Closed and removes
	// hotplug-status; a new connection needs it written again.
	e.s.Write(dir+"/state", "6")
	e.expect("detach 10.137.0.5 vif3.0")
	e.s.Rm(dir + "/hotplug-status")
	e.s.Write(dir+"/state", "2")
	e.waitHotplug(dir)
	e.s.Write(dir+"/state", "4")
	e.expect("add 10.137.0.5 " + mac + " vif3.0")

	e.s.Rm("backend/vif/3")
	e.expect("detach 10.137.0.5 vif3.0")
	if _, ok := e.s.Read(dir); ok {
		t.Fatal("backend directory recreated after removal")
	}
	if err := e.stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	if len(e.att.calls) != 0 {
		t.Fatalf("extra attacher call %q", <-e.att.calls)
	}
}

// libxl removes a device by writing online=0 and Closing, waits for
// netback to reach Closed and then for the backend domain — us — to delete
// the directory (10 s, then the client's destroy fails). A Closed vif
// still online (the client's driver reconnecting) keeps it.
func TestToolstackRemovalDeletesBackend(t *testing.T) {
	e := start(t, time.Hour)
	dir := e.addVif(3, 0, "10.137.0.5", mac)
	e.s.Write(dir+"/online", "1")
	e.links.create("vif3.0")
	e.waitHotplug(dir)
	e.s.Write(dir+"/state", "4")
	e.expect("add 10.137.0.5 " + mac + " vif3.0")

	e.s.Write(dir+"/state", "6") // reconnecting: online stays 1
	e.expect("detach 10.137.0.5 vif3.0")
	e.s.Write(dir+"/state", "2")
	e.waitHotplug(dir)
	if _, ok := e.s.Read(dir + "/online"); !ok {
		t.Fatal("backend directory of an online vif removed")
	}
	e.s.Write(dir+"/state", "4")
	e.expect("add 10.137.0.5 " + mac + " vif3.0")

	e.s.WriteAll(map[string]string{dir + "/online": "0", dir + "/state": "5"})
	e.expect("detach 10.137.0.5 vif3.0")
	if _, ok := e.s.Read(dir); !ok {
		t.Fatal("backend directory removed before netback reached Closed")
	}
	e.s.Write(dir+"/state", "6")
	e.waitLog("backend directory removed")
	if _, ok := e.s.Read(dir); ok {
		t.Fatal("backend directory still there")
	}
	if _, ok := e.s.Read("backend/vif/3"); !ok {
		t.Fatal("the parent directory is dom0's to clean up, not ours")
	}
}

// An HVM's emulated-NIC vif never gets a device, another vif's frontend
// never connects: neither delays a working vif.
func TestStuckVifsDoNotBlockOthers(t *testing.T) {
	e := start(t, time.Hour)
	e.addVif(5, 0, "10.137.0.50", mac) // no device, ever
	stuck := e.addVif(6, 0, "10.137.0.60", mac)
	e.links.create("vif6.0") // device, but state stays InitWait
	e.waitHotplug(stuck)
	dir := e.addVif(7, 0, "10.137.0.70", mac)
	e.links.create("vif7.0")
	e.waitHotplug(dir)
	e.s.Write(dir+"/state", "4")
	e.expect("add 10.137.0.70 " + mac + " vif7.0")
	if err := e.stop(); err != nil {
		t.Fatal(err)
	}
	e.expect("detach 10.137.0.70 vif7.0")
	if len(e.att.calls) != 0 {
		t.Fatalf("extra attacher call %q", <-e.att.calls)
	}
}

// A device that does not appear within LinkWait is given up on, then
// retried when its backend directory changes.
func TestLinkWaitRetriesOnChange(t *testing.T) {
	e := start(t, time.Nanosecond)
	dir := e.addVif(8, 1, "10.137.0.8", mac)
	e.waitLog("retrying when its backend changes")
	e.links.create("vif8.1")
	e.s.Write(dir+"/state", "4")
	e.expect("add 10.137.0.8 " + mac + " vif8.1")
}

// Two vifs with one IP: the first to connect holds it; the second is
// attached only after the first goes away.
func TestDuplicateIP(t *testing.T) {
	e := start(t, time.Hour)
	a := e.addVif(10, 0, "10.137.0.10", mac)
	b := e.addVif(11, 0, "10.137.0.10", "00:16:3e:5e:6c:01")
	e.links.create("vif10.0")
	e.links.create("vif11.0")
	e.waitHotplug(a)
	e.waitHotplug(b)
	e.s.Write(a+"/state", "4")
	e.expect("add 10.137.0.10 " + mac + " vif10.0")
	e.s.Write(b+"/state", "4")
	e.waitLog("vif11.0: IP 10.137.0.10 is held by vif10.0")
	e.s.Rm(a)
	e.expect("detach 10.137.0.10 vif10.0")
	e.expect("add 10.137.0.10 00:16:3e:5e:6c:01 vif11.0")
}

func TestBadAddressesAreNeverAttached(t *testing.T) {
	e := start(t, time.Hour)
	bad := []struct{ ip, mac, log string }{
		{"", mac, "no IPv4 address"},
		{"10.137.0.300", mac, "no IPv4 address"},
		{"fd09::1", mac, "no IPv4 address"},
		{"0.0.0.0", mac, "unusable client IP"},
		{"224.0.0.1", mac, "unusable client IP"},
		{"10.137.0.20", "00:16:3e:5e:6c", "bad mac"},
		{"10.137.0.21", "00-16-3e-5e-6c-00", "bad mac"},
		{"10.137.0.22", "00:16:3e:5e:6c:0g", "bad mac"},
		{"10.137.0.23", "01:00:5e:00:00:01", `mac "01:00:5e:00:00:01" is not a unicast`},
		{"10.137.0.24", "", "bad mac"},
	}
	for i, c := range bad {
		domid := 20 + i
		dir := e.addVif(domid, 0, c.ip, c.mac)
		e.links.create(fmt.Sprintf("vif%d.0", domid))
		e.s.Write(dir+"/state", "4")
		e.waitLog(fmt.Sprintf("vif%d.0: not attached: %s", domid, c.log))
	}
	e.s.WriteAll(map[string]string{"backend/vif/abc/0/ip": "10.137.0.99"})
	e.waitLog(`ignoring backend/vif/"abc"`)
	// Fixing an address attaches the vif with the new one.
	e.s.Write("backend/vif/20/0/ip", "10.137.0.40")
	e.expect("add 10.137.0.40 " + mac + " vif20.0")
	e.stop()
	e.expect("detach 10.137.0.40 vif20.0")
	if len(e.att.calls) != 0 {
		t.Fatalf("extra attacher call %q", <-e.att.calls)
	}
}

func TestRunEndsWhenXenstoreFails(t *testing.T) {
	e := start(t, time.Hour)
	e.xs.Close()
	if err := e.stop(); err == nil {
		t.Fatal("Run returned nil after the connection failed")
	}
}

func TestParseAddrs(t *testing.T) {
	for _, c := range []struct{ ip, want string }{
		{"10.137.0.9", "10.137.0.9"},
		{"fd09::1 10.137.0.9", "10.137.0.9"},
		{"10.137.0.9 10.137.0.10", "10.137.0.9"},
		{"  10.138.1.2  ", "10.138.1.2"},
	} {
		ip, _, err := parseAddrs(c.ip, mac)
		if got := fmt.Sprintf("%d.%d.%d.%d", ip[0], ip[1], ip[2], ip[3]); err != nil || got != c.want {
			t.Errorf("parseAddrs(%q) = %s, %v; want %s", c.ip, got, err, c.want)
		}
	}
}

// Many vifs at once (dom0 starting VMs in bulk): every one gets its
// hotplug-status. Before, their concurrent transactions made each other
// retry until some gave up, and those VMs never got a network.
func TestManyVifsAtOnce(t *testing.T) {
	e := start(t, time.Hour)
	var dirs []string
	for i := range 80 {
		e.links.create(fmt.Sprintf("vif%d.0", 10+i))
	}
	for i := range 80 {
		dirs = append(dirs, e.addVif(10+i, 0, fmt.Sprintf("10.137.1.%d", 10+i), mac))
	}
	// As netback does, each backend goes Connected once its
	// hotplug-status is there: writes that land while other vifs'
	// transactions are open.
	for i, dir := range dirs {
		e.waitHotplugFor(dir, 30*time.Second)
		e.s.Write(dir+"/state", "4")
		e.expectPrefix(fmt.Sprintf("add 10.137.1.%d ", 10+i))
	}
}

// expectPrefix is expect for a call that starts with want; calls for
// other vifs may come in any order, so it skips those.
func (e *env) expectPrefix(want string) {
	e.t.Helper()
	for {
		select {
		case got := <-e.att.calls:
			if strings.HasPrefix(got, want) {
				return
			}
			e.att.calls <- got // another vif's, later
		case <-time.After(30 * time.Second): // a hang guard
			e.t.Fatalf("no attacher call %q", want)
		}
	}
}

// waitHotplugFor is waitHotplug with a guard against a hang: a vif whose
// hotplug-status never comes fails the test instead.
func (e *env) waitHotplugFor(dir string, limit time.Duration) {
	e.t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		c := e.s.Client()
		defer c.Close()
		ch, cancel, err := c.Watch(dir, "hp")
		if err != nil {
			return
		}
		defer cancel()
		for range ch {
			if v, _ := e.s.Read(dir + "/hotplug-status"); v == "connected" {
				return
			}
		}
	}()
	select {
	case <-done:
		if v, _ := e.s.Read(dir + "/hotplug-status"); v != "connected" {
			e.t.Fatalf("%s: hotplug-status %q", dir, v)
		}
	case <-time.After(limit):
		e.t.Fatalf("%s: no hotplug-status after %v", dir, limit)
	}
}

// A transaction that keeps failing (xenstored busy) is retried after a
// back-off, without waiting for the backend to change: the toolstack is
// waiting for hotplug-status and changes nothing meanwhile.
func TestHotplugRetriedAfterContention(t *testing.T) {
	e := start(t, time.Hour)
	e.links.create("vif9.0")
	e.s.FailCommits(100) // three Transaction calls' worth of retries, and more
	dir := e.addVif(9, 0, "10.137.0.9", mac)
	e.waitHotplugFor(dir, 30*time.Second)
}
