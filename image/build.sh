#!/usr/bin/env bash
# Builds the flashable image for one architecture: image/build.sh arm64|armhf [OUT_DIR]
#
# A Debian 12 root filesystem (mmdebstrap, with qemu-user registered only in a private
# binfmt_misc namespace), systemd, the static meshkeep binary, its units enabled, and a
# first-boot step that installs the box's settings from a seed partition. The raw disk:
#   p1  mk-root  ext4  the system
#   p2  mk-data  ext4  /var/lib/meshkeep: the cache and identity, kept across image updates
#   p3  MK-SEED  vfat  /boot/seed: meshkeep/ with config.toml, config.d/, credentials/, cache.mkc
# plus the kernel and initrd beside it for QEMU's direct boot (`virt` machine).
# Needs root (mmdebstrap in a user namespace whose maps are written from outside).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

arch=${1:?usage: image/build.sh arm64|armhf [OUT_DIR]}
out=${2:-target/image/$arch}
case "$arch" in
    arm64) triple=aarch64-unknown-linux-musl; kernel=linux-image-arm64 ;;
    armhf) triple=armv7-unknown-linux-musleabihf; kernel=linux-image-armmp-lpae ;;
    *) echo "unknown architecture $arch (arm64 or armhf)" >&2; exit 2 ;;
esac
binary=target/$triple/release/meshkeep
[ -x "$binary" ] || scripts/build-arm.sh

# The mirror is the machine's own (its apt sources), never one written here.
mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -1)
[ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $3 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
[ -n "$mirror" ] || { echo "no Debian mirror in this machine's apt sources" >&2; exit 1; }

rm -rf "$out"
mkdir -p "$out"
out=$(realpath "$out")
rootfs=$out/rootfs
here=$(pwd)
start=$SECONDS

# Debian's kernels build virtio and ext4 as modules: a small initrd with just those (MODULES=most
# under qemu-user takes minutes). Set up before the kernel package runs update-initramfs.
essential_hook='mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/usr/share/initramfs-tools/modules.d"
echo MODULES=list > "$1/etc/initramfs-tools/conf.d/meshkeep"
printf "virtio_pci\nvirtio_mmio\nvirtio_blk\next4\n" > "$1/usr/share/initramfs-tools/modules.d/meshkeep.conf"'
customize_hook="$here/image/customize.sh \"\$1\" $here/$binary"
for attempt in 1 2 3; do
    # armhf indexes are sometimes caught mid-sync: retry.
    if scripts/in-binfmt-ns.sh mmdebstrap --mode=root --variant=minbase --architectures="$arch" \
        --include="systemd-sysv,udev,kmod,e2fsprogs,dosfstools,initramfs-tools,$kernel,curl,ca-certificates,procps,nftables" \
        --essential-hook="$essential_hook" --customize-hook="$customize_hook" \
        bookworm "$rootfs" "deb $mirror bookworm main"; then
        break
    fi
    [ "$attempt" -lt 3 ] || exit 1
    echo "mmdebstrap failed; retrying ($attempt)"
    rm -rf "$rootfs"
done
echo "root filesystem: $((SECONDS - start))s, $(du -sm "$rootfs" | cut -f1) MiB"

cp "$rootfs"/boot/vmlinuz-* "$out/vmlinuz"
cp "$rootfs"/boot/initrd.img-* "$out/initrd.img"

# Partitions as files, then placed into one GPT disk without loop devices.
mkfs.ext4 -q -L mk-root -d "$rootfs" "$out/root.ext4" 1400M
mkfs.ext4 -q -L mk-data "$out/data.ext4" 256M
rm -f "$out/seed.vfat"
mkfs.vfat -C -n MK-SEED "$out/seed.vfat" 32768 >/dev/null
if [ -n "${MESHKEEP_IMAGE_SEED:-}" ]; then
    mcopy -s -i "$out/seed.vfat" "$MESHKEEP_IMAGE_SEED" ::/
fi
sectors() { echo $(( $(stat -c %s "$1") / 512 )); }
root=$(sectors "$out/root.ext4"); data=$(sectors "$out/data.ext4"); seed=$(sectors "$out/seed.vfat")
first=2048
total=$((first + root + data + seed + 2048))
rm -f "$out/disk.img"
truncate -s $((total * 512)) "$out/disk.img"
sfdisk -q "$out/disk.img" <<PARTITIONS
label: gpt
start=$first, size=$root, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=mk-root
start=$((first + root)), size=$data, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=mk-data
start=$((first + root + data)), size=$seed, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, name=MK-SEED
PARTITIONS
dd if="$out/root.ext4" of="$out/disk.img" bs=512 seek=$first conv=notrunc,sparse status=none
dd if="$out/data.ext4" of="$out/disk.img" bs=512 seek=$((first + root)) conv=notrunc,sparse status=none
dd if="$out/seed.vfat" of="$out/disk.img" bs=512 seek=$((first + root + data)) conv=notrunc status=none
rm -rf "$rootfs" "$out/root.ext4" "$out/data.ext4" "$out/seed.vfat"
echo "image: $out/disk.img ($(du -m --apparent-size "$out/disk.img" | cut -f1) MiB apparent, $(du -m "$out/disk.img" | cut -f1) MiB on disk) in $((SECONDS - start))s"
