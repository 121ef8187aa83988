#!/bin/sh
# fuzz-smoke.sh — every fuzz target of the firewall module for a bounded
# time on top of its seeds and committed corpus: the main ones (those that
# read input from another VM or dom0, and the stateful dispatcher fuzzer)
# for FUZZ_MAIN (default 30s), the others for FUZZ_OTHER (default 5s).
# A crasher fails the run; go test writes it to PKG/testdata/fuzz/, where
# it is to be committed as a regression entry once fixed. Prints one line
# per target with its executions per second.
set -eu
cd "$(dirname "$0")/../firewall"
MAIN=${FUZZ_MAIN:-30s} OTHER=${FUZZ_OTHER:-5s}
main="FuzzDispatcherSequence FuzzDispatcher FuzzOperations FuzzDecode FuzzClientStream FuzzClientSession FuzzHostileIndexes FuzzParseReply FuzzAdd"
status=0
for spec in $(grep -rl --include='*_test.go' '^func Fuzz' . | sort | while read -r f; do
	for fn in $(sed -n 's/^func \(Fuzz[A-Za-z0-9]*\)(.*/\1/p' "$f"); do echo "$(dirname "$f"):$fn"; done
done); do
	pkg=${spec%%:*} fn=${spec#*:} t=$OTHER
	case " $main " in *" $fn "*) t=$MAIN ;; esac
	log=$(mktemp)
	if go test -run '^$' -fuzz "^$fn\$" -fuzztime "$t" -fuzzminimizetime 5s "$pkg" > "$log" 2>&1; then
		execs=$(grep -o 'execs: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
		secs=$(echo "$t" | tr -d 's')
		echo "fuzz-smoke: $pkg $fn: ok, ${execs:-0} execs in $t ($(( ${execs:-0} / secs ))/s)"
	elif grep -qx '    context deadline exceeded' "$log" && ! grep -q 'Failing input written to' "$log" && ! grep -q '^panic:' "$log"; then
		# Go's fuzz coordinator (go1.26.x) can report its own -fuzztime
		# deadline as a failure when a worker is mid-execution at that
		# moment (golang/go#75804, fixed in go1.27): no input failed and
		# none was written. Not a finding; the run still counts.
		echo "fuzz-smoke: $pkg $fn: ok (the coordinator's deadline race, golang/go#75804; no failing input)"
	else
		echo "fuzz-smoke: $pkg $fn: FAILED"; cat "$log"; status=1
	fi
	rm -f "$log"
done
exit $status
