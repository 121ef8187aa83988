#!/bin/sh
# /init of the test tier's dom0 (Debian's 6.1 kernel as a PV dom0 under
# Xen 4.17, everything in RAM): what Debian's xencommons would do (modules,
# xenfs, xenstored, xen-init-dom0, xenconsoled), then the stand-in netvm
# (bridges, DNS, echo servers), then /qgfw/scenarios.sh, then power off so
# that QEMU exits. Output goes to hvc0, which Xen copies to the serial line
# the harness reads.
export PATH=/usr/lib/xen-4.17/bin:/usr/sbin:/usr/bin:/sbin:/bin
command -v mount >/dev/null || mount() { busybox mount "$@"; }
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run; mount -t tmpfs tmpfs /tmp
mkdir -p /run/xenstored /run/xen /var/log/xen/console /var/lib/xen /var/log/qubes /run/qubes /var/lib/xenstored
ln -sfn /run /var/run 2>/dev/null
echo "QGFW-XEN dom0 up $(cut -d' ' -f1 /proc/uptime)"
for m in xenfs xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xen-netback bridge dummy; do
	modprobe $m || echo "QGFW-XEN modprobe $m failed"
done
mount -t xenfs xenfs /proc/xen
# -T: xenstored traces every message of every connection; the harness keeps
# the trace of a failed run (the xenbus deadlock was diagnosed from it).
XENSTORED_ROOTDIR=/run/xenstored xenstored --pid-file /run/xenstored.pid -T /run/xenstored.trace
i=0; until xenstore-read -s / >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 60 ] && break; sleep 1; done
xen-init-dom0
xenconsoled --pid-file=/run/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console --timestamp=all

# The stand-in netvms: two bridges (the second for the netvm change), the
# virtual DNS addresses on a dummy device, dnsmasq and the echo servers.
ip link set lo up
for b in 0 1; do
	ip link add xenbr$b type bridge; ip addr add 10.138.$b.1/24 dev xenbr$b; ip link set xenbr$b up
done
ip link add dns0 type dummy; ip link set dns0 up
ip addr add 10.139.1.1/32 dev dns0; ip addr add 10.139.1.2/32 dev dns0
echo 0 > /proc/sys/net/ipv4/conf/all/rp_filter
dnsmasq --no-resolv --no-hosts --bind-interfaces --listen-address=10.139.1.1,10.139.1.2 \
	--address=/echo.test/10.138.0.1 --address=/echo1.test/10.138.1.1 \
	--log-queries --log-facility=/tmp/dnsmasq.log --pid-file=/run/dnsmasq.pid
/qgfw/probe serve -tcp :7 -udp :7 -log /tmp/serve.log > /tmp/serve.out 2>&1 &
echo "QGFW-XEN dom0 tools up $(cut -d' ' -f1 /proc/uptime)"

test=
for a in $(cat /proc/cmdline); do case $a in qgfw.test=*) test=${a#qgfw.test=} ;; esac; done
if [ -n "$test" ]; then
	/qgfw/scenarios.sh "$test"
	echo "QGFW-XEN done rc=$? $(cut -d' ' -f1 /proc/uptime)"
	sync
	busybox poweroff -f
fi
exec busybox setsid busybox cttyhack /bin/sh
