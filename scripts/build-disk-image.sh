#!/bin/bash
# Builds virtkube/disk: a VM image whose bootable disk is inside the image.
# The disk (root.raw) is a 32 MiB FAT file system, no partition table, with
# SYSLINUX in its boot sector and the tiny guest's kernel and initramfs as
# files; the BIOS boots it like any disk. Written with mkfs.fat, syslinux
# (its mtools installer) and mcopy: no loop device, no mount.
#
# Usage: scripts/build-disk-image.sh   (after build-tiny-guest.sh and the shim image)
set -euo pipefail
cd "$(dirname "$0")/.."
TINY=${TINY:-/var/lib/virtkube/images/tiny}
log() { echo "[build-disk-image] $*"; }

need=()
for p in syslinux syslinux-common mtools dosfstools; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
cp images/disk/Dockerfile images/disk/template.yaml "$context/"
disk="$context/root.raw"
truncate -s 32M "$disk"
mkfs.fat -n VIRTKUBE "$disk" >/dev/null
syslinux --install "$disk"
mcopy -i "$disk" "$TINY/vmlinuz" "$TINY/initrd.gz" images/disk/syslinux.cfg ::/
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
DOCKER_BUILDKIT=0 /usr/bin/docker build -q -t virtkube/disk:latest -t "virtkube/disk:$version" "$context" >/dev/null
log "virtkube/disk: boots from /disk/root.raw ($(du -k --apparent-size "$disk" | cut -f1) KiB, $(du -k "$disk" | cut -f1) KiB used)"
