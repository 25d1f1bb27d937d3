#!/usr/bin/env bash
# Runs the whole test suite: unit tests, multi-process and in-process multi-node tests, and the
# Kubo interop tests (a real Kubo, on loopback only, inside a private network namespace).
# Installs what is missing first. Everything is built once, in the release profile.
set -euo pipefail
source "$(dirname "$0")/common.sh"
"$KUBELT_ROOT/scripts/setup.sh" --test
cd "$KUBELT_ROOT"
start=$(date +%s)
log "building the tests (release profile)"
cargo test --release --locked --workspace --no-run
KUBO_SO="$(kubo_so)"
export KUBO_SO
export KUBO_PEER="${KUBO_PEER:-$KUBELT_ROOT/../shared/tools/kubo_peer.py}"
run_tests=(cargo test --release --locked --offline --workspace -- --test-threads="${KUBELT_TEST_THREADS:-2}")
# The tests run in a private network namespace with only loopback up: nothing they start (our
# nodes, Kubo) can reach any other address.
output="$(mktemp)"
trap 'rm -f "$output"' EXIT
if unshare -n true 2>/dev/null; then
  log "running the tests in a private network namespace (loopback only)"
  unshare -n -- sh -c 'ip link set lo up && exec "$@"' sh "${run_tests[@]}" 2>&1 | tee "$output"
else
  log "cannot create a network namespace here; running the tests on this host's loopback"
  "${run_tests[@]}" 2>&1 | tee "$output"
fi
status=${PIPESTATUS[0]}
passed=$(grep -o 'test result: [a-zA-Z]*\. [0-9]* passed' "$output" | awk '{s += $4} END {print s + 0}')
failed=$(grep -o '; [0-9]* failed' "$output" | awk '{s += $2} END {print s + 0}')
summary="tests: $passed passed, $failed failed"
echo "$summary" > "$CARGO_TARGET_DIR/kubelt-test-summary.txt"
[ "$status" -eq 0 ] || { log "tests FAILED"; echo "$summary"; exit "$status"; }
log "tests passed in $(( $(date +%s) - start ))s"
echo "$summary"
