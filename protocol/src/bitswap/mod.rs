//! Bitswap: exchanging blocks with any peer, wire-compatible with Kubo (boxo/bitswap).
//!
//! Implements the [bitswap spec](https://specs.ipfs.tech/bitswap-protocol/) on
//! `/ipfs/bitswap/1.2.0` (preferred), `/ipfs/bitswap/1.1.0`, `/ipfs/bitswap/1.0.0` and
//! `/ipfs/bitswap`. Frames are an unsigned-varint length and one protobuf `Message`
//! (`proto/bitswap.proto`, boxo's `message.proto`), at most [`Config::max_message_size`] bytes.
//!
//! Layout, rust-libp2p style with the decisions kept I/O-free:
//! - [`protocol`]: protocol ids, the stream upgrade, the frame codec;
//! - [`message`]: the message in Rust terms and its encoding per wire version; received
//!   blocks are hashed while decoding (on the connection's task, not the swarm's);
//! - [`ledger`]: what peers want from us and what to answer next (serving);
//! - [`session`]: what we want, from whom, retries and timeouts (requesting);
//! - [`handler`]: one per connection: parallel inbound streams, a long-lived ordered stream
//!   for our wants and a few for our answers;
//! - [`behaviour`]: the [`Behaviour`] gluing them to the [`Store`](crate::store::Store):
//!   answers from what memory holds at once, disk reads and block writes on blocking threads,
//!   so the swarm task never waits for the disk.
//!
//! Relayed connections (`/p2p-circuit`) are not used: the peer counts as not connected for
//! bitswap until a direct connection exists (relays carry core changes, not content).
//!
//! Every block we store was hashed here first: a block whose bytes do not hash to a CID we
//! want is never stored, is counted in [`Stats::bad_blocks`], and gets its sender banned after
//! [`Config::max_bad_blocks`] such blocks.
//!
//! # Usage
//!
//! ```ignore
//! let mut bitswap = bitswap::Behaviour::new(store.clone(), bitswap::Config::default());
//! // ... in the swarm's behaviour; then, from the event loop:
//! let session = swarm.behaviour_mut().bitswap.want(vec![root], None);
//! // more blocks of the same DAG: same session, so they go to the peers that had the root
//! swarm.behaviour_mut().bitswap.want(children, Some(session));
//! match event {
//!     bitswap::Event::BlockReceived { session, cid, .. } => { /* read it from the store */ }
//!     bitswap::Event::FindProviders { cid, .. } => { kad.get_providers(cid.hash().to_bytes().into()); }
//!     bitswap::Event::NotFound { cid, error, .. } => { /* give up: error says why */ }
//!     _ => {}
//! }
//! // blocks added by an import or the API: peers waiting for them get them now
//! swarm.behaviour_mut().bitswap.notify_new_blocks(cids);
//! ```
//!
//! Peers found by a provider search only need to be dialed: every connected peer gets the
//! active wants. Call [`Behaviour::close_session`] when a fetch is abandoned.
//!
//! # Interop notes
//!
//! - Kubo's answers (blocks, HAVE/DONT_HAVE) each come on a new stream that Kubo closes right
//!   after writing. Over QUIC, go-libp2p before v0.38 (Kubo before ~0.33) closes before reading
//!   the multistream-select echo, which rust-libp2p's listener treats as a failed negotiation
//!   and drops the stream with its data (`failed to upgrade inbound stream: sending stopped by
//!   peer`); go-multistream#87 made Go listeners tolerate this. Over TCP/yamux it works. The
//!   node needs `multistream-select` patched the same way to fetch from older Kubo over QUIC.
//! - Many Kubo peers have RSA identities: libp2p needs its `rsa` feature to connect to them.
//! - Peers speaking 1.0.0/1.1.0 are asked with want-block only (they ignore want-have and
//!   never send DONT_HAVE, so only timeouts move such a want on).

mod behaviour;
mod handler;
mod ledger;
mod message;
mod protocol;
mod session;

use std::fmt;
use std::time::Duration;

use cid::Cid;
use libp2p::PeerId;

pub use behaviour::Behaviour;
pub use message::{cid_prefix, Message, Prefix, Presence, ReceivedMessage, WantType, WantlistEntry, MAX_ITEMS_PER_MESSAGE};
pub use protocol::{read_frame, FrameError, Version, PROTOCOLS, PROTOCOL_1_0_0, PROTOCOL_1_1_0, PROTOCOL_1_2_0, PROTOCOL_LEGACY};

/// Identifies a group of wants fetched together (a file, a DAG): blocks of a session are first
/// asked from the peers that already sent blocks of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub(crate) u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "session-{}", self.0)
    }
}

/// Why a want was given up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WantError {
    /// No peer sent the block in time.
    #[error("block {cid} not found within {after:?} (asked {peers_asked} peers, {dont_have} answered DONT_HAVE)")]
    TimedOut {
        /// The block wanted.
        cid: Cid,
        /// How long it was wanted.
        after: Duration,
        /// Peers asked for it.
        peers_asked: usize,
        /// Peers that answered they do not have it.
        dont_have: usize,
    },
    /// The block arrived and was verified, but could not be written.
    #[error("block {cid} arrived but could not be stored: {reason}")]
    Store {
        /// The block received.
        cid: Cid,
        /// What the store said.
        reason: String,
    },
}

/// What bitswap reports to the node's event loop.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// A wanted block is in the store (verified). `from` is `None` when it was already there
    /// or was added locally while wanted.
    BlockReceived {
        /// The session that wanted it.
        session: SessionId,
        /// The block.
        cid: Cid,
        /// The peer that sent it, if it came from the network.
        from: Option<PeerId>,
        /// Its size in bytes.
        size: usize,
    },
    /// No connected peer has `cid`: look up its providers (Kademlia) and dial them; connected
    /// peers get the session's wants automatically. Repeated at most every
    /// [`Config::provider_search_interval`] per session while the want is pending.
    FindProviders {
        /// The session that wants it.
        session: SessionId,
        /// The block to find providers of.
        cid: Cid,
    },
    /// The want for `cid` was given up.
    NotFound {
        /// The session that wanted it.
        session: SessionId,
        /// The block given up.
        cid: Cid,
        /// Why it was given up.
        error: WantError,
    },
    /// `peer` sent blocks that failed verification and is no longer asked for anything; the
    /// node may disconnect it.
    PeerMisbehaved {
        /// The peer.
        peer: PeerId,
        /// What it sent.
        reason: String,
    },
}

/// Tuning. The defaults favour throughput on good links; every limit is also a memory bound.
#[derive(Debug, Clone)]
pub struct Config {
    /// Largest frame we read or write. Kubo's limit is 4 MiB, and blocks go up to 2 MiB.
    pub max_message_size: usize,
    /// Blocks are batched into one answer until it reaches this size.
    pub target_message_size: usize,
    /// want-blocks outstanding per peer: deep enough to keep a fast link busy.
    pub max_in_flight_per_peer: usize,
    /// want-blocks outstanding over all peers.
    pub max_in_flight_total: usize,
    /// A peer that sends no block this long after a want-block (or no answer to a want-have)
    /// is passed over for that block.
    pub request_timeout: Duration,
    /// A want with no block after this long ends with [`Event::NotFound`].
    pub want_timeout: Duration,
    /// Minimum time between two [`Event::FindProviders`] of one session.
    pub provider_search_interval: Duration,
    /// Inbound bitswap streams read in parallel per connection; more are refused.
    pub max_inbound_streams: usize,
    /// Outbound streams per connection carrying our answers in parallel (our wants have one
    /// more stream of their own, so their order is kept).
    pub max_response_streams: usize,
    /// Answer bytes queued per connection before we stop reading blocks for that peer.
    pub max_queued_bytes_per_peer: usize,
    /// Wants we keep per peer; entries beyond are ignored.
    pub max_wantlist_entries_per_peer: usize,
    /// Bad blocks after which a peer is banned (not asked for anything any more).
    pub max_bad_blocks: u32,
    /// Time to write one frame before the stream is dropped.
    pub send_timeout: Duration,
    /// Keep a connection open this long after our last want to it, so answers can arrive.
    pub keep_alive: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_message_size: 4 << 20,
            target_message_size: 1 << 20,
            max_in_flight_per_peer: 64,
            max_in_flight_total: 512,
            request_timeout: Duration::from_secs(10),
            want_timeout: Duration::from_secs(120),
            provider_search_interval: Duration::from_secs(10),
            max_inbound_streams: 32,
            max_response_streams: 2,
            max_queued_bytes_per_peer: 8 << 20,
            max_wantlist_entries_per_peer: 16 * 1024,
            max_bad_blocks: 3,
            send_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(60),
        }
    }
}

impl Config {
    /// Sets [`Config::max_message_size`].
    pub fn with_max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }
    /// Sets [`Config::max_in_flight_per_peer`] and [`Config::max_in_flight_total`].
    pub fn with_in_flight(mut self, per_peer: usize, total: usize) -> Self {
        self.max_in_flight_per_peer = per_peer.max(1);
        self.max_in_flight_total = total.max(1);
        self
    }
    /// Sets [`Config::request_timeout`].
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }
    /// Sets [`Config::want_timeout`].
    pub fn with_want_timeout(mut self, timeout: Duration) -> Self {
        self.want_timeout = timeout;
        self
    }
    /// Sets [`Config::provider_search_interval`].
    pub fn with_provider_search_interval(mut self, interval: Duration) -> Self {
        self.provider_search_interval = interval;
        self
    }
    /// Sets [`Config::max_bad_blocks`].
    pub fn with_max_bad_blocks(mut self, n: u32) -> Self {
        self.max_bad_blocks = n.max(1);
        self
    }
    /// Sets [`Config::max_inbound_streams`].
    pub fn with_max_inbound_streams(mut self, n: usize) -> Self {
        self.max_inbound_streams = n.max(1);
        self
    }
}

/// Counters since start (and a few gauges), for `kubelt status` and `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Blocks we sent, and their bytes.
    pub blocks_sent: u64,
    /// Bytes of the blocks we sent.
    pub block_bytes_sent: u64,
    /// Wanted blocks we received, verified and stored, and their bytes.
    pub blocks_received: u64,
    /// Bytes of the wanted blocks we received.
    pub block_bytes_received: u64,
    /// Blocks received that we already had (or had just stopped wanting).
    pub dup_blocks: u64,
    /// Bytes of the duplicate blocks.
    pub dup_bytes: u64,
    /// Blocks that failed verification (bytes matching no CID we asked the sender for, bad
    /// prefix, unsupported hash). Never stored.
    pub bad_blocks: u64,
    /// Valid blocks nobody asked for (dropped).
    pub unwanted_blocks: u64,
    /// HAVE / DONT_HAVE we sent.
    pub haves_sent: u64,
    /// DONT_HAVE we sent.
    pub dont_haves_sent: u64,
    /// Wantlist entries (wants and cancels) we sent.
    pub want_entries_sent: u64,
    /// Frames sent and received.
    pub messages_sent: u64,
    /// Frames received.
    pub messages_received: u64,
    /// Frames we could not decode or that were too large (the stream is dropped).
    pub malformed_messages: u64,
    /// Frames we failed to write (stream error, timeout).
    pub send_failures: u64,
    /// Peers banned for bad blocks.
    pub peers_banned: u64,
    /// Gauge: our active wants.
    pub active_wants: u64,
    /// Gauge: our want-blocks in flight.
    pub in_flight: u64,
    /// Gauge: connected peers that speak bitswap.
    pub peers: u64,
}
