#!/bin/sh
# test-build-with.sh — build-with.sh on a "fresh machine": a PATH with no
# podman or runc. As a user it must print the install command and fail; as
# root it must run it (a fake apt-get, which "installs" by creating the
# commands) and go on. The same with dnf (Fedora). Run by make test-builder.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "test-build-with: $*"; exit 1; }
setup() { # MANAGER UID
	rm -rf "$tmp/bin" "$tmp/log"; mkdir "$tmp/bin"
	for c in sh cat rm mkdir dirname chmod; do ln -s "$(command -v $c)" "$tmp/bin/$c"; done
	printf '#!/bin/sh\nexit 0\n' > "$tmp/bin/go"
	printf '#!/bin/sh\necho %s\n' "$2" > "$tmp/bin/id"
	cat > "$tmp/bin/$1" <<FAKE
#!/bin/sh
echo "\$*" >> "$tmp/log"
case "\$1" in install) for c in podman runc; do printf '#!/bin/sh\n' > "$tmp/bin/\$c"; chmod +x "$tmp/bin/\$c"; done ;; esac
FAKE
	chmod +x "$tmp/bin/"*
}
run() { PATH="$tmp/bin" QGFW_SETUP_ONLY=1 "$here/build-with.sh" podman > "$tmp/out" 2>&1; }

setup apt-get 1000
if run; then fail "as a user with podman missing it succeeded"; fi
grep -q "run as root: apt-get install -y podman runc" "$tmp/out" || fail "no install command: $(cat "$tmp/out")"
[ ! -e "$tmp/log" ] || fail "as a user it ran apt-get"

setup apt-get 0
run || fail "as root: $(cat "$tmp/out")"
grep -q "^install -y podman runc uidmap slirp4netns fuse-overlayfs" "$tmp/log" || fail "apt-get got: $(cat "$tmp/log")"

setup dnf 0
run || fail "as root with dnf: $(cat "$tmp/out")"
grep -q "^install -y podman" "$tmp/log" || fail "dnf got: $(cat "$tmp/log")"

echo "test-build-with: ok"
