//! Twenty nodes in one process on libp2p's memory transport ([`Cluster`]): each is told only
//! the first node's address and finds every other one through the Kubelt DHT.

use std::collections::HashSet;
use std::time::Duration;

use kubelt_protocol::testing::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_in_process_nodes_find_each_other_through_the_dht() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(1).await?;
    let first = cluster.addr(0);
    for _ in 1..20 {
        cluster.add(|config| config.bootstrap_peers = vec![first.clone()]).await?;
    }
    let ids: Vec<String> = (0..cluster.len()).map(|i| cluster.peer_id(i).to_base58()).collect();
    // No event reports a routing-table entry: look every 50 ms.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for (node, id) in ids.iter().enumerate() {
        loop {
            let table: HashSet<String> = cluster.client(node)?.net().routing_table().await?.into_iter().map(|p| p.peer_id).collect();
            let missing = ids.iter().filter(|other| *other != id && !table.contains(*other)).count();
            if missing == 0 {
                break;
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "node {id} still misses {missing} peers in its routing table");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    cluster.shutdown().await;
    Ok(())
}
