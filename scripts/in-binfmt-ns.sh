#!/usr/bin/env bash
# Runs a command in private user, mount and pid namespaces whose own binfmt_misc knows qemu-user
# for aarch64 and arm, so ARM binaries (and the ARM processes they spawn) run transparently.
# Needs Linux >= 6.7 and root (to write the uid/gid maps from outside); the host's binfmt_misc is
# never touched.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "in-binfmt-ns.sh needs root to map the namespace's users" >&2
    exit 1
fi

if [ "${1:-}" = "--inside" ]; then
    shift
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    # Magic and mask as in qemu-user-static's /usr/share/binfmts files; F opens the interpreter
    # now, so it is found from any mount namespace.
    register() { # name magic mask interpreter
        printf ':%s:M::%s:%s:%s:F' "$1" "$2" "$3" "$(command -v "$4")" > /proc/sys/fs/binfmt_misc/register
    }
    register qemu-aarch64 \
        '\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00' \
        '\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff' \
        qemu-aarch64-static
    register qemu-arm \
        '\x7f\x45\x4c\x46\x01\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x28\x00' \
        '\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff' \
        qemu-arm-static
    exec "$@"
fi

fifo=$(mktemp -u)
mkfifo "$fifo"
trap 'rm -f "$fifo"' EXIT
# The child waits on the fifo until its uid/gid maps have been written from out here.
unshare --user --mount --pid --fork --kill-child --mount-proc \
    bash -c 'read -r _ < "$0"; exec "$1" --inside "${@:2}"' "$fifo" "$(realpath "$0")" "$@" &
child=$!
for _ in $(seq 1 200); do
    [ "$(readlink "/proc/$child/ns/user")" != "$(readlink /proc/self/ns/user)" ] && break
    sleep 0.01
done
echo "0 0 4294967295" > "/proc/$child/uid_map"
echo "0 0 4294967295" > "/proc/$child/gid_map"
echo go > "$fifo"
wait "$child"
