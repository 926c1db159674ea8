#!/usr/bin/env bash
# Every check, from a fresh Debian 12 machine: installs what it needs, then formatting, lints,
# the test suite, the systemd units, static ARM release builds with a qemu-user self-test, the
# aarch64 suite under qemu-user, the flashable images booted in QEMU, and the VM packages.
# Prints how long each stage took.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

# Disk is scarce on CI machines (a run once failed writing the image for want of space): no
# incremental caches (every build here is a first build), line tables only for meshkeep's own
# debug info (backtraces keep file and line; the test binaries shrink by most of their size),
# and each build tree removed once no later stage reads it.
export CARGO_INCREMENTAL=0 CARGO_PROFILE_DEV_DEBUG=line-tables-only

stage setup scripts/setup.sh
stage fmt cargo fmt --check
stage clippy cargo clippy --locked --all-targets -- -D warnings
stage test cargo test --locked
# The units verify cleanly and the daemon's hardening keeps exposure at 2.0 or less.
stage systemd-unit scripts/check-systemd.sh
stage arm-build scripts/build-arm.sh
stage arm-selftest scripts/arm-selftest.sh
stage aarch64-tests scripts/test-aarch64.sh
stage prune rm -rf target/aarch64-unknown-linux-musl/debug
# Flashable images for arm64 and armhf, each booted twice in QEMU (offline, from the cache).
stage images image/test.sh
# .deb and systemd-sysext packages for VMs, checked.
stage packages image/package.sh
stage_summary
