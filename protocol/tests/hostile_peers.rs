//! Hostile peers on the memory transport against real nodes in this process ([`Cluster`]).
//!
//! The messages of the hardening review (a gossip envelope whose change holds an operation
//! counter past 32 bits, one that declares millions of operations, a catch-up request whose
//! Bloom filter declares four billion probes) each cost one rejected message. The node goes on
//! serving, and a change written afterwards still reaches the other replica.
//!
//! Forged changes are rejected by the first replica that receives them and never travel
//! further. The network is a line: attacker — `a` — {`c`, observer}. The attacker and the
//! observer are bare swarms that speak only gossipsub and ping (no identify, no Kademlia), so no
//! node learns their addresses or tells anyone about them: the attacker reaches `c` and the
//! observer only through `a`, and what the observer receives is exactly what `a` forwards.
//! (With a direct path, gossipsub would drop `a`'s forwarded copy as a duplicate before
//! validation and the check would pass without looking.)

mod common;

use std::collections::HashSet;
use std::time::Duration;

use automerge::{Automerge, ReadDoc};
use futures::StreamExt;
use kubelt_proto::core::{OwnerStatement, SignedChange, SyncRequest};
use kubelt_proto::Message;
use kubelt_protocol::core::{Address, Cores, Rejected};
use kubelt_protocol::node::NodeEvent;
use kubelt_protocol::store::Store;
use kubelt_protocol::swarm::{self, Behaviour, BehaviourEvent};
use kubelt_protocol::sync;
use kubelt_protocol::testing::write_uleb as uleb;
use kubelt_protocol::testing::Cluster;
use libp2p::gossipsub::{self, IdentTopic};
use libp2p::identity::Keypair;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{ping, request_response, Multiaddr, PeerId, Swarm};
use serde_json::json;
use tokio::sync::{broadcast, mpsc, watch};

/// An Automerge change whose first operation writes into an object with counter 2^32 (which
/// automerge 0.7 unwraps into a u32, panicking).
fn change_with_counter_past_u32(actor: &automerge::ActorId) -> anyhow::Result<Vec<u8>> {
    let mut doc = Automerge::new().with_actor(actor.clone());
    let mut tx = doc.transaction();
    automerge::transaction::Transactable::put(&mut tx, automerge::ROOT, "x", 1)?;
    let (hash, _) = tx.commit();
    let change = doc.get_change_by_hash(&hash.ok_or_else(|| anyhow::anyhow!("no change"))?).ok_or_else(|| anyhow::anyhow!("no change"))?;
    let mut expanded = change.decode();
    expanded.operations[0].obj = automerge::legacy::ObjectId::Id(automerge::legacy::OpId::new(1 << 32, actor));
    Ok(automerge::Change::from(expanded).raw_bytes().to_vec())
}

/// 103 bytes that declare eight million operations.
fn change_declaring_millions_of_ops(actor: &[u8]) -> Vec<u8> {
    let mut body = vec![0];
    uleb(&mut body, actor.len() as u64);
    body.extend_from_slice(actor);
    body.extend_from_slice(&[1, 1, 0, 0, 0]); // seq, start op, time, message, other actors
    let mut action = Vec::new();
    action.extend_from_slice(&[0x80, 0xa4, 0xe8, 0x03]); // run of 8,000,000 (signed LEB128)
    action.push(1);
    body.push(1);
    uleb(&mut body, (4 << 4) | 2);
    uleb(&mut body, action.len() as u64);
    body.extend_from_slice(&action);
    let mut chunk = vec![0x85, 0x6f, 0x4a, 0x83, 0, 0, 0, 0, 1];
    uleb(&mut chunk, body.len() as u64);
    chunk.extend_from_slice(&body);
    chunk
}

/// A V1 sync message with no heads, needs or filters (what a replica with nothing sends).
fn empty_sync_message() -> Vec<u8> {
    vec![0x42, 0, 0, 0, 0]
}

fn bloom_bomb(core: &Address) -> SyncRequest {
    let mut m = vec![0x42, 0, 0, 1, 0];
    let bloom = [1, 10, 0xff, 0xff, 0xff, 0xff, 0x0f, 0xff, 0xff];
    uleb(&mut m, bloom.len() as u64);
    m.extend_from_slice(&bloom);
    m.push(0);
    SyncRequest { core: core.to_lower_hex(), sync_message: m.into(), changes: vec![] }
}

/// The changes a node reported rejecting since the last call, with who sent each.
fn rejections(events: &mut broadcast::Receiver<NodeEvent>) -> Vec<(PeerId, Rejected)> {
    let mut rejected = Vec::new();
    loop {
        match events.try_recv() {
            Ok(NodeEvent::ChangeRejected { from, reason, .. }) => rejected.push((from, reason)),
            Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) => {}
            Err(_) => return rejected,
        }
    }
}

/// Drives the attacker's swarm until `done` says so, or fails after `limit`.
async fn drive_until<T>(
    swarm: &mut Swarm<Behaviour>,
    limit: Duration,
    mut done: impl FnMut(&mut Swarm<Behaviour>, Option<SwarmEvent<BehaviourEvent>>) -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = tokio::time::Instant::now() + limit;
    if let Some(t) = done(swarm, None) {
        return Ok(t);
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => anyhow::bail!("the attacker's swarm did not get there in {limit:?}"),
            event = swarm.select_next_some() => {
                if let Some(t) = done(swarm, Some(event)) {
                    return Ok(t);
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                if let Some(t) = done(swarm, None) {
                    return Ok(t);
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_peer_costs_rejected_messages_never_the_node() -> anyhow::Result<()> {
    common::init_tracing();
    let cluster = Cluster::start(2).await?;
    let (writer, follower) = (0, 1);
    let core = cluster.core();
    let delegation = cluster.delegate(writer).await?;
    cluster.follow(follower).await?;
    cluster.connect(follower, writer).await?;
    let mut writer_events = cluster.client(writer)?.events();

    // The attacker: a kubelt swarm with a key of its own, subscribed to the core's topic.
    let dir = tempfile::tempdir()?;
    let attacker_key = Keypair::generate_ed25519();
    let attacker_peer = attacker_key.public().to_peer_id();
    let mut attacker = swarm::build(attacker_key.clone(), &swarm::Config::default(), Store::open(dir.path().join("attacker"))?)?;
    attacker.listen_on("/memory/0".parse()?)?;
    attacker.dial(cluster.addr(writer))?;
    let topic = sync::topic(&core);
    attacker.behaviour_mut().gossipsub.subscribe(&topic)?;
    let writer_peer = cluster.peer_id(writer);
    drive_until(&mut attacker, Duration::from_secs(20), |s, _| {
        s.behaviour().gossipsub.all_peers().any(|(p, topics)| *p == writer_peer && topics.contains(&&topic.hash())).then_some(())
    })
    .await?;

    // 1. No key, no delegation, not even a valid signature: an object counter of 2^32.
    let actor = kubelt_protocol::core::change::actor_id(&attacker_peer, [7; 8]);
    let unsigned = SignedChange {
        core: core.to_lower_hex(),
        change: change_with_counter_past_u32(&actor)?.into(),
        author: attacker_key.public().encode_protobuf().into(),
        signature: vec![0u8; 64].into(),
        delegation: Some(OwnerStatement { message: "not a delegation".into(), signature: vec![0u8; 65].into() }),
    };
    // 2. Signed by the attacker's key (not delegated): eight million operations in ~100 bytes.
    let ops_bomb = change_declaring_millions_of_ops(actor.to_bytes());
    let signed = kubelt_protocol::core::change::seal(&core, ops_bomb, &attacker_key, &delegation)?;
    for envelope in [unsigned, signed] {
        let data = envelope.encode_to_vec();
        drive_until(&mut attacker, Duration::from_secs(10), |s, _| s.behaviour_mut().gossipsub.publish(topic.clone(), data.clone()).ok()).await?;
    }
    // 3. A catch-up request whose Bloom filter declares 2^32 - 1 probes.
    let request = attacker.behaviour_mut().core_sync.send_request(&writer_peer, bloom_bomb(&core));
    let answer = drive_until(&mut attacker, Duration::from_secs(20), |_, event| match event {
        Some(SwarmEvent::Behaviour(BehaviourEvent::CoreSync(request_response::Event::Message {
            message: request_response::Message::Response { request_id, response },
            ..
        }))) if request_id == request => Some(response),
        _ => None,
    })
    .await?;
    assert!(answer.error.contains("probes"), "the writer answers the bloom bomb with a clear error: {:?}", answer.error);
    // 4. A flood of catch-up requests: answered within the peer's budget, then "busy".
    let flood = 200;
    let mut ids = std::collections::HashSet::new();
    for _ in 0..flood {
        let request = SyncRequest { core: core.to_lower_hex(), sync_message: empty_sync_message().into(), changes: vec![] };
        ids.insert(attacker.behaviour_mut().core_sync.send_request(&writer_peer, request));
    }
    let (mut answered, mut busy, mut dropped) = (0, 0, 0);
    drive_until(&mut attacker, Duration::from_secs(60), |_, event| {
        match event {
            Some(SwarmEvent::Behaviour(BehaviourEvent::CoreSync(request_response::Event::Message {
                message: request_response::Message::Response { request_id, response },
                ..
            }))) if ids.remove(&request_id) => {
                if response.error.starts_with("busy") {
                    busy += 1;
                } else {
                    answered += 1;
                }
            }
            // Streams past the connection's limits are dropped by request-response itself.
            Some(SwarmEvent::Behaviour(BehaviourEvent::CoreSync(request_response::Event::OutboundFailure { request_id, .. })))
                if ids.remove(&request_id) =>
            {
                dropped += 1
            }
            _ => {}
        }
        ids.is_empty().then_some(())
    })
    .await?;
    println!("catch-up flood: of {flood} requests, {answered} answered, {busy} refused as busy, {dropped} dropped");
    assert!(busy > 0 && answered <= 70, "the flood was not limited: {answered} answered, {busy} busy, {dropped} dropped");
    // Gossip delivers, and the writer judges both envelopes and says so on its event stream.
    let mut rejected = Vec::new();
    drive_until(&mut attacker, Duration::from_secs(20), |_, _| {
        rejected.extend(rejections(&mut writer_events));
        (rejected.len() >= 2).then_some(())
    })
    .await?;
    assert!(rejected.iter().all(|(from, _)| *from == attacker_peer), "{rejected:?}");

    // The writer still serves, and a change written now still reaches the follower.
    let info = cluster.client(writer)?.info().await?;
    assert_eq!(info.peer_id, writer_peer.to_base58());
    cluster.client(writer)?.cores().set(core, "profile".into(), "name".into(), json!("alice")).await?;
    let converged = cluster.converged(&[writer, follower], Duration::from_secs(30)).await?;
    assert_eq!(cluster.client(follower)?.cores().get(core, "profile".into(), "name".into()).await?, json!("alice"));
    // The profile write and the writer's device key (messaging), nothing else.
    assert_eq!(converged.changes, 2, "nothing the attacker sent entered the core");
    let rejected_later = rejections(&mut writer_events);
    assert!(rejected_later.is_empty(), "the writer rejected more than the two envelopes: {rejected_later:?}");
    cluster.shutdown().await;
    Ok(())
}

/// Gossipsub as a node runs it, plus ping (a node closes connections that do not answer pings).
#[derive(NetworkBehaviour)]
struct GossipOnly {
    gossipsub: gossipsub::Behaviour<sync::CountingTransform>,
    ping: ping::Behaviour,
}

/// A gossip message as the bare peer received it.
#[derive(Clone)]
struct Received {
    /// The peer that handed it to us (who forwarded it).
    via: PeerId,
    /// The peer that published it.
    author: Option<PeerId>,
    data: Vec<u8>,
}

impl std::fmt::Debug for Received {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes by {:?} via {}", self.data.len(), self.author, self.via)
    }
}

/// What a bare peer saw, shared with the test.
#[derive(Debug, Default)]
struct Seen {
    connected: HashSet<PeerId>,
    subscribed: HashSet<PeerId>,
    mesh: HashSet<PeerId>,
    received: Vec<Received>,
    publish_errors: Vec<String>,
}

/// A bare gossipsub peer on the memory transport, subscribed to one topic: it publishes what
/// it is sent and records everything it sees (the test waits on each change of the record).
struct GossipPeer {
    peer_id: PeerId,
    seen: watch::Receiver<Seen>,
    publish: mpsc::Sender<Vec<u8>>,
    task: tokio::task::JoinHandle<()>,
}

impl GossipPeer {
    fn start(key: Keypair, topic: IdentTopic, dial: Multiaddr) -> anyhow::Result<GossipPeer> {
        let peer_id = key.public().to_peer_id();
        let mut swarm = common::memory_swarm(key, Duration::from_secs(120), |key| {
            Ok(GossipOnly { gossipsub: sync::gossipsub(key, sync::GossipCounters::default(), Duration::from_millis(500))?, ping: ping::Behaviour::default() })
        })?;
        swarm.behaviour_mut().gossipsub.subscribe(&topic)?;
        swarm.dial(dial)?;
        let (record, seen) = watch::channel(Seen::default());
        let (publish, mut to_publish) = mpsc::channel::<Vec<u8>>(16);
        let task = tokio::spawn(async move {
            // Mesh membership changes without an event: look at it now and then.
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tokio::select! {
                    event = swarm.select_next_some() => match event {
                        SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                            record.send_modify(|s| { s.connected.insert(peer_id); });
                        }
                        SwarmEvent::Behaviour(GossipOnlyEvent::Gossipsub(gossipsub::Event::Subscribed { peer_id, .. })) => {
                            record.send_modify(|s| { s.subscribed.insert(peer_id); });
                        }
                        SwarmEvent::Behaviour(GossipOnlyEvent::Gossipsub(gossipsub::Event::Message { propagation_source, message, .. })) => {
                            let received = Received { via: propagation_source, author: message.source, data: message.data };
                            record.send_modify(|s| s.received.push(received));
                        }
                        _ => {}
                    },
                    Some(data) = to_publish.recv() => {
                        if let Err(e) = swarm.behaviour_mut().gossipsub.publish(topic.clone(), data) {
                            record.send_modify(|s| s.publish_errors.push(e.to_string()));
                        }
                    }
                    _ = tick.tick() => {
                        let mesh: HashSet<PeerId> = swarm.behaviour().gossipsub.mesh_peers(&topic.hash()).copied().collect();
                        record.send_if_modified(|s| {
                            let changed = s.mesh != mesh;
                            s.mesh = mesh;
                            changed
                        });
                    }
                }
            }
        });
        Ok(GossipPeer { peer_id, seen, publish, task })
    }

    fn seen<T>(&self, read: impl FnOnce(&Seen) -> T) -> T {
        read(&self.seen.borrow())
    }

    /// Waits until what the peer saw satisfies `done`.
    async fn wait_for(&self, what: &str, within: Duration, done: impl FnMut(&Seen) -> bool) -> anyhow::Result<()> {
        let mut seen = self.seen.clone();
        let waited = tokio::time::timeout(within, async { seen.wait_for(done).await.map(|_| ()) }).await;
        match waited {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => anyhow::bail!("peer {} stopped before {what}", self.peer_id),
            Err(_) => anyhow::bail!("peer {}: no {what} within {within:?}; it saw {:?}", self.peer_id, *self.seen.borrow()),
        }
    }

    /// Waits until `peer` is subscribed to the topic and in this peer's mesh for it.
    async fn wait_for_mesh_with(&self, peer: &PeerId) -> anyhow::Result<()> {
        self.wait_for("gossip mesh", Duration::from_secs(20), |s| s.subscribed.contains(peer) && s.mesh.contains(peer)).await
    }
}

impl Drop for GossipPeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_changes_are_rejected_and_never_forwarded() -> anyhow::Result<()> {
    common::init_tracing();
    let cluster = Cluster::start(2).await?;
    let (a, c) = (0, 1);
    let a_id = cluster.peer_id(a);
    cluster.connect(c, a).await?;
    cluster.delegate(a).await?;
    cluster.follow(c).await?;
    let core = cluster.core();
    let topic = sync::topic(&core);
    let (mut a_events, mut c_events) = (cluster.client(a)?.events(), cluster.client(c)?.events());

    // The attacker holds a valid delegation for this core, so it can also send a valid change:
    // the control that shows the path a -> observer and a -> c carries what a accepts.
    let dir = tempfile::tempdir()?;
    let attacker_key = Keypair::generate_ed25519();
    let attacker_id = attacker_key.public().to_peer_id();
    let mut attacker_cores = Cores::load(Store::open(dir.path().join("attacker-cores"))?, Default::default())?;
    let now = time::OffsetDateTime::now_utc();
    let delegation = cluster.wallet().delegate(&attacker_id, &["*"], Duration::from_secs(3600), now)?;
    let valid = attacker_cores.own(delegation.clone())?.set("app", "relayed", &json!("valid, through a"), &attacker_key, &delegation)?;
    // Forgeries: a change signed under another owner's (valid) delegation, relabelled for this
    // core; and bytes that are no envelope at all.
    let other_owner = kubelt_protocol::core::DevWallet::random();
    let other_delegation = other_owner.delegate(&attacker_id, &["*"], Duration::from_secs(3600), now)?;
    let mut relabelled = attacker_cores.own(other_delegation.clone())?.set("app", "stolen", &json!("forged"), &attacker_key, &other_delegation)?;
    relabelled.core = core.to_lower_hex();
    let forgeries = vec![relabelled.encode_to_vec(), b"not a protobuf at all \xff\xff".to_vec()];

    let observer = GossipPeer::start(Keypair::generate_ed25519(), topic.clone(), cluster.addr(a))?;
    let attacker = GossipPeer::start(attacker_key, topic, cluster.addr(a))?;
    observer.wait_for_mesh_with(&a_id).await?;
    attacker.wait_for_mesh_with(&a_id).await?;
    cluster.replicas(&[c], 1, Duration::from_secs(20)).await?;

    // The forgeries first; a rejects both, and says why.
    for forged in &forgeries {
        attacker.publish.send(forged.clone()).await?;
    }
    let mut rejected = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), async {
        while rejected.len() < forgeries.len() {
            match a_events.recv().await {
                Ok(NodeEvent::ChangeRejected { core: of, from, reason }) => rejected.push((of, from, reason)),
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("a did not reject both forgeries: it reported {rejected:?}"))?;
    assert!(rejected.iter().all(|(of, from, _)| *of == core && *from == attacker_id), "{rejected:?}");
    assert!(rejected.iter().any(|(_, _, reason)| *reason == Rejected::BadSignature), "{rejected:?}");
    assert!(rejected.iter().any(|(_, _, reason)| matches!(reason, Rejected::MalformedEnvelope(_))), "{rejected:?}");

    // Then the valid change, on the same connection. a forwards what it accepts the moment it
    // accepts it, and a connection delivers in order: had a forwarded a forgery, the observer
    // would have it before the valid change.
    let valid_bytes = valid.encode_to_vec();
    attacker.publish.send(valid_bytes.clone()).await?;
    observer
        .wait_for("valid change through a", Duration::from_secs(20), |s| s.received.iter().any(|m| m.data == valid_bytes))
        .await?;
    let converged = cluster.converged(&[a, c], Duration::from_secs(20)).await?;
    assert_eq!(converged.changes, 2, "a's device key and the valid change");

    let received = observer.seen(|s| s.received.clone());
    let from_attacker: Vec<&Received> = received.iter().filter(|m| m.author == Some(attacker_id)).collect();
    assert_eq!(from_attacker.len(), 1, "a forwarded a forgery to the observer: {from_attacker:?}");
    assert_eq!(from_attacker[0].data, valid_bytes);
    assert_eq!(from_attacker[0].via, a_id, "the valid change came through a");
    assert!(attacker.seen(|s| s.publish_errors.is_empty()), "{:?}", attacker.seen(|s| s.publish_errors.clone()));

    // Nobody had another path: the attacker and the observer only ever connected to a, and c
    // only to a; c never had a forgery to reject, and a rejected nothing more.
    for peer in [&attacker, &observer] {
        assert_eq!(peer.seen(|s| s.connected.clone()), HashSet::from([a_id]), "{} connected elsewhere", peer.peer_id);
    }
    assert_eq!(cluster.connected(c).await?, HashSet::from([a_id]));
    let c_rejected = rejections(&mut c_events);
    assert!(c_rejected.is_empty(), "a forwarded a forged change to c: {c_rejected:?}");
    let a_rejected = rejections(&mut a_events);
    assert!(a_rejected.is_empty(), "a rejected more than the forgeries: {a_rejected:?}");
    for node in [a, c] {
        let app = cluster.get(node, "").await?;
        assert_eq!(app.get("stolen"), None, "node {node}: {app}");
        assert_eq!(app["relayed"], "valid, through a", "node {node}: {app}");
    }
    cluster.shutdown().await;
    Ok(())
}
