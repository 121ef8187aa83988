#!/bin/sh
# bench.sh — `make bench-xen`'s measurements, run in dom0 by /init in place
# of scenarios.sh (pack.sh with QGFW_XEN_SCENARIOS=bench.sh and
# QGFW_XEN_BENCH=1, which also packs the Linux firewall VM and iperf3).
#
# Usage: bench.sh SIZES:SECONDS:RUNS:UDPRATE   e.g. "64-48-32-24:5:3:20M"
#
#   a  memory sweep: the firewall image started as qubesd starts it at each
#      size of SIZES (MiB), one client that must reach dom0's TCP echo
#      through it. One line per size:
#        QGFW-XEN sweep <MiB> <boots yes|no> <forwards yes|no> <detail>
#      A boot that fails is a data point, not an error.
#   b  throughput: the firewall at 64 MiB ("fw") and a Linux firewall VM
#      ("lfw": Debian's kernel, nftables masquerade; lfw-init.sh) side by
#      side on dom0's bridge, a client behind each with the same
#      configuration; iperf3 to dom0 (TCP 1 stream both ways, 4 streams,
#      UDP at UDPRATE), ping. RUNS rounds, the order of the two swapped
#      every round, both measured back to back for every metric:
#        QGFW-XEN bench <metric> <go value> <linux value>
#      ("-" when a measurement failed).
#   QGFW-XEN benchinfo <key> <text> lines say what ran.
# Guest consoles are copied to ours as in scenarios.sh, whose helpers this
# script uses (pack.sh puts it in /qgfw/lib). Timeouts only guard against
# hangs.
set -u
G=/qgfw
# The helpers: everything scenarios.sh defines before its first round.
sed '/^round() {/,$d' $G/lib/scenarios.sh > /tmp/helpers.sh
# shellcheck disable=SC1091
. /tmp/helpers.sh
for f in say waitfor grepq fwcfg guestcfg agent expect launch agentready startfw fwkeys follow cleanup; do
	command -v $f >/dev/null || { echo "QGFW-XEN benchinfo error helper $f missing in $G/lib/scenarios.sh"; exit 1; }
done
SPEC=${1:-64-48-40-32-28-24-20:5:3:20M}
SIZES=$(echo "$SPEC" | cut -d: -f1 | tr '-' ' ')
SECS=$(echo "$SPEC" | cut -d: -f2); SECS=${SECS:-5}
RUNS=$(echo "$SPEC" | cut -d: -f3); RUNS=${RUNS:-3}
UDPRATE=$(echo "$SPEC" | cut -d: -f4); UDPRATE=${UDPRATE:-20M}
FWMEM=64 LFWMEM=256 CLMEM=96
R=0
info() { echo "QGFW-XEN benchinfo $*"; }
# setcfg NAME KEY VALUE: change one line of /tmp/NAME.cfg that fwcfg or
# guestcfg wrote, so that the platform settings stay theirs.
setcfg() { sed -i "s|^$2 = .*|$2 = $3|" "/tmp/$1.cfg"; }
FWUP='"mac=00:16:3e:5e:6c:05,bridge=xenbr0"'

# ---- a: memory sweep

# why NAME: the line that best explains why the firewall NAME did not run.
why() {
	f=$CON/guest-$1.log
	l=$(grep -Eh -m1 "fatal|$CRASH|Kernel panic|Out of memory|oom" "$f" 2>/dev/null)
	[ -n "$l" ] || l=$(grep -Eh -m1 'too large|rror' "/tmp/$1.create" 2>/dev/null)
	[ -n "$l" ] || l="last console line: $(grep -v '^\s*$' "$f" 2>/dev/null | tail -1)"
	echo "$l" | sed 's/^\[[^]]*\] //' | cut -c1-200
}
sweep() { # MEMORY
	m=$1 fw=fw$1 c=s$1
	# Below the working size the kernel dies early in a way Xen also
	# reports as a triple fault; one retry tells that from the TCG flake.
	FLAKE_TRIES=2
	cleanup
	rm -f "$CON/guest-$fw.log" "$CON/guest-$c.log" /tmp/agent-*.n
	follow $fw; follow $c
	boots=no fwd=no detail=
	if startfw sweep $fw "$m" "$FWEXTRA" "$FWUP" fwkeys >/tmp/$fw.start 2>&1 &&
		waitfor 90 grepq "$CON/guest-$fw.log" "qubesvm: running"; then
		boots=yes
		guestcfg $c "qgfw.ip=10.137.0.10 qgfw.gw=10.138.0.5" "\"backend=$fw,mac=00:16:3e:5e:6c:00,ip=10.137.0.10\""
		if ! launch sweep $c >/dev/null 2>&1 || ! waitfor 90 agentready $c; then
			detail="client did not come up"
		elif waitfor 3 expect ok $c tcp 10.138.0.1:7; then
			fwd=yes
		else
			detail="client's TCP echo: $(agent $c tcp 10.138.0.1:7)"
		fi
		if ! xl domid $fw >/dev/null 2>&1 || grep -Eq "$CRASH" "$CON/guest-$fw.log"; then
			detail="${detail:+$detail; }the firewall then died: $(why $fw)"
		fi
	else
		detail=$(why $fw)
	fi
	limit=$(grep -o -m1 'memory limit [0-9]* MiB' "$CON/guest-$fw.log" 2>/dev/null)
	echo "QGFW-XEN sweep $m $boots $fwd ${limit:-no memory limit line}${detail:+; $detail}"
}

# ---- b: throughput

# IPERF_AWK reads iperf3 -f m's summary: the receiver's and the sender's
# rate (the [SUM] lines, last, win with -P), the sender's retransmits, the
# receiver's jitter and loss for UDP; iperf3's error, if any. No single
# quotes: it travels inside one.
IPERF_AWK='
/(sender|receiver)$/ {
	k = ($NF == "receiver") ? "rx" : "tx"
	for (i = 2; i < NF; i++) if ($i == "Mbits/sec") {
		v[k] = $(i - 1)
		if (k == "tx" && $(i + 1) ~ /^[0-9]+$/) v["retr"] = $(i + 1)
		if (k == "rx" && $(i + 2) == "ms") { v["jitter"] = $(i + 1); p = $(i + 4); gsub(/[()%]/, "", p); v["losspct"] = p }
	}
}
/^iperf3: / { e = $0; gsub(/[ =]/, "_", e) }
END { for (k in v) printf "%s=%s ", k, v[k]; if (e != "") printf "err=%s", e; print "" }'
PING_AWK='
/transmitted/ { printf "lost=%d ", $1 - $4 }
/round-trip/ { split($4, a, "/"); printf "min=%s avg=%s max=%s", a[1], a[2], a[3] }
END { print "" }'

# iperf VM ARGS...: one iperf3 run from VM to dom0's one-off server; prints
# the agent's result (key=value pairs from IPERF_AWK).
iperf() {
	vm=$1; shift
	timeout $((SECS + 90)) iperf3 -s -1 -B 10.138.0.1 >/tmp/iperf3-s.log 2>&1 &
	srv=$!
	waitfor 10 sh -c "ss -ltn | grep -q '10.138.0.1:5201 '"
	agent "$vm" sh timeout=$((SECS + 45))s "iperf3 -c 10.138.0.1 -f m -t $SECS $* > /tmp/iperf3.out 2>&1; awk '$IPERF_AWK' /tmp/iperf3.out"
	kill $srv 2>/dev/null; wait $srv 2>/dev/null
}
pingrun() { # VM
	agent "$1" sh timeout=60s "ping -c 20 -i 0.2 10.138.0.1 > /tmp/ping.out 2>&1; awk '$PING_AWK' /tmp/ping.out"
}
# cputime DOMAIN: the vCPU seconds the domain has used (xl list).
cputime() { xl list "$1" 2>/dev/null | awk 'NR == 2 { print $6 }'; }
# cpusince DOMAIN T0: its vCPU seconds since it had used T0.
cpusince() {
	c=$(cputime "$1")
	if [ -n "$c" ] && [ -n "$2" ]; then awk "BEGIN { print $c - $2 }"; else echo -; fi
}
# val KEY RESULT: KEY's value in RESULT, "-" without one.
val() {
	v=$(echo "$2" | tr ' ' '\n' | sed -n "s/^$1=//p" | head -1)
	echo "${v:--}"
}
# measure TEST: run TEST for both firewalls (in this round's order) and
# print its metrics.
measure() {
	for v in $ORDER; do
		case $1 in
		tcp1) r=$(iperf c$v -O 1) ;;
		tcp1r) r=$(iperf c$v -O 1 -R) ;;
		tcp4) r=$(iperf c$v -O 1 -P 4) ;;
		udp) r=$(iperf c$v -u -b "$UDPRATE" -l 1400) ;;
		ping) r=$(pingrun c$v) ;;
		esac
		eval "res_$v=\$r"
		case $r in ok*) ;; *) info failed "$1 through $v: $(echo "$r" | cut -c1-200)" ;; esac
	done
	# shellcheck disable=SC2154
	g=$res_fw l=$res_lfw
	case $1 in
	tcp1)
		echo "QGFW-XEN bench tcp1_up_mbit $(val rx "$g") $(val rx "$l")"
		echo "QGFW-XEN bench tcp1_up_retr $(val retr "$g") $(val retr "$l")" ;;
	tcp1r) echo "QGFW-XEN bench tcp1_down_mbit $(val rx "$g") $(val rx "$l")" ;;
	tcp4) echo "QGFW-XEN bench tcp4_up_mbit $(val rx "$g") $(val rx "$l")" ;;
	udp)
		echo "QGFW-XEN bench udp_rx_mbit $(val rx "$g") $(val rx "$l")"
		echo "QGFW-XEN bench udp_loss_pct $(val losspct "$g") $(val losspct "$l")"
		echo "QGFW-XEN bench udp_jitter_ms $(val jitter "$g") $(val jitter "$l")" ;;
	ping)
		echo "QGFW-XEN bench ping_avg_ms $(val avg "$g") $(val avg "$l")"
		echo "QGFW-XEN bench ping_max_ms $(val max "$g") $(val max "$l")"
		echo "QGFW-XEN bench ping_lost $(val lost "$g") $(val lost "$l")" ;;
	esac
}

throughput() {
	FLAKE_TRIES=3
	cleanup
	rm -f $CON/guest-*.log /tmp/agent-*.n
	for g in fw lfw cfw clfw; do follow $g; done
	# The bench clients: the test VMs' initramfs with iperf3 added.
	{ zcat $G/guest-initramfs; zcat $G/iperf3.cpio.gz; } | gzip -1 > /tmp/bench-guest-initramfs

	t0=$(up)
	if ! startfw tp fw $FWMEM "$FWEXTRA" "$FWUP" fwkeys >/tmp/fw.start 2>&1 ||
		! waitfor 90 grepq $CON/guest-fw.log "qubesvm: running"; then
		info failed "the Go firewall did not start: $(why fw)"; return 1
	fi
	t1=$(up)
	# lfw: fwcfg's platform settings, Debian's kernel and lfw-init.sh.
	fwcfg lfw $LFWMEM "console=hvc0 loglevel=4 lfw.ip=10.138.0.6/24 lfw.gw=10.138.0.1 lfw.mac=00:16:3e:5e:6c:06" '"mac=00:16:3e:5e:6c:06,bridge=xenbr0"'
	setcfg lfw kernel "\"$G/lfw-vmlinuz\""
	setcfg lfw ramdisk "\"$G/lfw-initramfs\""
	if ! launch tp lfw; then
		info failed "the Linux firewall did not start: $(grep -v '^\s*$' $CON/guest-lfw.log | tail -3 | tr '\n' '|')"; return 1
	fi
	t2=$(up)
	echo "QGFW-XEN bench boot_s $(awk "BEGIN { print $t1 - $t0 }") $(awk "BEGIN { print $t2 - $t1 }")"
	info memory "go $FWMEM MiB, linux $LFWMEM MiB, clients $CLMEM MiB, 1 vCPU each"
	info lfw "$(grep -E 'lfw: uplink' $CON/guest-lfw.log | sed 's/.*lfw: //')"
	# The same client twice; only its firewall (backend, gateway) differs.
	for v in "fw 10.138.0.5" "lfw 10.138.0.6"; do
		set -- $v
		guestcfg c$1 "qgfw.ip=10.137.0.11 qgfw.gw=$2" "\"backend=$1,mac=00:16:3e:5e:6c:00,ip=10.137.0.11\""
		setcfg c$1 ramdisk '"/tmp/bench-guest-initramfs"'
		setcfg c$1 memory $CLMEM
		launch tp c$1 >/dev/null || { info failed "client behind $1 did not boot"; return 1; }
	done
	for v in fw lfw; do
		waitfor 120 agentready c$v || { info failed "client behind $v: no agent"; return 1; }
		waitfor 30 expect ok c$v tcp 10.138.0.1:7 >/dev/null || { info failed "client behind $v cannot reach dom0: $(agent c$v tcp 10.138.0.1:7)"; return 1; }
	done
	info client "$(agent cfw sh 'iperf3 --version | head -1')"
	info ready "both firewalls forward at $(up) s"
	c0fw=$(cputime fw) c0lfw=$(cputime lfw)
	round_n=1
	while [ $round_n -le "$RUNS" ]; do
		ORDER="fw lfw"; [ $((round_n % 2)) = 0 ] && ORDER="lfw fw"
		info round "$round_n: $ORDER"
		for t in tcp1 tcp1r tcp4 udp ping; do measure $t; done
		round_n=$((round_n + 1))
	done
	info fwstats "$(grep -E 'stats|forwarded' $CON/guest-fw.log | tail -1 | sed 's/^\[[^]]*\] //' | cut -c1-300)"
	echo "QGFW-XEN bench cpu_s $(cpusince fw "$c0fw") $(cpusince lfw "$c0lfw")"
}

exec 3>&1
(while sleep 15; do echo "QGFW-XEN heartbeat $(up)"; done) &
say "xl info: $(xl info | grep -E 'xen_version|virt_caps' | tr -s ' ' | tr '\n' ' ')"
info spec "sizes $SIZES; iperf3 -t $SECS, $RUNS rounds, UDP at $UDPRATE"
info started "$(up)"
for m in $SIZES; do sweep "$m"; done
info sweep-done "$(up)"
throughput
info throughput-done "$(up)"
cleanup
say "finished"
