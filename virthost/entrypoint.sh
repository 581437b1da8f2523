#!/bin/sh
# The virthost container's init: virtlogd, libvirtd, and (when present)
# virtkube-nodeinfo. Exits non-zero when libvirtd dies; SIGTERM stops them.
set -eu
log() { echo "[virthost] $*"; }

mkdir -p /run/virtkube /run/libvirt /var/log/libvirt /var/lib/libvirt /var/cache/libvirt
# A reused state directory names QEMU processes of an old pid namespace; libvirtd
# would try to reconnect to them. The VMs died with the old container.
rm -f /run/libvirt/qemu/*.xml /run/libvirt/qemu/*.pid 2>/dev/null || true
rm -f /run/virtkube/libvirt-sock /run/virtkube/libvirt-sock-ro /run/virtkube/libvirt-admin-sock

if [ -e /dev/kvm ] && ! [ -r /dev/kvm ]; then
  log "/dev/kvm is present but not accessible: QEMU will use TCG"
fi

virtlogd -d
listen=""
if [ "${VIRTHOST_TCP:-0}" = 1 ]; then
  log "listening on TCP 16509 WITHOUT authentication (VIRTHOST_TCP=1)"
  listen="--listen"
fi
libvirtd $listen &
libvirtd_pid=$!

for _ in $(seq 1 100); do
  [ -S /run/virtkube/libvirt-sock ] && break
  sleep 0.1
done
log "libvirtd is up: socket /run/virtkube/libvirt-sock"

# nodeinfo publishes to the Kubernetes API: only in a pod (plain Docker has no API).
nodeinfo_pid=""
if [ -n "${KUBERNETES_SERVICE_HOST:-}" ] && [ "${VIRTHOST_NODEINFO:-1}" = 1 ]; then
  log "starting virtkube-nodeinfo for node ${NODE_NAME:-?}"
  virtkube-nodeinfo &
  nodeinfo_pid=$!
fi

stop() {
  log "stopping"
  [ -n "$nodeinfo_pid" ] && kill -TERM "$nodeinfo_pid" 2>/dev/null || true
  kill -TERM "$libvirtd_pid" 2>/dev/null || true
  wait "$libvirtd_pid" 2>/dev/null || true
  exit 0
}
trap stop TERM INT

rc=0
wait "$libvirtd_pid" || rc=$?
log "libvirtd exited (status $rc)"
[ -n "$nodeinfo_pid" ] && kill -TERM "$nodeinfo_pid" 2>/dev/null || true
exit $(( rc == 0 ? 1 : rc ))
