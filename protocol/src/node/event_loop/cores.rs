//! The event loop's share of cores: commands from the API, gossipsub messages, catch-up
//! sessions, and finding replicas through the DHT.
//!
//! Every decision is the core logic's ([`crate::core::Cores`]); here changes are only moved:
//! a local write is stored, then published on `kubelt/core/<address>`; a received message is
//! verified before gossipsub may forward it (`Accept`), and anything invalid is `Reject`ed so
//! it never travels further.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;

use kubelt_proto::core::{OwnerStatement, SignedChange};
use kubelt_proto::Message;
use libp2p::gossipsub::{self, MessageAcceptance, MessageId, TopicHash};
use libp2p::{kad, request_response, PeerId};
use tokio::sync::mpsc;

use super::{EventLoop, QueryPurpose};
use crate::core::{Accepted, Address, ApplyError, BatchReport, CatchUpAction, CatchUpScheduler, ChangeHash, Delegation, Rejected, Revocation, ScheduleConfig, Verified, VerifiedBatch, Verifier};
use crate::node::client::{CoreCommand, CoreCommandError, CoreSummary, CoreUpdate, Holding, NodeEvent, StatementKind, SubmitOutcome};
use crate::sync;
use kubelt_proto::core::{SyncRequest, SyncResponse};

/// What the event loop holds for cores.
pub(super) struct CoreState {
    /// The node key: signs core changes.
    pub(super) keypair: libp2p::identity::Keypair,
    /// Every core replica this node holds.
    pub(super) replicas: crate::core::Cores,
    /// Which catch-up sessions run, and when (I/O-free, see `core/catch_up.rs`).
    schedule: CatchUpScheduler,
    /// Gossip verification off the event loop.
    pub(super) gossip: GossipVerification,
    /// Catch-up verification off the event loop.
    pub(super) sync_work: SyncVerification,
    /// Core-sync requests and answers each peer may still have (see [`SyncBudget`]).
    sync_budgets: HashMap<PeerId, SyncBudget>,
}

impl CoreState {
    pub(super) fn new(keypair: libp2p::identity::Keypair, replicas: crate::core::Cores, config: &crate::node::Config, now: Instant) -> Self {
        let schedule = ScheduleConfig { round_interval: config.core_sync_interval, ..ScheduleConfig::default() };
        CoreState {
            gossip: GossipVerification::new(replicas.verifier()),
            sync_work: SyncVerification::new(replicas.verifier()),
            schedule: CatchUpScheduler::new(schedule, now),
            keypair,
            replicas,
            sync_budgets: HashMap::new(),
        }
    }
}

/// Gossip messages being verified at once, over all peers; more are ignored (not forwarded)
/// until the backlog drains.
const MAX_VERIFYING: usize = 256;
/// Gossip messages of one propagation source being verified at once.
const MAX_VERIFYING_PER_PEER: usize = 32;

/// Gossip messages are verified off the event loop: decoding, the author's signature, the
/// owner's delegation and Automerge's parsing of the change run on a blocking thread, inside
/// `catch_unwind`, and only the history checks (bounded by the change's size) run here.
pub(super) struct GossipVerification {
    verifier: Verifier,
    verdicts_tx: mpsc::Sender<GossipVerdict>,
    verdicts: mpsc::Receiver<GossipVerdict>,
    /// Messages in verification, per propagation source, and in all.
    in_flight: HashMap<PeerId, usize>,
    in_flight_total: usize,
    /// Which core each subscribed topic is.
    topics: HashMap<TopicHash, Address>,
}

/// The outcome of verifying one gossip message off the event loop.
pub(super) struct GossipVerdict {
    id: MessageId,
    source: PeerId,
    core: Address,
    result: Result<Verified, Rejected>,
}

impl GossipVerification {
    pub(super) fn new(verifier: Verifier) -> Self {
        let (verdicts_tx, verdicts) = mpsc::channel(MAX_VERIFYING);
        GossipVerification { verifier, verdicts_tx, verdicts, in_flight: HashMap::new(), in_flight_total: 0, topics: HashMap::new() }
    }

    /// The next verified message.
    pub(super) async fn next_verdict(&mut self) -> Option<GossipVerdict> {
        self.verdicts.recv().await
    }

    /// Starts verifying a message; `false` when over the limits (the caller ignores it).
    fn start(&mut self, id: MessageId, source: PeerId, core: Address, data: Vec<u8>) -> bool {
        let mine = self.in_flight.get(&source).copied().unwrap_or(0);
        if self.in_flight_total >= MAX_VERIFYING || mine >= MAX_VERIFYING_PER_PEER {
            return false;
        }
        *self.in_flight.entry(source).or_default() += 1;
        self.in_flight_total += 1;
        let verifier = self.verifier.clone();
        let tx = self.verdicts_tx.clone();
        tokio::task::spawn_blocking(move || {
            let result = verifier.verify_gossip(core, &data);
            // Capacity is MAX_VERIFYING and at most that many are in flight: this never waits.
            let _ = tx.blocking_send(GossipVerdict { id, source, core, result });
        });
        true
    }

    fn finished(&mut self, source: &PeerId) {
        if let Some(n) = self.in_flight.get_mut(source) {
            self.in_flight_total = self.in_flight_total.saturating_sub(1);
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.in_flight.remove(source);
            }
        }
    }
}

/// Catch-up messages being verified at once (inbound requests beyond this are answered "busy").
const MAX_SYNC_VERIFYING: usize = 64;

/// Catch-up messages are verified off the event loop like gossip: the envelopes they carry are
/// decoded and checked on a blocking thread; the replica then runs only the history checks and
/// Automerge's sync step on bounded, scanned input.
///
/// Envelopes of changes the replica holds already, or that another catch-up message in
/// verification carries, are left out before verification ([`CoreState::claim`]): a node that
/// comes back finds every other replica driving a session with it at once, each sending the
/// same missed changes, and verifying every copy cost more than the catch-up itself.
pub(super) struct SyncVerification {
    verifier: Verifier,
    done_tx: mpsc::Sender<(SyncWork, Claimed)>,
    done: mpsc::Receiver<(SyncWork, Claimed)>,
    in_flight: usize,
    /// Changes carried by a catch-up message in verification, until it is applied.
    claimed: HashSet<(Address, ChangeHash)>,
}

/// The changes a catch-up message in verification claimed (see [`SyncVerification`]).
pub(super) type Claimed = Vec<(Address, ChangeHash)>;

/// A catch-up message back from verification.
pub(super) enum SyncWork {
    Request { peer: PeerId, channel: request_response::ResponseChannel<SyncResponse>, request: SyncRequest, batch: Result<VerifiedBatch, Rejected> },
    Response { peer: PeerId, response: SyncResponse, batch: Result<VerifiedBatch, Rejected> },
}

impl SyncVerification {
    pub(super) fn new(verifier: Verifier) -> Self {
        let (done_tx, done) = mpsc::channel(MAX_SYNC_VERIFYING);
        SyncVerification { verifier, done_tx, done, in_flight: 0, claimed: HashSet::new() }
    }

    /// The next verified catch-up message, with the changes it claimed.
    pub(super) async fn next(&mut self) -> Option<(SyncWork, Claimed)> {
        self.done.recv().await
    }

    fn busy(&self) -> bool {
        self.in_flight >= MAX_SYNC_VERIFYING
    }

    /// Verifies a message's envelopes on a blocking thread; `make` rebuilds the work item.
    fn start(
        &mut self,
        core: String,
        envelopes: Vec<SignedChange>,
        claimed: Claimed,
        make: impl FnOnce(Result<VerifiedBatch, Rejected>) -> SyncWork + Send + 'static,
    ) {
        self.in_flight += 1;
        let verifier = self.verifier.clone();
        let tx = self.done_tx.clone();
        tokio::task::spawn_blocking(move || {
            let batch = verifier.verify_sync_batch(&core, envelopes);
            // Inbound requests are refused beyond the channel's capacity; responses to our own
            // requests are not, and wait here for room rather than be lost.
            let _ = tx.blocking_send((make(batch), claimed));
        });
    }

    /// Releases what a message claimed, once its changes went through the replica.
    fn release(&mut self, claimed: &Claimed) {
        for key in claimed {
            self.claimed.remove(key);
        }
    }
}

impl CoreState {
    /// Leaves out of a catch-up message's envelopes the changes the core's replica holds
    /// already and those another message in verification carries, and claims the rest.
    ///
    /// A change is recognised by the hash of its bytes ([`crate::core::change::raw_change_hash`]),
    /// without decoding or trusting anything: equal hashes are equal bytes, so what is left
    /// out is a copy of a change held or about to be checked. If that other copy fails its
    /// checks (a bad signature on good bytes), the change is not lost: the peer offers it
    /// again in the next round, since our next Bloom filter does not contain it.
    fn claim(&mut self, core: &str, mut envelopes: Vec<SignedChange>) -> (Vec<SignedChange>, Claimed) {
        let Ok(address) = Address::parse(core) else { return (envelopes, Vec::new()) };
        if envelopes.is_empty() {
            return (envelopes, Vec::new());
        }
        // Delegations are sent once per author: give each envelope its own before dropping any.
        crate::core::change::inflate_batch(&mut envelopes);
        let replica = self.replicas.get_mut(&address);
        let claimed_set = &mut self.sync_work.claimed;
        let mut claimed = Vec::new();
        let before = envelopes.len();
        envelopes.retain(|e| {
            let Some(hash) = crate::core::change::raw_change_hash(&e.change) else { return true };
            if replica.as_ref().is_some_and(|r| r.contains(&hash)) {
                return false;
            }
            if !claimed_set.insert((address, hash)) {
                return false;
            }
            claimed.push((address, hash));
            true
        });
        if envelopes.len() < before {
            tracing::debug!(core = %address, kept = envelopes.len(), left_out = before - envelopes.len(), "catch-up: changes held or in verification already");
        }
        (envelopes, claimed)
    }
}

/// A token bucket of core-sync requests and answer bytes for one peer. Cores are readable by
/// any replica, so strangers are answered, but never faster than this: an answer can be
/// thousands of times larger than the request that asked for it.
pub(super) struct SyncBudget {
    requests: f64,
    bytes: f64,
    at: Instant,
}

impl SyncBudget {
    /// Requests per second, sustained, and the burst allowed.
    const REQUESTS_PER_SEC: f64 = 20.0;
    const REQUEST_BURST: f64 = 60.0;
    /// Answer bytes per second, sustained, and the burst allowed (a full catch-up of a large
    /// core fits in the burst).
    const BYTES_PER_SEC: f64 = (8 << 20) as f64;
    const BYTE_BURST: f64 = (128 << 20) as f64;

    fn new(now: Instant) -> Self {
        SyncBudget { requests: Self::REQUEST_BURST, bytes: Self::BYTE_BURST, at: now }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.requests = (self.requests + dt * Self::REQUESTS_PER_SEC).min(Self::REQUEST_BURST);
        self.bytes = (self.bytes + dt * Self::BYTES_PER_SEC).min(Self::BYTE_BURST);
    }

    /// Takes one request if the peer has budget left for a request and for some answer.
    fn take_request(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.requests < 1.0 || self.bytes <= 0.0 {
            return false;
        }
        self.requests -= 1.0;
        true
    }

    /// Charges the bytes of an answer (the balance may go negative: the next requests wait).
    fn charge(&mut self, bytes: usize) {
        self.bytes -= bytes as f64;
    }
}

fn storage(e: impl std::fmt::Display) -> CoreCommandError {
    CoreCommandError::Storage(e.to_string())
}

/// The command error of a failed local write.
pub(super) fn write_error(core: &Address, e: crate::core::WriteError) -> CoreCommandError {
    use crate::core::WriteError as W;
    match e {
        W::Path(p) => CoreCommandError::InvalidInput(p.to_string()),
        W::Namespace(_) => CoreCommandError::InvalidInput(e.to_string()),
        W::Revoked(_) => CoreCommandError::Revoked(core.to_checksum()),
        W::Delegation(_) | W::Rejected(_) | W::NoChange => CoreCommandError::Refused(e.to_string()),
        other => CoreCommandError::Storage(other.to_string()),
    }
}

/// The replica of a core this node holds, or an error that says so.
/// The replica of a core this node holds (loaded on demand), or an error that says why not.
pub(super) fn held<'a>(cores: &'a mut crate::core::Cores, core: &Address) -> Result<&'a mut crate::core::Replica, CoreCommandError> {
    cores
        .replica(core)
        .map_err(storage)?
        .ok_or_else(|| CoreCommandError::NotHeld(core.to_checksum()))
}

impl EventLoop {
    pub(super) fn on_core_command(&mut self, command: CoreCommand) {
        match command {
            // What writes answers once it is on disk (group commit, see `durable`).
            CoreCommand::Follow { core, reply } => {
                let result = self.core_follow(core);
                self.reply_after_sync(reply, result);
            }
            CoreCommand::Submit { statement, reply } => {
                let result = self.core_submit(statement);
                self.reply_after_sync(reply, result);
            }
            CoreCommand::Set { core, namespace, path, value, max_bytes, reply } => {
                let result = self.core_set_within(core, &namespace, &path, &value, max_bytes);
                self.reply_after_sync(reply, result);
            }
            CoreCommand::Get { core, namespace, path, reply } => {
                let _ = reply.send(self.core_get(core, &namespace, &path));
            }
            CoreCommand::List { reply } => {
                let _ = reply.send(self.core_list());
            }
            CoreCommand::ListLoaded { reply } => {
                let loaded = self.cores.replicas.loaded();
                let _ = reply.send(loaded.into_iter().filter_map(|core| self.core_summary(core).ok()).collect());
            }
            CoreCommand::Summary { core, reply } => {
                let _ = reply.send(self.core_summary(core));
            }
            CoreCommand::Holding { core, reply } => {
                let replicas = &self.cores.replicas;
                let stats = replicas.load_stats();
                let _ = reply.send(Holding {
                    holds: core.is_some_and(|c| replicas.holds(&c)),
                    held: replicas.len(),
                    loaded: replicas.loaded().len(),
                    loads: stats.loads,
                    unloads: stats.unloads,
                });
            }
            CoreCommand::RevocationMessage { core, peer, reply } => {
                let _ = reply.send(self.core_revocation_message(core, peer));
            }
            CoreCommand::Private { core, namespace, reply } => {
                let result = self.core_private(core, &namespace);
                self.reply_after_sync(reply, result);
            }
            CoreCommand::Unlock { core, signature, reply } => {
                let result = self.core_unlock(core, &signature);
                self.reply_after_sync(reply, result);
            }
            // A new key's wraps must be on disk before anything is encrypted with it.
            CoreCommand::ObjectKey { core, id: None, reply } => {
                let result = self.core_object_key(core);
                self.reply_after_sync(reply, result);
            }
            CoreCommand::ObjectKey { core, id: Some(id), reply } => {
                let _ = reply.send(self.core_object_key_by_id(core, &id));
            }
        }
    }

    /// Subscribes to the topic of every core held and announces them in the DHT; their
    /// replicas are looked up in turn (a hosted node holds thousands of cores).
    pub(super) fn announce_cores(&mut self) {
        let started = Instant::now();
        let cores = self.cores.replicas.list();
        for core in &cores {
            self.subscribe_core(*core);
            self.cores.schedule.core_held_at_start(*core);
        }
        tracing::info!(cores = cores.len(), elapsed = ?started.elapsed(), "subscribed to the topics of the cores held");
    }

    /// Subscribes to a core's topic, provides its DHT key, looks for other replicas and
    /// catches up with the peers already connected.
    pub(super) fn join_core(&mut self, core: Address) {
        self.subscribe_core(core);
        let actions = self.cores.schedule.core_added(core);
        self.catch_up(actions);
    }

    /// Subscribes to a core's topic and provides its DHT key.
    fn subscribe_core(&mut self, core: Address) {
        let topic = sync::topic(&core);
        self.cores.gossip.topics.insert(topic.hash(), core);
        let gossipsub = &mut self.swarm.behaviour_mut().gossipsub;
        if let Err(e) = gossipsub.set_topic_params(topic.clone(), sync::topic_score_params()) {
            tracing::warn!(%core, "cannot set the topic's peer-score parameters: {e}");
        }
        if let Err(e) = gossipsub.subscribe(&topic) {
            tracing::warn!(%core, "cannot subscribe to the core's topic: {e}");
        }
        self.provide(kad::RecordKey::new(&core.dht_key()));
    }

    /// Carries out what the catch-up scheduler decided.
    fn catch_up(&mut self, actions: Vec<CatchUpAction>) {
        let mut actions = VecDeque::from(actions);
        while let Some(action) = actions.pop_front() {
            match action {
                CatchUpAction::Sync { core, peer } => match self.cores.replicas.sync_request(&core, &peer) {
                    Some(request) => {
                        self.swarm.behaviour_mut().core_sync.send_request(&peer, request);
                    }
                    // Nothing to ask (or a request to this peer is already out): next in line.
                    None => actions.extend(self.cores.schedule.session_ended(Some(core), &peer)),
                },
                CatchUpAction::FindReplicas(core) => {
                    let query = self.swarm.behaviour_mut().kad.get_providers(kad::RecordKey::new(&core.dht_key()));
                    tracing::debug!(%core, ?query, "looking for replicas of the core in the DHT");
                    self.queries.insert(query, QueryPurpose::CoreReplicas(core));
                }
                CatchUpAction::Redial(peer) => {
                    let addresses = self.net.known_addresses(&peer);
                    self.redial_known(peer, addresses);
                }
            }
        }
    }

    /// Time-driven catch-up: held-back changes past their grace period, the periodic round.
    pub(super) fn tick_cores(&mut self, now: Instant) {
        let replicas = &self.cores.replicas;
        // Held-back changes live only in loaded replicas (a replica holding some is not
        // unloaded), so the check never loads one.
        let actions = self.cores.schedule.tick(now, || replicas.list(), |core| replicas.get_loaded(core).is_some_and(|r| !r.missing_deps().is_empty()));
        self.catch_up(actions);
    }

    pub(super) fn core_peer_connected(&mut self, peer: PeerId) {
        self.cores.schedule.peer_connected(peer);
    }

    pub(super) fn core_peer_gone(&mut self, peer: PeerId) {
        self.cores.replicas.end_sync(&peer);
        self.cores.sync_budgets.remove(&peer);
        let actions = self.cores.schedule.peer_disconnected(&peer, Instant::now());
        self.catch_up(actions);
    }

    /// Dials the replicas of a core that a DHT lookup found; catch-up starts once connected.
    /// A provider already connected holds the core as surely as a subscription says so: its
    /// subscription may have been missed (gossipsub tells a peer its topics once, on the first
    /// connection, and a peer that saw us disconnect and reconnect does not hear them again).
    ///
    /// A core followed just now and still alone is looked up again soon (see the scheduler);
    /// its lookup ends at the first answer naming another replica, so that if the dial fails
    /// the next lookup comes after the short pause, not after the query has waited out its
    /// slowest peers (2 s and more, measured).
    pub(super) fn on_replicas_found(&mut self, core: Address, query: kad::QueryId, result: kad::GetProvidersResult, last: bool) {
        match result {
            Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) => {
                tracing::debug!(%core, ?providers, "the DHT named replicas of the core");
                let connected: Vec<PeerId> = providers.iter().filter(|p| self.swarm.is_connected(p)).copied().collect();
                for peer in connected {
                    let actions = self.cores.schedule.replica_joined(core, peer);
                    self.catch_up(actions);
                }
                // Our own provider record comes first, from the local store: not an answer.
                let local = *self.swarm.local_peer_id();
                let others = providers.iter().copied().filter(|p| *p != local);
                let may_end = self.cores.schedule.lookup_may_end(&core, others);
                let dialed = self.dial_found(providers);
                if dialed > 0 {
                    tracing::info!(%core, replicas = dialed, "found replicas of the core in the DHT; connecting");
                }
                if !last && may_end {
                    if let Some(mut query) = self.swarm.behaviour_mut().kad.query_mut(&query) {
                        query.finish();
                    }
                }
            }
            other => tracing::debug!(%core, ?other, "lookup of the core's replicas: no more providers"),
        }
        if last {
            self.cores.schedule.lookup_finished(core, Instant::now());
        }
    }

    fn core_follow(&mut self, core: Address) -> Result<CoreSummary, CoreCommandError> {
        self.cores.replicas.follow(core).map_err(storage)?;
        self.join_core(core);
        self.msg_core_followed(core);
        self.core_summary(core)
    }

    fn core_submit(&mut self, statement: OwnerStatement) -> Result<SubmitOutcome, CoreCommandError> {
        let local = *self.swarm.local_peer_id();
        // The URI says what kind of statement it is; each kind reports its own refusal.
        let is_revocation = statement.message.lines().any(|l| l.starts_with(&format!("URI: {}", crate::core::delegation::REVOKE_URN)));
        if !is_revocation {
            let delegation = Delegation::verify(&statement)
                .map_err(|e| CoreCommandError::InvalidStatement { kind: StatementKind::Delegation, reason: e.to_string() })?;
            if delegation.peer != local {
                return Err(CoreCommandError::OtherNode { delegated: delegation.peer.to_string(), this: local.to_string() });
            }
            self.cores.replicas.own(statement).map_err(storage)?;
            self.join_core(delegation.owner);
            // A core this node writes hosts its inbox here, even if it was a contact before.
            self.msg_core_followed(delegation.owner);
            self.msg_publish_device_key();
            tracing::info!(core = %delegation.owner, "delegation accepted: this node may write to the core");
            return Ok(SubmitOutcome { kind: StatementKind::Delegation, core: delegation.owner.to_checksum(), peer: local.to_base58() });
        }
        let revocation = Revocation::verify(&statement)
            .map_err(|e| CoreCommandError::InvalidStatement { kind: StatementKind::Revocation, reason: e.to_string() })?;
        let core = revocation.owner;
        let replica = held(&mut self.cores.replicas, &core)?;
        let own = replica
            .own_delegation()
            .cloned()
            .ok_or_else(|| CoreCommandError::NotWritable(core.to_checksum()))?;
        let envelope = replica.revoke(&statement, &self.cores.keypair, &own).map_err(|e| write_error(&core, e))?;
        // The revocation is a change of our own, like a write.
        let heads = replica.heads();
        self.announce_local(core, &heads);
        self.publish(core, envelope);
        tracing::info!(%core, revoked = %revocation.peer, "revocation applied");
        Ok(SubmitOutcome { kind: StatementKind::Revocation, core: core.to_checksum(), peer: revocation.peer.to_base58() })
    }

    /// [`Self::core_set`] refused when the core's stored changes would pass `max_bytes`.
    fn core_set_within(&mut self, core: Address, namespace: &str, path: &str, value: &serde_json::Value, max_bytes: Option<u64>) -> Result<CoreSummary, CoreCommandError> {
        if let Some(limit) = max_bytes {
            let stored = held(&mut self.cores.replicas, &core)?.stored_bytes() as u64;
            // A change holds the value's JSON, the path and ~200 bytes of envelope and header.
            let used = stored + (value.to_string().len() + namespace.len() + path.len() + 200) as u64;
            if used > limit {
                return Err(CoreCommandError::Full { core: core.to_checksum(), used, limit });
            }
        }
        self.core_set(core, namespace, path, value)
    }

    fn core_set(&mut self, core: Address, namespace: &str, path: &str, value: &serde_json::Value) -> Result<CoreSummary, CoreCommandError> {
        let replica = held(&mut self.cores.replicas, &core)?;
        let delegation = replica
            .own_delegation_for(namespace)
            .cloned()
            .ok_or_else(|| CoreCommandError::NotWritable(core.to_checksum()))?;
        if crate::core::private::is_private(replica, namespace) {
            self.core_set_private(core, namespace, path, value)?;
            return self.core_summary(core);
        }
        match replica.set(namespace, path, value, &self.cores.keypair, &delegation) {
            Ok(envelope) => {
                let heads = replica.heads();
                self.announce_local(core, &heads);
                self.publish(core, envelope);
            }
            // Writing the value that is already there is done: nothing to store or send.
            Err(crate::core::WriteError::NoChange) => {}
            Err(e) => return Err(write_error(&core, e)),
        }
        self.core_summary(core)
    }

    fn core_get(&mut self, core: Address, namespace: &str, path: &str) -> Result<serde_json::Value, CoreCommandError> {
        let value = self.core_get_private(core, namespace, path)?;
        Ok(value.unwrap_or(serde_json::Value::Null))
    }

    fn core_revocation_message(&mut self, core: Address, peer: PeerId) -> Result<String, CoreCommandError> {
        let replica = held(&mut self.cores.replicas, &core)?;
        replica
            .revocation_message(&peer, time::OffsetDateTime::now_utc())
            .map_err(|e| CoreCommandError::InvalidInput(e.to_string()))
    }

    fn core_list(&mut self) -> Vec<CoreSummary> {
        self.cores.replicas.list().into_iter().filter_map(|core| self.core_summary(core).ok()).collect()
    }

    pub(super) fn core_summary(&mut self, core: Address) -> Result<CoreSummary, CoreCommandError> {
        let topic = sync::topic(&core).hash();
        let gossipsub = &self.swarm.behaviour().gossipsub;
        let replicas = gossipsub.all_peers().filter(|(_, topics)| topics.contains(&&topic)).count();
        let mesh = gossipsub.mesh_peers(&topic).count();
        let replica = held(&mut self.cores.replicas, &core)?;
        let mut heads: Vec<String> = replica.heads().iter().map(|h| h.to_string()).collect();
        heads.sort();
        Ok(CoreSummary {
            address: core.to_checksum(),
            heads,
            changes: replica.len(),
            pending: replica.pending_len(),
            replicas,
            mesh,
            writable: replica.own_delegation().is_some(),
            namespaces: replica.namespaces(),
            bytes: replica.stored_bytes() as u64,
        })
    }

    /// Announces changes that entered a core's document.
    pub(super) fn announce_applied(&self, core: Address, applied: &[ChangeHash]) {
        if !applied.is_empty() {
            self.announce(NodeEvent::CoreUpdated(CoreUpdate { core, applied: applied.iter().map(|h| h.to_string()).collect() }));
        }
    }

    /// Announces a local change (by the document's heads after it) once it is on disk.
    pub(super) fn announce_local(&mut self, core: Address, heads: &[ChangeHash]) {
        if !heads.is_empty() {
            let update = CoreUpdate { core, applied: heads.iter().map(|h| h.to_string()).collect() };
            self.after_sync(super::durable::AfterSync::Announce(update));
        }
    }

    /// Publishes a local change on the core's topic as soon as it is logged, without waiting
    /// for the fsync that acknowledges it (see `durable`): a logged change may already leave
    /// the node in a catch-up answer, and the fsync (6 ms at the median here, 30 ms at p99 with
    /// other builds writing) was most of a change's propagation time. With no peer yet,
    /// catch-up delivers it.
    pub(super) fn publish(&mut self, core: Address, envelope: SignedChange) {
        let topic = sync::topic(&core);
        // Gossipsub signs a message before it looks for peers (~10% of a local write's CPU
        // on a node alone): skip it when no peer holds the core.
        let hash = topic.hash();
        if !self.swarm.behaviour().gossipsub.all_peers().any(|(_, topics)| topics.contains(&&hash)) {
            tracing::debug!(%core, "no replica online; the change will travel by catch-up");
            return;
        }
        match self.swarm.behaviour_mut().gossipsub.publish(topic, envelope.encode_to_vec()) {
            Ok(_) => tracing::debug!(%core, "published a change"),
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {
                tracing::debug!(%core, "no replica online; the change will travel by catch-up");
            }
            Err(e) => tracing::warn!(%core, "cannot publish a change: {e}"),
        }
    }

    pub(super) fn on_gossipsub_event(&mut self, event: gossipsub::Event) {
        match event {
            gossipsub::Event::Message { propagation_source, message_id, message } => {
                // The topic names the core; a message for a core we do not hold is not ours to
                // judge, and the envelope must be for the topic's core (checked off the loop).
                let Some(core) = self.cores.gossip.topics.get(&message.topic).copied() else {
                    self.report_gossip(&message_id, &propagation_source, MessageAcceptance::Ignore);
                    return;
                };
                if !self.cores.gossip.start(message_id.clone(), propagation_source, core, message.data) {
                    tracing::debug!(peer = %propagation_source, %core, "too many gossip messages in verification; ignoring one");
                    self.report_gossip(&message_id, &propagation_source, MessageAcceptance::Ignore);
                }
            }
            gossipsub::Event::Subscribed { peer_id, topic } => {
                if let Some(core) = self.cores.gossip.topics.get(&topic).copied() {
                    tracing::debug!(%peer_id, %core, "peer holds the same core: catching up");
                    let actions = self.cores.schedule.replica_joined(core, peer_id);
                    self.catch_up(actions);
                }
            }
            gossipsub::Event::Unsubscribed { peer_id, topic } => {
                if let Some(core) = self.cores.gossip.topics.get(&topic).copied() {
                    self.cores.schedule.replica_left(core, &peer_id);
                }
            }
            _ => {}
        }
    }

    fn report_gossip(&mut self, id: &MessageId, source: &PeerId, acceptance: MessageAcceptance) {
        let _ = self.swarm.behaviour_mut().gossipsub.report_message_validation_result(id, source, acceptance);
    }

    /// A gossip message came back from verification: the history checks, then the verdict
    /// that tells gossipsub whether to forward it.
    pub(super) fn on_gossip_verified(&mut self, verdict: GossipVerdict) {
        let GossipVerdict { id, source, core, result } = verdict;
        self.cores.gossip.finished(&source);
        let outcome = match result {
            Ok(verified) => self.cores.replicas.apply_verified(verified),
            Err(reason) => Err(ApplyError::Rejected(reason)),
        };
        let acceptance = match outcome {
            Ok(Accepted::Applied(report)) | Ok(Accepted::Evidence(report)) => {
                tracing::debug!(%core, peer = %source, "applied a change from gossip");
                self.announce_applied(core, &report.applied);
                self.msg_core_changed(core);
                self.private_share(core);
                MessageAcceptance::Accept
            }
            Ok(Accepted::Duplicate) => MessageAcceptance::Ignore,
            Ok(Accepted::MissingDeps { missing }) => {
                tracing::debug!(%core, missing = missing.len(), "change waits for its dependencies");
                self.cores.schedule.held_back(core, source, Instant::now());
                MessageAcceptance::Ignore
            }
            Err(ApplyError::Rejected(reason)) => {
                tracing::warn!(%source, %core, "rejected a change: {reason}");
                self.announce(NodeEvent::ChangeRejected { core, from: source, reason });
                MessageAcceptance::Reject
            }
            Err(e) => {
                tracing::error!(%core, "cannot store a change: {e}");
                MessageAcceptance::Ignore
            }
        };
        self.report_gossip(&id, &source, acceptance);
    }

    pub(super) fn on_core_sync_event(&mut self, event: request_response::Event<SyncRequest, SyncResponse>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request { mut request, channel, .. } => {
                    let now = Instant::now();
                    let budget = self.cores.sync_budgets.entry(peer).or_insert_with(|| SyncBudget::new(now));
                    if !budget.take_request(now) || self.cores.sync_work.busy() {
                        tracing::debug!(%peer, "core-sync request over the peer's budget or the node's");
                        let busy = SyncResponse {
                            core: request.core,
                            error: "busy: too many catch-up requests; retry later".into(),
                            ..Default::default()
                        };
                        let _ = self.swarm.behaviour_mut().core_sync.send_response(channel, busy);
                        return;
                    }
                    let (envelopes, claimed) = self.cores.claim(&request.core, std::mem::take(&mut request.changes));
                    let core = request.core.clone();
                    self.cores.sync_work.start(core, envelopes, claimed, move |batch| SyncWork::Request { peer, channel, request, batch });
                }
                request_response::Message::Response { mut response, .. } => {
                    let (envelopes, claimed) = self.cores.claim(&response.core, std::mem::take(&mut response.changes));
                    let core = response.core.clone();
                    self.cores.sync_work.start(core, envelopes, claimed, move |batch| SyncWork::Response { peer, response, batch });
                }
            },
            request_response::Event::OutboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, "catch-up request failed: {error}");
                self.cores.replicas.end_sync(&peer);
                // A peer that does not speak core sync is not asked again; any other failure
                // (a connection that closed under the request, a timeout) is retried while the
                // peer stays connected.
                let actions = match error {
                    request_response::OutboundFailure::UnsupportedProtocols => self.cores.schedule.session_ended(None, &peer),
                    _ => self.cores.schedule.request_failed(&peer, Instant::now()),
                };
                self.catch_up(actions);
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, "catch-up answer failed: {error}");
            }
            _ => {}
        }
    }

    /// A catch-up message came back from verification: answer the request, or go on with
    /// the session. Both carry changes: what they did is logged and announced either way.
    pub(super) fn on_sync_verified(&mut self, work: SyncWork, claimed: Claimed) {
        self.cores.sync_work.in_flight = self.cores.sync_work.in_flight.saturating_sub(1);
        // This call hands the changes to the replica, with nothing in between: later copies
        // meet `contains`, or verification again if the replica refused them.
        self.cores.sync_work.release(&claimed);
        match work {
            SyncWork::Request { peer, channel, request, batch } => {
                let core = Address::parse(&request.core).ok();
                let response = match batch {
                    Ok(batch) => {
                        let (response, report) = self.cores.replicas.handle_verified_sync_request(request, batch, &peer);
                        let applied_any = !report.applied.is_empty();
                        self.report_catch_up(core, peer, report);
                        if let Some(core) = core.filter(|_| applied_any) {
                            self.msg_core_changed(core);
                        }
                        response
                    }
                    Err(reason) => {
                        let response = SyncResponse { core: request.core, error: reason.to_string(), ..Default::default() };
                        self.report_rejected(core, peer, reason);
                        response
                    }
                };
                if let Some(budget) = self.cores.sync_budgets.get_mut(&peer) {
                    budget.charge(response.encoded_len());
                }
                let _ = self.swarm.behaviour_mut().core_sync.send_response(channel, response);
            }
            SyncWork::Response { peer, response, batch } => {
                let core = Address::parse(&response.core).ok();
                let step = match batch {
                    Ok(batch) => self.cores.replicas.handle_verified_sync_response(response, batch, &peer),
                    Err(reason) => {
                        self.cores.replicas.end_sync(&peer);
                        let step = crate::core::SyncStep::failed(reason.to_string());
                        self.report_rejected(core, peer, reason);
                        step
                    }
                };
                let applied_any = !step.report.applied.is_empty();
                let in_sync = step.error.is_none() && step.next.is_none();
                self.report_catch_up(core, peer, step.report);
                if let Some(core) = core.filter(|_| applied_any) {
                    self.private_share(core);
                    self.msg_core_changed(core);
                }
                if let Some(core) = core.filter(|_| in_sync) {
                    self.msg_sender_caught_up(core);
                }
                if let Some(error) = &step.error {
                    tracing::debug!(%peer, "catch-up ended: {error}");
                }
                match step.next {
                    Some(next) => {
                        self.swarm.behaviour_mut().core_sync.send_request(&peer, next);
                    }
                    None => {
                        let actions = self.cores.schedule.session_ended(core, &peer);
                        self.catch_up(actions);
                    }
                }
            }
        }
    }

    /// Logs and announces what the envelopes of a catch-up message from `peer` did.
    fn report_catch_up(&self, core: Option<Address>, peer: PeerId, report: BatchReport) {
        if !report.applied.is_empty() {
            tracing::info!(%peer, applied = report.applied.len(), "caught up with a replica");
            if let Some(core) = core {
                self.announce_applied(core, &report.applied);
            }
        }
        for (_, reason) in report.rejected {
            self.report_rejected(core, peer, reason);
        }
    }

    fn report_rejected(&self, core: Option<Address>, peer: PeerId, reason: Rejected) {
        tracing::warn!(%peer, "rejected a change during catch-up: {reason}");
        if let Some(core) = core {
            self.announce(NodeEvent::ChangeRejected { core, from: peer, reason });
        }
    }
}
