//! Core sync on the network: live changes over gossipsub (topic `kubelt/core/<address>`,
//! gossipsub v1.1 with messages signed by the sending peer and validated by the core logic
//! before they are forwarded) and catch-up over request-response `/kubelt/core-sync/1.0.0`,
//! which carries one round of Automerge's sync protocol per request (see DESIGN.md, "Cores").
//!
//! The decisions (what is valid, what to send) live in [`crate::core`]; this module only moves
//! bytes.

mod codec;
mod keep_alive;

pub use codec::{CoreSyncCodec, MAX_SYNC_REQUEST_SIZE, MAX_SYNC_RESPONSE_SIZE};
pub use keep_alive::{Gossip, Keep};

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use libp2p::gossipsub::{self, IdentTopic, MessageAuthenticity, ValidationMode};
use libp2p::identity::Keypair;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::StreamProtocol;

use crate::core::Address;

/// Protocol id of the catch-up exchange.
pub const CORE_SYNC_PROTOCOL: StreamProtocol = StreamProtocol::new("/kubelt/core-sync/1.0.0");

/// Largest gossipsub message: a 1 MiB change plus its envelope.
pub const MAX_GOSSIP_MESSAGE: usize = (1 << 20) + (64 << 10);

/// The gossipsub topic of a core.
pub fn topic(core: &Address) -> IdentTopic {
    IdentTopic::new(core.topic())
}

/// Errors building the sync behaviours.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncSetupError {
    /// Gossipsub refused its configuration.
    #[error("invalid gossipsub configuration: {0}")]
    Gossipsub(String),
}

/// Mesh degree of a core's topic (gossipsub's D; libp2p's default is 6, with 5 and 12 as the
/// bounds and 2 outbound). Every copy a peer forwards costs its receiver a transmission through
/// the whole connection stack (noise, yamux, the handlers' polls), and the writer's
/// `flood_publish` (the default) already sends its change straight to every replica it is
/// connected to: with 50 replicas of one core, D = 6 meant 8 copies of each change per replica
/// and 87 ms of CPU per change over all nodes; D = 3 means 3.7 copies and 57 ms, and took the
/// propagation p99 from 57–59 ms to 41–44 ms (issue 16's goal: < 50; `scripts/bench.sh cores`,
/// design notes, "Catch-up and propagation with 20 and 50 replicas"). What forwarding is for —
/// a replica that is not connected to the writer — still has 3 mesh paths, gossip's IHAVE to 6
/// more peers every heartbeat, and catch-up sessions behind them; peer scoring keeps peers that
/// drop or forge out of the mesh.
const MESH_N: usize = 3;
/// Fewer mesh peers than this and the heartbeat grafts more.
const MESH_N_LOW: usize = 2;
/// More mesh peers than this (peers that grafted us) and the heartbeat prunes back to [`MESH_N`].
const MESH_N_HIGH: usize = 4;
/// Mesh peers this node dialed itself, kept so that inbound grafts cannot fill the mesh alone.
const MESH_OUTBOUND_MIN: usize = 1;

/// Gossipsub for core changes: strict signing, app-level validation before forwarding; the
/// node's heartbeat is quicker than libp2p's 1 s so that meshes form fast on small networks.
pub fn gossipsub(keypair: &Keypair, counters: GossipCounters, heartbeat: Duration) -> Result<gossipsub::Behaviour<CountingTransform>, SyncSetupError> {
    let config = gossipsub::ConfigBuilder::default()
        .validation_mode(ValidationMode::Strict)
        .validate_messages()
        .max_transmit_size(MAX_GOSSIP_MESSAGE)
        .heartbeat_interval(heartbeat)
        .duplicate_cache_time(Duration::from_secs(120))
        .mesh_n(MESH_N)
        .mesh_n_low(MESH_N_LOW)
        .mesh_n_high(MESH_N_HIGH)
        .mesh_outbound_min(MESH_OUTBOUND_MIN)
        .build()
        .map_err(|e| SyncSetupError::Gossipsub(e.to_string()))?;
    let mut behaviour = gossipsub::Behaviour::new_with_transform(MessageAuthenticity::Signed(keypair.clone()), config, CountingTransform(counters))
        .map_err(|e| SyncSetupError::Gossipsub(e.to_string()))?;
    behaviour.with_peer_score(peer_score_params(), peer_score_thresholds()).map_err(SyncSetupError::Gossipsub)?;
    Ok(behaviour)
}

/// Gossip a node received and published, counted where gossipsub hands every message it
/// receives to its data transform: before the duplicate check and before the check that the
/// node is subscribed to the topic, so a node that holds no replica of a core and still gets
/// its gossip shows it. Counted in all and per topic (the first [`MAX_COUNTED_TOPICS`] topics
/// seen; later ones count in all only). Cheap to clone; clones share the counts. Simulations
/// read them per node ([`crate::node::Node::gossip`], [`crate::node::Node::gossip_on`]) to
/// show which nodes carry a core's changes.
#[derive(Debug, Clone, Default)]
pub struct GossipCounters(std::sync::Arc<GossipTally>);

/// Most topics counted apart: a peer sending on made-up topics grows the map no further.
pub const MAX_COUNTED_TOPICS: usize = 4096;

#[derive(Debug, Default)]
struct GossipTally {
    received: AtomicU64,
    received_bytes: AtomicU64,
    published: AtomicU64,
    published_bytes: AtomicU64,
    topics: std::sync::Mutex<std::collections::HashMap<gossipsub::TopicHash, GossipCount>>,
}

/// The counts of a [`GossipCounters`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct GossipCount {
    /// Messages received, duplicates and topics not subscribed to included.
    pub received: u64,
    /// Their data bytes.
    pub received_bytes: u64,
    /// Messages this node published.
    pub published: u64,
    /// Their data bytes.
    pub published_bytes: u64,
}

impl GossipCount {
    /// What was counted since `earlier` (counts only grow).
    pub fn since(&self, earlier: &GossipCount) -> GossipCount {
        GossipCount {
            received: self.received.saturating_sub(earlier.received),
            received_bytes: self.received_bytes.saturating_sub(earlier.received_bytes),
            published: self.published.saturating_sub(earlier.published),
            published_bytes: self.published_bytes.saturating_sub(earlier.published_bytes),
        }
    }
}

impl GossipCounters {
    /// The counts now, over every topic.
    pub fn get(&self) -> GossipCount {
        let t = &self.0;
        GossipCount {
            received: t.received.load(Ordering::Relaxed),
            received_bytes: t.received_bytes.load(Ordering::Relaxed),
            published: t.published.load(Ordering::Relaxed),
            published_bytes: t.published_bytes.load(Ordering::Relaxed),
        }
    }

    /// The counts now on one topic (zero for a topic never seen, or seen past
    /// [`MAX_COUNTED_TOPICS`]).
    pub fn on(&self, topic: &gossipsub::TopicHash) -> GossipCount {
        self.0.topics.lock().map(|t| t.get(topic).copied().unwrap_or_default()).unwrap_or_default()
    }

    fn count(&self, topic: &gossipsub::TopicHash, bytes: usize, received: bool) {
        let t = &self.0;
        let bytes = bytes as u64;
        if received {
            t.received.fetch_add(1, Ordering::Relaxed);
            t.received_bytes.fetch_add(bytes, Ordering::Relaxed);
        } else {
            t.published.fetch_add(1, Ordering::Relaxed);
            t.published_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        let Ok(mut topics) = t.topics.lock() else { return };
        let full = topics.len() >= MAX_COUNTED_TOPICS;
        let entry = match topics.get_mut(topic) {
            Some(entry) => entry,
            None if full => return,
            None => topics.entry(topic.clone()).or_default(),
        };
        if received {
            entry.received += 1;
            entry.received_bytes += bytes;
        } else {
            entry.published += 1;
            entry.published_bytes += bytes;
        }
    }
}

/// Gossipsub's identity transform, counting what passes through it (see [`GossipCounters`]).
#[derive(Debug, Clone, Default)]
pub struct CountingTransform(GossipCounters);

impl gossipsub::DataTransform for CountingTransform {
    fn inbound_transform(&self, raw: gossipsub::RawMessage) -> Result<gossipsub::Message, std::io::Error> {
        self.0.count(&raw.topic, raw.data.len(), true);
        gossipsub::IdentityTransform.inbound_transform(raw)
    }

    fn outbound_transform(&self, topic: &gossipsub::TopicHash, data: Vec<u8>) -> Result<Vec<u8>, std::io::Error> {
        self.0.count(topic, data.len(), false);
        gossipsub::IdentityTransform.outbound_transform(topic, data)
    }
}

/// Peer scoring (gossipsub v1.1): a peer that sends changes our validation rejects loses score
/// per topic ([`topic_score_params`]); below the thresholds it no longer gets our gossip, then
/// our messages, then we ignore it altogether. IP colocation is not penalised: people behind
/// one home router, and every node of a test on loopback, share an address.
pub fn peer_score_params() -> gossipsub::PeerScoreParams {
    gossipsub::PeerScoreParams { ip_colocation_factor_weight: 0.0, ..Default::default() }
}

/// Score thresholds: three rejected changes in quick succession graylist a peer (its messages
/// are ignored until the penalty decays).
pub fn peer_score_thresholds() -> gossipsub::PeerScoreThresholds {
    gossipsub::PeerScoreThresholds {
        gossip_threshold: -10.0,
        publish_threshold: -50.0,
        graylist_threshold: -80.0,
        ..Default::default()
    }
}

/// Score parameters of a core's topic. Cores are quiet (a person's devices write now and
/// then), so the mesh-delivery terms that punish silence are off; time in the mesh and first
/// deliveries earn a little; each invalid message costs `10 × count²`, decaying by 70 % a
/// second.
pub fn topic_score_params() -> gossipsub::TopicScoreParams {
    gossipsub::TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.1,
        time_in_mesh_quantum: Duration::from_secs(1),
        time_in_mesh_cap: 10.0,
        first_message_deliveries_weight: 0.1,
        first_message_deliveries_cap: 10.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: -10.0,
        invalid_message_deliveries_decay: 0.3,
        ..Default::default()
    }
}

/// The catch-up request-response behaviour.
pub fn core_sync() -> request_response::Behaviour<CoreSyncCodec> {
    request_response::Behaviour::with_codec(
        codec::codec(),
        [(CORE_SYNC_PROTOCOL, ProtocolSupport::Full)],
        request_response::Config::default()
            .with_request_timeout(Duration::from_secs(60))
            .with_max_concurrent_streams(64),
    )
}

#[cfg(test)]
mod tests {
    use libp2p::gossipsub::{DataTransform, RawMessage, TopicHash};

    use super::*;

    fn raw(topic: &TopicHash, data: &[u8]) -> RawMessage {
        RawMessage { source: None, data: data.to_vec(), sequence_number: None, topic: topic.clone(), signature: None, key: None, validated: false }
    }

    #[test]
    fn gossip_is_counted_in_all_and_per_topic() -> Result<(), std::io::Error> {
        let counters = GossipCounters::default();
        let transform = CountingTransform(counters.clone());
        let (a, b) = (TopicHash::from_raw("kubelt/core/a"), TopicHash::from_raw("kubelt/core/b"));
        transform.inbound_transform(raw(&a, b"12345"))?;
        transform.inbound_transform(raw(&a, b"123"))?;
        transform.inbound_transform(raw(&b, b"1"))?;
        transform.outbound_transform(&b, b"1234".to_vec())?;
        assert_eq!(counters.get(), GossipCount { received: 3, received_bytes: 9, published: 1, published_bytes: 4 });
        assert_eq!(counters.on(&a), GossipCount { received: 2, received_bytes: 8, published: 0, published_bytes: 0 });
        assert_eq!(counters.on(&b), GossipCount { received: 1, received_bytes: 1, published: 1, published_bytes: 4 });
        assert_eq!(counters.on(&TopicHash::from_raw("kubelt/core/c")), GossipCount::default());
        Ok(())
    }

    #[test]
    fn topics_past_the_cap_count_in_all_only() -> Result<(), std::io::Error> {
        let counters = GossipCounters::default();
        let transform = CountingTransform(counters.clone());
        for i in 0..MAX_COUNTED_TOPICS + 1 {
            transform.inbound_transform(raw(&TopicHash::from_raw(format!("t{i}")), b"x"))?;
        }
        assert_eq!(counters.get().received, MAX_COUNTED_TOPICS as u64 + 1);
        assert_eq!(counters.on(&TopicHash::from_raw("t0")).received, 1);
        assert_eq!(counters.on(&TopicHash::from_raw(format!("t{MAX_COUNTED_TOPICS}"))).received, 0);
        Ok(())
    }
}
