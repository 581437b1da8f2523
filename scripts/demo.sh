#!/bin/bash
# The main job: on a fresh machine, install what is missing, build the shim and
# the images, start the virthost container, run the tiny VM image as a plain
# Docker container, show its console booting and the gate guarding libvirtd,
# then stop it cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
DOCKER=/usr/bin/docker
step() { printf '\n=== %s\n' "$*"; }

step "1/6 Debian packages for the tests' tooling and the tiny guest (libvirt-clients, busybox, kernel)"
bash scripts/libvirtd-up.sh >/dev/null
step "2/6 Docker, the static shim and the images (virtkube/shim, virtkube/tiny, virtkube/virthost)"
bash scripts/build-images.sh
step "3/6 The virthost container (libvirtd + QEMU + virtkube-gate, unprivileged, TCG)"
bash scripts/virthost-up.sh
step "4/6 docker run virtkube/tiny: the VM is the container; its console is the container's output"
$DOCKER rm -f virtkube-demo >/dev/null 2>&1 || true
$DOCKER run -d --name virtkube-demo -v /var/run/virtkube:/var/run/libvirt:ro virtkube/tiny:latest >/dev/null
for _ in $(seq 1 120); do
  $DOCKER logs virtkube-demo 2>&1 | grep -q "virtkube-tiny: ready" && break
  sleep 0.5
done
echo "--- docker logs virtkube-demo"
$DOCKER logs virtkube-demo 2>&1
echo "--- the domain, as the virthost's libvirtd sees it (on its own socket, inside the virthost)"
$DOCKER exec virtkube-virthost virsh -c qemu:///system list
echo "--- the gate let the VM container create its own domain:"
$DOCKER logs virtkube-virthost 2>&1 | grep "domain admitted" | tail -1
step "5/6 Another container on the same socket may not even list the VMs: the gate refuses it"
$DOCKER run --rm -v /var/run/virtkube:/var/run/libvirt:ro --entrypoint virsh virtkube/virthost:latest \
  -c qemu:///system list 2>&1 | grep -E "error|denied" || true
step "6/6 docker stop: the shim asks the guest to power off over ACPI"
start=$(date +%s.%N)
$DOCKER stop -t 30 virtkube-demo >/dev/null
code=$($DOCKER inspect -f '{{.State.ExitCode}}' virtkube-demo)
echo "stopped in $(( $(date +%s) - ${start%.*} )) s, exit code $code"
$DOCKER logs virtkube-demo 2>&1 | grep '^\[virtkube-shim\]'
$DOCKER exec virtkube-virthost virsh -c qemu:///system list --all
$DOCKER rm virtkube-demo >/dev/null
[ "$code" = 0 ]
