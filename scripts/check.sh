#!/usr/bin/env bash
# Every check, from a fresh Debian 12 machine: installs what it needs, then formatting, lints,
# the test suite, static ARM release builds with a qemu-user self-test, and the aarch64 suite
# under qemu-user. Prints how long each stage took.
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
stage_summary
