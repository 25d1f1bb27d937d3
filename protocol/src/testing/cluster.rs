//! Many nodes in one process on libp2p's memory transport: what the tests of replication,
//! discovery and partitions start instead of `kubelt` processes (in the shape of
//! `libp2p-swarm-test` and iroh-gossip's simulator).
//!
//! A [`Cluster`] runs real [`Node`]s (the event loop, swarm and store the binary runs), each
//! with its own key and its own store in a temporary directory, listening on `/memory/<port>`.
//! It holds one dev wallet, whose core the helpers act on ([`Cluster::core`]).
//!
//! Waiting follows the node's event stream ([`Client::events`]): [`Cluster::converged`] looks
//! again each time a node reports something, never on a timer, so a node that changes without
//! saying so fails the test instead of being found by polling (subscribers of the stream, such
//! as the API's `core_subscribe`, rely on the same events). Only what no event reports
//! (another replica's subscription, [`Cluster::replicas`]) is polled.
//!
//! A partition is a cut made by blocking peers ([`NetClient::block_peer`]): every node keeps
//! running, connections across the cut close and redials are refused until [`Cluster::heal`].
//! A node can also be stopped and started again on the same key, store and address
//! ([`Cluster::stop`], [`Cluster::restart`]): how tests see peer books and catch-up at start-up.
//!
//! [`NetClient::block_peer`]: crate::node::NetClient::block_peer

use std::collections::{BTreeSet, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use futures::future::select_all;
use kubelt_proto::core::OwnerStatement;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use serde_json::Value;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;

use crate::core::{Address, DevWallet, WalletError};
use crate::node::{Client, Config, CoreCommandError, CoreSummary, Node, NodeError, StartError};
use crate::store::{Store, StoreError};

/// The namespace that [`Cluster::set`] writes and [`Cluster::get`] reads.
pub const APP: &str = "app";

/// How long a delegation made by [`Cluster::delegate`] lasts.
const DELEGATION_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// How often [`Cluster::replicas`] looks (no event tells that a peer subscribed).
const REPLICA_POLL: Duration = Duration::from_millis(20);

/// The settings of a cluster node before a test changes them: a short maintenance tick, so
/// that lost peers are redialed within a fraction of a second, and no periodic catch-up round
/// within a test's time, so that nothing heals a scenario but the event it is about (a
/// reconnect, a subscription, a change held back).
pub fn test_config() -> Config {
    Config {
        listen: vec![Multiaddr::empty().with(Protocol::Memory(0))],
        maintenance_interval: Duration::from_millis(200),
        core_sync_interval: Duration::from_secs(3600),
        ..Config::default()
    }
}

/// What went wrong in a cluster: a node's own error, or a wait that timed out (with what the
/// nodes held at the end, for the test's failure message).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// The temporary directory of the stores could not be made.
    #[error("cannot make the cluster's directory: {0}")]
    Dir(#[source] std::io::Error),
    /// A node's store did not open.
    #[error("cannot open the store of node {node}: {source}")]
    Store { node: usize, source: StoreError },
    /// A node did not start.
    #[error("node {node} did not start: {source}")]
    Start { node: usize, source: StartError },
    /// The node asked for is stopped.
    #[error("node {0} is stopped")]
    Stopped(usize),
    /// The node to restart is running.
    #[error("node {0} is already running")]
    Running(usize),
    /// The node does not hold the cluster's core.
    #[error("node {0} holds no replica of the cluster's core")]
    NotHeld(usize),
    /// A wait was given no node to watch.
    #[error("a wait needs at least one node to watch")]
    NoNodes,
    /// A node's client failed.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// A node refused a core command.
    #[error(transparent)]
    Core(#[from] CoreCommandError),
    /// The dev wallet failed to sign.
    #[error(transparent)]
    Wallet(#[from] WalletError),
    /// What was awaited did not happen in time; `state` is what the nodes held at the end.
    #[error("{what}: not within {within:?}; {state}")]
    Timeout { what: String, within: Duration, state: String },
}

/// One node of the cluster, running or stopped.
struct Member {
    key: Keypair,
    peer_id: PeerId,
    /// Its settings; `listen` is the address the node got, so a restart comes back there.
    config: Config,
    /// Its address, ending in `/p2p/<peer id>`.
    addr: Multiaddr,
    node: Option<Node>,
}

/// Nodes in one process on the memory transport (see the module doc). Nodes are numbered in
/// the order they were added; methods taking an index panic on one that was never added, as
/// indexing a slice does.
pub struct Cluster {
    members: Vec<Member>,
    wallet: DevWallet,
    /// Blocks in place, as (node, the node it blocks).
    cuts: BTreeSet<(usize, usize)>,
    /// The stores; declared last, so it is removed after the nodes are dropped.
    dir: tempfile::TempDir,
}

impl Cluster {
    /// A cluster without nodes yet (see [`add`](Self::add)).
    pub fn empty() -> Result<Cluster, ClusterError> {
        Ok(Cluster { members: Vec::new(), wallet: DevWallet::random(), cuts: BTreeSet::new(), dir: tempfile::tempdir().map_err(ClusterError::Dir)? })
    }

    /// `n` nodes with [`test_config`], not connected to each other.
    pub async fn start(n: usize) -> Result<Cluster, ClusterError> {
        let mut cluster = Cluster::empty()?;
        for _ in 0..n {
            cluster.add(|_| {}).await?;
        }
        Ok(cluster)
    }

    /// Starts one more node with [`test_config`] as `configure` changes it, and returns its
    /// index.
    pub async fn add(&mut self, configure: impl FnOnce(&mut Config)) -> Result<usize, ClusterError> {
        let index = self.members.len();
        let key = Keypair::generate_ed25519();
        let mut config = test_config();
        configure(&mut config);
        let node = self.launch(index, &key, config.clone()).await?;
        let addresses: Vec<Multiaddr> = node.client.info().await?.addresses.iter().filter_map(|a| a.parse().ok()).collect();
        // Port 0 asked the transport for a free port; a restart listens on the one it gave.
        config.listen = addresses.iter().map(|a| without_peer_id(a.clone())).collect();
        let addr = addresses.first().cloned().unwrap_or_else(|| Multiaddr::empty().with(Protocol::P2p(node.peer_id)));
        self.members.push(Member { key, peer_id: node.peer_id, config, addr, node: Some(node) });
        Ok(index)
    }

    async fn launch(&self, index: usize, key: &Keypair, config: Config) -> Result<Node, ClusterError> {
        let store = Store::open(self.store_dir(index)).map_err(|source| ClusterError::Store { node: index, source })?;
        Node::start(key.clone(), store, config).await.map_err(|source| ClusterError::Start { node: index, source })
    }

    /// Nodes added so far, running or stopped.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether no node was added yet.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Node `i`, if it is running.
    pub fn node(&self, i: usize) -> Result<&Node, ClusterError> {
        self.members[i].node.as_ref().ok_or(ClusterError::Stopped(i))
    }

    /// The client of node `i`, if it is running.
    pub fn client(&self, i: usize) -> Result<&Client, ClusterError> {
        Ok(&self.node(i)?.client)
    }

    /// The peer id of node `i` (it keeps it across restarts).
    pub fn peer_id(&self, i: usize) -> PeerId {
        self.members[i].peer_id
    }

    /// The address of node `i`, ending in `/p2p/<peer id>` (it keeps it across restarts).
    pub fn addr(&self, i: usize) -> Multiaddr {
        self.members[i].addr.clone()
    }

    /// Where node `i` keeps its store.
    pub fn store_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node{i}"))
    }

    /// The dev wallet that owns the cluster's core.
    pub fn wallet(&self) -> &DevWallet {
        &self.wallet
    }

    /// The cluster's core: the one the wallet owns.
    pub fn core(&self) -> Address {
        self.wallet.address()
    }

    /// Node `from` dials node `to` and waits until the connection is up.
    pub async fn connect(&self, from: usize, to: usize) -> Result<(), ClusterError> {
        self.client(from)?.net().connect(self.addr(to)).await?;
        Ok(())
    }

    /// Connects every running node with every other one.
    pub async fn connect_all(&self) -> Result<(), ClusterError> {
        let running: Vec<usize> = (0..self.len()).filter(|&i| self.members[i].node.is_some()).collect();
        for (n, &from) in running.iter().enumerate() {
            for &to in &running[..n] {
                self.connect(from, to).await?;
            }
        }
        Ok(())
    }

    /// The peers node `i` has a connection with.
    pub async fn connected(&self, i: usize) -> Result<HashSet<PeerId>, ClusterError> {
        Ok(self.client(i)?.net().peers().await?.iter().filter_map(|p| p.peer_id.parse().ok()).collect())
    }

    /// The wallet delegates the core to node `i` (every namespace, for a day) and the node
    /// takes the delegation; returns the signed statement.
    pub async fn delegate(&self, i: usize) -> Result<OwnerStatement, ClusterError> {
        let statement = self.wallet.delegate(&self.peer_id(i), &["*"], DELEGATION_LIFETIME, time::OffsetDateTime::now_utc())?;
        self.client(i)?.cores().submit(statement.clone()).await?;
        Ok(statement)
    }

    /// Node `i` follows the core (a replica without write rights).
    pub async fn follow(&self, i: usize) -> Result<CoreSummary, ClusterError> {
        Ok(self.client(i)?.cores().follow(self.core()).await?)
    }

    /// Node `i` writes `value` at `path` in the [`APP`] namespace of the core.
    pub async fn set(&self, i: usize, path: &str, value: Value) -> Result<CoreSummary, ClusterError> {
        Ok(self.client(i)?.cores().set(self.core(), APP.into(), path.into(), value).await?)
    }

    /// The value at `path` in the [`APP`] namespace of node `i`'s replica (`""`: the whole
    /// namespace; `null` when absent).
    pub async fn get(&self, i: usize, path: &str) -> Result<Value, ClusterError> {
        Ok(self.client(i)?.cores().get(self.core(), APP.into(), path.into()).await?)
    }

    /// Node `i`'s replica of the core, as `kubelt core ls` shows it.
    pub async fn summary(&self, i: usize) -> Result<CoreSummary, ClusterError> {
        let address = self.core().to_checksum();
        let cores = self.client(i)?.cores().list().await?;
        cores.into_iter().find(|c| c.address == address).ok_or(ClusterError::NotHeld(i))
    }

    async fn summaries(&self, nodes: &[usize]) -> Result<Vec<CoreSummary>, ClusterError> {
        let mut all = Vec::with_capacity(nodes.len());
        for &i in nodes {
            all.push(self.summary(i).await?);
        }
        Ok(all)
    }

    /// Waits until `nodes` hold the core with identical heads and no change held back, and
    /// returns the summary of the first. Identical heads are one history: include a node
    /// that holds every change the test expects (each writer), or the nodes may agree on an
    /// older one.
    pub async fn converged(&self, nodes: &[usize], within: Duration) -> Result<CoreSummary, ClusterError> {
        self.wait_for(nodes, within, None, "identical heads", || async {
            let all = self.summaries(nodes).await?;
            if all.iter().all(|s| s.heads == all[0].heads && s.pending == 0) {
                return Ok(Ok(all[0].clone()));
            }
            let state: Vec<String> = nodes.iter().zip(&all).map(|(i, s)| format!("node {i}: {} changes, {} pending, heads {:?}", s.changes, s.pending, s.heads)).collect();
            Ok(Err(state.join("; ")))
        })
        .await
    }

    /// Waits until each of `nodes` sees at least `count` other replicas of the core
    /// (connected peers subscribed to its topic).
    pub async fn replicas(&self, nodes: &[usize], count: usize, within: Duration) -> Result<(), ClusterError> {
        self.wait_for(nodes, within, Some(REPLICA_POLL), &format!("{count} replicas seen by each node"), || async {
            let all = self.summaries(nodes).await?;
            if all.iter().all(|s| s.replicas >= count) {
                return Ok(Ok(()));
            }
            let seen: Vec<String> = nodes.iter().zip(&all).map(|(i, s)| format!("node {i} sees {}", s.replicas)).collect();
            Ok(Err(seen.join(", ")))
        })
        .await
    }

    /// Gives every node the cluster's core: `writers` get a delegation, the others follow it.
    /// Then connects every node to every other one and waits until each sees all the others
    /// as replicas.
    pub async fn hold_core(&self, writers: &[usize], within: Duration) -> Result<(), ClusterError> {
        let all: Vec<usize> = (0..self.len()).collect();
        for &i in &all {
            if writers.contains(&i) {
                self.delegate(i).await?;
            } else {
                self.follow(i).await?;
            }
        }
        self.connect_all().await?;
        self.replicas(&all, all.len().saturating_sub(1), within).await
    }

    /// Cuts the network between `side_a` and `side_b`: each node blocks every node of the
    /// other side. Returns once no connection crosses the cut.
    pub async fn partition(&mut self, side_a: &[usize], side_b: &[usize], within: Duration) -> Result<(), ClusterError> {
        for &a in side_a {
            for &b in side_b {
                for (node, peer) in [(a, b), (b, a)] {
                    self.client(node)?.net().block_peer(self.peer_id(peer)).await?;
                    self.cuts.insert((node, peer));
                }
            }
        }
        let watched: Vec<usize> = side_a.iter().chain(side_b).copied().collect();
        self.wait_for(&watched, within, None, "the connections across the cut to close", || async {
            let mut crossing = Vec::new();
            for &a in side_a {
                let peers = self.connected(a).await?;
                crossing.extend(side_b.iter().filter(|&&b| peers.contains(&self.peer_id(b))).map(|b| format!("{a}-{b}")));
            }
            if crossing.is_empty() {
                Ok(Ok(()))
            } else {
                Ok(Err(format!("still connected: {}", crossing.join(", "))))
            }
        })
        .await
    }

    /// Lifts every cut, and does nothing else: the nodes reconnect as they always do.
    pub async fn heal(&mut self) -> Result<(), ClusterError> {
        for (node, peer) in std::mem::take(&mut self.cuts) {
            if let Some(running) = &self.members[node].node {
                running.client.net().unblock_peer(self.peer_id(peer)).await?;
            }
        }
        Ok(())
    }

    /// Stops node `i` and waits until it has saved its state; its store and address stay for
    /// [`restart`](Self::restart).
    pub async fn stop(&mut self, i: usize) -> Result<(), ClusterError> {
        let node = self.members[i].node.take().ok_or(ClusterError::Stopped(i))?;
        node.stop().await;
        Ok(())
    }

    /// Starts node `i` again with its key, store, address and settings. The cuts it is part
    /// of still hold: its own blocks are made again.
    pub async fn restart(&mut self, i: usize) -> Result<(), ClusterError> {
        if self.members[i].node.is_some() {
            return Err(ClusterError::Running(i));
        }
        let node = self.launch(i, &self.members[i].key, self.members[i].config.clone()).await?;
        for &(_, peer) in self.cuts.iter().filter(|(node, _)| *node == i) {
            node.client.net().block_peer(self.peer_id(peer)).await?;
        }
        self.members[i].node = Some(node);
        Ok(())
    }

    /// Stops every running node and waits for each.
    pub async fn shutdown(mut self) {
        for member in &mut self.members {
            if let Some(node) = member.node.take() {
                node.stop().await;
            }
        }
    }

    /// Runs `check` until it returns `Ok(Ok(_))`: at once, then whenever one of `nodes`
    /// reports an event (and every `poll`, if given), until `within` has passed. `check`
    /// returns `Ok(Err(state))` while not done, `state` saying what it found.
    async fn wait_for<T, F, Fut>(&self, nodes: &[usize], within: Duration, poll: Option<Duration>, what: &str, mut check: F) -> Result<T, ClusterError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Result<T, String>, ClusterError>>,
    {
        if nodes.is_empty() {
            return Err(ClusterError::NoNodes);
        }
        let deadline = Instant::now() + within;
        // Subscribed before the first look, so nothing that happens after it is missed.
        let mut events = nodes.iter().map(|&i| Ok(self.client(i)?.events())).collect::<Result<Vec<_>, ClusterError>>()?;
        loop {
            let state = match check().await? {
                Ok(done) => return Ok(done),
                Err(state) => state,
            };
            let next_event = select_all(events.iter_mut().map(|rx| Box::pin(rx.recv())));
            let wake = async {
                match poll {
                    Some(every) => tokio::time::timeout(every, next_event).await.ok(),
                    None => Some(next_event.await),
                }
            };
            match tokio::time::timeout_at(deadline, wake).await {
                Err(_) => return Err(ClusterError::Timeout { what: what.to_string(), within, state }),
                Ok(Some((Err(RecvError::Closed), index, _))) => return Err(ClusterError::Stopped(nodes[index])),
                // An event, a subscriber that fell behind, or the poll interval: look again.
                Ok(_) => {}
            }
        }
    }
}

fn without_peer_id(mut addr: Multiaddr) -> Multiaddr {
    if matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
        addr.pop();
    }
    addr
}
