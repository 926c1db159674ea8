#!/usr/bin/env bash
# Installs everything meshkeep's checks need on a Debian 12 machine. Idempotent: a second run
# installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

APT_PACKAGES=(curl file openssl qemu-user-static iproute2 nftables python3 python3-pip systemd bind9-dnsutils chromium
    mmdebstrap arch-test qemu-system-arm dosfstools mtools fdisk e2fsprogs faketime)
PIP_PACKAGES=(ziglang==0.17.1 cargo-zigbuild==0.24.1)

apt_install "${APT_PACKAGES[@]}"

if ! command -v cargo >/dev/null; then
    echo "cargo is missing: install Rust with rustup first" >&2
    exit 1
fi
rustup component add rustfmt clippy rust-src
rustup target add aarch64-unknown-linux-musl x86_64-unknown-linux-musl
# armv7-unknown-linux-musleabihf has no prebuilt std here: scripts/build-arm.sh builds it from
# rust-src with -Zbuild-std.

if ! python3 -m pip show -q cargo-zigbuild >/dev/null 2>&1 || ! python3 -m pip show -q ziglang >/dev/null 2>&1; then
    # Debian's own python3 refuses system-wide pip installs (PEP 668); fall back to the user's
    # site in that case.
    python3 -m pip install --quiet "${PIP_PACKAGES[@]}" \
        || python3 -m pip install --quiet --user --break-system-packages "${PIP_PACKAGES[@]}"
fi
command -v cargo-zigbuild >/dev/null || { echo "cargo-zigbuild is not on PATH after pip install" >&2; exit 1; }
echo "setup: all tools present"
