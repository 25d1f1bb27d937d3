//! Changes that fail verification are rejected by the first replica that receives them and never
//! travel further.
//!
//! The network is a line: attacker — `a` — {`c`, observer}. The attacker and the observer are
//! in-process peers that speak only gossipsub and ping (no identify, no Kademlia), so no node
//! learns their addresses or tells anyone about them: the attacker can reach `c` and the
//! observer only through `a`, and what the observer receives is exactly what `a` forwards.
//! (With a direct path, gossipsub would drop `a`'s forwarded copy as a duplicate before
//! validation and the check would pass without looking.)

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{kubelt_ok, wait_until, TestNode};
use futures::StreamExt;
use kubelt_proto::Message;
use kubelt_protocol::core::{Cores, DevWallet};
use kubelt_protocol::store::Store;
use kubelt_protocol::sync;
use libp2p::gossipsub::{self, IdentTopic};
use libp2p::identity::Keypair;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{noise, ping, tcp, yamux, Multiaddr, PeerId};
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// Gossipsub as a node runs it, plus ping (a node closes connections that do not answer pings).
#[derive(NetworkBehaviour)]
struct GossipOnly {
    gossipsub: gossipsub::Behaviour,
    ping: ping::Behaviour,
}

/// A gossip message as the in-process peer received it.
#[derive(Debug, Clone)]
struct Received {
    /// The peer that handed it to us (who forwarded it).
    via: PeerId,
    /// The peer that published it.
    author: Option<PeerId>,
    data: Vec<u8>,
}

/// What an in-process peer saw, shared with the test.
#[derive(Default)]
struct Seen {
    connected: HashSet<PeerId>,
    subscribed: HashSet<PeerId>,
    mesh: HashSet<PeerId>,
    received: Vec<Received>,
    publish_errors: Vec<String>,
}

/// An in-process gossipsub peer subscribed to one topic: it publishes what it is sent and
/// records everything it sees.
struct GossipPeer {
    peer_id: PeerId,
    seen: Arc<Mutex<Seen>>,
    publish: mpsc::Sender<Vec<u8>>,
    task: tokio::task::JoinHandle<()>,
}

impl GossipPeer {
    fn start(key: Keypair, topic: IdentTopic, dial: Multiaddr) -> anyhow::Result<GossipPeer> {
        let peer_id = key.public().to_peer_id();
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_tcp(tcp::Config::default(), noise::Config::new, yamux::Config::default)?
            .with_behaviour(|key| Ok(GossipOnly { gossipsub: sync::gossipsub(key)?, ping: ping::Behaviour::default() }))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
            .build();
        swarm.behaviour_mut().gossipsub.subscribe(&topic)?;
        swarm.dial(dial)?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (publish, mut to_publish) = mpsc::channel::<Vec<u8>>(16);
        let shared = seen.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    event = swarm.select_next_some() => {
                        let mut seen = shared.lock().unwrap_or_else(|e| e.into_inner());
                        match event {
                            SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                                seen.connected.insert(peer_id);
                            }
                            SwarmEvent::Behaviour(GossipOnlyEvent::Gossipsub(gossipsub::Event::Subscribed { peer_id, .. })) => {
                                seen.subscribed.insert(peer_id);
                            }
                            SwarmEvent::Behaviour(GossipOnlyEvent::Gossipsub(gossipsub::Event::Message { propagation_source, message, .. })) => {
                                seen.received.push(Received { via: propagation_source, author: message.source, data: message.data });
                            }
                            _ => {}
                        }
                    }
                    Some(data) = to_publish.recv() => {
                        if let Err(e) = swarm.behaviour_mut().gossipsub.publish(topic.clone(), data) {
                            shared.lock().unwrap_or_else(|e| e.into_inner()).publish_errors.push(e.to_string());
                        }
                    }
                    _ = tick.tick() => {
                        let mesh = swarm.behaviour().gossipsub.mesh_peers(&topic.hash()).copied().collect();
                        shared.lock().unwrap_or_else(|e| e.into_inner()).mesh = mesh;
                    }
                }
            }
        });
        Ok(GossipPeer { peer_id, seen, publish, task })
    }

    fn seen<T>(&self, read: impl FnOnce(&Seen) -> T) -> T {
        read(&self.seen.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Waits until `peer` is subscribed to the topic and in this peer's mesh for it.
    fn wait_for_mesh_with(&self, peer: &PeerId) -> anyhow::Result<()> {
        wait_until("the gossip mesh to form", Duration::from_secs(20), || {
            Ok(self.seen(|s| s.subscribed.contains(peer) && s.mesh.contains(peer)))
        })
    }
}

impl Drop for GossipPeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_changes_are_rejected_and_never_forwarded() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let owner_key = dir.path().join("owner.key");
    let owner = DevWallet::create(&owner_key)?;
    let core = owner.address();
    let address = core.to_checksum();
    let topic = sync::topic(&core);
    let a = TestNode::start(dir.path(), "a", &[])?;
    let c = TestNode::start(dir.path(), "c", &["--peer", &a.tcp_addr()])?;
    let message = kubelt_ok(&a.repo, &["core", "delegate", &address])?;
    std::fs::write(dir.path().join("a.siwe"), message)?;
    kubelt_ok(&a.repo, &["core", "submit", "--message-file", &dir.path().join("a.siwe").to_string_lossy(), "--sign-with", &owner_key.to_string_lossy()])?;
    kubelt_ok(&c.repo, &["core", "follow", &address])?;

    // The attacker holds a valid delegation for this core, so it can also send a valid change:
    // the control that shows the path a -> observer and a -> c carries what a accepts.
    let attacker_key = Keypair::generate_ed25519();
    let attacker_id = attacker_key.public().to_peer_id();
    let mut attacker_cores = Cores::load(Store::open(dir.path().join("attacker-cores"))?, Default::default())?;
    let now = time::OffsetDateTime::now_utc();
    let delegation = owner.delegate(&attacker_id, &["*"], Duration::from_secs(3600), now)?;
    let valid = attacker_cores.own(delegation.clone())?.set("app", "relayed", &json!("valid, through a"), &attacker_key, &delegation)?;
    // Forgeries: a change signed under another owner's (valid) delegation, relabelled for this
    // core; and bytes that are no envelope at all.
    let other_owner = DevWallet::random();
    let other_delegation = other_owner.delegate(&attacker_id, &["*"], Duration::from_secs(3600), now)?;
    let mut relabelled = attacker_cores.own(other_delegation.clone())?.set("app", "stolen", &json!("forged"), &attacker_key, &other_delegation)?;
    relabelled.core = core.to_lower_hex();
    let forgeries = vec![relabelled.encode_to_vec(), b"not a protobuf at all \xff\xff".to_vec()];

    let a_addr: Multiaddr = a.tcp_addr().parse()?;
    let a_id: PeerId = a.peer_id.parse()?;
    let observer = GossipPeer::start(Keypair::generate_ed25519(), topic.clone(), a_addr.clone())?;
    let attacker = GossipPeer::start(attacker_key, topic, a_addr)?;
    observer.wait_for_mesh_with(&a_id)?;
    attacker.wait_for_mesh_with(&a_id)?;
    wait_until("c and a to share the core's topic", Duration::from_secs(20), || {
        Ok(c.call("core_ls", Value::Null)?[0]["replicas"] == 1)
    })?;

    // The forgeries first; a rejects both.
    for forged in &forgeries {
        attacker.publish.send(forged.clone()).await?;
    }
    let attacker_text = attacker_id.to_base58();
    wait_until("a to reject both forgeries", Duration::from_secs(20), || {
        let log = a.log();
        let rejected = |what: &str| log.lines().any(|l| l.contains("rejected a change") && l.contains(what) && l.contains(&attacker_text));
        Ok(rejected("signature") && rejected("malformed envelope"))
    })
    .map_err(|e| anyhow::anyhow!("{e}\nlog of a:\n{}", a.log()))?;

    // Then the valid change, on the same connection. a forwards what it accepts the moment it
    // accepts it, and a connection delivers in order: had a forwarded a forgery, the observer
    // would have it before the valid change.
    attacker.publish.send(valid.encode_to_vec()).await?;
    let valid_bytes = valid.encode_to_vec();
    wait_until("the observer to receive the valid change through a", Duration::from_secs(20), || {
        Ok(observer.seen(|s| s.received.iter().any(|m| m.data == valid_bytes)))
    })?;
    wait_until("c to apply the valid change", Duration::from_secs(20), || {
        Ok(c.call("core_get", json!({ "address": address, "namespace": "app", "path": "relayed" }))? == json!("valid, through a"))
    })?;

    let received = observer.seen(|s| s.received.clone());
    let from_attacker: Vec<&Received> = received.iter().filter(|m| m.author == Some(attacker_id)).collect();
    assert_eq!(from_attacker.len(), 1, "a forwarded a forgery to the observer: {from_attacker:?}");
    assert_eq!(from_attacker[0].data, valid_bytes);
    assert_eq!(from_attacker[0].via, a_id, "the valid change came through a");
    assert!(attacker.seen(|s| s.publish_errors.is_empty()), "{:?}", attacker.seen(|s| s.publish_errors.clone()));

    // Nobody had another path: the attacker and the observer only ever connected to a, and c
    // only to a; c never had a forgery to reject.
    for peer in [&attacker, &observer] {
        assert_eq!(peer.seen(|s| s.connected.clone()), HashSet::from([a_id]), "{} connected elsewhere", peer.peer_id);
    }
    assert_eq!(c.connected_peers()?, vec![a.peer_id.clone()]);
    let c_log = c.log();
    assert!(!c_log.contains("rejected"), "a forwarded a forged change to c:\n{c_log}");
    for node in [&a, &c] {
        let app = node.call("core_get", json!({ "address": address, "namespace": "app" }))?;
        assert_eq!(app.get("stolen"), None, "{}: {app}", node.name);
        assert_eq!(app["relayed"], "valid, through a", "{}: {app}", node.name);
    }
    Ok(())
}
