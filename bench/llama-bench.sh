#!/usr/bin/env bash
# Builds llama.cpp's own `llama-bench`, the baseline of bench/inference.sh, from the same
# llama.cpp sources and with the same ggml settings as the agent's llama-cpp-2 build:
# - the sources are the crate's vendored llama.cpp tree (llama-cpp-sys-2 strips tools/,
#   so tools/llama-bench comes from the PyPI sdist of llama-cpp-python, whose llama.h
#   API is the same);
# - the GGML_* and LLAMA_* cache entries are copied from the crate's own release
#   CMakeCache.txt, so both binaries use the same CPU features, OpenMP and build type.
# Prints the path of the binary. Needs a release build of the agent first
# (bench/inference.sh does that).
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
cd "$EDGEFLEET_ROOT"
SDIST_VERSION=0.3.36
OUT="$EDGEFLEET_CACHE/llama-bench"
mkdir -p "$OUT"

sys_dir="$(cargo metadata --format-version 1 --locked 2>/dev/null | python3 -c '
import json, sys, os
m = json.load(sys.stdin)
p = next(p for p in m["packages"] if p["name"] == "llama-cpp-sys-2")
print(os.path.dirname(p["manifest_path"]))')"
cache_file="$(ls -t "$CARGO_TARGET_DIR"/release/build/llama-cpp-sys-2-*/out/build/CMakeCache.txt 2>/dev/null | head -1)"
[ -n "$cache_file" ] || { echo "no release build of llama-cpp-sys-2 under $CARGO_TARGET_DIR: build the agent in release first" >&2; exit 1; }
stamp="$(basename "$sys_dir")-$(sha256sum "$cache_file" | cut -c1-12)"
bin="$OUT/build-$stamp/bin/llama-bench"
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi

if [ ! -d "$OUT/sdist/llama_cpp_python-$SDIST_VERSION" ]; then
  log "fetching the llama-cpp-python $SDIST_VERSION sdist (llama-bench sources)"
  mkdir -p "$OUT/sdist"
  python3 -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$SDIST_VERSION" -d "$OUT/sdist" >&2
  tar xzf "$OUT/sdist/llama_cpp_python-$SDIST_VERSION.tar.gz" -C "$OUT/sdist"
fi
src="$OUT/src-$stamp"
rm -rf "$src"
cp -r "$sys_dir/llama.cpp" "$src"
rm -rf "$src/tools/llama-bench"
cp -r "$OUT/sdist/llama_cpp_python-$SDIST_VERSION/vendor/llama.cpp/tools/llama-bench" "$src/tools/llama-bench"
# Only llama-bench from tools/: the crate's tools/CMakeLists.txt names directories it stripped.
echo 'add_subdirectory(llama-bench)' > "$src/tools/CMakeLists.txt"

defs=()
while IFS= read -r line; do defs+=("-D$line"); done < <(
  grep -E '^(GGML_[A-Z0-9_]+|LLAMA_[A-Z0-9_]+|CMAKE_BUILD_TYPE|CMAKE_C_FLAGS|CMAKE_CXX_FLAGS|BUILD_SHARED_LIBS):' "$cache_file" \
    | grep -vE '^(LLAMA_BUILD_(TOOLS|COMMON|APP|TESTS|EXAMPLES|SERVER)|GGML_.*_(DIR|LIB|LIBRARY|INCLUDE)[A-Z_]*):' \
    | sed -E 's/^([A-Za-z0-9_]+):[A-Z]+=/\1=/')
log "building llama-bench with the crate's settings: ${defs[*]}"
cmake -S "$src" -B "$OUT/build-$stamp" "${defs[@]}" -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON \
  -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >&2
cmake --build "$OUT/build-$stamp" --target llama-bench -j "$(nproc)" >&2
echo "$bin"
