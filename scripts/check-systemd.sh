#!/usr/bin/env bash
# The systemd files: `systemd-analyze verify` is clean for both units (with ExecStart pointed at
# the built binary, as it would be installed), and the daemon's unit has an exposure of 2.0 or
# less (`systemd-analyze security` prints exposure x 10 against the threshold).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

binary=$(pwd)/target/debug/meshkeep
[ -x "$binary" ] || cargo build --locked
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for unit in meshkeep.service meshkeep-redirect.service; do
    sed "s|/usr/bin/meshkeep|$binary|g" "systemd/$unit" > "$work/$unit"
done
out=$(systemd-analyze verify --man=no "$work/meshkeep.service" "$work/meshkeep-redirect.service" 2>&1 || true)
# Only findings about our files count (the host's own units may have their own warnings): by
# path, or by unit name (unit-level messages are prefixed with the unit's name).
ours=$(echo "$out" | grep -E "$work|meshkeep(-redirect)?\.service" || true)
if [ -n "$ours" ]; then
    echo "systemd-analyze verify found problems:"
    echo "$ours"
    exit 1
fi
echo "verify: clean"
systemd-analyze security --offline=true --threshold=20 --no-pager systemd/meshkeep.service | tail -1
