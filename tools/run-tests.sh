#!/usr/bin/env bash
# Runs every test binary given, TEST_JOBS at a time (default: the number of cores), prints each
# one's Check summary and duration in the order given, and closes with one "N passed, N failed"
# line over all of them. Exit status: non-zero if anything failed.
set -u
jobs=${TEST_JOBS:-$(nproc 2>/dev/null || echo 1)}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

run_one() { # index, binary: output, exit status and seconds into $tmp
    local start=$SECONDS
    "$2" >"$tmp/$1.out" 2>&1
    echo $? >"$tmp/$1.rc"
    echo $((SECONDS - start)) >"$tmp/$1.s"
}

i=0
for bin in "$@"; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n; done
    run_one "$i" "$bin" &
    i=$((i + 1))
done
wait

passed=0; failed=0; bad_bins=(); i=0
for bin in "$@"; do
    out=$(cat "$tmp/$i.out"); rc=$(cat "$tmp/$i.rc"); secs=$(cat "$tmp/$i.s"); i=$((i + 1))
    name=$(basename "$bin")
    printf '%s\n' "$out" | grep -E '^([0-9]+%: Checks|info: )' | sed "s|^|$name: |"
    echo "$name: ${secs}s"
    # Check prints "P%: Checks: C, Failures: F, Errors: E"
    summary=$(printf '%s\n' "$out" | grep -E '^[0-9]+%: Checks' | tail -n 1)
    if [ -z "$summary" ]; then
        printf '%s\n' "$out" | tail -n 20
        echo "$name: no Check summary (exit $rc)"
        failed=$((failed + 1)); bad_bins+=("$bin"); continue
    fi
    checks=$(sed -E 's/.*Checks: ([0-9]+).*/\1/' <<<"$summary")
    fails=$(sed -E 's/.*Failures: ([0-9]+).*/\1/' <<<"$summary")
    errs=$(sed -E 's/.*Errors: ([0-9]+).*/\1/' <<<"$summary")
    passed=$((passed + checks - fails - errs)); failed=$((failed + fails + errs))
    if [ "$rc" -ne 0 ] || [ $((fails + errs)) -ne 0 ]; then
        printf '%s\n' "$out" | grep -vE '^(Running suite|[0-9]+%: Checks)' | tail -n 30
        bad_bins+=("$bin")
        [ $((fails + errs)) -eq 0 ] && failed=$((failed + 1))
    fi
done
[ ${#bad_bins[@]} -gt 0 ] && echo "failing: ${bad_bins[*]}"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
