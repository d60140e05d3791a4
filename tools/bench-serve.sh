#!/usr/bin/env bash
# Benchmarks `qmix serve` over HTTP with curl (the numbers of issue 10's closing note):
#   1. aggregate decode tok/s with 1, 4 and 16 streams decoded together (--parallel 16; each
#      stream a short prompt, ignore_eos, a fixed max_tokens);
#   2. time to first token of a ~2k-token prompt, cold and resumed from the prefix cache (the
#      prompt extended by a question, after an unrelated request has replaced the slot's history,
#      so the hit comes from the shared cache, not the slot).
# usage: tools/bench-serve.sh MODEL_DIR [max_tokens=64] [streams="1 4 16"]
# MODEL_DIR needs tokenizer.json beside the weights. Extra server flags: QMIX_SERVE_FLAGS.
set -euo pipefail
model=${1:?usage: tools/bench-serve.sh MODEL_DIR [max_tokens] [streams]}
max_tokens=${2:-64}
streams=${3:-"1 4 16"}
qmix=${QMIX:-build/qmix}
work=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$work"' EXIT

max_streams=1
for n in $streams; do ((n > max_streams)) && max_streams=$n; done
# shellcheck disable=SC2086
"$qmix" serve "$model" --port 0 --parallel "$max_streams" --ctx 4096 ${QMIX_SERVE_FLAGS:-} \
    2>"$work/log" &
pid=$!
for _ in $(seq 600); do
    grep -q 'http://' "$work/log" 2>/dev/null && break
    kill -0 $pid 2>/dev/null || { cat "$work/log" >&2; exit 1; }
    sleep 0.5
done
port=$(sed -n 's/.*http:\/\/[^:]*:\([0-9]*\).*/\1/p' "$work/log" | head -1)
url=http://127.0.0.1:$port
now() { date +%s.%N; }
post() { curl -s -o "$2" -H 'Content-Type: application/json' --data-binary "@$1" "$url/v1/completions"; }

echo "model: $model, max_tokens $max_tokens, $(nproc) cores"
# warm up (page in the weights)
printf '{"prompt": "Hello", "max_tokens": 4, "ignore_eos": true}' >"$work/warm.json"
post "$work/warm.json" /dev/null

for n in $streams; do
    for i in $(seq "$n"); do
        printf '{"prompt": "Stream %d says hello to the world", "max_tokens": %d, "ignore_eos": true, "seed": %d}' \
            "$i" "$max_tokens" "$i" >"$work/s$i.json"
    done
    t0=$(now)
    for i in $(seq "$n"); do post "$work/s$i.json" "$work/o$i.json" & done
    wait $(jobs -p | grep -v "^$pid$") 2>/dev/null || true
    t1=$(now)
    tokens=0
    for i in $(seq "$n"); do
        c=$(sed -n 's/.*"completion_tokens":\([0-9]*\).*/\1/p' "$work/o$i.json")
        tokens=$((tokens + ${c:-0}))
    done
    awk -v n="$n" -v t="$tokens" -v a="$t0" -v b="$t1" \
        'BEGIN { printf "streams %2d: %5d tokens in %6.2f s = %7.1f tok/s aggregate (%.1f per stream)\n", n, t, b - a, t / (b - a), t / (b - a) / n }'
done

# ~2k tokens of prompt
words=$(for i in $(seq 330); do printf 'word%d is here. ' "$i"; done)
printf '{"prompt": "%s", "max_tokens": 1}' "$words" >"$work/long.json"
printf '{"prompt": "%s And now a question?", "max_tokens": 1}' "$words" >"$work/long2.json"
printf '{"prompt": "Something unrelated", "max_tokens": 1}' >"$work/other.json"
t0=$(now); post "$work/long.json" "$work/l1.json"; t1=$(now)
for i in $(seq "$max_streams"); do post "$work/other.json" /dev/null; done # replace slot histories
t2=$(now); post "$work/long2.json" "$work/l2.json"; t3=$(now)
p1=$(sed -n 's/.*"prompt_tokens":\([0-9]*\).*/\1/p' "$work/l1.json")
p2=$(sed -n 's/.*"prompt_tokens":\([0-9]*\).*/\1/p' "$work/l2.json")
c2=$(sed -n 's/.*"cached_tokens":\([0-9]*\).*/\1/p' "$work/l2.json")
awk -v a="$t0" -v b="$t1" -v c="$t2" -v d="$t3" -v p1="$p1" -v p2="$p2" -v c2="$c2" \
    'BEGIN { printf "TTFT %d-token prompt cold: %.3f s; %d-token prompt with a prefix hit (%d cached): %.3f s\n", p1, b - a, p2, c2, d - c }'
curl -s "$url/metrics" | grep -E '^qmix_(prefix_cache_(hits|snapshot_hits|evictions)_total|batch_(steps|rows)_total) '
