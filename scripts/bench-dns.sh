#!/usr/bin/env bash
# DNS benchmark of BENCHMARKS.md: meshkeep (release, serving examples/site from its cache)
# against dnsmasq serving the same names from a hosts file, both on loopback, measured with
# dnsperf (closed loop, 10 clients, 100 queries in flight). Installs dnsmasq and dnsperf.
# Settings: MESHKEEP_BENCH_SECONDS (per run, default 10), MESHKEEP_BENCH_RUNS (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

SECONDS_PER_RUN=${MESHKEEP_BENCH_SECONDS:-10}
RUNS=${MESHKEEP_BENCH_RUNS:-3}
missing=()
for tool in dnsmasq dnsperf; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
cargo build --release --locked
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# The same answers from both: the example site's ClusterIPs.
cat > "$work/hosts" <<'EOF'
10.96.0.10 web.shop.svc.cluster.local
10.96.0.11 api.shop.svc.cluster.local
10.96.0.12 api-v2.shop.svc.cluster.local
EOF
for name in web api api-v2; do
    for _ in 1 2 3; do echo "$name.shop.svc.cluster.local A"; done
done > "$work/queries"

meshkeep_port=$(free_port)
dnsmasq_port=$(free_port)
admin_port=$(free_port)
MESHKEEP_DNS_LISTEN=127.0.0.1:$meshkeep_port MESHKEEP_ADMIN_LISTEN=127.0.0.1:$admin_port \
    MESHKEEP_STATE_DIR="$work/state" MESHKEEP_LOG=warn MESHKEEP_PROXY_OUTBOUND_LISTEN=127.0.0.1:$(free_port) \
    MESHKEEP_PROXY_INBOUND_LISTEN=127.0.0.1:$(free_port) RUNTIME_DIRECTORY="$work" \
    target/release/meshkeep run > "$work/meshkeep.log" 2>&1 &
pids+=($!)
dnsmasq --keep-in-foreground --no-resolv --no-hosts --addn-hosts="$work/hosts" --listen-address=127.0.0.1 \
    --bind-interfaces --port="$dnsmasq_port" --cache-size=1000 --pid-file="$work/dnsmasq.pid" --user="$(id -un)" &
pids+=($!)
for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$admin_port/ready" >/dev/null && break
    sleep 0.1
done
dig +short @127.0.0.1 -p "$meshkeep_port" web.shop.svc.cluster.local | grep -q 10.96.0.10
dig +short @127.0.0.1 -p "$dnsmasq_port" web.shop.svc.cluster.local | grep -q 10.96.0.10

echo "machine: $(nproc) cores, $(uname -sr); dnsperf $(dpkg-query -W -f='${Version}' dnsperf), dnsmasq $(dpkg-query -W -f='${Version}' dnsmasq)"
echo "| server | queries/s (median, min-max of $RUNS) | average latency ms (median) |"
echo "|---|---|---|"
for server in "meshkeep:$meshkeep_port" "dnsmasq:$dnsmasq_port"; do
    name=${server%%:*}; port=${server##*:}
    qps=(); lat=()
    for _ in $(seq "$RUNS"); do
        out=$(dnsperf -s 127.0.0.1 -p "$port" -d "$work/queries" -l "$SECONDS_PER_RUN" -c 10 -q 100 2>&1)
        qps+=("$(echo "$out" | awk '/Queries per second/ {printf "%.0f", $4}')")
        lat+=("$(echo "$out" | awk '/Average Latency/ {print $4 * 1000}')")
    done
    median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
    range() { printf '%s\n' "$@" | sort -n | awk 'NR==1 {lo=$1} {hi=$1} END {printf "%s-%s", lo, hi}'; }
    echo "| $name | $(median "${qps[@]}") ($(range "${qps[@]}")) | $(median "${lat[@]}") |"
done
