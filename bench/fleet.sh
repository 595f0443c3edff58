#!/usr/bin/env bash
# Fleet SLIs with the simulator: for each N, a fresh control plane and one operator
# replica (release build) per scenario — rollout (completion time, cloud→edge latency),
# storm (reconnect recovery), outage (a storm whose old connections the gateway must find
# and close itself), churn (a tenth of the fleet replaced per round: newcomers' time to
# their first poll), steady (heartbeat round trip, at heartbeats every 5 s and
# 10 s under the same 60 s lease, to show API-server writes do not follow the heartbeat
# rate) — with the operator's CPU,
# RSS and file descriptors and the API server's writes/s. Writes
# $EDGEFLEET_CACHE/bench/fleet/results.jsonl, a Markdown table and bench/fleet.png.
# Usage: bench/fleet.sh [N ...]   (default: 1000 5000 10000)
#   FLEET_SCENARIOS="rollout storm outage churn steady:10 steady:5" (the default) picks
#   the runs; also: restart (every gateway killed and started again; devices keep
#   their sessions), restart-naive (its baseline: devices re-attest after any error),
#   slowloris (5,000 slow-header and 1,000 junk-TLS connections held for 120 s while a
#   probe device polls and fresh devices enrol) and slowloris:none (its baseline).
#   FLEET_REPLICAS=R runs R operator replicas, each serving devices (default: enough to
#   keep each under about 18,000 devices, the most one process holds here); the
#   simulator runs as one process per 15,000 devices, and their summaries are merged.
#   Each line of results.jsonl has at least devices, replicas, scenario, ready,
#   rollout_seconds, heartbeat_p99_ms, api_writes_per_second and operator_rss_mib
#   (summed over the replicas).
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
cd "$EDGEFLEET_ROOT"
ensure_apt "${APT_PACKAGES[@]}"
ensure_rust_tools
ensure_kubectl
ensure_python_venv
ensure_apiserver
"$EDGEFLEET_CACHE/venv/bin/pip" install --quiet -r bench/requirements.txt
cargo build --quiet --locked --release -p edgefleet-operator -p edgefleet-sim
cargo build --quiet --locked -p edgefleet-e2e --bin edgefleet-dev
export EDGEFLEET_BIN_DIR="$CARGO_TARGET_DIR/release"
OUT="$EDGEFLEET_CACHE/bench/fleet"
mkdir -p "$OUT"
[ -n "${FLEET_APPEND:-}" ] || : > "$OUT/results.jsonl"
sizes=("$@"); [ ${#sizes[@]} -gt 0 ] || sizes=(1000 5000 10000)
run() {  # N SCENARIO HEARTBEAT DURATION
  log "N=$1 $2 (heartbeat ${3}s)"
  if line=$("$CARGO_TARGET_DIR/debug/edgefleet-dev" fleet-bench --dir "$OUT/run" --devices "$1" \
      --scenario "$2" --heartbeat-seconds "$3" --duration "$4" \
      ${FLEET_REPLICAS:+--replicas "$FLEET_REPLICAS"}); then
    echo "$line" >> "$OUT/results.jsonl"
  else
    echo "{\"devices\": $1, \"replicas\": ${FLEET_REPLICAS:-null}, \"scenario\": \"$2\", \"heartbeat_seconds\": $3, \"error\": \"run failed\"}" >> "$OUT/results.jsonl"
  fi
}
for n in "${sizes[@]}"; do
  for sc in ${FLEET_SCENARIOS:-rollout storm outage churn steady:10 steady:5}; do
    case $sc in
      steady:*) run "$n" steady "${sc#steady:}" 60 ;;
      churn) run "$n" churn 10 60 ;;
      # The flood of slow and junk connections for 120 s (beyond the unidentified
      # lifetime and the header timeout), and its baseline without the flood.
      slowloris) run "$n" slowloris 10 120 ;;
      slowloris:none) EDGEFLEET_SIM_SLOW_HEADERS=0 EDGEFLEET_SIM_JUNK_TLS=0 run "$n" slowloris 10 120 ;;
      *) run "$n" "$sc" 10 0 ;;
    esac
  done
done
"$EDGEFLEET_CACHE/venv/bin/python" bench/fleet_report.py "$OUT/results.jsonl" bench/fleet.png
