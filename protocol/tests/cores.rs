//! Cores between nodes in one process, on libp2p's memory transport ([`Cluster`]): delegated
//! writers and a follower converge, and a node that knows nothing but the core's address finds
//! its replicas through the DHT. (Partitions are in `partition.rs`, hostile peers in
//! `hostile_peers.rs`; what only a process shows, kill -9 and the CLI, in the binary's tests.)

mod common;

use std::collections::HashSet;
use std::time::Duration;

use kubelt_protocol::node::Config;
use kubelt_protocol::swarm::DhtMode;
use kubelt_protocol::testing::{Cluster, ClusterError};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_and_a_follower_converge_to_identical_heads() -> anyhow::Result<()> {
    common::init_tracing();
    let cluster = common::two_writers_and_a_follower().await?;
    let (a, b, c) = (0, 1, 2);

    // Concurrent writes to the same namespace, including the same key.
    let writes = |node: usize, name: &'static str| {
        let cluster = &cluster;
        async move {
            for i in 0..25 {
                cluster.set(node, &format!("from_{name}/{i}"), json!(i)).await?;
                cluster.set(node, "shared", json!(name)).await?;
            }
            Ok::<_, ClusterError>(())
        }
    };
    tokio::try_join!(writes(a, "a"), writes(b, "b"))?;

    let converged = cluster.converged(&[a, b, c], Duration::from_secs(30)).await?;
    let doc = cluster.get(a, "").await?;
    for node in [b, c] {
        assert_eq!(cluster.get(node, "").await?, doc, "node {node} reads another document than node {a}");
        assert_eq!(cluster.summary(node).await?.changes, converged.changes);
    }
    assert_eq!(doc["from_a"].as_object().map(|m| m.len()), Some(25), "{doc}");
    assert_eq!(doc["from_b"].as_object().map(|m| m.len()), Some(25), "{doc}");
    assert!(doc["shared"] == "a" || doc["shared"] == "b", "{doc}");
    let follower = cluster.summary(c).await?;
    assert!(!follower.writable, "the follower was given no delegation");
    assert!(cluster.summary(a).await?.writable && cluster.summary(b).await?.writable);
    assert_eq!(follower.heads, cluster.summary(a).await?.heads);
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_only_knows_the_address_finds_replicas_through_the_dht() -> anyhow::Result<()> {
    common::init_tracing();
    let mut cluster = Cluster::start(1).await?;
    let boot = 0;
    let boot_addr = cluster.addr(boot);
    // DHT clients that keep one connection (to the bootstrap node): DHT servers never list
    // them, so no node learns of another except through provider records.
    let dht_client = |config: &mut Config| {
        config.bootstrap_peers = vec![boot_addr.clone()];
        config.target_peers = 1;
        config.swarm.dht_mode = DhtMode::Client;
    };
    let writer = cluster.add(dht_client).await?;
    cluster.connect(writer, boot).await?;
    cluster.delegate(writer).await?;
    for i in 0..10 {
        cluster.set(writer, &format!("item{i}"), json!({ "n": i })).await?;
    }
    let newcomer = cluster.add(dht_client).await?;
    cluster.connect(newcomer, boot).await?;
    let only_boot = HashSet::from([cluster.peer_id(boot)]);
    for node in [writer, newcomer] {
        assert_eq!(cluster.connected(node).await?, only_boot, "node {node} is connected to the bootstrap node only");
    }
    let table = cluster.client(newcomer)?.net().routing_table().await?;
    assert!(table.iter().all(|p| p.peer_id != cluster.peer_id(writer).to_base58()), "the newcomer knows the writer from its routing table");

    cluster.follow(newcomer).await?;
    let converged = cluster.converged(&[writer, newcomer], Duration::from_secs(30)).await?;
    // The ten writes and the writer's messaging device key.
    assert_eq!(converged.changes, 11);
    assert_eq!(cluster.get(newcomer, "item9/n").await?, json!(9));
    // It caught up over a connection it opened to a peer whose address it was never given.
    assert!(
        cluster.connected(newcomer).await?.contains(&cluster.peer_id(writer)),
        "the newcomer has the writer's changes without a connection to it"
    );
    cluster.shutdown().await;
    Ok(())
}
