#!/usr/bin/env bash
# The proxy benchmark of BENCHMARKS.md on a fresh Debian machine: installs the peers (HAProxy,
# nginx with its stream module), the load tools (oha, iperf3) and matplotlib, builds meshkeep in
# release mode, runs benches/proxy.rs and draws the added-latency plot.
# Settings: MESHKEEP_BENCH_SECONDS, MESHKEEP_BENCH_RATES, MESHKEEP_BENCH_RUNS,
# MESHKEEP_BENCH_CONTENDERS (see benches/proxy.rs); PLOT (default benches/results/added-latency.png).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

APT_PACKAGES=(haproxy nginx-light libnginx-mod-stream iperf3 openssl)
apt_install "${APT_PACKAGES[@]}"
# The packages start their own services where an init system runs them; the benchmark starts
# its own instances on free loopback ports and leaves those alone.
if ! python3 -c 'import matplotlib' 2>/dev/null; then
    python3 -m pip install --quiet matplotlib \
        || python3 -m pip install --quiet --user --break-system-packages matplotlib
fi
OHA_VERSION=1.16.0
if ! oha --version 2>/dev/null | grep -q "$OHA_VERSION"; then
    echo "installing oha $OHA_VERSION"
    cargo install oha --locked --version "$OHA_VERSION"
fi

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr)"
echo "peers: $(haproxy -v | head -1); $(nginx -v 2>&1); $(oha --version); $(iperf3 --version | head -1)"
RESULTS=${MESHKEEP_BENCH_OUT:-target/bench/proxy.json}
MESHKEEP_BENCH_OUT="$RESULTS" cargo bench --bench proxy
python3 scripts/plot-bench.py "$RESULTS" "${PLOT:-benches/results/added-latency.png}"
