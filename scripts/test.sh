#!/usr/bin/env bash
# Runs the whole test suite: unit tests, multi-process and in-process multi-node tests, and the
# Kubo interop tests (a real Kubo, on loopback only, inside a private network namespace).
# Installs what is missing first. Everything is built once, in the release profile.
#
# Without Kubo the interop tests fail (scripts/setup.sh --test installs it). To run without it
# on purpose, set KUBELT_SKIP_KUBO=1: those tests are then skipped, and counted as skipped.
# The browser test of the notes app needs Chromium, chromium-driver, selenium and eth-account
# (installed by setup.sh too); KUBELT_SKIP_BROWSER=1 skips it on purpose, counted as skipped.
# The last line is the tally: `tests: N passed, N failed, N skipped`.
set -euo pipefail
source "$(dirname "$0")/common.sh"
if [ "${KUBELT_SKIP_KUBO:-}" = "1" ]; then
  log "KUBELT_SKIP_KUBO=1: the Kubo interop tests are skipped where Kubo is missing"
  "$KUBELT_ROOT/scripts/setup.sh" --test-no-kubo
else
  "$KUBELT_ROOT/scripts/setup.sh" --test
fi
cd "$KUBELT_ROOT"
start=$(date +%s)
log "building the tests (release profile)"
cargo test --release --locked --workspace --no-run
KUBO_SO="${KUBO_SO:-$(kubo_so)}"
export KUBO_SO
export KUBO_PEER="${KUBO_PEER:-$KUBELT_ROOT/../shared/tools/kubo_peer.py}"
# --no-fail-fast: every test binary runs even after one fails, so that the tally is complete.
run_tests=(cargo test --release --locked --offline --workspace --no-fail-fast -- --test-threads="${KUBELT_TEST_THREADS:-2}")
output="$(mktemp)"
# Tests that skip (KUBELT_SKIP_KUBO=1, KUBELT_SKIP_BROWSER=1) write one line each here.
KUBELT_SKIP_LOG="$(mktemp)"
export KUBELT_SKIP_LOG
trap 'rm -f "$output" "$KUBELT_SKIP_LOG"' EXIT
# The tests run in a private network namespace with only loopback up: nothing they start (our
# nodes, Kubo) can reach any other address. Tests that would make one for themselves are told
# they are in one already (KUBELT_IN_NETNS).
set +e
if unshare -n true 2>/dev/null; then
  log "running the tests in a private network namespace (loopback only)"
  KUBELT_IN_NETNS=1 unshare -n -- sh -c 'ip link set lo up && exec "$@"' sh "${run_tests[@]}" 2>&1 | tee "$output"
else
  log "cannot create a network namespace here; running the tests on this host's loopback"
  "${run_tests[@]}" 2>&1 | tee "$output"
fi
status=${PIPESTATUS[0]}
set -e
# Only the harness's own result lines count (anchored: a test's output quoting one does not).
count() { awk -v what="$1" '/^test result: / { for (i = 1; i < NF; i++) if ($(i + 1) ~ "^" what) s += $i } END { print s + 0 }' "$output"; }
passed=$(count passed)
failed=$(count failed)
skipped=$(grep -c '' "$KUBELT_SKIP_LOG" || true)
# A skipped test returned Ok, so the harness counted it as passed.
passed=$((passed - skipped))
summary="tests: $passed passed, $failed failed, $skipped skipped"
echo "$summary" > "$CARGO_TARGET_DIR/kubelt-test-summary.txt"
if [ "$skipped" -gt 0 ]; then
  log "skipped on purpose (KUBELT_SKIP_KUBO=1 or KUBELT_SKIP_BROWSER=1):"
  sed 's/^/    /' "$KUBELT_SKIP_LOG" >&2
fi
[ "$status" -eq 0 ] || { log "tests FAILED"; echo "$summary"; exit "$status"; }
if [ $((passed + failed + skipped)) -eq 0 ]; then
  log "no test ran: the run proves nothing"
  echo "$summary"
  exit 1
fi
log "tests passed in $(( $(date +%s) - start ))s"
echo "$summary"
