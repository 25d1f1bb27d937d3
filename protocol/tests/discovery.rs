//! Twenty nodes in one process on libp2p's memory transport: each is told only the first
//! node's address and finds every other one through the Kubelt DHT.

use std::collections::HashSet;
use std::time::Duration;

use kubelt_protocol::node::{Config, Node};
use kubelt_protocol::store::Store;
use libp2p::identity::Keypair;
use libp2p::Multiaddr;

async fn start_node(dir: &std::path::Path, index: usize, port: u64, peers: Vec<Multiaddr>) -> anyhow::Result<Node> {
    let store = Store::open(dir.join(format!("node{index}")))?;
    let config = Config {
        listen: vec![format!("/memory/{port}").parse()?],
        bootstrap_peers: peers,
        maintenance_interval: Duration::from_millis(500),
        ..Config::default()
    };
    Ok(Node::start(Keypair::generate_ed25519(), store, config).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_in_process_nodes_find_each_other_through_the_dht() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let base = rand::random::<u32>() as u64 * 1000 + 1;
    let first = start_node(dir.path(), 0, base, vec![]).await?;
    let first_addr: Multiaddr = first.client.info().await?.addresses[0].parse()?;
    let mut nodes = vec![first];
    for i in 1..20 {
        nodes.push(start_node(dir.path(), i, base + i as u64, vec![first_addr.clone()]).await?);
    }
    let ids: Vec<String> = nodes.iter().map(|n| n.peer_id.to_base58()).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for (node, id) in nodes.iter().zip(&ids) {
        loop {
            let table: HashSet<String> = node.client.net().routing_table().await?.into_iter().map(|p| p.peer_id).collect();
            let missing = ids.iter().filter(|other| *other != id && !table.contains(*other)).count();
            if missing == 0 {
                break;
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "node {id} still misses {missing} peers in its routing table");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    for node in nodes {
        node.stop().await;
    }
    Ok(())
}
