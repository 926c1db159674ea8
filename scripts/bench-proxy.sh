#!/usr/bin/env bash
# The proxy benchmark of BENCHMARKS.md: installs oha when missing, builds meshkeep in release
# mode and runs benches/proxy.rs (two boxes on loopback against the direct path).
# Settings: MESHKEEP_BENCH_SECONDS, MESHKEEP_BENCH_RATES, MESHKEEP_BENCH_RUNS, MESHKEEP_BENCH_TCP_MIB.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

OHA_VERSION=1.16.0
if ! oha --version 2>/dev/null | grep -q "$OHA_VERSION"; then
    echo "installing oha $OHA_VERSION"
    cargo install oha --locked --version "$OHA_VERSION"
fi
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr)"
cargo bench --bench proxy
