#!/bin/sh
# prepare.sh — everything the real-Xen test tier needs on the host, cached.
#
# Installs the host packages (QEMU, mmdebstrap, gcc and Debian's libxen-dev
# for Qubes' QubesDB daemon) and fills the cache directory $QGFW_XEN_CACHE
# (default ~/.cache/qgfw/xen):
#
#   kit/xen.elf            Debian's Xen 4.17 hypervisor, gunzipped: QEMU's
#                          multiboot loader takes the ELF, not the .gz
#   kit/vmlinuz            Debian's 6.1 kernel, booted as the PV dom0
#   kit/modules/           its modules dom0 needs (xen*, netback, bridge, ...)
#   kit/busybox            static busybox for the client and netvm guests
#   kit/fpucheck           fpucheck.c: do vector registers survive a switch?
#   dom0root/              a Debian rootfs for dom0 (xl, xenstored,
#                          xenconsoled, dnsmasq, iperf3, nftables), RAM only
#   qubesdb-<q>-<v>/       qubesdb-daemon, qubesdb-cmd and libvchan-xen built
#                          from QubesOS/qubes-core-qubesdb at <q> and
#                          QubesOS/qubes-core-vchan-xen at <v>
#   src/                   the Qubes source tarballs, checked by sha256
#
# The Qubes sources come from, in order: the cache, $QGFW_QUBES_SRC (a
# directory of <repo>-<commit>.tar.gz snapshots; the Makefile points it at
# ../shared/third-party/qubes), or a clone of the upstream repository at the
# pinned commit. Warm runs only check what is there. Root.
set -eu

QUBESDB_COMMIT=${QUBESDB_COMMIT:-aeb3c8d8486673636964bc3beb4819d981dd3920}
VCHAN_XEN_COMMIT=${VCHAN_XEN_COMMIT:-a1337c282ffefcfc13a570683c57bc04813038db}
# sha256 of the snapshot tarballs in $QGFW_QUBES_SRC (a clone is checked by
# its commit instead)
QUBESDB_SHA256=${QUBESDB_SHA256:-beb715aa1e567e28970e0cd09e67d6f08d52414670cf66ef30085c52d77bcc70}
VCHAN_XEN_SHA256=${VCHAN_XEN_SHA256:-601955c16e24faf59f50ba9957c579136656354a0a2612c363f6659975922a27}

C=${QGFW_XEN_CACHE:-$HOME/.cache/qgfw/xen}
HERE=$(cd "$(dirname "$0")" && pwd)
log() { echo "xen-prepare: $*"; }

[ "$(id -u)" = 0 ] || { echo "xen-prepare: needs root (apt, mmdebstrap)" >&2; exit 1; }

pkgs="qemu-system-x86 mmdebstrap cpio gzip kmod busybox-static libxen-dev gcc make pkg-config libc6-dev git ca-certificates"
missing=""
for p in $pkgs; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
	log "installing$missing"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q >/dev/null
	# shellcheck disable=SC2086
	apt-get install -y -q --no-install-recommends $missing >/dev/null
fi
mkdir -p "$C"

# --- hypervisor, dom0 kernel and modules, busybox
K=$C/kit
if [ ! -f "$K/ready" ]; then
	log "downloading Xen, the dom0 kernel and busybox"
	rm -rf "$K" "$C/kit.tmp"; mkdir -p "$C/kit.tmp/debs"; T=$C/kit.tmp
	kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-6/{print $2; exit}')
	[ -n "$kpkg" ] || { echo "xen-prepare: no linux-image-6.x behind linux-image-amd64" >&2; exit 1; }
	(cd "$T/debs" && apt-get download -q "$kpkg" xen-hypervisor-4.17-amd64 busybox-static >/dev/null)
	mkdir "$T/k" "$T/x" "$T/b"
	dpkg -x "$T/debs/${kpkg}"_*.deb "$T/k"
	dpkg -x "$T"/debs/xen-hypervisor-4.17-amd64_*.deb "$T/x"
	dpkg -x "$T"/debs/busybox-static_*.deb "$T/b"
	gunzip -c "$T"/x/boot/xen-4.17-amd64.gz > "$T/xen.elf"
	kv=$(ls "$T/k/lib/modules")
	cp "$T/k/boot/vmlinuz-$kv" "$T/vmlinuz"
	cp "$T/b/bin/busybox" "$T/busybox"
	# Only what dom0 and the Linux comparison firewall load: Xen drivers,
	# netback/netfront, bridge, tun/veth, and nftables with NAT.
	m=$T/k/lib/modules/$kv; d=$T/modules/lib/modules/$kv
	mkdir -p "$d/kernel/drivers/net" "$d/kernel/net"
	cp -a "$m/kernel/drivers/xen" "$d/kernel/drivers/"
	cp -a "$m/kernel/drivers/net/xen-netback" "$m/kernel/drivers/net/xen-netfront.ko" \
		"$m/kernel/drivers/net/tun.ko" "$m/kernel/drivers/net/veth.ko" "$m/kernel/drivers/net/dummy.ko" "$d/kernel/drivers/net/"
	cp -a "$m/kernel/net/bridge" "$m/kernel/net/802" "$m/kernel/net/llc" "$m/kernel/net/netfilter" \
		"$m/kernel/net/ipv4" "$m/kernel/net/ipv6" "$d/kernel/net/"
	mkdir -p "$d/kernel/lib"; cp -a "$m/kernel/lib/libcrc32c.ko" "$d/kernel/lib/" 2>/dev/null || true
	cp -a "$m/kernel/crypto" "$d/kernel/" 2>/dev/null || true
	cp "$m"/modules.order "$m"/modules.builtin "$m"/modules.builtin.modinfo "$d/"
	depmod -b "$T/modules" "$kv"
	echo "$kv" > "$T/kernel-version"
	ls "$T/debs" > "$T/debs.txt"
	rm -rf "$T/k" "$T/x" "$T/b" "$T/debs"
	touch "$T/ready"; mv "$T" "$K"
fi

# --- the vector register check for the test VMs (static, no libc needed)
if [ ! -x "$K/fpucheck" ] || [ "$HERE/fpucheck.c" -nt "$K/fpucheck" ]; then
	gcc -O1 -static -o "$K/fpucheck" "$HERE/fpucheck.c"
fi

# --- dom0 rootfs
R=$C/dom0root
dom0pkgs="mount,xen-utils-4.17,xen-utils-common,xenstore-utils,iproute2,kmod,busybox,procps,bridge-utils,iputils-ping,util-linux,dnsmasq-base,iperf3,nftables,tcpdump"
if [ ! -f "$R.ready" ] || [ "$(cat "$R.ready")" != "$dom0pkgs" ]; then
	log "creating the dom0 rootfs with mmdebstrap"
	rm -rf "$R" "$R.ready"
	mmdebstrap -q --variant=essential --aptopt='APT::Install-Recommends "false"' \
		--include="$dom0pkgs" \
		--customize-hook='rm -rf "$1"/usr/share/doc "$1"/usr/share/man "$1"/usr/share/locale "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/* "$1"/usr/share/zoneinfo "$1"/usr/lib/udev/hwdb.d "$1"/usr/lib/udev/hwdb.bin "$1"/usr/share/perl* "$1"/usr/lib/x86_64-linux-gnu/perl* "$1"/var/lib/dpkg/info' \
		bookworm "$R" \
		"deb http://deb.debian.org/debian bookworm main" \
		"deb http://deb.debian.org/debian bookworm-updates main" \
		"deb http://deb.debian.org/debian-security bookworm-security main"
	echo "$dom0pkgs" > "$R.ready"
fi

# --- Qubes' QubesDB daemon and vchan library
Q=$C/qubesdb-$(echo "$QUBESDB_COMMIT" | cut -c1-12)-$(echo "$VCHAN_XEN_COMMIT" | cut -c1-12)
if [ ! -f "$Q/ready" ]; then
	mkdir -p "$C/src"
	# source REPO COMMIT SHA256: leave the tree in $C/src/REPO-COMMIT
	source_tree() {
		repo=$1 commit=$2 want=$3 tgz=$C/src/$1-$2.tar.gz tree=$C/src/$1-$2
		snap=${QGFW_QUBES_SRC:-/nonexistent}/$repo-$commit.tar.gz
		if [ ! -f "$tgz" ] && [ -f "$snap" ]; then
			got=$(sha256sum "$snap" | cut -d' ' -f1)
			if [ "$got" != "$want" ]; then
				echo "xen-prepare: $snap has sha256 $got, want $want" >&2; exit 1
			fi
			log "$repo at $commit from $snap (sha256 $got)"
			cp "$snap" "$tgz.tmp" && mv "$tgz.tmp" "$tgz"
		fi
		rm -rf "$tree" "$tree.tmp"
		if [ -f "$tgz" ]; then
			mkdir -p "$tree.tmp"; tar -C "$tree.tmp" -xzf "$tgz"
			mv "$tree.tmp"/* "$tree"; rmdir "$tree.tmp"
		else
			log "cloning QubesOS/$repo at $commit"
			git clone -q "https://github.com/QubesOS/$repo" "$tree" || {
				echo "xen-prepare: $repo at $commit is in none of its sources: not in $C/src, no $snap, and the clone failed; point QUBES_SRC (make) or QGFW_QUBES_SRC at the directory holding $repo-$commit.tar.gz" >&2
				exit 1
			}
			git -C "$tree" -c advice.detachedHead=false checkout -q "$commit"
			[ "$(git -C "$tree" rev-parse HEAD)" = "$commit" ] || { echo "xen-prepare: $repo is not at $commit" >&2; exit 1; }
			tar -C "$C/src" -czf "$tgz" --exclude .git "$(basename "$tree")"
		fi
	}
	source_tree qubes-core-qubesdb "$QUBESDB_COMMIT" "$QUBESDB_SHA256"
	source_tree qubes-core-vchan-xen "$VCHAN_XEN_COMMIT" "$VCHAN_XEN_SHA256"
	D=$C/src/qubes-core-qubesdb-$QUBESDB_COMMIT
	V=$C/src/qubes-core-vchan-xen-$VCHAN_XEN_COMMIT/vchan
	log "building qubesdb-daemon against libxen-dev"
	rm -rf "$Q"; B=$Q.tmp; rm -rf "$B"; mkdir -p "$B/usr/lib" "$B/usr/bin"
	# Built without systemd: the daemon forks and logs to /var/log/qubes/qubesdb.<name>.log.
	gcc -O2 -fPIC -D_GNU_SOURCE -I"$V" -shared -Wl,-soname,libvchan-xen.so.1 -o "$B/usr/lib/libvchan-xen.so.1" \
		"$V/init.c" "$V/io.c" -lxenvchan -lxenctrl -lxenstore
	ln -sf libvchan-xen.so.1 "$B/usr/lib/libvchan-xen.so"
	gcc -O2 -fPIC -I"$D/include" -I"$V" -DBACKEND_VMM_xen -o "$B/usr/bin/qubesdb-daemon" \
		"$D/daemon/db-cmds.c" "$D/daemon/db-daemon.c" "$D/daemon/db-core.c" "$D/daemon/buffer.c" -L"$B/usr/lib" -lvchan-xen
	gcc -O2 -fPIC -I"$D/include" -DBACKEND_VMM_xen -shared -o "$B/usr/lib/libqubesdb.so" "$D/client/qdb-client.c"
	gcc -O2 -I"$D/include" -DBACKEND_VMM_xen -o "$B/usr/bin/qubesdb-cmd" "$D/client/qubesdb-cmd.c" -L"$B/usr/lib" -lqubesdb
	for n in read write rm multiread list watch; do ln -sf qubesdb-cmd "$B/usr/bin/qubesdb-$n"; done
	printf 'qubes-core-qubesdb %s\nqubes-core-vchan-xen %s\n' "$QUBESDB_COMMIT" "$VCHAN_XEN_COMMIT" > "$B/commits"
	rm -rf "$D" "$C/src/qubes-core-vchan-xen-$VCHAN_XEN_COMMIT"
	touch "$B/ready"; mv "$B" "$Q"
fi
echo "$Q" > "$C/qubesdb.current"
log "ready in $C (kernel $(cat "$K/kernel-version"), $(cat "$Q/commits" | tr '\n' ' '))"
