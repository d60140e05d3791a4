#!/usr/bin/env bash
# The KV cache's memory, end to end: a long generation on the demo model with each cache type,
# its peak RSS (/usr/bin/time -v) against what `qmix plan` predicts for the same context, threads
# and cache, optionally run inside a memory cgroup whose limit is that plan (cgroup v2, else v1,
# where this user may create one; otherwise it says so and measures RSS only).
#
#   bench/kv_memory.sh [TOKENS] [GEN] [THREADS]     (defaults: 60000 16 2)
#   KV_BITS="32 16 8 4" QMIX=build/qmix MODEL=testdata/demo bench/kv_memory.sh 32768
#
# The prompt is the model's held-out text (testdata/demo/heldout.txt) tokenized and repeated to
# TOKENS ids; the session holds TOKENS + GEN tokens. Prefill is quadratic in TOKENS (attention):
# 60000 tokens take several minutes per run on 2 cores.
set -euo pipefail

QMIX=${QMIX:-build/qmix}
MODEL=${MODEL:-testdata/demo}
KV_BITS=${KV_BITS:-"32 4"}
N=${1:-60000}
GEN=${2:-16}
THREADS=${3:-2}
CTX=$((N + GEN))

[ -x "$QMIX" ] || { echo "kv_memory: $QMIX not built (make build/qmix)" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "kv_memory: needs /usr/bin/time (Debian package 'time')" >&2; exit 1; }

tmp=$(mktemp -d)
cg=""
cleanup() {
    if [ -n "$cg" ] && [ -d "$cg" ]; then rmdir "$cg" 2>/dev/null || true; fi
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM # so the EXIT trap removes the cgroup and the files

"$QMIX" tokenize "$MODEL" --file "$MODEL/heldout.txt" --tokens | cut -f1 > "$tmp/one"
: > "$tmp/all"
while [ "$(wc -l < "$tmp/all")" -lt "$N" ]; do cat "$tmp/one" >> "$tmp/all"; done
head -n "$N" "$tmp/all" > "$tmp/prompt"

# A memory cgroup this user can create: v2 (memory.max, memory.peak) or v1 (limit_in_bytes,
# max_usage_in_bytes). Both charge the page cache of the files read (the weights) as well.
cg_kind=none
if [ -w /sys/fs/cgroup ] && grep -qw memory /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null; then
    cg_kind=v2; cg_root=/sys/fs/cgroup
elif [ -d /sys/fs/cgroup/memory ] && [ -w /sys/fs/cgroup/memory ]; then
    cg_kind=v1; cg_root=/sys/fs/cgroup/memory
fi

echo "model $MODEL, prompt $N tokens (held-out text repeated), $GEN generated, ctx $CTX, $THREADS threads"
echo "cgroup: $cg_kind$([ "$cg_kind" = none ] && echo ' (no writable memory cgroup here: RSS only)')"
echo
echo "| KV cache | plan peak | peak RSS | RSS − plan | cgroup limit (= plan) | cgroup peak | exit | prefill |"
echo "|---|---|---|---|---|---|---|---|"
declare -A rss
for bits in $KV_BITS; do
    plan=$("$QMIX" plan "$MODEL" --ctx "$CTX" --kv-bits "$bits" --threads "$THREADS" \
               --memory 1T --json | grep -o '"peak_bytes": [0-9]*' | head -1 | grep -o '[0-9]*$')
    cmd=("$QMIX" generate "$MODEL" --tokens "@$tmp/prompt" -n "$GEN" --ctx "$CTX"
         --kv-bits "$bits" --threads "$THREADS")
    limit=- cpeak=-
    set +e
    if [ "$cg_kind" != none ]; then
        cg="$cg_root/qmix-kv-$$-$bits"
        mkdir "$cg"
        if [ "$cg_kind" = v2 ]; then
            echo "$plan" > "$cg/memory.max"
            echo 0 > "$cg/memory.swap.max" 2>/dev/null
        else
            echo "$plan" > "$cg/memory.limit_in_bytes"
        fi
        limit=$plan
        # the shell joins the cgroup, then becomes time(1), which runs qmix inside it
        sh -c 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"' sh "$cg" \
            /usr/bin/time -v "${cmd[@]}" > /dev/null 2> "$tmp/err"
        rc=$?
        if [ "$cg_kind" = v2 ]; then cpeak=$(cat "$cg/memory.peak" 2>/dev/null || echo -)
        else cpeak=$(cat "$cg/memory.max_usage_in_bytes"); fi
        rmdir "$cg"
        cg=""
    else
        /usr/bin/time -v "${cmd[@]}" > /dev/null 2> "$tmp/err"
        rc=$?
    fi
    set -e
    kb=$(grep 'Maximum resident set size' "$tmp/err" | grep -o '[0-9]*$' || echo 0)
    rss[$bits]=$((kb * 1024))
    prefill=$(grep -o 'prefill: [0-9]* tokens in [0-9.]* s' "$tmp/err" | grep -o 'in [0-9.]* s' || echo -)
    mib() { [ "$1" = - ] && echo - || awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
    printf "| %s-bit | %s | %s | %+.1f MiB | %s | %s | %s | %s |\n" "$bits" "$(mib "$plan")" \
        "$(mib "${rss[$bits]}")" "$(awk -v a="${rss[$bits]}" -v b="$plan" 'BEGIN { print (a - b) / 1048576 }')" \
        "$(mib "$limit")" "$(mib "$cpeak")" "$rc" "$prefill"
    [ "$rc" = 0 ] || { echo "kv_memory: the $bits-bit run failed:" >&2; tail -5 "$tmp/err" >&2; }
done
if [ -n "${rss[32]:-}" ] && [ -n "${rss[4]:-}" ]; then
    echo
    awk -v a="${rss[32]}" -v b="${rss[4]}" -v n="$N" 'BEGIN {
        printf "4-bit cache peak RSS is %.1f MiB (%.1f MB) below the float32 cache at %d tokens\n",
               (a - b) / 1048576, (a - b) / 1e6, n }'
fi
