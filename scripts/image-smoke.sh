#!/bin/sh
# image-smoke.sh [DIST_DIR]
#
# Boots the built image (DIST_DIR, default dist/) in QEMU under TCG and
# checks that the firewall starts as PID 1 — its start line on the serial
# console — and that the VM then powers off. Prints the console log and
# fails otherwise. Nested KVM hangs on the project's machines, hence TCG.
#
# Environment:
#   QEMU_MACHINE  pc (default): DIST_DIR/vmlinuz (bzImage) via SeaBIOS,
#                 virtio-net-pci NIC.
#                 microvm: DIST_DIR/vmlinux (ELF, PVH entry — the closest to
#                 Xen's PVH boot) in -M microvm, virtio-net-device (mmio) NIC.
#   QEMU_MEM      guest memory in MB (default 64).
#   SMOKE_TIMEOUT seconds for the whole run (default 120).
#   SMOKE_MARKER  the console line to wait for.
set -eu

dist=${1:-dist}
machine=${QEMU_MACHINE:-pc}
mem=${QEMU_MEM:-64}
timeout=${SMOKE_TIMEOUT:-120}
marker=${SMOKE_MARKER:-qubes-go-firewall: started (pid 1)}

extra=
case $machine in
pc)
	kernel=$dist/vmlinuz
	# romfile= skips the NIC's iPXE option ROM: -kernel boots directly.
	set -- -M pc -kernel "$kernel" \
		-device virtio-net-pci,netdev=n0,romfile=
	;;
microvm)
	kernel=$dist/vmlinux
	# QEMU describes the virtio-mmio devices in its ACPI tables; the 8250
	# at 0x3f8 is the console. microvm has no HPET or ACPI PM timer, so
	# under TCG on a busy host the kernel's TSC calibration against the PIT
	# can fail, and the boot then hangs. TCG passes the host's TSC through:
	# give the kernel the host's TSC rate so it skips the calibration.
	khz=$(awk -F: '/^cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo)
	extra=${khz:+tsc_early_khz=$khz}
	set -- -M microvm -kernel "$kernel" \
		-device virtio-net-device,netdev=n0
	;;
*)
	echo "image-smoke: QEMU_MACHINE must be pc or microvm, not $machine" >&2
	exit 2
	;;
esac
for f in "$kernel" "$dist/initramfs"; do
	[ -r "$f" ] || { echo "image-smoke: $f missing (build the image first)" >&2; exit 1; }
done

log=$(mktemp)
qemu=
cleanup() {
	[ -n "$qemu" ] && kill "$qemu" 2>/dev/null || true
	rm -f "$log"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# panic=1 with -no-reboot: a kernel panic (e.g. /init exiting) ends QEMU at
# once instead of waiting for the timeout.
qemu-system-x86_64 "$@" -accel tcg -cpu max -smp 1 -m "$mem" \
	-initrd "$dist/initramfs" -append "console=ttyS0 panic=1${extra:+ $extra}" \
	-netdev user,id=n0 \
	-nographic -monitor none -serial stdio -no-reboot \
	</dev/null >"$log" 2>&1 &
qemu=$!

start=$(date +%s%N)
elapsed() { echo "$(( ($(date +%s%N) - start) / 1000000 ))"; }
seen=
rc=
while :; do
	if [ -z "$seen" ] && grep -qF "$marker" "$log"; then
		seen=$(elapsed)
	fi
	if ! kill -0 "$qemu" 2>/dev/null; then
		rc=0
		wait "$qemu" || rc=$?
		qemu=
		break
	fi
	if [ "$(elapsed)" -gt $((timeout * 1000)) ]; then
		break
	fi
	sleep 0.1
done
[ -z "$seen" ] && grep -qF "$marker" "$log" && seen=$(elapsed)

fail() {
	echo "--- console ($machine, -m $mem) ---" >&2
	tr -d '\r' <"$log" >&2
	echo "--- end of console ---" >&2
	echo "image-smoke: FAIL: $1" >&2
	exit 1
}
[ -n "$seen" ] || fail "no \"$marker\" on the console within ${timeout}s"
[ -n "$rc" ] || fail "the firewall started after ${seen} ms but the VM did not power off within ${timeout}s"
[ "$rc" -eq 0 ] || fail "qemu exited with status $rc"
echo "image-smoke: ok ($machine, -m $mem): firewall started ${seen} ms after QEMU start, VM powered off"
