#!/bin/bash
# (Re)starts the virthost container on the local Docker engine: libvirtd's
# socket appears in /var/run/virtkube on the host (virtkube's own directory,
# not /var/run/libvirt), and the guest files in /var/lib/virtkube/images are
# visible to its QEMU. Unprivileged, no /dev/kvm: TCG (see DESIGN.md).
set -euo pipefail
DOCKER=${DOCKER:-/usr/bin/docker}
NAME=${VIRTHOST_NAME:-virtkube-virthost}
SOCKET_DIR=${VIRTKUBE_SOCKET_DIR:-/var/run/virtkube}
log() { echo "[virthost-up] $*"; }
mkdir -p "$SOCKET_DIR" /var/lib/virtkube/images
$DOCKER rm -f "$NAME" >/dev/null 2>&1 || true
log "starting $NAME (socket in $SOCKET_DIR)"
$DOCKER run -d --name "$NAME" \
  -v "$SOCKET_DIR:/run/virtkube" \
  -v /var/lib/virtkube/images:/var/lib/virtkube/images:ro \
  virtkube/virthost:latest >/dev/null
uri="qemu+unix:///system?socket=$SOCKET_DIR/libvirt-sock"
for _ in $(seq 1 150); do
  if virsh -c "$uri" version >/dev/null 2>&1; then
    log "libvirtd in $NAME answers on $SOCKET_DIR/libvirt-sock"
    exit 0
  fi
  sleep 0.2
done
log "the virthost did not come up:"; $DOCKER logs "$NAME" 2>&1 | tail -20
exit 1
