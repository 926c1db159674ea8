#!/usr/bin/env bash
# Every check, from a fresh Debian 12 machine: installs what it needs, then formatting, lints,
# the test suite, the systemd units, static ARM release builds with a qemu-user self-test, the
# aarch64 suite under qemu-user, the flashable images booted in QEMU, and the VM packages.
# Prints how long each stage took.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

stage setup scripts/setup.sh
stage fmt cargo fmt --check
stage clippy cargo clippy --locked --all-targets -- -D warnings
stage test cargo test --locked
# The units verify cleanly and the daemon's hardening keeps exposure at 2.0 or less.
stage systemd-unit scripts/check-systemd.sh
stage arm-build scripts/build-arm.sh
stage arm-selftest scripts/arm-selftest.sh
stage aarch64-tests scripts/test-aarch64.sh
# Flashable images for arm64 and armhf, each booted twice in QEMU (offline, from the cache).
stage images image/test.sh
# .deb and systemd-sysext packages for VMs, checked.
stage packages image/package.sh
stage_summary
