#!/bin/bash
# (Re)starts the virthost container on the local Docker engine. VM containers
# mount /var/run/virtkube, where virtkube-gate's socket appears (libvirtd's own
# socket stays inside the container). The gate knows each caller by its PID's
# cgroup, so the virthost shares the host's PID and cgroup namespaces. Guest
# files in /var/lib/virtkube/images are visible to its QEMU. Unprivileged, no
# /dev/kvm: TCG (see docs/virthost.md).
set -euo pipefail
DOCKER=${DOCKER:-/usr/bin/docker}
NAME=${VIRTHOST_NAME:-virtkube-virthost}
SOCKET_DIR=${VIRTKUBE_SOCKET_DIR:-/var/run/virtkube}
# libvirt's state, kept on the host so that a new virthost takes the running
# VMs over (tmpfs: it goes with a reboot, as the VMs do).
STATE_DIR=${VIRTHOST_STATE_DIR:-/var/run/virtkube-virthost}
log() { echo "[virthost-up] $*"; }
mkdir -p "$SOCKET_DIR" /var/lib/virtkube/images "$STATE_DIR"/run "$STATE_DIR"/lib "$STATE_DIR"/log
$DOCKER rm -f "$NAME" >/dev/null 2>&1 || true
log "starting $NAME (the gate's socket in $SOCKET_DIR)"
# The host's PIDs and cgroups: the gate identifies VM containers and moves
# QEMU into their cgroups, and a new libvirtd finds running QEMUs by PID.
# The host's /dev/pts: a guest's console is a pty, which a new virthost's
# libvirtd must still be able to open.
# NET_ADMIN and SYS_ADMIN: libvirtd creates a VM's pod tap, and the gate
# enters the VM container's network namespace to move it there.
$DOCKER run -d --name "$NAME" --pid=host --cgroupns=host \
  --cap-add NET_ADMIN --cap-add SYS_ADMIN \
  -v /sys/fs/cgroup:/sys/fs/cgroup \
  -v /dev/pts:/dev/pts \
  -v "$SOCKET_DIR:/run/virtkube" \
  -v "$STATE_DIR/run:/run/libvirt" -v "$STATE_DIR/lib:/var/lib/libvirt" -v "$STATE_DIR/log:/var/log/libvirt" \
  -v /var/lib/virtkube/images:/var/lib/virtkube/images:ro \
  virtkube/virthost:latest >/dev/null
for _ in $(seq 1 150); do
  if [ -S "$SOCKET_DIR/libvirt-sock" ] && $DOCKER exec "$NAME" virsh -c qemu:///system version >/dev/null 2>&1; then
    log "libvirtd in $NAME answers; the gate listens on $SOCKET_DIR/libvirt-sock"
    exit 0
  fi
  sleep 0.2
done
log "the virthost did not come up:"; $DOCKER logs "$NAME" 2>&1 | tail -20
exit 1
