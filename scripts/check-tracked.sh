#!/bin/sh
# check-tracked.sh — fails when git tracks a file that must not be in the
# repository: an executable binary (ELF, or any file with NUL bytes and an
# executable bit), or anything over 1 MB outside checksums/. Built
# binaries, images and downloaded trees belong in dist/ or bin/, which are
# ignored; a stale committed binary once shadowed the one the README told
# users to build.
set -eu
if [ "${1:-}" = --self-test ]; then
	# The check must catch what it is for: in a scratch repository, an
	# ELF binary, a 2 MB file and a binary with an executable bit fail it,
	# one by one; text and big files under checksums/ pass.
	me=$(cd "$(dirname "$0")" && pwd)/check-tracked.sh
	tmp=$(mktemp -d)
	trap 'rm -rf "$tmp"' EXIT
	try() { # NAME EXPECT(0|1) SETUP...
		name=$1 want=$2; shift 2
		rm -rf "$tmp/r"; mkdir -p "$tmp/r/scripts" "$tmp/r/checksums"
		cp "$me" "$tmp/r/scripts/"
		(cd "$tmp/r" && git init -q && echo text > README && "$@" && git add -A) >/dev/null
		got=0; "$tmp/r/scripts/check-tracked.sh" >/dev/null 2>&1 || got=1
		[ "$got" = "$want" ] || { echo "check-tracked self-test: $name: exit $got, want $want"; exit 1; }
	}
	try "clean tree" 0 true
	try "ELF binary" 1 cp /bin/true tool
	try "file over 1 MB" 1 sh -c 'head -c 2000000 /dev/zero | tr "\0" a > big.txt'
	try "executable with NUL bytes" 1 sh -c 'printf "#!x\000\001" > run && chmod +x run'
	try "big file under checksums/" 0 sh -c 'head -c 2000000 /dev/zero | tr "\0" a > checksums/big'
	echo "check-tracked self-test: ok"
	exit 0
fi
cd "$(dirname "$0")/.."
flag=${TMPDIR:-/tmp}/check-tracked.$$
: > "$flag"
# NUL-separated names through xargs (POSIX sh has no read -d); each hit
# appends a line to $flag, whose path the inner shell gets as $0.
git ls-files -z | xargs -0 -n 64 sh -c '
	for f; do
		[ -f "$f" ] || continue
		case $f in checksums/*) big=0 ;; *) big=$(($(wc -c < "$f") > 1000000)) ;; esac
		if [ "$big" = 1 ]; then echo "check-tracked: $f: over 1 MB"; echo x >> "$0"; fi
		if [ "$(head -c 4 "$f" | od -An -c | tr -d " ")" = "177ELF" ]; then
			echo "check-tracked: $f: an ELF binary"; echo x >> "$0"
		elif [ -x "$f" ] && [ "$(head -c 8192 "$f" | tr -d "\000" | wc -c)" != "$(head -c 8192 "$f" | wc -c)" ]; then
			echo "check-tracked: $f: an executable binary"; echo x >> "$0"
		fi
	done' "$flag"
if [ -s "$flag" ]; then
	rm -f "$flag"
	echo "check-tracked: remove these from git (git rm --cached) and ignore them"
	exit 1
fi
rm -f "$flag"
echo "check-tracked: ok"
