# Sourced by the tools that run a test-only npm package (check-tokenizer.sh, check-openai.sh):
#   need_npm_package PKG@VERSION MODULE PREFIX
# makes sure node exists and PREFIX/node_modules/MODULE is installed (npm install on first use,
# its log in PREFIX/install.log). On failure it prints a one-line reason on stderr and exits the
# calling script with status 77, so the tests that use it skip rather than fail.
need_npm_package() {
    local pkg=$1 module=$2 prefix=$3
    if ! command -v node >/dev/null 2>&1; then
        echo "node not found" >&2
        exit 77
    fi
    [ -f "$prefix/node_modules/$module/package.json" ] && return 0
    if ! command -v npm >/dev/null 2>&1; then
        echo "npm not found (needed once to install $pkg)" >&2
        exit 77
    fi
    mkdir -p "$prefix"
    if ! npm install --prefix "$prefix" --no-audit --no-fund --no-save "$pkg" >"$prefix/install.log" 2>&1; then
        echo "npm install $pkg failed (see $prefix/install.log)" >&2
        exit 77
    fi
}
