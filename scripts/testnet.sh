#!/usr/bin/env bash
# A whole Kubelt network on this machine, in docker containers, built offline.
#
#   scripts/testnet.sh up [--nodes N] [--build]   build the image if needed and start 2 bootstraps + N nodes
#   scripts/testnet.sh status                     table: node, peer id, peers, cores, heads, in sync
#   scripts/testnet.sh logs [NODE] [-f]           logs of every container, or of one (node3, 3, bootstrap1)
#   scripts/testnet.sh down [--volumes]           stop and remove the containers (and their repos)
#   scripts/testnet.sh scenario NAME...           discovery | content | converge | partition | all
#                                                 (prints its figures; exits non-zero on failure)
#   scripts/testnet.sh mem                        memory of each container (docker stats)
#   scripts/testnet.sh ci                         down --volumes, up --build --nodes 6, scenario all, down --volumes; skips
#                                                 (exit 0, loudly) only when docker is unavailable
#
# This script is the lifecycle: the image, docker-compose, logs. What reads the nodes' answers
# (waiting for them, the test core, `status`, `mem`) and every scenario with its measurements
# is the Python package scripts/testnet/ (standard library only), run as `python3 -m testnet`.
#
# Layout: testnet/Dockerfile (FROM scratch: the stripped binary, the libraries ldd lists and
# busybox), testnet/gen-compose.sh (writes the compose file for N nodes), testnet/.build/ (build
# context, generated compose file, bootstrap peer ids, state; gitignored). The image is labelled
# with the sha256 of the binary and of its recipe and rebuilt when either changes.
#
# The test core is owned by the test wallet in testnet/test-wallet.key (a throw-away key known to
# everyone: never send it anything). node1 and node2 are its writers (delegations made with
# `kubelt core delegate` and `kubelt core submit --sign-with`), every other node follows it.
#
# Settings (environment): KUBELT_TESTNET_NODES (default 6), KUBELT_TESTNET_RUST_LOG (default
# info), KUBELT_TESTNET_BIN (the binary to put in the image; default the release build in
# $CARGO_TARGET_DIR), KUBELT_TESTNET_WRITES (writes per writer in `converge` and `partition`,
# default 20), KUBELT_TESTNET_CONTENT_MB (size of the `content` file, default 8),
# KUBELT_TESTNET_PARTITION_SECS (how long the cut holds, default 15), KUBELT_TESTNET_TIMEOUT
# (seconds a scenario waits for convergence, default 60).
set -euo pipefail
source "$(dirname "$0")/common.sh"

TN="$KUBELT_ROOT/testnet"
BUILD="$TN/.build"
STATE="$BUILD/state"
ENVF="$BUILD/env"
PROJECT=kubelt-testnet
IMAGE=kubelt-testnet:latest
DEFAULT_NODES="${KUBELT_TESTNET_NODES:-6}"
BIN="${KUBELT_TESTNET_BIN:-$KUBELT_BIN}"

die() { printf '\033[1;31mFAIL: %s\033[0m\n' "$*" >&2; exit 1; }
warn() { printf '\033[1;33m!! %s\033[0m\n' "$*" >&2; }
# The Python half (from scripts/, so that `testnet` is the package and not ../testnet/; no
# __pycache__ left in the tree).
py() { (cd "$KUBELT_ROOT/scripts" && PYTHONDONTWRITEBYTECODE=1 python3 -m testnet "$@"); }

# ---------------------------------------------------------------------------------------------
# tools, binary, image

ensure_tools() {
  command -v docker >/dev/null 2>&1 || die "docker is not installed"
  command -v python3 >/dev/null 2>&1 || die "python3 is not installed (the scenarios are in scripts/testnet/)"
  local need=()
  command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
  [ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -x ip >/dev/null || need+=(busybox-static)
  if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    local sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  # busybox (dynamic) can shadow busybox-static at /bin/busybox; we need the static one.
  ! ldd /bin/busybox >/dev/null 2>&1 || die "/bin/busybox is not statically linked (install busybox-static)"
}

ensure_binary() {
  if [ -n "${KUBELT_TESTNET_BIN:-}" ]; then
    [ "${1:-}" != build ] || die "--build builds $KUBELT_BIN, not KUBELT_TESTNET_BIN=$BIN"
  elif [ "${1:-}" = build ] || [ ! -x "$BIN" ]; then
    "$KUBELT_ROOT/scripts/setup.sh"
    build_release
  fi
  [ -x "$BIN" ] || die "no kubelt binary at $BIN"
}

ensure_image() {
  local want have
  want=$({ sha256sum "$BIN" /bin/busybox "$TN/Dockerfile" | cut -d' ' -f1; } | sha256sum | cut -c1-32)
  have=$(docker image inspect -f '{{ index .Config.Labels "kubelt.testnet.recipe" }}' "$IMAGE" 2>/dev/null || true)
  [ "$want" != "$have" ] || return 0
  log "building image $IMAGE from $BIN (recipe $want)"
  local ctx="$BUILD/image" lib applet
  rm -rf "$ctx"
  mkdir -p "$ctx/rootfs/usr/local/bin" "$ctx/rootfs/bin" "$ctx/rootfs/repo" "$ctx/rootfs/etc"
  install -d -m 1777 "$ctx/rootfs/tmp"
  strip -o "$ctx/rootfs/usr/local/bin/kubelt" "$BIN" 2>/dev/null || cp "$BIN" "$ctx/rootfs/usr/local/bin/kubelt"
  # The shared libraries and the loader, at the paths ldd names (symlinks resolved).
  for lib in $(ldd "$BIN" | grep -oE '/[^ ]+' | sort -u); do
    mkdir -p "$ctx/rootfs$(dirname "$lib")"
    cp -L "$lib" "$ctx/rootfs$lib"
  done
  cp /bin/busybox "$ctx/rootfs/bin/busybox"
  for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$ctx/rootfs/bin/$applet"
  done
  echo "root:x:0:0:root:/repo:/bin/sh" >"$ctx/rootfs/etc/passwd"
  echo "root:x:0:" >"$ctx/rootfs/etc/group"
  DOCKER_BUILDKIT=0 docker build -q -f "$TN/Dockerfile" --label "kubelt.testnet.recipe=$want" -t "$IMAGE" "$ctx" >/dev/null 2>"$BUILD/docker-build.log" \
    || { cat "$BUILD/docker-build.log" >&2; die "docker build failed"; }
  # Drop the images the new one replaced.
  docker image prune -f --filter "label=kubelt.testnet.recipe" >/dev/null 2>&1 || true
  log "image $IMAGE built: $(docker image inspect -f '{{ .Size }}' "$IMAGE" | awk '{ printf "%.1f MB", $1 / 1e6 }')"
}

# ---------------------------------------------------------------------------------------------
# compose

compose_file() {
  local f=""
  [ -f "$STATE" ] && f=$(sed -n 's/^compose=//p' "$STATE")
  echo "${f:-$TN/docker-compose.yml}"
}

compose() {
  mkdir -p "$BUILD"
  [ -f "$ENVF" ] || printf 'BOOTSTRAP1_ID=unset\nBOOTSTRAP2_ID=unset\n' >"$ENVF"
  docker-compose -p "$PROJECT" -f "$(compose_file)" --env-file "$ENVF" "$@"
}

# The bootstraps' repos are made before compose starts anything: their peer ids go into every
# node's --peer addresses.
ensure_bootstrap_repos() {
  if [ -f "$ENVF" ] && ! grep -q unset "$ENVF" \
     && docker volume inspect "${PROJECT}_bootstrap1" "${PROJECT}_bootstrap2" >/dev/null 2>&1; then
    return 0
  fi
  log "creating the bootstrap repos (their peer ids go into the nodes' --peer addresses)"
  local b id ids=()
  for b in bootstrap1 bootstrap2; do
    docker volume create --label "com.docker.compose.project=$PROJECT" --label "com.docker.compose.volume=$b" \
      "${PROJECT}_$b" >/dev/null
    id=$(docker run --rm --network none -v "${PROJECT}_$b:/repo" "$IMAGE" init --force | sed -n 's/^peer id: *//p')
    [ -n "$id" ] || die "kubelt init gave no peer id for $b"
    ids+=("$id")
  done
  printf 'BOOTSTRAP1_ID=%s\nBOOTSTRAP2_ID=%s\n' "${ids[0]}" "${ids[1]}" >"$ENVF"
}

# ---------------------------------------------------------------------------------------------
# commands

cmd_up() {
  local n=$DEFAULT_NODES build=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --nodes) n=${2:?--nodes needs a number}; shift 2 ;;
      --nodes=*) n=${1#--nodes=}; shift ;;
      --build) build=build; shift ;;
      *) die "up: unknown argument $1" ;;
    esac
  done
  [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 2 ] && [ "$n" -le 250 ] || die "--nodes must be between 2 and 250"
  ensure_tools
  ensure_binary "$build"
  mkdir -p "$BUILD"
  ensure_image
  local file="$TN/docker-compose.yml"
  if [ "$n" != 6 ] || [ ! -f "$file" ]; then
    file="$BUILD/docker-compose.yml"
    "$TN/gen-compose.sh" "$n" "$file" >/dev/null
  fi
  printf 'compose=%s\nnodes=%s\n' "$file" "$n" >"$STATE"
  ensure_bootstrap_repos
  log "starting 2 bootstraps and $n nodes ($(basename "$file"))"
  compose up -d --remove-orphans 2>&1 | grep -v -e '^Creating\|^Starting\|^Recreating\|up-to-date' >&2 || true
  # Every API answers, every node has a peer, the test core is set up; then the status table.
  py ready
}

cmd_logs() {
  local args=() s
  for s in "$@"; do
    case "$s" in
      [0-9]*) args+=("node$s") ;;
      *) args+=("$s") ;;
    esac
  done
  compose logs --no-color --tail="${KUBELT_TESTNET_TAIL:-200}" "${args[@]}"
}

cmd_down() {
  local volumes=""
  [ "${1:-}" = "--volumes" ] || [ "${1:-}" = "-v" ] && volumes="--volumes"
  if [ -f "$(compose_file)" ]; then
    compose down --remove-orphans $volumes 2>&1 | grep -v '^Removing\|^Stopping\|active endpoints' >&2 || true
  fi
  if docker network inspect "${PROJECT}_testnet" >/dev/null 2>&1; then
    # Seen with docker 20.10: the daemon keeps a phantom endpoint (no container, no address)
    # after many kills and restarts, and refuses to delete the network. It does no harm: the
    # next `up` uses the network as it is. Restarting dockerd clears it.
    warn "docker keeps the network ${PROJECT}_testnet (it claims an endpoint that no container has); the next 'up' reuses it"
  fi
  if [ -n "$volumes" ]; then
    # Volumes made before compose knew them (the bootstraps') and those of bigger testnets.
    docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT" | xargs -r docker volume rm >/dev/null 2>&1 || true
    rm -f "$ENVF" "$STATE" "$BUILD/docker-compose.yml"
    log "testnet removed with its volumes"
  else
    log "testnet stopped (repos kept; 'down --volumes' removes them)"
  fi
}

cmd_ci() {
  if ! docker info >/dev/null 2>&1; then
    printf '\n\033[1;33m!!!!!!!!!! TESTNET SKIPPED: docker is not available here (docker info failed) !!!!!!!!!!\033[0m\n\n' >&2
    exit 0
  fi
  local rc=0
  cmd_down --volumes >/dev/null 2>&1 || true
  # CI builds the binary from the clone (cargo does nothing when it is up to date);
  # KUBELT_TESTNET_SKIP_BUILD=1 (or KUBELT_TESTNET_BIN) uses the binary that is there.
  local build=--build
  [ "${KUBELT_TESTNET_SKIP_BUILD:-}" = 1 ] || [ -n "${KUBELT_TESTNET_BIN:-}" ] && build=""
  # Under CI a scenario that cannot run fails instead of being skipped.
  ( cmd_up --nodes "${KUBELT_TESTNET_NODES:-6}" $build && KUBELT_TESTNET_STRICT=1 py scenario all ) || rc=$?
  if [ $rc -ne 0 ]; then
    warn "testnet failed; last logs of every container:"
    KUBELT_TESTNET_TAIL=30 cmd_logs 2>&1 | tail -400 >&2 || true
  fi
  cmd_down --volumes || true
  exit $rc
}

main() {
  local cmd=${1:-help}
  shift || true
  case "$cmd" in
    up) cmd_up "$@" ;;
    logs) cmd_logs "$@" ;;
    down) cmd_down "$@" ;;
    status|mem|scenario) py "$cmd" "$@" ;;
    ci) cmd_ci ;;
    help|-h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
    *) die "unknown command $cmd (see scripts/testnet.sh help)" ;;
  esac
}

main "$@"
