#!/bin/sh
# lfw-init.sh — /init of the Linux firewall VM that `make bench-xen` runs
# next to the Go firewall: Debian's 6.1 kernel as a PVH guest doing what a
# stock Qubes sys-firewall does for its clients, and nothing else (no
# qrexec, no QubesDB, no per-client rules: every client is accepted, as the
# Go firewall's "action=accept" client is).
#   - uplink eth0 (a netfront on dom0's bridge), lfw.ip= and lfw.gw= on the
#     kernel command line (default 10.138.0.6/24 via 10.138.0.1)
#   - ip_forward=1; nftables as in Qubes' "table ip qubes": masquerade on
#     the uplink, a stateful forward chain, a per-client anti-spoofing rule
#   - each client vif netback creates: configured as Qubes'
#     vif-route-qubes does (link up, proxy_arp, a /32 route to the client's
#     "ip" from the backend directory), then hotplug-status=connected,
#     which netback waits for before it connects; a closed vif's backend
#     directory is removed (what `xl devd` does in a Linux driver domain)
# The kernel runs this with busybox sh (BINFMT_SCRIPT); pack.sh's bench
# block builds the initramfs. "guest: lfw up" on the console means ready.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /tmp /run
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
say() { echo "lfw: $*"; }
# The kernel's poweroff_cmd (/sbin/poweroff) signals PID 1.
trap 'say "poweroff"; poweroff -f' USR2 TERM

addr=10.138.0.6/24 gw=10.138.0.1 mac=00:16:3e:5e:6c:06
for a in $(cat /proc/cmdline); do
	case $a in lfw.ip=*) addr=${a#*=} ;; lfw.gw=*) gw=${a#*=} ;; lfw.mac=*) mac=${a#*=} ;; esac
done
# /etc/modules (written by pack.sh with the modules it packs): netfront,
# netback, nftables with NAT and conntrack.
for m in $(cat /etc/modules); do
	modprobe "$m" || say "modprobe $m failed"
done
# ifbymac MAC: the interface with that address, once it exists.
ifbymac() {
	i=0
	while [ $i -lt 60 ]; do
		for d in /sys/class/net/*; do
			[ "$(cat "$d/address" 2>/dev/null)" = "$1" ] && { basename "$d"; return 0; }
		done
		sleep 1; i=$((i + 1))
	done
	return 1
}
up=$(ifbymac "$mac") || { say "no uplink with MAC $mac"; up=eth0; }
ip link set lo up
ip link set "$up" up
ip addr add "$addr" dev "$up"
ip route add default via "$gw" dev "$up"
echo 1 > /proc/sys/net/ipv4/ip_forward

# Qubes' sys-firewall (qubes-core-agent network/qubes-nftables and
# qubes-firewall): NAT to the netvm, established traffic back, clients out.
nft -f - <<EOF || say "nft failed"
table ip qubes {
	chain prerouting {
		type filter hook prerouting priority raw; policy accept;
	}
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		oifname "$up" masquerade
	}
	chain forward {
		type filter hook forward priority filter; policy drop;
		ct state invalid counter drop
		ct state established,related accept
		iifname "vif*" oifname "$up" accept
		counter
	}
}
EOF
say "uplink $up $addr via $gw, nftables: $(nft list ruleset | grep -c .) lines"
echo "guest: lfw up"

# attach BE VIF: a new client vif, as vif-route-qubes configures it.
attach() {
	be=$1 vif=$2
	cip=$(xenstore-read "$be/ip") || return 1
	ip link set "$vif" up || return 1
	echo 1 > "/proc/sys/net/ipv4/conf/$vif/proxy_arp"
	ip route replace "$cip/32" dev "$vif"
	nft add rule ip qubes prerouting iifname "$vif" ip saddr != "$cip" counter drop
	xenstore-write "$be/hotplug-status" connected
	say "$vif: client $cip"
}
# Client vifs appear under backend/vif/<domid>/<handle> in our xenstore
# home; a second of delay is nothing next to a guest boot under TCG.
while :; do
	for d in $(xenstore-list backend/vif 2>/dev/null); do
		for h in $(xenstore-list "backend/vif/$d" 2>/dev/null); do
			be=backend/vif/$d/$h vif=vif$d.$h
			if [ -e "/tmp/$vif" ]; then
				# Closed and taken offline by the toolstack: ours to remove.
				if [ "$(xenstore-read "$be/state" 2>/dev/null)" = 6 ] && [ "$(xenstore-read "$be/online" 2>/dev/null)" = 0 ]; then
					xenstore-rm "$be"; rm -f "/tmp/$vif"; say "$vif: removed"
				fi
			elif [ -d "/sys/class/net/$vif" ] && attach "$be" "$vif"; then
				: > "/tmp/$vif"
			fi
		done
	done
	sleep 1
done
