#!/usr/bin/env bash
# The image stage of the test command: a seed (configuration and cache export made by this
# machine's meshkeep from examples/site), then for arm64 and armhf: build the image and boot it
# twice in QEMU. Prints each step's time.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

work=$(realpath -m target/image/seed-work)
rm -rf "$work"
mkdir -p "$work/seed/meshkeep"
cargo build --locked
host=target/debug/meshkeep
# This machine syncs the example site once and exports its cache.
cat > "$work/export.toml" <<CONFIG
[store]
state_dir = "$work/state"
flush_interval = "100ms"
[upstream.local]
path = "$(pwd)/examples/site"
[admin]
listen = "127.0.0.1:$(free_port)"
[proxy]
enabled = false
[dns]
enabled = false
CONFIG
RUNTIME_DIRECTORY="$work" "$host" -c "$work/export.toml" run > "$work/export.log" 2>&1 &
pid=$!
for _ in $(seq 100); do
    "$host" -c "$work/export.toml" resolve web.shop > /dev/null 2>&1 && break
    sleep 0.2
done
sleep 0.5
kill -TERM "$pid"; wait "$pid" || true
"$host" -c "$work/export.toml" cache export "$work/seed/meshkeep/cache.mkc"
# The box's own configuration: its manifest folder does not exist there, so all it serves comes
# from the cache it was given.
# Its link's token is a seed credential: first boot hands it to the service through
# LoadCredential=, and the daemon exits 78 at start if it is not there. The guest has no
# network, so the link stays disconnected.
cat > "$work/seed/meshkeep/config.toml" <<CONFIG
[node]
name = "edge-qemu"
[upstream.local]
path = "/etc/meshkeep/manifests"
[upstream.links.east]
server = "https://192.0.2.1:6443"
token_file = "credential:east-token"
mode = "mirror"
CONFIG
mkdir -p "$work/seed/meshkeep/credentials"
echo "a-token-the-guest-cannot-use-offline" > "$work/seed/meshkeep/credentials/east-token"

for arch in arm64 armhf; do
    start=$SECONDS
    MESHKEEP_IMAGE_SEED="$work/seed/meshkeep" image/build.sh "$arch"
    echo "image $arch: built in $((SECONDS - start))s"
    start=$SECONDS
    image/boot-test.sh "$arch"
    echo "image $arch: booted twice in $((SECONDS - start))s"
done
