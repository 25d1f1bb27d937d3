//! The handle through which everything outside the event loop talks to the swarm.
//!
//! One [`Client`] per node, cheap to clone. Node-wide questions (`info`, `status`) are asked on
//! it directly; each domain has its own sub-handle with its own commands and errors, in the
//! shape of iroh-blobs' `store.blobs()`/`store.tags()`:
//! [`net()`](Client::net) (peers and connections), [`content()`](Client::content) (bitswap
//! and provider records) and [`cores()`](Client::cores) (replicas of cores). What happens in
//! the node without being asked (peers coming and going, core changes arriving) is on the
//! [`events()`](Client::events) stream.
//!
//! Adding a domain (messaging, apps) means a file here with its command enum and handle, one
//! variant in [`Command`] and one accessor on [`Client`].

mod content;
mod cores;
mod msg;
mod net;

pub use content::ContentClient;
pub(crate) use content::ContentCommand;
pub use cores::{CoreCommandError, CoreSummary, CoreUpdate, CoresClient, Holding, StatementKind, SubmitOutcome, UnlockOutcome};
pub(crate) use cores::CoreCommand;
pub use net::{ConnectError, NatStatus, NetClient, PeerInfo, ProviderLookup, RelayServerStatus};
pub use msg::{InboxMessage, MsgClient, MsgError, OutboxEntry, Sent};
pub(crate) use msg::{now_ms, MsgCommand, RawMessages, Sealer};
pub(crate) use net::NetCommand;

use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::bitswap::Stats as BitswapStats;

/// A request to the event loop, by domain; each carries the channel its answer goes back on.
#[derive(Debug)]
pub(crate) enum Command {
    /// Who this node is and where it listens.
    Info { reply: oneshot::Sender<NodeInfo> },
    /// Counters for `kubelt status`.
    Status { reply: oneshot::Sender<NodeStatus> },
    Net(NetCommand),
    Content(ContentCommand),
    Cores(CoreCommand),
    Msg(MsgCommand),
}

/// What happened in the node without anyone asking: for API subscriptions, tests and
/// benchmarks. A subscriber that falls more than [`crate::node::Config::event_buffer`] events
/// behind (4,096 by default) gets `Lagged` and should re-read what it follows.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum NodeEvent {
    /// Changes entered a core's document on this node (local writes, gossip, catch-up).
    CoreUpdated(CoreUpdate),
    /// A change that `from` sent (by gossip or catch-up) failed verification: it was dropped,
    /// and gossipsub does not forward it.
    ChangeRejected {
        /// The core the change claimed to be for.
        core: crate::core::Address,
        /// The peer that handed it over (the gossip propagation source, or the catch-up peer).
        from: libp2p::PeerId,
        /// Why it was refused.
        reason: crate::core::Rejected,
    },
    /// The first connection with a peer opened.
    PeerConnected {
        /// The peer.
        peer: libp2p::PeerId,
    },
    /// The last connection with a peer closed.
    PeerDisconnected {
        /// The peer.
        peer: libp2p::PeerId,
    },
    /// A message entered an inbox this node hosts (from its sender, or from another host).
    MessageReceived {
        /// The recipient core.
        core: crate::core::Address,
        /// The message.
        id: crate::msg::MessageId,
        /// The sender core.
        from: crate::core::Address,
    },
    /// A replica of its recipient took a message this node sent.
    MessageDelivered {
        /// The message.
        id: crate::msg::MessageId,
        /// The recipient core.
        to: crate::core::Address,
    },
    /// A replica of its recipient refused a message this node sent, for good (it left the
    /// outbox).
    MessageRefused {
        /// The message.
        id: crate::msg::MessageId,
        /// The recipient core.
        to: crate::core::Address,
        /// Why, in the replica's words.
        reason: String,
    },
}

/// Who this node is and where it listens.
#[derive(Debug, Clone, Serialize)]
pub struct NodeInfo {
    /// This node's peer id (base58).
    pub peer_id: String,
    /// Listen addresses, each ending in `/p2p/<peer id>` so they can be given to `--peer`.
    pub addresses: Vec<String>,
    /// `kubelt/<version>`, as announced over identify.
    pub agent_version: String,
    /// Every protocol the node speaks, as announced over identify.
    pub protocols: Vec<String>,
}

/// Counters and sizes for `kubelt status`.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    /// This node's peer id (base58).
    pub peer_id: String,
    /// `kubelt/<version>`.
    pub agent_version: String,
    /// Seconds since the node started.
    pub uptime_secs: u64,
    /// Peers with an open connection.
    pub connected_peers: usize,
    /// Peers in the Kademlia routing table.
    pub routing_table_peers: usize,
    /// Peers remembered in the peer book (dialed again after a restart).
    pub known_peers: usize,
    /// `server` or `client` (with `dht_mode = "auto"`, what AutoNAT's verdict made it).
    pub dht_mode: String,
    /// Reachability (`public`, `private`, `unknown`), confirmed external addresses, relays.
    #[serde(flatten)]
    pub nat: NatStatus,
    /// Kademlia bootstraps (random walks) completed.
    pub bootstraps_completed: u64,
    /// Kademlia bootstraps whose last query timed out.
    pub bootstraps_failed: u64,
    /// Connections opened since start.
    pub connections_established: u64,
    /// Connections closed since start.
    pub connections_closed: u64,
    /// Bitswap counters.
    pub bitswap: BitswapStatus,
}

/// Bitswap counters for `kubelt status`.
#[derive(Debug, Clone, Serialize)]
pub struct BitswapStatus {
    /// Blocks sent to peers.
    pub blocks_sent: u64,
    /// Bytes of the blocks sent.
    pub bytes_sent: u64,
    /// Wanted blocks received, verified and stored.
    pub blocks_received: u64,
    /// Bytes of the blocks received.
    pub bytes_received: u64,
    /// Blocks received that were already here.
    pub duplicate_blocks: u64,
    /// Blocks this node wants now.
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

/// Errors of the client itself.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The node's task has ended.
    #[error("the node has stopped")]
    Stopped,
    /// A `connect` failed.
    #[error(transparent)]
    Connect(#[from] ConnectError),
}

/// A cheap, cloneable handle to a running node.
#[derive(Debug, Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    events: broadcast::Sender<NodeEvent>,
}

impl Client {
    pub(crate) fn new(commands: mpsc::Sender<Command>, events: broadcast::Sender<NodeEvent>) -> Self {
        Client { commands, events }
    }

    /// Peers and connections.
    pub fn net(&self) -> NetClient<'_> {
        NetClient(self)
    }

    /// Blocks over bitswap and provider records.
    pub fn content(&self) -> ContentClient<'_> {
        ContentClient(self)
    }

    /// The core replicas this node holds.
    pub fn cores(&self) -> CoresClient<'_> {
        CoresClient(self)
    }

    /// Messages between cores.
    pub fn msg(&self) -> MsgClient<'_> {
        MsgClient(self)
    }

    /// Everything that happens in the node from now on (see [`NodeEvent`]).
    pub fn events(&self) -> broadcast::Receiver<NodeEvent> {
        self.events.subscribe()
    }

    /// This node's peer id, addresses and protocols.
    pub async fn info(&self) -> Result<NodeInfo, NodeError> {
        self.ask(|reply| Command::Info { reply }).await
    }

    /// Counters for `kubelt status`.
    pub async fn status(&self) -> Result<NodeStatus, NodeError> {
        self.ask(|reply| Command::Status { reply }).await
    }

    /// Sends a command and waits for its answer.
    pub(crate) async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, NodeError> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(make(reply)).await.map_err(|_| NodeError::Stopped)?;
        answer.await.map_err(|_| NodeError::Stopped)
    }

    /// Sends a command that has no answer.
    pub(crate) async fn tell(&self, command: Command) -> Result<(), NodeError> {
        self.commands.send(command).await.map_err(|_| NodeError::Stopped)
    }

    /// Sends a command without waiting, dropping it if the queue is full (best effort).
    pub(crate) fn try_tell(&self, command: Command) {
        let _ = self.commands.try_send(command);
    }
}
