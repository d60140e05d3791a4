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
. tools/npm-test-package.sh
need_npm_package "$PKG" @huggingface/tokenizers "$prefix"
if [ "${1:-}" = "--install" ]; then
    echo "reference tokenizer: $PKG in $prefix, node $(node --version)"
    exit 0
fi
exec node tools/ref/tokenize.mjs "$@"
