#!/usr/bin/env bash
# A whole Kubelt network on this machine, in docker containers, built offline.
#
#   scripts/testnet.sh up [--nodes N] [--build]   build the image if needed and start 2 bootstraps + N nodes
#   scripts/testnet.sh status                     table: node, peer id, peers, cores, heads, in sync
#   scripts/testnet.sh logs [NODE] [-f]           logs of every container, or of one (node3, 3, bootstrap1)
#   scripts/testnet.sh down [--volumes]           stop and remove the containers (and their repos)
#   scripts/testnet.sh scenario NAME              discovery | content | converge | partition | kill |
#                                                 bootstrap-loss | all  (exits non-zero on failure)
#   scripts/testnet.sh mem                        memory of each container (docker stats)
#   scripts/testnet.sh ci                         down --volumes, up --build --nodes 6, scenario all, down --volumes; skips
#                                                 (exit 0, loudly) only when docker is unavailable
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
# info), KUBELT_TESTNET_WRITES (writes per writer in `converge`, default 20),
# KUBELT_TESTNET_CONTENT_MB (size of the `content` file, default 8), KUBELT_TESTNET_TIMEOUT
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
TIMEOUT="${KUBELT_TESTNET_TIMEOUT:-60}"
WALLET_KEY="$TN/test-wallet.key"
# The address of the key in test-wallet.key (Hardhat's well-known account #0).
OWNER=0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266
OWNER_LC=$(tr 'A-F' 'a-f' <<<"$OWNER")
NAMESPACE=testnet
WRITERS=(node1 node2)

die() { printf '\033[1;31mFAIL: %s\033[0m\n' "$*" >&2; exit 1; }
warn() { printf '\033[1;33m!! %s\033[0m\n' "$*" >&2; }
# Host time in seconds with 10 ms resolution, from the same clock the containers read
# (/proc/uptime is not namespaced), so host and container stamps can be compared.
now() { local up _; read -r up _ </proc/uptime; echo "$up"; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# ---------------------------------------------------------------------------------------------
# tools, binary, image

ensure_tools() {
  command -v docker >/dev/null 2>&1 || die "docker is not installed"
  local need=()
  command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
  command -v jq >/dev/null 2>&1 || need+=(jq)
  [ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -x ip >/dev/null || need+=(busybox-static)
  if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    local sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  # busybox (dynamic) can shadow busybox-static at /bin/busybox; we need the static one.
  file_is_static /bin/busybox || die "/bin/busybox is not statically linked (install busybox-static)"
}

file_is_static() { ! ldd "$1" >/dev/null 2>&1; }

ensure_binary() {
  if [ "${1:-}" = build ] || [ ! -x "$KUBELT_BIN" ]; then
    "$KUBELT_ROOT/scripts/setup.sh"
    build_release
  fi
  [ -x "$KUBELT_BIN" ] || die "no kubelt binary at $KUBELT_BIN"
}

# sha256 of everything that goes into the image.
image_recipe_hash() {
  { sha256sum "$KUBELT_BIN" | cut -d' ' -f1
    sha256sum /bin/busybox "$TN/Dockerfile" | cut -d' ' -f1
  } | sha256sum | cut -c1-32
}

ensure_image() {
  local want have
  want=$(image_recipe_hash)
  have=$(docker image inspect -f '{{ index .Config.Labels "kubelt.testnet.recipe" }}' "$IMAGE" 2>/dev/null || true)
  if [ "$want" = "$have" ]; then
    return 0
  fi
  log "building image $IMAGE (recipe $want)"
  local ctx="$BUILD/image"
  rm -rf "$ctx"
  mkdir -p "$ctx/rootfs/usr/local/bin" "$ctx/rootfs/bin" "$ctx/rootfs/repo" "$ctx/rootfs/etc"
  install -d -m 1777 "$ctx/rootfs/tmp"
  strip -o "$ctx/rootfs/usr/local/bin/kubelt" "$KUBELT_BIN" 2>/dev/null || cp "$KUBELT_BIN" "$ctx/rootfs/usr/local/bin/kubelt"
  # The shared libraries and the loader, at the paths ldd names (symlinks resolved).
  local lib
  for lib in $(ldd "$KUBELT_BIN" | grep -oE '/[^ ]+' | sort -u); do
    mkdir -p "$ctx/rootfs$(dirname "$lib")"
    cp -L "$lib" "$ctx/rootfs$lib"
  done
  cp /bin/busybox "$ctx/rootfs/bin/busybox"
  local applet
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
# compose, state

compose_file() {
  local f=""
  [ -f "$STATE" ] && f=$(sed -n 's/^compose=//p' "$STATE")
  echo "${f:-$TN/docker-compose.yml}"
}

node_count() {
  local n=""
  [ -f "$STATE" ] && n=$(sed -n 's/^nodes=//p' "$STATE")
  if [ -z "$n" ]; then
    n=$(grep -cE '^  node[0-9]+:$' "$(compose_file)" || true)
  fi
  echo "${n:-$DEFAULT_NODES}"
}

compose() {
  mkdir -p "$BUILD"
  [ -f "$ENVF" ] || printf 'BOOTSTRAP1_ID=unset\nBOOTSTRAP2_ID=unset\n' >"$ENVF"
  docker-compose -p "$PROJECT" -f "$(compose_file)" --env-file "$ENVF" "$@"
}

nodes() { seq 1 "$(node_count)" | sed 's/^/node/'; }
services() { echo bootstrap1; echo bootstrap2; nodes; }
followers() { nodes | grep -vxF -f <(printf '%s\n' "${WRITERS[@]}"); }
container() { echo "kt-$1"; }
ip_of() {
  case "$1" in
    bootstrap1) echo 10.77.0.2 ;;
    bootstrap2) echo 10.77.0.3 ;;
    node*) echo "10.77.1.${1#node}" ;;
  esac
}
# `kubelt ARGS` inside a container.
kx() { local s=$1; shift; docker exec "kt-$s" kubelt "$@"; }
running() { [ "$(docker inspect -f '{{ .State.Running }}' "kt-$1" 2>/dev/null)" = true ]; }

# Runs `kubelt ARGS` on every listed service in parallel; output of each in DIR/<service>.
each() {
  local dir=$1 list=$2; shift 2
  mkdir -p "$dir"
  local pids=() s
  for s in $list; do
    docker exec "kt-$s" kubelt "$@" >"$dir/$s" 2>"$dir/$s.err" &
    pids+=($!)
  done
  local p
  for p in "${pids[@]}"; do wait "$p" || true; done
}

# A JSON-RPC call inside a container (for the methods the CLI has no command for).
rpc() {
  local s=$1 method=$2 params=${3:-null}
  docker exec "kt-$s" sh -c 'wget -q -O - --header "Authorization: Bearer $(cat /repo/api.cookie)" \
      --header "Content-Type: application/json" --post-data "$1" "$(cat /repo/api)"' \
    sh "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"$method\",\"params\":$params}"
}

# Whether the image's kubelt has the `core` commands (asked once per run of this script).
have_core() {
  if [ -z "${KUBELT_TESTNET_HAVE_CORE:-}" ]; then
    KUBELT_TESTNET_HAVE_CORE=0
    docker run --rm --network none "$IMAGE" core --help >/dev/null 2>&1 && KUBELT_TESTNET_HAVE_CORE=1
    export KUBELT_TESTNET_HAVE_CORE
  fi
  [ "$KUBELT_TESTNET_HAVE_CORE" = 1 ]
}

# Scratch directories, all under one that goes away when the script ends.
RUN_TMP=$(mktemp -d "${TMPDIR:-/tmp}/kubelt-testnet.XXXXXX")
trap 'rm -rf "$RUN_TMP"' EXIT
tmpdir() { mktemp -d "$RUN_TMP/XXXXXX"; }

# Waits until `kubelt id` answers on every listed service.
wait_api() {
  local list=$1 deadline=$(( $(date +%s) + ${2:-60} )) s pending
  while :; do
    pending=""
    for s in $list; do
      kx "$s" id --json >/dev/null 2>&1 || pending+=" $s"
    done
    [ -z "$pending" ] && return 0
    [ "$(date +%s)" -ge "$deadline" ] && die "no API answer from:$pending"
    sleep 1
  done
}

peer_id() { kx "$1" id --json | jq -r .peer_id; }

# ---------------------------------------------------------------------------------------------
# up / down / status / logs

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
  local t0; t0=$(date +%s)
  compose up -d --remove-orphans 2>&1 | grep -v -e '^Creating\|^Starting\|^Recreating\|up-to-date' >&2 || true
  wait_api "$(services)" 120
  log "every API answers after $(( $(date +%s) - t0 ))s; waiting for every node to have a peer"
  wait_all_connected 120
  if have_core; then
    setup_core
  else
    warn "this kubelt has no 'core' command yet: the test core is not set up"
  fi
  cmd_status
}

wait_all_connected() {
  local deadline=$(( $(date +%s) + $1 )) d s lonely
  d=$(tmpdir)
  while :; do
    each "$d" "$(services)" status --json
    lonely=""
    for s in $(services); do
      [ "$(jq -r '.connected_peers // 0' "$d/$s" 2>/dev/null || echo 0)" -gt 0 ] || lonely+=" $s"
    done
    [ -z "$lonely" ] && break
    [ "$(date +%s)" -ge "$deadline" ] && { rm -rf "$d"; die "still without peers:$lonely"; }
    sleep 1
  done
  rm -rf "$d"
}

# Gives node1 and node2 a delegation for the test core (signed with the test wallet) and has every
# other node follow it. Idempotent: nodes that already hold the core are left alone.
setup_core() {
  local d s
  d=$(tmpdir)
  each "$d" "$(nodes)" core ls --json
  for s in $(nodes); do
    local held
    held=$(jq -r --arg a "$OWNER_LC" '[ .[]? | select((.address // "" | ascii_downcase) == $a) ] | first
      | if . == null then "no" elif .writable then "writable" else "read-only" end' "$d/$s" 2>/dev/null || echo no)
    if printf '%s\n' "${WRITERS[@]}" | grep -qx "$s"; then
      [ "$held" = writable ] && continue
      log "$s: delegation from the test wallet, signed and submitted"
      kx "$s" core delegate "$OWNER" --namespaces '*' --expires 30d >"$d/$s.siwe" || die "$s: core delegate failed"
      docker cp "$d/$s.siwe" "kt-$s:/tmp/delegation.txt"
      docker cp "$WALLET_KEY" "kt-$s:/tmp/wallet.key"
      kx "$s" core submit --message-file /tmp/delegation.txt --sign-with /tmp/wallet.key >/dev/null \
        || { docker exec "kt-$s" rm -f /tmp/wallet.key; die "$s: core submit failed"; }
      docker exec "kt-$s" rm -f /tmp/wallet.key
    elif [ "$held" = no ]; then
      kx "$s" core follow "$OWNER" >/dev/null || die "$s: core follow failed"
    fi
  done
  log "test core $OWNER: writers ${WRITERS[*]}, followed by the others"
  rm -rf "$d"
}

# The test core's heads in a `kubelt core ls --json` answer: short, sorted, comma-separated;
# "none" when the node holds the core but it has no change yet; empty when it does not hold it.
heads_of_file() {
  jq -r --arg a "$OWNER_LC" '
    [ .[]? | select((.address // "" | ascii_downcase) == $a) ] | first
    | if . == null then empty
      elif (.heads | length) == 0 then "none"
      else [ .heads[] | .[0:8] ] | sort | join(",") end' "$1" 2>/dev/null || true
}

cmd_status() {
  local d s
  d=$(tmpdir)
  local all; all=$(services)
  local up_list="" names
  names=$(docker ps --format '{{ .Names }}')
  for s in $all; do grep -qx "kt-$s" <<<"$names" && up_list+=" $s"; done
  each "$d/status" "$up_list" status --json
  if have_core; then
    each "$d/ls" "$up_list" core ls --json
  fi
  # The most common heads among the nodes holding the core count as "the" heads.
  local majority=""
  if have_core; then
    majority=$(for s in $up_list; do heads_of_file "$d/ls/$s"; done | grep . | sort | uniq -c | sort -rn | awk 'NR==1 { print $2 }')
  fi
  printf '%-11s %-54s %5s %5s %-20s %s\n' NODE "PEER ID" PEERS CORES HEADS "IN SYNC"
  for s in $all; do
    if ! grep -qw "$s" <<<"$up_list"; then
      printf '%-11s %-54s %5s %5s %-20s %s\n' "$s" "(container not running)" - - - -
      continue
    fi
    if [ ! -s "$d/status/$s" ]; then
      printf '%-11s %-54s %5s %5s %-20s %s\n' "$s" "(no answer from its API)" - - - -
      continue
    fi
    local pid peers cores heads sync
    pid=$(jq -r '.peer_id // "?"' "$d/status/$s" 2>/dev/null || echo "(no answer)")
    peers=$(jq -r '.connected_peers // "?"' "$d/status/$s" 2>/dev/null || echo "?")
    cores="-"; heads="-"; sync="-"
    if have_core; then
      cores=$(jq -r 'if type == "array" then length elif type == "object" then ((.cores // .) | length) else 0 end' "$d/ls/$s" 2>/dev/null || echo "?")
      heads=$(heads_of_file "$d/ls/$s")
      if [ -n "$heads" ]; then
        [ "$heads" = "$majority" ] && sync=yes || sync=NO
      else
        heads="-"
      fi
    fi
    printf '%-11s %-54s %5s %5s %-20s %s\n' "$s" "$pid" "$peers" "$cores" "${heads:0:20}" "$sync"
  done
  rm -rf "$d"
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

# Memory of each container now (`docker stats`, page cache excluded) and, where the cgroup v1
# files are readable, its peak since it started (page cache included).
cmd_mem() {
  local list="" s
  for s in $(services); do running "$s" && list+=" kt-$s"; done
  [ -n "$list" ] || die "no testnet container is running"
  local peaks; peaks=$(tmpdir)/peaks
  # shellcheck disable=SC2086
  docker inspect -f '{{ .Name }} {{ .Id }}' $list | while read -r s id; do
    local f=/sys/fs/cgroup/memory/docker/$id/memory.max_usage_in_bytes
    [ -r "$f" ] && echo "${s#/} $(cat "$f")"
  done >"$peaks" || true
  # shellcheck disable=SC2086
  docker stats --no-stream --format '{{ .Name }} {{ .MemUsage }} {{ .CPUPerc }}' $list | awk -v peaks="$peaks" '
    function mib(v) {
      if (v ~ /GiB$/) return v * 1024; if (v ~ /MiB$/) return v + 0; if (v ~ /KiB$/) return v / 1024
      if (v ~ /kB$/) return v / 1024; if (v ~ /MB$/) return v + 0; if (v ~ /GB$/) return v * 1024; return v / 1048576
    }
    BEGIN { while ((getline line < peaks) > 0) { split(line, f, " "); peak[f[1]] = f[2] / 1048576 } }
    { m = mib($2); name[NR] = $1; mem[NR] = m; cpu[NR] = $NF; total += m; if (m > max) max = m; if (min == "" || m < min) min = m
      if ($1 in peak) { p = peak[$1]; if (p > pmax) pmax = p } }
    END {
      printf "%-16s %10s %8s %16s\n", "CONTAINER", "MEMORY", "CPU", "PEAK (w/ cache)"
      for (i = 1; i <= NR; i++) printf "%-16s %6.1f MiB %8s %12s\n", name[i], mem[i], cpu[i], (name[i] in peak) ? sprintf("%.1f MiB", peak[name[i]]) : "-"
      printf "memory: %d containers, total %.0f MiB, mean %.1f MiB, min %.1f MiB, max %.1f MiB", NR, total, total / NR, min, max
      if (pmax > 0) printf "; highest peak (page cache included) %.1f MiB", pmax
      printf "\n"
    }'
}

# ---------------------------------------------------------------------------------------------
# measurements

# p-th percentile (nearest rank) of the numbers on stdin.
percentile() { sort -g | awk -v p="$1" '{ v[NR] = $1 } END { if (NR == 0) { print "n/a"; exit } i = int((p / 100) * NR + 0.999999); if (i < 1) i = 1; if (i > NR) i = NR; printf "%.3f", v[i] }'; }

# What scenarios measured, one line each; `all` prints them again at the end.
RESULTS_FILE="$BUILD/results"
result() {
  printf '\033[1;32m== %s\033[0m\n' "$*"
  echo "$*" >>"$RESULTS_FILE"
}

# The value at NAMESPACE/PATH of the test core on a node (JSON, or empty).
core_get() { kx "$1" core get "$OWNER" "$NAMESPACE" "$2" 2>/dev/null || true; }

# Prints how long a wait took, as an upper bound and the length of one round of checks (the
# state was reached during the last round): "4.37s±0.41".
took() { awk -v a="$1" -v r="$2" -v b="$(now)" 'BEGIN { printf "%.2fs±%.2f", b - a, b - r }'; }

# Waits until every listed node holds the same heads; prints the time it took (see `took`).
wait_same_heads() {
  local list=$1 timeout=$2 t0 d s first ok round
  t0=$(now); d=$(tmpdir)
  while :; do
    round=$(now)
    each "$d" "$list" core ls --json
    ok=1; first=""
    for s in $list; do
      local h; h=$(heads_of_file "$d/$s")
      [ -n "$h" ] || { ok=0; break; }
      if [ -z "$first" ]; then first=$h; elif [ "$h" != "$first" ]; then ok=0; break; fi
    done
    if [ $ok = 1 ]; then rm -rf "$d"; took "$t0" "$round"; return 0; fi
    if awk -v a="$t0" -v b="$(now)" -v t="$timeout" 'BEGIN { exit !(b - a > t) }'; then
      for s in $list; do echo "  $s: $(heads_of_file "$d/$s")" >&2; done
      rm -rf "$d"; return 1
    fi
    sleep 0.2
  done
}

# Waits until every listed node has every key in KEYS (a file, one path per line, under
# NAMESPACE/PREFIX). Prints the time it took (see `took`); on timeout lists what is missing
# and fails.
wait_keys_everywhere() {
  local list=$1 prefix=$2 keys=$3 timeout=$4 t0 d s missing round
  t0=$(now); d=$(tmpdir)
  while :; do
    round=$(now)
    each "$d" "$list" core get "$OWNER" "$NAMESPACE" "$prefix"
    missing=""
    for s in $list; do
      local have; have=$(jq -r 'if type == "object" then keys[] else empty end' "$d/$s" 2>/dev/null | sort)
      local lost; lost=$(comm -23 <(sort "$keys") <(echo "$have") | wc -l)
      [ "$lost" -eq 0 ] || missing+=" $s($lost)"
    done
    if [ -z "$missing" ]; then rm -rf "$d"; took "$t0" "$round"; return 0; fi
    if awk -v a="$t0" -v b="$(now)" -v t="$timeout" 'BEGIN { exit !(b - a > t) }'; then
      echo "  still missing writes (node(count)):$missing" >&2
      rm -rf "$d"; return 1
    fi
    sleep 0.2
  done
}

# A scenario that needs cores on an image without them is skipped, never passed: the summary
# says so, and under CI (or KUBELT_TESTNET_STRICT=1) a skip is a failure.
need_core() {
  have_core && return 0
  if [ "${CI:-}" = true ] || [ "${KUBELT_TESTNET_STRICT:-}" = 1 ]; then
    die "$1 needs cores, and this image's kubelt has no 'core' command (or the probe failed)"
  fi
  warn "SKIPPED $1: this kubelt has no 'core' command (cores are not integrated yet)"
  echo "SKIPPED $1: this kubelt has no 'core' command" >>"$RESULTS_FILE"
  return 1
}

# ---------------------------------------------------------------------------------------------
# scenarios

# Fetches the routing table of every listed node: DIR/rt.<node> holds its peer ids, sorted.
routing_tables() {
  local dir=$1 list=$2 s pids=()
  for s in $list; do
    (rpc "$s" dht_routingTable 2>/dev/null | jq -r '.result[]?.peer_id' 2>/dev/null | sort -u >"$dir/rt.$s") &
    pids+=($!)
  done
  local p; for p in "${pids[@]}"; do wait "$p" || true; done
}

# Every node finds every other through the DHT: each routing table holds every other peer id.
# Then a fresh node (new key, empty repo) replaces the last one and is timed until it knows
# everyone and everyone knows it.
scenario_discovery() {
  local d s all total t_ref t0 deadline
  all=$(services); total=$(wc -w <<<"$all")
  d=$(tmpdir)
  each "$d/id" "$all" id --json
  for s in $all; do jq -r .peer_id "$d/id/$s"; done | sort >"$d/ids"
  [ "$(grep -c . "$d/ids")" -eq "$total" ] || die "discovery: not every node answered 'kubelt id'"
  t_ref=$(for s in $all; do docker inspect -f '{{ .State.StartedAt }}' "kt-$s"; done | sort | tail -1)
  t_ref=$(date -d "$t_ref" +%s.%N)
  t0=$(date +%s.%N)
  deadline=$(( $(date +%s) + TIMEOUT * 2 ))
  local incomplete last=""
  while :; do
    routing_tables "$d" "$all"
    incomplete=""
    for s in $all; do
      local mine missing
      mine=$(jq -r .peer_id "$d/id/$s")
      missing=$(comm -23 <(grep -vx "$mine" "$d/ids") "$d/rt.$s" | wc -l)
      [ "$missing" -eq 0 ] || incomplete+=" $s($missing)"
    done
    [ -z "$incomplete" ] && { last=$(date +%s.%N); break; }
    [ "$(date +%s)" -lt "$deadline" ] || die "discovery: after $(( TIMEOUT * 2 ))s these routing tables still miss peers (count):$incomplete"
    sleep 0.5
  done
  each "$d/st" "$all" status --json
  local conn
  conn=$(for s in $all; do jq -r .connected_peers "$d/st/$s"; done | sort -n | awk '{ v[NR] = $1; s += $1 } END { printf "min %d, mean %.1f, max %d", v[1], s / NR, v[NR] }')
  result "discovery: all $total nodes have all $((total - 1)) others in their routing tables, $(elapsed "$t_ref" "$last")s after the last container start (first check at $(elapsed "$t_ref" "$t0")s); connected peers per node: $conn"

  # A node joins with a new identity.
  local joiner old_id new_id
  joiner="node$(node_count)"
  old_id=$(jq -r .peer_id "$d/id/$joiner")
  grep -vx "$old_id" "$d/ids" >"$d/others"
  compose rm -s -f "$joiner" >/dev/null 2>&1 || die "discovery: cannot remove $joiner"
  ! running "$joiner" || die "discovery: $joiner still runs after its removal"
  docker volume rm "${PROJECT}_$joiner" >/dev/null || die "discovery: cannot delete $joiner's repo volume"
  t0=$(now)
  compose up -d --no-deps "$joiner" >/dev/null 2>&1
  wait_api "$joiner" 60
  local t_api t_knows="" t_known=""
  t_api=$(elapsed "$t0" "$(now)")
  new_id=$(peer_id "$joiner")
  [ -n "$new_id" ] && [ "$new_id" != "$old_id" ] || die "discovery: $joiner is not a fresh node (peer id ${new_id:-none}, was $old_id)"
  deadline=$(( $(date +%s) + TIMEOUT * 2 ))
  while [ -z "$t_knows" ] || [ -z "$t_known" ]; do
    routing_tables "$d" "$all"
    local t; t=$(now)
    if [ -z "$t_knows" ] && [ "$(comm -23 "$d/others" "$d/rt.$joiner" | wc -l)" -eq 0 ]; then t_knows=$(elapsed "$t0" "$t"); fi
    if [ -z "$t_known" ]; then
      local unaware=""
      for s in $all; do
        [ "$s" = "$joiner" ] && continue
        grep -qx "$new_id" "$d/rt.$s" || unaware+=" $s"
      done
      [ -n "$unaware" ] || t_known=$(elapsed "$t0" "$t")
    fi
    [ "$(date +%s)" -lt "$deadline" ] || die "discovery: the new $joiner ($new_id) knows all: ${t_knows:-no}; known by all: ${t_known:-no (not by$unaware)}"
    sleep 0.25
  done
  if have_core; then setup_core >/dev/null; fi
  result "discovery: a fresh $joiner (new key, empty repo) started; API up in ${t_api}s, it had all $((total - 1)) others in its routing table after ${t_knows}s, and all of them had it after ${t_known}s"
  rm -rf "$d"
}

# Add a file on node1, cat it on the node farthest from it; the bytes must be identical.
scenario_content() {
  local mb=${KUBELT_TESTNET_CONTENT_MB:-8} d src=node1 dst s cid t0 t1
  d=$(tmpdir)
  # The farthest node: one node1 is not connected to, else the last one.
  local node1_id; node1_id=$(peer_id "$src")
  dst=""
  for s in $(nodes | sort -t e -k2 -rn); do
    [ "$s" = "$src" ] && continue
    if ! kx "$s" swarm peers --json | jq -e --arg p "$node1_id" 'any(.[]; .peer_id == $p)' >/dev/null; then dst=$s; break; fi
  done
  local how="not connected to $src"
  [ -n "$dst" ] || { dst="node$(node_count)"; how="connected to $src, as every node is"; }
  head -c $((mb * 1024 * 1024)) /dev/urandom >"$d/file"
  docker cp "$d/file" "kt-$src:/tmp/content.bin"
  t0=$(date +%s.%N)
  cid=$(kx "$src" add -q /tmp/content.bin) || die "content: add on $src failed"
  t1=$(date +%s.%N)
  docker exec "kt-$src" rm -f /tmp/content.bin
  local add_s; add_s=$(elapsed "$t0" "$t1")
  t0=$(date +%s.%N)
  kx "$dst" cat "$cid" >"$d/got" || die "content: cat $cid on $dst failed"
  t1=$(date +%s.%N)
  local cat_s; cat_s=$(elapsed "$t0" "$t1")
  cmp -s "$d/file" "$d/got" || die "content: bytes from $dst differ from what $src added ($(stat -c %s "$d/got") of $((mb * 1048576)) bytes)"
  local rate; rate=$(awk -v m="$mb" -v s="$cat_s" 'BEGIN { printf "%.1f", m / s }')
  result "content: ${mb} MiB added on $src in ${add_s}s ($cid); cat on $dst ($how) took ${cat_s}s (${rate} MiB/s, docker exec included), bytes identical"
  rm -rf "$d"
}

# Runs COUNT writes of the test core on NODE under RUN/, GAP seconds apart, inside the container;
# prints "<key> <uptime when acknowledged>" per write. Fails at the first refused write.
write_stream() {
  local node=$1 run=$2 count=$3 gap=$4
  docker exec "kt-$node" sh -c '
    i=0
    while [ $i -lt "$2" ]; do
      kubelt core set "$3" "$4" "$1/$5-$i" "{\"i\":$i}" >/dev/null || { echo "write $5-$i refused" >&2; exit 1; }
      read up _ </proc/uptime; echo "$5-$i $up"
      i=$((i + 1)); sleep "$6"
    done' sh "$run" "$count" "$OWNER" "$NAMESPACE" "$node" "$gap"
}

# Writes on both writers at once; every node gets every write and the same heads; p50/p99 of
# propagation (acknowledged on the writer -> first seen on a follower).
scenario_converge() {
  need_core converge || return 0
  local writes=${KUBELT_TESTNET_WRITES:-20} gap=${KUBELT_TESTNET_WRITE_GAP:-0.15} run d w
  run="c$(date +%s)"
  d=$(tmpdir)
  wait_same_heads "$(nodes)" "$TIMEOUT" >/dev/null || die "converge: nodes are not in sync before the writes"
  start_watchers "$d" "$run" "$(followers)"
  trap 'stop_watchers "$d"' EXIT
  sleep 1
  local pids=()
  for w in "${WRITERS[@]}"; do
    write_stream "$w" "$run" "$writes" "$gap" >"$d/acks.$w" &
    pids+=($!)
  done
  local p; for p in "${pids[@]}"; do wait "$p" || die "converge: writes on a writer failed"; done
  awk '{ print $1 }' "$d"/acks.* >"$d/keys"
  wait_watchers_saw "$d" "$d/keys" "$TIMEOUT" || die "converge: writes did not reach every follower in ${TIMEOUT}s"
  stop_watchers "$d"; trap - EXIT
  local last_ack all_seen
  last_ack=$(awk '{ print $2 }' "$d"/acks.* | sort -g | tail -1)
  all_seen=$(seen_all_at "$d" "$d/keys")
  # The watchers saw it; check it independently with the CLI, and the heads.
  local t_keys t_heads
  t_keys=$(wait_keys_everywhere "$(nodes)" "$run" "$d/keys" "$TIMEOUT") || die "converge: writes are missing on some node"
  t_heads=$(wait_same_heads "$(nodes)" "$TIMEOUT") || die "converge: nodes hold every write but not the same heads after ${TIMEOUT}s"
  propagation_report "$d" converge "$(wc -l <"$d/keys")"
  result "converge: $(wc -l <"$d/keys") writes (${WRITERS[*]} at once, ${writes} each, ${gap}s apart): every follower held all of them $(elapsed "$last_ack" "$all_seen")s after the last acknowledgement; checked again on all $(node_count) nodes with the CLI (${t_keys}) and same heads everywhere (${t_heads})"
  rm -rf "$d"
}

# Starts a watcher in each listed container: every ~50 ms (KUBELT_TESTNET_WATCH_INTERVAL) a
# `core_get` of the run's subtree (JSON-RPC with busybox wget, far cheaper than starting the
# CLI), printing "<uptime> <key>" the first time each key shows up, stamped just before the
# request that showed it. /proc/uptime is one clock for every container and the host.
start_watchers() {
  local d=$1 run=$2 list=$3 s
  : >"$d/watchers"
  echo "$list" >"$d/watch_list"
  for s in $list; do
    docker exec "kt-$s" sh -c '
      rm -f /tmp/watch.stop
      auth="Authorization: Bearer $(cat /repo/api.cookie)"; url=$(cat /repo/api)
      body="{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"core_get\",\"params\":{\"address\":\"$1\",\"namespace\":\"$2\",\"path\":\"$3\"}}"
      seen=" "
      while [ ! -e /tmp/watch.stop ]; do
        read up _ </proc/uptime
        out=$(wget -q -O - --header "$auth" --header "Content-Type: application/json" --post-data "$body" "$url" 2>/dev/null)
        for k in $(echo "$out" | grep -oE "\"[a-z0-9]+-[0-9]+\"" | tr -d "\""); do
          case "$seen" in *" $k "*) ;; *) seen="$seen$k "; echo "$up $k" ;; esac
        done
        sleep "$4"
      done
      rm -f /tmp/watch.stop' sh "$OWNER_LC" "$NAMESPACE" "$run" "${KUBELT_TESTNET_WATCH_INTERVAL:-0.05}" >"$d/seen.$s" 2>/dev/null &
    echo "$!" >>"$d/watchers"
  done
}

stop_watchers() {
  local d=$1 s
  [ -f "$d/watch_list" ] && [ ! -f "$d/watch_stopped" ] || return 0
  for s in $(cat "$d/watch_list"); do docker exec "kt-$s" touch /tmp/watch.stop 2>/dev/null || true; done
  local p; while read -r p; do wait "$p" 2>/dev/null || true; done <"$d/watchers"
  touch "$d/watch_stopped"
}

# Per watched node, when it had seen every key in KEYS (uptime seconds), one line "<node> <t>".
seen_all_per_node() {
  local d=$1 keys=$2 s
  for s in $(cat "$d/watch_list"); do
    echo "$s $(awk 'NR == FNR { want[$1] = 1; next } ($2 in want) { print $1 }' "$keys" "$d/seen.$s" | sort -g | tail -1)"
  done
}

# Waits (reading the watchers' output on this host, no docker exec) until every watcher has seen
# every key in KEYS.
wait_watchers_saw() {
  local d=$1 keys=$2 timeout=$3 s deadline behind
  deadline=$(( $(date +%s) + timeout ))
  while :; do
    behind=""
    for s in $(cat "$d/watch_list"); do
      [ "$(comm -23 <(sort -u "$keys") <(awk '{ print $2 }' "$d/seen.$s" | sort -u) | wc -l)" -eq 0 ] || behind+=" $s"
    done
    [ -z "$behind" ] && return 0
    if [ "$(date +%s)" -ge "$deadline" ]; then echo "  still behind:$behind" >&2; return 1; fi
    sleep 0.2
  done
}

# When the last watcher had seen the last of KEYS (uptime seconds).
seen_all_at() {
  local d=$1 keys=$2 s
  for s in $(cat "$d/watch_list" 2>/dev/null || echo); do
    awk 'NR == FNR { want[$1] = 1; next } ($2 in want) { print $1 }' "$keys" "$d/seen.$s"
  done | sort -g | tail -1
}

# p50/p99/max of (first seen on a follower - acknowledged on the writer), over every pair.
propagation_report() {
  local d=$1 name=$2 nwrites=$3
  cat "$d"/acks.* >"$d/acks"
  local s
  for s in $(cat "$d/watch_list" 2>/dev/null || followers); do
    [ -f "$d/seen.$s" ] || continue
    awk 'NR == FNR { ack[$1] = $2; next } ($2 in ack) { printf "%.3f\n", $1 - ack[$2] }' "$d/acks" "$d/seen.$s"
  done >"$d/lat"
  local n p50 p99 max
  n=$(wc -l <"$d/lat")
  p50=$(percentile 50 <"$d/lat"); p99=$(percentile 99 <"$d/lat"); max=$(percentile 100 <"$d/lat")
  result "$name propagation over $n (write, follower) pairs ($nwrites writes x $(followers | wc -l) followers; ~50 ms sampling): p50 ${p50}s, p99 ${p99}s, max ${max}s"
}


# Route every packet between two sets of containers into a blackhole (a cut cable: nothing
# arrives, nobody is told), or remove those routes. As root on the docker host this enters each
# container's network namespace with nsenter (all containers within a few ms); otherwise it uses
# `docker exec ... ip route` (the containers have NET_ADMIN for that), which takes ~1-2 s.
partition_apply() {
  local verb=$1 side_a=$2 side_b=$3 s t targets pids=() pid use_nsenter=0
  declare -A pid_of=()
  if [ "$(id -u)" = 0 ] && command -v nsenter >/dev/null 2>&1 && command -v ip >/dev/null 2>&1; then
    # shellcheck disable=SC2046
    while read -r s pid; do pid_of[${s#/kt-}]=$pid; done < <(docker inspect -f '{{ .Name }} {{ .State.Pid }}' $(for s in $side_a $side_b; do echo "kt-$s"; done))
    pid=${pid_of[node1]:-0}
    [ "$pid" != 0 ] && nsenter -t "$pid" -n true 2>/dev/null && use_nsenter=1
  fi
  PARTITION_APPLIED_AT=$(now)
  for s in $side_a $side_b; do
    targets=""
    if grep -qw "$s" <<<"$side_a"; then
      for t in $side_b; do targets+=" $(ip_of "$t")"; done
    else
      for t in $side_a; do targets+=" $(ip_of "$t")"; done
    fi
    if [ $use_nsenter = 1 ]; then
      # shellcheck disable=SC2086
      printf "route $verb blackhole %s/32\n" $targets | nsenter -t "${pid_of[$s]}" -n ip -force -batch - 2>/dev/null &
    else
      # shellcheck disable=SC2086
      docker exec "kt-$s" sh -c 'v=$1; shift; for ip in "$@"; do ip route "$v" blackhole "$ip/32" || [ "$v" = del ]; done' sh "$verb" $targets 2>/dev/null &
    fi
    pids+=($!)
  done
  local p ok=0; for p in "${pids[@]}"; do wait "$p" || ok=1; done
  [ "$verb" = del ] && return 0
  return $ok
}

# Cut the network in two halves (bootstrap1, node1, ... | bootstrap2, node2, ...), write on both
# sides, check each side converges alone and none of it crosses, heal, and time how long every
# node takes to hold every write and the same heads.
scenario_partition() {
  need_core partition || return 0
  local n d run s half side_a side_b writes=${KUBELT_TESTNET_WRITES:-20}
  n=$(node_count); half=$(( (n + 1) / 2 ))
  side_a="bootstrap1 node1"; side_b="bootstrap2 node2"
  for s in $(seq 3 "$n"); do
    if [ "$s" -le $((half + 1)) ]; then side_a+=" node$s"; else side_b+=" node$s"; fi
  done
  local nodes_a nodes_b
  nodes_a=$(tr ' ' '\n' <<<"$side_a" | grep '^node' | xargs); nodes_b=$(tr ' ' '\n' <<<"$side_b" | grep '^node' | xargs)
  run="p$(date +%s)"
  d=$(tmpdir)
  wait_same_heads "$(nodes)" "$TIMEOUT" >/dev/null || die "partition: nodes are not in sync before the partition"
  log "partition: side A = $side_a | side B = $side_b"
  trap 'partition_apply del "$side_a" "$side_b" || true' EXIT
  partition_apply add "$side_a" "$side_b" || die "partition: cannot add routes (does the container have NET_ADMIN?)"
  local t_cut=$PARTITION_APPLIED_AT
  local pids=() w
  for w in node1 node2; do
    write_stream "$w" "$run" "$writes" 0.05 >"$d/acks.$w" &
    pids+=($!)
  done
  local p; for p in "${pids[@]}"; do wait "$p" || die "partition: writes failed during the partition"; done
  awk '{ print $1 }' "$d/acks.node1" >"$d/keys.a"; awk '{ print $1 }' "$d/acks.node2" >"$d/keys.b"
  local t_a t_b
  t_a=$(wait_keys_everywhere "$nodes_a" "$run" "$d/keys.a" "$TIMEOUT") || die "partition: side A did not converge on its own writes"
  t_b=$(wait_keys_everywhere "$nodes_b" "$run" "$d/keys.b" "$TIMEOUT") || die "partition: side B did not converge on its own writes"
  each "$d/get" "$(nodes)" core get "$OWNER" "$NAMESPACE" "$run"
  local leaks=""
  for s in $nodes_a; do jq -e 'type == "object" and any(keys[]; startswith("node2-"))' "$d/get/$s" >/dev/null 2>&1 && leaks+=" $s"; done
  for s in $nodes_b; do jq -e 'type == "object" and any(keys[]; startswith("node1-"))' "$d/get/$s" >/dev/null 2>&1 && leaks+=" $s"; done
  [ -z "$leaks" ] || die "partition: writes crossed the partition to:$leaks"
  # Watch every node from before the heal to the moment it holds every write.
  cat "$d/keys.a" "$d/keys.b" >"$d/keys"
  start_watchers "$d" "$run" "$(nodes)"
  trap 'stop_watchers "$d"; partition_apply del "$side_a" "$side_b" || true' EXIT
  local rest
  rest=$(awk -v a="$t_cut" -v b="$(now)" -v h="${KUBELT_TESTNET_PARTITION_SECS:-15}" 'BEGIN { r = h - (b - a); print (r > 1) ? r : 1 }')
  sleep "$rest"
  # The heal starts when the first routes go (they go in every container at once).
  partition_apply del "$side_a" "$side_b" || die "partition: cannot remove the routes"
  local t_heal=$PARTITION_APPLIED_AT
  local healed_in; healed_in=$(elapsed "$t_heal" "$(now)")
  trap 'stop_watchers "$d"' EXIT
  wait_watchers_saw "$d" "$d/keys" "$TIMEOUT" || die "partition: after healing, writes are still missing after ${TIMEOUT}s"
  stop_watchers "$d"; trap - EXIT
  local per_node conv p50
  per_node=$(seen_all_per_node "$d" "$d/keys" | awk -v h="$t_heal" '{ printf "%.2f\n", $2 - h }')
  conv=$(percentile 100 <<<"$per_node"); p50=$(percentile 50 <<<"$per_node")
  local t_keys t_heads
  t_keys=$(wait_keys_everywhere "$(nodes)" "$run" "$d/keys" "$TIMEOUT") || die "partition: after healing, writes are missing on some node"
  t_heads=$(wait_same_heads "$(nodes)" "$TIMEOUT") || die "partition: after healing, nodes do not reach the same heads in ${TIMEOUT}s"
  local t_same; t_same=$(elapsed "$t_heal" "$(now)")
  result "partition: $(wc -l <"$d/keys") writes ($writes per side) during a $(elapsed "$t_cut" "$t_heal")s partition; each side converged alone (${t_a} / ${t_b}), nothing crossed; healing (removing the routes everywhere) took ${healed_in}s; from its start every node held every write in ${conv}s (per node: p50 ${p50}s, max ${conv}s); the same heads on every node confirmed by a check through docker exec that ended ${t_same}s after it"
  rm -rf "$d"
}

# SIGKILL a writer in the middle of a stream of acknowledged writes; start it again; every
# acknowledged write must be on every node (the killed one included).
scenario_kill() {
  need_core kill || return 0
  local d run w=node1 t0
  run="k$(date +%s)"
  d=$(tmpdir)
  trap 'docker start kt-node1 >/dev/null 2>&1 || true' EXIT
  docker exec "kt-$w" sh -c '
    i=0
    while :; do
      kubelt core set "$2" "$3" "$1/kill-$i" "{\"i\":$i}" >/dev/null 2>&1 && echo "kill-$i"
      i=$((i + 1))
    done' sh "$run" "$OWNER" "$NAMESPACE" >"$d/acks" 2>/dev/null &
  local stream=$!
  sleep "${KUBELT_TESTNET_KILL_AFTER:-3}"
  docker kill -s KILL "kt-$w" >/dev/null || die "kill: cannot kill $w"
  wait "$stream" 2>/dev/null || true
  ! running "$w" || die "kill: $w still runs after SIGKILL"
  local acked; acked=$(grep -c . "$d/acks" || true)
  [ "$acked" -gt 0 ] || die "kill: no write was acknowledged before the kill"
  t0=$(now)
  docker start "kt-$w" >/dev/null
  wait_api "$w" 60
  local t_up; t_up=$(elapsed "$t0" "$(now)")
  local t_keys t_heads
  t_keys=$(wait_keys_everywhere "$(nodes)" "$run" "$d/acks" "$TIMEOUT") || die "kill: acknowledged writes are missing after the restart"
  t_heads=$(wait_same_heads "$(nodes)" "$TIMEOUT") || die "kill: nodes do not reach the same heads after the restart"
  result "kill: $acked writes acknowledged by $w before SIGKILL; restarted (API up) in ${t_up}s; every acknowledged write on every node ${t_keys} after that, same heads ${t_heads} later"
  rm -rf "$d"
}

# Stop both bootstraps: content and writes still flow; a node restarted while they are down
# rejoins through the peers it remembered and catches up on what it missed.
scenario_bootstrap_loss() {
  local n d last t0 run
  n=$(node_count); last="node$n"
  d=$(tmpdir)
  trap 'docker start kt-bootstrap1 kt-bootstrap2 "kt-$last" >/dev/null 2>&1 || true' EXIT
  docker stop -t 10 kt-bootstrap1 kt-bootstrap2 >/dev/null || die "bootstrap-loss: cannot stop the bootstraps"
  ! running bootstrap1 && ! running bootstrap2 || die "bootstrap-loss: a bootstrap still runs"
  log "bootstrap-loss: both bootstraps stopped"
  head -c $((1024 * 1024)) /dev/urandom >"$d/file"
  docker cp "$d/file" kt-node2:/tmp/bl.bin
  local cid; cid=$(kx node2 add -q /tmp/bl.bin) || die "bootstrap-loss: add failed"
  kx "$last" cat "$cid" >"$d/got" || die "bootstrap-loss: cat on $last failed without bootstraps"
  cmp -s "$d/file" "$d/got" || die "bootstrap-loss: content differs"
  docker stop -t 10 "kt-$last" >/dev/null || die "bootstrap-loss: cannot stop $last"
  ! running "$last" || die "bootstrap-loss: $last still runs"
  run="b$(date +%s)"
  if have_core; then
    kx node1 core set "$OWNER" "$NAMESPACE" "$run/while-down" '{"missed":true}' >/dev/null || die "bootstrap-loss: write failed"
    echo "while-down" >"$d/keys"
  fi
  t0=$(now)
  docker start "kt-$last" >/dev/null
  wait_api "$last" 60
  local deadline=$(( $(date +%s) + TIMEOUT )) peers=0
  while :; do
    peers=$(kx "$last" status --json | jq -r .connected_peers)
    [ "$peers" -gt 0 ] && break
    [ "$(date +%s)" -lt "$deadline" ] || die "bootstrap-loss: $last found no peer in ${TIMEOUT}s with the bootstraps down"
    sleep 0.2
  done
  local t_rejoin; t_rejoin=$(elapsed "$t0" "$(now)")
  local caught=""
  if have_core; then
    local t_catch t_all
    t_catch=$(wait_keys_everywhere "$last" "$run" "$d/keys" "$TIMEOUT") || die "bootstrap-loss: $last did not catch up on the write it missed"
    kx node2 core set "$OWNER" "$NAMESPACE" "$run/after" '{"after":true}' >/dev/null || die "bootstrap-loss: write failed"
    echo after >>"$d/keys"
    t_all=$(wait_keys_everywhere "$(nodes)" "$run" "$d/keys" "$TIMEOUT") || die "bootstrap-loss: a write without bootstraps did not reach every node"
    caught="; it caught up on the write it missed ${t_catch} later; a new write reached all nodes in ${t_all}"
  else
    need_core "bootstrap-loss (its core part)" || true
  fi
  result "bootstrap-loss: with both bootstraps down, 1 MiB added on node2 was read on $last; $last restarted and reconnected to $peers remembered peers in ${t_rejoin}s$caught"
  docker start kt-bootstrap1 kt-bootstrap2 >/dev/null
  trap - EXIT
  wait_api "bootstrap1 bootstrap2" 60
  rm -rf "$d"
}

cmd_scenario() {
  local name=${1:?scenario NAME: discovery, content, converge, partition, kill, bootstrap-loss, all}
  running node1 || die "the testnet is not running (scripts/testnet.sh up)"
  ensure_tools
  mkdir -p "$BUILD"
  local list=$name
  [ "$name" = all ] && list="discovery content converge partition kill bootstrap-loss"
  local sc failed=() t0
  : >"$RESULTS_FILE"
  for sc in $list; do
    declare -F "scenario_${sc//-/_}" >/dev/null || die "unknown scenario $sc (discovery, content, converge, partition, kill, bootstrap-loss, all)"
    log "scenario $sc ($(node_count) nodes + 2 bootstraps)"
    t0=$(date +%s)
    # A subshell: a failing check exits it, and its EXIT trap undoes what it broke. Not in an
    # `if` condition, where bash ignores `set -e` for everything inside: a failed step must end
    # the scenario, not be skipped over.
    local rc=0
    set +e
    ( set -e; "scenario_${sc//-/_}" )
    rc=$?
    set -e
    if [ "$rc" -ne 0 ]; then
      failed+=("$sc")
      echo "FAILED $sc" >>"$RESULTS_FILE"
    fi
    log "scenario $sc took $(( $(date +%s) - t0 ))s"
  done
  if [ "$name" = all ]; then
    log "memory after the scenarios"
    cmd_mem | tee -a "$RESULTS_FILE"
    log "summary ($(node_count) nodes + 2 bootstraps)"
    cat "$RESULTS_FILE"
  fi
  [ ${#failed[@]} -eq 0 ] || die "scenarios failed: ${failed[*]}"
  if grep -q '^SKIPPED' "$RESULTS_FILE"; then
    warn "scenarios passed, but some checks were SKIPPED (see above): this run did not check everything"
  elif [ "$name" = all ]; then
    log "every scenario passed"
  fi
  return 0
}

cmd_ci() {
  if ! docker info >/dev/null 2>&1; then
    printf '\n\033[1;33m!!!!!!!!!! TESTNET SKIPPED: docker is not available here (docker info failed) !!!!!!!!!!\033[0m\n\n' >&2
    exit 0
  fi
  local rc=0
  cmd_down --volumes >/dev/null 2>&1 || true
  # CI builds the binary from the clone (cargo does nothing when it is up to date);
  # KUBELT_TESTNET_SKIP_BUILD=1 uses the binary that is there.
  local build=--build
  [ "${KUBELT_TESTNET_SKIP_BUILD:-}" = 1 ] && build=""
  ( cmd_up --nodes "${KUBELT_TESTNET_NODES:-6}" $build && cmd_scenario all ) || rc=$?
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
    status) cmd_status ;;
    logs) cmd_logs "$@" ;;
    down) cmd_down "$@" ;;
    scenario) cmd_scenario "$@" ;;
    mem) cmd_mem ;;
    ci) cmd_ci ;;
    help|-h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
    *) die "unknown command $cmd (see scripts/testnet.sh help)" ;;
  esac
}

main "$@"
