#!/usr/bin/env bash
# Benchmark: loading an encrypted model (key in locked memory, chunks decrypted and the
# plaintext digest checked into a sealed memfd, then llama.cpp's load from it) against
# loading the plain GGUF, in alternating rounds with both files in the page cache.
# Reports medians and the throughput ratio encrypted/plain. Target: >= 0.9.
# Usage: bench/decrypt.sh [ROUNDS]   (default 7)
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
cd "$EDGEFLEET_ROOT"
ensure_model
cargo build --quiet --locked --release -p edgefleet-agent --example decrypt_bench
"$CARGO_TARGET_DIR/release/examples/decrypt_bench" "$EDGEFLEET_MODEL" "$EDGEFLEET_CACHE/bench/decrypt" "${1:-7}"
