//! Peers and connections: [`NetClient`], the `net` sub-handle of the [`Client`].

use libp2p::{Multiaddr, PeerId};
use serde::Serialize;
use tokio::sync::oneshot;

use super::{Client, Command, NodeError};
use crate::nat::Reachability;

/// A request to the event loop's network part.
#[derive(Debug)]
pub(crate) enum NetCommand {
    Peers { reply: oneshot::Sender<Vec<PeerInfo>> },
    RoutingTable { reply: oneshot::Sender<Vec<PeerInfo>> },
    Connect { addr: Multiaddr, reply: oneshot::Sender<Result<PeerId, ConnectError>> },
    /// Close every connection with the peer and refuse new ones (`blocked: false` lifts it).
    Block { peer: PeerId, blocked: bool, reply: oneshot::Sender<()> },
    FindProviders { key: Vec<u8>, reply: oneshot::Sender<ProviderLookup> },
    StoredProviders { key: Vec<u8>, reply: oneshot::Sender<Vec<PeerId>> },
}

/// What a DHT lookup of providers found ([`NetClient::find_providers`]), and what it cost.
#[derive(Debug, Clone, Serialize)]
pub struct ProviderLookup {
    /// The providers named (this node aside) until three were, or until the query ended with
    /// fewer (empty: none found). A DHT server keeps a provider's record for its lifetime after
    /// the provider left, so some of them may be gone.
    pub providers: Vec<PeerId>,
    /// Rounds of the iterative lookup until then, estimated from Kademlia's counts:
    /// the successful requests so far over the query's parallelism α, rounded up (libp2p
    /// reports counts, not the path). 0: this node stores a provider record of the key.
    pub hops: u32,
    /// DHT requests sent until then.
    pub requests: u32,
    /// Of those, the ones answered.
    pub successes: u32,
    /// Time from the start of the query until then.
    pub elapsed: std::time::Duration,
}

/// A peer as seen by this node.
#[derive(Debug, Clone, Serialize)]
pub struct PeerInfo {
    /// The peer's id (base58).
    pub peer_id: String,
    /// Remote addresses of the open connections, or the routing table's addresses.
    pub addresses: Vec<String>,
    /// Connected peers only: whether every open connection goes through a relay
    /// (`/p2p-circuit`). Such a peer gets core changes and DHT traffic within the relay's
    /// limits, and no content: bitswap waits for a direct connection (hole punching).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relayed: Option<bool>,
    /// The peer's agent version, once identify has told it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// Wanted blocks this node received from the peer over bitswap since it connected (only
    /// for connected peers): shows which peers served a fetch, Kubo's as well as ours.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocks_received: Option<u64>,
}

/// Relay server counters, for `kubelt status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RelayServerStatus {
    /// Reservations held by peers now.
    pub reservations: usize,
    /// Circuits open now.
    pub circuits: usize,
    /// Reservations refused since start (limits reached).
    pub reservations_denied: u64,
    /// Circuits refused since start (limits reached, no reservation).
    pub circuits_denied: u64,
    /// Circuits ended since start because they carried more than the byte limit.
    pub circuits_closed_at_byte_limit: u64,
    /// Circuits ended since start because they were open for the time limit.
    pub circuits_closed_at_time_limit: u64,
}

/// What this node knows about its own reachability, for `kubelt status`.
#[derive(Debug, Clone, Serialize)]
pub struct NatStatus {
    /// `public`, `private` or `unknown` (AutoNAT's verdict).
    pub reachability: Reachability,
    /// Addresses that AutoNAT confirmed by dialing them back.
    pub external_addresses: Vec<String>,
    /// `/p2p-circuit` addresses through the relays this node holds a reservation on.
    pub relay_addresses: Vec<String>,
    /// Why the last relay reservation failed, if one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay_error: Option<String>,
    /// The relay server's counters, when this node is a relay.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay_server: Option<RelayServerStatus>,
    /// Relayed connections upgraded to direct ones by hole punching since start.
    pub hole_punches_succeeded: u64,
    /// Hole punches that failed since start.
    pub hole_punches_failed: u64,
    /// Relayed connections that closed under this node since start (the relay ended the
    /// circuit at its limits, or the relay or the peer went away).
    pub relayed_connections_cut: u64,
    /// The last of them, and the relay's limits that most likely ended it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_relay_cut: Option<String>,
}

/// Why a `connect` failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The dial failed.
    #[error("dial of {addr} failed: {reason}")]
    Dial {
        /// The address dialed.
        addr: Multiaddr,
        /// What the transport said.
        reason: String,
    },
    /// The dial took too long.
    #[error("connecting to {0} timed out")]
    Timeout(Multiaddr),
}

/// Peers and connections of a node.
#[derive(Debug, Clone, Copy)]
pub struct NetClient<'a>(pub(super) &'a Client);

impl NetClient<'_> {
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> NetCommand) -> Result<T, NodeError> {
        self.0.ask(|reply| Command::Net(make(reply))).await
    }

    /// Peers with an open connection.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, NodeError> {
        self.ask(|reply| NetCommand::Peers { reply }).await
    }

    /// Peers in the Kademlia routing table.
    pub async fn routing_table(&self) -> Result<Vec<PeerInfo>, NodeError> {
        self.ask(|reply| NetCommand::RoutingTable { reply }).await
    }

    /// Dials an address and waits until the connection is up.
    pub async fn connect(&self, addr: Multiaddr) -> Result<PeerId, NodeError> {
        Ok(self.ask(|reply| NetCommand::Connect { addr, reply }).await??)
    }

    /// Closes every connection with `peer` and refuses new ones, dialed or incoming, until
    /// [`unblock_peer`](Self::unblock_peer): how tests cut a network in two while every node
    /// keeps running. Returns once new connections are refused; open ones close as the swarm
    /// next runs.
    pub async fn block_peer(&self, peer: PeerId) -> Result<(), NodeError> {
        self.ask(|reply| NetCommand::Block { peer, blocked: true, reply }).await
    }

    /// Lifts a [`block_peer`](Self::block_peer). Nothing is dialed here: the node reconnects
    /// as it always does (the maintenance tick dials known peers, core lookups dial replicas),
    /// and catch-up runs once the peer is back.
    pub async fn unblock_peer(&self, peer: PeerId) -> Result<(), NodeError> {
        self.ask(|reply| NetCommand::Block { peer, blocked: false, reply }).await
    }

    /// Looks up the providers of a DHT key (a core's [`dht_key`](crate::core::Address::dht_key),
    /// a block's multihash) and answers with the first three providers found (see
    /// [`ProviderLookup::providers`]), and how many rounds and requests that took; the query
    /// stops there. What simulations measure lookups with.
    pub async fn find_providers(&self, key: Vec<u8>) -> Result<ProviderLookup, NodeError> {
        self.ask(|reply| NetCommand::FindProviders { key, reply }).await
    }

    /// The providers of a DHT key that this node's own record store holds (what it answers a
    /// `GET_PROVIDERS` with; this node among them if it provides the key), without asking
    /// anyone. Shows where a key's records are: simulations check a failed lookup with it.
    pub async fn stored_providers(&self, key: Vec<u8>) -> Result<Vec<PeerId>, NodeError> {
        self.ask(|reply| NetCommand::StoredProviders { key, reply }).await
    }
}
