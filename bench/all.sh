#!/usr/bin/env bash
# The whole benchmark suite (`make bench`): runs every benchmark of the project and
# rewrites the "Latest results" section of BENCHMARKS.md with the date, the machine and
# each benchmark's result line (its ratios against the in-run baseline). Not part of CI:
# it builds release binaries (about 25 minutes cold) and takes a while.
# Usage: bench/all.sh [--quick]   (--quick: fewer rounds, fleet at N = 1000 only)
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
cd "$EDGEFLEET_ROOT"
quick=false; [ "${1:-}" = --quick ] && quick=true
declare -A result
bench() {  # NAME COMMAND...
  local name=$1; shift
  log "benchmark: $name"
  local out
  if out=$("$@" | tee /dev/stderr | tail -1); then result[$name]=$out; else result[$name]="FAILED (exit $?)"; fi
}
if $quick; then
  bench "model verification vs sha256sum" bench/verify.sh 3
  bench "attestation per second (SNP + policy) vs bare P-384" bench/attest.sh 3
  bench "plugin overhead per request" bench/plugins.sh 5000 3
  bench "agent RSS vs model size" bench/rss.sh
  bench "inference: agent vs llama-bench" bench/inference.sh 3
  bench "fleet SLIs (simulator)" bench/fleet.sh 1000
else
  bench "model verification vs sha256sum" bench/verify.sh
  bench "attestation per second (SNP + policy) vs bare P-384" bench/attest.sh
  bench "plugin overhead per request" bench/plugins.sh
  bench "agent RSS vs model size" bench/rss.sh
  bench "inference: agent vs llama-bench" bench/inference.sh
  bench "fleet SLIs (simulator)" bench/fleet.sh
fi
machine="$(nproc) vCPU $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(. /etc/os-release; echo "$PRETTY_NAME")"
section=$(mktemp)
{
  echo "<!-- results:begin (written by bench/all.sh; do not edit by hand) -->"
  echo "## Latest results"
  echo
  echo "$(date -u +%Y-%m-%d) · $machine · bench/all.sh${1:+ $1}"
  echo
  echo "| benchmark | result (the ratios are against the in-run baseline) |"
  echo "| --- | --- |"
  for name in "model verification vs sha256sum" "attestation per second (SNP + policy) vs bare P-384" \
      "plugin overhead per request" "agent RSS vs model size" "inference: agent vs llama-bench" "fleet SLIs (simulator)"; do
    echo "| $name | \`${result[$name]:-not run}\` |"
  done
  echo "<!-- results:end -->"
} > "$section"
python3 - "$section" <<'PY'
import re, sys
section = open(sys.argv[1]).read().strip()
text = open("BENCHMARKS.md").read()
pattern = re.compile(r"<!-- results:begin.*?<!-- results:end -->", re.S)
text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
open("BENCHMARKS.md", "w").write(text)
PY
rm -f "$section"
log "BENCHMARKS.md updated"
