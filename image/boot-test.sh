#!/usr/bin/env bash
# Boots a built image under qemu-system twice, with no network: the first boot installs the seed
# (a configuration whose manifest folder does not exist on the box, and a cache export), the
# second boot is a reboot still offline. Each must reach meshkeep.service READY with /ready
# answering 200 inside the guest and serve web.shop from the cache.
#   image/boot-test.sh arm64|armhf [IMAGE_DIR]
# The console logs stay in IMAGE_DIR (console-1.log, console-2.log).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

arch=${1:?usage: image/boot-test.sh arm64|armhf [IMAGE_DIR]}
dir=$(realpath "${2:-target/image/$arch}")
case "$arch" in
    arm64) qemu=(qemu-system-aarch64 -M virt -cpu cortex-a53) ;;
    # Without highmem=off the 32-bit kernel cannot see the virtio disk.
    armhf) qemu=(qemu-system-arm -M virt,highmem=off -cpu cortex-a15) ;;
    *) echo "unknown architecture $arch" >&2; exit 2 ;;
esac

fail() {
    echo "image test ($arch): $*" >&2
    echo "console logs: $dir/console-*.log" >&2
    tail -n 60 "$dir"/console-*.log >&2 || true
    exit 1
}

boot() { # number
    local log=$dir/console-$1.log start=$SECONDS
    # The guest powers itself off after its boot report (meshkeep.selftest on the command line).
    timeout 420 "${qemu[@]}" -smp 2 -m 1024 -nographic -no-reboot -nic none \
        -kernel "$dir/vmlinuz" -initrd "$dir/initrd.img" \
        -append "root=/dev/vda1 rw panic=-1 meshkeep.selftest console=ttyAMA0" \
        -drive "file=$dir/disk.img,if=virtio,format=raw" < /dev/null > "$log" 2>&1 || true
    local report
    report=$(grep -a 'MESHKEEP-BOOT-REPORT' "$log" | tail -1 | tr -d '\r')
    [ -n "$report" ] || fail "boot $1: no boot report within the time limit"
    echo "boot $1: $report ($((SECONDS - start))s)"
    case "$report" in *"ready=yes unit=active"*) ;; *) fail "boot $1: meshkeep did not become ready" ;; esac
    case "$report" in *"web.shop=found"*) ;; *) fail "boot $1: web.shop is not served from the cache" ;; esac
    case "$report" in *"objects=0 "*) fail "boot $1: the cache is empty" ;; esac
}

boot 1
grep -aq "meshkeep first boot: done" "$dir/console-1.log" || fail "the first boot did not install the seed"
boot 2
if grep -aq "meshkeep first boot: installing" "$dir/console-2.log"; then fail "the seed was installed twice"; fi
b1=$(grep -a 'MESHKEEP-BOOT-REPORT' "$dir/console-1.log" | tail -1 | sed 's/.*boot=//' | tr -d '\r')
b2=$(grep -a 'MESHKEEP-BOOT-REPORT' "$dir/console-2.log" | tail -1 | sed 's/.*boot=//' | tr -d '\r')
[ "$b1" != "$b2" ] || fail "both reports come from the same boot"
echo "image test ($arch): ready on both boots, offline, serving from the cache"
