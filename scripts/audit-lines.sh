#!/bin/sh
# audit-lines.sh — the line counts in firewall/AUDIT.md: for every package
# the firewall binary is built from, its non-test Go files' lines that are
# neither blank nor comments, then the module's test code and scaffolding.
set -eu
cd "$(dirname "$0")/../firewall"
count() { # FILES... -> lines of code
	[ $# -gt 0 ] || { echo 0; return; }
	cat "$@" | awk '
		/^[ \t]*$/ { next }
		inblock { if ($0 ~ /\*\//) inblock = 0; next }
		/^[ \t]*\/\*/ { if ($0 !~ /\*\//) inblock = 1; next }
		/^[ \t]*\/\// { next }
		{ n++ }
		END { print n + 0 }'
}
mod=github.com/qubes-go-firewall/qubes-go-firewall/firewall
total=0
echo "| package | files | lines |"
echo "|---|---:|---:|"
for pkg in $(go list -deps -f '{{if not .Standard}}{{.ImportPath}}{{end}}' ./cmd/firewall | grep "^$mod"); do
	dir=${pkg#"$mod"}; dir=.${dir:-/}
	files=$(go list -f '{{range .GoFiles}}{{$.Dir}}/{{.}} {{end}}' "$pkg")
	# shellcheck disable=SC2086
	n=$(count $files)
	total=$((total + n))
	echo "| \`${dir#./}\` | $(echo $files | wc -w) | $n |"
done
echo "| **the binary, in all** | | **$total** |"
# shellcheck disable=SC2046
tests=$(count $(find . -name '*_test.go'))
# shellcheck disable=SC2046
scaffold=$(count $(find . -path '*test/*.go' ! -name '*_test.go' ; find ./cmd/qubesdb ./internal -name '*.go' ! -name '*_test.go'))
echo
echo "Test code (\`*_test.go\`): $tests lines; test scaffolding (\`*test\` packages, \`internal/\`, \`cmd/qubesdb\`): $scaffold lines."
