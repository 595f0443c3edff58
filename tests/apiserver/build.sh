#!/usr/bin/env bash
# Build a standalone Kubernetes API server for tests (upstream
# k8s.io/apiextensions-apiserver + a small wrapper main) and fetch etcd 3.5,
# entirely from Debian sid source packages, without touching the system's apt state.
#
# Output (last two lines of stdout):
#   apiserver=<abs path>
#   etcd=<abs path>
# Everything is cached under ${EDGEFLEET_CACHE:-$HOME/.cache/edgefleet}.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${EDGEFLEET_CACHE:-$HOME/.cache/edgefleet}"
mkdir -p "$CACHE"
CACHE="$(cd "$CACHE" && pwd)"
BIN="$CACHE/bin"
APISERVER="$BIN/edgefleet-test-apiserver"
ETCD="$BIN/etcd"
STAMP="$BIN/.stamp"
# Kubernetes version reported by the server; by default derived from the
# golang-k8s-apiextensions-apiserver-dev package version (0.36.4 -> v1.36.4).
K8S_VERSION="${EDGEFLEET_K8S_VERSION:-}"
SUITE="${EDGEFLEET_DEBIAN_SUITE:-sid}"

log() { echo "[build.sh] $*" >&2; }

hash_inputs() {
  (cd "$HERE" && cat build.sh ./*.go && echo "$K8S_VERSION $SUITE") | sha256sum | cut -d' ' -f1
}
WANT="$(hash_inputs)"

if [[ -x "$APISERVER" && -x "$ETCD" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  log "up to date"
  echo "apiserver=$APISERVER"
  echo "etcd=$ETCD"
  exit 0
fi

# ---------------------------------------------------------------- host tools
need=()
command -v apt-get >/dev/null || { log "apt-get is required"; exit 1; }
command -v dpkg-deb >/dev/null || need+=(dpkg)
[[ -f /usr/share/keyrings/debian-archive-keyring.gpg ]] || need+=(debian-archive-keyring)
if ((${#need[@]})); then
  log "installing host tools from the system's own sources: ${need[*]}"
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi

# ---------------------------------------------------------------- mirror URI
# Take the machine's own Debian mirror (the one serving the main suite, not
# -security / -updates) from /etc/apt/sources.list{,.d/*}.
find_mirror() {
  local f
  # deb822 *.sources stanzas
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f "$f" ]] || continue
    awk '
      function flush() {
        if (uris != "" && suites != "" && types ~ /(^|[ \t])deb([ \t]|$)/) {
          n = split(suites, s, /[ \t]+/); ok = 0
          for (i = 1; i <= n; i++) if (s[i] != "" && s[i] !~ /-(security|updates|backports|proposed-updates)$/) ok = 1
          if (ok) { split(uris, u, /[ \t]+/); for (i in u) if (u[i] ~ /\/debian\/?$/) { print u[i]; exit } }
        }
        uris = ""; suites = ""; types = ""
      }
      /^[ \t]*$/ { flush(); next }
      /^[ \t]*#/ { next }
      tolower($1) == "uris:"   { $1 = ""; uris = $0 }
      tolower($1) == "suites:" { $1 = ""; suites = $0 }
      tolower($1) == "types:"  { $1 = ""; types = $0 }
      END { flush() }
    ' "$f"
  done
  # one-line format
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f "$f" ]] || continue
    sed -E 's/\[[^]]*\]//' "$f" | awk '$1 == "deb" && $2 ~ /\/debian\/?$/ && $3 !~ /-(security|updates|backports)$/ { print $2 }'
  done
}
MIRROR="${EDGEFLEET_DEBIAN_MIRROR:-$(find_mirror | head -n1)}"
[[ -n "$MIRROR" ]] || { log "could not find a Debian mirror URI in /etc/apt/sources.list*"; exit 1; }
MIRROR="${MIRROR%/}"
log "mirror: $MIRROR (suite $SUITE)"

# ---------------------------------------------------------------- private apt
APTDIR="$CACHE/apt"
mkdir -p "$APTDIR/state/lists/partial" "$APTDIR/cache/archives/partial" "$APTDIR/etc/apt.conf.d" \
         "$APTDIR/etc/sources.list.d" "$APTDIR/etc/preferences.d" "$APTDIR/etc/trusted.gpg.d"
: > "$APTDIR/state/status"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR $SUITE main" > "$APTDIR/etc/sources.list"
cat > "$APTDIR/apt.conf" <<CONF
Dir::State "$APTDIR/state";
Dir::State::status "$APTDIR/state/status";
Dir::Cache "$APTDIR/cache";
Dir::Etc "$APTDIR/etc";
Dir::Etc::sourcelist "$APTDIR/etc/sources.list";
Dir::Etc::sourceparts "$APTDIR/etc/sources.list.d";
Dir::Etc::preferences "$APTDIR/etc/preferences";
Dir::Etc::preferencesparts "$APTDIR/etc/preferences.d";
Dir::Etc::parts "$APTDIR/etc/apt.conf.d";
Dir::Etc::main "$APTDIR/etc/apt.conf";
Dir::Etc::trusted "$APTDIR/etc/trusted.gpg";
Dir::Etc::trustedparts "$APTDIR/etc/trusted.gpg.d";
Acquire::Languages "none";
Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled "false";
Acquire::Retries "3";
// Mirrors may be frozen snapshots whose Release files are past Valid-Until.
Acquire::Check-Valid-Until "false";
APT::Get::List-Cleanup "true";
APT::Sandbox::User "root";
Debug::NoLocking "true";
CONF
export APT_CONFIG="$APTDIR/apt.conf"

lists_fresh() {
  [[ -n "$(find "$APTDIR/state/lists" -maxdepth 1 -name '*_Packages*' -mmin -360 2>/dev/null | head -n1)" ]]
}
if ! lists_fresh; then
  log "apt-get update ($SUITE, private state under $APTDIR)"
  apt-get update -qq >&2
fi

# ---------------------------------------------------------------- closure
# Go toolchain: whatever golang-go in $SUITE points at (golang-1.NN-go), plus its -src.
GOPKG="${EDGEFLEET_GO_PACKAGE:-$(apt-cache depends golang-go 2>/dev/null | sed -nE 's/^ *Depends: (golang-1\.[0-9]+-go)$/\1/p' | head -n1)}"
[[ -n "$GOPKG" ]] || { log "could not determine the Go toolchain package in $SUITE"; exit 1; }
GOVER="${GOPKG#golang-}"; GOVER="${GOVER%-go}"
log "Go toolchain: $GOPKG"

ROOTS=(golang-k8s-apiextensions-apiserver-dev golang-k8s-client-go-dev "$GOPKG" etcd-server)
PKGS=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
         --no-replaces --no-enhances "${ROOTS[@]}" \
       | grep -E '^[a-z0-9]' | sort -u \
       | grep -E "^(golang-.*-dev|golang-${GOVER//./\\.}-(go|src)|etcd-server)\$" || true)
n=$(wc -w <<<"$PKGS")
log "closure: $n packages"
((n > 50)) || { log "dependency closure looks wrong"; exit 1; }
grep -qx etcd-server <<<"$PKGS" || { log "etcd-server missing from closure"; exit 1; }

# ---------------------------------------------------------------- download + extract
DEBS="$CACHE/debs"
ROOT="$CACHE/root"
mkdir -p "$DEBS"
# File names of the candidate versions (one apt call), then fetch what is missing.
# shellcheck disable=SC2086
URIS=$(apt-get download --print-uris -qq $PKGS)
want_list=$(awk '{print $2}' <<<"$URIS" | sort)
missing=()
while read -r line; do
  f=$(awk '{print $2}' <<<"$line")
  [[ -f "$DEBS/$f" ]] || missing+=("${f%%_*}")
done <<<"$URIS"
if ((${#missing[@]})); then
  log "downloading ${#missing[@]} .debs"
  (cd "$DEBS" && apt-get download -qq "${missing[@]}" >&2)
fi
for f in $want_list; do [[ -f "$DEBS/$f" ]] || { log "missing after download: $f"; exit 1; }; done
DEBSET_HASH=$(sha256sum <<<"$want_list" | cut -d' ' -f1)
if [[ ! -f "$ROOT/.debset" || "$(cat "$ROOT/.debset")" != "$DEBSET_HASH" ]]; then
  log "extracting into $ROOT"
  rm -rf "$ROOT"; mkdir -p "$ROOT"
  for f in $want_list; do dpkg-deb -x "$DEBS/$f" "$ROOT"; done
  echo "$DEBSET_HASH" > "$ROOT/.debset"
fi

GOROOT_DIR="$ROOT/usr/lib/go-$GOVER"
GO="$GOROOT_DIR/bin/go"
[[ -x "$GO" ]] || { log "go binary not found at $GO"; exit 1; }
ETCD_SRC="$ROOT/usr/bin/etcd"
[[ -x "$ETCD_SRC" ]] || { log "etcd binary not found at $ETCD_SRC"; exit 1; }

# ---------------------------------------------------------------- build
OWN_GOPATH="$CACHE/gopath"
PKGPATH="edgefleet.local/test-apiserver"
rm -rf "$OWN_GOPATH/src/$PKGPATH"
mkdir -p "$OWN_GOPATH/src/$PKGPATH" "$BIN"
cp "$HERE"/*.go "$OWN_GOPATH/src/$PKGPATH/"

if [[ -z "$K8S_VERSION" ]]; then
  v=$(sed -nE 's/^golang-k8s-apiextensions-apiserver-dev_([0-9]+)\.([0-9]+)\.([0-9]+)[-~+].*$/v1.\2.\3/p' <<<"$want_list")
  [[ -n "$v" ]] || { log "cannot derive the Kubernetes version; set EDGEFLEET_K8S_VERSION"; exit 1; }
  K8S_VERSION="$v"
fi
log "Kubernetes version: $K8S_VERSION"
K8S_MAJOR="${K8S_VERSION#v}"; K8S_MAJOR="${K8S_MAJOR%%.*}"
K8S_MINOR="${K8S_VERSION#v*.}"; K8S_MINOR="${K8S_MINOR%%.*}"
LDFLAGS="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  LDFLAGS+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$K8S_MAJOR -X $pkg.gitMinor=$K8S_MINOR"
  LDFLAGS+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

log "go build ($("$GO" version | cut -d' ' -f3); cold builds take several minutes)"
start=$(date +%s)
(
  cd "$OWN_GOPATH/src/$PKGPATH"
  env -u GOROOT -u GOFLAGS \
    GO111MODULE=off GOPROXY=off GOTOOLCHAIN=local GOTELEMETRY=off CGO_ENABLED=0 GOWORK=off \
    GOPATH="$OWN_GOPATH:$ROOT/usr/share/gocode" \
    GOCACHE="$CACHE/gocache" \
    "$GO" build -trimpath -ldflags "$LDFLAGS" -o "$APISERVER.tmp" . >&2
)
log "go build took $(( $(date +%s) - start )) s"
mv -f "$APISERVER.tmp" "$APISERVER"
cp -f "$ETCD_SRC" "$ETCD.tmp" && mv -f "$ETCD.tmp" "$ETCD"
echo "$WANT" > "$STAMP"

echo "apiserver=$APISERVER"
echo "etcd=$ETCD"
