#!/bin/bash
# The virthost container's init: virtlogd, libvirtd, virtkube-gate and (in a
# pod) virtkube-nodeinfo. libvirtd's socket stays inside this container
# (/run/libvirt); VM containers mount the gate's (/run/virtkube), which lets
# each create and control its own domain only. Exits non-zero when libvirtd or
# the gate dies; SIGTERM stops them all.
set -eu
log() { echo "[virthost] $*"; }

mkdir -p /run/virtkube /run/libvirt /var/log/libvirt /var/lib/libvirt /var/cache/libvirt
# A reused state directory names QEMU processes of an old container; libvirtd
# would try to reconnect to them. The VMs died with the old container.
rm -f /run/libvirt/qemu/*.xml /run/libvirt/qemu/*.pid 2>/dev/null || true
rm -f /run/virtkube/libvirt-sock /run/virtkube/libvirt-sock-ro /run/virtkube/libvirt-admin-sock

if [ -e /dev/kvm ] && ! [ -r /dev/kvm ]; then
  log "/dev/kvm is present but not accessible: QEMU will use TCG"
fi
# The gate knows a caller by its PID's cgroup: it must see the host's PIDs.
if [ "$$" = 1 ]; then
  log "WARNING: this container has its own PID namespace; the gate will refuse every VM container." \
    "Run it with the host's (Kubernetes: hostPID: true; Docker: --pid=host)."
fi

libvirtd_pid="" gate_pid="" nodeinfo_pid=""
stop_all() {
  for pid in $nodeinfo_pid $gate_pid $libvirtd_pid; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  [ -n "$libvirtd_pid" ] && wait "$libvirtd_pid" 2>/dev/null || true
}
stop() {
  log "stopping"
  stop_all
  exit 0
}
# Set before anything starts: with the host's PID namespace this shell is not
# PID 1, so an untrapped SIGTERM during start-up would kill it outright.
trap stop TERM INT

# Waits up to 10 s for socket $1 of daemon $2; gives up on the container otherwise.
wait_for_socket() {
  for _ in $(seq 1 100); do
    [ -S "$1" ] && return 0
    sleep 0.1
  done
  log "$2 made no socket within 10 s"
  stop_all
  exit 1
}

virtlogd -d
libvirtd &
libvirtd_pid=$!
wait_for_socket /run/libvirt/libvirt-sock libvirtd
log "libvirtd is up: socket /run/libvirt/libvirt-sock (this container only)"

gate_args=(--listen /run/virtkube/libvirt-sock --libvirtd /run/libvirt/libvirt-sock)
[ -f /etc/virtkube/gate.yaml ] && gate_args+=(--config /etc/virtkube/gate.yaml)
# In a pod, VM pods that cannot mount the socket (a bare `kubectl run`) reach
# the gate at the node's address; it knows each by its pod IP.
tcp=${VIRTKUBE_GATE_TCP:-0.0.0.0:16509}
if [ -n "${KUBERNETES_SERVICE_HOST:-}" ] && [ "$tcp" != off ]; then
  gate_args+=(--listen-tcp "$tcp")
fi
# Extra flags, e.g. "--max-vcpus 8": split on blanks, never glob-expanded.
read -r -a extra_args <<< "${VIRTKUBE_GATE_ARGS:-}"
gate_args+=("${extra_args[@]}")
virtkube-gate "${gate_args[@]}" &
gate_pid=$!
wait_for_socket /run/virtkube/libvirt-sock virtkube-gate
log "virtkube-gate is up: socket /run/virtkube/libvirt-sock (for VM containers)"

# nodeinfo publishes to the Kubernetes API: only in a pod (plain Docker has no
# API). It holds no VM, so when it dies it is restarted here, with a back-off
# (1 s doubling to 30 s; reset after a minute's run), instead of taking the
# virthost and its VMs down.
supervise_nodeinfo() {
  local delay=1 child="" started rc
  trap '[ -n "$child" ] && kill -TERM "$child" 2>/dev/null; wait "$child" 2>/dev/null; exit 0' TERM INT
  while true; do
    started=$(date +%s)
    virtkube-nodeinfo &
    child=$!
    rc=0
    wait "$child" || rc=$?
    child=""
    [ $(( $(date +%s) - started )) -ge 60 ] && delay=1
    log "virtkube-nodeinfo exited (status $rc); restarting it in ${delay}s (VMs are not affected)"
    sleep "$delay" &
    wait $! || true
    delay=$(( delay * 2 > 30 ? 30 : delay * 2 ))
  done
}
if [ -n "${KUBERNETES_SERVICE_HOST:-}" ] && [ "${VIRTHOST_NODEINFO:-1}" = 1 ]; then
  log "starting virtkube-nodeinfo for node ${NODE_NAME:-?}"
  supervise_nodeinfo &
  nodeinfo_pid=$!
fi

rc=0
wait -n "$libvirtd_pid" "$gate_pid" || rc=$?
if kill -0 "$libvirtd_pid" 2>/dev/null; then
  log "virtkube-gate exited (status $rc)"
else
  log "libvirtd exited (status $rc)"
fi
stop_all
exit $(( rc == 0 ? 1 : rc ))
