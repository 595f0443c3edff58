#!/usr/bin/env bash
# Benchmark: SEV-SNP verification + Rego appraisal per second on one core, against the
# bare P-384 signature check of the same report with the same library, AWS-LC (in-run
# baseline). Target: >= 2,000/s.
# Usage: bench/attest.sh [ROUNDS]   (default 5; each round 2 s per side)
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
cd "$EDGEFLEET_ROOT"
cargo build --quiet --locked --release -p edgefleet-trust --example attest_bench
taskset -c 0 "$CARGO_TARGET_DIR/release/examples/attest_bench" "${1:-5}"
