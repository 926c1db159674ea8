#!/usr/bin/env bash
# User-space instructions per request on box A and box B, counted by callgrind: unlike requests/s
# on a shared machine, the count hardly moves between runs, so it tells two builds apart where
# throughput runs overlap (BENCHMARKS.md, "Instructions per request").
#
#   bash scripts/bench-instructions.sh [BINARY] [REQUESTS]
#
# BINARY: the meshkeep build to measure (default: the static musl release, built if missing);
# REQUESTS: per protocol (default 4000). Installs valgrind and oha if missing. The benchmark
# harness (benches/proxy.rs) starts and warms the boxes under callgrind and holds them; this
# script zeroes the counters, sends the requests (HTTP/1.1 on 4 connections, then HTTP/2 with 8
# streams on one), dumps the counters and divides. With MESHKEEP_CALLGRIND_OUT=DIR the dumps
# (and one of everything before the first request) are kept there, for callgrind_annotate (a
# build with symbols: CARGO_PROFILE_RELEASE_STRIP=false CARGO_PROFILE_RELEASE_DEBUG=line-tables-only);
# MESHKEEP_CALLGRIND_ARGS adds options to callgrind's command line.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

command -v valgrind >/dev/null || apt_install valgrind
command -v iperf3 >/dev/null || apt_install iperf3 # the harness checks for it
command -v oha >/dev/null || cargo install oha --locked --version 1.16.0
BINARY=${1:-}
if [ -z "$BINARY" ]; then
    BINARY=target/x86_64-unknown-linux-musl/release/meshkeep
    [ -x "$BINARY" ] || cargo zigbuild --locked --release --target x86_64-unknown-linux-musl
fi
BINARY=$(realpath "$BINARY")
REQUESTS=${2:-4000}

WORK=$(mktemp -d)
HARNESS=
# At exit: the harness's process group (it and the boxes it started), then the work folder.
cleanup() {
    if [ -n "$HARNESS" ]; then kill -- "-$HARNESS" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
# The harness runs this wrapper as meshkeep: `run` goes under callgrind, other commands do not.
cat > "$WORK/meshkeep" <<EOF
#!/bin/sh
for arg in "\$@"; do
    if [ "\$arg" = run ]; then
        exec valgrind --tool=callgrind ${MESHKEEP_CALLGRIND_ARGS:-} --callgrind-out-file="$WORK/%p.out" --log-file="$WORK/%p.log" "$BINARY" "\$@"
    fi
done
exec "$BINARY" "\$@"
EOF
chmod +x "$WORK/meshkeep"

HARNESS_BIN=$(bench_executable proxy)
[ -x "$HARNESS_BIN" ] || { echo "the benchmark harness did not build" >&2; exit 1; }
MESHKEEP_BINARY="$WORK/meshkeep" MESHKEEP_BENCH_CONTENDERS=meshkeep MESHKEEP_BENCH_HOLD=900 \
    setsid "$HARNESS_BIN" > "$WORK/hold.log" 2>&1 &
HARNESS=$!
for _ in $(seq 1 180); do grep -q '^direct:' "$WORK/hold.log" && break; sleep 1; done
grep -q '^direct:' "$WORK/hold.log" || { cat "$WORK/hold.log"; echo "the boxes did not come up" >&2; exit 1; }
URL=$(awk '/^meshkeep:/ {print $2}' "$WORK/hold.log")
PIDS=$(sed -n 's/^meshkeep:.*pids \[\(.*\)\])/\1/p' "$WORK/hold.log" | tr -d ',')
PORT=${URL##*:}; PORT=${PORT%/}
BOX_A=$(ss -ltnpH "sport = :$PORT" | sed -n '1s/.*pid=\([0-9]*\).*/\1/p')
[ -n "$BOX_A" ] || { echo "nothing listens on box A's port $PORT" >&2; exit 1; }

# measure LABEL OHA-ARGS...: instructions per request on A, and on the box B that served it
# (of the other instances, the one that ran more than 1,000 instructions per request).
measure() {
    local label=$1; shift
    for pid in $PIDS; do callgrind_control --zero "$pid" >/dev/null 2>&1; done
    local load
    load=$(oha --no-tui -n "$REQUESTS" "$@" "$URL")
    grep -q 'Success rate:.*100.00%' <<<"$load" || echo "$label: some requests failed" >&2
    for pid in $PIDS; do callgrind_control --dump "$pid" >/dev/null 2>&1; done
    sleep 1
    ROUND=$((ROUND + 1))
    local a=0 b=0 count dump
    for pid in $PIDS; do
        # Dumps are numbered from 1; a missing one would leave the last round's counts.
        dump="$WORK/$pid.out.$ROUND"
        [ -f "$dump" ] || { echo "no callgrind dump $dump" >&2; exit 1; }
        count=$(awk '/^summary:/ {print $2}' "$dump")
        if [ "$pid" = "$BOX_A" ]; then a=$count; elif [ "$count" -gt $((REQUESTS * 1000)) ]; then b=$count; fi
    done
    printf '%-9s A %6d  B %6d instructions per request\n' "$label" $((a / REQUESTS)) $((b / REQUESTS))
    if [ -n "${MESHKEEP_CALLGRIND_OUT:-}" ]; then
        mkdir -p "$MESHKEEP_CALLGRIND_OUT"
        for pid in $PIDS; do
            local role=b
            [ "$pid" = "$BOX_A" ] && role=a
            cp "$WORK/$pid.out.$ROUND" "$MESHKEEP_CALLGRIND_OUT/${label//\//}-$role-$pid.out"
        done
    fi
}
ROUND=0
if [ -n "${MESHKEEP_CALLGRIND_OUT:-}" ]; then
    # What the boxes ran from their start until now (starting, issuing certificates, the
    # harness's warm-up), kept for scripts/hot-text.sh.
    for pid in $PIDS; do callgrind_control --dump "$pid" >/dev/null 2>&1; done
    sleep 1
    ROUND=1
    mkdir -p "$MESHKEEP_CALLGRIND_OUT"
    for pid in $PIDS; do cp "$WORK/$pid.out.1" "$MESHKEEP_CALLGRIND_OUT/start-$pid.out"; done
fi
echo "$BINARY, $REQUESTS requests per protocol"
measure HTTP/1.1 -c 4
measure HTTP/2 -c 1 --http2 -p 8
