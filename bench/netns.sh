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
#   BENCH_CLIENTS=8       clients of the parallel run (1: none)
#   BENCH_FLOWS=50000     live UDP flows for the full-table run (0: none)
#   BENCH_FW_ARGS=        extra flags for the firewall (e.g. -loop=false)
#   BENCH_FW_CPUS=N-1     CPU list the firewall is pinned to (taskset -c;
#                         default the last CPU: one, as the VM's one vCPU;
#                         Go then runs with GOMAXPROCS 1); empty: not pinned
set -euo pipefail

BENCH_TIME=${BENCH_TIME:-8}
BENCH_RUNS=${BENCH_RUNS:-3}
BENCH_REVERSE=${BENCH_REVERSE:-1}
BENCH_UDP_LEN=${BENCH_UDP_LEN:-64}
BENCH_PINGS=${BENCH_PINGS:-200}
BENCH_PING_INTERVAL=${BENCH_PING_INTERVAL:-0.01}
BENCH_OUT=${BENCH_OUT:-dist/bench}
BENCH_BIN=${BENCH_BIN:-}
BENCH_FLOWS=${BENCH_FLOWS:-50000}
BENCH_CLIENTS=${BENCH_CLIENTS:-8}
BENCH_FW_ARGS=${BENCH_FW_ARGS:-}
BENCH_FW_CPUS=${BENCH_FW_CPUS-$(($(nproc) - 1))}

CLIENT_IP=10.137.0.20
FW_IP=10.137.0.5
NETVM_IP=10.137.0.1
SERVER_IP=192.0.2.10
VARIANTS=(kernel firewall)
# The extra clients of the parallel run: client<k> at 10.137.0.<20+k> on
# vif<k>, k = 2..BENCH_CLIENTS (client 1 is the one above), each with an
# iperf3 server of its own on port 5200+k.
extra_clients() { [ "$BENCH_CLIENTS" -gt 1 ] && seq 2 "$BENCH_CLIENTS"; return 0; }
client_ip() { echo "10.137.0.$((20 + $1))"; }

repo=$(cd "$(dirname "$0")/.." && pwd)
die() { echo "bench: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (network namespaces)"
# jq reads iperf3's JSON reports; the only tool setup-host.sh does not bring.
if ! command -v jq >/dev/null; then
	echo "bench: installing jq" >&2
	{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends jq; } >/dev/null ||
		die "cannot install jq"
fi
for tool in ip nft iperf3 ping jq python3 go taskset; do
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
	local k c
	for k in $(extra_clients); do
		c=client$k
		ip netns add "$(ns "$v" "$c")"
		namespaces+=("$(ns "$v" "$c")")
		nsx "$v" "$c" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
		nsx "$v" "$c" ip link set lo up
		ip -n "$(ns "$v" fw)" link add "vif$k" type veth peer name eth0 netns "$(ns "$v" "$c")"
		nsx "$v" fw ip link set "vif$k" address fe:ff:ff:ff:ff:ff
		nsx "$v" fw ip link set "vif$k" up
		nsx "$v" "$c" ip link set eth0 address 00:16:3e:5e:6c:00
		nsx "$v" "$c" ip addr add "$(client_ip "$k")/32" dev eth0
		nsx "$v" "$c" ip link set eth0 up
		nsx "$v" "$c" ip route add "$FW_IP" dev eth0
		nsx "$v" "$c" ip route add default via "$FW_IP" dev eth0 onlink
		nsx "$v" netvm ip route add "$(client_ip "$k")/32" via "$FW_IP" dev eth0
		spawn "$work/iperf3-$v-$k.log" "$v" netvm iperf3 -s -B "$SERVER_IP" -p $((5200 + k))
	done
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
	local k
	for k in $(extra_clients); do
		nsx kernel fw ip addr add "$FW_IP/32" dev "vif$k"
		nsx kernel fw ip route add "$(client_ip "$k")/32" dev "vif$k"
		nsx kernel fw nft add rule ip filter forward iifname "vif$k" ip saddr "$(client_ip "$k")" accept
	done
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
	local k extra=()
	for k in $(extra_clients); do
		printf '/qubes-firewall/%s/policy drop\n/qubes-firewall/%s/0000 action=accept\n/qubes-firewall/%s \n' \
			"$(client_ip "$k")" "$(client_ip "$k")" "$(client_ip "$k")" >>"$work/qubesdb.init"
		extra+=(-client "vif$k=$(client_ip "$k")")
	done
	"$work/qubesdb" serve -socket "$work/qubesdb.sock" -init "$work/qubesdb.init" >"$work/qubesdb.log" 2>&1 &
	pids+=("$!")
	local i
	for i in $(seq 50); do [ -S "$work/qubesdb.sock" ] && break; sleep 0.1; done
	[ -S "$work/qubesdb.sock" ] || die "qubesdb server did not start: $(cat "$work/qubesdb.log")"
	local pin=()
	[ -n "$BENCH_FW_CPUS" ] && pin=(taskset -c "$BENCH_FW_CPUS")
	# shellcheck disable=SC2086 # BENCH_FW_ARGS is a list of flags
	spawn "$work/firewall.log" firewall fw "${pin[@]}" "$work/firewall" -uplink eth0 \
		-client "vif1=$CLIENT_IP" "${extra[@]}" -qubesdb "$work/qubesdb.sock" -stats-interval 10s $BENCH_FW_ARGS
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

# parallel VARIANT: one TCP stream from every client at once, client 1 to
# the first server and client k to port 5200+k. Records the total and
# Jain's fairness index over the clients' rates, (sum x)^2 / (n sum x^2):
# 1 when all get the same, 1/n when one gets everything.
parallel() {
	local v=$1 k c pidlist=() port rates=() ok=1
	for k in 1 $(extra_clients); do
		c=client; port=5201
		if [ "$k" != 1 ]; then c=client$k; port=$((5200 + k)); fi
		timeout $((BENCH_TIME + 30)) ip netns exec "$(ns "$v" "$c")" \
			iperf3 -c "$SERVER_IP" -p "$port" -t "$BENCH_TIME" -O 1 -J >"$work/par-$k.json" 2>&1 &
		pidlist+=("$!")
	done
	for k in "${pidlist[@]}"; do wait "$k" || ok=0; done
	for k in 1 $(extra_clients); do
		rates+=("$(jq '.end.sum_received.bits_per_second / 1e9' "$work/par-$k.json" 2>/dev/null || echo 0)")
	done
	[ "$ok" = 1 ] || note "$v: a parallel iperf3 client failed (rates: ${rates[*]})"
	record "$v" par.total "$(printf '%s\n' "${rates[@]}" | awk '{ s += $1 } END { print s }')"
	record "$v" par.jain "$(printf '%s\n' "${rates[@]}" | awk '{ s += $1; q += $1 * $1; n++ } END { if (q > 0) printf "%.4f", s * s / (n * q); else print 0 }')"
	record "$v" par.min "$(printf '%s\n' "${rates[@]}" | sort -g | head -n 1)"
}

# cpustat prints the machine's softirq ticks and all its busy ticks (user,
# nice, system, irq, softirq) from /proc/stat, and the firewall process's
# utime + stime (fields 14 and 15 of /proc/PID/stat; its name has no
# spaces).
cpustat() {
	awk '/^cpu / { printf "%d %d ", $8, $2 + $3 + $4 + $7 + $8 }' /proc/stat
	awk '{ print $14 + $15 }' "/proc/$fw_pid/stat"
}

# tcp VARIANT KEY ARGS...: one iperf3 TCP run. For KEY tcp1 and tcp1flows
# also the CPU time per GB received: what forwarding cost (the kernel
# variant's softirq time, where the kernel forwards; the firewall process's
# own time) and what the whole machine spent (both endpoints included,
# the same work in both variants).
tcp() {
	local v=$1 key=$2 s0 b0 f0 s1 b1 f1
	shift 2
	read -r s0 b0 f0 <<<"$(cpustat)"
	iperf "$v" -O 1 "$@" || return 0
	read -r s1 b1 f1 <<<"$(cpustat)"
	record "$v" "$key" "$(jqr '.end.sum_received.bits_per_second / 1e9')"
	record "$v" "$key.retr" "$(jqr '.end.sum_sent.retransmits // 0')"
	case $key in tcp1 | tcp1flows) ;; *) return 0 ;; esac
	local gb fwd
	gb=$(jqr '.end.sum_received.bytes / 1e9')
	if [ "$v" = kernel ]; then fwd=$((s1 - s0)); else fwd=$((f1 - f0)); fi
	record "$v" "$key.cpugb" "$(awk -v t="$fwd" -v hz="$hz" -v gb="$gb" 'BEGIN { printf "%.4f", t / hz / gb }')"
	record "$v" "$key.allgb" "$(awk -v t="$((b1 - b0))" -v hz="$hz" -v gb="$gb" 'BEGIN { printf "%.4f", t / hz / gb }')"
}
hz=$(getconf CLK_TCK)

# flows VARIANT: BENCH_FLOWS UDP flows, shared among the clients (one client
# may hold only half of the firewall's table while others have flows, as
# NAT quotas go), one datagram each from its own source port to the
# netvm's discard port (nothing answers but a rate-limited port
# unreachable), so that the NAT table (the kernel's conntrack) holds that
# many live entries while the next stream runs; the entries live 30 s in
# both.
flows() {
	local v=$1 k c ip per=$((BENCH_FLOWS / BENCH_CLIENTS)) pidlist=()
	for k in 1 $(extra_clients); do
		c=client ip=$CLIENT_IP
		if [ "$k" != 1 ]; then c=client$k ip=$(client_ip "$k"); fi
		nsx "$v" "$c" python3 -c '
import socket, sys
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((src, 10000 + i % 55000))
        s.sendto(b"x", (dst, 9))
    except OSError:
        pass
    s.close()
' "$ip" "$NETVM_IP" "$per" &
		pidlist+=("$!")
	done
	for k in "${pidlist[@]}"; do wait "$k" || note "$v: a flow generator failed"; done
}

# flowcount VARIANT records how many entries the table holds (after the
# stream, the flows still live): conntrack's count, or the "nat N" of the
# firewall's last stats line (logged every 10 s, so at most that old).
flowcount() {
	local n
	if [ "$1" = kernel ]; then
		n=$(nsx kernel fw cat /proc/sys/net/netfilter/nf_conntrack_count 2>/dev/null)
	else
		n=$(grep -o 'nat [0-9]*' "$work/firewall.log" | tail -n 1 | cut -d' ' -f2)
	fi
	record "$1" flows.live "${n:-0}"
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
	if [ "$BENCH_CLIENTS" -gt 1 ]; then
		parallel "$v"
	fi
	if [ "$BENCH_FLOWS" -gt 0 ]; then
		flows "$v"
		tcp "$v" tcp1flows
		flowcount "$v"
	fi
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
# The fast path's ns/packet and allocations, measured after the streams.
echo "bench: Go benchmarks of the per-packet path" >&2
gobench=$(cd "$repo/firewall" && GOTOOLCHAIN=local go test -run '^$' -bench '^Benchmark(FastPath|FastPathBatch|ManyFlows|EchoReply)$' -benchtime 1s -benchmem ./dispatch ./nat 2>&1 |
	grep -E '^(Benchmark|ok|FAIL)' | sed -E 's/[[:space:]]+/ /g') || true

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

# within VARIANT A B: the ratio of VARIANT's medians of metrics A and B.
within() {
	awk -v a="$(median <<<"${vals[$1.$2]:-}")" -v b="$(median <<<"${vals[$1.$3]:-}")" \
		'BEGIN { if (b + 0 > 0 && a != "n/a") printf "%.2f", a / b; else print "n/a" }'
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
	echo "Firewall: pinned to CPUs ${BENCH_FW_CPUS:-none (not pinned)}, extra flags: ${BENCH_FW_ARGS:-none}."
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
	row "forwarding CPU s per GB, TCP 1 stream (kernel: softirq; firewall: its process)" tcp1.cpugb %.3f
	row "whole-machine CPU s per GB, TCP 1 stream (endpoints included)" tcp1.allgb %.3f
	if [ "$BENCH_CLIENTS" -gt 1 ]; then
		row "TCP, ${BENCH_CLIENTS} clients in parallel, total (Gbit/s)" par.total %.2f
		row "the slowest of them (Gbit/s)" par.min %.2f
		row "Jain's fairness index over them (1 = equal shares)" par.jain %.3f noratio
	fi
	if [ "$BENCH_FLOWS" -gt 0 ]; then
		row "TCP 1 stream with ${BENCH_FLOWS} live UDP flows (Gbit/s)" tcp1flows %.2f
		row "live entries in the table after that stream" flows.live %.0f noratio
		row "forwarding CPU s per GB, with those flows" tcp1flows.cpugb %.3f
		printf '| TCP 1 stream, full table / empty table | %s | %s | – |\n' \
			"$(within kernel tcp1flows tcp1)" "$(within firewall tcp1flows tcp1)"
	fi
	printf '| firewall peak RSS, VmHWM (MB), %d clients attached | – | %.1f | – |\n' "$BENCH_CLIENTS" "$(awk -v k="$hwm_kb" 'BEGIN { print k / 1024 }')"
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
	for m in tcp1 tcp1.retr tcp4 tcp4.retr tcp1r tcp1r.retr tcp4r tcp4r.retr udp.pps udp.sent udp.loss ping.avg ping.mdev ping.loss \
		tcp1.cpugb tcp1.allgb par.total par.min par.jain tcp1flows tcp1flows.cpugb tcp1flows.allgb flows.live; do
		[ -n "${vals[kernel.$m]:-}${vals[firewall.$m]:-}" ] && raw "$m"
	done
	if [ -n "$gobench" ]; then
		echo
		echo "The per-packet Go benchmarks (go test -bench, this machine, same run):"
		echo
		echo '```'
		echo "$gobench"
		echo '```'
	fi
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
