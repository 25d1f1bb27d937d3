//! Messages between cores: end-to-end encrypted, delivered while the recipient is offline.
//!
//! Protocol id [`PROTOCOL`] = `/kubelt/msg/1.0.0` (request-response, length-prefixed
//! protobufs `kubelt.msg.v1.MsgRequest`/`MsgResponse` from `proto/msg.proto`, through
//! [`crate::codec::ProstCodec`]). Spec: DESIGN.md, "Messaging and privacy"; the departures
//! are in `docs/design-notes.md`.
//!
//! # Keys
//!
//! Every node that may write a core publishes there, in its own device namespace
//! `_device:<peer id>`, an X25519 **device key** derived from its node key ([`DeviceKey`],
//! [`crate::core::Replica::device_keys`]). A message is sealed to every current device key of
//! the recipient core (HPKE, RFC 9180; [`crypto`]), so each of the recipient's devices can
//! read it and no other replica can: a node that only follows or hosts the core stores
//! ciphertext.
//!
//! # Sending
//!
//! An [`Envelope`](kubelt_proto::msg::Envelope) names the sender core and the recipient core
//! and carries a nonce, the time, the ciphertext, and the author's signature with the owner's
//! delegation it relies on ([`envelope`]). The sender's node keeps it in a persistent outbox
//! ([`outbox`]) until a replica of the recipient takes it: it is sent to every replica that
//! hosts the recipient's inbox as soon as one is online (found through the core's DHT key, as
//! catch-up finds replicas), retried with backoff, and dropped after
//! [`Config::outbox_expiry`] (7 days).
//!
//! # Receiving and replication
//!
//! A replica checks each envelope off the event loop (sizes, signature, body bounds, time,
//! delegation; see [`envelope::verify`]); then, on the event loop, that it hosts the
//! recipient's inbox, that the owner of the sender core has not revoked the author, the sender
//! core's rate, and the inbox bounds ([`inbox`]). A replica that does not hold the sender core
//! follows it (as a contact) and catches it up before that verdict, for at most 5 s
//! ([`senders`]); a revocation learnt later removes the revoked key's stored messages, so the
//! verdict does not depend on the order in which message, sender core and revocation arrive. Accepted messages are written (synced, many per
//! write) before the sender hears "accepted".
//!
//! Who hosts a core's inbox: every node that holds the core, except cores a node follows only
//! to read the recipient's device keys before sending (contacts) — a sender must not learn who
//! else writes to the person. Hosts announce it by subscribing to the gossipsub topic
//! `kubelt/inbox/<address>` (nothing is ever published there). Messages are self-authenticating,
//! so hosts replicate an inbox among themselves without any core change (which a follower
//! could not sign): a newly stored message is pushed to the other hosts online, and hosts
//! compare inventories (the ids they hold or deleted) when they meet and periodically. The id
//! is a hash of the signed body, so duplicates are one message.
//!
//! Deleting a message on a node removes it there and keeps a record of the deletion (for the
//! replay window, [`Config::max_age`]) so that no other host or replay brings it back.

pub mod crypto;
pub mod envelope;
pub mod inbox;
pub mod outbox;
pub mod senders;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::{request_response, StreamProtocol};

pub use crypto::{CryptoError, DeviceKey};
pub use envelope::{MessageId, Refused, SealError, Verified};

use crate::codec::ProstCodec;
use crate::core::Address;
use kubelt_proto::msg::{MsgRequest, MsgResponse};

/// The messaging protocol id.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/kubelt/msg/1.0.0");

/// Largest request: a batch of envelopes, or an inventory of ids.
pub const MAX_REQUEST: usize = 8 << 20;
/// Largest response: outcomes, or a batch of envelopes and wanted ids.
pub const MAX_RESPONSE: usize = 8 << 20;

/// The gossipsub topic whose subscribers host `core`'s inbox.
pub fn inbox_topic(core: &Address) -> libp2p::gossipsub::IdentTopic {
    libp2p::gossipsub::IdentTopic::new(format!("kubelt/inbox/{}", core.to_lower_hex()))
}

/// The request-response codec of `/kubelt/msg/1.0.0`.
pub type MsgCodec = ProstCodec<MsgRequest, MsgResponse>;

/// The `/kubelt/msg/1.0.0` behaviour: inbound and outbound, with the size limits.
pub fn behaviour() -> request_response::Behaviour<MsgCodec> {
    request_response::Behaviour::with_codec(
        ProstCodec::new(MAX_REQUEST, MAX_RESPONSE),
        [(PROTOCOL, request_response::ProtocolSupport::Full)],
        request_response::Config::default().with_request_timeout(Duration::from_secs(30)).with_max_concurrent_streams(256),
    )
}

/// Limits of messaging.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// How long an undelivered message stays in the outbox.
    pub outbox_expiry: Duration,
    /// How old a message may be when a replica receives it; deletions are remembered as long.
    pub max_age: Duration,
    /// Messages one sender core may have in one inbox.
    pub max_per_sender: usize,
    /// Messages in one inbox.
    pub max_messages: usize,
    /// Bytes of one inbox.
    pub max_inbox_bytes: usize,
    /// Messages per second one sender core may deliver to this node (over all inboxes).
    pub rate_per_sender: f64,
    /// Messages one sender core may deliver in a burst.
    pub burst_per_sender: f64,
    /// How often hosts of an inbox compare inventories.
    pub inventory_interval: Duration,
    /// Messages whose sender core this node does not hold wait for its catch-up (bounds).
    pub senders: senders::Limits,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            outbox_expiry: Duration::from_secs(7 * 86_400),
            max_age: Duration::from_secs(30 * 86_400),
            max_per_sender: 1_000,
            max_messages: 10_000,
            max_inbox_bytes: 64 << 20,
            rate_per_sender: 50.0,
            burst_per_sender: 500.0,
            inventory_interval: Duration::from_secs(60),
            senders: senders::Limits::default(),
        }
    }
}

impl Config {
    /// The same limits with another rate per sender core (messages per second and burst).
    pub fn with_rate_per_sender(mut self, per_second: f64, burst: f64) -> Self {
        self.rate_per_sender = per_second;
        self.burst_per_sender = burst;
        self
    }

    /// The same limits with another bound on messages in one inbox.
    pub fn with_max_messages(mut self, max: usize) -> Self {
        self.max_messages = max;
        self
    }

    /// The same limits with another bound on messages of one sender in one inbox.
    pub fn with_max_per_sender(mut self, max: usize) -> Self {
        self.max_per_sender = max;
        self
    }
}

/// Token buckets per sender core. Bounded: past [`RateLimiter::MAX_SENDERS`] buckets, the full
/// ones (senders that have been quiet) are forgotten.
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: HashMap<Address, (f64, Instant)>,
}

impl RateLimiter {
    /// Most sender cores tracked.
    pub const MAX_SENDERS: usize = 10_000;

    /// Takes one token of `sender`'s bucket; `false` when it is empty.
    pub fn take(&mut self, sender: Address, now: Instant, rate: f64, burst: f64) -> bool {
        if self.buckets.len() >= Self::MAX_SENDERS && !self.buckets.contains_key(&sender) {
            self.buckets.retain(|_, (tokens, at)| *tokens + now.duration_since(*at).as_secs_f64() * rate < burst);
            if self.buckets.len() >= Self::MAX_SENDERS {
                return false;
            }
        }
        let (tokens, at) = self.buckets.entry(sender).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sender_over_its_rate_is_refused_and_others_are_not() {
        let mut limiter = RateLimiter::default();
        let now = Instant::now();
        let a = Address::from_bytes([1; 20]);
        let b = Address::from_bytes([2; 20]);
        let taken = (0..20).filter(|_| limiter.take(a, now, 1.0, 5.0)).count();
        assert_eq!(taken, 5);
        assert!(limiter.take(b, now, 1.0, 5.0));
        assert!(limiter.take(a, now + Duration::from_millis(1100), 1.0, 5.0));
    }
}
