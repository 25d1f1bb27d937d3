#!/usr/bin/env bash
# Benchmarks, each side by side with its baseline where there is one. Run on a quiet machine:
# the benchmarks compete for the 2 cores with anything else.
#   scripts/bench.sh [network|content|cores|healing|msg|app|hosted|private|nat] (default: all)
# network: time from `kubelt run` to the first connected peer; RSS of a node idle for 60 s with
#          5 peers (goal < 40 MB). Set KUBELT_BENCH_IDLE_SECS to shorten the idle wait.
# content: 100 MiB add (vs Kubo), 100 MiB transfers kubelt/Kubo in every direction (vs
#          Kubo->Kubo), peak RSS fetching 1 GiB. KUBELT_BENCH_MIB / KUBELT_BENCH_BIG_MIB resize;
#          add and transfers are medians of KUBELT_BENCH_ROUNDS alternating rounds (default 3).
#          With `sendme` on the PATH (cargo install sendme) also iroh's sendme as a baseline;
#          with rust-libp2p's perf client/server at /opt/libp2p-perf/bin/perf or $LIBP2P_PERF
#          (cargo install --root /opt/libp2p-perf libp2p-perf; not --locked: its lock file no
#          longer builds on current Rust) also the bare transport's ceiling.
# cores:   change propagation p50/p99 over 1,000 changes and catch-up of 10,000 changes, with 2
#          and 20 nodes; propagation with 50 replicas of one core (protocol/benches/core_sync.rs).
# healing: a 15 s partition of 6 nodes in one process, 10 times: time from the heal to every node
#          holding every write (goal < 3 s every time; protocol/benches/healing.rs;
#          HEAL_BENCH_RUNS, HEAL_BENCH_PARTITION_SECS). The docker testnet's `partition` scenario
#          measures the same over real TCP (scripts/testnet.sh).
# app:     the app API: kb_setData and kb_getData from 16 concurrent clients on loopback,
#          requests/s and p50/p99 (KUBELT_BENCH_SECS per method, default 10).
# hosted:  a hosted node holding 10,000 cores of 3 changes, and a node holding 1,000 cores of
#          100 changes: start-up time, resident memory, login + first write on a cold core
#          p50/p99 (node/tests/hosted.rs; KUBELT_BENCH_CORES overrides the number of cores).
# app and hosted measure KUBELT_BENCH_BASELINE too, when it names another kubelt binary (e.g.
# the build of main: `git worktree add /tmp/main main && cd /tmp/main && CARGO_TARGET_DIR=/var/tmp/
# kubelt-baseline cargo build --release`: its own target dir, because two checkouts of this
# workspace sharing one write the same artifacts and cargo takes the other's as fresh),
# side by side in the same run.
# msg:     message delivery latency p50/p99 between two online nodes and messages/s one sender ->
#          one recipient (protocol/benches/msg.rs); kb_sendMessage from 16 app clients to another
#          node, messages/s and p50/p99 (node/tests/app_api.rs).
# private: core set/get on a private namespace vs a plain one, same run, alternating rounds
#          (goal: private < 10% slower; protocol/benches/private.rs); then through a node
#          process: 100 MiB `add` plain vs private (encrypted), alternating, median of 3 (goal:
#          private >= 0.8x plain's speed), and kb_setData/kb_getData private vs plain
#          (node/tests/private_objects.rs; KUBELT_BENCH_MIB, KUBELT_BENCH_ROUNDS, KUBELT_BENCH_OPS).
# nat:     nodes at home behind real NATs (network namespaces, nftables masquerade; needs root and
#          nft): per pairing cone/cone, cone/symmetric, symmetric/symmetric, KUBELT_BENCH_NAT_RUNS
#          runs (default 20) of: time to a direct connection p50/p99 (from `core follow`, from the
#          relayed connection, from start), share of runs ending direct, core change latency A->B
#          p50/p99, and relayed vs direct latency (goal < 2x; node/tests/nat.rs, ~35 s per run).
#          KUBELT_BENCH_NAT_PAIRINGS=cone/cone (comma-separated) runs only those pairings.
set -euo pipefail
source "$(dirname "$0")/common.sh"
"$KUBELT_ROOT/scripts/setup.sh" --test
build_release
what="${1:-all}"
cd "$KUBELT_ROOT/scripts/bench"
if [ "$what" = all ] || [ "$what" = network ]; then
  log "network: start-up to first peer, idle memory"
  python3 network.py "${KUBELT_BENCH_IDLE_SECS:-60}"
fi
if [ "$what" = all ] || [ "$what" = content ]; then
  log "content: add, transfer, memory (side by side with Kubo)"
  export KUBO_PEER="${KUBO_PEER:-$KUBELT_ROOT/../shared/tools/kubo_peer.py}"
  # Loopback only: the benchmark and the Kubo peers run in a private network namespace.
  unshare -n -- sh -c 'ip link set lo up && exec python3 content.py "$@"' sh "${@:2}"
fi
if [ "$what" = all ] || [ "$what" = cores ]; then
  log "cores: propagation and catch-up, 2 and 20 nodes; propagation, 50 replicas"
  cd "$KUBELT_ROOT"
  # `cargo test --release --bench` runs the (harness-less) benchmark from the release build that
  # the tests share; `cargo bench` would build every dependency again in the bench profile. Each
  # section builds only its own bench target, first and unfiltered (build errors stay visible).
  cargo test --release --locked --no-run -p kubelt-protocol --bench core_sync
  unshare -n -- sh -c 'ip link set lo up && exec cargo test --release --locked --offline -p kubelt-protocol --bench core_sync' 2>&1 | grep -E "nodes:|rror"
fi
if [ "$what" = all ] || [ "$what" = healing ]; then
  log "healing: partitions of 6 nodes, time from the heal to convergence"
  cd "$KUBELT_ROOT"
  cargo test --release --locked --no-run -p kubelt-protocol --bench healing
  unshare -n -- sh -c 'ip link set lo up && exec cargo test --release --locked --offline -p kubelt-protocol --bench healing' 2>&1 | grep -E "healing:|rror"
fi
if [ "$what" = all ] || [ "$what" = msg ]; then
  log "msg: delivery latency and messages/s, two nodes"
  cd "$KUBELT_ROOT"
  cargo test --release --locked --no-run -p kubelt-protocol --bench msg
  unshare -n -- sh -c 'ip link set lo up && exec cargo test --release --locked --offline -p kubelt-protocol --bench msg' 2>&1 | grep -E "latency|throughput|rror"
  unshare -n -- sh -c 'ip link set lo up && exec cargo test --release --locked --offline -p kubelt-node --test app_api -- --ignored --nocapture bench_app_send_message' 2>&1 | grep -E "app API|rror|panicked"
fi
if [ "$what" = all ] || [ "$what" = app ]; then
  log "app: kb_setData / kb_getData, 16 clients"
  cd "$KUBELT_ROOT"
  unshare -n -- sh -c 'ip link set lo up && exec cargo test --release --locked --offline -p kubelt-node --test app_api -- --ignored --nocapture bench_app_api' 2>&1 | grep -E "app API|rror|panicked"
fi
if [ "$what" = all ] || [ "$what" = hosted ]; then
  log "hosted: 10,000 cores and 1,000 cores x 100 changes: start-up, memory, cold login + write"
  cd "$KUBELT_ROOT"
  unshare -n -- sh -c 'ip link set lo up && exec cargo test --release --locked --offline -p kubelt-node --test hosted -- --ignored --nocapture --test-threads=1' 2>&1 | grep -E "hosted |generated|rror|panicked"
fi
if [ "$what" = all ] || [ "$what" = private ]; then
  log "private: core set/get, private vs plain namespace"
  cd "$KUBELT_ROOT"
  cargo test --release --locked --no-run -p kubelt-protocol --bench private
  unshare -n -- sh -c 'ip link set lo up && exec cargo test --release --locked --offline -p kubelt-protocol --bench private' 2>&1 | grep -E "private:|rror"
  log "private: 100 MiB add and kb_setData/kb_getData, private vs plain, through a node"
  unshare -n -- sh -c 'ip link set lo up && exec cargo test --release --locked --offline -p kubelt-node --test private_objects -- --ignored --nocapture bench_private' 2>&1 | grep -E "private |rror|panicked"
fi
if [ "$what" = all ] || [ "$what" = nat ]; then
  log "nat: two homes behind NATs and a relay: time to a direct connection, share direct, change latency"
  cd "$KUBELT_ROOT"
  # The test builds its own namespaces (routers, homes, the "internet") inside this one.
  unshare -n -- sh -c 'ip link set lo up && exec cargo test --release --locked --offline -p kubelt-node --test nat -- --ignored --nocapture bench_nat_traversal' 2>&1 | grep -E "^NAT |rror|panicked"
fi
