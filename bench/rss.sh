#!/usr/bin/env bash
# Benchmark: the agent's resident memory when idle, without a model and with SmolLM2
# loaded (one slot, 1024-token context, the pass-through plugin), and after one request.
# The in-run baseline is the model file's size: (RSS with model - RSS without) / size
# says how much memory serving costs beyond the weights themselves.
# Usage: bench/rss.sh
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
cd "$EDGEFLEET_ROOT"
ensure_model
ensure_plugins
cargo build --quiet --locked --release -p edgefleet-agent --bin edgefleet-agent --example plugin_bench
AGENT="$CARGO_TARGET_DIR/release/edgefleet-agent"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
run() {  # run READY_PATH EXTRA_ARGS... ; prints the RSS in KiB once idle
  local path=$1; shift
  port=$(free_port)
  # EDGEFLEET_MODEL (exported by ensure_model) would give the agent a model.
  env -u EDGEFLEET_MODEL "$AGENT" serve --allow-unsigned --threads 2 --context-size 1024 --listen "127.0.0.1:$port" \
    --plugin "$EDGEFLEET_PLUGINS/passthrough.wasm" "$@" >/dev/null 2>&1 &
  local pid=$!
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:$port$path" >/dev/null && break; sleep 0.1; done
  sleep 1
  echo "$(rss_kib $pid) $pid"
}
stop() { kill "$1"; while kill -0 "$1" 2>/dev/null; do sleep 0.05; done; }
read -r idle pid < <(run /healthz)
stop "$pid"
read -r loaded pid < <(run /readyz --model "$EDGEFLEET_MODEL" --served-name smollm2)
port=$(tr '\0' ' ' < "/proc/$pid/cmdline" | sed -n 's/.*--listen 127.0.0.1:\([0-9]*\).*/\1/p')
curl -sf "http://127.0.0.1:$port/v1/chat/completions" -H 'content-type: application/json' \
  -d '{"messages":[{"role":"user","content":"Say hi."}],"max_tokens":16}' >/dev/null
sleep 0.5
served=$(rss_kib "$pid")
stop "$pid"
size=$(stat -c %s "$EDGEFLEET_MODEL")
printf 'idle_no_model_mib=%.1f idle_with_model_mib=%.1f after_request_mib=%.1f model_file_mib=%.1f overhead_ratio=%.2f\n' \
  "$(awk -v k="$idle" 'BEGIN{print k/1024}')" "$(awk -v k="$loaded" 'BEGIN{print k/1024}')" \
  "$(awk -v k="$served" 'BEGIN{print k/1024}')" "$(awk -v b="$size" 'BEGIN{print b/1048576}')" \
  "$(awk -v a="$served" -v i="$idle" -v b="$size" 'BEGIN{print (a-i)*1024/b}')"
