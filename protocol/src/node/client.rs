//! The handle through which everything outside the event loop talks to the swarm.

use libp2p::{Multiaddr, PeerId};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

/// A request to the event loop, with the channel its answer goes back on.
#[derive(Debug)]
pub(crate) enum Command {
    Info { reply: oneshot::Sender<NodeInfo> },
    Peers { reply: oneshot::Sender<Vec<PeerInfo>> },
    RoutingTable { reply: oneshot::Sender<Vec<PeerInfo>> },
    Connect { addr: Multiaddr, reply: oneshot::Sender<Result<PeerId, ConnectError>> },
    Status { reply: oneshot::Sender<NodeStatus> },
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

/// A cheap, cloneable handle to a running node.
#[derive(Debug, Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
}

impl Client {
    pub(crate) fn new(commands: mpsc::Sender<Command>) -> Self {
        Client { commands }
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

    /// Counters for `kubelt status`.
    pub async fn status(&self) -> Result<NodeStatus, NodeError> {
        self.ask(|reply| Command::Status { reply }).await
    }
}
