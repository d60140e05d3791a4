#!/usr/bin/env bash
# Drives a running `qmix serve` with the official OpenAI client library (npm `openai`, pinned) for
# the tests: tools/check-openai.sh BASE_URL API_KEY prints one JSON object of what the client saw
# (tools/ref/openai_client.mjs, or QMIX_OPENAI_SCRIPT: tools/ref/openai_vision.mjs sends an image);
# `tools/check-openai.sh --install` installs only. The package goes
# into build/npm-openai (git-ignored, test-only; QMIX_NPM_OPENAI_PREFIX overrides). Exit status 77
# with a one-line reason on stderr when node/npm or the package cannot be had, so callers can skip.
set -u
cd "$(dirname "$0")/.."
PKG="openai@4.95.0"
prefix=${QMIX_NPM_OPENAI_PREFIX:-build/npm-openai}
. tools/npm-test-package.sh
need_npm_package "$PKG" openai "$prefix"
if [ "${1:-}" = "--install" ]; then
    echo "OpenAI client: $PKG in $prefix, node $(node --version)"
    exit 0
fi
# ESM resolves packages from the importing file's folders, not NODE_PATH: hand it the path.
QMIX_OPENAI_MODULE="$(cd "$prefix" && pwd)/node_modules/openai/index.mjs" \
    exec node "${QMIX_OPENAI_SCRIPT:-tools/ref/openai_client.mjs}" "$@"
