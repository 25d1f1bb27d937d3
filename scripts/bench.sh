#!/usr/bin/env bash
# Benchmarks, each side by side with its baseline where there is one. Run on a quiet machine:
# the benchmarks compete for the 2 cores with anything else.
#   scripts/bench.sh [network]     (default: all)
# network: time from `kubelt run` to the first connected peer; RSS of a node idle for 60 s with
#          5 peers (goal < 40 MB). Set KUBELT_BENCH_IDLE_SECS to shorten the idle wait.
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
