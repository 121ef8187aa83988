// Package vifs discovers client VMs the way a Qubes firewall VM must: it
// watches the backend/vif directory of our domain in xenstore, and for each
// backend/vif/<domid>/<devid> it reads the client's address (ip, mac), waits
// for netback's vif<domid>.<devid> network device, writes
// hotplug-status=connected (the job of the hotplug script on Linux,
// without which netback never connects the frontend) and hands the link to
// the forwarding engine once the backend is Connected. The client is removed
// when its backend leaves Connected or its directory disappears.
//
// Every vif is handled by its own goroutine, so a vif whose device never
// appears or whose frontend never connects (the emulated-NIC vif of an HVM)
// does not hold up the others.
//
// Duplicate IPs (an HVM's vif and its stub domain's vif carry the same
// address): a vif claims its IP only when its backend reaches Connected;
// the first claim holds it, later vifs with that IP wait, unattached, until
// the holder goes away. The emulated-NIC vif that never connects therefore
// never takes the address from the one that does; this is the policy of
// qubes-mirage-firewall (client_eth.ml add_client).
//
// Removal: when the toolstack takes a vif away it writes online=0, and once
// netback has reached Closed the backend domain must delete the backend
// directory itself — libxl in dom0 waits for that (10 s, then fails the
// domain's destroy), and in a Linux driver domain `xl devd` does it
// (libxl_device.c backend_watch_callback: Closed and online == 0). The
// firewall VM is the driver domain of its clients' vifs, so discovery does
// it. A vif that closes with online=1 (the client's driver reconnecting)
// keeps its directory.
package vifs

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/link"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/xenstore"
)

// Attacher is how discovery hands clients to the forwarding engine.
type Attacher interface {
	// AddClient starts forwarding for the VM with address ip and MAC mac
	// behind l, which it owns from now on (also when it fails). detach
	// stops forwarding, forgets the client and closes l.
	AddClient(ip [4]byte, mac [6]byte, l link.Link) (detach func(), err error)
}

// Links opens network devices.
type Links interface {
	// Open returns the link of the device called name, waiting for the
	// device to appear until ctx ends.
	Open(ctx context.Context, name string) (link.Link, error)
}

// Config is what Run needs.
type Config struct {
	XS       *xenstore.Client
	Attacher Attacher
	Links    Links
	Logf     func(format string, args ...any) // nil: no logging
	// LinkWait bounds the wait for a vif's device (default 1 minute);
	// after it the vif is retried when its backend directory changes.
	LinkWait time.Duration
}

// BackendPath is watched relative to our domain's home path.
const BackendPath = "backend/vif"

// xenbus states (include/xen/interface/io/xenbus.h).
const (
	stateConnected = 4
	stateClosing   = 5
	stateClosed    = 6
)

// Run discovers clients until ctx ends or the xenstore connection fails;
// on return every client it attached has been detached.
func Run(ctx context.Context, cfg Config) error {
	if cfg.Logf == nil {
		cfg.Logf = func(string, ...any) {}
	}
	if cfg.LinkWait <= 0 {
		cfg.LinkWait = time.Minute
	}
	events, cancel, err := cfg.XS.Watch(BackendPath, "qgfw-vifs")
	if err != nil {
		return fmt.Errorf("watch %s: %w", BackendPath, err)
	}
	defer cancel()
	d := &discovery{cfg: cfg, vifs: make(map[key]*vif), owners: make(map[[4]byte]key)}
	defer d.stopAll()
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-events:
			if !ok {
				return fmt.Errorf("watch %s: %w", BackendPath, cfg.XS.Err())
			}
			d.rescan(ctx)
			d.poke(ev.Path)
		}
	}
}

type key struct {
	domid uint16
	devid uint32
}

func (k key) dir() string    { return fmt.Sprintf("%s/%d/%d", BackendPath, k.domid, k.devid) }
func (k key) netdev() string { return fmt.Sprintf("vif%d.%d", k.domid, k.devid) }
func (k key) String() string { return k.netdev() }

type discovery struct {
	cfg Config
	wg  sync.WaitGroup

	mu     sync.Mutex
	vifs   map[key]*vif    // changed only by Run's goroutine
	owners map[[4]byte]key // who holds each client IP

	// txMu runs our transactions one at a time: with many vifs at once
	// (a dom0 starting 80 VMs) concurrent transactions of ours made each
	// other retry until they gave up, and those vifs never connected.
	txMu sync.Mutex
}

type vif struct {
	key    key
	cancel context.CancelFunc
	poke   chan struct{}
}

// rescan starts a goroutine for every new vif and stops those whose
// directory is gone. A listing error other than ENOENT changes nothing.
func (d *discovery) rescan(ctx context.Context) {
	seen, err := d.list()
	if err != nil {
		d.cfg.Logf("vifs: list %s: %v", BackendPath, err)
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for k, v := range d.vifs {
		if !seen[k] {
			v.cancel()
			delete(d.vifs, k)
		}
	}
	for k := range seen {
		if d.vifs[k] == nil {
			vctx, cancel := context.WithCancel(ctx)
			v := &vif{key: k, cancel: cancel, poke: make(chan struct{}, 1)}
			d.vifs[k] = v
			d.wg.Add(1)
			go func() {
				defer d.wg.Done()
				d.run(vctx, v)
			}()
		}
	}
}

func (d *discovery) list() (map[key]bool, error) {
	seen := make(map[key]bool)
	domids, err := d.cfg.XS.Directory(BackendPath)
	if errors.Is(err, xenstore.ENOENT) {
		return seen, nil
	}
	if err != nil {
		return nil, err
	}
	for _, ds := range domids {
		domid, err := strconv.ParseUint(ds, 10, 16)
		if err != nil || strconv.FormatUint(domid, 10) != ds {
			d.cfg.Logf("vifs: ignoring %s/%q: not a domain ID", BackendPath, ds)
			continue
		}
		devids, err := d.cfg.XS.Directory(BackendPath + "/" + ds)
		if errors.Is(err, xenstore.ENOENT) {
			continue // removed since the listing
		}
		if err != nil {
			return nil, err
		}
		for _, ns := range devids {
			devid, err := strconv.ParseUint(ns, 10, 32)
			if err != nil || strconv.FormatUint(devid, 10) != ns {
				d.cfg.Logf("vifs: ignoring %s/%s/%q: not a device ID", BackendPath, ds, ns)
				continue
			}
			seen[key{uint16(domid), uint32(devid)}] = true
		}
	}
	return seen, nil
}

// poke wakes the vifs an event at path may concern.
func (d *discovery) poke(path string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for k, v := range d.vifs {
		dir := k.dir()
		if path == dir || strings.HasPrefix(path, dir+"/") || strings.HasPrefix(dir, path+"/") {
			select {
			case v.poke <- struct{}{}:
			default:
			}
		}
	}
}

func (d *discovery) stopAll() {
	d.mu.Lock()
	for k, v := range d.vifs {
		v.cancel()
		delete(d.vifs, k)
	}
	d.mu.Unlock()
	d.wg.Wait()
}

// claim gives ip to k unless another vif holds it; release gives it back
// and wakes every vif, so that one waiting for the IP claims it.
func (d *discovery) claim(ip [4]byte, k key) (key, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if o, held := d.owners[ip]; held && o != k {
		return o, false
	}
	d.owners[ip] = k
	return k, true
}

func (d *discovery) release(ip [4]byte, k key) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.owners[ip] != k {
		return
	}
	delete(d.owners, ip)
	for o, v := range d.vifs {
		if o != k {
			select {
			case v.poke <- struct{}{}:
			default:
			}
		}
	}
}

// backend is what one read of a vif's backend directory found.
type backend struct {
	gone          bool
	state         int
	ip, mac       string
	hotplugStatus string
	online        string // "0" once the toolstack is removing the device
}

func (d *discovery) read(k key) (backend, error) {
	var b backend
	dir := k.dir()
	if _, err := d.cfg.XS.Read(dir); errors.Is(err, xenstore.ENOENT) {
		b.gone = true
		return b, nil
	} else if err != nil {
		return b, err
	}
	for _, f := range []struct {
		name string
		dst  *string
	}{{"ip", &b.ip}, {"mac", &b.mac}, {"hotplug-status", &b.hotplugStatus}, {"online", &b.online}} {
		v, err := d.cfg.XS.Read(dir + "/" + f.name)
		if err != nil && !errors.Is(err, xenstore.ENOENT) {
			return b, err
		}
		*f.dst = v
	}
	s, err := d.cfg.XS.Read(dir + "/state")
	if err != nil && !errors.Is(err, xenstore.ENOENT) {
		return b, err
	}
	b.state, _ = strconv.Atoi(s) // missing or garbage: 0, "unknown"
	return b, nil
}

// run drives one vif until ctx ends (its directory is gone, or Run stops).
func (d *discovery) run(ctx context.Context, v *vif) {
	k := v.key
	logf := d.cfg.Logf
	var (
		l        link.Link // opened, not yet handed over
		detach   func()
		attached struct {
			ip  [4]byte
			mac [6]byte
		}
		hotplugDone bool
		lastBad     string
		waitingFor  key
		// A xenstore error (contention, a busy daemon) is retried
		// after a back-off, not only when the backend changes again:
		// the toolstack may be waiting for our hotplug-status.
		failures int
		retry    <-chan time.Time
	)
	drop := func(why string) {
		if detach != nil {
			detach()
			detach = nil
			d.release(attached.ip, k)
			logf("vifs: %v: client %v removed (%s)", k, netip.AddrFrom4(attached.ip), why)
		}
		if l != nil {
			l.Close()
			l = nil
		}
	}
	defer drop("vif gone")
	for {
		failed := false
		b, err := d.read(k)
		switch {
		case err != nil:
			logf("vifs: %v: %v", k, err)
			failed = true
		case b.gone || b.state == stateClosing || b.state == stateClosed:
			drop("backend closing")
			hotplugDone = false
			if b.state == stateClosed && b.online == "0" {
				if err := d.remove(k); err != nil {
					logf("vifs: %v: %v", k, err)
					failed = true
				}
			}
		default:
			ip, mac, perr := parseAddrs(b.ip, b.mac)
			if perr != nil {
				if bad := b.ip + "|" + b.mac; bad != lastBad {
					lastBad = bad
					logf("vifs: %v: not attached: %v", k, perr)
				}
				drop("bad address")
				break
			}
			lastBad = ""
			if detach != nil && (ip != attached.ip || mac != attached.mac) {
				drop("address changed")
			}
			if detach == nil && l == nil {
				if l, err = d.open(ctx, k); err != nil {
					if ctx.Err() != nil {
						return
					}
					logf("vifs: %v: %v; retrying when its backend changes", k, err)
					break
				}
			}
			if !hotplugDone {
				if err := d.connected(k); err != nil {
					logf("vifs: %v: %v", k, err)
					failed = true
					break
				}
				hotplugDone = true
			}
			if b.state != stateConnected || detach != nil {
				break
			}
			if o, ok := d.claim(ip, k); !ok {
				if o != waitingFor {
					waitingFor = o
					logf("vifs: %v: IP %v is held by %v; waiting for it to go away", k, netip.AddrFrom4(ip), o)
				}
				// Retried when the holder releases it.
				break
			}
			waitingFor = key{}
			dt, err := d.cfg.Attacher.AddClient(ip, mac, l)
			l = nil // the attacher owns it now, even on failure
			if err != nil {
				d.release(ip, k)
				logf("vifs: %v: attach %v: %v", k, netip.AddrFrom4(ip), err)
				break
			}
			detach = dt
			attached.ip, attached.mac = ip, mac
			logf("vifs: %v: client %v %s attached", k, netip.AddrFrom4(ip), formatMAC(mac))
		}
		if failed {
			failures++
			retry = time.After(min(50*time.Millisecond<<min(failures, 7), 5*time.Second))
		} else {
			failures, retry = 0, nil
		}
		select {
		case <-ctx.Done():
			return
		case <-v.poke:
		case <-retry:
		}
	}
}

// open waits, bounded by LinkWait, for the vif's device.
func (d *discovery) open(ctx context.Context, k key) (link.Link, error) {
	ctx, cancel := context.WithTimeout(ctx, d.cfg.LinkWait)
	defer cancel()
	l, err := d.cfg.Links.Open(ctx, k.netdev())
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", k.netdev(), err)
	}
	return l, nil
}

// connected writes hotplug-status=connected, as the Linux hotplug script's
// success function does (xen tools/hotplug/Linux/xen-hotplug-common.sh),
// in a transaction that first checks that the backend directory still
// exists: a plain write would recreate a directory the toolstack removed.
func (d *discovery) connected(k key) error {
	d.txMu.Lock()
	defer d.txMu.Unlock()
	err := d.cfg.XS.Transaction(func(tx *xenstore.Tx) error {
		if _, err := tx.Read(k.dir()); err != nil {
			return err
		}
		return tx.Write(k.dir()+"/hotplug-status", "connected")
	})
	if err != nil && !errors.Is(err, xenstore.ENOENT) {
		return fmt.Errorf("write hotplug-status: %w", err)
	}
	return nil
}

// remove deletes the backend directory of a vif the toolstack took away,
// in a transaction that checks again that it is Closed and offline, so
// that a vif re-added meanwhile keeps its directory. The parent directory
// (named after the client's domid) is not ours to remove: libxl in dom0
// cleans it up (libxl__device_destroy).
func (d *discovery) remove(k key) error {
	removed := false
	d.txMu.Lock()
	defer d.txMu.Unlock()
	err := d.cfg.XS.Transaction(func(tx *xenstore.Tx) error {
		removed = false
		st, err := tx.Read(k.dir() + "/state")
		if err != nil {
			return err
		}
		on, err := tx.Read(k.dir() + "/online")
		if err != nil {
			return err
		}
		if st != strconv.Itoa(stateClosed) || on != "0" {
			return nil
		}
		removed = true
		return tx.Rm(k.dir())
	})
	switch {
	case errors.Is(err, xenstore.ENOENT):
		return nil // gone already
	case err != nil:
		return fmt.Errorf("remove backend directory: %w", err)
	case removed:
		d.cfg.Logf("vifs: %v: backend directory removed (device taken away)", k)
	}
	return nil
}

// parseAddrs takes the client's IPv4 address from ip (space-separated
// addresses; the first IPv4 one counts, as in vif-route-qubes) and its
// MAC from mac ("xx:xx:xx:xx:xx:xx", as netback's xen_net_read_mac wants).
func parseAddrs(ipList, macStr string) ([4]byte, [6]byte, error) {
	var ip [4]byte
	var mac [6]byte
	found := false
	for _, f := range strings.Fields(ipList) {
		a, err := netip.ParseAddr(f)
		if err != nil || !a.Is4() {
			continue
		}
		if a.IsUnspecified() || a.IsLoopback() || a.IsMulticast() || a == netip.AddrFrom4([4]byte{255, 255, 255, 255}) {
			return ip, mac, fmt.Errorf("unusable client IP %q", f)
		}
		ip, found = a.As4(), true
		break
	}
	if !found {
		return ip, mac, fmt.Errorf("no IPv4 address in ip %q", clip(ipList))
	}
	if len(macStr) != 17 {
		return ip, mac, fmt.Errorf("bad mac %q", clip(macStr))
	}
	for i := range 6 {
		if i > 0 && macStr[3*i-1] != ':' {
			return ip, mac, fmt.Errorf("bad mac %q", macStr)
		}
		v, err := strconv.ParseUint(macStr[3*i:3*i+2], 16, 8)
		if err != nil {
			return ip, mac, fmt.Errorf("bad mac %q", macStr)
		}
		mac[i] = byte(v)
	}
	if mac[0]&1 != 0 || mac == ([6]byte{}) {
		return ip, mac, fmt.Errorf("mac %q is not a unicast address", macStr)
	}
	return ip, mac, nil
}

// clip bounds values quoted in logs.
func clip(s string) string {
	if len(s) > 64 {
		return s[:64] + "..."
	}
	return s
}

func formatMAC(m [6]byte) string {
	return fmt.Sprintf("%02x:%02x:%02x:%02x:%02x:%02x", m[0], m[1], m[2], m[3], m[4], m[5])
}
