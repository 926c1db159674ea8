#!/usr/bin/env bash
# The VM packages: a .deb per architecture (amd64 from this machine's static musl build, arm64
# and armhf from scripts/build-arm.sh) and a systemd-sysext image, each with the units.
#   image/package.sh [OUT_DIR]       (default target/packages)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

out=$(realpath -m "${1:-target/packages}")
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
rm -rf "$out"
mkdir -p "$out"

# The amd64 binary: static musl like the ARM ones, so one package fits every Debian release.
cargo zigbuild --release --locked --target x86_64-unknown-linux-musl
[ -x target/aarch64-unknown-linux-musl/release/meshkeep ] || scripts/build-arm.sh

# Lays out the installed files under $1 from the binary $2.
tree() {
    install -D -m 0755 "$2" "$1/usr/bin/meshkeep"
    install -D -m 0644 systemd/meshkeep.service "$1/usr/lib/systemd/system/meshkeep.service"
    install -D -m 0644 systemd/meshkeep-redirect.service "$1/usr/lib/systemd/system/meshkeep-redirect.service"
    install -D -m 0644 systemd/meshkeep.sysusers "$1/usr/lib/sysusers.d/meshkeep.conf"
    install -D -m 0644 systemd/meshkeep.tmpfiles "$1/usr/lib/tmpfiles.d/meshkeep.conf"
    install -D -m 0644 systemd/meshkeep-resolved.conf "$1/usr/share/doc/meshkeep/meshkeep-resolved.conf"
    install -D -m 0644 README.md "$1/usr/share/doc/meshkeep/README.md"
}

for pair in amd64:x86_64-unknown-linux-musl arm64:aarch64-unknown-linux-musl armhf:armv7-unknown-linux-musleabihf; do
    arch=${pair%%:*}; triple=${pair##*:}
    root=$out/deb-$arch
    tree "$root" "target/$triple/release/meshkeep"
    install -d "$root/DEBIAN"
    cat > "$root/DEBIAN/control" <<CONTROL
Package: meshkeep
Version: $version
Architecture: $arch
Maintainer: meshkeep developers <meshkeep@localhost>
Section: net
Priority: optional
Depends: systemd (>= 247)
Installed-Size: $(du -sk "$root/usr" | cut -f1)
Description: service-mesh node for the edge
 Discovery, DNS, mTLS identity and a proxy that keep serving from a local cache while the
 upstream Kubernetes cluster is unreachable. One static binary.
CONTROL
    cat > "$root/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
    systemd-sysusers /usr/lib/sysusers.d/meshkeep.conf
    systemd-tmpfiles --create /usr/lib/tmpfiles.d/meshkeep.conf
    systemctl daemon-reload
    systemctl enable meshkeep.service >/dev/null 2>&1 || true
fi
POSTINST
    cat > "$root/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl disable --now meshkeep.service meshkeep-redirect.service >/dev/null 2>&1 || true
fi
PRERM
    chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm"
    dpkg-deb --root-owner-group -Zxz --build "$root" "$out/meshkeep_${version}_${arch}.deb" >/dev/null
    rm -rf "$root"
    echo "$out/meshkeep_${version}_${arch}.deb: $(stat -c %s "$out/meshkeep_${version}_${arch}.deb") bytes"
done

# systemd-sysext: /usr only, with an extension-release file that matches any host (ID=_any);
# the units appear after `systemd-sysext refresh` and `systemctl daemon-reload`.
for pair in x86-64:x86_64-unknown-linux-musl arm64:aarch64-unknown-linux-musl arm:armv7-unknown-linux-musleabihf; do
    arch=${pair%%:*}; triple=${pair##*:}
    root=$out/sysext-$arch
    tree "$root" "target/$triple/release/meshkeep"
    install -D -m 0644 /dev/stdin "$root/usr/lib/extension-release.d/extension-release.meshkeep" <<RELEASE
ID=_any
ARCHITECTURE=$arch
SYSEXT_LEVEL=1.0
RELEASE
    mkfs.ext4 -q -L meshkeep -d "$root" "$out/meshkeep_${version}_${arch}.raw" 64M
    rm -rf "$root"
    echo "$out/meshkeep_${version}_${arch}.raw: systemd-sysext image"
done

# What a user gets: the package's metadata, files, a binary that runs, and units that verify.
check=$(mktemp -d)
trap 'rm -rf "$check"' EXIT
deb=$out/meshkeep_${version}_amd64.deb
dpkg-deb -f "$deb" Package Version Architecture | grep "Architecture: amd64" >/dev/null
dpkg-deb -x "$deb" "$check/deb"
for file in usr/bin/meshkeep usr/lib/systemd/system/meshkeep.service usr/lib/sysusers.d/meshkeep.conf usr/lib/tmpfiles.d/meshkeep.conf; do
    [ -e "$check/deb/$file" ] || { echo "$deb lacks $file" >&2; exit 1; }
done
"$check/deb/usr/bin/meshkeep" --version | grep "$version" >/dev/null
sed "s|/usr/bin/meshkeep|$check/deb/usr/bin/meshkeep|g" "$check/deb/usr/lib/systemd/system/meshkeep.service" > "$check/meshkeep.service"
if systemd-analyze verify --man=no "$check/meshkeep.service" 2>&1 | grep -F "$check"; then
    echo "the packaged unit does not verify" >&2
    exit 1
fi
for arch in arm64 armhf; do
    dpkg-deb -c "$out/meshkeep_${version}_${arch}.deb" | grep './usr/bin/meshkeep' >/dev/null
done
raw=$out/meshkeep_${version}_x86-64.raw
debugfs -R 'cat /usr/lib/extension-release.d/extension-release.meshkeep' "$raw" 2>/dev/null | grep '^ID=_any' >/dev/null
debugfs -R 'stat /usr/bin/meshkeep' "$raw" 2>/dev/null | grep 'Mode:  0755' >/dev/null
echo "packages: checked"
