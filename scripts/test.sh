#!/bin/bash
# The test command: sets up everything the tests need on this machine (Debian
# packages, libvirtd + virtlogd, a Kubernetes control plane from
# ../shared/k8s-local), then checks formatting and lints and runs every test.
# Idempotent; safe to run again. Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
log() { echo "[test.sh $(date -u +%T)] $*"; }

# The test cluster's kubelet (default eviction thresholds) declares DiskPressure
# below 15% free on the disk holding Docker's images; it then evicts pods and
# deletes images the Docker tests use. A clean build takes about 5 GiB.
disk_headroom_gib() {
  df -B1G --output=size,avail /var/lib 2>/dev/null | awk 'NR==2 {print int($2 - $1 * 0.15 - 5)}'
}
check_disk() {
  local headroom
  headroom=$(disk_headroom_gib)
  log "disk: $(df -h --output=avail,size /var/lib | awk 'NR==2 {print $1 " free of " $2}'), headroom above the kubelet's 15% eviction line after the build: ${headroom} GiB"
  if [ "${headroom:-0}" -lt 0 ]; then
    echo "WARNING: too little free disk: the test cluster's kubelet will report DiskPressure," \
      "evict the virthost and delete the test images. Free space (cargo clean in other checkouts," \
      "docker system prune) and run again." >&2
  fi
}
node_under_disk_pressure() {
  "$KUBECTL" get nodes -o 'jsonpath={.items[*].status.conditions[?(@.type=="DiskPressure")].status}' 2>/dev/null \
    | grep -qw True
}
check_disk

log "libvirtd and virtlogd"
bash scripts/libvirtd-up.sh
log "the tiny guest (Debian cloud kernel + busybox initramfs)"
bash scripts/build-tiny-guest.sh
log "the browser test's parts: Chromium (Debian) and noVNC with playwright-core (npm, web/package-lock.json)"
if ! command -v chromium >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
(cd web && npm ci --no-audit --no-fund --loglevel=error)
log "Docker, the images and the virthost container (for the Docker end-to-end tests)"
bash scripts/build-images.sh
bash scripts/virthost-up.sh

K8S_LOCAL=${K8S_LOCAL:-$ROOT/../shared/k8s-local}
K8S_LOCAL_DIR=${K8S_LOCAL_DIR:-/var/lib/k8s-local}
if [ -z "${KUBECONFIG:-}" ]; then
  if [ ! -x "$K8S_LOCAL/up.sh" ]; then
    echo "no KUBECONFIG and no $K8S_LOCAL/up.sh: point KUBECONFIG at a cluster or K8S_LOCAL at k8s-local" >&2
    exit 1
  fi
  log "Kubernetes (k8s-local; the first build takes about 13 minutes)"
  # With the kubelet (pods on the local Docker engine) for the cluster end-to-end tests;
  # NO_KUBELET=1 gives the control plane only.
  # up.sh skips the kubelet whenever NO_KUBELET is set at all, even to 0.
  up_env=(env -u NO_KUBELET)
  [ "${NO_KUBELET:-0}" = 1 ] && up_env=(env NO_KUBELET=1)
  if ! "${up_env[@]}" "$K8S_LOCAL/up.sh" > /tmp/virtkube-k8s-local-up.log 2>&1; then
    tail -40 /tmp/virtkube-k8s-local-up.log >&2
    echo "k8s-local's up.sh failed (whole log: /tmp/virtkube-k8s-local-up.log)" >&2
    exit 1
  fi
  grep -E '^\[up.sh' /tmp/virtkube-k8s-local-up.log || true
  using_k8s_local=1
  export KUBECONFIG=$K8S_LOCAL_DIR/admin.kubeconfig
  export KUBECTL=${KUBECTL:-$K8S_LOCAL_DIR/bin/kubectl}
fi
export KUBECTL=${KUBECTL:-kubectl}
log "waiting for the API server ($KUBECONFIG)"
for _ in $(seq 1 120); do
  "$KUBECTL" get --raw /readyz >/dev/null 2>&1 && break
  sleep 0.5
done
"$KUBECTL" get --raw /readyz >/dev/null || { echo "the API server at $KUBECONFIG is not ready" >&2; exit 1; }
if [ -n "${using_k8s_local:-}" ]; then
  # k8s-local has no kube-proxy: route the kubernetes Service to its API server.
  bash scripts/k8s-local-service-route.sh
fi
if [ "${NO_KUBELET:-0}" != 1 ]; then
  # A kubelet just (re)started posts its Ready status after a while; the cluster
  # tests need it, and a node left "Unknown" by an earlier run must recover first.
  log "waiting for a Ready node"
  for _ in $(seq 1 180); do
    "$KUBECTL" get nodes -o 'jsonpath={.items[*].status.conditions[?(@.type=="Ready")].status}' 2>/dev/null \
      | grep -qw True && break
    sleep 1
  done
  "$KUBECTL" get nodes -o wide || true
  if node_under_disk_pressure; then
    check_disk
    echo "the node reports DiskPressure: its kubelet evicts pods and deletes images, so the" \
      "end-to-end tests cannot pass. Free disk space and run again." >&2
    exit 1
  fi
fi

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy -D warnings"
cargo clippy --workspace --all-targets -q -- -D warnings
log "cargo test (with the tests that need the daemons started above: --include-ignored)"
set +e
VIRTKUBE_REQUIRE_TOOLS=1 cargo test --workspace --no-fail-fast "$@" -- --include-ignored 2>&1 | tee /tmp/virtkube-test.log | grep -vE '^test .* \.\.\. ok$'
status=${PIPESTATUS[0]}
set -e
passed=$(grep -oE '^test result: .*\. ([0-9]+) passed' /tmp/virtkube-test.log | grep -oE '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -oE '([0-9]+) failed;' /tmp/virtkube-test.log | awk '{s+=$1} END {print s+0}')
echo
if [ "${NO_KUBELET:-0}" != 1 ] && node_under_disk_pressure; then
  echo "NOTE: the node came under DiskPressure during the tests: its kubelet evicted pods and" \
    "deleted images, which explains end-to-end failures." >&2
fi
check_disk
echo "$passed passed, $failed failed"
exit "$status"
