#!/usr/bin/env bash
# Benchmarks the firewall binary against Linux kernel forwarding with
# nftables masquerade, in the same network-namespace topology, and prints
# one markdown table with both and the ratios firewall/kernel.
#
#   client (10.137.0.20/32) --veth-- fw --veth-- netvm (10.137.0.1/24,
#                                                 server 192.0.2.10 on lo)
#
# Variant "firewall": fw's interfaces carry no addresses; the firewall
# forwards between AF_PACKET sockets, configured from an in-repo QubesDB
# server. Variant "kernel": fw routes with ip_forward=1 and masquerades with
# nftables, like a stock sys-firewall. Offloads stay at their veth defaults
# in both. The two topologies exist side by side and the runs alternate
# between them, so load from other work on the machine hits both alike.
#
# Root only. Environment (defaults keep `make bench` under ~10 minutes):
#   BENCH_TIME=8          seconds per iperf3 run
#   BENCH_RUNS=3          repetitions of every measurement (median shown)
#   BENCH_REVERSE=1       also measure TCP server->client (iperf3 -R)
#   BENCH_UDP_LEN=64      UDP payload bytes for the packet-rate test
#   BENCH_PINGS=200       pings per latency run, at BENCH_PING_INTERVAL=0.01 s
#   BENCH_OUT=dist/bench  directory for the report (relative to the repo root)
#   BENCH_BIN=            directory with prebuilt firewall and qubesdb binaries
set -euo pipefail

BENCH_TIME=${BENCH_TIME:-8}
BENCH_RUNS=${BENCH_RUNS:-3}
BENCH_REVERSE=${BENCH_REVERSE:-1}
BENCH_UDP_LEN=${BENCH_UDP_LEN:-64}
BENCH_PINGS=${BENCH_PINGS:-200}
BENCH_PING_INTERVAL=${BENCH_PING_INTERVAL:-0.01}
BENCH_OUT=${BENCH_OUT:-dist/bench}
BENCH_BIN=${BENCH_BIN:-}

CLIENT_IP=10.137.0.20
FW_IP=10.137.0.5
NETVM_IP=10.137.0.1
SERVER_IP=192.0.2.10
VARIANTS=(kernel firewall)

repo=$(cd "$(dirname "$0")/.." && pwd)
die() { echo "bench: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (network namespaces)"
# jq reads iperf3's JSON reports; the only tool setup-host.sh does not bring.
if ! command -v jq >/dev/null; then
	echo "bench: installing jq" >&2
	{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends jq; } >/dev/null ||
		die "cannot install jq"
fi
for tool in ip nft iperf3 ping jq go; do
	command -v "$tool" >/dev/null || die "missing $tool (run ./scripts/setup-host.sh)"
done

work=$(mktemp -d /tmp/qgfw-bench.XXXXXX)
prefix="qgfwb$$"
pids=()
namespaces=()

cleanup() {
	local rc=$? p ns
	set +e
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
	# Anything else still inside our namespaces was started by this script.
	for ns in "${namespaces[@]}"; do
		for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
		ip netns del "$ns" 2>/dev/null
	done
	rm -rf "$work"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# nsx VARIANT ROLE CMD... runs CMD in the namespace ROLE of VARIANT.
ns() { echo "$prefix-$1-$2"; }
nsx() { local n; n=$(ns "$1" "$2"); shift 2; ip netns exec "$n" "$@"; }

# spawn LOG VARIANT ROLE CMD... starts CMD in the background and records
# its pid for cleanup: ip netns exec execs CMD, so $! is CMD's own pid
# (VmHWM is read from it).
spawn() {
	local log=$1 n
	n=$(ns "$2" "$3")
	shift 3
	ip netns exec "$n" "$@" >"$log" 2>&1 &
	pids+=("$!")
	spawned=$!
}

build() {
	if [ -n "$BENCH_BIN" ]; then
		cp "$BENCH_BIN/firewall" "$BENCH_BIN/qubesdb" "$work/"
		return
	fi
	echo "bench: building firewall and qubesdb" >&2
	(cd "$repo/firewall" && GOTOOLCHAIN=local GOFLAGS=-buildvcs=false CGO_ENABLED=0 \
		go build -trimpath -o "$work/" ./cmd/firewall ./cmd/qubesdb) || die "go build failed"
}

# topology VARIANT creates the three namespaces and everything that is
# the same in both variants.
topology() {
	local v=$1 role
	for role in client fw netvm; do
		ip netns add "$(ns "$v" "$role")"
		namespaces+=("$(ns "$v" "$role")")
		nsx "$v" "$role" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
		nsx "$v" "$role" ip link set lo up
	done
	ip -n "$(ns "$v" fw)" link add eth0 type veth peer name eth0 netns "$(ns "$v" netvm)"
	ip -n "$(ns "$v" fw)" link add vif1 type veth peer name eth0 netns "$(ns "$v" client)"

	# A Qubes client: /32 address, gateway reached on-link, Qubes MACs.
	nsx "$v" fw ip link set vif1 address fe:ff:ff:ff:ff:ff
	nsx "$v" client ip link set eth0 address 00:16:3e:5e:6c:00
	nsx "$v" client ip addr add "$CLIENT_IP/32" dev eth0
	nsx "$v" client ip link set eth0 up
	nsx "$v" client ip route add "$FW_IP" dev eth0
	nsx "$v" client ip route add default via "$FW_IP" dev eth0 onlink

	nsx "$v" netvm ip addr add "$NETVM_IP/24" dev eth0
	nsx "$v" netvm ip addr add "$SERVER_IP/32" dev lo
	nsx "$v" netvm ip link set eth0 up
	nsx "$v" netvm ip route add "$CLIENT_IP/32" via "$FW_IP" dev eth0

	nsx "$v" fw ip link set eth0 up
	nsx "$v" fw ip link set vif1 up
	spawn "$work/iperf3-$v.log" "$v" netvm iperf3 -s -B "$SERVER_IP"
}

setup_kernel() {
	nsx kernel fw ip addr add "$FW_IP/24" dev eth0
	nsx kernel fw ip addr add "$FW_IP/32" dev vif1
	nsx kernel fw ip route add "$CLIENT_IP/32" dev vif1
	nsx kernel fw ip route add default via "$NETVM_IP" dev eth0
	nsx kernel fw sysctl -qw net.ipv4.ip_forward=1
	nsx kernel fw nft -f - <<-EOF
		table ip nat {
			chain postrouting {
				type nat hook postrouting priority srcnat; policy accept;
				oifname "eth0" masquerade
			}
		}
		table ip filter {
			chain forward {
				type filter hook forward priority filter; policy drop;
				ct state established,related accept
				iifname "vif1" ip saddr $CLIENT_IP accept
			}
		}
	EOF
}

fw_pid=
setup_firewall() {
	cat >"$work/qubesdb.init" <<-EOF
		/qubes-ip $FW_IP
		/qubes-netmask 255.255.255.0
		/qubes-gateway $NETVM_IP
		/qubes-primary-dns 10.139.1.1
		/qubes-secondary-dns 10.139.1.2
		/qubes-firewall/$CLIENT_IP/policy drop
		/qubes-firewall/$CLIENT_IP/0000 action=accept
		/qubes-firewall/$CLIENT_IP 
	EOF
	"$work/qubesdb" serve -socket "$work/qubesdb.sock" -init "$work/qubesdb.init" >"$work/qubesdb.log" 2>&1 &
	pids+=("$!")
	local i
	for i in $(seq 50); do [ -S "$work/qubesdb.sock" ] && break; sleep 0.1; done
	[ -S "$work/qubesdb.sock" ] || die "qubesdb server did not start: $(cat "$work/qubesdb.log")"
	spawn "$work/firewall.log" firewall fw "$work/firewall" -uplink eth0 \
		-client "vif1=$CLIENT_IP" -qubesdb "$work/qubesdb.sock" -stats-interval 10s
	fw_pid=$spawned
}

# wait_flowing VARIANT polls a ping through the middle box.
wait_flowing() {
	local i
	for i in $(seq 30); do
		nsx "$1" client ping -c 1 -W 1 -q "$SERVER_IP" >/dev/null 2>&1 && return 0
		sleep 0.5
	done
	[ "$1" = firewall ] && echo "firewall stderr:" >&2 && cat "$work/firewall.log" >&2
	die "$1: no traffic flows from client to server"
}

# record VARIANT METRIC VALUE appends one run's value.
declare -A vals
record() { vals[$1.$2]="${vals[$1.$2]:-} $3"; }

median() {
	tr ' ' '\n' | awk 'NF { v[n++] = $1 } END {
		if (n == 0) { print "n/a"; exit }
		for (i = 0; i < n; i++) for (j = i + 1; j < n; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }
		print (n % 2) ? v[int(n / 2)] : (v[n / 2 - 1] + v[n / 2]) / 2 }'
}

notes=()
note() { notes+=("$*"); echo "bench: $*" >&2; }

# iperf VARIANT ARGS... runs one iperf3 client with its JSON report in
# $work/iperf.json; it retries once, since iperf3 occasionally fails to set
# up a test.
iperf() {
	local v=$1 try
	shift
	for try in 1 2; do
		if timeout $((BENCH_TIME + 30)) ip netns exec "$(ns "$v" client)" \
			iperf3 -c "$SERVER_IP" -t "$BENCH_TIME" -J "$@" >"$work/iperf.json" 2>"$work/iperf.err" &&
			jq -e '.error == null' "$work/iperf.json" >/dev/null 2>&1; then
			return 0
		fi
		sleep 1
	done
	note "$v: iperf3 $* failed: $(jq -r '.error // empty' "$work/iperf.json" 2>/dev/null || true) $(head -c 300 "$work/iperf.err")"
	return 1
}

# jqr FILTER evaluates FILTER on the last iperf3 report.
jqr() { jq "$1" "$work/iperf.json"; }

tcp() {
	local v=$1 key=$2
	shift 2
	iperf "$v" -O 1 "$@" || return 0
	record "$v" "$key" "$(jqr '.end.sum_received.bits_per_second / 1e9')"
	record "$v" "$key.retr" "$(jqr '.end.sum_sent.retransmits // 0')"
}

udp() {
	local v=$1
	iperf "$v" -u -l "$BENCH_UDP_LEN" -b 0 || return 0
	# end.sum: packets the client sent, lost_packets as counted by the server.
	record "$v" udp.pps "$(jqr '(.end.sum.packets - .end.sum.lost_packets) / .end.sum.seconds / 1000')"
	record "$v" udp.sent "$(jqr '.end.sum.packets / .end.sum.seconds / 1000')"
	record "$v" udp.loss "$(jqr '.end.sum.lost_percent')"
}

pinglat() {
	local v=$1 out rtt
	if ! out=$(nsx "$v" client ping -q -c "$BENCH_PINGS" -i "$BENCH_PING_INTERVAL" -W 1 "$SERVER_IP" 2>&1); then
		note "$v: ping failed: $(tail -n 2 <<<"$out" | tr '\n' ' ')"
	fi
	# rtt min/avg/max/mdev = 0.031/0.052/0.210/0.017 ms[, pipe 2]
	rtt=$(sed -n 's|^rtt [^=]*= \([0-9./]*\) ms.*|\1|p' <<<"$out")
	if [ -z "$rtt" ]; then
		note "$v: no rtt line from ping: $(tail -n 2 <<<"$out" | tr '\n' ' ')"
		return 0
	fi
	record "$v" ping.avg "$(cut -d/ -f2 <<<"$rtt")"
	record "$v" ping.mdev "$(cut -d/ -f4 <<<"$rtt")"
	record "$v" ping.loss "$(sed -n 's/.* \([0-9.]*\)% packet loss.*/\1/p' <<<"$out")"
}

measure() {
	local v=$1
	echo "bench: $v: run $2/$BENCH_RUNS" >&2
	tcp "$v" tcp1
	tcp "$v" tcp4 -P 4
	if [ "$BENCH_REVERSE" = 1 ]; then
		tcp "$v" tcp1r -R
		tcp "$v" tcp4r -P 4 -R
	fi
	udp "$v"
	pinglat "$v"
	if [ "$v" = firewall ] && ! kill -0 "$fw_pid" 2>/dev/null; then
		echo "firewall stderr:" >&2
		cat "$work/firewall.log" >&2
		die "the firewall exited during the benchmark"
	fi
}

build
for v in "${VARIANTS[@]}"; do topology "$v"; done
setup_kernel
setup_firewall
for v in "${VARIANTS[@]}"; do wait_flowing "$v"; done

load_start=$(cut -d' ' -f1-3 /proc/loadavg)
started=$(date +%s)
for run in $(seq "$BENCH_RUNS"); do
	# Alternate the order so slow drift in machine load hits both alike.
	if [ $((run % 2)) = 1 ]; then order=(kernel firewall); else order=(firewall kernel); fi
	for v in "${order[@]}"; do measure "$v" "$run"; done
done
elapsed=$(($(date +%s) - started))

status=$(cat "/proc/$fw_pid/status")
hwm_kb=$(awk '/^VmHWM:/ { print $2 }' <<<"$status")
rss_kb=$(awk '/^VmRSS:/ { print $2 }' <<<"$status")
# utime + stime, fields 14 and 15 of /proc/PID/stat (the name in field 2 has no spaces here).
fw_cpu=$(awk -v hz="$(getconf CLK_TCK)" '{ printf "%.1f", ($14 + $15) / hz }' "/proc/$fw_pid/stat")
# Frames the kernel dropped because a packet socket's receive buffer was
# full (sk_drops, "d" in ss's skmem): loss the firewall's own counters miss.
fw_sockdrops=$(ip netns exec "$(ns firewall fw)" ss -0 -a -m -n -H 2>&1 | tr -s ' \n' ' ') || true
fw_stats=$(grep 'forwarded' "$work/firewall.log" | tail -n 1 | sed 's/^.*firewall: //') || true

# row LABEL METRIC FORMAT [noratio]: median of both variants and the
# ratio (left out where a ratio means nothing, e.g. loss percentages).
row() {
	local label=$1 key=$2 fmt=$3 k f ratio=–
	k=$(median <<<"${vals[kernel.$key]:-}")
	f=$(median <<<"${vals[firewall.$key]:-}")
	[ "${4:-}" = noratio ] ||
		ratio=$(awk -v k="$k" -v f="$f" 'BEGIN { if (k == "n/a" || f == "n/a" || k + 0 == 0) print "n/a"; else printf "%.2f", f / k }')
	[ "$k" = n/a ] || k=$(printf "$fmt" "$k")
	[ "$f" = n/a ] || f=$(printf "$fmt" "$f")
	printf '| %s | %s | %s | %s |\n' "$label" "$k" "$f" "$ratio"
}

# raw METRIC: every run's value, for judging the spread.
raw() {
	printf '| %s | %s | %s |\n' "$1" "$(runs <<<"${vals[kernel.$1]:-}")" "$(runs <<<"${vals[firewall.$1]:-}")"
}
runs() { tr ' ' '\n' | awk 'NF { printf "%s%.6g", sep, $1; sep = ", " }'; }

report() {
	echo "## qubes-go-firewall vs Linux kernel forwarding + nftables masquerade (veth, netns)"
	echo
	echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -r), $(nproc) CPUs, load average $load_start at the start," \
		"$(cut -d' ' -f1-3 /proc/loadavg) at the end; iperf3 $BENCH_TIME s per run, median of $BENCH_RUNS runs" \
		"(alternating order), measuring took ${elapsed} s."
	echo
	echo "| metric | kernel | firewall | firewall/kernel |"
	echo "|---|---:|---:|---:|"
	row "TCP 1 stream client→server (Gbit/s)" tcp1 %.2f
	row "TCP 4 streams client→server (Gbit/s)" tcp4 %.2f
	row "TCP retransmits per run, 1 stream client→server" tcp1.retr %.0f noratio
	row "TCP retransmits per run, 4 streams client→server" tcp4.retr %.0f noratio
	if [ "$BENCH_REVERSE" = 1 ]; then
		row "TCP 1 stream server→client (Gbit/s)" tcp1r %.2f
		row "TCP 4 streams server→client (Gbit/s)" tcp4r %.2f
	fi
	row "UDP ${BENCH_UDP_LEN} B received by server (kpps)" udp.pps %.1f
	row "UDP ${BENCH_UDP_LEN} B sent by client (kpps)" udp.sent %.1f
	row "UDP ${BENCH_UDP_LEN} B loss (%)" udp.loss %.1f noratio
	row "ping avg, ${BENCH_PINGS} × ${BENCH_PING_INTERVAL} s (ms)" ping.avg %.3f
	row "ping mdev (ms)" ping.mdev %.3f
	printf '| firewall peak RSS, VmHWM (MB) | – | %.1f | – |\n' "$(awk -v k="$hwm_kb" 'BEGIN { print k / 1024 }')"
	echo
	echo "Throughput and packets received: a ratio above 1 favours the firewall; latency: below 1 does."
	echo "Firewall at the end: VmRSS $((rss_kb / 1024)) MB, CPU time ${fw_cpu} s; last stats: ${fw_stats:-none}"
	echo
	echo "Its packet sockets (ss -0 -m; d = frames dropped on a full receive buffer): ${fw_sockdrops:-none}"
	echo
	echo "Every run (kernel | firewall):"
	echo
	echo "| metric | kernel | firewall |"
	echo "|---|---|---|"
	local m
	for m in tcp1 tcp1.retr tcp4 tcp4.retr tcp1r tcp1r.retr tcp4r tcp4r.retr udp.pps udp.sent udp.loss ping.avg ping.mdev ping.loss; do
		[ -n "${vals[kernel.$m]:-}${vals[firewall.$m]:-}" ] && raw "$m"
	done
	if [ "${#notes[@]}" -gt 0 ]; then
		echo
		echo "Problems:"
		printf -- '- %s\n' "${notes[@]}"
	fi
}

out_dir="$BENCH_OUT"
case "$out_dir" in /*) ;; *) out_dir="$repo/$out_dir" ;; esac
mkdir -p "$out_dir"
out_file="$out_dir/netns-$(date -u +%Y%m%d-%H%M%S).md"
report | tee "$out_file"
echo "bench: report written to $out_file" >&2
