#!/bin/bash
# Installs (when missing) and starts libvirtd and virtlogd on this machine, as
# root, without systemd. Idempotent: a running daemon is left alone.
# Used by .ci/run and by developers; see DESIGN.md "Known facts of the ground".
set -euo pipefail

log() { echo "[libvirtd-up] $*"; }

PACKAGES=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-daemon-system libvirt-clients
          libvirt-dev qemu-system-x86 libxml2-utils pkg-config tini
          genisoimage   # isoinfo: the tests read back the cloud-init seed
          nftables      # the gate's pod-network plumbing, run on this host by gate/tests/podnet.rs
          socat         # the kubelet's (dockershim) kubectl port-forward
          qemu-utils)   # qemu-img: the image-repository test makes a qcow2-headed file
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

mkdir -p /var/log/libvirt /var/lib/libvirt /var/cache/libvirt /run/libvirt
getent group kvm >/dev/null || groupadd --system kvm
getent passwd libvirt-qemu >/dev/null || useradd --system --no-create-home -g kvm libvirt-qemu

# No systemd here: libvirt cannot create per-VM cgroups through machined, and
# root lacks CAP_SYS_RESOURCE; keep QEMU in libvirtd's cgroup. No private
# /dev per QEMU (namespaces): it would try to move the hidden /dev/kvm below.
QEMU_CONF=/etc/libvirt/qemu.conf
SETTINGS='# virtkube settings begin (scripts/libvirtd-up.sh)
cgroup_controllers = [ ]
remember_owner = 0
namespaces = [ ]
# virtkube settings end'
current=$(sed -n '/^# virtkube settings begin/,/^# virtkube settings end/p' "$QEMU_CONF" 2>/dev/null)
restart=0
if [ "$current" != "$SETTINGS" ]; then
  log "configuring $QEMU_CONF"
  sed -i '/^# virtkube settings/,/^# virtkube settings end/d; /^cgroup_controllers = \[ \]$/d; /^remember_owner = 0$/d' "$QEMU_CONF"
  printf '%s\n' "$SETTINGS" >> "$QEMU_CONF"
  restart=1
fi

# By PID file: a virthost container running with the host's PID namespace
# shows its own libvirtd and virtlogd to pgrep.
running() { [ -s "/run/$1.pid" ] && kill -0 "$(cat "/run/$1.pid")" 2>/dev/null; }
if [ "$restart" = 1 ] && running libvirtd; then
  log "restarting libvirtd for the new settings"
  kill "$(cat /run/libvirtd.pid)" || true
  for _ in $(seq 1 100); do running libvirtd || break; sleep 0.1; done
fi
if ! running virtlogd; then
  log "starting virtlogd"
  virtlogd -d
fi
if ! running libvirtd; then
  rm -f /run/libvirt/libvirt-sock
  if [ -e /dev/kvm ] && [ "${VIRTKUBE_KEEP_KVM:-0}" != 1 ]; then
    # These machines have a /dev/kvm that QEMU cannot use. libvirt probes QEMU
    # as root (KVM "works"), then finds /dev/kvm inaccessible to libvirt-qemu
    # and re-probes QEMU on every call: 8 s per capabilities call, 40 s per
    # define, measured here. The tests use TCG only, so libvirtd gets a mount
    # namespace where /dev/kvm is an empty root-only file: KVM is consistently
    # absent and the capabilities cache holds. VIRTKUBE_KEEP_KVM=1 keeps it.
    log "starting libvirtd (with /dev/kvm hidden; VIRTKUBE_KEEP_KVM=1 keeps it)"
    mkdir -p /run/virtkube-host
    install -m 0600 /dev/null /run/virtkube-host/no-kvm
    setsid -f unshare --mount --propagation private -- \
      sh -c 'mount --bind /run/virtkube-host/no-kvm /dev/kvm && exec tini -s -- libvirtd' \
      </dev/null >/dev/null 2>&1
  else
    log "starting libvirtd"
    setsid -f tini -s -- libvirtd </dev/null >/dev/null 2>&1
  fi
  # Under tini as a subreaper: QEMU daemonizes, and an ended QEMU must be
  # reaped before libvirtd counts its domain gone. This machine's PID 1 reaps
  # orphans only every second or two (a domain took 1.2-2 s to destroy);
  # tini reaps at once, as the virthost's init does.
fi
for _ in $(seq 1 300); do
  if virsh -c qemu:///system version >/dev/null 2>&1 && virsh -c test+unix:///default version >/dev/null 2>&1; then
    log "libvirtd is answering: $(virsh -c qemu:///system version 2>/dev/null | grep -i 'running hypervisor' || true)"
    exit 0
  fi
  sleep 0.2
done
log "libvirtd did not answer on /run/libvirt/libvirt-sock within 60 s; see /var/log/libvirt/libvirtd.log"
exit 1
