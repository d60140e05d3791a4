#!/usr/bin/env bash
# Side-by-side speed of qmix and llama.cpp on the same GGUF files, in one sitting: for each file
# and thread count, llama-bench and `qmix bench` run alternately (--reps times each, so drift on a
# shared machine hits both alike), and the medians are printed as a ratio table:
#
#   | file | threads | figure | llama.cpp | qmix | qmix / llama.cpp |
#
# Prefill is tokens/s over a --prompt-token prompt, decode tokens/s over --gen tokens. With --text
# the perplexity run is timed too (llama-perplexity vs qmix ppl --score second-half, tokens
# processed per second). Without a llama.cpp build (no --llama, or the binaries missing) it prints
# qmix's numbers alone.
#
#   bench/compare-llama.sh [--llama BUILD_DIR] [--threads 1,2] [--prompt 512] [--gen 64]
#                          [--reps 3] [--text FILE --ctx 512 --chunks 8] [--qmix BIN] FILE.gguf...
#
# BUILD_DIR is a llama.cpp CMake build directory (bin/llama-bench, bin/llama-perplexity inside).
set -euo pipefail

llama="" threads="1,2" prompt=512 gen=64 reps=3 text="" ctx=512 chunks=8 qmix="build/qmix"
files=()
usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --llama) llama=$2; shift 2 ;;
        --threads) threads=$2; shift 2 ;;
        --prompt) prompt=$2; shift 2 ;;
        --gen) gen=$2; shift 2 ;;
        --reps) reps=$2; shift 2 ;;
        --text) text=$2; shift 2 ;;
        --ctx) ctx=$2; shift 2 ;;
        --chunks) chunks=$2; shift 2 ;;
        --qmix) qmix=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "compare-llama: unknown option $1" >&2; exit 2 ;;
        *) files+=("$1"); shift ;;
    esac
done
[ ${#files[@]} -gt 0 ] || { usage >&2; exit 2; }
[ -x "$qmix" ] || { echo "compare-llama: $qmix not built (make)" >&2; exit 1; }
lbench="" lppl=""
if [ -n "$llama" ]; then
    [ -x "$llama/bin/llama-bench" ] && lbench="$llama/bin/llama-bench"
    [ -x "$llama/bin/llama-perplexity" ] && lppl="$llama/bin/llama-perplexity"
    [ -n "$lbench" ] || echo "compare-llama: no $llama/bin/llama-bench; qmix alone" >&2
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# median of the numbers on stdin
median() { sort -g | awk '{a[NR]=$1} END {if (NR == 0) print "nan"; else if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

# JSON field extraction with python3 (Debian's python3 has json; nothing to install)
qmix_field() { # file field -> value of runs[0].field
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["runs"][0][sys.argv[2]])' "$1" "$2"
}
llama_ts() { # file n_prompt n_gen -> avg_ts of that test
    python3 -c 'import json,sys
for r in json.load(open(sys.argv[1])):
    if r["n_prompt"] == int(sys.argv[2]) and r["n_gen"] == int(sys.argv[3]): print(r["avg_ts"])' "$1" "$2" "$3"
}

printf '| file | threads | figure | llama.cpp | qmix | qmix / llama.cpp |\n|---|---|---|---|---|---|\n'
for f in "${files[@]}"; do
    name=$(basename "$f")
    for t in ${threads//,/ }; do
        : >"$tmp/lp" ; : >"$tmp/lg" ; : >"$tmp/qp" ; : >"$tmp/qg"; : >"$tmp/rss"
        for _ in $(seq "$reps"); do
            if [ -n "$lbench" ]; then
                "$lbench" -m "$f" -t "$t" -p "$prompt" -n "$gen" -r 1 -o json >"$tmp/l.json" 2>/dev/null
                llama_ts "$tmp/l.json" "$prompt" 0 >>"$tmp/lp"
                llama_ts "$tmp/l.json" 0 "$gen" >>"$tmp/lg"
            fi
            "$qmix" bench "$f" --prompt "$prompt" --gen "$gen" --threads "$t" --json >"$tmp/q.json" 2>/dev/null
            qmix_field "$tmp/q.json" prefill_tok_s >>"$tmp/qp"
            qmix_field "$tmp/q.json" decode_tok_s >>"$tmp/qg"
            qmix_field "$tmp/q.json" peak_rss_bytes >>"$tmp/rss"
        done
        for fig in prefill decode; do
            lf=$tmp/l${fig:0:1}; [ "$fig" = decode ] && lf=$tmp/lg
            qf=$tmp/qp; [ "$fig" = decode ] && qf=$tmp/qg
            q=$(median <"$qf"); l=$(median <"$lf")
            label="$fig $([ "$fig" = prefill ] && echo "$prompt" || echo "$gen") (tok/s)"
            if [ "$l" = nan ]; then
                printf '| %s | %s | %s | - | %.1f | - |\n' "$name" "$t" "$label" "$q"
            else
                printf '| %s | %s | %s | %.1f | %.1f | %.2f |\n' "$name" "$t" "$label" "$l" "$q" \
                    "$(awk -v a="$q" -v b="$l" 'BEGIN {print a / b}')"
            fi
        done
        printf '| %s | %s | qmix peak RSS (MiB) | - | %.0f | - |\n' "$name" "$t" \
            "$(median <"$tmp/rss" | awk '{print $1 / 1048576}')"
    done
    if [ -n "$text" ]; then
        t=${threads##*,}
        s=$(date +%s.%N)
        "$qmix" ppl "$f" --text "$text" --ctx "$ctx" --windows "$chunks" --score second-half \
            --threads "$t" >/dev/null 2>&1
        q=$(awk -v s="$s" -v e="$(date +%s.%N)" -v n=$((ctx * chunks)) 'BEGIN {print n / (e - s)}')
        if [ -n "$lppl" ]; then
            s=$(date +%s.%N)
            "$lppl" -m "$f" -f "$text" -c "$ctx" --chunks "$chunks" -t "$t" >/dev/null 2>&1
            l=$(awk -v s="$s" -v e="$(date +%s.%N)" -v n=$((ctx * chunks)) 'BEGIN {print n / (e - s)}')
            printf '| %s | %s | perplexity, ctx %s x %s (tok/s, whole run) | %.1f | %.1f | %.2f |\n' \
                "$name" "$t" "$ctx" "$chunks" "$l" "$q" "$(awk -v a="$q" -v b="$l" 'BEGIN {print a / b}')"
        else
            printf '| %s | %s | perplexity, ctx %s x %s (tok/s, whole run) | - | %.1f | - |\n' \
                "$name" "$t" "$ctx" "$chunks" "$q"
        fi
    fi
done
