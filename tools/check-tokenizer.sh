#!/usr/bin/env bash
# Runs the independent reference tokenizer (npm @huggingface/tokenizers, pure JS) for the tests:
#   tools/check-tokenizer.sh TOKENIZER_JSON TEXT_FILE... [--lines] [--no-special] [--regex R]
# (arguments as tools/ref/tokenize.mjs), or `tools/check-tokenizer.sh --install` to install only.
# Installs the pinned package on first use into build/npm (git-ignored, test-only; QMIX_NPM_PREFIX
# overrides). Exit status 77 with a one-line reason on stderr when node/npm or the package cannot
# be had, so callers can skip rather than fail.
set -u
cd "$(dirname "$0")/.."
PKG="@huggingface/tokenizers@0.2.0"
prefix=${QMIX_NPM_PREFIX:-build/npm}
export QMIX_NPM_PREFIX="$prefix"
if ! command -v node >/dev/null 2>&1; then
    echo "node not found" >&2
    exit 77
fi
if [ ! -f "$prefix/node_modules/@huggingface/tokenizers/package.json" ]; then
    if ! command -v npm >/dev/null 2>&1; then
        echo "npm not found (needed once to install $PKG)" >&2
        exit 77
    fi
    mkdir -p "$prefix"
    if ! npm install --prefix "$prefix" --no-audit --no-fund --no-save "$PKG" >"$prefix/install.log" 2>&1; then
        echo "npm install $PKG failed (see $prefix/install.log)" >&2
        exit 77
    fi
fi
if [ "${1:-}" = "--install" ]; then
    echo "reference tokenizer: $PKG in $prefix, node $(node --version)"
    exit 0
fi
exec node tools/ref/tokenize.mjs "$@"
