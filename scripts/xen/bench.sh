#!/bin/sh
# bench.sh — `make bench-xen`'s measurements, run in dom0 by /init in place
# of scenarios.sh (pack.sh with QGFW_XEN_SCENARIOS=bench.sh and
# QGFW_XEN_BENCH=1, which also packs the Linux firewall VM and iperf3).
#
# Usage: bench.sh SIZES:SECONDS:RUNS:UDPRATE[:CLIENTS[:CLIENTSMEM]]
#        e.g. "64-48-32-24:5:3:20M:4-10:32"
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
#      ("-" when a measurement failed). RUNS 0 skips it.
#   c  clients: the firewall at CLIENTSMEM MiB (default 32) as qubesd starts it, client VMs
#      attached one at a time (each must reach dom0's TCP echo when it
#      attaches) up to the last count of CLIENTS ("-"-separated, rising;
#      default 4-10; 0 skips it). Alone first, then at each count: the
#      firewall's memory at rest ("idle"); then every attached client
#      pushes TCP both ways through it at once (iperf3 --bidir for
#      2 x SECONDS, one dom0 server each), each must still reach the
#      echo, the firewall must still run with no crash or OOM on its
#      console, and its memory after that ("burst"). The memory is from
#      the firewall's next stats line (once a minute):
#        QGFW-XEN clients <n> idle|burst <attached> <forwards yes|no> <VmHWM> <VmRSS> <MemAvailable> <MemTotal> <detail>
#      (n clients started, of which <attached> reached the echo; MiB, "-"
#      without a stats line). A failure is a data point.
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
CLIENTS=$(echo "$SPEC" | cut -d: -f5 | tr '-' ' '); CLIENTS=${CLIENTS:-4 10}
CFWMEM=$(echo "$SPEC" | cut -d: -f6); CFWMEM=${CFWMEM:-32}
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

# benchinitramfs: the bench clients' initramfs, the test VMs' with iperf3
# added.
benchinitramfs() {
	[ -s /tmp/bench-guest-initramfs ] || { zcat $G/guest-initramfs; zcat $G/iperf3.cpio.gz; } | gzip -1 > /tmp/bench-guest-initramfs
}
throughput() {
	FLAKE_TRIES=3
	cleanup
	rm -f $CON/guest-*.log /tmp/agent-*.n
	for g in fw lfw cfw clfw; do follow $g; done
	benchinitramfs

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

# ---- c: clients behind a CFWMEM MiB firewall

CCLMEM=64
# clientkeys NAME: fwkeys, and an accept-all ruleset for each of
# section c's clients, 10.137.0.21 and up (cN is 10.137.0.(20+N)).
clientkeys() {
	fwkeys "$1"
	ck_n=1
	while [ $ck_n -le "$NCL" ]; do
		rules "$1" "10.137.0.$((20 + ck_n))" "action=accept"
		ck_n=$((ck_n + 1))
	done
}
# attach N: client cN behind fwc, the bench clients' initramfs (iperf3);
# 0 once it has reached dom0's TCP echo. Every client has Qubes' default
# MAC, as in Qubes: the firewall tells them apart by their vif.
attach() {
	at_c=c$1 at_ip=10.137.0.$((20 + $1))
	follow $at_c
	guestcfg $at_c "qgfw.ip=$at_ip qgfw.gw=10.138.0.5" "\"backend=fwc,mac=00:16:3e:5e:6c:00,ip=$at_ip\""
	setcfg $at_c ramdisk '"/tmp/bench-guest-initramfs"'
	setcfg $at_c memory "$CCLMEM"
	at_t0=$(up)
	if ! launch clients $at_c >/dev/null 2>&1; then
		info failed "client $at_c did not boot: $(grep -Eh -m1 'rror|too large' /tmp/$at_c.create 2>/dev/null | cut -c1-160)"; return 1
	fi
	# The firewall connects the vif, or refuses it (no memory for it):
	# then the client is destroyed at once, not probed for minutes.
	at_be=/local/domain/$(xl domid fwc 2>/dev/null)/backend/vif/$(xl domid $at_c 2>/dev/null)/0
	if ! waitfor 30 sh -c "[ \"\$(timeout 10 xenstore-read $at_be/hotplug-status)\" = connected ]"; then
		info failed "client $at_c ($at_ip): the firewall did not connect its vif (hotplug-status: $(timeout 10 xenstore-read $at_be/hotplug-status 2>&1 | cut -c1-60)); destroyed"
		timeout 60 xl destroy $at_c >/dev/null 2>&1
		return 1
	fi
	if ! waitfor 120 agentready $at_c; then info failed "client $at_c: no agent"; return 1; fi
	if ! waitfor 30 expect ok $at_c tcp 10.138.0.1:7; then
		info failed "client $at_c ($at_ip) cannot reach dom0's TCP echo: $(agent $at_c tcp 10.138.0.1:7)"; return 1
	fi
	info attach "$at_c $at_ip forwards $(awk "BEGIN { print $(up) - $at_t0 }") s after its start"
}
# BURST_AWK reads iperf3 --bidir -f m: both directions' received rates
# summed, or iperf3's error. No single quotes (it travels inside one) and
# no backslashes (xenstore-write turns them into control characters).
BURST_AWK='
/receiver$/ { for (i = 2; i < NF; i++) if ($i == "Mbits/sec") s += $(i - 1) }
/^iperf3: / { e = $0; gsub(/[ =]/, "_", e) }
END { if (e != "") print "err=" e; else print "rx=" s + 0 }'
# burst VM...: the VMs push TCP both ways to dom0 at once, each to its own
# iperf3 server; prints "K/N ok, M Mbit/s in all" (and the failures).
# Bounded whatever the agents do: once the firewall has died, dom0's
# xenstored was seen to stall.
burst() {
	bu_t=$((SECS * 2)) bu_p=5300 bu_srv= bu_ag=
	for bu_c in "$@"; do
		bu_p=$((bu_p + 1))
		timeout $((bu_t + 240)) iperf3 -s -1 -B 10.138.0.1 -p $bu_p >/tmp/iperf3-s-$bu_c.log 2>&1 &
		bu_srv="$bu_srv $!"
	done
	waitfor 20 sh -c "[ \$(ss -ltn | grep -c '10\.138\.0\.1:53[0-9][0-9] ') -ge $# ]"
	bu_p=5300
	for bu_c in "$@"; do
		bu_p=$((bu_p + 1))
		rm -f /tmp/burst-$bu_c.res /tmp/burst-$bu_c.done
		(
			AG_TRIES=$((2 * (bu_t + 200))) agent $bu_c sh timeout=$((bu_t + 180))s \
				"iperf3 -c 10.138.0.1 -p $bu_p -f m -t $bu_t --bidir > /tmp/burst.out 2>&1; st=\$?; awk '$BURST_AWK' /tmp/burst.out; exit \$st" >/tmp/burst-$bu_c.res 2>&1
			: > /tmp/burst-$bu_c.done
		) &
		bu_ag="$bu_ag $!"
	done
	waitfor $((bu_t + 240)) sh -c "for c in $*; do [ -e /tmp/burst-\$c.done ] || exit 1; done"
	# shellcheck disable=SC2086
	kill $bu_ag $bu_srv 2>/dev/null; wait $bu_ag $bu_srv 2>/dev/null
	bu_ok=0 bu_sum=0 bu_bad=
	for bu_c in "$@"; do
		bu_r=$(cat /tmp/burst-$bu_c.res 2>/dev/null)
		[ -e /tmp/burst-$bu_c.done ] || bu_r="no answer within $((bu_t + 240)) s"
		bu_rx=$(val rx "$bu_r")
		case $bu_r in
		ok*rx=*) bu_ok=$((bu_ok + 1)) bu_sum=$(awk "BEGIN { print $bu_sum + $bu_rx }") ;;
		*) bu_bad="$bu_bad $bu_c: $(echo "$bu_r" | cut -c1-80);" ;;
		esac
	done
	echo "iperf3 --bidir -t $bu_t: $bu_ok/$# ok, $bu_sum Mbit/s in all${bu_bad:+;${bu_bad%;}}"
}
# The memory part of the firewall's stats line (boot.MemoryStats).
STATS_RE='memory: VmHWM [0-9.]* MiB, VmRSS [0-9.]* MiB, MemAvailable [0-9.]* MiB, MemTotal [0-9.]* MiB'
nstats() { grep -c "$STATS_RE" $CON/guest-fwc.log 2>/dev/null; }
REFUSED='memory budget exhausted\|no memory for another client vif'
# fwok: fwc still runs, and its console shows no crash and no OOM.
fwok() {
	xl domid fwc >/dev/null 2>&1 && ! grep -Eq "$CRASH|Kernel panic|Out of memory|oom-kill|invoked oom" $CON/guest-fwc.log
}
# newstats SEEN: fwc has logged more than SEEN stats lines, or died.
newstats() { [ "$(nstats)" -gt "$1" ] || ! fwok; }
# memline N PHASE ATTACHED FORWARDS SEEN DETAIL: wait (75 s at most: PID
# 1 logs stats once a minute) for a stats line newer than the SEEN first
# ones and print the result line with its VmHWM, VmRSS, MemAvailable and
# MemTotal (MiB; "-" without one).
memline() {
	ml_mem="- - - -" ml_detail=$6 ml_fwd=$4 ml_seen=$5
	waitfor 75 newstats "$ml_seen"
	if ! fwok; then
		ml_fwd=no ml_detail="$ml_detail; the firewall died: $(why fwc)"
	elif [ "$(nstats)" -gt "$ml_seen" ]; then
		ml_mem=$(grep -o "$STATS_RE" $CON/guest-fwc.log | tail -1 |
			sed 's/memory: VmHWM \([0-9.]*\) MiB, VmRSS \([0-9.]*\) MiB, MemAvailable \([0-9.]*\) MiB, MemTotal \([0-9.]*\) MiB/\1 \2 \3 \4/')
		# Where the VM's memory went (boot.Memory's breakdown), for
		# the report's clients section.
		ml_where=$(grep -o "$STATS_RE ([^)]*)" $CON/guest-fwc.log | tail -1 | sed 's/.* MiB (\(.*\))$/\1/')
		[ -n "$ml_where" ] && info clients-memory "$1 clients, $2: $ml_where"
	else
		ml_detail="$ml_detail; no stats line within 75 s"
	fi
	# Vifs the firewall refused (afpacket.Budget, or no room left for the
	# kernel's part), said once, at rest: how many lines say so, the last.
	ml_ref=$(grep -c "$REFUSED" $CON/guest-fwc.log)
	[ "$2" = idle ] && [ "$ml_ref" -gt 0 ] &&
		ml_detail="$ml_detail; the firewall refused vifs ($ml_ref lines so far), the last: $(grep "$REFUSED" $CON/guest-fwc.log | tail -1 | sed 's/^\[[^]]*\] //; s/.*qubes-go-firewall: //' | cut -c1-200)"
	echo "QGFW-XEN clients $1 $2 $3 $ml_fwd $ml_mem $ml_detail"
}
# checkpoint N: the firewall's memory with the clients attached so far
# (ATT; N meant) at rest, then after they all pushed traffic at once, and
# whether each still reaches the echo.
checkpoint() {
	cp_n=$1 cp_att=$(echo $ATT | wc -w)
	cp_fwd=no; [ "$cp_att" = "$cp_n" ] && cp_fwd=yes
	fwok || cp_fwd=no
	memline "$cp_n" idle "$cp_att" $cp_fwd "$(nstats)" "$cp_att/$cp_n attached"
	if ! fwok; then
		echo "QGFW-XEN clients $cp_n burst $cp_att no - - - - not run: the firewall died: $(why fwc)"
		return
	fi
	# shellcheck disable=SC2086
	cp_detail="$(burst $ATT)"
	cp_seen=$(nstats) cp_echo=0 cp_no=
	for cp_c in $ATT; do
		fwok || break
		# (AG_TRIES: an agent that stopped answering costs 10 s a try.)
		if AG_TRIES=20 waitfor 6 expect ok $cp_c tcp 10.138.0.1:7; then cp_echo=$((cp_echo + 1)); else cp_no="$cp_no $cp_c"; fi
	done
	[ "$cp_echo" = "$cp_n" ] || cp_fwd=no
	memline "$cp_n" burst "$cp_att" $cp_fwd "$cp_seen" "$cp_detail; echo afterwards $cp_echo/$cp_att${cp_no:+ (not:$cp_no)}"
}
clients() {
	c_t0=$(up)
	FLAKE_TRIES=3
	cleanup
	rm -f $CON/guest-*.log /tmp/agent-*.n /tmp/burst-*
	benchinitramfs
	NCL=$(echo "$CLIENTS" | tr ' ' '\n' | tail -1)
	follow fwc
	if ! startfw clients fwc $CFWMEM "$FWEXTRA" "$FWUP" clientkeys >/tmp/fwc.start 2>&1 ||
		! waitfor 90 grepq $CON/guest-fwc.log "qubesvm: running"; then
		info failed "the $CFWMEM MiB firewall did not start: $(why fwc)"
		for n in $CLIENTS; do echo "QGFW-XEN clients $n idle 0 no - - - - the firewall did not start"; done
		return 1
	fi
	# Room for the clients: lower their memory (not below 48 MiB, what
	# the test VMs run with) if Xen has too little left.
	free=$(xl info | awk '$1 == "free_memory" { print $3 }')
	if [ -n "$free" ] && [ $((NCL * CCLMEM + 16)) -gt "$free" ]; then
		CCLMEM=$(((free - 16) / NCL)); [ "$CCLMEM" -lt 48 ] && CCLMEM=48
	fi
	info clients-vm "$CCLMEM MiB"
	info clients "firewall $CFWMEM MiB, $NCL clients of $CCLMEM MiB, Xen's free memory $free MiB; $(grep -o -m1 'link budget: .*' $CON/guest-fwc.log)"
	# The firewall alone first.
	memline 0 idle 0 yes 0 "no client"
	ATT= cn=1
	for n in $CLIENTS; do
		while [ $cn -le "$n" ]; do
			if fwok && attach $cn; then ATT="$ATT c$cn"; fi
			cn=$((cn + 1))
		done
		checkpoint "$n"
	done
	info clients-time "$(awk "BEGIN { print $(up) - $c_t0 }")"
	info clients-fwstats "$(grep "$STATS_RE" $CON/guest-fwc.log | tail -1 | sed 's/^\[[^]]*\] //' | cut -c1-400)"
}

exec 3>&1
(while sleep 15; do echo "QGFW-XEN heartbeat $(up)"; done) &
say "xl info: $(xl info | grep -E 'xen_version|virt_caps' | tr -s ' ' | tr '\n' ' ')"
info spec "sizes $SIZES; iperf3 -t $SECS, $RUNS rounds, UDP at $UDPRATE; clients $CLIENTS"
info started "$(up)"
for m in $SIZES; do sweep "$m"; done
info sweep-done "$(up)"
if [ "$RUNS" -gt 0 ]; then
	throughput
	info throughput-done "$(up)"
fi
if [ "$CLIENTS" != 0 ]; then
	clients
	info clients-done "$(up)"
fi
cleanup
say "finished"
