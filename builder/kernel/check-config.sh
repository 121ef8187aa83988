#!/bin/sh
# check-config.sh CONFIG FRAGMENT
#
# Fails, listing each offender, when an option of FRAGMENT is not set in
# CONFIG (a .config after `make olddefconfig`) as the fragment requests.
# Kconfig drops a requested option without error when one of its
# dependencies is missing, so the build must check the result.
set -eu

if [ $# -ne 2 ]; then
	echo "usage: $0 CONFIG FRAGMENT" >&2
	exit 2
fi
config=$1
fragment=$2
[ -r "$config" ] || { echo "check-config: cannot read $config" >&2; exit 2; }
[ -r "$fragment" ] || { echo "check-config: cannot read $fragment" >&2; exit 2; }

awk -v config="$config" '
	# Actual value of every option in the .config; "n" for "is not set".
	FNR == NR {
		if ($0 ~ /^CONFIG_[A-Za-z0-9_]+=/) {
			i = index($0, "=")
			have[substr($0, 1, i - 1)] = substr($0, i + 1)
		} else if ($0 ~ /^# CONFIG_[A-Za-z0-9_]+ is not set$/) {
			have[$2] = "n"
		}
		next
	}
	/^CONFIG_[A-Za-z0-9_]+=/ {
		i = index($0, "=")
		name = substr($0, 1, i - 1); want = substr($0, i + 1)
	}
	/^# CONFIG_[A-Za-z0-9_]+ is not set$/ { name = $2; want = "n" }
	name != "" {
		got = (name in have) ? have[name] : "n"
		if (got != want) {
			printf "%s: requested %s, got %s\n", name, want, got
			bad++
		}
		checked++
		name = ""
	}
	END {
		if (bad) {
			printf "check-config: %d of %d options in the fragment not set as requested in %s\n", bad, checked, config > "/dev/stderr"
			exit 1
		}
		printf "check-config: all %d options of the fragment set as requested\n", checked
	}
' "$config" "$fragment"
