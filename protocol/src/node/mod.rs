//! A running Kubelt node: the one task that owns the swarm, and the [`Client`] that the rest
//! of the program (JSON-RPC API, CLI, tests) uses to talk to it.
//!
//! The shape follows rust-libp2p's `file-sharing` example: a cloneable [`Client`] (with a
//! sub-handle per domain: `net()`, `content()`, `cores()`) sends [`Command`](client::Command)s, each carrying a `oneshot` for its reply, over a bounded
//! channel to the event loop, which `select!`s between swarm events, commands, periodic
//! maintenance and the shutdown token.

mod client;
mod content;
mod event_loop;
mod peers;

pub use client::{
    BitswapStatus, Client, ConnectError, ContentClient, CoreCommandError, CoreSummary, CoreUpdate, CoresClient, Holding, NetClient, NodeError, NodeEvent, NodeInfo,
    NodeStatus, PeerInfo, ProviderLookup, StatementKind, SubmitOutcome, UnlockOutcome,
};
pub use client::{InboxMessage, MsgClient, MsgError, OutboxEntry, Sent};
pub use client::{NatStatus, RelayServerStatus};
pub use content::{fetch_dag, FetchError, NetworkBlocks};
pub use peers::{KnownPeer, PeerBook};

use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::store::Store;
use crate::swarm;

/// Settings of a node.
#[derive(Debug, Clone)]
pub struct Config {
    /// Addresses to listen on (TCP, QUIC, memory).
    pub listen: Vec<Multiaddr>,
    /// Bootstrap peers to dial at start-up and whenever the node has no peers.
    pub bootstrap_peers: Vec<Multiaddr>,
    /// The node keeps dialing known peers until it has this many connections.
    pub target_peers: usize,
    /// How often the node checks its connection count.
    pub maintenance_interval: Duration,
    /// Swarm settings (DHT mode, connection limits).
    pub swarm: swarm::Config,
    /// Limits of core replicas.
    pub cores: crate::core::Config,
    /// Limits of messaging (outbox expiry, inbox bounds, rate per sender core).
    pub msg: crate::msg::Config,
    /// How often replicas run catch-up with every peer that holds the same core.
    pub core_sync_interval: Duration,
    /// Node events kept for subscribers that fall behind (the API's subscriptions); one
    /// further behind gets `Lagged`. The buffer (~200 bytes an event) is allocated at start:
    /// a simulation of many nodes in one process keeps it small.
    pub event_buffer: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: vec![],
            bootstrap_peers: vec![],
            target_peers: 16,
            maintenance_interval: Duration::from_secs(10),
            swarm: swarm::Config::default(),
            cores: crate::core::Config::default(),
            msg: crate::msg::Config::default(),
            core_sync_interval: Duration::from_secs(30),
            event_buffer: 4096,
        }
    }
}

/// Errors starting a node.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The swarm could not be built.
    #[error(transparent)]
    Build(#[from] swarm::BuildError),
    /// A listen address is refused (in use, malformed, not ours).
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// What the transport said.
        reason: String,
    },
    /// The cores in the store could not be loaded.
    #[error("cannot load the cores: {0}")]
    Cores(#[from] crate::core::CoreError),
    #[error("cannot load the messages: {0}")]
    /// The messages column could not be read.
    Messages(crate::store::StoreError),
}

/// A started node: its client handle and the task that runs it. Dropping it stops the node
/// (clients then get [`NodeError`](client::NodeError)s); [`Node::stop`] also waits for the
/// task to finish saving its state.
pub struct Node {
    /// The handle to talk to the node (cheap to clone).
    pub client: Client,
    /// The node's peer id.
    pub peer_id: PeerId,
    task: tokio::task::JoinHandle<()>,
    shutdown: CancellationToken,
    /// Cancels `shutdown` when the node is dropped, so no task outlives its node.
    guard: tokio_util::sync::DropGuard,
    gossip: crate::sync::GossipCounters,
}

impl Node {
    /// Builds the swarm, starts listening and spawns the event loop.
    ///
    /// Listen addresses that fail are reported as errors here, before the node is announced.
    pub async fn start(keypair: Keypair, store: Store, config: Config) -> Result<Node, StartError> {
        let peer_id = keypair.public().to_peer_id();
        // The event loop's group commit syncs local writes before it acknowledges them.
        let mut core_config = config.cores.clone();
        core_config.sync_local_writes = false;
        let cores = crate::core::Cores::load(store.clone(), core_config)?;
        let gossip = crate::sync::GossipCounters::default();
        // The connections the node dials for keep open although idle.
        let swarm_config = swarm::Config { keep_peers: config.target_peers, ..config.swarm.clone() };
        let mut swarm = swarm::build_counted(keypair.clone(), &swarm_config, store.clone(), gossip.clone())?;
        for addr in &config.listen {
            swarm.listen_on(addr.clone()).map_err(|e| StartError::Listen { addr: addr.clone(), reason: e.to_string() })?;
        }
        let (command_tx, command_rx) = mpsc::channel(256);
        let (events, _) = tokio::sync::broadcast::channel(config.event_buffer.max(1));
        let shutdown = CancellationToken::new();
        let mut event_loop =
            event_loop::EventLoop::new(swarm, keypair, store, cores, config, command_rx, events.clone(), shutdown.clone())?;
        // Wait until every listener has reported its address (or failed), so that `info()`
        // right after start shows real ports.
        event_loop.await_listeners().await?;
        // Every line the node logs names it, so logs of many nodes in one process stay readable.
        let short_id = peer_id.to_base58().chars().rev().take(6).collect::<String>().chars().rev().collect::<String>();
        let task = tokio::spawn(tracing::Instrument::instrument(event_loop.run(), tracing::info_span!("node", id = %short_id)));
        let guard = shutdown.clone().drop_guard();
        Ok(Node { client: Client::new(command_tx, events), peer_id, task, shutdown, guard, gossip })
    }

    /// The gossip this node received and published so far (see
    /// [`GossipCounters`](crate::sync::GossipCounters)): read without asking the event loop.
    pub fn gossip(&self) -> crate::sync::GossipCount {
        self.gossip.get()
    }

    /// The gossip of one topic (a core's: [`crate::sync::topic`]) this node received and
    /// published, subscribed to it or not.
    pub fn gossip_on(&self, topic: &libp2p::gossipsub::TopicHash) -> crate::sync::GossipCount {
        self.gossip.on(topic)
    }

    /// A token that stops the node when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops the node and waits until its task has finished (peers saved, store flushed).
    pub async fn stop(self) {
        let Node { task, shutdown, guard, .. } = self;
        drop(guard);
        shutdown.cancel();
        if let Err(e) = task.await {
            tracing::error!("node task ended abnormally: {e}");
        }
    }

    /// Waits until the node stops (its shutdown token was cancelled elsewhere).
    pub async fn stopped(self) {
        let Node { task, guard, .. } = self;
        // Waiting is not dropping: the node runs until its token is cancelled elsewhere.
        let _token = guard.disarm();
        if let Err(e) = task.await {
            tracing::error!("node task ended abnormally: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_dropped_without_stop_stops_its_task() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let port = rand::random::<u32>() as u64 * 1000 + 7;
        let config = Config { listen: vec![format!("/memory/{port}").parse()?], ..Config::default() };
        let node = Node::start(Keypair::generate_ed25519(), Store::open(dir.path().join("db"))?, config).await?;
        let client = node.client.clone();
        client.info().await?;
        drop(node);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while client.info().await.is_ok() {
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "the dropped node still answers");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        Ok(())
    }
}
