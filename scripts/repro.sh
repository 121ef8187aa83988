#!/bin/sh
# repro.sh: builds the image twice from copies of this work tree and checks
# that both give the same SHA256SUMS. The builds differ in build directory,
# wall-clock time (they run one after the other), TZ, umask, LANG and host
# name (the second runs in its own UTS namespace), and each starts with the
# builder's podman images removed (base image, cached stages), so nothing but
# the hash-checked downloads is reused. Reports the cold build times.
set -eu
cd "$(dirname "$0")/.."
qgfw=$(pwd)/bin/qgfw
[ -x "$qgfw" ] || { echo "repro: build bin/qgfw first (make qgfw)" >&2; exit 1; }
tmp=$(mktemp -d /var/tmp/qgfw-repro.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

# The work tree as it is (tracked and untracked files, not ignored ones),
# so uncommitted changes are what gets built.
copy_tree() {
	mkdir -p "$1"
	git ls-files -z --cached --others --exclude-standard |
		tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$1"
}

build() { # name TZ umask LANG hostname
	dir=$tmp/$1/src-$1
	copy_tree "$dir"
	"$qgfw" clean --keep-inputs >/dev/null
	start=$(date +%s)
	unshare --uts sh -c '
		hostname "$5"; export TZ="$2" LANG="$4" LC_ALL="$4"; umask "$3"
		cd "$1" && exec "$6" build --quiet --checksums none --dist "$1/dist"
	' sh "$dir" "$2" "$3" "$4" "$5" "$qgfw"
	echo "repro: build $1 took $(( $(date +%s) - start )) s"
}

build a UTC 022 C.UTF-8 qgfw-repro-a
build b America/New_York 077 de_DE.UTF-8 qgfw-repro-b
echo "repro: a:"; cat "$tmp/a/src-a/dist/SHA256SUMS"
echo "repro: b:"; cat "$tmp/b/src-b/dist/SHA256SUMS"
if cmp -s "$tmp/a/src-a/dist/SHA256SUMS" "$tmp/b/src-b/dist/SHA256SUMS"; then
	echo "repro: OK, identical SHA256SUMS"
else
	echo "repro: FAIL, the builds differ" >&2
	diff "$tmp/a/src-a/dist/buildinfo.json" "$tmp/b/src-b/dist/buildinfo.json" >&2 || true
	exit 1
fi
