#!/usr/bin/env bash
# Benchmark: plugin overhead per request (a fresh instance of the pass-through plugin,
# on-request and on-response), against the same walk through an empty chain in
# alternating rounds. Reports p50 and p99. Target: p50 < 50 us.
# Usage: bench/plugins.sh [REQUESTS_PER_ROUND] [ROUNDS]   (default 20000 5)
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
cd "$EDGEFLEET_ROOT"
ensure_plugins
cargo build --quiet --locked --release -p edgefleet-agent --bin edgefleet-agent --example plugin_bench
"$CARGO_TARGET_DIR/release/examples/plugin_bench" "$EDGEFLEET_PLUGINS/passthrough.wasm" "${1:-20000}" "${2:-5}"
