#!/usr/bin/env bash
# Builds static release binaries for aarch64 and armv7 (musl) without a container engine, using
# cargo-zigbuild (zig is the C toolchain and linker), and checks that both are statically linked.
# Hosts with a container engine can use `cross build --release --target ...` instead (Cross.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

cargo zigbuild --release --locked --target aarch64-unknown-linux-musl

# armv7 musl has no prebuilt std for this toolchain, so std is built from rust-src. -Zbuild-std is
# unstable: RUSTC_BOOTSTRAP=1 allows it on the stable toolchain. zig supplies the C runtime, so
# rustc must not link its own self-contained musl objects as well. RUSTC_BOOTSTRAP=1 also makes
# rustc mangle symbols the nightly way (v0), whose names link/hot-text.ld would not match: the
# stable default (legacy) is asked for explicitly.
CARGO_TARGET_ARMV7_UNKNOWN_LINUX_MUSLEABIHF_RUSTFLAGS="-C link-self-contained=no -Z unstable-options -C symbol-mangling-version=legacy" \
RUSTC_BOOTSTRAP=1 \
    cargo zigbuild --release --locked --target armv7-unknown-linux-musleabihf -Zbuild-std=std,panic_abort

for target in "${ARM_TARGETS[@]}"; do
    binary="target/$target/release/meshkeep"
    description=$(file -b "$binary")
    echo "$target: $description"
    case "$description" in
        *"statically linked"* | *"static-pie linked"*) ;;
        *) echo "$binary is not statically linked" >&2; exit 1 ;;
    esac
    echo "$target: $(stat -c %s "$binary") bytes"
done
