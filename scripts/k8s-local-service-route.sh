#!/bin/bash
# k8s-local has no kube-proxy, so the `kubernetes` Service's IP, which every
# pod is told to use (KUBERNETES_SERVICE_HOST), goes nowhere, and its API
# server listens on 127.0.0.1 only. This does kube-proxy's job for that one
# Service: pods on Docker's bridge and host-network processes reach the API
# server at the Service IP, as on any real cluster. Idempotent.
# Usage: scripts/k8s-local-service-route.sh   (KUBECONFIG and KUBECTL set)
set -euo pipefail
log() { echo "[service-route] $*"; }
KUBECTL=${KUBECTL:-kubectl}

# A new API server creates the Service a moment after it is ready.
service_ip="" service_port=""
for _ in $(seq 1 60); do
  service_ip=$("$KUBECTL" get service kubernetes -n default -o 'jsonpath={.spec.clusterIP}' 2>/dev/null || true)
  service_port=$("$KUBECTL" get service kubernetes -n default -o 'jsonpath={.spec.ports[0].port}' 2>/dev/null || true)
  [ -n "$service_ip" ] && [ -n "$service_port" ] && break
  sleep 0.5
done
server=$("$KUBECTL" config view --minify -o 'jsonpath={.clusters[0].cluster.server}')
target=${server#https://}
case "$target" in
  127.0.0.1:*) ;;
  *) log "the API server is at $server, not on loopback: nothing to do"; exit 0 ;;
esac
[ -n "$service_ip" ] && [ -n "$service_port" ] || { log "cannot read the kubernetes Service" >&2; exit 1; }

# DNAT to 127.0.0.1 from the bridge needs route_localnet on it.
sysctl -qw net.ipv4.conf.docker0.route_localnet=1
add() { iptables -t nat -C "$@" 2>/dev/null || iptables -t nat -A "$@"; }
add PREROUTING -i docker0 -d "$service_ip/32" -p tcp --dport "$service_port" -j DNAT --to-destination "$target"
add OUTPUT -d "$service_ip/32" -p tcp --dport "$service_port" -j DNAT --to-destination "$target"
log "the kubernetes Service $service_ip:$service_port leads to the API server at $target"
