#!/bin/sh
# test-offline-build.sh — export, wipe, import, build offline.
#
# `bin/qgfw inputs export` writes every pinned input of this tree (the
# kernel source, the locked base .debs, the Go toolchain and modules) into
# one bundle. Then, in a network namespace with no route anywhere and
# with a fresh input cache and a fresh podman store (no base image, no
# cached stage), `qgfw inputs import` loads the bundle and `qgfw build`
# must reproduce checksums/SHA256SUMS. Proves that a Qubes build qube
# without network can rebuild a release from its bundle.
#
# Root (network namespace, podman). About 12 minutes: the kernel stage is
# built cold. QGFW_OFFLINE_KEEP=1 keeps the work directory.
set -eu
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "test-offline-build: needs root" >&2; exit 1; }
[ -x bin/qgfw ] || { echo "test-offline-build: build bin/qgfw first (make qgfw)" >&2; exit 1; }

work=$(mktemp -d /var/tmp/qgfw-offline.XXXXXX)
ns=qgfw-offline-$$
cleanup() {
	ip netns del "$ns" 2>/dev/null || true
	if [ "${QGFW_OFFLINE_KEEP:-}" = 1 ]; then
		echo "test-offline-build: kept $work"
	else
		# The podman store holds overlay mounts only while a service runs;
		# the service has stopped with the build.
		rm -rf "$work"
	fi
}
trap cleanup EXIT INT TERM

say() { echo "test-offline-build: $*"; }

start=$(date +%s)
bin/qgfw inputs export "$work/inputs.tar"
say "bundle: $(du -m "$work/inputs.tar" | cut -f1) MB, $(tar -tf "$work/inputs.tar" | wc -l) entries"

ip netns add "$ns"
ip -n "$ns" link set lo up
routes=$(ip -n "$ns" route show; ip -n "$ns" -6 route show 2>/dev/null | grep -v '^::1' || true)
[ -z "$routes" ] || { say "the namespace has routes: $routes"; exit 1; }

cat > "$work/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$work/storage"
runroot = "$work/run"
EOF
mkdir -p "$work/cache" "$work/home" "$work/dist"

# Inside: the network namespace, which has only lo (entered with nsenter:
# `ip netns exec` remounts /sys, and with it the cgroup mounts runc needs),
# and a mount namespace of its own, so that no podman socket of the host
# (/run/podman) is seen and qgfw starts a private service on the fresh
# store.
nsenter --net="/run/netns/$ns" unshare -m sh -eu -c '
	work=$1
	if [ -d /run/podman ]; then mount -t tmpfs tmpfs /run/podman; fi
	export XDG_CACHE_HOME=$work/home CONTAINERS_STORAGE_CONF=$work/storage.conf
	unset CONTAINER_HOST
	# No network here: fetching into an empty cache must fail.
	if bin/qgfw inputs fetch --cache "$work/probe" > "$work/probe.log" 2>&1; then
		echo "test-offline-build: fetch worked without network"; exit 1
	fi
	echo "test-offline-build: without the bundle: $(grep -m1 -o "dial tcp[^)]*\|network is unreachable\|no such host" "$work/probe.log" | head -1)"
	bin/qgfw inputs import --cache "$work/cache" "$work/inputs.tar"
	bin/qgfw build --cache "$work/cache" --dist "$work/dist"
' sh "$work"
say "rebuilt offline from the bundle, matching checksums/SHA256SUMS, in $(( $(date +%s) - start )) s"
cat "$work/dist/SHA256SUMS"
