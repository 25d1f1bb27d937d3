//! The task that owns the swarm. Nothing else touches it: other tasks send [`Command`]s.
//!
//! The loop only routes. Each domain keeps its own state and handlers in its own file:
//! - [`net`]: connections, the peer book, identify, ping, Kademlia upkeep;
//! - [`content`]: bitswap fetches and provider records;
//! - [`cores`]: core replicas, gossip, catch-up;
//! - [`private`]: keyrings of private data, encrypted writes and reads, sharing keys;
//! - [`durable`]: the group commit of local core writes (one fsync for many, off this task).
//! - [`nat`]: AutoNAT verdicts, relay reservations and the relay server, hole punching.
//!
//! A new domain (messaging, apps) is a new file with a state struct and an `impl EventLoop`
//! block, plus one line in each `match` below.

mod content;
mod cores;
mod durable;
mod msg;
mod nat;
mod net;
mod private;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use cid::Cid;
use futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use libp2p::{kad, Multiaddr, Swarm};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::client::{Command, NodeEvent};
use super::{Config, StartError};
use crate::core::Address;
use crate::dht_store::ProvideQueue;
use crate::store::Store;
use crate::swarm::{Behaviour, BehaviourEvent};

/// How long start-up waits for listeners to report their addresses.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often time-driven decisions (catch-up scheduling) are re-examined.
const TICK_INTERVAL: Duration = Duration::from_millis(250);
/// Provider announcements (DHT queries) started per tick: 32 a second, so a node holding
/// 10,000 cores announces them all in about five minutes without flooding its peers.
const PROVIDES_PER_TICK: usize = 8;

/// What a Kademlia query in flight is for: one map for every domain's queries.
#[derive(Debug, Clone, Copy)]
enum QueryPurpose {
    /// Providers of a block bitswap wants.
    BlockProviders(Cid),
    /// Other replicas of a core.
    CoreReplicas(Address),
}

pub(crate) struct EventLoop {
    swarm: Swarm<Behaviour>,
    store: Store,
    config: Config,
    commands: mpsc::Receiver<Command>,
    /// Where what happens in the node is announced (API subscriptions, tests, benchmarks).
    events: broadcast::Sender<NodeEvent>,
    shutdown: CancellationToken,
    /// Kademlia queries in flight, and what each is for.
    queries: HashMap<kad::QueryId, QueryPurpose>,
    net: net::Net,
    content: content::Content,
    cores: cores::CoreState,
    msg: msg::MsgState,
    private: private::PrivateState,
    durable: durable::GroupCommit,
    nat: nat::NatState,
    /// Provider records to announce, paced (see [`ProvideQueue`]).
    provides: ProvideQueue,
}

impl EventLoop {
    /// The loop for a built swarm; `cores` are the replicas loaded from the store.
    #[allow(clippy::too_many_arguments)] // what a node is made of, each passed once
    pub(crate) fn new(
        swarm: Swarm<Behaviour>,
        keypair: libp2p::identity::Keypair,
        store: Store,
        replicas: crate::core::Cores,
        config: Config,
        commands: mpsc::Receiver<Command>,
        events: broadcast::Sender<NodeEvent>,
        shutdown: CancellationToken,
    ) -> Result<Self, StartError> {
        let now = Instant::now();
        let relay_server = config.swarm.nat.relay_server.is_some();
        Ok(EventLoop {
            msg: msg::MsgState::new(&keypair, store.clone(), config.msg.clone()).map_err(StartError::Messages)?,
            net: net::Net::new(store.clone()),
            durable: durable::GroupCommit::new(store.clone()),
            provides: ProvideQueue::new(PROVIDES_PER_TICK),
            content: content::Content::default(),
            cores: cores::CoreState::new(keypair, replicas, &config, now),
            swarm,
            store,
            config,
            commands,
            events,
            shutdown,
            queries: HashMap::new(),
            private: private::PrivateState::default(),
            nat: nat::NatState::new(relay_server),
        })
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
                        self.on_new_listen_addr(listener_id, address);
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
        let mut tick = tokio::time::interval(TICK_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                Some(command) = self.commands.recv() => self.on_command(command),
                Some(verdict) = self.cores.gossip.next_verdict() => self.on_gossip_verified(verdict),
                Some((work, claimed)) = self.cores.sync_work.next() => self.on_sync_verified(work, claimed),
                Some(work) = self.msg.next_work() => self.on_msg_work(work),
                Some(synced) = self.durable.next_synced() => self.on_synced(synced),
                _ = tick.tick() => {
                    self.provides.tick();
                    self.start_provides();
                    self.close_silent_connections(Instant::now());
                    self.tick_cores(Instant::now());
                    self.tick_msg(Instant::now());
                    self.tick_relay_handovers(Instant::now());
                }
                _ = maintenance.tick() => {
                    self.maintain_connections();
                    self.maintain_reservations();
                }
            }
        }
        tracing::info!("node stopping");
        self.close_listeners();
        if let Err(e) = self.store.flush() {
            tracing::error!("flushing the database failed: {e}");
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Info { reply } => {
                let _ = reply.send(self.info());
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Command::Net(command) => self.on_net_command(command),
            Command::Content(command) => self.on_content_command(command),
            Command::Cores(command) => self.on_core_command(command),
            Command::Msg(command) => self.on_msg_command(command),
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            other => self.on_connection_event(other),
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Identify(event) => self.on_identify_event(event),
            BehaviourEvent::Ping(event) => self.on_ping_event(event),
            BehaviourEvent::Kad(event) => self.on_kad_event(event),
            BehaviourEvent::Bitswap(event) => self.on_bitswap_event(event),
            BehaviourEvent::Gossipsub(event) => self.on_gossipsub_event(event),
            BehaviourEvent::CoreSync(event) => self.on_core_sync_event(event),
            BehaviourEvent::Msg(event) => self.on_msg_event(event),
            BehaviourEvent::Autonat(event) => self.on_autonat_event(event),
            BehaviourEvent::AutonatClient(event) => self.on_autonat_v2_event(event),
            BehaviourEvent::AutonatServer(event) => tracing::debug!(?event, "AutoNAT v2 dial-back"),
            BehaviourEvent::Relay(event) => self.on_relay_server_event(event),
            BehaviourEvent::RelayClient(event) => self.on_relay_client_event(event),
            BehaviourEvent::Dcutr(event) => self.on_dcutr_event(event),
            BehaviourEvent::Blocked(never) | BehaviourEvent::Limits(never) => match never {},
        }
    }

    /// Routes the progress of a Kademlia lookup to the domain that started it.
    fn on_query_progressed(&mut self, id: kad::QueryId, result: kad::QueryResult, last: bool) {
        let purpose = if last { self.queries.remove(&id) } else { self.queries.get(&id).copied() };
        match (purpose, result) {
            (Some(QueryPurpose::BlockProviders(cid)), kad::QueryResult::GetProviders(result)) => self.on_block_providers(cid, result),
            (Some(QueryPurpose::CoreReplicas(core)), kad::QueryResult::GetProviders(result)) => self.on_replicas_found(core, id, result, last),
            (_, kad::QueryResult::Bootstrap(result)) => self.on_bootstrap_progressed(result, last),
            _ => {}
        }
    }

    /// Tells every domain that the last connection with a peer closed, so that per-peer state
    /// goes with the peer and churn cannot grow it.
    fn on_peer_gone(&mut self, peer: libp2p::PeerId) {
        self.content.peer_gone(&peer);
        self.nat_peer_gone(&peer);
        self.core_peer_gone(peer);
        self.announce(NodeEvent::PeerDisconnected { peer });
    }

    /// Announces an event (nobody listening is fine).
    fn announce(&self, event: NodeEvent) {
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(event);
        }
    }
}
