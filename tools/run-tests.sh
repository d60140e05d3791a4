#!/usr/bin/env bash
# Runs every test binary given, prints each one's Check summary, and closes with one
# "N passed, N failed" line over all of them. Exit status: non-zero if anything failed.
set -u
passed=0; failed=0; bad_bins=()
for bin in "$@"; do
    out=$("$bin" 2>&1); rc=$?
    printf '%s\n' "$out" | grep -E '^([0-9]+%: Checks|info: )' | sed "s|^|$(basename "$bin"): |"
    # Check prints "P%: Checks: C, Failures: F, Errors: E"
    summary=$(printf '%s\n' "$out" | grep -E '^[0-9]+%: Checks' | tail -n 1)
    if [ -z "$summary" ]; then
        printf '%s\n' "$out" | tail -n 20
        echo "$(basename "$bin"): no Check summary (exit $rc)"
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
