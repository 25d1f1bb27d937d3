//! The task that owns the swarm. Nothing else touches it: other tasks send [`Command`]s.

mod cores;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::kad;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{identify, Multiaddr, PeerId, Swarm};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use cid::Cid;

use super::client::{BitswapStatus, Command, ConnectError, NodeInfo, NodeStatus, PeerInfo};
use super::content::FetchError;
use crate::bitswap;
use super::peers::PeerBook;
use super::{Config, StartError};
use crate::store::Store;
use crate::swarm::{self, Behaviour, BehaviourEvent, KAD_PROTOCOL};

/// How long start-up waits for listeners to report their addresses.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long held-back changes may wait for their dependencies through gossip before catch-up.
const MISSING_DEPS_GRACE: Duration = Duration::from_secs(1);
/// Most dials the maintenance tick starts at once.
const MAX_DIALS_PER_TICK: usize = 8;

pub(crate) struct EventLoop {
    swarm: Swarm<Behaviour>,
    /// The node key: signs core changes.
    keypair: libp2p::identity::Keypair,
    /// Every core replica this node holds.
    cores: crate::core::Cores,
    /// When the last periodic catch-up round ran.
    last_core_sync: Instant,
    /// Where applied core changes are announced (API subscriptions, benchmarks).
    core_updates: tokio::sync::broadcast::Sender<super::client::CoreUpdate>,
    store: Store,
    peer_book: PeerBook,
    config: Config,
    commands: mpsc::Receiver<Command>,
    shutdown: CancellationToken,
    /// `connect` calls waiting for their dial to finish.
    pending_connects: HashMap<ConnectionId, (Multiaddr, oneshot::Sender<Result<PeerId, ConnectError>>)>,
    /// Open connections per peer, with the remote address of each.
    connections: HashMap<PeerId, Vec<(ConnectionId, Multiaddr)>>,
    /// Agent versions learned over identify.
    agents: HashMap<PeerId, String>,
    /// Wanted blocks received over bitswap from each connected peer.
    blocks_from: HashMap<PeerId, u64>,
    /// `fetch_block` calls waiting for their block.
    pending_fetches: HashMap<Cid, Vec<oneshot::Sender<Result<(), FetchError>>>>,
    /// Provider lookups in flight, by the CID they look for.
    provider_queries: HashMap<kad::QueryId, Cid>,
    /// The one catch-up session running per core, and the peers to catch up with after it:
    /// catching up with every replica at once would ship the same changes many times.
    core_sync_sessions: HashMap<crate::core::Address, (PeerId, std::collections::VecDeque<PeerId>)>,

    /// Cores holding back changes whose dependencies have not arrived, with the peer that sent
    /// one and since when: gossip often delivers the dependencies a moment later (messages take
    /// different paths), so catch-up starts only if they are still missing after a grace period.
    missing_deps_since: HashMap<crate::core::Address, (PeerId, Instant)>,
    /// Lookups of core replicas in flight, by core.
    replica_queries: HashMap<kad::QueryId, crate::core::Address>,
    /// Gossip verification off this task: see `event_loop/cores.rs`.
    gossip: cores::GossipVerification,
    /// Catch-up verification off this task.
    sync_work: cores::SyncVerification,
    /// Core-sync requests and answers each peer may still have (see `cores::SyncBudget`).
    sync_budgets: HashMap<PeerId, cores::SyncBudget>,
    started: Instant,
    bootstraps_completed: u64,
    connections_established: u64,
    connections_closed: u64,
}

impl EventLoop {
    #[allow(clippy::too_many_arguments)] // one per piece of state the event loop owns
    pub(crate) fn new(
        swarm: Swarm<Behaviour>,
        keypair: libp2p::identity::Keypair,
        store: Store,
        cores: crate::core::Cores,
        config: Config,
        commands: mpsc::Receiver<Command>,
        core_updates: tokio::sync::broadcast::Sender<super::client::CoreUpdate>,
        shutdown: CancellationToken,
    ) -> Self {
        let gossip = cores::GossipVerification::new(cores.verifier());
        let sync_work = cores::SyncVerification::new(cores.verifier());
        EventLoop {
            swarm,
            keypair,
            cores,
            last_core_sync: Instant::now(),
            core_updates,
            peer_book: PeerBook::new(store.clone()),
            store,
            config,
            commands,
            shutdown,
            pending_connects: HashMap::new(),
            connections: HashMap::new(),
            agents: HashMap::new(),
            blocks_from: HashMap::new(),
            pending_fetches: HashMap::new(),
            provider_queries: HashMap::new(),
            replica_queries: HashMap::new(),
            core_sync_sessions: HashMap::new(),
            missing_deps_since: HashMap::new(),
            gossip,
            sync_work,
            sync_budgets: HashMap::new(),

            started: Instant::now(),
            bootstraps_completed: 0,
            connections_established: 0,
            connections_closed: 0,
        }
    }

    /// Drives the swarm until every listener has an address or has failed.
    pub(crate) async fn await_listeners(&mut self) -> Result<(), StartError> {
        let expected = self.config.listen.len();
        let mut ready = HashSet::new();
        let deadline = tokio::time::sleep(LISTEN_TIMEOUT);
        tokio::pin!(deadline);
        while ready.len() < expected {
            tokio::select! {
                _ = &mut deadline => {
                    tracing::warn!("only {} of {expected} listeners are up after {LISTEN_TIMEOUT:?}", ready.len());
                    break;
                }
                event = self.swarm.select_next_some() => match event {
                    SwarmEvent::NewListenAddr { listener_id, address } => {
                        self.log_listen_addr(&address);
                        self.announce_listen_addr(address.clone());
                        ready.insert(listener_id);
                    }
                    SwarmEvent::ListenerClosed { addresses, reason: Err(e), .. } => {
                        let addr = addresses.first().cloned().unwrap_or_else(Multiaddr::empty);
                        return Err(StartError::Listen { addr, reason: e.to_string() });
                    }
                    SwarmEvent::ListenerError { error, .. } => {
                        return Err(StartError::Listen { addr: Multiaddr::empty(), reason: error.to_string() });
                    }
                    other => self.on_swarm_event(other),
                }
            }
        }
        Ok(())
    }

    /// Runs until the shutdown token is cancelled, then saves state.
    pub(crate) async fn run(mut self) {
        self.join_network();
        self.announce_cores();
        let mut maintenance = tokio::time::interval(self.config.maintenance_interval);
        maintenance.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut missing_deps_check = tokio::time::interval(MISSING_DEPS_GRACE / 2);
        missing_deps_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                Some(command) = self.commands.recv() => self.on_command(command),
                Some(verdict) = self.gossip.next_verdict() => self.on_gossip_verified(verdict),
                Some(work) = self.sync_work.next() => self.on_sync_verified(work),
                _ = missing_deps_check.tick() => self.catch_up_missing_deps(),
                _ = maintenance.tick() => {
                    self.maintain_connections();
                    if self.last_core_sync.elapsed() >= self.config.core_sync_interval {
                        self.last_core_sync = Instant::now();
                        self.sync_all_cores();
                    }
                }
            }
        }
        tracing::info!("node stopping");
        if let Err(e) = self.store.flush() {
            tracing::error!("flushing the database failed: {e}");
        }
    }

    /// Dials the bootstrap peers and the peers remembered from earlier runs.
    fn join_network(&mut self) {
        for addr in self.config.bootstrap_peers.clone() {
            if let Some(peer_id) = peer_id_of(&addr) {
                self.swarm.behaviour_mut().kad.add_address(&peer_id, addr.clone());
            }
            if let Err(e) = self.swarm.dial(addr.clone()) {
                tracing::warn!("cannot dial bootstrap peer {addr}: {e}");
            }
        }
        match self.peer_book.all() {
            Ok(known) => {
                tracing::info!("{} peers remembered from earlier runs", known.len());
                for peer in &known {
                    for addr in &peer.addresses {
                        self.swarm.behaviour_mut().kad.add_address(&peer.peer_id, addr.clone());
                    }
                }
                for peer in known.into_iter().take(self.config.target_peers) {
                    self.dial_known(peer.peer_id, peer.addresses);
                }
            }
            Err(e) => tracing::warn!("cannot read remembered peers: {e}"),
        }
        self.start_bootstrap();
    }

    fn start_bootstrap(&mut self) {
        if let Ok(query) = self.swarm.behaviour_mut().kad.bootstrap() {
            tracing::debug!(?query, "kademlia bootstrap started");
        }
    }

    fn dial_known(&mut self, peer_id: PeerId, addresses: Vec<Multiaddr>) {
        // Behaviours add what they know: Kademlia its routing table and the addresses that
        // providers came with in a lookup still running.
        let opts = DialOpts::peer_id(peer_id)
            .addresses(addresses)
            .extend_addresses_through_behaviour()
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        if let Err(e) = self.swarm.dial(opts) {
            tracing::debug!(%peer_id, "not dialing: {e}");
        }
    }

    /// Keeps the node connected: dials routing-table and remembered peers while below the
    /// target, and goes back to the bootstrap peers when it has lost everyone.
    fn maintain_connections(&mut self) {
        match self.peer_book.prune(super::peers::MAX_KNOWN_PEERS) {
            Ok(0) => {}
            Ok(n) => tracing::debug!(forgotten = n, "peer book pruned to the most recently seen peers"),
            Err(e) => tracing::warn!("cannot prune the peer book: {e}"),
        }
        let connected = self.swarm.connected_peers().count();
        if connected >= self.config.target_peers {
            return;
        }
        if connected == 0 && !self.config.bootstrap_peers.is_empty() {
            for addr in self.config.bootstrap_peers.clone() {
                let _ = self.swarm.dial(addr);
            }
        }
        let local = *self.swarm.local_peer_id();
        let mut candidates: Vec<(PeerId, Vec<Multiaddr>)> = Vec::new();
        for bucket in self.swarm.behaviour_mut().kad.kbuckets() {
            for entry in bucket.iter() {
                candidates.push((*entry.node.key.preimage(), entry.node.value.iter().cloned().collect()));
            }
        }
        let wanted = (self.config.target_peers - connected).min(MAX_DIALS_PER_TICK);
        let to_dial: Vec<_> = candidates
            .into_iter()
            .filter(|(peer, _)| *peer != local && !self.swarm.is_connected(peer))
            .take(wanted)
            .collect();
        for (peer, addresses) in to_dial {
            self.dial_known(peer, addresses);
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Info { reply } => {
                let _ = reply.send(self.info());
            }
            Command::Peers { reply } => {
                let peers = self
                    .connections
                    .iter()
                    .map(|(peer, conns)| PeerInfo {
                        peer_id: peer.to_base58(),
                        addresses: conns.iter().map(|(_, a)| a.to_string()).collect(),
                        agent_version: self.agents.get(peer).cloned(),
                        blocks_received: Some(self.blocks_from.get(peer).copied().unwrap_or(0)),
                    })
                    .collect();
                let _ = reply.send(peers);
            }
            Command::RoutingTable { reply } => {
                let mut peers = Vec::new();
                for bucket in self.swarm.behaviour_mut().kad.kbuckets() {
                    for entry in bucket.iter() {
                        let peer = *entry.node.key.preimage();
                        peers.push(PeerInfo {
                            peer_id: peer.to_base58(),
                            addresses: entry.node.value.iter().map(|a| a.to_string()).collect(),
                            agent_version: self.agents.get(&peer).cloned(),
                            blocks_received: None,
                        });
                    }
                }
                let _ = reply.send(peers);
            }
            Command::Connect { addr, reply } => self.connect(addr, reply),
            Command::Block { peer, blocked, reply } => {
                let list = &mut self.swarm.behaviour_mut().blocked;
                if blocked {
                    list.block_peer(peer);
                } else {
                    list.unblock_peer(peer);
                }
                let _ = reply.send(());
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Command::NewSession { reply } => {
                let _ = reply.send(self.swarm.behaviour_mut().bitswap.new_session());
            }
            Command::CloseSession { session } => self.swarm.behaviour_mut().bitswap.close_session(session),
            Command::FetchBlock { cid, session, reply } => {
                let first = !self.pending_fetches.contains_key(&cid);
                self.pending_fetches.entry(cid).or_default().push(reply);
                if first {
                    self.swarm.behaviour_mut().bitswap.want([cid], Some(session));
                }
            }
            Command::Provide { cid } => {
                let key = kad::RecordKey::new(&cid.hash().to_bytes());
                if let Err(e) = self.swarm.behaviour_mut().kad.start_providing(key) {
                    tracing::warn!(%cid, "cannot provide: {e}");
                }
            }
            Command::BlocksAdded { cids } => self.swarm.behaviour_mut().bitswap.notify_new_blocks(cids),
            Command::CoreFollow { core, reply } => {
                let _ = reply.send(self.core_follow(core));
            }
            Command::CoreSubmit { statement, reply } => {
                let _ = reply.send(self.core_submit(statement));
            }
            Command::CoreSet { core, namespace, path, value, reply } => {
                let _ = reply.send(self.core_set(core, &namespace, &path, &value));
            }
            Command::CoreGet { core, namespace, path, reply } => {
                let _ = reply.send(self.core_get(core, &namespace, &path));
            }
            Command::CoreList { reply } => {
                let _ = reply.send(self.core_list());
            }
            Command::CoreRevocationMessage { core, peer, reply } => {
                let _ = reply.send(self.core_revocation_message(core, peer));
            }
        }
    }

    fn on_bitswap_event(&mut self, event: bitswap::Event) {
        match event {
            bitswap::Event::BlockReceived { cid, from, .. } => {
                // One event per session that wanted the block: count the block once, with its
                // first event (the one that finds the waiters).
                let Some(waiters) = self.pending_fetches.remove(&cid) else { return };
                if let Some(peer) = from.filter(|p| self.connections.contains_key(p)) {
                    *self.blocks_from.entry(peer).or_default() += 1;
                }
                for waiter in waiters {
                    let _ = waiter.send(Ok(()));
                }
            }
            bitswap::Event::NotFound { cid, error, .. } => {
                for waiter in self.pending_fetches.remove(&cid).unwrap_or_default() {
                    let _ = waiter.send(Err(FetchError::NotFound(error.to_string())));
                }
            }
            bitswap::Event::FindProviders { cid, .. } => {
                if self.provider_queries.values().any(|c| *c == cid) {
                    return;
                }
                let key = kad::RecordKey::new(&cid.hash().to_bytes());
                let query = self.swarm.behaviour_mut().kad.get_providers(key);
                self.provider_queries.insert(query, cid);
            }
            bitswap::Event::PeerMisbehaved { peer, reason } => {
                tracing::warn!(%peer, "disconnecting a peer that sent bad blocks: {reason}");
                let _ = self.swarm.disconnect_peer_id(peer);
            }
        }
    }

    /// Dials providers found for a wanted block; bitswap asks them once connected.
    fn on_providers(&mut self, cid: Cid, providers: impl IntoIterator<Item = PeerId>) {
        let local = *self.swarm.local_peer_id();
        for provider in providers {
            if provider == local || self.swarm.is_connected(&provider) {
                continue;
            }
            tracing::debug!(%cid, %provider, "dialing provider");
            let addresses = self.peer_book.get(&provider).ok().flatten().map(|p| p.addresses).unwrap_or_default();
            self.dial_known(provider, addresses);
        }
    }

    fn connect(&mut self, addr: Multiaddr, reply: oneshot::Sender<Result<PeerId, ConnectError>>) {
        let opts = match peer_id_of(&addr) {
            Some(peer) if self.swarm.is_connected(&peer) => {
                let _ = reply.send(Ok(peer));
                return;
            }
            Some(peer) => DialOpts::peer_id(peer).addresses(vec![addr.clone()]).condition(PeerCondition::Always).build(),
            None => DialOpts::unknown_peer_id().address(addr.clone()).build(),
        };
        let connection_id = opts.connection_id();
        match self.swarm.dial(opts) {
            Ok(()) => {
                self.pending_connects.insert(connection_id, (addr, reply));
            }
            Err(e) => {
                let _ = reply.send(Err(ConnectError::Dial { addr, reason: e.to_string() }));
            }
        }
    }

    fn info(&self) -> NodeInfo {
        let local = *self.swarm.local_peer_id();
        NodeInfo {
            peer_id: local.to_base58(),
            addresses: self.swarm.listeners().map(|a| with_peer_id(a.clone(), local).to_string()).collect(),
            agent_version: swarm::agent_version(),
            protocols: vec![
                swarm::IDENTIFY_PROTOCOL.to_string(),
                "/ipfs/ping/1.0.0".to_string(),
                KAD_PROTOCOL.to_string(),
                bitswap::PROTOCOL_1_2_0.to_string(),
                crate::sync::CORE_SYNC_PROTOCOL.to_string(),
                "/meshsub/1.1.0".to_string(),
            ],
        }
    }

    fn status(&mut self) -> NodeStatus {
        let routing_table_peers = self.swarm.behaviour_mut().kad.kbuckets().map(|b| b.num_entries()).sum();
        NodeStatus {
            peer_id: self.swarm.local_peer_id().to_base58(),
            agent_version: swarm::agent_version(),
            uptime_secs: self.started.elapsed().as_secs(),
            connected_peers: self.connections.len(),
            routing_table_peers,
            known_peers: self.peer_book.all().map(|p| p.len()).unwrap_or(0),
            dht_mode: self.swarm.behaviour_mut().kad.mode().to_string(),
            bootstraps_completed: self.bootstraps_completed,
            connections_established: self.connections_established,
            connections_closed: self.connections_closed,
            bitswap: BitswapStatus::new(
                self.swarm.behaviour().bitswap.stats(),
                self.swarm.behaviour().bitswap.wantlist().len(),
            ),
        }
    }

    /// A concrete listen address is also an address others can use: it goes into identify and
    /// into our provider records (no AutoNAT here to confirm addresses from outside).
    fn announce_listen_addr(&mut self, address: Multiaddr) {
        if !is_unspecified(&address) && !matches!(address.iter().next(), Some(Protocol::Memory(_))) {
            self.swarm.add_external_address(address);
        }
    }

    fn log_listen_addr(&self, address: &Multiaddr) {
        tracing::info!("listening on {}", with_peer_id(address.clone(), *self.swarm.local_peer_id()));
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                self.log_listen_addr(&address);
                self.announce_listen_addr(address);
            }
            SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, num_established, .. } => {
                self.connections_established += 1;
                let remote = endpoint.get_remote_address().clone();
                self.connections.entry(peer_id).or_default().push((connection_id, remote.clone()));
                if num_established.get() == 1 {
                    tracing::info!(%peer_id, %remote, "peer connected");
                }
                if endpoint.is_dialer() {
                    if let Err(e) = self.peer_book.remember(peer_id, [strip_peer_id(remote)]) {
                        tracing::warn!("cannot remember peer {peer_id}: {e}");
                    }
                }
                if let Some((_, reply)) = self.pending_connects.remove(&connection_id) {
                    let _ = reply.send(Ok(peer_id));
                }
            }
            SwarmEvent::ConnectionClosed { peer_id, connection_id, num_established, cause, .. } => {
                if num_established == 0 {
                    self.cores.end_sync(&peer_id);
                    self.sync_session_ended(&peer_id, None);
                }
                self.connections_closed += 1;
                if let Some(conns) = self.connections.get_mut(&peer_id) {
                    conns.retain(|(id, _)| *id != connection_id);
                }
                if num_established == 0 {
                    self.connections.remove(&peer_id);
                    // Per-peer state goes with the peer, so churn cannot grow it.
                    self.agents.remove(&peer_id);
                    self.blocks_from.remove(&peer_id);
                    self.sync_budgets.remove(&peer_id);
                    let cause = cause.map(|c| c.to_string()).unwrap_or_else(|| "closed".into());
                    tracing::info!(%peer_id, %cause, "peer disconnected");
                }
            }
            SwarmEvent::OutgoingConnectionError { connection_id, peer_id, error } => {
                tracing::debug!(?peer_id, "dial failed: {error}");
                if let Some((addr, reply)) = self.pending_connects.remove(&connection_id) {
                    let _ = reply.send(Err(ConnectError::Dial { addr, reason: error.to_string() }));
                }
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, connection_id }) => {
                self.agents.insert(peer_id, info.agent_version.clone());
                let remote = self
                    .connections
                    .get(&peer_id)
                    .and_then(|c| c.iter().find(|(id, _)| *id == connection_id))
                    .map(|(_, a)| a.clone());
                let addrs = dialable_addresses(remote.as_ref(), info.listen_addrs);
                if info.protocols.contains(&KAD_PROTOCOL) {
                    for addr in &addrs {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, addr.clone());
                    }
                }
                if info.agent_version.starts_with("kubelt/") && !addrs.is_empty() {
                    if let Err(e) = self.peer_book.remember(peer_id, addrs) {
                        tracing::warn!("cannot remember peer {peer_id}: {e}");
                    }
                }
            }
            BehaviourEvent::Ping(libp2p::ping::Event { peer, connection, result: Err(error) }) => {
                // A connection that no longer answers pings is dead (the peer vanished, or a
                // partition): close it, so the peer counts are true and reconnecting, which
                // triggers catch-up, can happen.
                tracing::info!(%peer, "closing a connection that stopped answering pings: {error}");
                self.swarm.close_connection(connection);
            }
            BehaviourEvent::Bitswap(event) => self.on_bitswap_event(event),
            BehaviourEvent::Gossipsub(event) => self.on_gossipsub_event(event),
            BehaviourEvent::CoreSync(event) => self.on_core_sync_event(event),
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed { id, result: kad::QueryResult::GetProviders(result), step, .. }) => {
                let Some(cid) = self.provider_queries.get(&id).copied() else {
                    self.on_replicas_found(id, result, step.last);
                    return;
                };
                if let Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) = result {
                    self.on_providers(cid, providers);
                }
                if step.last {
                    self.provider_queries.remove(&id);
                }
            }
            BehaviourEvent::Kad(kad::Event::RoutingUpdated { peer, is_new_peer: true, .. }) => {
                tracing::debug!(%peer, "added to the routing table");
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed { result: kad::QueryResult::Bootstrap(result), step, .. }) => {
                match result {
                    Ok(ok) if step.last || ok.num_remaining == 0 => {
                        self.bootstraps_completed += 1;
                        let size: usize = self.swarm.behaviour_mut().kad.kbuckets().map(|b| b.num_entries()).sum();
                        tracing::info!(routing_table = size, "bootstrap done");
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!("bootstrap failed: {e}"),
                }
            }
            _ => {}
        }
    }
}

/// The `/p2p/<id>` at the end of an address, if any.
pub(crate) fn peer_id_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        Protocol::P2p(peer) => Some(peer),
        _ => None,
    })
}

fn with_peer_id(addr: Multiaddr, peer: PeerId) -> Multiaddr {
    if peer_id_of(&addr).is_some() {
        addr
    } else {
        addr.with(Protocol::P2p(peer))
    }
}

fn strip_peer_id(mut addr: Multiaddr) -> Multiaddr {
    if matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
        addr.pop();
    }
    addr
}

fn is_loopback(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        _ => false,
    })
}

fn is_unspecified(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}

/// The listen addresses a peer announced that are worth dialing from here: a peer we reach
/// over a real network gains nothing from its loopback addresses.
fn dialable_addresses(remote: Option<&Multiaddr>, announced: Vec<Multiaddr>) -> Vec<Multiaddr> {
    let remote_is_loopback = remote.map(is_loopback).unwrap_or(true);
    announced
        .into_iter()
        .filter(|a| !is_unspecified(a))
        .filter(|a| remote_is_loopback || !is_loopback(a))
        .map(strip_peer_id)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_addresses_of_remote_peers_are_not_dialed() {
        let remote: Multiaddr = "/ip4/10.0.0.2/tcp/4001".parse().unwrap();
        let announced = vec![
            "/ip4/127.0.0.1/tcp/4001".parse().unwrap(),
            "/ip4/10.0.0.2/tcp/4001".parse().unwrap(),
            "/ip4/0.0.0.0/tcp/4001".parse().unwrap(),
        ];
        let kept = dialable_addresses(Some(&remote), announced.clone());
        assert_eq!(kept, vec![announced[1].clone()]);
        let local: Multiaddr = "/ip4/127.0.0.1/tcp/5".parse().unwrap();
        assert_eq!(dialable_addresses(Some(&local), announced).len(), 2);
    }
}
