#!/bin/sh
# build-with.sh podman|docker — rebuild the qubes-go-firewall image and check
# it against the published checksums/SHA256SUMS.
#
# Builds the builder CLI (bin/qgfw) with this machine's Go, then runs
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
command -v go >/dev/null || {
	echo "build-with.sh: Go is needed to build the builder (https://go.dev/dl/, or apt-get install golang)" >&2
	exit 1
}
command -v "$engine" >/dev/null || {
	echo "build-with.sh: $engine is not installed" >&2
	exit 1
}

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
