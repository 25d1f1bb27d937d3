//! A hostile peer on the memory transport against two real nodes in this process: the
//! messages of the hardening review (a gossip envelope whose change holds an operation counter
//! past 32 bits, one that declares millions of operations, a catch-up request whose Bloom
//! filter declares four billion probes) each cost one rejected message. The node goes on
//! serving, and a change written afterwards still reaches the other replica.

use std::time::Duration;

use automerge::{Automerge, ReadDoc};
use futures::StreamExt;
use kubelt_proto::core::{OwnerStatement, SignedChange, SyncRequest};
use kubelt_proto::Message;
use kubelt_protocol::core::{Address, DevWallet};
use kubelt_protocol::node::{Config, Node};
use kubelt_protocol::store::Store;
use kubelt_protocol::swarm::{self, Behaviour, BehaviourEvent};
use kubelt_protocol::sync;
use kubelt_protocol::testing::write_uleb as uleb;
use libp2p::identity::Keypair;
use libp2p::swarm::SwarmEvent;
use libp2p::{request_response, Multiaddr, Swarm};
use serde_json::json;

async fn start_node(dir: &std::path::Path, name: &str, port: u64) -> anyhow::Result<Node> {
    let store = Store::open(dir.join(name))?;
    let config = Config {
        listen: vec![format!("/memory/{port}").parse()?],
        maintenance_interval: Duration::from_millis(500),
        ..Config::default()
    };
    Ok(Node::start(Keypair::generate_ed25519(), store, config).await?)
}

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
    let dir = tempfile::tempdir()?;
    let base = rand::random::<u32>() as u64 * 1000 + 1;
    let writer = start_node(dir.path(), "writer", base).await?;
    let follower = start_node(dir.path(), "follower", base + 1).await?;
    let writer_addr: Multiaddr = writer.client.info().await?.addresses[0].parse()?;
    let wallet = DevWallet::random();
    let core = wallet.address();
    let delegation = wallet.delegate(&writer.peer_id, &["*"], Duration::from_secs(3600), time::OffsetDateTime::now_utc())?;
    writer.client.cores().submit(delegation.clone()).await?;
    follower.client.cores().follow(core).await?;
    follower.client.net().connect(writer_addr.clone()).await?;

    // The attacker: a kubelt swarm with a key of its own, subscribed to the core's topic.
    let attacker_key = Keypair::generate_ed25519();
    let attacker_peer = attacker_key.public().to_peer_id();
    let mut attacker = swarm::build(attacker_key.clone(), &swarm::Config::default(), Store::open(dir.path().join("attacker"))?)?;
    attacker.listen_on(format!("/memory/{}", base + 2).parse()?)?;
    attacker.dial(writer_addr)?;
    let topic = sync::topic(&core);
    attacker.behaviour_mut().gossipsub.subscribe(&topic)?;
    let writer_peer = writer.peer_id;
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
    // Let gossip deliver and the writer judge everything the attacker sent.
    let _ = drive_until(&mut attacker, Duration::from_secs(2), |_, _| None::<()>).await;

    // The writer still serves, and a change written now still reaches the follower.
    let info = writer.client.info().await?;
    assert_eq!(info.peer_id, writer.peer_id.to_base58());
    writer.client.cores().set(core, "profile".into(), "name".into(), json!("alice")).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let value = follower.client.cores().get(core, "profile".into(), "name".into()).await?;
        if value == json!("alice") {
            break;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the follower never got the change (it has {value})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let writer_heads = writer.client.cores().list().await?.remove(0).heads;
    let follower_heads = follower.client.cores().list().await?.remove(0).heads;
    assert_eq!(writer_heads, follower_heads);
    // The profile write and the writer's device key (messaging), nothing else.
    assert_eq!(writer.client.cores().list().await?[0].changes, 2, "nothing the attacker sent entered the core");
    writer.stop().await;
    follower.stop().await;
    Ok(())
}
