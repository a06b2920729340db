#!/usr/bin/env bash
# Runs every fuzz target of the module, one after the other, each for the
# same duration (the first argument, any -fuzztime value: 20s by default).
# Targets are discovered with `go test -list`, so new ones are picked up.
# A failing input is written to the package's testdata/fuzz/<target>/ by the
# fuzzer: keep it there as a regression case once the bug is fixed.
#
#   scripts/fuzz.sh          # 20s per target
#   scripts/fuzz.sh 5m       # before a release
#
# FUZZ_PARALLEL sets the number of fuzzing workers (default 2).
set -euo pipefail

dur="${1:-20s}"
parallel="${FUZZ_PARALLEL:-2}"
cd "$(dirname "$0")/.."

# `go test -list` prints a package's matching names, then its "ok <pkg>"
# line; anything else (a build failure) stops the script.
listing="$(go test -run '^$' -list '^Fuzz' ./...)"
targets=()
names=()
while IFS= read -r line; do
	case "$line" in
	Fuzz*) names+=("$line") ;;
	ok*)
		pkg="$(awk '{print $2}' <<<"$line")"
		for name in "${names[@]+"${names[@]}"}"; do
			targets+=("$pkg $name")
		done
		names=()
		;;
	"?"* | "") ;;
	*)
		echo "fuzz.sh: unexpected output from go test -list: $line" >&2
		exit 1
		;;
	esac
done <<<"$listing"

if [ "${#targets[@]}" -eq 0 ]; then
	echo "fuzz.sh: no fuzz targets found" >&2
	exit 1
fi

# is_deadline_race reports whether a failed run's only failure is the
# coordinator's own "context deadline exceeded" at the end of -fuzztime: no
# failing input written, no failing test or seed, no panic.
is_deadline_race() {
	grep -q '^    context deadline exceeded$' "$1" &&
		! grep -q 'Failing input written\|^    --- FAIL\|^panic:\|\.go:[0-9]*: ' "$1"
}

echo "fuzz.sh: ${#targets[@]} targets, ${dur} each, ${parallel} workers"
i=0
for t in "${targets[@]}"; do
	i=$((i + 1))
	pkg="${t% *}"
	name="${t#* }"
	log="$(mktemp)"
	start=$SECONDS
	status=0
	go test -run '^$' -fuzz "^${name}\$" -fuzztime "$dur" -parallel "$parallel" "$pkg" >"$log" 2>&1 || status=$?
	execs="$(grep -o 'execs: [0-9]*' "$log" | tail -n 1 | awk '{print $2}' || true)"
	line="$(printf '%-28s %-45s %4ds  %s execs' "$name" "$pkg" $((SECONDS - start)) "${execs:-?}")"
	if [ "$status" -eq 0 ]; then
		echo "[$i/${#targets[@]}] ok    $line"
	elif is_deadline_race "$log"; then
		# Go's fuzzing coordinator can report the -fuzztime deadline itself
		# as a failure (go.dev/issue/75804, fixed in Go 1.27): the run
		# ended without any failing input.
		echo "[$i/${#targets[@]}] ok    $line (fuzztime deadline reported as an error by go test: go.dev/issue/75804)"
	else
		echo "[$i/${#targets[@]}] FAIL  $line"
		cat "$log"
		rm -f "$log"
		exit 1
	fi
	rm -f "$log"
done
echo "fuzz.sh: all ${#targets[@]} targets passed"
