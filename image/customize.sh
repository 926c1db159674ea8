#!/usr/bin/env bash
# mmdebstrap's customize hook: puts meshkeep into the root filesystem ROOT (argument 1) from the
# static binary BINARY (argument 2). Runs inside the private binfmt namespace, so `chroot ROOT`
# runs the image's own (ARM) programs.
set -euo pipefail
root=$1
binary=$2
src=$(cd "$(dirname "$0")/.." && pwd)

install -D -m 0755 "$binary" "$root/usr/bin/meshkeep"
install -D -m 0644 "$src/systemd/meshkeep.service" "$root/usr/lib/systemd/system/meshkeep.service"
install -D -m 0644 "$src/systemd/meshkeep-redirect.service" "$root/usr/lib/systemd/system/meshkeep-redirect.service"
install -D -m 0644 "$src/systemd/meshkeep.sysusers" "$root/usr/lib/sysusers.d/meshkeep.conf"
install -D -m 0644 "$src/systemd/meshkeep.tmpfiles" "$root/usr/lib/tmpfiles.d/meshkeep.conf"
install -D -m 0644 "$src/systemd/meshkeep-resolved.conf" "$root/usr/share/doc/meshkeep/meshkeep-resolved.conf"
install -D -m 0644 "$src/README.md" "$root/usr/share/doc/meshkeep/README.md"
install -D -m 0644 "$src/image/rootfs/meshkeep-firstboot.service" "$root/usr/lib/systemd/system/meshkeep-firstboot.service"
install -D -m 0644 "$src/image/rootfs/meshkeep-boot-report.service" "$root/usr/lib/systemd/system/meshkeep-boot-report.service"
install -D -m 0755 "$src/image/rootfs/firstboot" "$root/usr/lib/meshkeep/firstboot"
install -D -m 0755 "$src/image/rootfs/boot-report" "$root/usr/lib/meshkeep/boot-report"
install -D -m 0644 "$src/image/rootfs/config.toml" "$root/etc/meshkeep/config.toml"
install -d -m 0755 "$root/etc/meshkeep/config.d" "$root/boot/seed" "$root/var/lib/meshkeep"

cat > "$root/etc/fstab" <<FSTAB
LABEL=mk-root  /                  ext4  defaults,noatime         0 1
LABEL=mk-data  /var/lib/meshkeep  ext4  defaults,noatime,nofail  0 2
LABEL=MK-SEED  /boot/seed         vfat  defaults,umask=0077,nofail  0 0
FSTAB
echo meshkeep > "$root/etc/hostname"
# The meshkeep user exists in the image already (systemd-sysusers would also create it at boot).
chroot "$root" systemd-sysusers /usr/lib/sysusers.d/meshkeep.conf
systemctl --root="$root" enable meshkeep.service meshkeep-firstboot.service meshkeep-boot-report.service
# No network in the image by default: the box's configuration decides that (systemd-networkd).
systemctl --root="$root" mask apt-daily.timer apt-daily-upgrade.timer 2>/dev/null || true
