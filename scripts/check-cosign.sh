#!/bin/sh
# check-cosign.sh — runs the README's `cosign verify-blob` line, exactly as
# the README writes it, with real cosign builds: on the newest release's
# signed sums (it must print "Verified OK") and on tampered sums (it must
# fail). `make check-cosign`; not part of `make test`, since each cosign
# build takes about 5 minutes and 140 MB.
#
# Usage: scripts/check-cosign.sh [VERSION...]   (default: v2.6.5 v3.1.3)
# Each version is built once from the Go module proxy into
# ${XDG_CACHE_HOME:-~/.cache}/qgfw/cosign/<version>/.
set -eu
cd "$(dirname "$0")/.."
line=$(sed -n 's/^    \(cosign verify-blob .*\)$/\1/p' README.md)
[ -n "$line" ] && [ "$(echo "$line" | wc -l)" = 1 ] || { echo "check-cosign: want one indented 'cosign verify-blob' line in README.md" >&2; exit 1; }
rel=$(ls checksums/releases | sort -V | tail -1)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/qgfw/cosign
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The tampered release: the same key and signature, one digit changed.
mkdir "$work/tampered"
cp "checksums/releases/$rel/key" "checksums/releases/$rel/SHA256SUMS.sig" "$work/tampered/"
sed '1s/^./0/; 1s/^00/10/' "checksums/releases/$rel/SHA256SUMS" > "$work/tampered/SHA256SUMS"
cmp -s "$work/tampered/SHA256SUMS" "checksums/releases/$rel/SHA256SUMS" && { echo "check-cosign: tampering changed nothing" >&2; exit 1; }

# run BIN R: the README's line with cosign = BIN and R set as the README does.
run() {
	(
		R=$2
		eval "$(echo "$line" | sed "s|^cosign |\"$1\" |")"
	)
}
status=0
for v in ${*:-v2.6.5 v3.1.3}; do
	major=${v%%.*}
	mod=github.com/sigstore/cosign/$major
	bin=$cache/$v/cosign
	if [ ! -x "$bin" ]; then
		echo "check-cosign: building cosign $v from the module proxy"
		GOBIN=$cache/$v CGO_ENABLED=0 go install "$mod/cmd/cosign@$v"
	fi
	if run "$bin" "checksums/releases/$rel" > "$work/good.out" 2>&1 && grep -qx "Verified OK" "$work/good.out"; then
		echo "check-cosign: cosign $v verifies release $rel: ok"
	else
		echo "check-cosign: cosign $v did not verify release $rel:" >&2; sed 's/^/  /' "$work/good.out" >&2; status=1
	fi
	if run "$bin" "$work/tampered" > "$work/bad.out" 2>&1; then
		echo "check-cosign: cosign $v accepted tampered sums:" >&2; sed 's/^/  /' "$work/bad.out" >&2; status=1
	else
		echo "check-cosign: cosign $v refuses tampered sums: ok ($(grep -m1 '^Error' "$work/bad.out" || true))"
	fi
done
exit $status
