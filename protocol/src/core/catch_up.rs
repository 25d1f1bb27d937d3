//! When, and with whom, a node catches up on the cores it holds: the catch-up scheduler.
//!
//! Three things are called "sync" in this crate; this is the third:
//! - [`crate::sync`]: the wire (gossipsub topics, the `/kubelt/core-sync/1.0.0` codec);
//! - `core/sync.rs`: one catch-up *session* with one peer, in rounds of Automerge's sync
//!   protocol ([`super::Replica::sync_request`]);
//! - here: which sessions to run, decided without I/O. The event loop reports what happened
//!   (a peer connected, a replica subscribed to a core's topic, a change waits for its
//!   dependencies, a session ended) and calls [`Scheduler::tick`] with the time; the scheduler
//!   answers with [`Action`]s. It is tested like the bitswap session: by driving it with
//!   events and instants.
//!
//! One session runs per core at a time; other peers wait in a queue. Catching up with every
//! replica at once would ship the same changes many times over; one after the other, each
//! later session finds most of the work done.
//!
//! A replica whose connection is lost (it stopped answering pings, a partition, a restart) is
//! dialed again: every second at first, then less and less often (see [`ScheduleConfig`]), so
//! that catch-up starts within about a second of the network coming back instead of waiting
//! for a periodic round or a DHT lookup. Catch-up itself starts when the reconnected peer's
//! subscriptions arrive ([`Scheduler::replica_joined`]).
//!
//! A core followed just now whose DHT lookup ends without a connected replica is looked up
//! again after 250 ms, 500 ms, 1 s… ([`ScheduleConfig::lookup_retries`] times): the lookup may
//! have raced the owner's announcement (its provider record not stored yet), and the periodic
//! round would otherwise leave the follower alone for its whole interval.
//!
//! A request that fails while the peer stays connected (the connection it went over closed —
//! a relayed connection replaced by a direct one —, or it timed out) is retried a few times,
//! with a growing pause: nothing else would restart the session until the next round.
//!
//! Everything held here is bounded by what the node itself holds and is connected to: the
//! cores it holds (keys of every map), connected peers (sets and queues are deduplicated and
//! lose a peer when it disconnects), and at most [`MAX_LOST_REPLICAS`] lost replicas.
//!
//! A node may hold many cores (a hosted node: thousands), so the idle cost must not grow with
//! them: at most [`ScheduleConfig::max_sessions`] sessions run at once over all cores (each
//! keeps its replica in memory; the others wait in line), and DHT lookups of replicas go
//! through one queue drained at [`ScheduleConfig::max_lookups_per_tick`]: the periodic round
//! and a node's start queue a lookup per core, a core followed just now is looked up at once.
//! The round's sessions visit only the cores that have a connected replica, and such a core is
//! looked up only one round in [`ScheduleConfig::connected_lookup_rounds`]; a core alone is
//! looked up every round.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use libp2p::PeerId;

use super::Address;

/// Timing of the scheduler.
#[derive(Debug, Clone)]
pub struct ScheduleConfig {
    /// How often every core catches up with every replica it is connected to, and a core with
    /// no connected replica looks for replicas in the DHT: the safety net under gossip.
    pub round_interval: Duration,
    /// A core that has a connected replica looks for more in the DHT only every this many
    /// rounds (5 minutes by default), each core in its own round: gossip reaches the replicas
    /// it is not connected to through the ones it is, and a hosted node holding thousands of
    /// cores would otherwise always be looking one up (a DHT query opens connections and runs
    /// handshakes: most of an idle node's work, profiled).
    pub connected_lookup_rounds: u32,
    /// How long changes held back for missing dependencies may wait for them to arrive by
    /// gossip (messages take different paths, so parents often follow a moment later) before
    /// a session asks the peer that sent one.
    pub missing_deps_grace: Duration,
    /// How often a lost replica is dialed again during the first [`redial_fast_for`]
    /// (a dial that fails fails fast on a cut route or a closed port; one dial at a time).
    ///
    /// [`redial_fast_for`]: Self::redial_fast_for
    pub redial_interval: Duration,
    /// How long lost replicas are dialed every [`redial_interval`](Self::redial_interval);
    /// after it the wait doubles up to [`redial_max_interval`](Self::redial_max_interval).
    pub redial_fast_for: Duration,
    /// The longest wait between two dials of a lost replica.
    pub redial_max_interval: Duration,
    /// How long a lost replica is dialed at all; after it the periodic round's DHT lookups and
    /// the connection maintenance find it again, if it comes back.
    pub redial_for: Duration,
    /// Sessions running at once, over all cores; more wait in line.
    pub max_sessions: usize,
    /// Queued DHT lookups started per [`Scheduler::tick`].
    pub max_lookups_per_tick: usize,
    /// The pause before retrying a failed request with a peer still connected; it doubles
    /// with every failure in a row.
    pub retry_backoff: Duration,
    /// Failures in a row after which a session waits for the next round.
    pub max_retries: u32,
    /// How many times a core added just now is looked up again when its lookup found no
    /// connected replica, [`lookup_retry_after`](Self::lookup_retry_after) apart at first and
    /// doubling.
    pub lookup_retries: u32,
    /// The pause before the first of those lookups.
    pub lookup_retry_after: Duration,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            round_interval: Duration::from_secs(30),
            connected_lookup_rounds: 10,
            missing_deps_grace: Duration::from_secs(1),
            redial_interval: Duration::from_secs(1),
            redial_fast_for: Duration::from_secs(60),
            redial_max_interval: Duration::from_secs(60),
            redial_for: Duration::from_secs(30 * 60),
            max_sessions: 64,
            max_lookups_per_tick: 4,
            retry_backoff: Duration::from_secs(1),
            max_retries: 3,
            lookup_retries: 7,
            lookup_retry_after: Duration::from_millis(250),
        }
    }
}

/// Most lost replicas dialed again at once; past it, the replica lost longest ago is dropped.
pub(crate) const MAX_LOST_REPLICAS: usize = 256;

/// What the event loop should do.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Action {
    /// Start a session of `core` with `peer`: ask the replica for a request and send it. When
    /// the replica has nothing to ask, report [`Scheduler::session_ended`] at once.
    Sync {
        /// The core to catch up on.
        core: Address,
        /// The replica to catch up with.
        peer: PeerId,
    },
    /// Look the core's replicas up in the DHT (they are dialed when found).
    FindReplicas(Address),
    /// Dial a replica whose connection was lost (unless connected or being dialed already).
    Redial(PeerId),
}

/// The session running for a core, and who is next.
#[derive(Debug)]
struct Running {
    peer: PeerId,
    queue: VecDeque<PeerId>,
}

/// A replica whose last connection closed, and when to dial it next.
#[derive(Debug, Clone, Copy)]
struct Lost {
    since: Instant,
    next: Instant,
}

/// Failed requests in a row of a core's session with a peer, and when to try again.
#[derive(Debug)]
struct Retry {
    failures: u32,
    due: Option<Instant>,
}

/// The quick lookups of a core added just now (see [`Scheduler::lookup_finished`]).
#[derive(Debug)]
struct LookupRetry {
    retry: Retry,
    /// Replicas the lookups so far named (and the event loop dialed). None of them connected,
    /// or the retries would have ended, so a lookup naming only these again goes on.
    named: BTreeSet<PeerId>,
}

/// Most replicas remembered per core in [`LookupRetry::named`]; past it, a lookup ends at any
/// answer naming a replica, as without the memory.
const MAX_NAMED_PER_LOOKUP: usize = 64;

/// Decides the catch-up sessions of every core held (see the module doc).
#[derive(Debug)]
pub struct Scheduler {
    config: ScheduleConfig,
    /// Peers with an open connection.
    connected: BTreeSet<PeerId>,
    /// Connected peers known to hold each core (subscribed to its topic). Ordered, so the same
    /// events give the same actions.
    replicas: BTreeMap<Address, BTreeSet<PeerId>>,
    sessions: HashMap<Address, Running>,
    /// Cores holding back changes for missing dependencies: the peer that sent one (it has
    /// the dependencies) and since when.
    held_back: BTreeMap<Address, (PeerId, Instant)>,
    /// Replicas whose connection closed, dialed again until they are back.
    lost: BTreeMap<PeerId, Lost>,
    /// Sessions waiting for a free slot (at most one per core: the others queue behind it).
    backlog: VecDeque<(Address, PeerId)>,
    /// Cores waiting for a DHT lookup of their replicas, each once.
    lookups: VecDeque<Address>,
    looking: BTreeSet<Address>,
    /// Sessions whose request failed with the peer still connected.
    retries: BTreeMap<(Address, PeerId), Retry>,
    /// Cores added just now and not yet seen with a replica: their lookups so far, when to
    /// look again (`None` while a lookup runs), and the peers those lookups named.
    lookup_retries: BTreeMap<Address, LookupRetry>,
    next_round: Instant,
    /// Periodic rounds so far: whose turn it is to look up a core that has a replica.
    rounds: u64,
}

impl Scheduler {
    /// A scheduler whose first periodic round is one interval from `now`.
    pub fn new(config: ScheduleConfig, now: Instant) -> Self {
        let next_round = now + config.round_interval;
        Scheduler {
            config,
            connected: BTreeSet::new(),
            replicas: BTreeMap::new(),
            sessions: HashMap::new(),
            held_back: BTreeMap::new(),
            lost: BTreeMap::new(),
            backlog: VecDeque::new(),
            lookups: VecDeque::new(),
            looking: BTreeSet::new(),
            retries: BTreeMap::new(),
            lookup_retries: BTreeMap::new(),
            next_round,
            rounds: 0,
        }
    }

    /// A core held when the node started: its replicas are looked up in turn (see the
    /// module doc), not all at once.
    pub fn core_held_at_start(&mut self, core: Address) {
        self.queue_lookup(core);
    }

    fn queue_lookup(&mut self, core: Address) {
        if self.looking.insert(core) {
            self.lookups.push_back(core);
        }
    }

    /// Lookups due now, within the per-tick budget.
    fn next_lookups(&mut self) -> Vec<Action> {
        let n = self.config.max_lookups_per_tick.min(self.lookups.len());
        self.lookups
            .drain(..n)
            .map(|core| {
                self.looking.remove(&core);
                Action::FindReplicas(core)
            })
            .collect()
    }

    /// Sessions waiting in the backlog for a free slot.
    pub fn waiting(&self) -> usize {
        self.backlog.len()
    }

    /// DHT lookups waiting in the queue.
    pub fn lookups_queued(&self) -> usize {
        self.lookups.len()
    }

    /// A core was just followed or delegated: catch up with every connected peer (any of them
    /// may hold it before its subscription is known), and look for replicas.
    pub fn core_added(&mut self, core: Address) -> Vec<Action> {
        if self.config.lookup_retries > 0 {
            self.lookup_retries.insert(core, LookupRetry { retry: Retry { failures: 0, due: None }, named: BTreeSet::new() });
        }
        let mut actions = vec![Action::FindReplicas(core)];
        for peer in self.connected.clone() {
            actions.extend(self.want(core, peer));
        }
        actions
    }

    /// The first connection with `peer` opened.
    pub fn peer_connected(&mut self, peer: PeerId) {
        self.connected.insert(peer);
        self.lost.remove(&peer);
    }

    /// The last connection with `peer` closed at `now`: it holds nothing any more, its sessions
    /// end and the next peers in line start. If it held a core of ours, it is dialed again
    /// from the next [`tick`](Self::tick) one interval later.
    pub fn peer_disconnected(&mut self, peer: &PeerId, now: Instant) -> Vec<Action> {
        self.connected.remove(peer);
        if self.replicas.values().any(|r| r.contains(peer)) {
            if self.lost.len() >= MAX_LOST_REPLICAS && !self.lost.contains_key(peer) {
                let oldest = self.lost.iter().min_by_key(|(_, l)| l.since).map(|(p, _)| *p);
                if let Some(oldest) = oldest {
                    self.lost.remove(&oldest);
                }
            }
            self.lost.insert(*peer, Lost { since: now, next: now + self.config.redial_interval });
        }
        for replicas in self.replicas.values_mut() {
            replicas.remove(peer);
        }
        self.replicas.retain(|_, r| !r.is_empty());
        for running in self.sessions.values_mut() {
            running.queue.retain(|p| p != peer);
        }
        self.held_back.retain(|_, (from, _)| from != peer);
        self.backlog.retain(|(_, p)| p != peer);
        self.retries.retain(|(_, p), _| p != peer);
        self.session_ended(None, peer)
    }

    /// `peer` holds `core` (it subscribed to the core's topic): catch up with it. This is also
    /// what heals a partition: a peer that comes back subscribes again.
    pub fn replica_joined(&mut self, core: Address, peer: PeerId) -> Vec<Action> {
        if !self.connected.contains(&peer) {
            return vec![];
        }
        self.replicas.entry(core).or_default().insert(peer);
        self.lookup_retries.remove(&core);
        self.want(core, peer)
    }

    /// Whether `core` was added just now and has no replica yet: its lookups are retried
    /// quickly (see [`Scheduler::lookup_finished`]). The event loop asks
    /// [`Scheduler::lookup_may_end`] instead; the tests look at the state itself.
    #[cfg(test)]
    fn lookup_retrying(&self, core: &Address) -> bool {
        self.lookup_retries.contains_key(core)
    }

    /// An answer to a lookup of `core` named these replicas (never the node itself), which the
    /// event loop dials: whether the lookup may end here instead of asking on. Only the quick
    /// lookups of a core added just now end early (the follower is alone, and each further
    /// answer costs a round trip), and only at an answer naming a replica that no lookup of
    /// the sequence named before. A replica named before was dialed and has not joined: most
    /// likely a provider record outliving its node (records live up to 48 h), which would
    /// otherwise end every retry at the same dead peer while a live replica named later in
    /// the query waits for the periodic round.
    pub fn lookup_may_end(&mut self, core: &Address, named: impl IntoIterator<Item = PeerId>) -> bool {
        let Some(lookup) = self.lookup_retries.get_mut(core) else { return false };
        let mut new = false;
        for peer in named {
            if lookup.named.contains(&peer) {
                continue;
            }
            new = true;
            if lookup.named.len() < MAX_NAMED_PER_LOOKUP {
                lookup.named.insert(peer);
            }
        }
        new
    }

    /// A DHT lookup of `core`'s replicas ended. A core added just now with no connected
    /// replica yet is looked up again after a pause that doubles each time (the providers it
    /// named, if any, are being dialed meanwhile; one that connects ends the retries).
    pub fn lookup_finished(&mut self, core: Address, now: Instant) {
        let known = self.replicas(&core) > 0;
        let Some(LookupRetry { retry, .. }) = self.lookup_retries.get_mut(&core) else { return };
        if known || retry.failures >= self.config.lookup_retries {
            self.lookup_retries.remove(&core);
            return;
        }
        retry.due = Some(now + self.config.lookup_retry_after.saturating_mul(1 << retry.failures.min(16)));
        retry.failures += 1;
    }

    /// `peer` no longer holds `core`.
    pub fn replica_left(&mut self, core: Address, peer: &PeerId) {
        if let Some(replicas) = self.replicas.get_mut(&core) {
            replicas.remove(peer);
            if replicas.is_empty() {
                self.replicas.remove(&core);
            }
        }
    }

    /// A change from `from` waits for dependencies: if they have not come by gossip within the
    /// grace period, [`tick`](Self::tick) starts a session with `from`.
    pub fn held_back(&mut self, core: Address, from: PeerId, now: Instant) {
        self.held_back.entry(core).or_insert((from, now));
    }

    /// Starts a session of `core` with `peer`, or queues `peer` behind the one running, or,
    /// when [`ScheduleConfig::max_sessions`] run already, in the backlog.
    pub fn want(&mut self, core: Address, peer: PeerId) -> Vec<Action> {
        let full = self.sessions.len() >= self.config.max_sessions.max(1);
        match self.sessions.get_mut(&core) {
            Some(running) => {
                if running.peer != peer && !running.queue.contains(&peer) {
                    running.queue.push_back(peer);
                }
                vec![]
            }
            None if full => {
                if !self.backlog.contains(&(core, peer)) {
                    self.backlog.push_back((core, peer));
                }
                vec![]
            }
            None => {
                self.sessions.insert(core, Running { peer, queue: VecDeque::new() });
                vec![Action::Sync { core, peer }]
            }
        }
    }

    /// Starts sessions from the backlog while slots are free.
    fn start_backlog(&mut self) -> Vec<Action> {
        let mut actions = Vec::new();
        while self.sessions.len() < self.config.max_sessions.max(1) {
            let Some((core, peer)) = self.backlog.pop_front() else { break };
            if self.connected.contains(&peer) {
                actions.extend(self.want(core, peer));
            }
        }
        actions
    }

    /// A request to `peer` failed (no answer: the connection closed or it timed out). Its
    /// sessions end and the next peers in line start; if `peer` is still connected (over
    /// another connection), [`tick`](Self::tick) starts them again after a pause that doubles
    /// with each failure in a row, up to [`ScheduleConfig::max_retries`].
    pub fn request_failed(&mut self, peer: &PeerId, now: Instant) -> Vec<Action> {
        if self.connected.contains(peer) {
            let cores: Vec<Address> = self.sessions.iter().filter(|(_, r)| r.peer == *peer).map(|(c, _)| *c).collect();
            for core in cores {
                let retry = self.retries.entry((core, *peer)).or_insert(Retry { failures: 0, due: None });
                if retry.failures < self.config.max_retries {
                    retry.due = Some(now + self.config.retry_backoff * 2u32.pow(retry.failures));
                    retry.failures += 1;
                }
            }
        }
        self.end_sessions(None, peer)
    }

    /// The session of `core` (or, with `None`, every session) with `peer` ended — done,
    /// failed, or it had nothing to ask: the next connected peer in line starts. A session
    /// that ended this way clears its failures in a row.
    pub fn session_ended(&mut self, core: Option<Address>, peer: &PeerId) -> Vec<Action> {
        self.retries.retain(|(c, p), _| p != peer || core.is_some_and(|core| core != *c));
        self.end_sessions(core, peer)
    }

    fn end_sessions(&mut self, core: Option<Address>, peer: &PeerId) -> Vec<Action> {
        let ended: Vec<Address> = self
            .sessions
            .iter()
            .filter(|(c, running)| running.peer == *peer && core.is_none_or(|core| core == **c))
            .map(|(c, _)| *c)
            .collect();
        let mut actions = Vec::new();
        for core in ended {
            let Some(mut running) = self.sessions.remove(&core) else { continue };
            while let Some(next) = running.queue.pop_front() {
                if self.connected.contains(&next) {
                    self.sessions.insert(core, Running { peer: next, queue: running.queue });
                    actions.push(Action::Sync { core, peer: next });
                    break;
                }
            }
        }
        actions.extend(self.start_backlog());
        actions
    }

    /// Whether a session of `core` is running.
    pub fn is_syncing(&self, core: &Address) -> bool {
        self.sessions.contains_key(core)
    }

    /// What is due at `now`: sessions for changes still held back after the grace period
    /// (`still_missing` says whether a core still misses dependencies), the periodic round
    /// (a session with every connected replica of every core, and a queued DHT lookup for
    /// each core `held` lists), and the next queued lookups. `held` is called only when the
    /// round is due: most ticks need no list of the cores.
    pub fn tick(&mut self, now: Instant, held: impl FnOnce() -> Vec<Address>, still_missing: impl Fn(&Address) -> bool) -> Vec<Action> {
        let grace = self.config.missing_deps_grace;
        let due: Vec<(Address, PeerId)> = self
            .held_back
            .iter()
            .filter(|(_, (_, since))| now.saturating_duration_since(*since) >= grace)
            .map(|(core, (peer, _))| (*core, *peer))
            .collect();
        let mut actions = Vec::new();
        for (core, peer) in due {
            self.held_back.remove(&core);
            if still_missing(&core) && self.connected.contains(&peer) {
                actions.extend(self.want(core, peer));
            }
        }
        actions.extend(self.redials(now));
        for (core, peer) in take_due(&mut self.retries, now) {
            actions.extend(self.want(core, peer));
        }
        for core in take_due(&mut self.lookup_retries, now) {
            self.queue_lookup(core);
        }
        if now >= self.next_round {
            self.next_round = now + self.config.round_interval;
            let with_replicas: Vec<(Address, Vec<PeerId>)> =
                self.replicas.iter().map(|(core, peers)| (*core, peers.iter().copied().collect())).collect();
            for (core, peers) in with_replicas {
                for peer in peers {
                    actions.extend(self.want(core, peer));
                }
            }
            self.rounds += 1;
            for core in held() {
                if self.replicas(&core) == 0 || self.lookup_turn(&core) {
                    self.queue_lookup(core);
                }
            }
        }
        actions.extend(self.next_lookups());
        actions
    }

    /// Whether this round looks up `core` although it has a connected replica: one round in
    /// [`ScheduleConfig::connected_lookup_rounds`], a different one for different cores so
    /// that their lookups spread over the rounds.
    fn lookup_turn(&self, core: &Address) -> bool {
        let every = u64::from(self.config.connected_lookup_rounds.max(1));
        let offset = core.as_bytes().iter().fold(0u64, |acc, b| acc.wrapping_mul(31).wrapping_add(u64::from(*b)));
        self.rounds.wrapping_add(offset) % every == 0
    }

    /// Connected peers known to hold `core`.
    pub fn replicas(&self, core: &Address) -> usize {
        self.replicas.get(core).map_or(0, |r| r.len())
    }

    /// Lost replicas due for a dial at `now`, each given its next time; those lost for longer
    /// than [`ScheduleConfig::redial_for`] are given up.
    fn redials(&mut self, now: Instant) -> Vec<Action> {
        let config = &self.config;
        self.lost.retain(|_, lost| now.saturating_duration_since(lost.since) < config.redial_for);
        let mut actions = Vec::new();
        for (peer, lost) in self.lost.iter_mut().filter(|(_, lost)| now >= lost.next) {
            let gone_for = now.saturating_duration_since(lost.since);
            let wait = if gone_for < config.redial_fast_for {
                config.redial_interval
            } else {
                // Doubles every `redial_fast_for` past the fast phase.
                let doublings = (gone_for.as_secs_f64() / config.redial_fast_for.as_secs_f64()).min(16.0) as u32;
                config.redial_interval.saturating_mul(1 << doublings).min(config.redial_max_interval)
            };
            lost.next = now + wait;
            actions.push(Action::Redial(*peer));
        }
        actions
    }
}

/// The keys of `retries` due at `now`, each marked as no longer waiting.
fn take_due<K: Copy + Ord, V: AsMut<Retry>>(retries: &mut BTreeMap<K, V>, now: Instant) -> Vec<K> {
    retries
        .iter_mut()
        .map(|(key, v)| (key, v.as_mut()))
        .filter(|(_, retry)| retry.due.is_some_and(|due| now >= due))
        .map(|(key, retry)| {
            retry.due = None;
            *key
        })
        .collect()
}

impl AsMut<Retry> for Retry {
    fn as_mut(&mut self) -> &mut Retry {
        self
    }
}

impl AsMut<Retry> for LookupRetry {
    fn as_mut(&mut self) -> &mut Retry {
        &mut self.retry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn core(n: u8) -> Address {
        Address::from_bytes([n; 20])
    }

    fn setup(peers: usize) -> (Scheduler, Vec<PeerId>, Instant) {
        let now = Instant::now();
        let mut s = Scheduler::new(ScheduleConfig::default(), now);
        let peers: Vec<PeerId> = (0..peers).map(|_| PeerId::random()).collect();
        for p in &peers {
            s.peer_connected(*p);
        }
        (s, peers, now)
    }

    #[test]
    fn one_session_per_core_the_others_wait_in_line() {
        let (mut s, p, _) = setup(3);
        let c = core(1);
        assert_eq!(s.replica_joined(c, p[0]), vec![Action::Sync { core: c, peer: p[0] }]);
        assert_eq!(s.replica_joined(c, p[1]), vec![]);
        assert_eq!(s.replica_joined(c, p[2]), vec![]);
        // Asked twice, queued once.
        assert_eq!(s.want(c, p[1]), vec![]);
        assert_eq!(s.session_ended(Some(c), &p[0]), vec![Action::Sync { core: c, peer: p[1] }]);
        assert_eq!(s.session_ended(Some(c), &p[1]), vec![Action::Sync { core: c, peer: p[2] }]);
        assert_eq!(s.session_ended(Some(c), &p[2]), vec![]);
        assert!(!s.is_syncing(&c));
        // Another core's session runs beside it.
        let d = core(2);
        assert_eq!(s.replica_joined(c, p[0]), vec![Action::Sync { core: c, peer: p[0] }]);
        assert_eq!(s.replica_joined(d, p[0]), vec![Action::Sync { core: d, peer: p[0] }]);
    }

    #[test]
    fn a_disconnect_ends_its_sessions_and_skips_it_in_every_queue() {
        let (mut s, p, now) = setup(3);
        let (c, d) = (core(1), core(2));
        s.replica_joined(c, p[0]);
        s.replica_joined(c, p[1]);
        s.replica_joined(c, p[2]);
        s.replica_joined(d, p[2]);
        s.replica_joined(d, p[1]);
        // p1 leaves: queued in c, queued in d.
        assert_eq!(s.peer_disconnected(&p[1], now), vec![]);
        assert_eq!(s.replicas(&c), 2);
        // p0's session of c ends: p1 is skipped, p2 is next.
        assert_eq!(s.session_ended(Some(c), &p[0]), vec![Action::Sync { core: c, peer: p[2] }]);
        // p2 leaves while running both: nothing left to run.
        assert_eq!(s.peer_disconnected(&p[2], now), vec![]);
        assert!(!s.is_syncing(&c) && !s.is_syncing(&d));
        // A subscription from a peer that is not connected starts nothing.
        assert_eq!(s.replica_joined(c, p[1]), vec![]);
    }

    #[test]
    fn held_back_changes_wait_for_gossip_then_ask_the_sender() {
        let (mut s, p, now) = setup(2);
        let c = core(1);
        s.held_back(c, p[1], now);
        // A second report keeps the first time and sender.
        s.held_back(c, p[0], now + Duration::from_millis(500));
        assert_eq!(s.tick(now + Duration::from_millis(900), || vec![c], |_| true), vec![]);
        assert_eq!(s.tick(now + Duration::from_secs(1), || vec![c], |_| true), vec![Action::Sync { core: c, peer: p[1] }]);
        // Reported once: the next tick does not ask again.
        assert_eq!(s.tick(now + Duration::from_secs(2), || vec![c], |_| true), vec![]);
        // Dependencies that arrived by gossip in the meantime: no session.
        let d = core(2);
        s.held_back(d, p[0], now);
        assert_eq!(s.tick(now + Duration::from_secs(3), || vec![c, d], |core| *core != d), vec![]);
    }

    #[test]
    fn the_periodic_round_visits_every_replica_and_looks_for_more() {
        let (mut s, p, now) = setup(3);
        let (c, d) = (core(1), core(2));
        s.replica_joined(c, p[0]);
        s.replica_joined(c, p[1]);
        s.session_ended(Some(c), &p[0]);
        s.session_ended(Some(c), &p[1]);
        s.replica_left(c, &p[1]);
        let before = s.tick(now + Duration::from_secs(29), || vec![c, d], |_| false);
        assert_eq!(before, vec![]);
        let round = s.tick(now + Duration::from_secs(30), || vec![c, d], |_| false);
        assert_eq!(round[0], Action::Sync { core: c, peer: p[0] });
        assert_eq!(lookups_of(d, &round), 1, "a core without a connected replica is looked up every round: {round:?}");
        // The next round is one interval later.
        s.session_ended(Some(c), &p[0]);
        assert_eq!(s.tick(now + Duration::from_secs(59), || vec![c], |_| false), vec![]);
        let next = s.tick(now + Duration::from_secs(60), || vec![c, d], |_| false);
        assert!(next.contains(&Action::Sync { core: c, peer: p[0] }) && lookups_of(d, &next) == 1, "{next:?}");
    }

    #[test]
    fn a_core_with_a_connected_replica_is_looked_up_once_in_ten_rounds_each_in_its_own() {
        let (mut s, p, now) = setup(1);
        let with_replica: Vec<Address> = (1..=20).map(core).collect();
        let alone = core(100);
        for c in &with_replica {
            s.replica_joined(*c, p[0]);
            s.session_ended(Some(*c), &p[0]);
        }
        let mut held = with_replica.clone();
        held.push(alone);
        // Lookups are drained a few per tick: tick often enough to see each round's all.
        let mut per_round = Vec::new();
        for round in 1..=10u64 {
            let at = now + Duration::from_secs(30 * round);
            let mut actions = s.tick(at, || held.clone(), |_| false);
            for i in 1..=20 {
                actions.extend(s.tick(at + Duration::from_millis(i), Vec::new, |_| false));
            }
            for c in &with_replica {
                s.session_ended(Some(*c), &p[0]);
            }
            for c in &held {
                s.lookup_finished(*c, at);
            }
            assert_eq!(lookups_of(alone, &actions), 1, "round {round}: the core alone is looked up every round");
            per_round.push(with_replica.iter().filter(|c| lookups_of(**c, &actions) == 1).count());
        }
        assert_eq!(per_round.iter().sum::<usize>(), 20, "each core with a replica once in ten rounds: {per_round:?}");
        assert!(per_round.iter().all(|n| *n < 20), "spread over the rounds, not all in one: {per_round:?}");
    }

    #[test]
    fn a_failed_request_to_a_peer_still_connected_is_retried_with_a_growing_pause() {
        let (mut s, p, now) = setup(2);
        let c = core(1);
        let tick = |s: &mut Scheduler, at: Instant| s.tick(at, Vec::new, |_| false);
        assert_eq!(s.replica_joined(c, p[0]), vec![Action::Sync { core: c, peer: p[0] }]);
        s.replica_joined(c, p[1]);
        // The request to p0 fails (the relayed connection it went over closed): p1 is next.
        assert_eq!(s.request_failed(&p[0], now), vec![Action::Sync { core: c, peer: p[1] }]);
        assert_eq!(s.session_ended(Some(c), &p[1]), vec![]);
        // p0 again after 1 s; failing again, after 2 s, then 4 s; then it waits for the round.
        let mut at = now;
        for pause in [1, 2, 4].map(Duration::from_secs) {
            assert_eq!(tick(&mut s, at + pause - Duration::from_millis(1)), vec![]);
            at += pause;
            assert_eq!(tick(&mut s, at), vec![Action::Sync { core: c, peer: p[0] }]);
            assert_eq!(tick(&mut s, at), vec![], "started once");
            assert_eq!(s.request_failed(&p[0], at), vec![]);
        }
        assert_eq!(tick(&mut s, at + Duration::from_secs(20)), vec![]);
        // A session that ends clears the count: the next failure is retried after 1 s again.
        assert_eq!(s.want(c, p[0]), vec![Action::Sync { core: c, peer: p[0] }]);
        assert_eq!(s.session_ended(Some(c), &p[0]), vec![]);
        assert_eq!(s.want(c, p[0]), vec![Action::Sync { core: c, peer: p[0] }]);
        s.request_failed(&p[0], at);
        assert_eq!(tick(&mut s, at + Duration::from_secs(1)), vec![Action::Sync { core: c, peer: p[0] }]);
        // A peer that disconnects is not retried, whether it failed before or after.
        // (It is dialed again as a lost replica; no session starts while it is away.)
        let no_session = |actions: Vec<Action>| actions.iter().all(|a| matches!(a, Action::Redial(_)));
        s.request_failed(&p[0], at);
        s.peer_disconnected(&p[0], at);
        assert!(no_session(tick(&mut s, at + Duration::from_secs(10))));
        assert_eq!(s.want(c, p[1]), vec![Action::Sync { core: c, peer: p[1] }]);
        s.peer_disconnected(&p[1], at);
        assert_eq!(s.request_failed(&p[1], at), vec![]);
        assert!(no_session(tick(&mut s, at + Duration::from_secs(20))));
    }

    #[test]
    fn a_new_core_catches_up_with_every_connected_peer_one_at_a_time() {
        let (mut s, p, _) = setup(3);
        let c = core(1);
        let actions = s.core_added(c);
        assert_eq!(actions.len(), 2, "{actions:?}");
        assert_eq!(actions[0], Action::FindReplicas(c));
        let Action::Sync { peer: first, .. } = actions[1] else { panic!("{actions:?}") };
        let mut seen = vec![first];
        let mut current = first;
        while let Some(Action::Sync { peer, .. }) = s.session_ended(Some(c), &current).first().cloned() {
            seen.push(peer);
            current = peer;
        }
        seen.sort();
        let mut all = p.clone();
        all.sort();
        assert_eq!(seen, all);
    }

    /// Lookups of `c` among `actions`.
    fn lookups_of(c: Address, actions: &[Action]) -> usize {
        actions.iter().filter(|a| **a == Action::FindReplicas(c)).count()
    }

    #[test]
    fn a_followed_core_whose_lookup_finds_nobody_is_looked_up_again_after_a_doubling_pause() {
        let (mut s, _, now) = setup(0);
        let c = core(1);
        assert_eq!(lookups_of(c, &s.core_added(c)), 1);
        // Each empty lookup waits 0.25 s, 0.5 s, 1 s… 16 s before the next; then only the
        // round looks again (it lists no core here).
        let mut t = now;
        let mut gaps = Vec::new();
        let mut since = t;
        s.lookup_finished(c, t);
        while t < now + Duration::from_secs(64) {
            t += Duration::from_millis(250);
            if lookups_of(c, &s.tick(t, Vec::new, |_| false)) == 1 {
                gaps.push((t - since).as_millis());
                since = t;
                s.lookup_finished(c, t);
            }
        }
        assert_eq!(gaps, vec![250, 500, 1000, 2000, 4000, 8000, 16000]);
    }

    #[test]
    fn a_retried_lookup_ends_early_only_at_a_replica_not_named_before() {
        let (mut s, p, now) = setup(3);
        let c = core(1);
        let (stale, live) = (p[0], p[1]);
        // A core held for a while never ends its lookups early.
        assert!(!s.lookup_may_end(&c, [stale]));
        s.core_added(c);
        assert!(s.lookup_may_end(&c, [stale]), "the first answer naming a replica ends the first lookup");
        s.lookup_finished(c, now);
        // The dial of `stale` failed (it never joined): the next lookup, asked again, goes on
        // past answers naming only it, and ends at the one naming a live replica.
        assert!(!s.lookup_may_end(&c, [stale]));
        assert!(!s.lookup_may_end(&c, []));
        assert!(s.lookup_may_end(&c, [stale, live]));
        assert!(!s.lookup_may_end(&c, [live]), "one answer per new name");
        // A replica that joins ends the sequence; a core added again starts with a clean slate.
        s.replica_joined(c, live);
        assert!(!s.lookup_may_end(&c, [p[2]]));
        s.core_added(c);
        assert!(s.lookup_may_end(&c, [stale]));
    }

    #[test]
    fn the_memory_of_named_replicas_is_bounded() {
        let (mut s, _, _) = setup(0);
        let c = core(1);
        s.core_added(c);
        let many: Vec<PeerId> = (0..MAX_NAMED_PER_LOOKUP + 10).map(|_| PeerId::random()).collect();
        assert!(s.lookup_may_end(&c, many.iter().copied()));
        assert_eq!(s.lookup_retries[&c].named.len(), MAX_NAMED_PER_LOOKUP);
        // Past the bound, a replica not remembered counts as new each time (as without memory).
        assert!(s.lookup_may_end(&c, [many[MAX_NAMED_PER_LOOKUP]]));
        assert!(!s.lookup_may_end(&c, [many[0]]));
    }

    #[test]
    fn a_replica_that_joins_ends_the_quick_lookups_and_cores_held_at_start_have_none() {
        let (mut s, p, now) = setup(1);
        let c = core(1);
        s.core_added(c);
        s.lookup_finished(c, now);
        assert!(s.lookup_retrying(&c));
        s.replica_joined(c, p[0]);
        assert!(!s.lookup_retrying(&c));
        let later: usize = (1..=40).map(|i| lookups_of(c, &s.tick(now + Duration::from_millis(250 * i), Vec::new, |_| false))).sum();
        assert_eq!(later, 0, "a core with a replica waits for the round");
        // A lookup that found a connected replica does not start the retries either.
        let d = core(2);
        s.core_added(d);
        s.replica_joined(d, p[0]);
        s.lookup_finished(d, now);
        // Cores held at start are looked up by the queue and the round only.
        let e = core(3);
        s.core_held_at_start(e);
        s.lookup_finished(e, now);
        let t = now + Duration::from_secs(1);
        let actions: Vec<Action> = (1..=40).flat_map(|i| s.tick(t + Duration::from_millis(250 * i), Vec::new, |_| false)).collect();
        assert_eq!((lookups_of(d, &actions), lookups_of(e, &actions)), (0, 1), "{actions:?}");
    }

    #[test]
    fn a_lost_replica_is_dialed_every_second_until_it_is_back() {
        let (mut s, p, now) = setup(2);
        let c = core(1);
        s.replica_joined(c, p[0]);
        s.session_ended(Some(c), &p[0]);
        let tick = |s: &mut Scheduler, at: Duration| s.tick(now + at, Vec::new, |_| false);
        // p1 held nothing of ours: losing it dials nothing.
        s.peer_disconnected(&p[1], now);
        s.peer_disconnected(&p[0], now);
        assert_eq!(tick(&mut s, Duration::from_millis(900)), vec![]);
        assert_eq!(tick(&mut s, Duration::from_secs(1)), vec![Action::Redial(p[0])]);
        // Once per interval, not once per tick.
        assert_eq!(tick(&mut s, Duration::from_millis(1500)), vec![]);
        assert_eq!(tick(&mut s, Duration::from_secs(2)), vec![Action::Redial(p[0])]);
        // Back: no more dials, and its subscription starts catch-up at once.
        s.peer_connected(p[0]);
        assert_eq!(tick(&mut s, Duration::from_secs(3)), vec![]);
        assert_eq!(s.replica_joined(c, p[0]), vec![Action::Sync { core: c, peer: p[0] }]);
    }

    #[test]
    fn a_replica_lost_for_long_is_dialed_less_often_then_given_up() {
        let (mut s, p, now) = setup(1);
        let c = core(1);
        s.replica_joined(c, p[0]);
        s.peer_disconnected(&p[0], now);
        let config = ScheduleConfig::default();
        let mut dials = Vec::new();
        let mut at = Duration::ZERO;
        while at <= config.redial_for + Duration::from_secs(60) {
            if !s.tick(now + at, Vec::new, |_| false).is_empty() {
                dials.push(at);
            }
            at += Duration::from_millis(250);
        }
        let fast = dials.iter().filter(|d| **d < config.redial_fast_for).count();
        assert!((58..=60).contains(&fast), "{fast} dials in the first minute");
        let gaps: Vec<Duration> = dials.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.windows(2).all(|g| g[1] + Duration::from_millis(250) >= g[0]), "the waits never shrink: {gaps:?}");
        assert!(gaps.iter().all(|g| *g <= config.redial_max_interval + Duration::from_millis(250)), "{gaps:?}");
        assert!(dials.last().is_some_and(|d| *d < config.redial_for), "given up after redial_for: {:?}", dials.last());
    }

    #[test]
    fn lost_replicas_are_bounded() {
        let (mut s, _, now) = setup(0);
        let c = core(1);
        let peers: Vec<PeerId> = (0..MAX_LOST_REPLICAS + 10).map(|_| PeerId::random()).collect();
        for (i, p) in peers.iter().enumerate() {
            s.peer_connected(*p);
            s.replica_joined(c, *p);
            s.peer_disconnected(p, now + Duration::from_millis(i as u64));
        }
        let dialed = s.tick(now + Duration::from_secs(5), Vec::new, |_| false);
        assert_eq!(dialed.len(), MAX_LOST_REPLICAS);
        // The ones lost first were dropped.
        assert!(!dialed.contains(&Action::Redial(peers[0])));
        assert!(dialed.contains(&Action::Redial(peers[MAX_LOST_REPLICAS + 9])));
    }

    #[test]
    fn sessions_beyond_the_cap_wait_in_line_and_start_as_others_end() {
        let now = Instant::now();
        let mut s = Scheduler::new(ScheduleConfig { max_sessions: 2, ..ScheduleConfig::default() }, now);
        let p = PeerId::random();
        s.peer_connected(p);
        let cores: Vec<Address> = (1..=4).map(core).collect();
        let started: Vec<Action> = cores.iter().flat_map(|c| s.replica_joined(*c, p)).collect();
        assert_eq!(started, vec![Action::Sync { core: cores[0], peer: p }, Action::Sync { core: cores[1], peer: p }]);
        assert_eq!(s.waiting(), 2);
        // Asked again while waiting: still once in line.
        assert_eq!(s.want(cores[2], p), vec![]);
        assert_eq!(s.waiting(), 2);
        assert_eq!(s.session_ended(Some(cores[0]), &p), vec![Action::Sync { core: cores[2], peer: p }]);
        // A peer that left is skipped in the backlog.
        let q = PeerId::random();
        s.peer_connected(q);
        assert_eq!(s.replica_joined(core(9), q), vec![]);
        s.peer_disconnected(&q, Instant::now());
        assert_eq!(s.session_ended(Some(cores[1]), &p), vec![Action::Sync { core: cores[3], peer: p }]);
        assert_eq!(s.waiting(), 0);
    }

    #[test]
    fn lookups_of_many_cores_are_spread_over_ticks() {
        let now = Instant::now();
        let mut s = Scheduler::new(ScheduleConfig { max_lookups_per_tick: 3, ..ScheduleConfig::default() }, now);
        let held: Vec<Address> = (1..=10).map(core).collect();
        for c in &held {
            s.core_held_at_start(*c);
        }
        // Queued twice (at start and by the round), looked up once.
        s.core_held_at_start(held[0]);
        let mut seen = Vec::new();
        let mut t = now;
        while seen.len() < held.len() {
            t += Duration::from_millis(250);
            let actions = s.tick(t, Vec::new, |_| false);
            assert!(actions.len() <= 3, "{actions:?}");
            for a in actions {
                let Action::FindReplicas(c) = a else { panic!("{a:?}") };
                seen.push(c);
            }
        }
        assert_eq!(seen, held);
        assert_eq!(s.lookups_queued(), 0);
        assert_eq!(s.tick(t + Duration::from_millis(250), Vec::new, |_| false), vec![]);
    }
}
