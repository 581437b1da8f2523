#!/bin/bash
# Provides debian:bookworm-slim in the local Docker engine when it is missing
# (no registry is reachable here): debootstrap a minimal bookworm and import
# it. On a machine that can pull images this does nothing.
set -euo pipefail
IMAGE=${1:-debian:bookworm-slim}
DOCKER=${DOCKER:-docker}
if "$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1; then
  exit 0
fi
log() { echo "[debian-base-image] $*"; }
dpkg -s debootstrap >/dev/null 2>&1 || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
mirror=${mirror:-http://deb.debian.org/debian}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
log "debootstrap --variant=minbase bookworm from $mirror (a few minutes)"
debootstrap --variant=minbase bookworm "$root" "$mirror" >"$root.log" 2>&1 || { tail -20 "$root.log"; exit 1; }
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
log "docker import as $IMAGE"
tar -C "$root" -c . | "$DOCKER" import - "$IMAGE" >/dev/null
log "done: $("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE") bytes"
