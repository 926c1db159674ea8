#!/usr/bin/env bash
# Runs each ARM release binary under qemu-user: `--version`, then a daemon on loopback that must
# answer 200 on /ready and exit 0 on SIGTERM.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

for target in "${ARM_TARGETS[@]}"; do
    qemu=${QEMU_FOR[$target]}
    binary="target/$target/release/meshkeep"
    echo "$target: $($qemu "$binary" --version)"

    work=$(mktemp -d)
    port=$(free_port)
    printf '[admin]\nlisten = "127.0.0.1:%s"\n[store]\nstate_dir = "%s/state"\n' "$port" "$work" > "$work/config.toml"
    "$qemu" "$binary" --config "$work/config.toml" run 2> "$work/stderr.log" &
    pid=$!
    ready=""
    for _ in $(seq 1 300); do
        if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/ready")" = 200 ]; then
            ready=yes; break
        fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    if [ -z "$ready" ]; then
        echo "$target: /ready never answered 200" >&2
        cat "$work/stderr.log" >&2
        kill -9 "$pid" 2>/dev/null || true
        exit 1
    fi
    echo "$target: /ready answered 200"
    kill -TERM "$pid"
    if ! wait "$pid"; then
        echo "$target: daemon did not exit 0 on SIGTERM" >&2
        cat "$work/stderr.log" >&2
        exit 1
    fi
    echo "$target: exited 0 on SIGTERM"
    rm -rf "$work"
done
