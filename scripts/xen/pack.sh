#!/bin/sh
# pack.sh DIST PROBE OUT — assemble what the real-Xen tier boots:
#   OUT/dom0.cpio   dom0's RAM root: the cached base (Debian rootfs, the
#                   dom0 kernel's modules, Qubes' QubesDB daemon) with the
#                   test files appended as a second cpio archive (the
#                   kernel unpacks concatenated archives in order)
# /qgfw in dom0 holds the image from DIST (vmlinuz, initramfs), the test
# VMs' initramfs (busybox, the probe agent, guest-rc.sh), the probe for
# dom0's servers and scenarios.sh. The cache comes from prepare.sh.
set -eu
DIST=$(cd "$1" && pwd); PROBE=$2; OUT=$3
HERE=$(cd "$(dirname "$0")" && pwd)
C=${QGFW_XEN_CACHE:-$HOME/.cache/qgfw/xen}
Q=$(cat "$C/qubesdb.current")
[ -f "$DIST/vmlinuz" ] && [ -f "$DIST/initramfs" ] || { echo "pack: no image in $DIST (make image)" >&2; exit 1; }
mkdir -p "$OUT"

# The base archive changes only with the cache: rebuild when it is older.
base=$C/dom0-base.cpio
if [ ! -f "$base" ] || [ "$C/dom0root.ready" -nt "$base" ] || [ "$Q/ready" -nt "$base" ] || [ "$C/kit/ready" -nt "$base" ]; then
	s=$C/dom0-stage; rm -rf "$s"; cp -a "$C/dom0root" "$s"
	cp -a "$C/kit/modules/lib/." "$s/usr/lib/"	# merged /usr: /lib is a link
	cp -a "$Q/usr/." "$s/usr/"
	rm -f "$s/init"
	(cd "$s" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) > "$base.tmp"
	mv "$base.tmp" "$base"; rm -rf "$s"
fi

t=$OUT/stage; rm -rf "$t"; mkdir -p "$t/qgfw"
cp "$HERE/dom0-init.sh" "$t/init"; chmod 755 "$t/init"
# QGFW_XEN_SCENARIOS: another scenario script (for debugging the tier).
cp "${QGFW_XEN_SCENARIOS:-$HERE/scenarios.sh}" "$t/qgfw/scenarios.sh"; chmod 755 "$t/qgfw/scenarios.sh"
cp "$DIST/vmlinuz" "$DIST/initramfs" "$t/qgfw/"
cp "$PROBE" "$t/qgfw/probe"; cp "$C/kit/fpucheck" "$t/qgfw/fpucheck"; chmod 755 "$t/qgfw/probe" "$t/qgfw/fpucheck"

g=$OUT/guest; rm -rf "$g"; mkdir -p "$g/bin" "$g/etc"
cp "$C/kit/busybox" "$g/bin/busybox"; cp "$PROBE" "$g/probe"; cp "$C/kit/fpucheck" "$g/fpucheck"
chmod 755 "$g/probe" "$g/bin/busybox" "$g/fpucheck"
ln -s bin/busybox "$g/init"
cp "$HERE/guest-rc.sh" "$g/etc/rc"
printf '::sysinit:/bin/busybox sh /etc/rc\n::respawn:/probe agent\n' > "$g/etc/inittab"
(cd "$g" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -1) > "$t/qgfw/guest-initramfs"

(cd "$t" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) > "$OUT/tests.cpio"
cat "$base" "$OUT/tests.cpio" > "$OUT/dom0.cpio"
rm -rf "$t" "$g" "$OUT/tests.cpio"
ls -la "$OUT/dom0.cpio"

# ---- make bench-xen (QGFW_XEN_BENCH=1): a third archive appended to
# OUT/dom0.cpio with what scripts/xen/bench.sh needs besides the above:
#   /qgfw/lfw-vmlinuz,   the Linux firewall VM, a PVH guest: Debian's kernel
#   /qgfw/lfw-initramfs  (kit/vmlinuz) and busybox, lfw-init.sh as /init,
#                        the modules it loads with modules.dep, nft and the
#                        xenstore tools with their libraries from dom0root
#   /qgfw/iperf3.cpio.gz iperf3 and its libraries, appended by bench.sh to
#                        the test VMs' initramfs for the bench clients
#   /qgfw/lib/scenarios.sh  the scenario script, whose helpers bench.sh uses
if [ "${QGFW_XEN_BENCH:-0}" = 1 ]; then
	R=$C/dom0root K=$C/kit kv=$(cat "$C/kit/kernel-version")
	b=$OUT/bench; rm -rf "$b"; mkdir -p "$b/qgfw/lib"
	# withlibs DIR FILE...: FILE (a path in dom0root) into DIR at the same
	# path, with the libraries and the loader ldd names for it in dom0root.
	withlibs() {
		d=$1; shift
		for f in "$@" $(for f in "$@"; do chroot "$R" ldd "$f"; done | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u); do
			mkdir -p "$d$(dirname "$f")"; cp -L "$R$f" "$d$f"
		done
		for f in "$@"; do
			if chroot "$d" /lib64/ld-linux-x86-64.so.2 --list "$f" | grep 'not found'; then
				echo "pack: $f lacks libraries in $d" >&2; exit 1
			fi
		done
	}
	l=$b/lfw; mkdir -p "$l/bin" "$l/usr/bin"
	cp "$K/busybox" "$l/bin/busybox"; ln -s busybox "$l/bin/sh"; ln -s bin "$l/sbin"
	cp "$HERE/lfw-init.sh" "$l/init"; chmod 755 "$l/init" "$l/bin/busybox"
	cp "$K/vmlinuz" "$b/qgfw/lfw-vmlinuz"
	withlibs "$l" /usr/sbin/nft /usr/bin/xenstore
	for n in read write rm list; do ln -s xenstore "$l/usr/bin/xenstore-$n"; done
	# The modules lfw-init.sh loads, in this order (crc32c for libcrc32c,
	# which busybox's modprobe does not find through the softdep).
	mkdir -p "$l/etc"
	echo "crc32c_generic xen-netfront xen-netback nf_tables nft_chain_nat nft_masq nft_ct" > "$l/etc/modules"
	for m in $(cat "$l/etc/modules"); do
		modprobe -d "$K/modules" -S "$kv" --show-depends "$m" | awk '$1 == "insmod" { print $2 }'
	done | sort -u | while read -r ko; do
		rel=${ko#"$K/modules/"}; mkdir -p "$l/$(dirname "$rel")"; cp "$ko" "$l/$rel"
	done
	for f in modules.builtin modules.builtin.modinfo modules.order; do cp "$K/modules/lib/modules/$kv/$f" "$l/lib/modules/$kv/"; done
	depmod -b "$l" "$kv"
	chroot "$l" /usr/sbin/nft --version >/dev/null || { echo "pack: nft does not run from the lfw initramfs" >&2; exit 1; }
	(cd "$l" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -1) > "$b/qgfw/lfw-initramfs"
	i=$b/iperf3; mkdir -p "$i"
	withlibs "$i" /usr/bin/iperf3
	chroot "$i" /usr/bin/iperf3 --version >/dev/null || { echo "pack: iperf3 does not run from its overlay" >&2; exit 1; }
	(cd "$i" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -1) > "$b/qgfw/iperf3.cpio.gz"
	cp "$HERE/scenarios.sh" "$b/qgfw/lib/scenarios.sh"
	(cd "$b" && find qgfw | LC_ALL=C sort | cpio -o -H newc --quiet) >> "$OUT/dom0.cpio"
	rm -rf "$b"
	ls -la "$OUT/dom0.cpio"
fi
