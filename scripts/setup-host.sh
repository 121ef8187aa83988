#!/bin/sh
# Installs, when missing, the Debian packages the tests and benchmarks use.
# Idempotent and quiet when everything is present; needs root to install.
set -eu

pkgs="iproute2 dnsmasq-base iperf3 nftables podman runc qemu-system-x86 debootstrap
uidmap slirp4netns fuse-overlayfs iputils-ping socat openssl cpio mmdebstrap jq
python3 python3-yaml"

missing=""
for p in $pkgs; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
	if [ "$(id -u)" != 0 ]; then
		echo "setup-host: missing packages:$missing (run as root to install them)" >&2
		exit 1
	fi
	echo "setup-host: installing$missing"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q >/dev/null
	# shellcheck disable=SC2086
	apt-get install -y -q --no-install-recommends $missing >/dev/null
fi
