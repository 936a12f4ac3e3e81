#!/usr/bin/env bash
# Installs the pinned tools (package.json: solc-js 0.8.37, Anvil 1.7.1, exact versions) into
# chain/contract/node_modules and compiles MurmurLottery.sol into out/ (ABI and bytecode, which
# are committed: `build.sh --check` fails if compiling does not reproduce them byte for byte).
# `build.sh --tools` only installs. The chain crate's tests run node_modules/.bin/anvil.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x node_modules/.bin/solcjs ] || [ ! -x node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil ]; then
    npm install --no-package-lock --no-audit --no-fund --loglevel=error
fi
[ "${1:-}" = "--tools" ] && exit 0
out=out
[ "${1:-}" = "--check" ] && out=$(mktemp -d)
if ! log=$(node_modules/.bin/solcjs --optimize --optimize-runs 200 --abi --bin --base-path . \
    -o "$out" MurmurLottery.sol 2>&1); then
    echo "$log" >&2
    exit 1
fi
if [ "$out" != out ]; then
    diff -r out "$out" && echo "out/ is reproduced byte for byte"
    rm -r "$out"
fi
