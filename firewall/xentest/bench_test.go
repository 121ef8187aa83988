package xentest

import (
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// benchMetric is one row of the throughput table; bench.sh prints its
// values as "QGFW-XEN bench <key> <go> <linux>", once per round.
type benchMetric struct {
	key, label string
	ratio      bool // a Go/Linux ratio means something (no ratio of counts)
}

var benchMetrics = []benchMetric{
	{"tcp1_up_mbit", "TCP, 1 stream, client → dom0 (Mbit/s)", true},
	{"tcp1_down_mbit", "TCP, 1 stream, dom0 → client, `-R` (Mbit/s)", true},
	{"tcp4_up_mbit", "TCP, 4 streams, client → dom0 (Mbit/s)", true},
	{"tcp1_up_retr", "TCP retransmits, 1 stream client → dom0", false},
	{"udp_rx_mbit", "UDP at RATE bit/s, received (Mbit/s)", true},
	{"udp_loss_pct", "UDP loss (%)", false},
	{"udp_jitter_ms", "UDP jitter (ms)", true},
	{"ping_avg_ms", "ping client → dom0, average (ms)", true},
	{"ping_max_ms", "ping client → dom0, maximum (ms)", true},
	{"ping_lost", "pings lost (of 20)", false},
	{"cpu_s", "the firewall domain's vCPU time during the measurements (s)", true},
	{"boot_s", "start → forwarding (s, once)", true},
}

var (
	sweepRE     = regexp.MustCompile(`^QGFW-XEN sweep (\d+) (yes|no) (yes|no) (.*)$`)
	clientsRE   = regexp.MustCompile(`^QGFW-XEN clients (\d+) (idle|burst) (\d+) (yes|no) (\S+) (\S+) (\S+) (\S+) ?(.*)$`)
	benchRE     = regexp.MustCompile(`^QGFW-XEN bench (\S+) (\S+) (\S+)$`)
	benchInfoRE = regexp.MustCompile(`^QGFW-XEN benchinfo (\S+) ?(.*)$`)
	xenVerRE    = regexp.MustCompile(`xen_version : (\S+)`)
)

type sweepRow struct {
	mem            int
	boots, forward bool
	detail         string
}

// clientsRow is one line of section c: the firewall's memory (MiB, as
// bench.sh printed it, "-" when unknown) once n clients were started, of
// which attached reached dom0 through it, at rest or after they all
// pushed traffic through it at once (burst).
type clientsRow struct {
	n, attached            int
	burst, forward         bool
	hwm, rss, avail, total string
	detail                 string
}

// TestXenBench is `make bench-xen`: in one boot of Xen, the smallest
// memory the firewall boots and forwards with, then iperf3 and ping through
// the firewall next to a Linux firewall VM (Debian's kernel, nftables
// masquerade) in the same topology, then client VMs attached one at a time
// to a 32 MiB firewall and its memory with them (scripts/xen/bench.sh). It
// writes a report to <dist>/bench/xen-<UTC time>.md and asserts nothing
// about the numbers: it fails only when the bench could not run.
// QGFW_XEN_BENCH_SIZES (MiB, "-"-separated), QGFW_XEN_BENCH_TIME (iperf3
// seconds), QGFW_XEN_BENCH_RUNS (0 skips the throughput),
// QGFW_XEN_BENCH_UDP (iperf3 -b) and QGFW_XEN_BENCH_CLIENTS (the client
// counts at which the memory is read, rising, "-"-separated; the last is
// how many attach; 0 skips them) shape it.
func TestXenBench(t *testing.T) {
	if os.Getenv("QGFW_XEN_BENCH") != "1" {
		t.Skip("measurements, not a test: run by `make bench-xen` (QGFW_XEN_BENCH=1, QGFW_XEN_DIST)")
	}
	e := needXen(t)
	sizes := envOr("QGFW_XEN_BENCH_SIZES", "64-48-40-32-28-24-20")
	secs := envInt(t, "QGFW_XEN_BENCH_TIME", 5)
	runs := envIntFrom(t, "QGFW_XEN_BENCH_RUNS", 3, 0)
	udp := envOr("QGFW_XEN_BENCH_UDP", "20M")
	if !regexp.MustCompile(`^\d+(-\d+)*$`).MatchString(sizes) || !regexp.MustCompile(`^\d+[KMG]?$`).MatchString(udp) {
		t.Fatalf("QGFW_XEN_BENCH_SIZES=%q, QGFW_XEN_BENCH_UDP=%q: want e.g. 64-32-16 and 20M", sizes, udp)
	}
	clientsSpec := envOr("QGFW_XEN_BENCH_CLIENTS", "4-10")
	clientsMem := envInt(t, "QGFW_XEN_BENCH_CLIENTS_MEM", 32)
	counts, err := parseClientCounts(clientsSpec)
	if err != nil {
		t.Fatalf("QGFW_XEN_BENCH_CLIENTS=%q: %v", clientsSpec, err)
	}
	nsizes := strings.Count(sizes, "-") + 1
	// Only a guard against a hung run: a size takes about a minute under
	// TCG, one that fails at most the retries of its boot; a round of
	// measurements about three minutes; a client about half a minute to
	// attach, a count's burst, checks and stats line at most three.
	e.guard = time.Duration(10+4*nsizes+runs*(2+secs/2)+clientsMinutes(counts)) * time.Minute

	began := time.Now()
	script, err := filepath.Abs("../../scripts/xen/bench.sh")
	if err != nil {
		t.Fatal(err)
	}
	run := prepareRun(t, e, "bench-"+began.UTC().Format("20060102-150405"), "QGFW_XEN_BENCH=1", "QGFW_XEN_SCENARIOS="+script)
	load := loadavg()
	serial := filepath.Join(run, "serial.log")
	spec := fmt.Sprintf("%s:%d:%d:%s:%s:%d", sizes, secs, runs, udp, clientsSpec, clientsMem)
	res, err := bootRetrying(t, e, filepath.Join(run, "dom0.cpio"), spec, serial, run)
	os.Remove(filepath.Join(run, "dom0.cpio"))
	took := time.Since(began)
	if err != nil {
		t.Errorf("%v (serial log %s)", err, serial)
	}
	for _, l := range res.lines {
		t.Log(l)
	}

	var sweep []sweepRow
	var crows []clientsRow
	vals := map[string][2][]float64{} // metric -> Go's and Linux's values
	var order []string                // metrics in the order bench.sh printed them
	info := map[string][]string{}
	var xenVersion string
	var flakes int
	for _, l := range res.lines {
		if m := sweepRE.FindStringSubmatch(l); m != nil {
			mem, _ := strconv.Atoi(m[1])
			sweep = append(sweep, sweepRow{mem, m[2] == "yes", m[3] == "yes", m[4]})
		} else if r, ok := parseClientsLine(l); ok {
			crows = append(crows, r)
		} else if m := benchRE.FindStringSubmatch(l); m != nil {
			if _, seen := vals[m[1]]; !seen {
				order = append(order, m[1])
			}
			v := vals[m[1]]
			for i, s := range m[2:4] {
				if f, err := strconv.ParseFloat(s, 64); err == nil {
					v[i] = append(v[i], f)
				}
			}
			vals[m[1]] = v
		} else if m := benchInfoRE.FindStringSubmatch(l); m != nil {
			info[m[1]] = append(info[m[1]], m[2])
		} else if m := xenVerRE.FindStringSubmatch(l); m != nil {
			xenVersion = m[1]
		} else if strings.Contains(l, " INFO platform flake ") {
			flakes++
		}
	}
	if len(sweep) == 0 && len(vals) == 0 && len(crows) == 0 {
		t.Fatalf("no results at all (serial log %s)", serial)
	}
	if !res.done {
		t.Errorf("dom0 did not finish the bench (serial log %s)", serial)
	}

	var rep strings.Builder
	fmt.Fprintf(&rep, "## qubes-go-firewall under Xen: memory, throughput, clients (`make bench-xen`)\n\n")
	fmt.Fprintf(&rep, "%s UTC; the run took %.0f min; host load %s at the start, %s at the end.\n\n", began.UTC().Format("2006-01-02 15:04"), took.Minutes(), load, loadavg())
	fmt.Fprintf(&rep, "Platform: %s, TCG (`-accel tcg,thread=multi -cpu %s -smp 2 -m 2048`) on a host with %d cores; Xen %s; "+
		"dom0 and the Linux firewall VM run Debian's kernel %s; the firewall image is `%s` (%s).\n\n",
		qemuVersion(), e.cpu, runtime.NumCPU(), orDash(xenVersion), debianKernel(e.cache), e.dist, imageKernel(e.dist))
	fmt.Fprintf(&rep, "> **Under TCG these ratios mostly measure emulation cost.** QEMU emulates every guest instruction (roughly 50x slower than hardware), "+
		"so what costs most is the number of instructions per byte and per packet, in the guests and in Xen, not how a forwarder would do on a real CPU. "+
		"`make bench` (network namespaces, real CPUs) is the CPU comparison; these figures say that the firewall works under real Xen and how it compares under equal emulation.\n\n")

	fmt.Fprintf(&rep, "### Memory: the smallest the firewall boots and forwards with\n\n")
	fmt.Fprintf(&rep, "Each size: the image started as qubesd starts it (`memory = maxmem`, PVH, 1 vCPU, QubesDB keys), one client VM behind it whose TCP connection to dom0's echo server must get its echo.\n\n")
	fmt.Fprintf(&rep, "| memory (MiB) | boots | forwards | what the firewall said, or why not |\n|---:|---|---|---|\n")
	smallest := 0
	for _, r := range sweep {
		fmt.Fprintf(&rep, "| %d | %s | %s | %s |\n", r.mem, yesNo(r.boots), yesNo(r.forward), mdCell(r.detail))
		if r.boots && r.forward && (smallest == 0 || r.mem < smallest) {
			smallest = r.mem
		}
	}
	switch {
	case smallest > 0:
		fmt.Fprintf(&rep, "\nSmallest memory that boots and forwards: **%d MiB** (goal: 32).\n", smallest)
	case len(sweep) > 0:
		fmt.Fprintf(&rep, "\nNo size both booted and forwarded.\n")
	default:
		fmt.Fprintf(&rep, "\nThe sweep did not run.\n")
	}
	if n := nsizes - len(sweep); n > 0 {
		fmt.Fprintf(&rep, "\n%d of %d sizes have no result (the run stopped early).\n", n, nsizes)
	}

	if runs > 0 {
		throughputReport(&rep, vals, order, secs, runs, udp)
	} else {
		fmt.Fprintf(&rep, "\n### Throughput and latency\n\nNot measured (QGFW_XEN_BENCH_RUNS=0).\n")
	}
	clientsReport(&rep, crows, counts, info, secs, clientsMem)
	var notes []string
	for _, k := range []string{"memory", "lfw", "client", "fwstats", "clients-fwstats", "failed", "error"} {
		for _, s := range info[k] {
			notes = append(notes, fmt.Sprintf("- %s: %s", k, s))
		}
	}
	if flakes > 0 {
		notes = append(notes, fmt.Sprintf("- %d guest boot(s) triple-faulted in early boot (the TCG platform flake scenarios.sh describes) and were started again", flakes))
	}
	crashed := slices.Sorted(maps.Keys(res.crashes))
	for _, name := range crashed {
		notes = append(notes, fmt.Sprintf("- crash in %s (a sweep size too small shows here): `%s`", name, mdCell(res.crashes[name])))
	}
	if len(notes) > 0 {
		fmt.Fprintf(&rep, "\nNotes:\n\n%s\n", strings.Join(notes, "\n"))
	}
	fmt.Fprintf(&rep, "\nLogs: `%s` (serial.log and every guest console).\n", run)

	t.Logf("report:\n%s", rep.String())
	out := envOr("QGFW_BENCH_OUT", filepath.Join(e.dist, "bench"))
	if err := os.MkdirAll(out, 0o755); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(out, "xen-"+began.UTC().Format("20060102-150405")+".md")
	if err := os.WriteFile(file, []byte(rep.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("report written to %s", file)
}

// throughputReport writes section b's table: each metric's median for
// both firewalls and their ratio, then every run's values.
func throughputReport(rep *strings.Builder, vals map[string][2][]float64, order []string, secs, runs int, udp string) {
	fmt.Fprintf(rep, "\n### Throughput and latency\n\n")
	fmt.Fprintf(rep, "Side by side on dom0's bridge xenbr0: the Go firewall (64 MiB) and a Linux firewall VM (Debian's kernel as a PVH guest, 256 MiB; "+
		"`ip_forward=1`, nftables `table ip qubes` with masquerade on the uplink, a stateful forward chain, per-client anti-spoofing, "+
		"each client vif configured as Qubes' vif-route-qubes does: proxy ARP and a /32 route; `scripts/xen/lfw-init.sh`). "+
		"Behind each the same client VM (the image's kernel, busybox, iperf3; 96 MiB, through netback in the firewall VM). "+
		"dom0 runs the iperf3 server. `iperf3 -t %d -O 1 -f m`, receiver's rate; %d rounds, the two firewalls measured back to back for each row, "+
		"the order swapped every round; median shown. Ratio = Go / Linux: above 1 the Go firewall is faster for rates, below 1 it is quicker or cheaper for times.\n\n", secs, runs)
	fmt.Fprintf(rep, "| metric | Go firewall | Linux (nftables) | ratio |\n|---|---:|---:|---:|\n")
	var every strings.Builder
	known := map[string]bool{}
	rows := slices.Clone(benchMetrics)
	for _, m := range benchMetrics {
		known[m.key] = true
	}
	for _, k := range order {
		if !known[k] {
			rows = append(rows, benchMetric{k, k, true})
		}
	}
	for _, m := range rows {
		v, ok := vals[m.key]
		if !ok {
			continue
		}
		label := strings.ReplaceAll(m.label, "RATE", udp)
		g, l := median(v[0]), median(v[1])
		ratio := "–"
		if m.ratio && len(v[0]) > 0 && len(v[1]) > 0 && l != 0 {
			ratio = fmt.Sprintf("**%.2f**", g/l)
		}
		fmt.Fprintf(rep, "| %s | %s | %s | %s |\n", label, fmtMedian(v[0]), fmtMedian(v[1]), ratio)
		fmt.Fprintf(&every, "- %s: Go %s; Linux %s\n", m.key, fmtValues(v[0]), fmtValues(v[1]))
	}
	if len(vals) == 0 {
		fmt.Fprintf(rep, "| (no measurements) | | | |\n")
	}
	fmt.Fprintf(rep, "\nEvery run:\n\n%s", every.String())
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

func fmtMedian(v []float64) string {
	if len(v) == 0 {
		return "–"
	}
	return strconv.FormatFloat(median(v), 'g', 4, 64)
}

func fmtValues(v []float64) string {
	if len(v) == 0 {
		return "none"
	}
	s := make([]string, len(v))
	for i, x := range v {
		s[i] = strconv.FormatFloat(x, 'g', 4, 64)
	}
	return strings.Join(s, ", ")
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func orDash(s string) string {
	if s == "" {
		return "–"
	}
	return s
}

// mdCell makes s safe in a Markdown table cell.
func mdCell(s string) string {
	return strings.ReplaceAll(strings.ReplaceAll(s, "|", `\|`), "`", "'")
}

func loadavg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	if f := strings.Fields(string(b)); len(f) >= 3 {
		return strings.Join(f[:3], " ")
	}
	return "–"
}

func qemuVersion() string {
	out, err := exec.Command("qemu-system-x86_64", "--version").Output()
	if err != nil {
		return "QEMU"
	}
	first, _, _ := strings.Cut(string(out), "\n")
	return strings.TrimSpace(strings.Replace(first, "QEMU emulator version", "QEMU", 1))
}

// debianKernel names the dom0 kernel prepare.sh cached: its release and
// the package it came from.
func debianKernel(cache string) string {
	kv, _ := os.ReadFile(filepath.Join(cache, "kit", "kernel-version"))
	s := strings.TrimSpace(string(kv))
	debs, _ := os.ReadFile(filepath.Join(cache, "kit", "debs.txt"))
	for _, d := range strings.Fields(string(debs)) {
		if strings.HasPrefix(d, "linux-image-") {
			s += " (" + strings.TrimSuffix(d, ".deb") + ")"
		}
	}
	return orDash(s)
}

// imageKernel names the kernel source the image was built from, as its
// buildinfo.json records it.
func imageKernel(dist string) string {
	b, _ := os.ReadFile(filepath.Join(dist, "buildinfo.json"))
	if m := regexp.MustCompile(`"(linux-source-[^"]+)\.deb"`).FindSubmatch(b); m != nil {
		return "kernel from " + string(m[1])
	}
	return "kernel: see its buildinfo.json"
}
