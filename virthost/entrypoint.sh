#!/bin/bash
# The virthost container's init: virtlogd, libvirtd, virtkube-gate and (in a
# pod) virtkube-nodeinfo. libvirtd's socket stays inside this container
# (/run/libvirt); VM containers mount the gate's (/run/virtkube), which lets
# each create and control its own domain only.
#
# VMs outlive this container: QEMU runs in its VM container's cgroups (the
# gate moves it there), libvirt's state (/run/libvirt, /var/lib/libvirt,
# /var/log/libvirt) is on host paths, and a new libvirtd takes the running
# domains over. A daemon that dies is restarted here with a back-off; only
# SIGTERM (exit 0) ends the container, and it leaves the VMs running.
set -eu
log() { echo "[virthost] $*"; }

mkdir -p /run/virtkube /run/libvirt /var/log/libvirt /var/lib/libvirt /var/cache/libvirt
# A socket left by the gate before would look like a live one.
rm -f /run/virtkube/libvirt-sock /run/virtkube/libvirt-sock-ro /run/virtkube/libvirt-admin-sock

# Guests' consoles are ptys. With the host's /dev/pts mounted here (so a new
# virthost can still open them), /dev/ptmx must allocate there: a device node
# does (the kernel uses the devpts next to it), the runtime's symlink to the
# host instance's root-only pts/ptmx does not.
if [ -L /dev/ptmx ] && grep -q ' /dev/pts .*ptmxmode=000' /proc/self/mountinfo; then
  rm -f /dev/ptmx && mknod -m 666 /dev/ptmx c 5 2 \
    || log "WARNING: cannot make /dev/ptmx a device node: guests' consoles may fail"
fi

# A VM's pod interface is a tap libvirtd creates through /dev/net/tun, which
# container runtimes allow (c 10:200) but do not always create.
if ! [ -c /dev/net/tun ]; then
  mkdir -p /dev/net && mknod -m 666 /dev/net/tun c 10 200 \
    || log "WARNING: cannot create /dev/net/tun: VMs with a pod interface will fail to start"
fi

if [ -e /dev/kvm ] && ! [ -r /dev/kvm ]; then
  log "/dev/kvm is present but not accessible: QEMU will use TCG"
fi
# The gate knows a caller by its PID's cgroup, and a new libvirtd finds the
# running QEMUs by PID: it must see the host's PIDs.
if [ "$$" = 1 ]; then
  log "WARNING: this container has its own PID namespace; the gate will refuse every VM container" \
    "and VMs die with this container. Run it with the host's (Kubernetes: hostPID: true; Docker: --pid=host)."
  # Status files of an earlier container name PIDs of its namespace, which
  # libvirtd would take for QEMUs: without the host's PIDs they are stale.
  rm -f /run/libvirt/qemu/*.xml /run/libvirt/qemu/*.pid 2>/dev/null || true
fi
# A status file whose QEMU has gone (it died while no virthost ran) names a
# PID that may now be another process of the node, which libvirtd would take
# for that QEMU and kill when it fails to reach it: such files are removed.
for status in /run/libvirt/qemu/*.xml; do
  [ -e "$status" ] || continue
  name=$(basename "$status" .xml)
  pid=$(cat "/run/libvirt/qemu/$name.pid" 2>/dev/null || true)
  if [ -z "$pid" ] || ! tr '\0' '\n' < "/proc/$pid/cmdline" 2>/dev/null | grep -q "^guest=$name,"; then
    log "removing the state of domain $name: its QEMU (PID ${pid:-?}) is gone"
    rm -f "$status" "/run/libvirt/qemu/$name.pid"
  fi
done
procs=$(ls /sys/fs/cgroup/*/cgroup.procs /sys/fs/cgroup/cgroup.procs 2>/dev/null | head -1)
if [ -z "$procs" ] || ! [ -w "$procs" ]; then
  log "WARNING: the host's cgroups are read-only here: the gate cannot move QEMU into its VM container's" \
    "cgroups, so every VM start fails. Mount the host's /sys/fs/cgroup read-write."
fi

supervisor_pids=""
stop() {
  log "stopping (running VMs are left running; a new virthost takes them over)"
  for pid in $supervisor_pids; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in $supervisor_pids; do
    wait "$pid" 2>/dev/null || true
  done
  exit 0
}
# Set before anything starts: with the host's PID namespace this shell is not
# PID 1, so an untrapped SIGTERM during start-up would kill it outright.
trap stop TERM INT

# Runs "$@" (daemon $1) for ever: when it exits it is started again after a
# back-off (1 s doubling to 30 s; back to 1 s after a minute's run), instead
# of taking the virthost, and the VMs' libvirtd or gate with it, down.
# SIGTERM stops the daemon and the loop.
supervise() {
  local name=$1 delay=1 child="" started rc
  shift
  trap '[ -n "$child" ] && kill -TERM "$child" 2>/dev/null; wait "$child" 2>/dev/null || true; exit 0' TERM INT
  while true; do
    started=$(date +%s)
    "$@" &
    child=$!
    rc=0
    wait "$child" || rc=$?
    child=""
    [ $(( $(date +%s) - started )) -ge 60 ] && delay=1
    log "$name exited (status $rc); restarting it in ${delay}s (running VMs are not affected)"
    sleep "$delay" &
    wait $! || true
    delay=$(( delay * 2 > 30 ? 30 : delay * 2 ))
  done
}
start() {
  supervise "$@" &
  supervisor_pids="$supervisor_pids $!"
}

# Waits up to 30 s for socket $1 of daemon $2 (it may be restarting).
wait_for_socket() {
  for _ in $(seq 1 300); do
    [ -S "$1" ] && return 0
    sleep 0.1
  done
  log "WARNING: $2 made no socket $1 within 30 s; still trying"
}

start virtlogd virtlogd
# A socket left by the libvirtd before would look like a live one.
rm -f /run/libvirt/libvirt-sock /run/libvirt/libvirt-sock-ro /run/libvirt/libvirt-admin-sock
start libvirtd libvirtd
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
start virtkube-gate virtkube-gate "${gate_args[@]}"
wait_for_socket /run/virtkube/libvirt-sock virtkube-gate
log "virtkube-gate is up: socket /run/virtkube/libvirt-sock (for VM containers)"

# nodeinfo publishes to the Kubernetes API: only in a pod (plain Docker has no API).
if [ -n "${KUBERNETES_SERVICE_HOST:-}" ] && [ "${VIRTHOST_NODEINFO:-1}" = 1 ]; then
  log "starting virtkube-nodeinfo for node ${NODE_NAME:-?}"
  start virtkube-nodeinfo virtkube-nodeinfo
fi

# Until SIGTERM (the trap exits).
while true; do
  sleep 3600 &
  wait $! || true
done
