#!/usr/bin/env bash
# Runs the whole test suite built for aarch64 musl under qemu-user. Integration tests spawn the
# aarch64 daemon, so the run happens inside a private binfmt_misc namespace (in-binfmt-ns.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_RUNNER=qemu-aarch64-static
# Emulation is slow: fewer kill -9 rounds than the native run (which does 50).
export MESHKEEP_KILL_ROUNDS="${MESHKEEP_KILL_ROUNDS:-12}"
# Tests that depend on syscalls qemu-user does not emulate skip themselves, saying so.
export MESHKEEP_UNDER_QEMU_USER=1
scripts/in-binfmt-ns.sh cargo-zigbuild test --locked --target aarch64-unknown-linux-musl
