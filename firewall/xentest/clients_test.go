package xentest

import (
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// maxClients bounds QGFW_XEN_BENCH_CLIENTS: bench.sh numbers the clients'
// addresses from 10.137.0.21, and each takes at least 48 MiB of dom0's
// 1024.
const maxClients = 20

// parseClientCounts reads QGFW_XEN_BENCH_CLIENTS: rising counts,
// "-"-separated, at which bench.sh's section c reads the firewall's
// memory ("4-10"); "0" skips the section (nil).
func parseClientCounts(s string) ([]int, error) {
	if s == "0" {
		return nil, nil
	}
	if !regexp.MustCompile(`^\d+(-\d+)*$`).MatchString(s) {
		return nil, errors.New("want rising counts such as 4-10, or 0")
	}
	var counts []int
	for _, f := range strings.Split(s, "-") {
		n, err := strconv.Atoi(f)
		if err != nil || n < 1 || n > maxClients {
			return nil, fmt.Errorf("%q: want 1 to %d clients", f, maxClients)
		}
		if len(counts) > 0 && n <= counts[len(counts)-1] {
			return nil, fmt.Errorf("%d after %d: the counts must rise", n, counts[len(counts)-1])
		}
		counts = append(counts, n)
	}
	return counts, nil
}

// parseClientsLine reads a "QGFW-XEN clients" line (clientsRE).
func parseClientsLine(l string) (clientsRow, bool) {
	m := clientsRE.FindStringSubmatch(l)
	if m == nil {
		return clientsRow{}, false
	}
	n, _ := strconv.Atoi(m[1])
	att, _ := strconv.Atoi(m[3])
	return clientsRow{n, att, m[2] == "burst", m[4] == "yes", m[5], m[6], m[7], m[8], m[9]}, true
}

// clientsMinutes is what the guard allows section c: the firewall's
// start and its first stats line, about half a minute per client to boot
// and attach (a minute with retries), and per count a stats line at rest,
// the burst, the checks and the stats line after it (at most four).
func clientsMinutes(counts []int) int {
	if len(counts) == 0 {
		return 0
	}
	return 4 + counts[len(counts)-1] + 4*len(counts)
}

// clientsReport writes section c's table and the per-client costs, from
// the QGFW-XEN clients lines (clientsRE) and the section's benchinfo.
func clientsReport(rep *strings.Builder, rows []clientsRow, counts []int, info map[string][]string, secs, fwMiB int) {
	fmt.Fprintf(rep, "\n### Clients behind a %d MiB firewall\n\n", fwMiB)
	if len(counts) == 0 {
		fmt.Fprintf(rep, "Not measured (QGFW_XEN_BENCH_CLIENTS=0).\n")
		return
	}
	fmt.Fprintf(rep, "The image at %d MiB as qubesd starts it; client VMs (the image's kernel, busybox, iperf3; %s each) attached one at a time, "+
		"each with Qubes' default MAC, its own address and an accept-all ruleset, and each must reach dom0's TCP echo through the firewall when it attaches. "+
		"The firewall alone first; then at each count its memory at rest (\"idle\"), and after every attached client ran `iperf3 --bidir -t %d` "+
		"to its own iperf3 server in dom0, all at once (\"burst\"): every client must then still reach the echo, and the firewall must still run "+
		"with no crash or OOM on its console (\"all forward\"). "+
		"A client the firewall refuses (no memory for it) is destroyed and counts as started, not attached. "+
		"The figures are from the firewall's next stats line (once a minute): VmHWM, the process's peak resident set since boot; VmRSS, now; "+
		"MemAvailable and MemTotal, the VM's (MemTotal would shrink if the kernel handed pages to Xen to map grants into; with XEN_UNPOPULATED_ALLOC it does not). "+
		"Goal (issue 14): VmHWM ≤ 16 MiB at 4 clients, and forwarding with 10.\n\n",
		fwMiB, orDash(strings.Join(info["clients-vm"], ", ")), 2*secs)
	fmt.Fprintf(rep, "| clients started | attached | traffic | all forward | VmHWM (MiB) | VmRSS (MiB) | MemAvailable (MiB) | MemTotal (MiB) | what happened |\n|---:|---:|---|---|---:|---:|---:|---:|---|\n")
	for _, r := range rows {
		phase := "idle"
		if r.burst {
			phase = "burst"
		}
		fmt.Fprintf(rep, "| %d | %d | %s | %s | %s | %s | %s | %s | %s |\n", r.n, r.attached, phase, yesNo(r.forward), r.hwm, r.rss, r.avail, r.total, mdCell(r.detail))
	}
	if n := 1 + 2*len(counts) - len(rows); n > 0 {
		fmt.Fprintf(rep, "\n%d of %d lines have no result (the run stopped early).\n", n, 1+2*len(counts))
	}
	// The firewall's own memory grows with the clients it serves; the
	// kernel's netback takes its pages for every client started, admitted
	// or not.
	hwm := func(r clientsRow) string { return r.hwm }
	total := func(r clientsRow) string { return r.total }
	attached := func(r clientsRow) int { return r.attached }
	started := func(r clientsRow) int { return r.n }
	var costs []string
	if c, ok := perClient(rows, true, hwm, attached); ok {
		costs = append(costs, fmt.Sprintf("- the firewall's VmHWM after the bursts, per attached client: %s", c))
	} else if c, ok := perClient(rows, false, hwm, attached); ok {
		costs = append(costs, fmt.Sprintf("- the firewall's VmHWM at rest, per attached client (no two bursts have figures): %s", c))
	}
	if c, ok := perClient(rows, false, total, started); ok {
		costs = append(costs, fmt.Sprintf("- the VM's MemTotal at rest, per client started: %s", c))
	}
	if len(costs) > 0 {
		fmt.Fprintf(rep, "\nPer-client cost:\n\n%s\n", strings.Join(costs, "\n"))
	}
	if m := info["clients-memory"]; len(m) > 0 {
		fmt.Fprintf(rep, "\nWhere the VM's memory was at each line (the stats line's breakdown, MiB: the kernel's MemFree, Slab and its unreclaimable part, Shmem, KernelStack, PageTables; the firewall's RssAnon):\n\n")
		for _, l := range m {
			fmt.Fprintf(rep, "- %s\n", mdCell(l))
		}
	}
	if a := info["attach"]; len(a) > 0 {
		fmt.Fprintf(rep, "\nAttached: %s.\n", mdCell(strings.Join(a, "; ")))
	}
	if d := info["clients-time"]; len(d) > 0 {
		if s, err := strconv.ParseFloat(d[0], 64); err == nil {
			fmt.Fprintf(rep, "\nThe section took %.0f s (%.1f min).\n", s, s/60)
		}
	}
}

// perClient is how much the figure field grows per client (counted by
// clients) between the first and the last line (of bursts or at rest)
// where it is known and the count differs: (VmHWM@10 − VmHWM@4) / 6 for
// 4-10 with every client attached.
func perClient(rows []clientsRow, burst bool, field func(clientsRow) string, clients func(clientsRow) int) (string, bool) {
	type point struct {
		n int
		v float64
	}
	var known []point
	for _, r := range rows {
		if r.burst != burst {
			continue
		}
		if v, err := strconv.ParseFloat(field(r), 64); err == nil {
			known = append(known, point{clients(r), v})
		}
	}
	if len(known) < 2 || known[0].n == known[len(known)-1].n {
		return "", false
	}
	a, b := known[0], known[len(known)-1]
	d := (b.v - a.v) / float64(b.n-a.n)
	return fmt.Sprintf("(%.1f@%d − %.1f@%d) / %d = **%+.2f MiB** per client (%+.0f KiB)", b.v, b.n, a.v, a.n, b.n-a.n, d, d*1024), true
}

func TestParseClientCounts(t *testing.T) {
	for _, c := range []struct {
		in   string
		want []int
	}{{"4-10", []int{4, 10}}, {"2", []int{2}}, {"1-2-3", []int{1, 2, 3}}, {"0", nil}} {
		got, err := parseClientCounts(c.in)
		if err != nil || fmt.Sprint(got) != fmt.Sprint(c.want) {
			t.Errorf("%q: %v, %v; want %v", c.in, got, err, c.want)
		}
	}
	for _, in := range []string{"", "10-4", "4-4", "4-", "-4", "a", "0-4", "21", "4 10"} {
		if got, err := parseClientCounts(in); err == nil {
			t.Errorf("%q accepted as %v", in, got)
		}
	}
}

// The lines bench.sh prints become the table and the costs.
func TestClientsReport(t *testing.T) {
	var rows []clientsRow
	for _, l := range []string{
		"QGFW-XEN clients 0 idle 0 yes 4.0 4.0 8.0 20.0 no client",
		"QGFW-XEN clients 4 idle 4 yes 5.5 5.0 3.0 16.0 4/4 attached",
		"QGFW-XEN clients 4 burst 4 yes 11.5 10.2 3.1 16.0 iperf3 --bidir -t 10: 4/4 ok, 3.2 Mbit/s in all; echo afterwards 4/4",
		"QGFW-XEN clients 10 idle 9 no - - - - 9/10 attached; the firewall died: Out of memory",
		"QGFW-XEN clients 10 burst 10 yes 14.5 12.0 1.9 10.0 10/10 attached | x",
	} {
		r, ok := parseClientsLine(l)
		if !ok {
			t.Fatalf("%q is not a clients line", l)
		}
		rows = append(rows, r)
	}
	var rep strings.Builder
	clientsReport(&rep, rows, []int{4, 10}, map[string][]string{"clients-time": {"600.5"}, "clients-vm": {"64 MiB"},
		"clients-memory": {"0 clients, idle: MemFree 9.2, Slab 2.0, RssAnon 0.9 MiB", "4 clients, idle: MemFree 7.3 | x"}}, 5, 32)
	for _, want := range []string{
		"| 4 | 4 | burst | yes | 11.5 | 10.2 | 3.1 | 16.0 | iperf3 --bidir",
		"| 10 | 9 | idle | no | - | - | - | - | 9/10 attached; the firewall died: Out of memory |",
		`10/10 attached \| x |`,
		"VmHWM after the bursts, per attached client: (14.5@10 − 11.5@4) / 6 = **+0.50 MiB** per client (+512 KiB)",
		"MemTotal at rest, per client started: (16.0@4 − 20.0@0) / 4 = **-1.00 MiB** per client (-1024 KiB)",
		"took 600 s",
		"`iperf3 --bidir -t 10`",
		"iperf3; 64 MiB each",
		"Where the VM's memory was at each line",
		"- 0 clients, idle: MemFree 9.2, Slab 2.0, RssAnon 0.9 MiB\n",
		`- 4 clients, idle: MemFree 7.3 \| x`,
	} {
		if !strings.Contains(rep.String(), want) {
			t.Errorf("report lacks %q:\n%s", want, rep.String())
		}
	}
	if strings.Contains(rep.String(), "have no result") {
		t.Errorf("all five lines are there:\n%s", rep.String())
	}
	if _, ok := perClient(rows[3:4], false, func(r clientsRow) string { return r.hwm }, func(r clientsRow) int { return r.n }); ok {
		t.Error("a cost from one unknown line")
	}
	// Three attached at "4" and "10" (the rest refused): the firewall's
	// cost is per attached client, MemTotal's per client started.
	refused := []clientsRow{
		{n: 0, hwm: "3.4", total: "20.9"},
		{n: 4, attached: 3, hwm: "5.3", total: "16.9"},
		{n: 10, attached: 3, hwm: "5.4", total: "10.9"},
	}
	if c, ok := perClient(refused, false, func(r clientsRow) string { return r.hwm }, func(r clientsRow) int { return r.attached }); !ok || !strings.Contains(c, "(5.4@3 − 3.4@0) / 3") {
		t.Errorf("per attached client: %q %v", c, ok)
	}
	if c, ok := perClient(refused[1:], false, func(r clientsRow) string { return r.hwm }, func(r clientsRow) int { return r.attached }); ok {
		t.Errorf("a cost between two lines with the same count: %q", c)
	}
}
