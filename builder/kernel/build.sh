#!/bin/sh
# build.sh SRC_TARBALL OUTDIR
#
# Builds the qubes-go-firewall kernel reproducibly from Debian's
# linux-source-6.1 tarball with the *.patch files beside this script applied:
# tinyconfig + qgfw.config + olddefconfig, checked by check-config.sh, then
# bzImage. Writes OUTDIR/vmlinuz (the bzImage, what
# Qubes boots through Xen's PVH loader), OUTDIR/vmlinux (the ELF with the PVH
# entry note, for `qemu-system-x86_64 -M microvm`; not stripped, so addresses
# in an oops can be resolved) and OUTDIR/config.
#
# Environment: SOURCE_DATE_EPOCH (default 0) fixes every embedded time;
# WORKDIR (default: a temporary directory, removed afterwards) is where the
# source is unpacked; JOBS (default: nproc) is the make parallelism.
# The output depends on the compiler and binutils versions (embedded in the
# kernel's version string), which the caller pins.
set -eu

if [ $# -ne 2 ]; then
	echo "usage: $0 SRC_TARBALL OUTDIR" >&2
	exit 2
fi
tarball=$(realpath "$1")
mkdir -p "$2"
outdir=$(realpath "$2")
here=$(dirname "$(realpath "$0")")
fragment=$here/qgfw.config

SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-0}
jobs=${JOBS:-$(nproc)}
if [ -n "${WORKDIR:-}" ]; then
	mkdir -p "$WORKDIR"
	work=$(realpath "$WORKDIR")
else
	work=$(mktemp -d)
	trap 'rm -rf "$work"' EXIT
fi

# Everything that would otherwise leak the build host, user, time, locale or
# directory into the kernel image.
export SOURCE_DATE_EPOCH
export KBUILD_BUILD_TIMESTAMP="$(date -u -d "@$SOURCE_DATE_EPOCH" '+%a %b %e %H:%M:%S UTC %Y')"
export KBUILD_BUILD_USER=qgfw
export KBUILD_BUILD_HOST=qgfw
export KBUILD_BUILD_VERSION=1
export LC_ALL=C TZ=UTC
umask 022

echo "kernel: unpacking $(basename "$tarball") in $work"
tar -xf "$tarball" -C "$work" --no-same-owner --no-same-permissions
src=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'linux-source-*' | head -n 1)
[ -n "$src" ] || { echo "kernel: no linux-source-* directory in $tarball" >&2; exit 1; }
cd "$src"

# The patches next to this script, in name order; each must apply exactly
# (no fuzz, no offset guessing), so a source update that moves the code
# fails here rather than building something else.
for p in "$here"/*.patch; do
	[ -e "$p" ] || continue
	echo "kernel: applying $(basename "$p")"
	patch -p1 -F0 -s --no-backup-if-mismatch < "$p"
done

# The build runs in the source tree, so paths are mostly relative already;
# the prefix map catches the rest (assertions, __FILE__ in asm).
kmake() {
	make ARCH=x86_64 LOCALVERSION= \
		KCFLAGS="-ffile-prefix-map=$src/=" KAFLAGS="-ffile-prefix-map=$src/=" \
		"$@"
}

echo "kernel: configuring (tinyconfig + $(basename "$fragment"))"
kmake -s tinyconfig
scripts/kconfig/merge_config.sh -m .config "$fragment" >/dev/null
kmake -s olddefconfig
"$here/check-config.sh" .config "$fragment"

echo "kernel: building bzImage with $jobs jobs"
kmake -j"$jobs" bzImage

install -m 0644 arch/x86/boot/bzImage "$outdir/vmlinuz"
install -m 0644 vmlinux "$outdir/vmlinux"
install -m 0644 .config "$outdir/config"
echo "kernel: $(head -c 200 include/generated/utsrelease.h | sed -n 's/.*"\(.*\)".*/\1/p')"
ls -l "$outdir/vmlinuz" "$outdir/vmlinux"
