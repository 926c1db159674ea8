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
# The unit's hardening: exposure 2.0 or less (the threshold is exposure x 10).
stage systemd-unit systemd-analyze security --offline=true --threshold=20 --no-pager systemd/meshkeep.service
stage arm-build scripts/build-arm.sh
stage arm-selftest scripts/arm-selftest.sh
stage aarch64-tests scripts/test-aarch64.sh
stage_summary
