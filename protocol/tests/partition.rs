//! Partitions in one process, on libp2p's memory transport ([`Cluster`]).
//!
//! A network cut in two while every node keeps running: six nodes hold one core, with a
//! delegated writer in each half. The cut is made by every node blocking the peers of the other
//! half: connections close, redials and incoming dials are refused. Both halves write during the
//! cut; each converges on its own and nothing crosses. Then the block is lifted and nothing else
//! is done: the nodes redial each other from their maintenance tick, and catch-up on reconnect
//! must bring every node every write, with identical heads.
//!
//! And nodes down at different times: each side writes while the other is away, then all come
//! back and find each other from the peers they remember, with no address given.
//!
//! The periodic catch-up round is an hour away in a [`Cluster`] and nothing is written after
//! a heal, so neither the timer nor gossip can carry the writes made apart: only the catch-up
//! that starts when a replica comes back can.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use kubelt_protocol::testing::cluster::test_config;
use kubelt_protocol::testing::Cluster;
use libp2p::PeerId;
use serde_json::{json, Value};
use tokio::time::Instant;

/// Nodes in each half; node 0 writes in the first half, node `HALF` in the second.
const HALF: usize = 3;
/// Writes each half makes during the cut.
const WRITES_PER_SIDE: usize = 3;
/// Changes that publish the two writers' messaging device keys (one each, with its delegation).
const DEVICE_KEYS: usize = 2;
/// A generous bound on heal-to-convergence: this is a liveness check, not a benchmark.
const HEAL_BOUND: Duration = Duration::from_secs(30);
/// A bound for what takes milliseconds when it works.
const QUICK: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_halves_of_a_partition_write_and_every_node_holds_every_write_after_the_heal() -> anyhow::Result<()> {
    common::init_tracing();
    let mut cluster = Cluster::start(2 * HALF).await?;
    let all: Vec<usize> = (0..2 * HALF).collect();
    // A writer in each half, a full mesh, and every node knows every other one holds the core.
    cluster.hold_core(&[0, HALF], QUICK).await?;
    cluster.set(0, "before", json!(true)).await?;
    assert_eq!(cluster.converged(&all, QUICK).await?.changes, 1 + DEVICE_KEYS);

    // The cut: every node keeps running; no connection crosses from now on.
    let (left, right) = all.split_at(HALF);
    cluster.partition(left, right, Duration::from_secs(10)).await?;
    for i in 1..=WRITES_PER_SIDE {
        cluster.set(left[0], &format!("left{i}"), json!(i)).await?;
        cluster.set(right[0], &format!("right{i}"), json!(i)).await?;
    }
    let left_alone = cluster.converged(left, QUICK).await?;
    let right_alone = cluster.converged(right, QUICK).await?;
    let alone = 1 + DEVICE_KEYS + WRITES_PER_SIDE;
    assert_eq!((left_alone.changes, right_alone.changes), (alone, alone));
    assert_ne!(left_alone.heads, right_alone.heads);
    // Hold the cut through many maintenance ticks (each redials the peers it lost), then check
    // that nothing crossed: no connection, no change.
    tokio::time::sleep(test_config().maintenance_interval * 10).await;
    for (half, other, mine, theirs) in [(left, right, "left", "right"), (right, left, "right", "left")] {
        let other_ids: HashSet<PeerId> = other.iter().map(|&n| cluster.peer_id(n)).collect();
        for &node in half {
            assert!(cluster.connected(node).await?.is_disjoint(&other_ids), "a connection crossed the cut");
            assert_eq!(cluster.summary(node).await?.changes, alone, "a change crossed the cut");
            let doc = cluster.get(node, "").await?;
            assert_eq!(doc[format!("{mine}1")], json!(1));
            assert_eq!(doc[format!("{theirs}1")], Value::Null, "the {theirs} half's write reached the {mine} half during the cut");
        }
    }

    // The heal: lift the blocks and do nothing else.
    let healed_at = Instant::now();
    cluster.heal().await?;
    let right_ids: HashSet<PeerId> = right.iter().map(|&n| cluster.peer_id(n)).collect();
    let reconnect_watch = {
        let client = cluster.client(left[0])?.clone();
        tokio::spawn(async move {
            while healed_at.elapsed() < HEAL_BOUND {
                match client.net().peers().await {
                    Ok(peers) if peers.iter().any(|p| p.peer_id.parse().is_ok_and(|id| right_ids.contains(&id))) => {
                        return format!("{:?}", healed_at.elapsed());
                    }
                    Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    Err(e) => return format!("unknown ({e})"),
                }
            }
            "never".to_string()
        })
    };
    let healed = cluster.converged(&all, HEAL_BOUND).await?;
    let took = healed_at.elapsed();
    let reconnected = reconnect_watch.await?;
    assert_eq!(healed.changes, 1 + DEVICE_KEYS + 2 * WRITES_PER_SIDE);
    println!(
        "partition healed: {} nodes hold all {} changes with identical heads {took:?} after the blocks were lifted \
         (node 0 reconnected across the cut after {reconnected})",
        all.len(),
        healed.changes
    );
    assert_eq!(healed.heads.len(), 2, "the two halves' histories merge into two concurrent heads");
    for &node in &all {
        let doc = cluster.get(node, "").await?;
        assert_eq!(doc["before"], json!(true));
        for i in 1..=WRITES_PER_SIDE {
            assert_eq!(doc[format!("left{i}")], json!(i));
            assert_eq!(doc[format!("right{i}")], json!(i));
        }
    }

    // And gossip flows across the old cut again: a write after the heal reaches everyone.
    cluster.set(right[0], "after", json!("healed")).await?;
    assert_eq!(cluster.converged(&all, QUICK).await?.changes, 2 + DEVICE_KEYS + 2 * WRITES_PER_SIDE);
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_heals_with_no_manual_step() -> anyhow::Result<()> {
    common::init_tracing();
    let mut cluster = common::two_writers_and_a_follower().await?;
    let (a, b, c) = (0, 1, 2);
    cluster.set(a, "before", json!(true)).await?;
    cluster.converged(&[a, b, c], QUICK).await?;

    // Side 1: b is gone while a writes.
    cluster.stop(b).await?;
    cluster.set(a, "side1", json!("written by a while b was away")).await?;
    // Side 2: b alone (a and c are down) writes too.
    cluster.stop(a).await?;
    cluster.stop(c).await?;
    cluster.restart(b).await?;
    cluster.set(b, "side2", json!("written by b while alone")).await?;
    assert_eq!(cluster.get(b, "side1").await?, Value::Null);
    assert_eq!(cluster.summary(b).await?.changes, 2 + DEVICE_KEYS);

    // Everyone back: they find each other from their stored peers and catch up.
    cluster.restart(a).await?;
    cluster.restart(c).await?;
    let healed = cluster.converged(&[a, b, c], Duration::from_secs(40)).await?;
    assert_eq!(healed.changes, 3 + DEVICE_KEYS);
    for node in [a, b, c] {
        let doc = cluster.get(node, "").await?;
        assert_eq!(doc["side1"], "written by a while b was away", "node {node}: {doc}");
        assert_eq!(doc["side2"], "written by b while alone", "node {node}: {doc}");
        assert_eq!(doc["before"], true, "node {node}: {doc}");
    }
    cluster.shutdown().await;
    Ok(())
}
