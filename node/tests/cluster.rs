//! A bootstrap node and five nodes as separate `kubelt` processes on 127.0.0.1.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{wait_until, TestNode};

#[test]
fn nodes_find_each_other_through_kademlia_and_survive_losing_the_bootstrap() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut bootstrap = TestNode::start(dir.path(), "bootstrap", &["--bootstrap"])?;
    let bootstrap_addr = bootstrap.tcp_addr();
    let mut nodes = Vec::new();
    for i in 0..5 {
        nodes.push(TestNode::start(dir.path(), &format!("node{i}"), &["--peer", &bootstrap_addr])?);
    }
    let ids: Vec<String> = nodes.iter().map(|n| n.peer_id.clone()).collect();

    // Each node was told only the bootstrap's address: knowing the four others means the DHT
    // told it about them.
    for node in &nodes {
        let others: HashSet<&String> = ids.iter().filter(|id| **id != node.peer_id).collect();
        wait_until(&format!("{} to have every other node in its routing table", node.name), Duration::from_secs(60), || {
            let table: HashSet<String> = node.routing_table()?.into_iter().collect();
            Ok(others.iter().all(|id| table.contains(*id)))
        })
        .map_err(|e| anyhow::anyhow!("{e}\nlog of {}:\n{}", node.name, node.log()))?;
    }

    // The nodes connect to each other, not only to the bootstrap.
    for node in &nodes {
        wait_until(&format!("{} to connect to the other nodes", node.name), Duration::from_secs(60), || {
            let connected: HashSet<String> = node.connected_peers()?.into_iter().collect();
            Ok(ids.iter().filter(|id| **id != node.peer_id).all(|id| connected.contains(id)))
        })?;
    }

    // Without the bootstrap, they stay connected.
    assert_eq!(bootstrap.stop()?, Some(0), "bootstrap exits cleanly on SIGTERM");
    std::thread::sleep(Duration::from_secs(2));
    for node in &nodes {
        let connected = node.connected_peers()?;
        assert!(connected.len() >= 4, "{} has {} peers after the bootstrap stopped", node.name, connected.len());
        assert!(!connected.contains(&bootstrap.peer_id));
    }

    // A restarted node with no bootstrap reachable rejoins through the peers it remembered.
    let mut restarted = nodes.pop().expect("five nodes");
    assert_eq!(restarted.stop()?, Some(0));
    let repo = restarted.repo.clone();
    drop(restarted);
    let restarted = TestNode::start_on(&repo, "node4-restarted", &[])?;
    wait_until("the restarted node to reconnect from its stored peers", Duration::from_secs(60), || {
        let connected: HashSet<String> = restarted.connected_peers()?.into_iter().collect();
        Ok(nodes.iter().all(|n| connected.contains(&n.peer_id)))
    })
    .map_err(|e| anyhow::anyhow!("{e}\nlog:\n{}", restarted.log()))?;
    Ok(())
}
