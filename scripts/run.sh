#!/usr/bin/env bash
# Runs a kubelt node on this machine: installs what is missing, builds in release mode, creates
# the repo with defaults if there is none, and starts the node in the foreground. It prints its
# peer id, its addresses, the API URL and the gateway URL. Ctrl-C stops it cleanly.
#   scripts/run.sh [kubelt run flags...]     e.g. --peer /ip4/.../p2p/12D3Koo... or --bootstrap
# The repo is ~/.kubelt, or $KUBELT_REPO.
set -euo pipefail
source "$(dirname "$0")/common.sh"
"$KUBELT_ROOT/scripts/setup.sh"
build_release
exec "$KUBELT_BIN" run --init "$@"
