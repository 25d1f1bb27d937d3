//! A bootstrap node and five nodes as separate `kubelt` processes on 127.0.0.1, and what
//! bootstrap mode changes.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{edit_config, kubelt_ok, wait_until, TestNode};
use futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use serde_json::Value;

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

/// Where one in-process peer's single connection to a node stands.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Link {
    Dialing,
    Up,
    Refused,
}

/// Starts `count` in-process peers (TCP, noise, yamux, ping: just enough to hold a connection
/// a node keeps) that each dial `addr` once; returns where each connection stands, live.
fn dial_many(count: usize, addr: &str) -> anyhow::Result<Arc<Mutex<Vec<Link>>>> {
    let links = Arc::new(Mutex::new(vec![Link::Dialing; count]));
    for i in 0..count {
        let mut swarm = libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(libp2p::tcp::Config::default(), libp2p::noise::Config::new, libp2p::yamux::Config::default)?
            .with_behaviour(|_| libp2p::ping::Behaviour::default())?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
            .build();
        swarm.dial(addr.parse::<libp2p::Multiaddr>()?)?;
        let links = links.clone();
        tokio::spawn(async move {
            loop {
                let link = match swarm.select_next_some().await {
                    SwarmEvent::ConnectionEstablished { .. } => Link::Up,
                    SwarmEvent::ConnectionClosed { .. } | SwarmEvent::OutgoingConnectionError { .. } => Link::Refused,
                    _ => continue,
                };
                links.lock().unwrap_or_else(|e| e.into_inner())[i] = link;
            }
        });
    }
    Ok(links)
}

fn count(links: &Mutex<Vec<Link>>, state: Link) -> usize {
    links.lock().unwrap_or_else(|e| e.into_inner()).iter().filter(|l| **l == state).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_mode_serves_the_dht_and_lifts_the_connection_limit() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // The same settings for both: at most 4 connections, DHT client. `--bootstrap` overrides both.
    for name in ["plain", "bootstrap"] {
        let repo = dir.path().join(name);
        kubelt_ok(&repo, &["init"])?;
        edit_config(&repo, "max_connections = 256", "max_connections = 4")?;
        edit_config(&repo, "dht_mode = \"auto\"", "dht_mode = \"client\"")?;
    }
    let plain = TestNode::start_on(&dir.path().join("plain"), "plain", &[])?;
    let bootstrap = TestNode::start_on(&dir.path().join("bootstrap"), "bootstrap", &["--bootstrap"])?;
    assert_eq!(plain.call("node_status", Value::Null)?["dht_mode"], "client");
    assert_eq!(bootstrap.call("node_status", Value::Null)?["dht_mode"], "server");

    let to_plain = dial_many(10, &plain.tcp_addr())?;
    let to_bootstrap = dial_many(10, &bootstrap.tcp_addr())?;
    wait_until("the plain node to refuse all but 4", Duration::from_secs(20), || {
        Ok(count(&to_plain, Link::Up) == 4 && count(&to_plain, Link::Refused) == 6 && plain.connected_peers()?.len() == 4)
    })
    .map_err(|e| anyhow::anyhow!("{e}: {:?}", to_plain.lock().map(|l| l.clone())))?;
    wait_until("the bootstrap node to take all 10", Duration::from_secs(20), || {
        Ok(count(&to_bootstrap, Link::Up) == 10 && bootstrap.connected_peers()?.len() == 10)
    })
    .map_err(|e| anyhow::anyhow!("{e}: {:?}", to_bootstrap.lock().map(|l| l.clone())))?;
    // And they stay so.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!((count(&to_plain, Link::Up), plain.connected_peers()?.len()), (4, 4));
    assert_eq!((count(&to_bootstrap, Link::Up), bootstrap.connected_peers()?.len()), (10, 10));
    Ok(())
}
