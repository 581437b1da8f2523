#!/bin/bash
# Installs Debian's docker.io when missing and starts dockerd when it is not
# running (no systemd here). Idempotent.
set -euo pipefail
log() { echo "[docker-up] $*"; }
if [ ! -x /usr/sbin/dockerd ]; then
  log "installing docker.io"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io >/dev/null
fi
if ! /usr/bin/docker info >/dev/null 2>&1; then
  log "starting dockerd (log: /var/log/dockerd.log)"
  nohup /usr/sbin/dockerd >/var/log/dockerd.log 2>&1 &
  for _ in $(seq 1 150); do
    /usr/bin/docker info >/dev/null 2>&1 && break
    sleep 0.2
  done
fi
/usr/bin/docker info >/dev/null 2>&1 || { log "dockerd did not start; see /var/log/dockerd.log"; tail -20 /var/log/dockerd.log; exit 1; }
log "dockerd is up ($(/usr/bin/docker version -f '{{.Server.Version}}'))"
