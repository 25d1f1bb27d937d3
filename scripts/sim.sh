#!/usr/bin/env bash
# A seeded simulation of many nodes in one process (issue 17): the real kubelt-protocol swarm
# on libp2p's memory transport, each node with an in-memory store.
#   scripts/sim.sh --nodes N [--seed S] [--replicas R] [--writes W] [--cores C] [--lookups L]
#                  [--settle SECONDS]   # idle wait before counting connections (default: the
#                                       # swarm's idle timeout + 5 s, so unkept ones closed)
#                  [--ping-interval SECONDS] [--heartbeat MS]  # the nodes' ping interval and
#                                       # gossipsub heartbeat (default: the node's, 5 s and
#                                       # 500 ms); longer ones cut what idle nodes cost
#                  [--idle-timeout SECONDS]  # how long connections nobody keeps (DHT peers) stay
#                                       # open idle (default: the node's, 30 s); ~150 KB each
#                  [--bootstrap-interval SECONDS]  # Kademlia's periodic bootstrap (default: the
#                                       # node's, 300 s); 1,000 nodes bootstrapping every 5 min
#                                       # on 2 cores cost ~1,300 handshakes a second
#   scripts/sim.sh --sweep 100,300,1000 [--out docs]  # each size in its own process, then
#                                                     # docs/sim.json and the chart docs/sim.png
# The last stdout line is one JSON object (nodes, lookup_hops_p50, lookup_success_rate,
# propagation_p99_ms, replicas_converged, gossip_bytes_per_node_per_change, ...).
# Everything runs on the machine's cores: use `nice` on a shared machine. RUST_LOG=warn shows
# the nodes' warnings on stderr.
set -euo pipefail
source "$(dirname "$0")/common.sh"
log "building kubelt-sim (release; target dir $CARGO_TARGET_DIR)"
(cd "$KUBELT_ROOT" && cargo build --release --locked -p kubelt-sim --bin kubelt-sim)
cd "$KUBELT_ROOT"
exec "$CARGO_TARGET_DIR/release/kubelt-sim" "$@"
