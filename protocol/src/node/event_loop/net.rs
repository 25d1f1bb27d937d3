//! The event loop's network part: connections, the peer book, identify, ping and Kademlia
//! upkeep, and the node-wide `info`/`status` answers.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::core::transport::ListenerId;
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{identify, kad, ping, Multiaddr, PeerId};
use tokio::sync::oneshot;

use super::EventLoop;
use crate::node::client::{BitswapStatus, ConnectError, NetCommand, NodeEvent, NodeInfo, NodeStatus, PeerInfo, ProviderLookup};
use crate::dht_routing;
use crate::nat;
use crate::node::peers::{PeerBook, MAX_KNOWN_PEERS};
use crate::store::Store;
use crate::swarm::{self, BehaviourEvent, KAD_PROTOCOL};

/// Most dials the maintenance tick starts at once.
const MAX_DIALS_PER_TICK: usize = 8;

/// How long a peer's relayed connections stay open once a direct one is up. Closing at once
/// races the other side: the hole punch's dialer sees the direct connection a moment before
/// the other side does, and closing the relayed one then makes the other side see the peer
/// disconnect and reconnect — gossipsub there forgets the peer's subscriptions, which the
/// peer (never disconnected, in its own view) does not send again.
const RELAY_HANDOVER: Duration = Duration::from_secs(2);
/// Redials of one lost replica pending at once (each second's redial starts a new one while
/// the earlier ones still wait for an answer).
const MAX_PENDING_REDIALS: usize = 2;

/// One open connection.
struct Conn {
    id: ConnectionId,
    /// The remote address (a `/p2p-circuit` one for relayed connections).
    remote: Multiaddr,
    /// Through a relay.
    relayed: bool,
    /// We dialed it (so `remote` is an address that works from here).
    dialer: bool,
    /// When it came up.
    opened: Instant,
    /// The relay, for a relayed connection (named by the remote address when we dialed
    /// through it, by the local one when the circuit came in).
    relay: Option<PeerId>,
}

/// What the event loop knows about peers and connections.
pub(super) struct Net {
    peer_book: PeerBook,
    /// `connect` calls waiting for their dial to finish.
    pending_connects: HashMap<ConnectionId, (Multiaddr, oneshot::Sender<Result<PeerId, ConnectError>>)>,
    /// Dials still pending that were started alongside another dial of the peer (redials of
    /// lost replicas, peers a lookup found), per peer (at most [`MAX_PENDING_REDIALS`]).
    pending_redials: HashMap<PeerId, HashSet<ConnectionId>>,
    /// When each connection last answered a ping (connections that answered at least once).
    last_pong: HashMap<ConnectionId, Instant>,
    /// Open connections per peer.
    connections: HashMap<PeerId, Vec<Conn>>,
    /// Agent versions learned over identify (connected peers only).
    agents: HashMap<PeerId, String>,
    /// Listeners that reported an address: closed on shutdown.
    listeners: HashSet<ListenerId>,
    /// Peers with a direct and a relayed connection, and when the relayed ones close
    /// ([`RELAY_HANDOVER`]). Connected peers only, each once.
    handovers: Vec<(PeerId, Instant)>,
    started: Instant,
    bootstraps_completed: u64,
    bootstraps_failed: u64,
    connections_established: u64,
    connections_closed: u64,
    /// `find_providers` calls waiting for their query: the reply, when it started, and the
    /// providers named so far.
    lookups: HashMap<kad::QueryId, (oneshot::Sender<ProviderLookup>, Instant, Vec<PeerId>)>,
}

impl Net {
    pub(super) fn new(store: Store) -> Self {
        Net {
            peer_book: PeerBook::new(store),
            pending_connects: HashMap::new(),
            pending_redials: HashMap::new(),
            last_pong: HashMap::new(),
            connections: HashMap::new(),
            agents: HashMap::new(),
            listeners: HashSet::new(),
            handovers: Vec::new(),
            started: Instant::now(),
            bootstraps_completed: 0,
            bootstraps_failed: 0,
            connections_established: 0,
            connections_closed: 0,
            lookups: HashMap::new(),
        }
    }

    /// Whether `peer` has an open connection.
    pub(super) fn is_connected(&self, peer: &PeerId) -> bool {
        self.connections.contains_key(peer)
    }

    /// The relayed connections of peers whose handover pause is over at `now`, if a direct
    /// connection is still up beside them.
    pub(super) fn due_handovers(&mut self, now: Instant) -> Vec<(PeerId, Vec<ConnectionId>)> {
        let mut due = Vec::new();
        let connections = &self.connections;
        self.handovers.retain(|(peer, at)| {
            if now < *at {
                return true;
            }
            if let Some(conns) = connections.get(peer).filter(|conns| conns.iter().any(|c| !c.relayed)) {
                due.push((*peer, conns.iter().filter(|c| c.relayed).map(|c| c.id).collect()));
            }
            false
        });
        due
    }

    /// Whether a relayed connection waits to be closed.
    pub(super) fn has_handovers(&self) -> bool {
        !self.handovers.is_empty()
    }

    /// How many connected peers are reachable only through a relay.
    pub(super) fn relayed_only_peers(&self) -> usize {
        self.connections.values().filter(|conns| conns.iter().all(|c| c.relayed)).count()
    }

    /// The addresses remembered for `peer`.
    pub(super) fn known_addresses(&self, peer: &PeerId) -> Vec<Multiaddr> {
        self.peer_book.get(peer).ok().flatten().map(|p| p.addresses).unwrap_or_default()
    }
}

impl EventLoop {
    pub(super) fn on_net_command(&mut self, command: NetCommand) {
        match command {
            NetCommand::Peers { reply } => {
                let peers = self
                    .net
                    .connections
                    .iter()
                    .map(|(peer, conns)| PeerInfo {
                        peer_id: peer.to_base58(),
                        addresses: conns.iter().map(|c| c.remote.to_string()).collect(),
                        relayed: Some(conns.iter().all(|c| c.relayed)),
                        agent_version: self.net.agents.get(peer).cloned(),
                        blocks_received: Some(self.content.blocks_from(peer)),
                    })
                    .collect();
                let _ = reply.send(peers);
            }
            NetCommand::RoutingTable { reply } => {
                let mut peers = Vec::new();
                for bucket in self.swarm.behaviour_mut().kad.kbuckets() {
                    for entry in bucket.iter() {
                        let peer = *entry.node.key.preimage();
                        peers.push(PeerInfo {
                            peer_id: peer.to_base58(),
                            addresses: entry.node.value.iter().map(|a| a.to_string()).collect(),
                            relayed: None,
                            agent_version: self.net.agents.get(&peer).cloned(),
                            blocks_received: None,
                        });
                    }
                }
                let _ = reply.send(peers);
            }
            NetCommand::Connect { addr, reply } => self.connect(addr, reply),
            NetCommand::Block { peer, blocked, reply } => {
                let list = &mut self.swarm.behaviour_mut().blocked;
                if blocked {
                    list.block_peer(peer);
                } else {
                    list.unblock_peer(peer);
                }
                let _ = reply.send(());
            }
            NetCommand::FindProviders { key, reply } => {
                let query = self.swarm.behaviour_mut().kad.get_providers(kad::RecordKey::new(&key));
                self.net.lookups.insert(query, (reply, Instant::now(), Vec::new()));
            }
            NetCommand::StoredProviders { key, reply } => {
                let key = kad::RecordKey::new(&key);
                let providers = kad::store::RecordStore::providers(self.swarm.behaviour_mut().kad.store_mut(), &key).into_iter().map(|record| record.provider).collect();
                let _ = reply.send(providers);
            }
        }
    }

    /// A step of a `find_providers` query: it is answered once the answers so far named
    /// [`LOOKUP_PROVIDERS`] providers (and the query ends there), or when the query ends with
    /// fewer. Not at the first answer naming any: a DHT server keeps a provider's record for
    /// its lifetime (48 h) after the provider left, and may hold only one or two records of a
    /// key, so a first answer can name only nodes that are gone (the simulation's lookups after
    /// churn: 28 % did).
    fn on_lookup_progressed(&mut self, id: kad::QueryId, result: kad::QueryResult, stats: &kad::QueryStats, last: bool) {
        let local = *self.swarm.local_peer_id();
        let Some((_, _, named)) = self.net.lookups.get_mut(&id) else { return };
        if let kad::QueryResult::GetProviders(Ok(kad::GetProvidersOk::FoundProviders { providers, .. })) = result {
            for provider in providers {
                if provider != local && !named.contains(&provider) {
                    named.push(provider);
                }
            }
        }
        if named.len() < LOOKUP_PROVIDERS && !last {
            return;
        }
        let Some((reply, started, providers)) = self.net.lookups.remove(&id) else { return };
        if !last {
            if let Some(mut query) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                query.finish();
            }
        }
        let successes = stats.num_successes();
        let lookup = ProviderLookup {
            providers,
            hops: successes.div_ceil(swarm::KAD_PARALLELISM as u32),
            requests: stats.num_requests(),
            successes,
            elapsed: started.elapsed(),
        };
        let _ = reply.send(lookup);
    }

    /// Closes every listener. Dropping the swarm closes sockets anyway, but gives a memory
    /// transport port back only this way: an in-process node restarted on its address (as
    /// peers remember it) could not listen there again.
    pub(super) fn close_listeners(&mut self) {
        for listener in std::mem::take(&mut self.net.listeners) {
            self.swarm.remove_listener(listener);
        }
    }

    /// Dials the bootstrap peers and the peers remembered from earlier runs.
    pub(super) fn join_network(&mut self) {
        for addr in self.config.bootstrap_peers.clone() {
            if let Some(peer_id) = peer_id_of(&addr) {
                self.swarm.behaviour_mut().kad.add_address(&peer_id, addr.clone());
            }
            if let Err(e) = self.swarm.dial(addr.clone()) {
                tracing::warn!("cannot dial bootstrap peer {addr}: {e}");
            }
        }
        match self.net.peer_book.all() {
            Ok(known) => {
                tracing::info!("{} peers remembered from earlier runs", known.len());
                // As many as the buckets hold: a full bucket would dial an entry for each
                // one more (see `dht_routing`), and the book holds up to 2,048.
                let kad = &mut self.swarm.behaviour_mut().kad;
                for peer in &known {
                    if dht_routing::admits(kad, &peer.peer_id) {
                        for addr in &peer.addresses {
                            kad.add_address(&peer.peer_id, addr.clone());
                        }
                    }
                }
                for peer in known.into_iter().take(self.config.target_peers) {
                    self.dial_known(peer.peer_id, peer.addresses);
                }
            }
            Err(e) => tracing::warn!("cannot read remembered peers: {e}"),
        }
        if let Ok(query) = self.swarm.behaviour_mut().kad.bootstrap() {
            tracing::debug!(?query, "kademlia bootstrap started");
        }
    }

    /// Announces that this node provides `key` (a core's, a block's): queued, and started
    /// within this tick's share of new DHT queries (see [`ProvideQueue`]).
    pub(super) fn provide(&mut self, key: kad::RecordKey) {
        self.provides.push(key);
        self.start_provides();
    }

    /// Starts the queued provider announcements that this tick's share allows.
    pub(super) fn start_provides(&mut self) {
        for key in self.provides.take() {
            if let Err(e) = self.swarm.behaviour_mut().kad.start_providing(key) {
                tracing::warn!("cannot provide a key in the DHT: {e}");
            }
        }
    }

    /// Dials `peer` unless connected or being dialed, at `addresses` and whatever the
    /// behaviours know (Kademlia's routing table, providers of a lookup still running).
    ///
    /// The peer's local addresses (private, loopback, link-local) are dialed apart from its
    /// public and relay ones: libp2p dials a peer's addresses at once and keeps the first
    /// handshake, and a local address that reaches another node (192.168.1.2 in another home
    /// is a different machine) fails the whole dial with a wrong peer id, relay addresses
    /// included. Apart, a wrong peer there fails only that dial.
    pub(super) fn dial_known(&mut self, peer_id: PeerId, addresses: Vec<Multiaddr>) {
        self.dial_known_when(peer_id, addresses, PeerCondition::DisconnectedAndNotDialing);
    }

    /// [`Self::dial_known`] even while an earlier dial of the peer is still pending: how a lost
    /// replica is redialed, and how a peer a lookup found is dialed ([`Self::dial_found`]).
    /// After a partition, the dial started just before the heal may hang on an address that
    /// gets no answer (a QUIC handshake waits out its timeout, ~5 s) and would hold back every
    /// later dial of the peer, whose TCP address answers at once.
    /// At most [`MAX_PENDING_REDIALS`] such dials of one peer are pending at once: a cut cable
    /// leaves TCP dials hanging for minutes, and the redials of every second must not pile up.
    pub(super) fn redial_known(&mut self, peer_id: PeerId, addresses: Vec<Multiaddr>) {
        let pending = self.net.pending_redials.get(&peer_id).map_or(0, HashSet::len);
        if pending >= MAX_PENDING_REDIALS {
            return;
        }
        let ids = self.dial_known_when(peer_id, addresses, PeerCondition::Disconnected);
        if !ids.is_empty() {
            self.net.pending_redials.entry(peer_id).or_default().extend(ids);
        }
    }

    /// A dial of `peer` ended (connected or failed): it is no longer a pending redial.
    fn dial_ended(&mut self, peer: Option<PeerId>, connection: ConnectionId) {
        let Some(peer) = peer else { return };
        if let Some(ids) = self.net.pending_redials.get_mut(&peer) {
            ids.remove(&connection);
            if ids.is_empty() {
                self.net.pending_redials.remove(&peer);
            }
        }
    }

    /// Starts the dials; returns the connection ids of those the swarm took.
    fn dial_known_when(&mut self, peer_id: PeerId, addresses: Vec<Multiaddr>, first: PeerCondition) -> Vec<ConnectionId> {
        let (global, local) = split_local(addresses);
        let dials = if global.is_empty() || local.is_empty() {
            vec![(global.into_iter().chain(local).collect(), first)]
        } else {
            vec![(global, first), (local, PeerCondition::Disconnected)]
        };
        let mut started = Vec::new();
        for (addresses, condition) in dials {
            tracing::debug!(%peer_id, ?addresses, "dialing (and at the addresses the behaviours know)");
            let opts = DialOpts::peer_id(peer_id).addresses(addresses).extend_addresses_through_behaviour().condition(condition).build();
            let id = opts.connection_id();
            match self.swarm.dial(opts) {
                Ok(()) => started.push(id),
                Err(e) => tracing::debug!(%peer_id, "not dialing: {e}"),
            }
        }
        started
    }

    /// Dials peers found by a lookup (providers of a block, replicas of a core) that are not
    /// connected yet, even while another dial of the peer is pending ([`Self::redial_known`]):
    /// that one may be the connection maintenance's or Kademlia's, at addresses from the
    /// routing table that no longer answer. Seen behind NATs: a home node that was a DHT server
    /// for its first seconds stays in the other home's routing table with its LAN addresses;
    /// the maintenance tick dialed it there (a QUIC handshake waits 2 s to time out), and the
    /// follower's dial at the relay address the provider record names was refused as a
    /// duplicate until then.
    pub(super) fn dial_found(&mut self, found: impl IntoIterator<Item = PeerId>) -> usize {
        let local = *self.swarm.local_peer_id();
        let mut dialed = 0;
        for peer in found {
            if peer == local || self.swarm.is_connected(&peer) {
                continue;
            }
            let addresses = self.net.known_addresses(&peer);
            self.redial_known(peer, addresses);
            dialed += 1;
        }
        dialed
    }

    /// Keeps the node connected: dials routing-table and remembered peers while below the
    /// target, and goes back to the bootstrap peers when it has lost everyone.
    pub(super) fn maintain_connections(&mut self) {
        match self.net.peer_book.prune(MAX_KNOWN_PEERS) {
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
                self.net.pending_connects.insert(connection_id, (addr, reply));
            }
            Err(e) => {
                let _ = reply.send(Err(ConnectError::Dial { addr, reason: e.to_string() }));
            }
        }
    }

    pub(super) fn info(&self) -> NodeInfo {
        let local = *self.swarm.local_peer_id();
        NodeInfo {
            peer_id: local.to_base58(),
            addresses: self.swarm.listeners().map(|a| with_peer_id(a.clone(), local).to_string()).collect(),
            agent_version: swarm::agent_version(),
            protocols: swarm::protocols(&self.config.swarm),
        }
    }

    pub(super) fn status(&mut self) -> NodeStatus {
        let routing_table_peers = self.swarm.behaviour_mut().kad.kbuckets().map(|b| b.num_entries()).sum();
        let dht_mode = self.swarm.behaviour_mut().kad.mode().to_string();
        let bitswap = &self.swarm.behaviour().bitswap;
        NodeStatus {
            peer_id: self.swarm.local_peer_id().to_base58(),
            agent_version: swarm::agent_version(),
            uptime_secs: self.net.started.elapsed().as_secs(),
            connected_peers: self.net.connections.len(),
            routing_table_peers,
            known_peers: self.net.peer_book.all().map(|p| p.len()).unwrap_or(0),
            dht_mode,
            nat: self.nat_status(),
            bootstraps_completed: self.net.bootstraps_completed,
            bootstraps_failed: self.net.bootstraps_failed,
            connections_established: self.net.connections_established,
            connections_closed: self.net.connections_closed,
            bitswap: BitswapStatus::new(bitswap.stats(), bitswap.wantlist().len()),
        }
    }

    /// A concrete listen address is also an address others can use: it goes into identify and
    /// into our provider records (no AutoNAT here to confirm addresses from outside). So does a
    /// memory address: nodes in one process (tests) reach each other there, and find each
    /// other through the DHT as nodes on TCP do.
    ///
    /// A relay reservation reports its `/p2p-circuit` address here too: announced the same way,
    /// so peers that cannot dial this node directly come through the relay.
    pub(super) fn on_new_listen_addr(&mut self, listener: ListenerId, address: Multiaddr) {
        self.net.listeners.insert(listener);
        let local = *self.swarm.local_peer_id();
        let address = if peer_id_of_last(&address) == Some(local) { strip_peer_id(address) } else { address };
        match self.on_reservation_addr(listener, &address) {
            Some(false) => return,
            Some(true) => {}
            None => tracing::info!("listening on {}", with_peer_id(address.clone(), local)),
        }
        // Listening on every interface also reports loopback: nobody else can use it, and a
        // peer that dials its own loopback thinking it is ours fails the whole dial (wrong peer
        // id), circuit addresses included. Loopback-only nodes (tests) still announce it.
        let wildcard = self.config.listen.iter().any(is_unspecified);
        let unusable = is_unspecified(&address) || (wildcard && is_loopback(&address));
        if !unusable {
            self.swarm.add_external_address(address);
        }
    }

    /// Swarm events that are not a behaviour's: listeners and connections.
    pub(super) fn on_connection_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { listener_id, address } => self.on_new_listen_addr(listener_id, address),
            SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, num_established, concurrent_dial_errors, .. } => {
                if let Some(errors) = concurrent_dial_errors.filter(|e| !e.is_empty()) {
                    let failed: Vec<String> = errors.iter().map(|(addr, e)| format!("{addr}: {e}")).collect();
                    tracing::debug!(%peer_id, remote = %endpoint.get_remote_address(), ?failed, "connected; other addresses of the dial failed");
                }
                self.net.connections_established += 1;
                self.dial_ended(Some(peer_id), connection_id);
                let remote = endpoint.get_remote_address().clone();
                let relayed = endpoint.is_relayed() || nat::is_relayed(&remote);
                let conns = self.net.connections.entry(peer_id).or_default();
                let relay = match &endpoint {
                    libp2p::core::ConnectedPoint::Listener { local_addr, .. } => nat::relay_of(local_addr),
                    libp2p::core::ConnectedPoint::Dialer { address, .. } => nat::relay_of(address),
                };
                conns.push(Conn { id: connection_id, remote: remote.clone(), relayed, dialer: endpoint.is_dialer(), opened: Instant::now(), relay });
                // Once a direct connection exists, relayed ones go (after the handover pause):
                // everything moves to it.
                let both = conns.iter().any(|c| !c.relayed) && conns.iter().any(|c| c.relayed);
                if both && !self.net.handovers.iter().any(|(p, _)| *p == peer_id) {
                    self.net.handovers.push((peer_id, Instant::now() + RELAY_HANDOVER));
                }
                if endpoint.is_dialer() {
                    if let Err(e) = self.net.peer_book.remember(peer_id, [strip_peer_id(remote.clone())]) {
                        tracing::warn!("cannot remember peer {peer_id}: {e}");
                    }
                }
                if let Some((_, reply)) = self.net.pending_connects.remove(&connection_id) {
                    let _ = reply.send(Ok(peer_id));
                }
                if num_established.get() == 1 {
                    tracing::info!(%peer_id, %remote, "peer connected");
                    self.core_peer_connected(peer_id);
                    self.announce(NodeEvent::PeerConnected { peer: peer_id });
                }
            }
            SwarmEvent::ConnectionClosed { peer_id, connection_id, num_established, cause, .. } => {
                self.net.connections_closed += 1;
                self.net.last_pong.remove(&connection_id);
                let mut cut = None;
                if let Some(conns) = self.net.connections.get_mut(&peer_id) {
                    let closed = conns.iter().position(|c| c.id == connection_id).map(|i| conns.remove(i));
                    // A relayed connection that ends in an error while no direct one is left
                    // was closed under us, not handed over: by the relay, most likely at its
                    // limits (the peer's close of a handed-over circuit leaves the direct one).
                    if let (Some(conn), Some(error)) = (closed, &cause) {
                        if conn.relayed && conns.iter().all(|c| c.relayed) {
                            cut = conn.relay.map(|relay| (relay, conn.opened.elapsed(), error.to_string()));
                        }
                    }
                }
                if let Some((relay, lived, error)) = cut {
                    self.on_relayed_connection_cut(peer_id, relay, lived, &error);
                }
                if num_established == 0 {
                    self.net.connections.remove(&peer_id);
                    self.net.handovers.retain(|(p, _)| *p != peer_id);
                    self.net.agents.remove(&peer_id);
                    let cause = cause.map(|c| c.to_string()).unwrap_or_else(|| "closed".into());
                    tracing::info!(%peer_id, %cause, "peer disconnected");
                    self.on_peer_gone(peer_id);
                }
            }
            SwarmEvent::ListenerClosed { listener_id, reason, .. } => {
                self.net.listeners.remove(&listener_id);
                self.on_listener_closed(listener_id, reason.err().map(|e| error_chain(&e)));
            }
            SwarmEvent::ListenerError { listener_id, error } => {
                tracing::debug!(?listener_id, "listener error: {error}");
            }
            SwarmEvent::OutgoingConnectionError { connection_id, peer_id, error } => {
                tracing::debug!(?peer_id, "dial failed: {error}");
                self.dial_ended(peer_id, connection_id);
                if let Some(peer) = peer_id.filter(|p| dht_routing::shows_unreachable(&error) && !self.swarm.is_connected(p)) {
                    if self.swarm.behaviour_mut().kad.remove_peer(&peer).is_some() {
                        tracing::debug!(%peer, "unreachable: removed from the routing table");
                    }
                }
                if let Some((addr, reply)) = self.net.pending_connects.remove(&connection_id) {
                    let _ = reply.send(Err(ConnectError::Dial { addr, reason: error.to_string() }));
                }
            }
            _ => {}
        }
    }

    pub(super) fn on_identify_event(&mut self, event: identify::Event) {
        let identify::Event::Received { peer_id, info, connection_id } = event else { return };
        self.net.agents.insert(peer_id, info.agent_version.clone());
        let conn = self.net.connections.get(&peer_id).and_then(|c| c.iter().find(|c| c.id == connection_id));
        let remote = conn.map(|c| c.remote.clone());
        let dialed = conn.filter(|c| c.dialer && !c.relayed).map(|c| c.remote.clone());
        let addrs = dialable_addresses(remote.as_ref(), info.listen_addrs);
        if info.protocols.contains(&libp2p::relay::HOP_PROTOCOL_NAME) {
            // Reserve through the address this connection uses when it is a direct one we
            // dialed (known to work from here), else the first direct address announced.
            if let Some(addr) = dialed.or_else(|| addrs.iter().find(|a| !nat::is_relayed(a)).cloned()) {
                self.on_relay_found(peer_id, addr);
            }
        }
        if info.protocols.contains(&KAD_PROTOCOL) {
            let kad = &mut self.swarm.behaviour_mut().kad;
            if dht_routing::admits(kad, &peer_id) {
                for addr in &addrs {
                    kad.add_address(&peer_id, addr.clone());
                }
            }
        } else if self.swarm.behaviour_mut().kad.remove_peer(&peer_id).is_some() {
            // A peer that stopped serving the DHT (a node at home that AutoNAT found private
            // turns client, and identify pushes its new protocols) leaves the routing table.
            // Left there, it was handed out as a closer peer at its LAN address, and every
            // query through this node, a provider announcement's included, waited for the
            // dial of that address to time out (5 s over QUIC) before finishing.
            tracing::debug!(%peer_id, "no longer a DHT server: removed from the routing table");
        }
        if info.agent_version.starts_with("kubelt/") && !addrs.is_empty() {
            if let Err(e) = self.net.peer_book.remember(peer_id, addrs) {
                tracing::warn!("cannot remember peer {peer_id}: {e}");
            }
        }
    }

    pub(super) fn on_ping_event(&mut self, event: ping::Event) {
        match event {
            ping::Event { connection, result: Ok(_), .. } => {
                self.net.last_pong.insert(connection, Instant::now());
            }
            ping::Event { connection, result: Err(ping::Failure::Unsupported), .. } => {
                self.net.last_pong.remove(&connection);
            }
            ping::Event { peer, connection, result: Err(error) } => {
                // A connection that no longer answers pings is dead (the peer vanished, or a
                // partition): close it, so the peer counts are true and reconnecting, which
                // triggers catch-up, can happen.
                tracing::info!(%peer, "closing a connection that stopped answering pings: {error}");
                self.swarm.close_connection(connection);
            }
        }
    }

    /// Closes connections that answered pings before and have not answered for
    /// [`crate::swarm::Config::ping_silence`] (12 s by default). libp2p's ping reports only the
    /// second failure in a row, and the second attempt opens a new stream whose negotiation
    /// waits out a 10 s upgrade timeout, so a
    /// connection cut by a partition was reported only after ~25 s; a partition shorter than
    /// that healed on the old TCP connection, after TCP's retransmission backoff (up to ~7 s in
    /// the testnet). Closed at once, the lost replica is redialed every second and catch-up
    /// runs on a fresh connection right after the heal.
    pub(super) fn close_silent_connections(&mut self, now: Instant) {
        let limit = self.config.swarm.ping_silence();
        let silent: Vec<ConnectionId> =
            self.net.last_pong.iter().filter(|(_, at)| now.saturating_duration_since(**at) > limit).map(|(id, _)| *id).collect();
        for connection in silent {
            self.net.last_pong.remove(&connection);
            tracing::info!(?connection, "closing a connection silent for {limit:?} (no ping answered)");
            self.swarm.close_connection(connection);
        }
    }

    pub(super) fn on_kad_event(&mut self, event: kad::Event) {
        match event {
            kad::Event::OutboundQueryProgressed { id, result, step, stats } if self.net.lookups.contains_key(&id) => {
                self.on_lookup_progressed(id, result, &stats, step.last)
            }
            kad::Event::OutboundQueryProgressed { id, result, step, .. } => self.on_query_progressed(id, result, step.last),
            kad::Event::RoutingUpdated { peer, is_new_peer: true, .. } => {
                tracing::debug!(%peer, "added to the routing table");
            }
            _ => {}
        }
    }

    pub(super) fn on_bootstrap_progressed(&mut self, result: kad::BootstrapResult, last: bool) {
        match result {
            Ok(ok) if last || ok.num_remaining == 0 => {
                self.net.bootstraps_completed += 1;
                let size: usize = self.swarm.behaviour_mut().kad.kbuckets().map(|b| b.num_entries()).sum();
                tracing::info!(routing_table = size, "bootstrap done");
            }
            Ok(_) => {}
            Err(e) => {
                if last {
                    self.net.bootstraps_failed += 1;
                }
                tracing::warn!("bootstrap failed: {e}");
            }
        }
    }
}

/// Distinct providers a `find_providers` lookup waits for before it answers (fewer if the
/// query ends first).
const LOOKUP_PROVIDERS: usize = 3;

/// The `/p2p/<id>` at the end of an address, if any.
pub(super) fn peer_id_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        Protocol::P2p(peer) => Some(peer),
        _ => None,
    })
}

/// The peer id in the last component of an address, if it is one.
fn peer_id_of_last(addr: &Multiaddr) -> Option<PeerId> {
    match addr.iter().last() {
        Some(Protocol::P2p(peer)) => Some(peer),
        _ => None,
    }
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

/// An error and its sources, `: `-joined: libp2p's relay client says only "Failed to get
/// Reservation." and leaves why (the relay's refusal, its limit) to the source.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string().trim_end_matches('.').to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(e.to_string().trim_end_matches('.'));
        source = e.source();
    }
    text
}

/// A peer's addresses split into those reachable across the internet (public IPs, relay
/// circuits) and local ones (private, loopback, link-local, memory), which may name another
/// machine from here.
fn split_local(addresses: Vec<Multiaddr>) -> (Vec<Multiaddr>, Vec<Multiaddr>) {
    addresses.into_iter().partition(|a| nat::is_vouchable(a, false))
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

    #[test]
    fn a_relay_refusal_names_its_reason() {
        let refused = libp2p::relay::client::transport::Error::Reservation(libp2p::relay::outbound::hop::ReserveError::ResourceLimitExceeded);
        let text = error_chain(&std::io::Error::other(refused));
        assert_eq!(text, "Failed to get Reservation: Remote reported resource limit exceeded");
    }

    #[test]
    fn local_addresses_are_dialed_apart_from_public_and_relay_ones() {
        let parse = |a: &str| -> Multiaddr { a.parse().unwrap() };
        let relay = "/ip4/198.51.100.1/tcp/4001/p2p/12D3KooWKieHnJGrCZ5JEWWWiPeS9UrNQbeg5nqTAeAtuP8MGNMT/p2p-circuit";
        let addresses = vec![
            parse("/ip4/192.168.1.2/tcp/4001"),
            parse("/ip4/198.51.100.3/tcp/4001"),
            parse(relay),
            parse("/ip4/10.1.2.3/udp/4001/quic-v1"),
            parse("/ip4/127.0.0.1/tcp/4001"),
            parse("/ip6/fe80::1/tcp/4001"),
            parse("/ip6/fd00::1/tcp/4001"),
            parse("/ip6/2001:db8::1/tcp/4001"),
            parse("/memory/5"),
        ];
        let (global, local) = split_local(addresses.clone());
        assert_eq!(global, vec![addresses[1].clone(), addresses[2].clone(), addresses[7].clone()]);
        assert_eq!(local.len(), 6, "{local:?}");
    }
}
