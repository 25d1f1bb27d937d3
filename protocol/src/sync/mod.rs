//! Core sync on the network: live changes over gossipsub (topic `kubelt/core/<address>`,
//! gossipsub v1.1 with messages signed by the sending peer and validated by the core logic
//! before they are forwarded) and catch-up over request-response `/kubelt/core-sync/1.0.0`,
//! which carries one round of Automerge's sync protocol per request (see DESIGN.md, "Cores").
//!
//! The decisions (what is valid, what to send) live in [`crate::core`]; this module only moves
//! bytes.

mod codec;

pub use codec::{CoreSyncCodec, MAX_SYNC_REQUEST_SIZE, MAX_SYNC_RESPONSE_SIZE};

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

/// Gossipsub for core changes: strict signing, app-level validation before forwarding,
/// a quick heartbeat so meshes form fast on small networks.
pub fn gossipsub(keypair: &Keypair, counters: GossipCounters) -> Result<gossipsub::Behaviour<CountingTransform>, SyncSetupError> {
    let config = gossipsub::ConfigBuilder::default()
        .validation_mode(ValidationMode::Strict)
        .validate_messages()
        .max_transmit_size(MAX_GOSSIP_MESSAGE)
        .heartbeat_interval(Duration::from_millis(500))
        .duplicate_cache_time(Duration::from_secs(120))
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
/// its gossip shows it. Cheap to clone; clones share the counts. Simulations read them per node
/// ([`crate::node::Node::gossip`]) to show which nodes carry a core's changes.
#[derive(Debug, Clone, Default)]
pub struct GossipCounters(std::sync::Arc<GossipTally>);

#[derive(Debug, Default)]
struct GossipTally {
    received: AtomicU64,
    received_bytes: AtomicU64,
    published: AtomicU64,
    published_bytes: AtomicU64,
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
    /// The counts now.
    pub fn get(&self) -> GossipCount {
        let t = &self.0;
        GossipCount {
            received: t.received.load(Ordering::Relaxed),
            received_bytes: t.received_bytes.load(Ordering::Relaxed),
            published: t.published.load(Ordering::Relaxed),
            published_bytes: t.published_bytes.load(Ordering::Relaxed),
        }
    }
}

/// Gossipsub's identity transform, counting what passes through it (see [`GossipCounters`]).
#[derive(Debug, Clone, Default)]
pub struct CountingTransform(GossipCounters);

impl gossipsub::DataTransform for CountingTransform {
    fn inbound_transform(&self, raw: gossipsub::RawMessage) -> Result<gossipsub::Message, std::io::Error> {
        let tally = &(self.0).0;
        tally.received.fetch_add(1, Ordering::Relaxed);
        tally.received_bytes.fetch_add(raw.data.len() as u64, Ordering::Relaxed);
        gossipsub::IdentityTransform.inbound_transform(raw)
    }

    fn outbound_transform(&self, topic: &gossipsub::TopicHash, data: Vec<u8>) -> Result<Vec<u8>, std::io::Error> {
        let tally = &(self.0).0;
        tally.published.fetch_add(1, Ordering::Relaxed);
        tally.published_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
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
