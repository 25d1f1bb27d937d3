//! A real Kubo (v0.22) peer driven through `shared/tools/kubo_peer.py` (JSON lines on stdin).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::Context;
use kubelt_protocol::testing::kubo;
use serde_json::{json, Value};

/// Where kubo_peer.py is: `$KUBO_PEER`, else `shared/tools/` beside the checkout.
fn script() -> PathBuf {
    std::env::var_os("KUBO_PEER")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/tools/kubo_peer.py"))
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
        if let Some(reason) = kubo::kubo_missing(&script()) {
            kubo::skip_or_fail(&test_name(), &reason).map_err(anyhow::Error::msg)?;
            return Ok(None);
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
