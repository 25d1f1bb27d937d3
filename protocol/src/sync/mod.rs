//! Core sync on the network: live changes over gossipsub (topic `kubelt/core/<address>`,
//! gossipsub v1.1 with messages signed by the sending peer and validated by the core logic
//! before they are forwarded) and catch-up over request-response `/kubelt/core-sync/1.0.0`,
//! which carries one round of Automerge's sync protocol per request (see DESIGN.md, "Cores").
//!
//! The decisions (what is valid, what to send) live in [`crate::core`]; this module only moves
//! bytes.

mod codec;

pub use codec::{CoreSyncCodec, MAX_SYNC_REQUEST_SIZE, MAX_SYNC_RESPONSE_SIZE};

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
    #[error("invalid gossipsub configuration: {0}")]
    Gossipsub(String),
}

/// Gossipsub for core changes: strict signing, app-level validation before forwarding,
/// a quick heartbeat so meshes form fast on small networks.
pub fn gossipsub(keypair: &Keypair) -> Result<gossipsub::Behaviour, SyncSetupError> {
    let config = gossipsub::ConfigBuilder::default()
        .validation_mode(ValidationMode::Strict)
        .validate_messages()
        .max_transmit_size(MAX_GOSSIP_MESSAGE)
        .heartbeat_interval(Duration::from_millis(500))
        .duplicate_cache_time(Duration::from_secs(120))
        .build()
        .map_err(|e| SyncSetupError::Gossipsub(e.to_string()))?;
    gossipsub::Behaviour::new(MessageAuthenticity::Signed(keypair.clone()), config)
        .map_err(|e| SyncSetupError::Gossipsub(e.to_string()))
}

/// The catch-up request-response behaviour.
pub fn core_sync() -> request_response::Behaviour<CoreSyncCodec> {
    request_response::Behaviour::with_codec(
        CoreSyncCodec,
        [(CORE_SYNC_PROTOCOL, ProtocolSupport::Full)],
        request_response::Config::default()
            .with_request_timeout(Duration::from_secs(60))
            .with_max_concurrent_streams(64),
    )
}
