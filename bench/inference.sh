#!/usr/bin/env bash
# Benchmark: tokens/s of the agent path (an HTTP streaming client -> HTTP -> a
# pass-through Wasm plugin -> llama-cpp-2) against llama.cpp's own llama-bench, on the
# same model, thread count and prompt length, in alternating rounds of one run.
# Reports the medians and the ratios agent / llama-bench (target: >= 0.97 for both).
# Usage: [BENCH_THREADS=N] bench/inference.sh [ROUNDS]   (default 9 rounds, 2 threads)
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
cd "$EDGEFLEET_ROOT"
ROUNDS="${1:-9}"
THREADS="${BENCH_THREADS:-2}"
ensure_python_venv
ensure_model
ensure_plugins
log "building the agent (release)"
cargo build --quiet --locked --release -p edgefleet-agent --bin edgefleet-agent --example plugin_bench
LLAMA_BENCH="$(bench/llama-bench.sh)"
AGENT="$CARGO_TARGET_DIR/release/edgefleet-agent"

port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$AGENT" serve --allow-unsigned --model "$EDGEFLEET_MODEL" --served-name smollm2 --threads "$THREADS" \
  --context-size 1024 --listen "127.0.0.1:$port" --plugin "$EDGEFLEET_PLUGINS/passthrough.wasm" \
  >"$EDGEFLEET_CACHE/bench-agent.log" 2>&1 &
agent_pid=$!
trap 'kill $agent_pid 2>/dev/null || true' EXIT
for _ in $(seq 300); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$port/readyz" >/dev/null || { cat "$EDGEFLEET_CACHE/bench-agent.log" >&2; exit 1; }

agent_run() { "$EDGEFLEET_PYTHON" bench/inference.py "http://127.0.0.1:$port" smollm2; }
read -r _ _ PROMPT GEN < <(agent_run)  # warm-up, and the prompt length llama-bench must match
log "prompt $PROMPT tokens, $GEN generated, $THREADS threads, $ROUNDS rounds"
# llama-bench measures the prompt from an empty context, and generation at the depth the
# agent generates at (after the prompt), so that both sides attend over the same cache.
bench_run() {
  local pp tg
  pp=$("$LLAMA_BENCH" -m "$EDGEFLEET_MODEL" -t "$THREADS" -p "$PROMPT" -n 0 -r 1 -o json 2>/dev/null \
    | python3 -c 'import json, sys; print("%.2f" % json.load(sys.stdin)[0]["avg_ts"])')
  tg=$("$LLAMA_BENCH" -m "$EDGEFLEET_MODEL" -t "$THREADS" -p 0 -n "$GEN" -d "$PROMPT" -r 1 -o json 2>/dev/null \
    | python3 -c 'import json, sys; print("%.2f" % json.load(sys.stdin)[0]["avg_ts"])')
  echo "$pp $tg"
}
lb_pp=(); lb_tg=(); ag_pp=(); ag_tg=()
for r in $(seq "$ROUNDS"); do
  read -r p t < <(bench_run); lb_pp+=("$p"); lb_tg+=("$t")
  read -r p t _ _ < <(agent_run); ag_pp+=("$p"); ag_tg+=("$t")
  log "round $r: llama-bench pp ${lb_pp[-1]} tg ${lb_tg[-1]} | agent pp ${ag_pp[-1]} tg ${ag_tg[-1]}"
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ratios() { local -n a=$1 b=$2; for i in "${!a[@]}"; do awk -v x="${a[$i]}" -v y="${b[$i]}" 'BEGIN { print x / y }'; done; }
mlp=$(median "${lb_pp[@]}"); mlt=$(median "${lb_tg[@]}"); map=$(median "${ag_pp[@]}"); mat=$(median "${ag_tg[@]}")
# The reported ratio is the median of the per-round ratios: each round pairs two runs a
# few seconds apart, which cancels the machine's slow drifts.
mapfile -t rpp < <(ratios ag_pp lb_pp); mapfile -t rtg < <(ratios ag_tg lb_tg)
printf 'rounds=%s prompt=%s gen=%s threads=%s llama_bench_pp=%.1f llama_bench_tg=%.1f agent_pp=%.1f agent_tg=%.1f ratio_pp=%.3f ratio_tg=%.3f\n' \
  "$ROUNDS" "$PROMPT" "$GEN" "$THREADS" "$mlp" "$mlt" "$map" "$mat" "$(median "${rpp[@]}")" "$(median "${rtg[@]}")"
