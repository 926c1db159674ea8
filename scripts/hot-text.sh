#!/usr/bin/env bash
# Makes link/hot-text.ld again: the order of the static builds' code, from what boxes run.
#
#   bash scripts/hot-text.sh
#
# Builds meshkeep with symbols (static musl, target/prof), then records with callgrind the
# functions that run (1) in a daemon starting from a store of 1,000 services and idling for
# 5 s, (2) in the benchmark harness's two boxes starting, warming up, and (3) serving HTTP/1.1
# and HTTP/2 requests (scripts/bench-instructions.sh). scripts/hot-text.py turns them, in that
# order, into the linker script. Run it when the code has changed a lot: functions added
# since go with the rest of the code, which costs idle memory, not correctness. Takes about
# 20 minutes on two cores.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

command -v valgrind >/dev/null || apt_install valgrind
# Line tables too: without debug info zig's linker leaves no symbol table either (seen with
# cargo-zigbuild here), and the list is made from the symbols' names.
CARGO_PROFILE_RELEASE_STRIP=false CARGO_PROFILE_RELEASE_DEBUG=line-tables-only \
    cargo zigbuild --locked --release --target x86_64-unknown-linux-musl --target-dir target/prof
BINARY=$(realpath target/prof/x86_64-unknown-linux-musl/release/meshkeep)
nm "$BINARY" >/dev/null 2>&1 || { echo "$BINARY has no symbol table" >&2; exit 1; }

WORK=$(mktemp -d)
DAEMON=
cleanup() {
    if [ -n "$DAEMON" ]; then kill "$DAEMON" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# (1) The store benchmark leaves a store of 1,000 services and a configuration for it.
STORE_BENCH=$(bench_executable store)
MESHKEEP_BINARY="$BINARY" MESHKEEP_BENCH_SERVICES=1000 MESHKEEP_BENCH_ENDPOINTS=3000 \
    MESHKEEP_BENCH_KEEP="$WORK/store" "$STORE_BENCH" > "$WORK/store.log"
ADMIN=$(sed -n 's/^listen = "\(.*\)"$/\1/p' "$WORK/store/config.toml" | head -1)
valgrind --tool=callgrind --demangle=no --callgrind-out-file="$WORK/idle.out" --log-file="$WORK/idle.log" \
    "$BINARY" --config "$WORK/store/config.toml" run 2> "$WORK/daemon.log" &
DAEMON=$!
for _ in $(seq 1 120); do curl -sf "http://$ADMIN/ready" >/dev/null 2>&1 && break; sleep 0.5; done
curl -sf "http://$ADMIN/ready" >/dev/null || { cat "$WORK/daemon.log"; echo "the daemon did not get ready" >&2; exit 1; }
sleep 5
callgrind_control --dump "$DAEMON" >/dev/null
sleep 1
kill "$DAEMON"
wait "$DAEMON" || true
DAEMON=

# (2) and (3): the harness's boxes.
MESHKEEP_CALLGRIND_ARGS=--demangle=no MESHKEEP_CALLGRIND_OUT="$WORK/proxy" \
    bash scripts/bench-instructions.sh "$BINARY" 2000

python3 scripts/hot-text.py "$BINARY" link/hot-text.ld "$WORK/idle.out.1" -- "$WORK"/proxy/start-*.out \
    -- "$WORK"/proxy/HTTP*.out
