//! Helpers for tests that run real `kubelt` processes on 127.0.0.1.
#![allow(dead_code)]

pub mod app;
pub mod kubo;
pub mod netns;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

/// The `kubelt` binary cargo built for these tests.
pub fn kubelt_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kubelt"))
}

/// Runs `kubelt --repo REPO ARGS...` to completion.
pub fn kubelt(repo: &Path, args: &[&str]) -> anyhow::Result<Output> {
    Ok(Command::new(kubelt_bin()).arg("--repo").arg(repo).args(args).env("RUST_LOG", "warn").output()?)
}

/// Text of a finished command, for assertion messages.
pub fn describe(output: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[allow(unused_imports)]
pub use kubelt_protocol::testing::pseudo_random;

/// A TCP port that was free a moment ago, for nodes that must come back on the same address.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Runs a kubelt command that must succeed and returns its trimmed stdout.
pub fn kubelt_ok(repo: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = kubelt(repo, args)?;
    if !out.status.success() {
        bail!("kubelt {args:?} failed: {}", describe(&out));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Waits until `check` returns `Ok(true)` or the deadline passes.
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut last_error = None;
    while start.elapsed() < timeout {
        match check() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_error = Some(e),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("timed out after {timeout:?} waiting for {what} (last error: {last_error:?})")
}

/// Bitswap counters of a running node.
pub fn bitswap_stat(node: &TestNode, field: &str) -> anyhow::Result<u64> {
    node.call("node_status", Value::Null)?["bitswap"][field].as_u64().context("no such bitswap counter")
}

/// Starts a node in DHT client mode that keeps one connection (to `boot`): DHT servers never
/// list it, so no other node learns about it, and it learns about no other node, except through
/// provider records. Two such nodes can only meet through what the DHT tells them.
pub fn start_dht_client(dir: &Path, name: &str, boot: &TestNode) -> anyhow::Result<TestNode> {
    let repo = dir.join(name);
    kubelt_ok(&repo, &["init"])?;
    edit_config(&repo, "target_peers = 16", "target_peers = 1")?;
    edit_config(&repo, "dht_mode = \"auto\"", "dht_mode = \"client\"")?;
    TestNode::start_on(&repo, name, &["--peer", &boot.tcp_addr()])
}

/// Replaces `from` with `to` in a repo's `config.toml`, failing when `from` is not there (so a
/// renamed key cannot silently leave the default in place).
pub fn edit_config(repo: &Path, from: &str, to: &str) -> anyhow::Result<()> {
    let path = repo.join("config.toml");
    let config = std::fs::read_to_string(&path)?;
    if !config.contains(from) {
        bail!("{} has no '{from}'", path.display());
    }
    std::fs::write(&path, config.replace(from, to))?;
    Ok(())
}

/// A wrapper for [`TestNode::start_wrapped`] that runs another `kubelt` binary instead of this
/// build's (a benchmark's baseline, e.g. the binary of `main`): `sh -c 'shift; exec BIN "$@"'`.
pub fn other_binary(bin: &Path) -> Vec<String> {
    vec!["sh".into(), "-c".into(), format!("shift; exec '{}' \"$@\"", bin.display()), "sh".into()]
}

/// `kubelt init` of `repo` by `bin` (this build's binary when `None`): an older binary refuses
/// the keys a newer `config.toml` has, while a newer one reads an older file.
pub fn init_with(repo: &Path, bin: Option<&Path>) -> anyhow::Result<()> {
    let out = Command::new(bin.map(Path::to_path_buf).unwrap_or_else(kubelt_bin)).arg("--repo").arg(repo).arg("init").output()?;
    if !out.status.success() {
        bail!("init failed: {}", describe(&out));
    }
    Ok(())
}

/// The baseline binary of a benchmark, from `KUBELT_BENCH_BASELINE`, if set.
pub fn baseline_binary() -> Option<PathBuf> {
    std::env::var_os("KUBELT_BENCH_BASELINE").map(PathBuf::from).filter(|p| p.exists())
}

/// Resident memory of a process (VmRSS), in bytes.
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")?;
    Ok(kib * 1024)
}

/// CPU time (user + system) a process used so far, in seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("bad /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|u| u.parse().ok()).unwrap_or(0) + fields.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf only reads a constant of the system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

/// A `kubelt run` process with its own repo, listening on loopback only.
pub struct TestNode {
    pub name: String,
    pub repo: PathBuf,
    child: Option<Child>,
    pub peer_id: String,
    pub addresses: Vec<String>,
    api_url: String,
    gateway_url: String,
    app_url: String,
    secret: String,
    agent: ureq::Agent,
}

impl TestNode {
    /// Creates a repo under `dir/name` and starts a node on it.
    pub fn start(dir: &Path, name: &str, extra: &[&str]) -> anyhow::Result<TestNode> {
        let repo = dir.join(name);
        if !repo.join("config.toml").exists() {
            let out = kubelt(&repo, &["init"])?;
            if !out.status.success() {
                bail!("init failed: {}", describe(&out));
            }
        }
        Self::start_on(&repo, name, extra)
    }

    /// Starts a node on an existing repo.
    pub fn start_on(repo: &Path, name: &str, extra: &[&str]) -> anyhow::Result<TestNode> {
        Self::start_with(repo, name, &["--listen", "/ip4/127.0.0.1/tcp/0", "--listen", "/ip4/127.0.0.1/udp/0/quic-v1"], extra)
    }

    /// Starts a node on an existing repo with the given listen flags.
    pub fn start_with(repo: &Path, name: &str, listen: &[&str], extra: &[&str]) -> anyhow::Result<TestNode> {
        Self::start_wrapped(repo, name, &[], listen, extra)
    }

    /// Starts a node on an existing repo as `WRAPPER... kubelt ...` (e.g. under `strace -o F`):
    /// the node's process is then a child of `wrapper[0]`, see [`TestNode::wrapped_pid`].
    pub fn start_wrapped(repo: &Path, name: &str, wrapper: &[&str], listen: &[&str], extra: &[&str]) -> anyhow::Result<TestNode> {
        Self::start_timed(repo, name, wrapper, listen, extra, Duration::from_secs(30)).map(|(node, _)| node)
    }

    /// [`TestNode::start_wrapped`] that waits up to `timeout` and also returns how long the node
    /// took from spawning to serving its APIs (polled every 10 ms: a start-up benchmark).
    pub fn start_timed(repo: &Path, name: &str, wrapper: &[&str], listen: &[&str], extra: &[&str], timeout: Duration) -> anyhow::Result<(TestNode, Duration)> {
        let _ = std::fs::remove_file(repo.join("api"));
        let log = std::fs::File::create(repo.join("node.log"))?;
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(kubelt_bin());
                command
            }
            None => Command::new(kubelt_bin()),
        };
        let child = command
            .arg("--repo")
            .arg(repo)
            .arg("run")
            .args(listen)
            .args(["--api", "127.0.0.1:0", "--gateway", "127.0.0.1:0"])
            // A test that restarts a node whose app a browser has open keeps its app port.
            .args(if extra.contains(&"--app-api") { &[][..] } else { &["--app-api", "127.0.0.1:0"][..] })
            .args(extra)
            .env("RUST_LOG", std::env::var("KUBELT_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start kubelt")?;
        let mut node = TestNode {
            name: name.to_string(),
            repo: repo.to_path_buf(),
            child: Some(child),
            peer_id: String::new(),
            addresses: vec![],
            api_url: String::new(),
            gateway_url: String::new(),
            app_url: String::new(),
            secret: String::new(),
            agent: ureq::AgentBuilder::new().timeout(Duration::from_secs(60)).build(),
        };
        let spawned = Instant::now();
        let api_file = repo.join("api");
        loop {
            if let Some(child) = node.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("{name} exited with {status}: {}", node.log());
                }
            }
            if api_file.exists() && repo.join("app").exists() {
                break;
            }
            if spawned.elapsed() > timeout {
                bail!("timed out after {timeout:?} waiting for {name} to serve its API: {}", node.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let started = spawned.elapsed();
        node.api_url = std::fs::read_to_string(&api_file)?.trim().to_string();
        node.gateway_url = std::fs::read_to_string(repo.join("gateway"))?.trim().to_string();
        node.secret = std::fs::read_to_string(repo.join("api.cookie"))?.trim().to_string();
        node.app_url = std::fs::read_to_string(repo.join("app"))?.trim().to_string();
        let info = node.call("node_id", Value::Null)?;
        node.peer_id = info["peer_id"].as_str().unwrap_or_default().to_string();
        node.addresses = info["addresses"].as_array().into_iter().flatten().filter_map(|a| a.as_str().map(String::from)).collect();
        Ok((node, started))
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.repo.join("node.log")).unwrap_or_default()
    }

    /// The TCP address of the node, with its peer id.
    pub fn tcp_addr(&self) -> String {
        self.addresses.iter().find(|a| a.contains("/tcp/")).cloned().unwrap_or_default()
    }

    /// Sends a raw HTTP request body to the API with an optional secret.
    pub fn post_raw(&self, body: &str, secret: Option<&str>) -> anyhow::Result<(u16, Value)> {
        let mut request = self.agent.post(&self.api_url).set("Content-Type", "application/json");
        if let Some(secret) = secret {
            request = request.set("Authorization", &format!("Bearer {secret}"));
        }
        match request.send_string(body) {
            Ok(r) => Ok((r.status(), r.into_json()?)),
            Err(ureq::Error::Status(code, r)) => Ok((code, r.into_json()?)),
            Err(e) => Err(e.into()),
        }
    }

    /// The admin API's base URL (JSON-RPC and /metrics).
    pub fn api_url(&self) -> &str {
        &self.api_url
    }

    /// The gateway's base URL (`<url>ipfs/<cid>`).
    pub fn gateway_url(&self) -> &str {
        &self.gateway_url
    }

    /// The app API's base URL (`kb_*`).
    pub fn app_url(&self) -> &str {
        &self.app_url
    }

    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// Calls a JSON-RPC method with the right secret; an error reply becomes an `Err`.
    pub fn call(&self, method: &str, params: Value) -> anyhow::Result<Value> {
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).to_string();
        let (_, reply) = self.post_raw(&body, Some(&self.secret))?;
        if let Some(error) = reply.get("error") {
            bail!("{method} failed: {error}");
        }
        Ok(reply["result"].clone())
    }

    /// Peer ids of the connected peers.
    pub fn connected_peers(&self) -> anyhow::Result<Vec<String>> {
        peer_ids(&self.call("swarm_peers", Value::Null)?)
    }

    /// Peer ids in the routing table.
    pub fn routing_table(&self) -> anyhow::Result<Vec<String>> {
        peer_ids(&self.call("dht_routingTable", Value::Null)?)
    }

    /// Stops the node with SIGTERM and waits for it; returns its exit code.
    pub fn stop(&mut self) -> anyhow::Result<Option<i32>> {
        Ok(self.stop_with(libc::SIGTERM)?.0)
    }

    /// Sends `signal` (SIGTERM, SIGINT as Ctrl-C does) and waits for the process to exit;
    /// returns its exit code (`None` when a signal killed it) and how long it took.
    pub fn stop_with(&mut self, signal: libc::c_int) -> anyhow::Result<(Option<i32>, Duration)> {
        let Some(mut child) = self.child.take() else { return Ok((None, Duration::ZERO)) };
        // SAFETY: kill(2) with a pid we own; no memory is touched.
        unsafe { libc::kill(child.id() as i32, signal) };
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok((status.code(), start.elapsed()));
            }
            if start.elapsed() > Duration::from_secs(20) {
                child.kill()?;
                bail!("{} did not stop within 20 s after signal {signal}", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the node with SIGKILL: no clean shutdown at all.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// The pid of the `kubelt` process a wrapper started (its only child), for signals that
    /// must reach the node itself rather than the wrapper.
    pub fn wrapped_pid(&self) -> anyhow::Result<i32> {
        let wrapper = self.child.as_ref().context("the node is not running")?.id();
        let children = std::fs::read_to_string(format!("/proc/{wrapper}/task/{wrapper}/children"))?;
        let mut pids = children.split_whitespace();
        match (pids.next(), pids.next()) {
            (Some(pid), None) => Ok(pid.parse()?),
            _ => bail!("expected one child of the wrapper {wrapper}, found '{}'", children.trim()),
        }
    }

    /// The process id of the running node (of its wrapper, for [`TestNode::start_wrapped`]).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().map(|c| matches!(c.try_wait(), Ok(None))).unwrap_or(false)
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn peer_ids(list: &Value) -> anyhow::Result<Vec<String>> {
    Ok(list
        .as_array()
        .context("expected a list of peers")?
        .iter()
        .filter_map(|p| p["peer_id"].as_str().map(String::from))
        .collect())
}

/// A test that cannot run here, opted out of on purpose with `variable=1`: the skip is shown
/// past the harness's capture and logged to `$KUBELT_SKIP_LOG` for `scripts/test.sh`'s tally
/// (as the Kubo tests do). Without the opt-out it is an error that says how to fix it.
pub fn skip_or_fail(variable: &str, test: &str, reason: &str, fix: &str) -> anyhow::Result<()> {
    use std::io::Write;
    if std::env::var(variable).map_or(true, |v| v != "1") {
        bail!("{test} cannot run: {reason}. {fix}, or set {variable}=1 to skip it on purpose");
    }
    let line = format!("SKIPPED {test}: {reason} ({variable}=1)");
    // `io::stderr()` is not the `eprintln!` that the harness captures.
    let _ = writeln!(std::io::stderr(), "\n*** {line} ***\n");
    if let Some(log) = std::env::var_os("KUBELT_SKIP_LOG") {
        if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
            // One write on an append-mode file: lines of parallel tests do not interleave.
            let _ = file.write_all(format!("{line}\n").as_bytes());
        }
    }
    Ok(())
}

/// Makes `node` a writer of the core `address`: `core delegate` for one day, signed with the dev
/// wallet at `key` and submitted.
pub fn delegate(node: &TestNode, address: &str, key: &Path) -> anyhow::Result<()> {
    let message = kubelt_ok(&node.repo, &["core", "delegate", address, "--expires", "1d"])?;
    let file = node.repo.join("delegation.siwe");
    std::fs::write(&file, message)?;
    let path = |p: &Path| p.to_str().map(str::to_owned).ok_or_else(|| anyhow::anyhow!("{} is not UTF-8", p.display()));
    kubelt_ok(&node.repo, &["core", "submit", "--message-file", &path(&file)?, "--sign-with", &path(key)?])?;
    Ok(())
}
