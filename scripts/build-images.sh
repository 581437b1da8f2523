#!/bin/bash
# Builds virtkube's images in the local Docker engine: virtkube/shim (FROM
# scratch, the static shim), virtkube/tiny (the example VM), virtkube/disk
# (the example VM that boots from the disk its image carries) and
# virtkube/virthost (libvirtd + QEMU + the gate + nodeinfo), and the tiny guest's files on the host.
set -euo pipefail
cd "$(dirname "$0")/.."
export DOCKER=/usr/bin/docker DOCKER_BUILDKIT=0
log() { echo "[build-images] $*"; }

bash scripts/docker-up.sh
bash scripts/build-tiny-guest.sh
log "static shim"
shim=$(bash scripts/build-shim.sh)
log "virtkube/shim"
$DOCKER build -q -f Dockerfile.shim --build-arg SHIM="$shim" -t virtkube/shim:latest . >/dev/null
log "virtkube/tiny"
# Also tagged with the version: an image that is not :latest defaults to
# imagePullPolicy IfNotPresent, so a bare `kubectl run --image=virtkube/tiny:0.1.0`
# uses the local image where no registry has it.
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
$DOCKER build -q -t virtkube/tiny:latest -t "virtkube/tiny:$version" images/tiny >/dev/null
log "virtkube/disk"
bash scripts/build-disk-image.sh
bash scripts/debian-base-image.sh debian:bookworm-slim
log "virtkube-nodeinfo (links Debian 12's libvirt.so, like the virthost image), virtkube-gate and virtkube-sched"
cargo build -q --release --locked -p virtkube-nodeinfo -p virtkube-gate -p virtkube-sched
log "virtkube/virthost"
$DOCKER build -q -f Dockerfile.virthost -t virtkube/virthost:latest . >/dev/null
log "virtkube/sched"
$DOCKER build -q -f Dockerfile.sched -t virtkube/sched:latest -t "virtkube/sched:$version" . >/dev/null
shim_size=$(stat -c %s "$shim")
image_size=$($DOCKER image inspect -f '{{.Size}}' virtkube/shim:latest)
log "shim binary $shim_size bytes; virtkube/shim image $image_size bytes (+$((image_size - shim_size)))"
