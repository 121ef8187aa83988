# /etc/rc of the test tier's small VMs (busybox's init runs it with busybox
# sh: the image's kernel has no BINFMT_SCRIPT). Kernel options choose the
# role: qgfw.role=client (default; qgfw.ip=, qgfw.gw=) or netvm (BSD mode:
# one netfront to the firewall, one to dom0's bridge, IP forwarding).
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
role=client ip= gw=
for a in $(cat /proc/cmdline); do
	case $a in qgfw.ip=*) ip=${a#*=} ;; qgfw.gw=*) gw=${a#*=} ;; qgfw.role=*) role=${a#*=} ;; esac
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
case $role in
client)
	e=$(ifbymac 00:16:3e:5e:6c:00)
	ip link set "$e" up; ip addr add "$ip/32" dev "$e"
	ip route add "$gw/32" dev "$e"; ip route add default via "$gw" dev "$e"
	# A listener for the client-to-client check: nothing may arrive here.
	/probe serve -udp :9 -log /tmp/udp9.log >/dev/null 2>&1 &
	;;
netvm)
	e0=$(ifbymac 00:16:3e:5e:6c:01); e1=$(ifbymac 00:16:3e:5e:6c:02)
	ip link set "$e0" up; ip addr add 10.137.0.1/32 dev "$e0"; ip route add 10.137.0.5/32 dev "$e0"
	ip link set "$e1" up; ip addr add 10.138.0.2/24 dev "$e1"; ip route add default via 10.138.0.1
	echo 1 > /proc/sys/net/ipv4/ip_forward
	;;
esac
echo "guest: $role $ip up"
