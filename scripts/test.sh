#!/usr/bin/env bash
# Runs the whole test suite: unit tests, multi-process and in-process multi-node tests, and the
# Kubo interop tests (a real Kubo, on loopback only, inside a private network namespace).
# Installs what is missing first. Everything is built once, in the release profile.
set -euo pipefail
source "$(dirname "$0")/common.sh"
"$KUBELT_ROOT/scripts/setup.sh" --test
cd "$KUBELT_ROOT"
log "building and running the tests (release profile)"
start=$(date +%s)
cargo test --release --locked --workspace -- --test-threads="${KUBELT_TEST_THREADS:-2}"
log "tests passed in $(( $(date +%s) - start ))s"
