package imagetest

import (
	"context"
	"encoding/json"
	"fmt"
	"github.com/qubes-go-firewall/qubes-go-firewall/firewall/internal/netnstest"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// benchTopo is one client behind the VM and one netvm with an echo and an
// iperf3 server:
//
//	client 10.137.0.20/32 --tap-- VM --tap-- netvm 10.137.0.1/24, server 192.0.2.10 on lo
//
// Taps belong to one QEMU run: wire configures the new ones after a boot.
type benchTopo struct {
	tag            string
	up, cl         *netnstest.NS
	uplink, client *nic
}

func newBenchTopo(t *testing.T, tag string) *benchTopo {
	t.Helper()
	b := &benchTopo{tag: tag, up: netnstest.New(t, tag+"u"), cl: netnstest.New(t, tag+"c")}
	// The client NIC has netback's MAC, the one Qubes clients have as
	// their static gateway neighbour: the comparison VM's kernel then
	// accepts the client's frames as it would in Qubes.
	b.uplink = &nic{mac: "00:16:3e:5e:6c:05", ns: b.up}
	b.client = &nic{mac: gatewayMAC, rename: "vif2.0", ns: b.cl}
	b.up.IP(t, "addr", "add", serverIP+"/32", "dev", "lo")
	(&netnstest.Echo{}).Start(t, b.up, serverIP+":7")
	netnstest.Start(t, "iperf3 server", b.up.Command(context.Background(), "iperf3", "-s", "-B", serverIP))
	return b
}

// wire configures the taps of a new VM; it fails only if the taps are
// gone, that is when the VM has already stopped.
func (b *benchTopo) wire() error {
	for _, c := range [][]string{
		{"-n", b.up.Name, "addr", "add", netvm1IP + "/24", "dev", b.uplink.tap},
		// Only the comparison VM needs it: it routes without NAT.
		{"-n", b.up.Name, "route", "add", client2IP + "/32", "via", fwIP1, "dev", b.uplink.tap, "onlink"},
		{"-n", b.cl.Name, "link", "set", b.client.tap, "address", clientMAC},
		{"-n", b.cl.Name, "addr", "add", client2IP + "/32", "dev", b.client.tap},
		{"-n", b.cl.Name, "route", "add", fwIP1, "dev", b.client.tap},
		{"-n", b.cl.Name, "neigh", "replace", fwIP1, "lladdr", gatewayMAC, "dev", b.client.tap, "nud", "permanent"},
		{"-n", b.cl.Name, "route", "add", "default", "via", fwIP1, "dev", b.client.tap, "onlink"},
	} {
		if out, err := exec.Command("ip", c...).CombinedOutput(); err != nil {
			return fmt.Errorf("ip %s: %v: %s", strings.Join(c, " "), err, out)
		}
	}
	return nil
}

// bootResult is one boot of the firewall image.
type bootResult struct {
	started   time.Duration // QEMU start to the firewall's first console line
	forwarded time.Duration // QEMU start to the first UDP echo through the VM
	memLine   string        // the firewall's memory limit line
	err       error         // why it did not forward
	console   string        // the console's end when it failed
}

// bootAndForward boots the firewall image with mem MB in topology b and
// measures the time to the first forwarded packet; it stops the VM
// by killing QEMU unless keep is set. The VM failing is a
// result, not a test failure.
func bootAndForward(t *testing.T, img *image, b *benchTopo, mem int, keep bool) bootResult {
	t.Helper()
	clients := []*clientVM{{domid: 2, ip: client2IP, ns: b.cl, nic: b.client}}
	f := bootFirewall(t, img, b.tag, mem, b.uplink, clients, qubesDB(clients))
	var r bootResult
	if err := b.wire(); err != nil {
		if !f.vm.waitExit(time.Second) {
			t.Fatal(err)
		}
		r.err = fmt.Errorf("the VM stopped (%s) before its taps were configured", f.vm.exitStatus())
		r.console = diagnosis(f.vm.console.String())
		return r
	}
	done := make(chan struct{})
	marker := make(chan time.Duration, 1)
	go func() {
		for {
			if strings.Contains(f.vm.console.String(), bootMarker) {
				marker <- time.Since(f.vm.started)
				return
			}
			select {
			case <-done:
				return
			case <-time.After(10 * time.Millisecond):
			}
		}
	}()
	r.forwarded, r.err = firstForward(f, b)
	close(done)
	select {
	case r.started = <-marker:
	default:
	}
	cons := strings.ReplaceAll(f.vm.console.String(), "\r", "")
	for line := range strings.Lines(cons) {
		if _, after, ok := strings.Cut(line, "memory limit"); ok {
			r.memLine = "memory limit " + strings.TrimSpace(after)
		}
	}
	if r.err != nil {
		r.console = diagnosis(cons)
	}
	if !keep && f.vm.running() {
		// No xenbus under QEMU, so no shutdown request: stop it here.
		f.vm.cmd.Process.Kill()
		f.vm.waitExit(time.Minute)
	}
	return r
}

// firstForward announces the client once the firewall has marked its vif
// connected and sends UDP echo requests from the client until one comes
// back. It gives up when the VM stops or after 90 s.
func firstForward(f *firewallVM, b *benchTopo) (time.Duration, error) {
	var c net.Conn
	if err := b.cl.Do(func() (err error) { c, err = net.Dial("udp4", serverIP+":7"); return }); err != nil {
		return 0, err
	}
	defer c.Close()
	deadline := time.Now().Add(90 * time.Second)
	connected := false
	buf := make([]byte, 64)
	for time.Now().Before(deadline) {
		if !f.vm.running() {
			return 0, fmt.Errorf("the VM stopped (%s)", f.vm.exitStatus())
		}
		if !connected {
			if v, _ := f.xs.Read("backend/vif/2/0/hotplug-status"); v == "connected" {
				f.xs.Write("backend/vif/2/0/state", "4")
				connected = true
			}
		}
		c.Write([]byte("probe"))
		c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		if n, err := c.Read(buf); err == nil && string(buf[:n]) == "probe" {
			return time.Since(f.vm.started), nil
		} else if err != nil && !isTimeout(err) {
			time.Sleep(100 * time.Millisecond) // an ICMP error: not ready yet
		}
	}
	if !connected {
		return 0, fmt.Errorf("the firewall never marked vif2.0 connected")
	}
	return 0, fmt.Errorf("no packet forwarded within 90 s")
}

// diagnosis picks the console lines that say why a boot failed: the
// kernel's panic and OOM lines and the firewall's fatal error, else the
// last lines.
func diagnosis(console string) string {
	var picked []string
	for line := range strings.Lines(strings.ReplaceAll(console, "\r", "")) {
		for _, s := range []string{"Kernel panic", "Out of memory", "oom", "fatal", "Killed process", "out of memory", "Initramfs unpacking failed"} {
			if strings.Contains(line, s) {
				picked = append(picked, strings.TrimSpace(line))
				break
			}
		}
	}
	if len(picked) == 0 {
		var rest []string
		for line := range strings.Lines(netnstest.Tail(console, 4)) {
			if !strings.Contains(line, "QEMU waiting for connection") && strings.TrimSpace(line) != "" {
				rest = append(rest, strings.TrimSpace(line))
			}
		}
		if len(rest) == 0 {
			return "no console output: the kernel never ran"
		}
		return strings.Join(rest, " / ")
	}
	return strings.Join(picked[:min(len(picked), 4)], " / ")
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}

// TestImageBench measures the image: sizes, boot time to the first
// forwarded packet, the smallest memory it boots and forwards with, and
// iperf3 throughput through it next to the same kernel forwarding.
// Results go to the log and to a report file.
func TestImageBench(t *testing.T) {
	img := needImage(t)
	if os.Getenv("QGFW_IMAGE_BENCH") == "" {
		t.Skip("measurements, not a test: run by `make bench-image` (QGFW_IMAGE_BENCH=1)")
	}
	boots := envInt("QGFW_BENCH_BOOTS", 3)
	secs := envInt("QGFW_BENCH_TIME", 5)
	runs := envInt("QGFW_BENCH_RUNS", 3)
	mem := testMem()
	var rep strings.Builder
	began := time.Now()
	load, _ := os.ReadFile("/proc/loadavg")
	fmt.Fprintf(&rep, "## qubes-go-firewall image in QEMU (%s, TCG)\n\n%s UTC, kernel %s, initramfs %s, load %s at the start.\n\n",
		img.machine, began.UTC().Format("2006-01-02 15:04"), img.kernel, img.initrd, strings.Join(strings.Fields(string(load))[:3], " "))

	fmt.Fprintf(&rep, "### Sizes\n\n| file | bytes |\n|---|---:|\n")
	for _, name := range []string{"vmlinuz", "initramfs", "vmlinux"} {
		if st, err := os.Stat(filepath.Join(img.dist, name)); err == nil {
			fmt.Fprintf(&rep, "| %s | %d |\n", name, st.Size())
		}
	}

	topo := newBenchTopo(t, tagFor("qgb"))
	fmt.Fprintf(&rep, "\n### Boot time, -m %d (%d boots)\n\n| boot | QEMU start → firewall's first line (s) | → first forwarded UDP echo (s) |\n|---|---:|---:|\n", mem, boots)
	var fwd []float64
	for i := range boots {
		t.Run(fmt.Sprintf("boot-%d", i), func(t *testing.T) {
			r := bootAndForward(t, img, topo, mem, false)
			if r.err != nil {
				t.Fatalf("boot with -m %d: %v\n%s", mem, r.err, r.console)
			}
			fwd = append(fwd, r.forwarded.Seconds())
			fmt.Fprintf(&rep, "| %d | %.2f | %.2f |\n", i+1, r.started.Seconds(), r.forwarded.Seconds())
		})
	}
	if len(fwd) > 0 {
		fmt.Fprintf(&rep, "\nMedian time to the first forwarded packet: **%.2f s**.\n", median(fwd))
	}

	fmt.Fprintf(&rep, "\n### Memory floor\n\nAscending -m until the image boots and forwards a UDP echo:\n\n| -m (MB) | result |\n|---:|---|\n")
	floor := 0
	for _, m := range []int{24, 28, 32, 36, 40, 44, 48, 56, 64} {
		t.Run(fmt.Sprintf("mem-%d", m), func(t *testing.T) {
			r := bootAndForward(t, img, topo, m, false)
			if r.err != nil {
				fmt.Fprintf(&rep, "| %d | fails: %v; console: `%s` |\n", m, r.err, strings.Join(strings.Fields(r.console), " "))
				return
			}
			floor = m
			fmt.Fprintf(&rep, "| %d | forwards after %.2f s (%s) |\n", m, r.forwarded.Seconds(), r.memLine)
		})
		if floor > 0 {
			break
		}
	}
	if floor > 0 {
		fmt.Fprintf(&rep, "\nMemory floor: **%d MB** (goal 32).\n", floor)
	} else {
		fmt.Fprintf(&rep, "\nMemory floor: not found up to 64 MB.\n")
	}
	// The virtio-serial ports are test transport, and costly under
	// microvm. Booting without NICs, with and without them, until the
	// firewall runs as PID 1 (its "memory limit" line; it then waits for
	// or misses xenstore) shows what they cost.
	fmt.Fprintf(&rep, "\nNo NICs: the smallest -m at which the firewall runs as PID 1 (its memory limit line), without and with the virtio-serial ports:\n\n| -m (MB) | no ports | virtio-serial ports |\n|---:|---|---|\n")
	ran := map[bool]bool{}
	for _, m := range []int{28, 30, 32, 36, 40, 44} {
		row := [2]string{"", ""}
		for i, serial := range []bool{false, true} {
			if ran[serial] {
				row[i] = "–"
				continue
			}
			t.Run(fmt.Sprintf("start-%d-serial-%v", m, serial), func(t *testing.T) {
				v := startVM(t, img, tagFor("qgs"), vmConfig{mem: m, serial: serial})
				waitFor(t, "the firewall's start or the VM's end", func() bool {
					return !v.running() || strings.Contains(v.console.String(), "memory limit")
				})
				cons := strings.ReplaceAll(v.console.String(), "\r", "")
				if at := strings.Index(cons, "memory limit"); at >= 0 {
					ran[serial] = true
					row[i] = strings.TrimSpace(strings.SplitN(cons[at:], "\n", 2)[0])
				} else {
					row[i] = "fails: `" + strings.Join(strings.Fields(diagnosis(cons)), " ") + "`"
				}
			})
		}
		fmt.Fprintf(&rep, "| %d | %s | %s |\n", m, row[0], row[1])
		if ran[false] && ran[true] {
			break
		}
	}
	fmt.Fprintf(&rep, "\nBelow about 32 MB QEMU cannot place the kernel (loaded at 16 MB physical) and the initramfs: nothing reaches the console. "+
		"The virtio-serial ports exist only under test: under microvm every virtqueue has 1024 entries and the guest's virtio_console driver fills each receive queue with 4 KiB buffers "+
		"(control queue and two ports: about 12 MB of kernel slab), which xenbus and vchan in Qubes do not cost.\n")

	t.Run("throughput", func(t *testing.T) {
		fmt.Fprintf(&rep, "\n### iperf3 through the VM, -m %d\n\n", mem)
		tf := newBenchTopo(t, tagFor("qgf"))
		if r := bootAndForward(t, img, tf, mem, true); r.err != nil {
			t.Fatalf("firewall VM: %v\n%s", r.err, r.console)
		}
		tk := newBenchTopo(t, tagFor("qgk"))
		initrd := filepath.Join(t.TempDir(), "forwarder.cpio")
		if err := forwarderInitramfs(initrd); err != nil {
			t.Fatal(err)
		}
		kv := startVM(t, img, tk.tag, vmConfig{initrd: initrd, mem: mem, nics: []*nic{tk.uplink, tk.client}})
		if err := tk.wire(); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "the kernel-forwarding VM", func() bool {
			if !kv.running() {
				t.Fatalf("the kernel-forwarding VM stopped: %v", kv.exitErr)
			}
			return strings.Contains(kv.console.String(), forwarderReady) && netnstest.UDPEcho(tk.cl, serverIP+":7") == nil
		})
		res := map[string][]float64{}
		frames := map[string][2]uint64{} // bytes and frames the netvm received
		for i := range runs {
			order := []string{"kernel", "firewall"}
			if i%2 == 1 {
				slices.Reverse(order)
			}
			for _, v := range order {
				topo := tf
				if v == "kernel" {
					topo = tk
				}
				b0, p0 := tapRx(topo.up, topo.uplink.tap)
				bps, err := iperf(topo.cl, secs)
				if err != nil {
					t.Fatalf("%s: %v", v, err)
				}
				b1, p1 := tapRx(topo.up, topo.uplink.tap)
				res[v] = append(res[v], bps/1e6)
				frames[v] = [2]uint64{frames[v][0] + b1 - b0, frames[v][1] + p1 - p0}
			}
		}
		k, f := median(res["kernel"]), median(res["firewall"])
		fmt.Fprintf(&rep, "TCP, 1 stream client→server, `iperf3 -t %d`, receiver's rate, median of %d alternating runs. The comparison VM boots the same kernel with a Go /init that only sets addresses, routes and ip_forward=1: plain kernel routing, no NAT (the kernel has no netfilter).\n\n", secs, runs)
		fmt.Fprintf(&rep, "| | kernel routing | firewall | firewall/kernel |\n|---|---:|---:|---:|\n| Mbit/s | %.1f | %.1f | **%.2f** |\n", k, f, f/k)
		fmt.Fprintf(&rep, "\nEvery run (Mbit/s): kernel %s; firewall %s.\n", fmtList(res["kernel"]), fmtList(res["firewall"]))
		avg := func(v string) uint64 { return frames[v][0] / max(frames[v][1], 1) }
		fmt.Fprintf(&rep, "\nAverage frame the netvm received from the VM: kernel %d bytes, firewall %d bytes (above 1514: GSO super-frames carried through whole).\n", avg("kernel"), avg("firewall"))
	})
	load, _ = os.ReadFile("/proc/loadavg")
	fmt.Fprintf(&rep, "\nMeasuring took %.0f s; load %s at the end. TCG emulates the guest CPU: absolute rates say little, the ratio and the memory floor do.\n",
		time.Since(began).Seconds(), strings.Join(strings.Fields(string(load))[:3], " "))

	t.Logf("report:\n%s", rep.String())
	out := os.Getenv("QGFW_BENCH_OUT")
	if out == "" {
		out = filepath.Join(img.dist, "bench")
	}
	if err := os.MkdirAll(out, 0o755); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(out, "image-"+began.UTC().Format("20060102-150405")+".md")
	if err := os.WriteFile(file, []byte(rep.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("report written to %s", file)
}

// iperf runs one iperf3 TCP test from n to the server and returns the
// receiver's bits/s.
func iperf(n *netnstest.NS, secs int) (float64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(secs+60)*time.Second)
	defer cancel()
	out, err := n.Command(ctx, "iperf3", "-c", serverIP, "-t", strconv.Itoa(secs), "-J").Output()
	var r struct {
		Error string
		End   struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		}
	}
	if jerr := json.Unmarshal(out, &r); jerr != nil || r.Error != "" || err != nil {
		return 0, fmt.Errorf("iperf3: %v %s %v: %s", err, r.Error, jerr, netnstest.Tail(string(out), 10))
	}
	return r.End.SumReceived.BitsPerSecond, nil
}

// tapRx reads the bytes and frames tap in n has received from the VM.
func tapRx(n *netnstest.NS, tap string) (bytes, frames uint64) {
	read := func(stat string) uint64 {
		out, _ := n.Command(context.Background(), "cat", "/sys/class/net/"+tap+"/statistics/"+stat).Output()
		v, _ := strconv.ParseUint(strings.TrimSpace(string(out)), 10, 64)
		return v
	}
	return read("rx_bytes"), read("rx_packets")
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func fmtList(v []float64) string {
	var s []string
	for _, x := range v {
		s = append(s, fmt.Sprintf("%.1f", x))
	}
	return strings.Join(s, ", ")
}
