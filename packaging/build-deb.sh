#!/usr/bin/env bash
# Builds the edgefleet-agent Debian package with dpkg-deb from a built agent binary:
#   packaging/build-deb.sh BINARY OUT_DIR
# Release packages come from `cargo build --release -p edgefleet-agent`; tests pass the
# debug binary and DEB_COMPRESS=none to keep it quick. Prints the .deb's path.
set -euo pipefail
bin=${1:?usage: build-deb.sh BINARY OUT_DIR}
out=${2:?usage: build-deb.sh BINARY OUT_DIR}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/../Cargo.toml" | head -1)
arch=$(dpkg --print-architecture)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

install -D -m 0755 "$bin" "$stage/usr/bin/edgefleet-agent"
install -D -m 0644 "$here/edgefleet-agent.service" "$stage/lib/systemd/system/edgefleet-agent.service"
install -D -m 0644 "$here/agent.toml" "$stage/etc/edgefleet/agent.toml"
install -D -m 0600 "$here/agent.env" "$stage/etc/edgefleet/agent.env"
install -d -m 0755 "$stage/etc/edgefleet/agent.d"
install -d -m 0755 "$stage/etc/edgefleet/trust"
install -d "$stage/DEBIAN"
cat > "$stage/DEBIAN/control" <<CONTROL
Package: edgefleet-agent
Version: $version
Architecture: $arch
Maintainer: edgefleet maintainers <maintainers@edgefleet.io>
Depends: libc6, libgcc-s1, libstdc++6, libgomp1, libtss2-esys-3.0.2-0 | libtss2-esys0, libtss2-tctildr0 | libtss2-esys0, adduser
Recommends: systemd
Section: net
Priority: optional
Homepage: https://github.com/edgefleet/edgefleet
Description: edgefleet device agent
 Attests the device (TPM 2.0, SEV-SNP, TDX), fetches signed LLMs assigned by the
 edgefleet operator, verifies them (OpenSSF model-signing), serves them with llama.cpp
 behind sandboxed WebAssembly plugins on an OpenAI-compatible API, and reports back.
CONTROL
printf '/etc/edgefleet/agent.toml\n/etc/edgefleet/agent.env\n' > "$stage/DEBIAN/conffiles"
cat > "$stage/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
# Installing into another root (dpkg --root): nothing to do on this system.
[ -n "${DPKG_ROOT:-}" ] && exit 0
if [ "$1" = configure ]; then
    adduser --system --group --home /var/lib/edgefleet --no-create-home edgefleet >/dev/null
    # The TPM resource manager is group tss on Debian.
    if getent group tss >/dev/null; then adduser edgefleet tss >/dev/null; fi
    chown root:edgefleet /etc/edgefleet/agent.env
    chmod 0640 /etc/edgefleet/agent.env
    # The state directory, where the installer writes the bootstrap token (the agent
    # deletes it after enrolment); systemd's StateDirectory= keeps it 0700.
    install -d -m 0700 -o edgefleet -g edgefleet /var/lib/edgefleet
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload
        systemctl enable edgefleet-agent.service >/dev/null
    fi
fi
POSTINST
cat > "$stage/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
[ -n "${DPKG_ROOT:-}" ] && exit 0
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
    systemctl stop edgefleet-agent.service || true
    systemctl disable edgefleet-agent.service >/dev/null || true
fi
PRERM
chmod 0755 "$stage/DEBIAN/postinst" "$stage/DEBIAN/prerm"
mkdir -p "$out"
deb="$out/edgefleet-agent_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Z"${DEB_COMPRESS:-xz}" --build "$stage" "$deb" >/dev/null
echo "$deb"
