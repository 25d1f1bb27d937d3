//! `kubelt-sim`: a seeded simulation of many Kubelt nodes in one process (issue 17).
//!
//! Every node is the real `kubelt_protocol::node::Node` (Kademlia, gossipsub, core sync,
//! bitswap, the event loop) on libp2p's memory transport with an in-memory store
//! (`Store::in_memory`). A run joins the nodes through a few bootstraps, spreads the replicas
//! of some cores at random, and measures DHT lookups, the propagation of changes to every
//! replica, the gossip each node carries, the same again after 10% of the nodes left and as
//! many joined, and what the nodes cost in memory and CPU. Its last stdout line is one JSON
//! object (see `run::Report`).
//!
//! `--sweep 50,100,200` runs each size in its own process (so that one run's memory does not
//! inflate the next one's) and writes every report to `<out>/sim.json` and a chart of each
//! metric against the size to `<out>/sim.png`.

mod chart;
mod plan;
mod run;
mod stats;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use clap::Parser;
use serde_json::Value;

use plan::{Params, Plan};

/// Seeded simulation of many Kubelt nodes in one process.
#[derive(Debug, Parser)]
#[command(name = "kubelt-sim", version)]
struct Args {
    /// Nodes at the start.
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Seed of the topology (keys, replicas, lookups, who leaves).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Replicas of each core.
    #[arg(long, default_value_t = 50)]
    replicas: usize,
    /// Changes written before the churn, and again after it.
    #[arg(long, default_value_t = 5)]
    writes: usize,
    /// Cores spread over the nodes.
    #[arg(long, default_value_t = 4)]
    cores: usize,
    /// DHT lookups before the churn, and again after it.
    #[arg(long, default_value_t = 100)]
    lookups: usize,
    /// Bootstrap nodes.
    #[arg(long, default_value_t = 3)]
    bootstraps: usize,
    /// Share of the nodes that leave mid-run (as many join).
    #[arg(long, default_value_t = 0.1)]
    churn: f64,
    /// Run these sizes one after the other (each in its own process) and chart them.
    #[arg(long, value_delimiter = ',')]
    sweep: Vec<usize>,
    /// Where a sweep writes sim.json and sim.png.
    #[arg(long, default_value = "docs")]
    out: PathBuf,
    /// Draw the chart of an earlier sweep's sim.json into <out>/sim.png, and run nothing.
    #[arg(long)]
    chart_from: Option<PathBuf>,
    /// Seconds to wait idle before counting connections and measuring idle cost (default: the
    /// swarm's idle timeout and 5 s).
    #[arg(long)]
    settle: Option<u64>,
    /// Worker threads of the runtime (default: the machine's cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Seconds between two pings of a connection (default: the node's, 5). Pings are most of
    /// what an idle node costs; a longer interval lets more nodes share the machine's cores.
    #[arg(long)]
    ping_interval: Option<u64>,
    /// Gossipsub heartbeat in milliseconds (default: the node's, 500).
    #[arg(long)]
    heartbeat: Option<u64>,
    /// Seconds a connection nobody keeps stays open idle (default: the node's, 30). Peers met
    /// through DHT queries hold such connections: each costs ~150 KB, which at 1,000 nodes is
    /// what memory runs out on.
    #[arg(long)]
    idle_timeout: Option<u64>,
    /// Seconds between two Kademlia bootstraps (random walks) of each node (default: the
    /// node's, 300). Each one queries ~20 peers, most of them new connections.
    #[arg(long)]
    bootstrap_interval: Option<u64>,
}

impl Args {
    fn params(&self, nodes: usize) -> Params {
        let defaults = Params::default();
        let idle_timeout_s = self.idle_timeout.unwrap_or(defaults.idle_timeout_s);
        Params {
            nodes,
            seed: self.seed,
            replicas: self.replicas,
            cores: self.cores,
            writes: self.writes,
            lookups: self.lookups,
            bootstraps: self.bootstraps,
            churn: self.churn,
            settle_s: self.settle.unwrap_or_else(|| plan::default_settle_s(idle_timeout_s)),
            ping_s: self.ping_interval.unwrap_or(defaults.ping_s),
            heartbeat_ms: self.heartbeat.unwrap_or(defaults.heartbeat_ms),
            idle_timeout_s,
            bootstrap_interval_s: self.bootstrap_interval.unwrap_or(defaults.bootstrap_interval_s),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "error".into()))
        .with_writer(std::io::stderr)
        .init();
    if let Some(json) = &args.chart_from {
        let sweep: Value = serde_json::from_str(&std::fs::read_to_string(json)?)?;
        let runs = sweep.get("runs").and_then(Value::as_array).context("no \"runs\" array")?;
        std::fs::create_dir_all(&args.out)?;
        return chart::draw(runs, &args.out.join("sim.png"));
    }
    if !args.sweep.is_empty() {
        return sweep(&args);
    }
    if args.nodes < 2 {
        bail!("a network needs at least 2 nodes");
    }
    let plan = Plan::new(&args.params(args.nodes));
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = args.threads {
        runtime.worker_threads(threads);
    }
    let report = runtime.enable_all().build()?.block_on(run::run(plan))?;
    println!(
        "nodes {}: lookups {:.0}% found, hops p50 {} p99 {}; propagation p50 {:.0} ms p99 {:.0} ms max {:.0} ms, converged {}; \
         gossip {:.0} B per replica per change, {} B at non-replicas; after churn ({} left, {} joined): lookups {:.0}% found, converged {}; \
         {:.1} connections per node (most {}), {:.2} opened per node per s idle, {:.0} KiB per node, peak RSS {:.0} MiB, idle CPU {:.2} s/s",
        report.nodes,
        report.lookup_success_rate * 100.0,
        report.lookup_hops_p50,
        report.lookup_hops_p99,
        report.propagation_p50_ms,
        report.propagation_p99_ms,
        report.propagation_max_ms,
        report.replicas_converged,
        report.gossip_bytes_per_node_per_change,
        report.non_replica_gossip_bytes,
        report.churn_left,
        report.churn_joined,
        report.churn_lookup_success_rate * 100.0,
        report.churn_replicas_converged,
        report.connections_per_node,
        report.connections_max,
        report.connections_opened_per_node_per_s_idle,
        report.cost.memory_per_node_kib,
        report.cost.peak_rss_mib,
        report.cost.cpu_per_second_idle,
    );
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Runs each size of `--sweep` in a child process, then writes the reports and the chart.
fn sweep(args: &Args) -> anyhow::Result<()> {
    let me = std::env::current_exe()?;
    let mut runs = Vec::new();
    for &nodes in &args.sweep {
        eprintln!("sim: sweep: {nodes} nodes");
        let mut child = Command::new(&me);
        child.args(["--nodes", &nodes.to_string(), "--seed", &args.seed.to_string(), "--replicas", &args.replicas.to_string()]);
        child.args(["--writes", &args.writes.to_string(), "--cores", &args.cores.to_string(), "--lookups", &args.lookups.to_string()]);
        child.args(["--bootstraps", &args.bootstraps.to_string(), "--churn", &args.churn.to_string()]);
        if let Some(threads) = args.threads {
            child.args(["--threads", &threads.to_string()]);
        }
        for (flag, value) in [("--settle", args.settle), ("--ping-interval", args.ping_interval), ("--heartbeat", args.heartbeat), ("--idle-timeout", args.idle_timeout), ("--bootstrap-interval", args.bootstrap_interval)] {
            if let Some(value) = value {
                child.args([flag, &value.to_string()]);
            }
        }
        let output = child.stderr(Stdio::inherit()).output()?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        print!("{stdout}");
        if !output.status.success() {
            bail!("the run of {nodes} nodes failed ({})", output.status);
        }
        let last = stdout.lines().rev().find(|l| !l.trim().is_empty()).context("a run printed nothing")?;
        runs.push(serde_json::from_str::<Value>(last).context("a run's last line is not JSON")?);
    }
    std::fs::create_dir_all(&args.out)?;
    let json = args.out.join("sim.json");
    std::fs::write(&json, serde_json::to_string_pretty(&serde_json::json!({ "runs": runs }))? + "\n")?;
    let png = args.out.join("sim.png");
    chart::draw(&runs, &png)?;
    eprintln!("sim: wrote {} and {}", json.display(), png.display());
    println!("{}", serde_json::json!({ "sweep": runs }));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The small case of issue 17, in the normal test suite: 50 nodes, a fixed seed. Every
    /// lookup finds a running replica, every change reaches every running replica (before
    /// and after 10% churn), the replicas did carry the changes' gossip and no node outside a
    /// core's replicas received any of it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fifty_nodes_find_every_core_and_only_replicas_carry_its_gossip() -> anyhow::Result<()> {
        let params = Params { nodes: 50, seed: 17, replicas: 10, cores: 2, writes: 3, lookups: 20, bootstraps: 3, churn: 0.1, settle_s: 0, ..Params::default() };
        let plan = Plan::new(&params);
        assert_eq!(plan, Plan::new(&params), "the same seed draws the same topology");
        let report = run::run(plan).await?;
        let json = serde_json::to_string(&report)?;
        assert_eq!(report.lookups, 40, "{json}");
        assert_eq!(report.lookup_success_rate, 1.0, "every lookup finds a running replica: {json}");
        assert_eq!(report.changes, 6, "{json}");
        assert!(report.replicas_converged, "every change reaches every running replica: {json}");
        assert!(report.churn_replicas_converged && report.churn_lookup_success_rate == 1.0, "{json}");
        assert_eq!(report.churn_left, 5, "{json}");
        assert!(report.gossip_messages_per_node_per_change >= 0.5, "the replicas carried the changes' gossip: {json}");
        assert!(report.change_bytes > 0.0, "{json}");
        assert_eq!(report.non_replica_gossip_messages, 0, "nodes outside a core's replicas carry none of its gossip: {json}");
        Ok(())
    }
}
