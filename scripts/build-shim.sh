#!/bin/bash
# Builds the statically linked, size-optimised shim for FROM-scratch images:
# glibc with crt-static (needs nothing beyond the default toolchain).
# Prints the binary's path on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=x86_64-unknown-linux-gnu
RUSTFLAGS="-C target-feature=+crt-static" cargo build -q --release --locked -p virtkube-shim --target "$TARGET" >&2
BIN=target/$TARGET/release/virtkube-shim
if ! ldd "$BIN" 2>&1 | grep -qE "not a dynamic executable|statically linked"; then
  echo "build-shim: $BIN is dynamically linked: $(ldd "$BIN" 2>&1)" >&2
  exit 1
fi
echo "$BIN"
