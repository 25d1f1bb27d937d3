//! Healing after a partition (issue 16): how long after the network comes back every node holds
//! every write made apart, run after run.
//!
//! Six nodes in one process on the memory transport ([`Cluster`]) hold one core, a delegated
//! writer in each half. The cut is made by every node blocking the other half's peers
//! (connections close; redials are refused), both halves write during it, and it holds for
//! `HEAL_BENCH_PARTITION_SECS` (15 s). The heal lifts the blocks and does nothing else. Unlike
//! the tests, the nodes run with the default timers (a 10 s connection maintenance tick, a
//! periodic catch-up round every 30 s), so what heals the network is what heals it for users:
//! the catch-up scheduler dialing its lost replicas again and catching up when they are back.
//! The docker testnet's `partition` scenario measures the same on real TCP, where a cut drops
//! packets and tells nobody.
//!
//! `scripts/bench.sh healing`, or `cargo test --release -p kubelt-protocol --bench healing`
//! (env: `HEAL_BENCH_RUNS` = 10, `HEAL_BENCH_PARTITION_SECS` = 15). Goal: < 3 s in every run.

use std::time::{Duration, Instant};

use kubelt_protocol::node::Config;
use kubelt_protocol::testing::Cluster;
use serde_json::json;

/// Nodes in each half; node 0 writes in the first half, node `HALF` in the second.
const HALF: usize = 3;
/// Writes each half makes during the cut.
const WRITES_PER_SIDE: usize = 5;
/// Longest wait for anything in a run (a failed heal fails the benchmark).
const BOUND: Duration = Duration::from_secs(60);

/// One partition and heal; returns the time from the heal to every node holding every write
/// with identical heads.
async fn run_once(partition: Duration) -> anyhow::Result<Duration> {
    let mut cluster = Cluster::empty()?;
    let defaults = Config::default();
    for _ in 0..2 * HALF {
        cluster
            .add(|c| {
                c.maintenance_interval = defaults.maintenance_interval;
                c.core_sync_interval = defaults.core_sync_interval;
            })
            .await?;
    }
    let all: Vec<usize> = (0..2 * HALF).collect();
    cluster.hold_core(&[0, HALF], BOUND).await?;
    cluster.set(0, "before", json!(true)).await?;
    cluster.converged(&all, BOUND).await?;

    let (left, right) = all.split_at(HALF);
    let cut_at = Instant::now();
    cluster.partition(left, right, BOUND).await?;
    for i in 1..=WRITES_PER_SIDE {
        cluster.set(left[0], &format!("left{i}"), json!(i)).await?;
        cluster.set(right[0], &format!("right{i}"), json!(i)).await?;
    }
    let apart = cluster.converged(left, BOUND).await?.changes;
    tokio::time::sleep(partition.saturating_sub(cut_at.elapsed())).await;

    let healed_at = Instant::now();
    cluster.heal().await?;
    let healed = cluster.converged(&all, BOUND).await?;
    let took = healed_at.elapsed();
    anyhow::ensure!(healed.changes == apart + WRITES_PER_SIDE, "after the heal: {} changes, expected {}", healed.changes, apart + WRITES_PER_SIDE);
    cluster.shutdown().await;
    Ok(took)
}

fn main() -> anyhow::Result<()> {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_writer(std::io::stderr).init();
    }
    let env = |name: &str, default: u64| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let runs = env("HEAL_BENCH_RUNS", 10);
    let partition = Duration::from_secs(env("HEAL_BENCH_PARTITION_SECS", 15));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut times = Vec::new();
    for run in 1..=runs {
        let took = runtime.block_on(run_once(partition))?;
        println!("healing: run {run}/{runs}: every node held every write {:.2} s after the heal", took.as_secs_f64());
        times.push(took);
    }
    times.sort();
    let under = times.iter().filter(|t| **t < Duration::from_secs(3)).count();
    println!(
        "healing: {} nodes, {:?} partitions: after the heal every node held every write in p50 {:.2} s, max {:.2} s; {under} of {runs} runs under 3 s (goal: all)",
        2 * HALF,
        partition,
        times[times.len() / 2].as_secs_f64(),
        times.last().map_or(0.0, |t| t.as_secs_f64())
    );
    Ok(())
}
