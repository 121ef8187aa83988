#!/bin/sh
# build-with.sh podman|docker — rebuild the qubes-go-firewall image and check
# it against the published checksums/SHA256SUMS.
#
# On a fresh machine it first installs what the build needs when run as
# root (apt-get on Debian/Ubuntu, dnf on Fedora), or prints the command to
# run. Then it builds the builder CLI (bin/qgfw) with this machine's Go, and runs
# `qgfw build` with the chosen engine: podman through its API (a private
# `podman system service` is started if no socket answers), docker through
# the docker CLI. Prints the artifacts' hashes and the verdict; exits 0 when
# they match, 3 when they differ, 7 when the disk is too full, else 1.
set -eu
cd "$(dirname "$0")"

case "${1:-}" in
podman | docker) engine=$1 ;;
*)
	echo "usage: $0 podman|docker" >&2
	exit 2
	;;
esac
# What the build needs besides Go, per package manager: the engine, and for
# rootless or Debian podman its runtime and helpers.
packages() { # ENGINE MANAGER
	case $1:$2 in
	podman:apt) echo "podman runc uidmap slirp4netns fuse-overlayfs" ;;
	podman:dnf) echo "podman" ;;
	docker:apt) echo "docker.io" ;;
	docker:dnf) echo "moby-engine" ;;
	esac
}
manager() {
	if command -v apt-get >/dev/null 2>&1; then echo apt
	elif command -v dnf >/dev/null 2>&1; then echo dnf
	fi
}
# ensure ENGINE: install what is missing when root (apt on Debian/Ubuntu,
# dnf on Fedora), else print the command to run.
ensure() {
	missing=
	for c in "$1" $([ "$1" = podman ] && [ "$(manager)" = apt ] && echo runc); do
		command -v "$c" >/dev/null 2>&1 || missing="$missing $c"
	done
	[ -z "$missing" ] && return 0
	m=$(manager)
	pkgs=$(packages "$1" "$m")
	if [ -z "$m" ]; then
		echo "build-with.sh:$missing not installed, and neither apt-get nor dnf is here: install $1 with your package manager" >&2
		exit 1
	fi
	case $m in
	apt) cmd="apt-get install -y $pkgs" ;;
	dnf) cmd="dnf install -y $pkgs" ;;
	esac
	if [ "$(id -u)" != 0 ]; then
		echo "build-with.sh:$missing not installed; run as root: $cmd" >&2
		exit 1
	fi
	echo "build-with.sh:$missing not installed: $cmd"
	export DEBIAN_FRONTEND=noninteractive
	if [ "$m" = apt ]; then
		apt-get update -q >/dev/null
	fi
	# shellcheck disable=SC2086
	$cmd >/dev/null
}
command -v go >/dev/null || {
	echo "build-with.sh: Go is needed to build the builder (https://go.dev/dl/, apt-get install golang or dnf install golang)" >&2
	exit 1
}
ensure "$engine"
# QGFW_SETUP_ONLY=1: stop once the tools are there (scripts/test-build-with.sh).
[ "${QGFW_SETUP_ONLY:-}" = 1 ] && { echo "build-with.sh: $engine and its helpers are installed"; exit 0; }

echo "build-with.sh: building bin/qgfw with $(go version)"
CGO_ENABLED=0 GOFLAGS=-buildvcs=false go build -tags "remote containers_image_openpgp" -o bin/qgfw ./cmd/qgfw

status=0
bin/qgfw build --engine "$engine" || status=$?
echo
echo "SHA256SUMS of this build (dist/SHA256SUMS):"
cat dist/SHA256SUMS 2>/dev/null || echo "  (none: the build did not finish)"
echo "published (checksums/SHA256SUMS):"
cat checksums/SHA256SUMS 2>/dev/null || echo "  (none)"
case $status in
0) echo "verdict: OK, the image matches the published checksums" ;;
3) echo "verdict: MISMATCH, the image differs from the published checksums" ;;
*) echo "verdict: build failed (exit $status)" ;;
esac
exit $status
