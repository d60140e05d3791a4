#!/usr/bin/env bash
# Builds the libFuzzer harnesses (fuzz/fuzz_*.c) with clang, ASan and UBSan into build-fuzz/ and
# runs each for a bounded time: fuzz/run.sh [SECONDS_PER_FUZZER] (default 30), or
# fuzz/run.sh --total SECONDS to share one budget among all of them (at least 10 s each; what CI
# runs, so that more fuzzers do not make CI longer). FUZZ_ONLY="api tokenizer" runs a subset.
#
# The library (every directory of src/ but cli) is compiled here with clang, instrumented
# (build/libqmix.a is gcc-built and uninstrumented); FUZZ_SRC_DIRS narrows or reorders the set.
# Harnesses that need a model's tokenizer read testdata/fixtures/tiny-a (run from the repository
# root, as this script does). Seeds come from fuzz/corpus/NAME/ (read-only); inputs the
# fuzzer finds accumulate in build-fuzz/corpus/NAME/ and are reused by later runs. A crash, leak,
# sanitizer report or slow input is written to build-fuzz/crashes/ and fails the script.
# Reproduce one with: build-fuzz/fuzz_NAME build-fuzz/crashes/NAME-crash-...
set -euo pipefail
cd "$(dirname "$0")/.."

total=
if [ "${1:-}" = --total ]; then
    total=${2:-}
    secs=$total
else
    secs=${1:-30}
fi
case $secs in '' | *[!0-9]*) echo "fuzz/run.sh: seconds must be a whole number, got '$secs'" >&2; exit 2 ;; esac
CC=${FUZZ_CC:-clang}
out=build-fuzz
jobs=$(nproc 2>/dev/null || echo 2)

if ! command -v "$CC" >/dev/null; then
    echo "fuzz/run.sh: $CC not found (install clang)" >&2
    exit 1
fi

common=(-std=c11 -D_GNU_SOURCE -g -O1 -fno-omit-frame-pointer -pthread
        -fsanitize=address,undefined -fno-sanitize-recover=undefined
        -Wall -Wextra -Wshadow -Wno-unused-parameter -Wstrict-prototypes -Wmissing-prototypes
        -Iinclude -Isrc
        # clang 14 names a target_clones function's dispatcher NAME.ifunc, so calls from other
        # files do not link: one plain version here (the fuzzers test parsers, not kernels)
        -DQMIX_NO_CLONES '-Dtarget_clones(...)=unused')
pkgs="jansson libpcre2-8 libutf8proc libmicrohttpd libpng libjpeg" # as the Makefile's PKGS
read -r -a pkg_cflags <<<"$(pkg-config --cflags $pkgs)"
read -r -a pkg_libs <<<"$(pkg-config --libs $pkgs)"
common+=("${pkg_cflags[@]}")
src_dirs=${FUZZ_SRC_DIRS:-util formats text quant eval model runtime kernels server}

# --- build the library (never src/cli); kernels get the SIMD flags the Makefile uses ---
mkdir -p "$out/obj" "$out/crashes"
srcs=()
for d in $src_dirs; do
    [ "$d" = cli ] && continue
    for f in src/"$d"/*.c; do [ -e "$f" ] && srcs+=("$f"); done
done
# the ggml type table the GGUF parser sizes tensors with, and the .qcal reader (both
# self-contained on purpose)
case " $src_dirs " in
    *" quant "*) ;;
    *) srcs+=(src/quant/ggml_blocks.c src/quant/calib_read.c) ;;
esac
build_one() { # src obj
    local src=$1 obj=$2 extra=()
    case $src in
        *_avx2.c) extra=(-mavx2 -mfma -mf16c) ;;
        *_avx512.c) extra=(-mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c) ;;
        *_vnni.c) extra=(-mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c -mavx512vnni) ;;
        *_vbmi.c) extra=(-mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c -mavx512vnni
                         -mavx512vbmi) ;;
    esac
    mkdir -p "$(dirname "$obj")"
    "$CC" "${common[@]}" -fsanitize=fuzzer-no-link "${extra[@]}" -c "$src" -o "$obj"
}
objs=()
pids=()
for src in "${srcs[@]}"; do
    obj=$out/obj/${src%.c}.o
    objs+=("$obj")
    # rebuild when the source or any header is newer than the object
    if [ -f "$obj" ] && [ "$obj" -nt "$src" ] &&
        [ -z "$(find include src -name '*.h' -newer "$obj" | sed -n 1p)" ]; then
        continue
    fi
    build_one "$src" "$obj" &
    pids+=($!)
    if [ ${#pids[@]} -ge "$jobs" ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
done
for p in "${pids[@]}"; do wait "$p"; done
rm -f "$out/libqmix-fuzz.a"
ar rcs "$out/libqmix-fuzz.a" "${objs[@]}"

fuzzers=()
for h in fuzz/fuzz_*.c; do
    name=$(basename "$h" .c)
    name=${name#fuzz_}
    if [ -n "${FUZZ_ONLY:-}" ] && [[ " $FUZZ_ONLY " != *" $name "* ]]; then continue; fi
    "$CC" "${common[@]}" -fsanitize=fuzzer "$h" "$out/libqmix-fuzz.a" "${pkg_libs[@]}" -lutil \
        -lm -o "$out/fuzz_$name" &
    fuzzers+=("$name")
    if [ $(jobs -rp | wc -l) -ge "$jobs" ]; then wait -n; fi
done
wait
echo "fuzz: built ${fuzzers[*]} with $("$CC" --version | sed -n 1p)"
if [ -n "$total" ]; then
    secs=$((total / ${#fuzzers[@]}))
    [ "$secs" -ge 10 ] || secs=10
    echo "fuzz: ${total}s shared by ${#fuzzers[@]} fuzzers: ${secs}s each"
fi

# --- run ---
failed=()
for name in "${fuzzers[@]}"; do
    mkdir -p "$out/corpus/$name"
    opts=(-max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=16384
          -print_final_stats=1 -artifact_prefix="$out/crashes/$name-")
    [ -f "fuzz/$name.dict" ] && opts+=(-dict="fuzz/$name.dict")
    log=$out/$name.log
    echo "fuzz: $name for ${secs}s (log: $log)"
    set +e
    ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1} UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1} \
        "$out/fuzz_$name" "${opts[@]}" "$out/corpus/$name" "fuzz/corpus/$name" >"$log" 2>&1
    rc=$?
    set -e
    grep -E '^stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)' "$log" |
        sed "s/^/  $name /" || true
    if [ $rc -ne 0 ]; then
        echo "fuzz: $name FAILED (exit $rc):" >&2
        grep -vE '^#[0-9]+' "$log" | tail -n 80 >&2
        failed+=("$name")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: findings in: ${failed[*]} (inputs in $out/crashes/)" >&2
    exit 1
fi
echo "fuzz: no findings"
