//! A network cut in two while every node keeps running, in one process on libp2p's memory
//! transport: six nodes hold one core, with a delegated writer in each half. The cut is made by
//! every node blocking the peers of the other half ([`Client::block_peer`]): connections close,
//! redials and incoming dials are refused. Both halves write during the cut; each converges on
//! its own and nothing crosses. Then the block is lifted and nothing else is done: the nodes
//! redial each other from their maintenance tick, and catch-up on reconnect must bring every
//! node every write, with identical heads.
//!
//! The periodic catch-up is set to an hour and nothing is written after the heal, so neither
//! the timer nor gossip can carry the writes of the cut: only the catch-up that starts when a
//! peer of the core comes back can.

use std::collections::HashSet;
use std::time::Duration;

use kubelt_protocol::core::{Address, DevWallet};
use kubelt_protocol::node::{Client, Config, CoreSummary, Node};
use kubelt_protocol::store::Store;
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use serde_json::{json, Value};
use tokio::time::Instant;

/// Nodes in each half; node 0 writes in the first half, node `HALF` in the second.
const HALF: usize = 3;
/// Writes each half makes during the cut.
const WRITES_PER_SIDE: usize = 3;
/// Changes that publish the two writers' messaging device keys.
const DEVICE_KEYS: usize = 2;
/// How often each node dials the known peers it is not connected to.
const MAINTENANCE: Duration = Duration::from_millis(200);
/// A generous bound on heal-to-convergence: this is a liveness check, not a benchmark.
const HEAL_BOUND: Duration = Duration::from_secs(30);

async fn start_node(dir: &std::path::Path, index: usize, port: u64) -> anyhow::Result<Node> {
    let store = Store::open(dir.join(format!("node{index}")))?;
    let config = Config {
        listen: vec![format!("/memory/{port}").parse()?],
        maintenance_interval: MAINTENANCE,
        core_sync_interval: Duration::from_secs(3600),
        ..Config::default()
    };
    Ok(Node::start(Keypair::generate_ed25519(), store, config).await?)
}

async fn summary(client: &Client) -> anyhow::Result<CoreSummary> {
    client.cores().list().await?.pop().ok_or_else(|| anyhow::anyhow!("the node holds no core"))
}

async fn connected(client: &Client) -> anyhow::Result<HashSet<PeerId>> {
    client.net().peers().await?.into_iter().map(|p| Ok(p.peer_id.parse()?)).collect()
}

/// The core summaries of `nodes` once they all hold `changes` changes with identical heads.
async fn converged(nodes: &[&Node], changes: usize, within: Duration, what: &str) -> anyhow::Result<Vec<String>> {
    let deadline = Instant::now() + within;
    loop {
        let mut summaries = Vec::new();
        for node in nodes {
            summaries.push(summary(&node.client).await?);
        }
        if summaries.iter().all(|s| s.changes == changes && s.heads == summaries[0].heads) {
            return Ok(summaries[0].heads.clone());
        }
        if Instant::now() >= deadline {
            let seen: Vec<_> = summaries.iter().map(|s| (s.changes, s.heads.len())).collect();
            anyhow::bail!("{what}: not converged on {changes} changes within {within:?}; (changes, heads) per node: {seen:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every node of `from` blocks (or unblocks) every node of `to`, and the other way round.
async fn set_cut(from: &[Node], to: &[Node], blocked: bool) -> anyhow::Result<()> {
    for a in from {
        for b in to {
            for (node, peer) in [(a, b.peer_id), (b, a.peer_id)] {
                if blocked {
                    node.client.net().block_peer(peer).await?;
                } else {
                    node.client.net().unblock_peer(peer).await?;
                }
            }
        }
    }
    Ok(())
}

async fn app(node: &Node, core: Address) -> anyhow::Result<Value> {
    Ok(node.client.cores().get(core, "app".into(), String::new()).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_halves_of_a_partition_write_and_every_node_holds_every_write_after_the_heal() -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_test_writer().try_init();
    let dir = tempfile::tempdir()?;
    let base = rand::random::<u32>() as u64 * 1000 + 1;
    let mut nodes = Vec::new();
    for i in 0..2 * HALF {
        nodes.push(start_node(dir.path(), i, base + i as u64).await?);
    }
    let wallet = DevWallet::random();
    let core = wallet.address();
    for (i, node) in nodes.iter().enumerate() {
        if i % HALF == 0 {
            let delegation = wallet.delegate(&node.peer_id, &["*"], Duration::from_secs(3600), time::OffsetDateTime::now_utc())?;
            node.client.cores().submit(delegation).await?;
        } else {
            node.client.cores().follow(core).await?;
        }
    }
    // A full mesh, and every node knows every other one holds the core.
    let mut addrs: Vec<Multiaddr> = Vec::new();
    for node in &nodes {
        addrs.push(node.client.info().await?.addresses[0].parse()?);
    }
    for (i, node) in nodes.iter().enumerate() {
        for addr in &addrs[..i] {
            node.client.net().connect(addr.clone()).await?;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for node in &nodes {
        while summary(&node.client).await?.replicas < 2 * HALF - 1 {
            anyhow::ensure!(Instant::now() < deadline, "a node does not see the core's five other replicas");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    nodes[0].client.cores().set(core, "app".into(), "before".into(), json!(true)).await?;
    let all: Vec<&Node> = nodes.iter().collect();
    // One write and the two writers' device keys (published with their delegations).
    converged(&all, 1 + DEVICE_KEYS, Duration::from_secs(20), "before the cut").await?;

    // The cut: every node keeps running; no connection crosses from now on.
    let (left, right) = nodes.split_at(HALF);
    set_cut(left, right, true).await?;
    for (half, other) in [(left, right), (right, left)] {
        let other: HashSet<PeerId> = other.iter().map(|n| n.peer_id).collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        for node in half {
            while !connected(&node.client).await?.is_disjoint(&other) {
                anyhow::ensure!(Instant::now() < deadline, "blocked peers are still connected 10 s after the cut");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    for i in 1..=WRITES_PER_SIDE {
        left[0].client.cores().set(core, "app".into(), format!("left{i}"), json!(i)).await?;
        right[0].client.cores().set(core, "app".into(), format!("right{i}"), json!(i)).await?;
    }
    let left_refs: Vec<&Node> = left.iter().collect();
    let right_refs: Vec<&Node> = right.iter().collect();
    let left_heads = converged(&left_refs, 1 + DEVICE_KEYS + WRITES_PER_SIDE, Duration::from_secs(20), "the left half alone").await?;
    let right_heads = converged(&right_refs, 1 + DEVICE_KEYS + WRITES_PER_SIDE, Duration::from_secs(20), "the right half alone").await?;
    assert_ne!(left_heads, right_heads);
    // Hold the cut through many maintenance ticks (each redials the peers it lost), then check
    // that nothing crossed: no connection, no change.
    tokio::time::sleep(MAINTENANCE * 10).await;
    for (half, other, mine, theirs) in [(left, right, "left", "right"), (right, left, "right", "left")] {
        let other_ids: HashSet<PeerId> = other.iter().map(|n| n.peer_id).collect();
        for node in half {
            assert!(connected(&node.client).await?.is_disjoint(&other_ids), "a connection crossed the cut");
            assert_eq!(summary(&node.client).await?.changes, 1 + DEVICE_KEYS + WRITES_PER_SIDE, "a change crossed the cut");
            let doc = app(node, core).await?;
            assert_eq!(doc[format!("{mine}1")], json!(1));
            assert_eq!(doc[format!("{theirs}1")], Value::Null, "the {theirs} half's write reached the {mine} half during the cut");
        }
    }

    // The heal: lift the blocks and do nothing else.
    let healed_at = Instant::now();
    set_cut(left, right, false).await?;
    let right_ids: HashSet<PeerId> = right.iter().map(|n| n.peer_id).collect();
    let reconnect_watch = {
        let client = left[0].client.clone();
        tokio::spawn(async move {
            while healed_at.elapsed() < HEAL_BOUND {
                match connected(&client).await {
                    Ok(peers) if !peers.is_disjoint(&right_ids) => return format!("{:?}", healed_at.elapsed()),
                    Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    Err(e) => return format!("unknown ({e})"),
                }
            }
            "never".to_string()
        })
    };
    let heads = converged(&all, 1 + DEVICE_KEYS + 2 * WRITES_PER_SIDE, HEAL_BOUND, "after the heal").await?;
    let took = healed_at.elapsed();
    let reconnected = reconnect_watch.await?;
    println!(
        "partition healed: {} nodes hold all {} changes with identical heads {took:?} after the blocks were lifted \
         (node 0 reconnected across the cut after {reconnected})",
        nodes.len(),
        1 + DEVICE_KEYS + 2 * WRITES_PER_SIDE
    );
    assert_eq!(heads.len(), 2, "the two halves' histories merge into two concurrent heads");
    for node in &nodes {
        let doc = app(node, core).await?;
        assert_eq!(doc["before"], json!(true));
        for i in 1..=WRITES_PER_SIDE {
            assert_eq!(doc[format!("left{i}")], json!(i));
            assert_eq!(doc[format!("right{i}")], json!(i));
        }
    }

    // And gossip flows across the old cut again: a write after the heal reaches everyone.
    right[0].client.cores().set(core, "app".into(), "after".into(), json!("healed")).await?;
    converged(&all, 2 + DEVICE_KEYS + 2 * WRITES_PER_SIDE, Duration::from_secs(20), "a write after the heal").await?;
    for node in nodes {
        node.stop().await;
    }
    Ok(())
}
