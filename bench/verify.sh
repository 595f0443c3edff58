#!/usr/bin/env bash
# Benchmark: `edgefleet model verify` against `sha256sum` on the same 1 GiB file, in
# alternating rounds; reports the median throughput ratio (sha256sum time / verify time,
# so > 1 means verify is faster). Target: >= 0.9.
# Usage: bench/verify.sh [ROUNDS]   (default 7)
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
cd "$EDGEFLEET_ROOT"
ROUNDS="${1:-7}"
cargo build --quiet --locked --release -p edgefleet-cli
BIN="$CARGO_TARGET_DIR/release/edgefleet"
DIR="$EDGEFLEET_CACHE/bench/verify"
mkdir -p "$DIR/model"
MODEL="$DIR/model/weights.bin"
if [ "$(stat -c %s "$MODEL" 2>/dev/null || echo 0)" != 1073741824 ]; then
  log "writing a 1 GiB model file"
  head -c 1073741824 /dev/urandom > "$MODEL"
fi
openssl ecparam -name prime256v1 -genkey -noout 2>/dev/null | openssl pkcs8 -topk8 -nocrypt -out "$DIR/key.pem"
openssl pkey -in "$DIR/key.pem" -pubout -out "$DIR/pub.pem"
"$BIN" model sign --key "$DIR/key.pem" "$DIR/model" -o "$DIR/files.sig" >/dev/null
"$BIN" model sign --key "$DIR/key.pem" --shard-size 67108864 "$DIR/model" -o "$DIR/shards.sig" >/dev/null
cat "$MODEL" > /dev/null  # warm the page cache so that all three read from memory

t() { local s e; s=$(date +%s.%N); "$@" >/dev/null; e=$(date +%s.%N); awk -v a="$s" -v b="$e" 'BEGIN { print b - a }'; }
sha=(); files=(); shards=()
for _ in $(seq "$ROUNDS"); do
  sha+=("$(t sha256sum "$MODEL")")
  files+=("$(t "$BIN" model verify --bundle "$DIR/files.sig" --public-key "$DIR/pub.pem" "$DIR/model")")
  shards+=("$(t "$BIN" model verify --bundle "$DIR/shards.sig" --public-key "$DIR/pub.pem" "$DIR/model")")
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ms=$(median "${sha[@]}"); mf=$(median "${files[@]}"); mh=$(median "${shards[@]}")
printf 'rounds=%s sha256sum=%.3fs verify_files=%.3fs verify_shards=%.3fs ratio_files=%.2f ratio_shards=%.2f\n' \
  "$ROUNDS" "$ms" "$mf" "$mh" "$(awk -v a="$ms" -v b="$mf" 'BEGIN { print a / b }')" "$(awk -v a="$ms" -v b="$mh" 'BEGIN { print a / b }')"
