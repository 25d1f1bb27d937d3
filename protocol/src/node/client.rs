//! The handle through which everything outside the event loop talks to the swarm.

use cid::Cid;
use libp2p::{Multiaddr, PeerId};

use super::content::FetchError;
use crate::bitswap::{SessionId, Stats as BitswapStats};
use crate::core::Address;
use kubelt_proto::core::OwnerStatement;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

/// A request to the event loop, with the channel its answer goes back on.
#[derive(Debug)]
pub(crate) enum Command {
    Info { reply: oneshot::Sender<NodeInfo> },
    Peers { reply: oneshot::Sender<Vec<PeerInfo>> },
    RoutingTable { reply: oneshot::Sender<Vec<PeerInfo>> },
    Connect { addr: Multiaddr, reply: oneshot::Sender<Result<PeerId, ConnectError>> },
    /// Close every connection with the peer and refuse new ones (`blocked: false` lifts it).
    Block { peer: PeerId, blocked: bool, reply: oneshot::Sender<()> },
    Status { reply: oneshot::Sender<NodeStatus> },
    NewSession { reply: oneshot::Sender<SessionId> },
    CloseSession { session: SessionId },
    /// Resolves once the block is in the store, or with the reason it could not be fetched.
    FetchBlock { cid: Cid, session: SessionId, reply: oneshot::Sender<Result<(), FetchError>> },
    /// Announce in the DHT that this node has `cid`.
    Provide { cid: Cid },
    /// Blocks were added locally: peers that want them get them.
    BlocksAdded { cids: Vec<Cid> },
    CoreFollow { core: Address, reply: oneshot::Sender<Result<CoreSummary, CoreCommandError>> },
    CoreSubmit { statement: OwnerStatement, reply: oneshot::Sender<Result<SubmitOutcome, CoreCommandError>> },
    CoreSet {
        core: Address,
        namespace: String,
        path: String,
        value: serde_json::Value,
        reply: oneshot::Sender<Result<CoreSummary, CoreCommandError>>,
    },
    CoreGet {
        core: Address,
        namespace: String,
        path: String,
        reply: oneshot::Sender<Result<serde_json::Value, CoreCommandError>>,
    },
    CoreList { reply: oneshot::Sender<Vec<CoreSummary>> },
    CoreRevocationMessage { core: Address, peer: PeerId, reply: oneshot::Sender<Result<String, CoreCommandError>> },
}

/// A core held by this node, as `kubelt core ls` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct CoreSummary {
    /// The owner's address, EIP-55 checksummed.
    pub address: String,
    /// Current heads (hex change hashes), sorted.
    pub heads: Vec<String>,
    /// Changes in the document.
    pub changes: usize,
    /// Changes held back for missing dependencies.
    pub pending: usize,
    /// Other peers known to hold this core (subscribed to its topic).
    pub replicas: usize,
    /// Whether this node holds a delegation to write.
    pub writable: bool,
    /// Top-level namespaces of the document.
    pub namespaces: Vec<String>,
}

/// What a submitted owner statement did.
#[derive(Debug, Clone, Serialize)]
pub struct SubmitOutcome {
    /// `delegation` or `revocation`.
    pub kind: String,
    pub core: String,
    pub peer: String,
}

/// Why a core command failed. Each case is its own variant, so that callers (the JSON-RPC API,
/// apps) can tell "not held" from "revoked" from "bad input"; the message says what to fix.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CoreCommandError {
    /// This node does not hold the core.
    #[error("this node does not hold core {0} (follow it, or submit a delegation)")]
    NotHeld(String),
    /// This node holds the core but has no delegation to write it.
    #[error("this node has no delegation to write to core {0}")]
    NotWritable(String),
    /// The owner revoked this node's key: it may no longer write the core.
    #[error("this node's key was revoked by the owner of core {0}")]
    Revoked(String),
    /// The owner statement is not a valid delegation or revocation.
    #[error("not a valid {kind}: {reason}")]
    InvalidStatement {
        /// `delegation` or `revocation`.
        kind: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The delegation authorizes another node's key.
    #[error("this delegation authorizes peer {delegated}, not this node ({this}): submit it on that node")]
    OtherNode {
        /// The key the delegation names.
        delegated: String,
        /// This node's peer id.
        this: String,
    },
    /// The namespace, path or value is not acceptable.
    #[error("{0}")]
    InvalidInput(String),
    /// The write would break the core's rules (e.g. a namespace the delegation does not cover).
    #[error("{0}")]
    Refused(String),
    /// The store failed.
    #[error("storage failed: {0}")]
    Storage(String),
    /// The node has stopped.
    #[error("the node has stopped")]
    Stopped,
}

/// Who this node is and where it listens.
#[derive(Debug, Clone, Serialize)]
pub struct NodeInfo {
    pub peer_id: String,
    /// Listen addresses, each ending in `/p2p/<peer id>` so they can be given to `--peer`.
    pub addresses: Vec<String>,
    pub agent_version: String,
    pub protocols: Vec<String>,
}

/// A peer as seen by this node.
#[derive(Debug, Clone, Serialize)]
pub struct PeerInfo {
    pub peer_id: String,
    pub addresses: Vec<String>,
    /// The peer's agent version, once identify has told it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// Wanted blocks this node received from the peer over bitswap since it connected (only
    /// for connected peers): shows which peers served a fetch, Kubo's as well as ours.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocks_received: Option<u64>,
}

/// Counters and sizes for `kubelt status`.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub peer_id: String,
    pub agent_version: String,
    pub uptime_secs: u64,
    pub connected_peers: usize,
    pub routing_table_peers: usize,
    pub known_peers: usize,
    pub dht_mode: String,
    pub bootstraps_completed: u64,
    pub connections_established: u64,
    pub connections_closed: u64,
    pub bitswap: BitswapStatus,
}

/// Bitswap counters for `kubelt status`.
#[derive(Debug, Clone, Serialize)]
pub struct BitswapStatus {
    pub blocks_sent: u64,
    pub bytes_sent: u64,
    pub blocks_received: u64,
    pub bytes_received: u64,
    pub duplicate_blocks: u64,
    pub wantlist_size: usize,
}

impl BitswapStatus {
    pub(crate) fn new(stats: BitswapStats, wantlist_size: usize) -> Self {
        BitswapStatus {
            blocks_sent: stats.blocks_sent,
            bytes_sent: stats.block_bytes_sent,
            blocks_received: stats.blocks_received,
            bytes_received: stats.block_bytes_received,
            duplicate_blocks: stats.dup_blocks,
            wantlist_size,
        }
    }
}

/// Why a `connect` failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    #[error("dial of {addr} failed: {reason}")]
    Dial { addr: Multiaddr, reason: String },
    #[error("connecting to {0} timed out")]
    Timeout(Multiaddr),
}

/// Errors of the client itself.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    #[error("the node has stopped")]
    Stopped,
    #[error(transparent)]
    Connect(#[from] ConnectError),
}

/// Changes that entered a core's document on this node (local writes, gossip, catch-up).
#[derive(Debug, Clone)]
pub struct CoreUpdate {
    pub core: Address,
    /// Hex hashes of the changes applied, in order.
    pub applied: Vec<String>,
}

/// A cheap, cloneable handle to a running node.
#[derive(Debug, Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    core_updates: tokio::sync::broadcast::Sender<CoreUpdate>,
}

impl Client {
    pub(crate) fn new(commands: mpsc::Sender<Command>, core_updates: tokio::sync::broadcast::Sender<CoreUpdate>) -> Self {
        Client { commands, core_updates }
    }

    /// Every change applied to a core from now on. A subscriber that falls more than a few
    /// thousand updates behind gets `Lagged` and should re-read the heads.
    pub fn core_updates(&self) -> tokio::sync::broadcast::Receiver<CoreUpdate> {
        self.core_updates.subscribe()
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, NodeError> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(make(reply)).await.map_err(|_| NodeError::Stopped)?;
        answer.await.map_err(|_| NodeError::Stopped)
    }

    /// This node's peer id and addresses.
    pub async fn info(&self) -> Result<NodeInfo, NodeError> {
        self.ask(|reply| Command::Info { reply }).await
    }

    /// Peers with an open connection.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, NodeError> {
        self.ask(|reply| Command::Peers { reply }).await
    }

    /// Peers in the Kademlia routing table.
    pub async fn routing_table(&self) -> Result<Vec<PeerInfo>, NodeError> {
        self.ask(|reply| Command::RoutingTable { reply }).await
    }

    /// Dials an address and waits until the connection is up.
    pub async fn connect(&self, addr: Multiaddr) -> Result<PeerId, NodeError> {
        Ok(self.ask(|reply| Command::Connect { addr, reply }).await??)
    }

    /// Closes every connection with `peer` and refuses new ones, dialed or incoming, until
    /// [`unblock_peer`](Self::unblock_peer): how tests cut a network in two while every node
    /// keeps running. Returns once new connections are refused; open ones close as the swarm
    /// next runs.
    pub async fn block_peer(&self, peer: PeerId) -> Result<(), NodeError> {
        self.ask(|reply| Command::Block { peer, blocked: true, reply }).await
    }

    /// Lifts a [`block_peer`](Self::block_peer). Nothing is dialed here: the node reconnects
    /// as it always does (the maintenance tick dials known peers, core lookups dial replicas),
    /// and catch-up runs once the peer is back.
    pub async fn unblock_peer(&self, peer: PeerId) -> Result<(), NodeError> {
        self.ask(|reply| Command::Block { peer, blocked: false, reply }).await
    }

    /// Counters for `kubelt status`.
    pub async fn status(&self) -> Result<NodeStatus, NodeError> {
        self.ask(|reply| Command::Status { reply }).await
    }

    /// Starts a bitswap session: blocks fetched in one session are asked first from the peers
    /// that sent earlier blocks of it.
    pub async fn new_session(&self) -> Result<SessionId, NodeError> {
        self.ask(|reply| Command::NewSession { reply }).await
    }

    /// Ends a session (best effort: never blocks).
    pub fn close_session(&self, session: SessionId) {
        let _ = self.commands.try_send(Command::CloseSession { session });
    }

    /// Fetches a block over bitswap into the store.
    pub async fn fetch_block(&self, cid: Cid, session: SessionId) -> Result<(), FetchError> {
        self.ask(|reply| Command::FetchBlock { cid, session, reply }).await.map_err(|_| FetchError::Stopped)?
    }

    /// Announces `cid` in the DHT.
    pub async fn provide(&self, cid: Cid) -> Result<(), NodeError> {
        self.commands.send(Command::Provide { cid }).await.map_err(|_| NodeError::Stopped)
    }

    /// Holds a replica of a core without write rights.
    pub async fn core_follow(&self, core: Address) -> Result<CoreSummary, CoreCommandError> {
        self.ask(|reply| Command::CoreFollow { core, reply }).await.map_err(stopped)?
    }

    /// Verifies and applies an owner-signed delegation (for this node) or revocation.
    pub async fn core_submit(&self, statement: OwnerStatement) -> Result<SubmitOutcome, CoreCommandError> {
        self.ask(|reply| Command::CoreSubmit { statement, reply }).await.map_err(stopped)?
    }

    /// Writes a JSON value at `namespace/path`; returns once the change is on disk.
    pub async fn core_set(&self, core: Address, namespace: String, path: String, value: serde_json::Value) -> Result<CoreSummary, CoreCommandError> {
        self.ask(|reply| Command::CoreSet { core, namespace, path, value, reply }).await.map_err(stopped)?
    }

    /// Reads the JSON value at `namespace/path` (`path` empty: the whole namespace).
    pub async fn core_get(&self, core: Address, namespace: String, path: String) -> Result<serde_json::Value, CoreCommandError> {
        self.ask(|reply| Command::CoreGet { core, namespace, path, reply }).await.map_err(stopped)?
    }

    /// The revocation text for the owner to sign: it keeps the changes `peer` made so far.
    pub async fn core_revocation_message(&self, core: Address, peer: PeerId) -> Result<String, CoreCommandError> {
        self.ask(|reply| Command::CoreRevocationMessage { core, peer, reply }).await.map_err(stopped)?
    }

    /// The cores held.
    pub async fn core_list(&self) -> Result<Vec<CoreSummary>, NodeError> {
        self.ask(|reply| Command::CoreList { reply }).await
    }

    /// Tells bitswap about blocks added locally.
    pub async fn blocks_added(&self, cids: Vec<Cid>) -> Result<(), NodeError> {
        self.commands.send(Command::BlocksAdded { cids }).await.map_err(|_| NodeError::Stopped)
    }
}

fn stopped(_: NodeError) -> CoreCommandError {
    CoreCommandError::Stopped
}
