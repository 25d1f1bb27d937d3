//! A node that holds many cores (issue 12 "Personal and hosted", issue 16 "many cores"):
//! start-up time, resident memory, and a wallet's login plus first write on a cold core. These
//! are benchmarks (ignored here; `scripts/bench.sh hosted` runs them), plus one test that a
//! hosted node keeps only a bounded number of replicas in memory and still serves every core.
//!
//! The cores are generated straight into the repo's database with the library (each owner a
//! fresh wallet delegating the node's key, then a few changes), on several threads so RocksDB
//! groups their synced writes: 10,000 cores take seconds, not the hours that logins would.
//! With `KUBELT_BENCH_BASELINE=<path to another kubelt binary>` (e.g. the build of `main`) every
//! figure is measured for that binary too, on the same repo, and printed side by side.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use common::{baseline_binary, other_binary, rss_bytes, TestNode};
use kubelt_protocol::core::{Config, Cores, DevWallet};
use kubelt_protocol::store::Store;
use serde_json::{json, Value};

const ORIGIN: &str = "https://notes.example";
const LISTEN: [&str; 2] = ["--listen", "/ip4/127.0.0.1/tcp/0"];

/// Writes `cores` cores of `changes` changes each into the (stopped) node's repo; returns the
/// owners' wallets, in the order written.
fn generate(repo: &Path, cores: usize, changes: usize) -> anyhow::Result<Vec<DevWallet>> {
    let key = libp2p::identity::Keypair::from_protobuf_encoding(&std::fs::read(repo.join("node.key"))?)?;
    let peer = key.public().to_peer_id();
    let store = Store::open(repo.join("datastore"))?;
    let threads = 16;
    let started = Instant::now();
    let owners: Vec<Vec<DevWallet>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (store, key) = (store.clone(), key.clone());
                scope.spawn(move || -> anyhow::Result<Vec<DevWallet>> {
                    let mut config = Config::default();
                    config.sync_local_writes = false;
                    config.max_loaded_cores = 2;
                    let mut held = Cores::load(store, config)?;
                    let mut owners = Vec::new();
                    for i in (t..cores).step_by(threads) {
                        let owner = DevWallet::random();
                        let now = time::OffsetDateTime::now_utc();
                        let delegation = owner.delegate(&peer, &["*"], Duration::from_secs(365 * 86_400), now)?;
                        let replica = held.own(delegation.clone())?;
                        for c in 0..changes {
                            replica.set("data", &format!("k{}", c % 16), &json!({"core": i, "change": c, "text": "a few words of an app"}), &key, &delegation)?;
                        }
                        owners.push(owner);
                    }
                    Ok(owners)
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().map_err(|_| anyhow::anyhow!("a generator panicked"))?).collect::<anyhow::Result<_>>()
    })?;
    store.sync_wal()?;
    store.flush()?;
    eprintln!("generated {cores} cores x {changes} changes in {:.1} s", started.elapsed().as_secs_f64());
    Ok(owners.into_iter().flatten().collect())
}

fn post(node: &TestNode, token: Option<&str>, method: &str, params: Value) -> anyhow::Result<Value> {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(60)).build();
    let mut request = agent.post(node.app_url()).set("Content-Type", "application/json").set("Origin", ORIGIN);
    if let Some(token) = token {
        request = request.set("Authorization", &format!("Bearer {token}"));
    }
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).to_string();
    let reply: Value = match request.send_string(&body) {
        Ok(r) => r.into_json()?,
        Err(ureq::Error::Status(_, r)) => r.into_json()?,
        Err(e) => return Err(e.into()),
    };
    match reply.get("error") {
        Some(error) => bail!("{method} failed: {error}"),
        None => Ok(reply["result"].clone()),
    }
}

/// Signs `owner` in and writes once; returns how long both took.
fn login_and_write(node: &TestNode, owner: &DevWallet) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let address = owner.address().to_checksum();
    let nonce = post(node, None, "kb_getNonce", json!([address, {"notes": ["read", "write"]}]))?;
    let message = nonce["message"].as_str().context("no message")?;
    let signature = format!("0x{}", hex::encode(owner.sign(message)?));
    let session = post(node, None, "kb_verifyNonce", json!([nonce["nonce"], signature]))?;
    let token = session["token"].as_str().context("no token")?;
    post(node, Some(token), "kb_setData", json!(["notes", "first", {"text": "hello"}]))?;
    Ok(started.elapsed())
}

/// What one binary did on one repo.
struct Figures {
    startup: Duration,
    rss_started: u64,
    rss_after: u64,
    cold_p50: Duration,
    cold_p99: Duration,
    cold: usize,
}

/// Starts `bin` (this build when `None`) on `repo` as a hosted node, measures start-up and
/// memory, then signs in and writes on `cold` cores never used since the start.
fn measure(repo: &Path, bin: Option<&Path>, owners: &[DevWallet], cold: usize, round: usize) -> anyhow::Result<Figures> {
    let wrapper = bin.map(other_binary).unwrap_or_default();
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let (mut node, startup) = TestNode::start_timed(repo, "hosted", &wrapper, &LISTEN, &["--hosted"], Duration::from_secs(600))?;
    let pid = node.pid().context("no pid")?;
    // Settle: the event loop subscribes to every core's topic after the API is up.
    std::thread::sleep(Duration::from_secs(3));
    let rss_started = rss_bytes(pid)?;
    // Cores spread over the list, a different set each round, none used since the start.
    let step = (owners.len() / cold).max(1);
    let mut latencies = Vec::new();
    for i in 0..cold {
        let owner = &owners[(i * step + round) % owners.len()];
        latencies.push(login_and_write(&node, owner)?);
    }
    latencies.sort();
    let rss_after = rss_bytes(pid)?;
    node.stop()?;
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    Ok(Figures { startup, rss_started, rss_after, cold_p50: at(0.5), cold_p99: at(0.99), cold })
}

fn report(label: &str, cores: usize, changes: usize, f: &Figures) {
    println!(
        "hosted {cores} cores x {changes} changes [{label}]: start-up {:.2} s, RSS {:.0} MiB after start, {:.0} MiB after {} cold logins; \
         login + first write on a cold core p50 {:.1} ms, p99 {:.1} ms",
        f.startup.as_secs_f64(),
        f.rss_started as f64 / (1 << 20) as f64,
        f.rss_after as f64 / (1 << 20) as f64,
        f.cold,
        f.cold_p50.as_secs_f64() * 1e3,
        f.cold_p99.as_secs_f64() * 1e3,
    );
}

fn bench(cores: usize, changes: usize, cold: usize) -> anyhow::Result<()> {
    let cores = std::env::var("KUBELT_BENCH_CORES").ok().and_then(|s| s.parse().ok()).unwrap_or(cores);
    let dir = tempfile::tempdir_in(std::env::var_os("KUBELT_BENCH_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir))?;
    let repo = dir.path().join("hosted");
    let baseline = baseline_binary();
    common::init_with(&repo, baseline.as_deref())?;
    for (from, to) in [
        ("cores = 1000", "cores = 1000000"),
        ("logins_per_minute_per_ip = 20", "logins_per_minute_per_ip = 1000000"),
    ] {
        common::edit_config(&repo, from, to)?;
    }
    let owners = generate(&repo, cores, changes)?;
    // The baseline first (an older binary reads the repo as it was generated), then this build.
    if let Some(bin) = &baseline {
        // A baseline that cannot serve is a figure too (main's node with 10,000 cores did not
        // answer within a minute of opening its API).
        match measure(&repo, Some(bin), &owners, cold, 1) {
            Ok(f) => report("baseline", cores, changes, &f),
            Err(e) => println!("hosted {cores} cores x {changes} changes [baseline]: failed: {}", format!("{e:#}").lines().next().unwrap_or("")),
        }
    }
    let f = measure(&repo, None, &owners, cold, 0)?;
    report("this build", cores, changes, &f);
    Ok(())
}

#[test]
#[ignore = "benchmark: scripts/bench.sh hosted"]
fn bench_hosted_node_with_10k_cores() -> anyhow::Result<()> {
    bench(10_000, 3, 200)
}

#[test]
#[ignore = "benchmark: scripts/bench.sh hosted"]
fn bench_node_with_1k_cores_of_100_changes() -> anyhow::Result<()> {
    bench(1_000, 100, 100)
}
