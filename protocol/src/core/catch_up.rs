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
//! A request that fails while the peer stays connected (the connection it went over closed —
//! a relayed connection replaced by a direct one —, or it timed out) is retried a few times,
//! with a growing pause: nothing else would restart the session until the next round.
//!
//! Everything held here is bounded by what the node itself holds and is connected to: the
//! cores it holds (keys of every map), and connected peers (sets and queues are deduplicated
//! and lose a peer when it disconnects).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use libp2p::PeerId;

use super::Address;

/// Timing of the scheduler.
#[derive(Debug, Clone)]
pub struct ScheduleConfig {
    /// How often every core catches up with every replica it is connected to, and looks for
    /// replicas in the DHT: the safety net under gossip.
    pub round_interval: Duration,
    /// How long changes held back for missing dependencies may wait for them to arrive by
    /// gossip (messages take different paths, so parents often follow a moment later) before
    /// a session asks the peer that sent one.
    pub missing_deps_grace: Duration,
    /// The pause before retrying a failed request with a peer still connected; it doubles
    /// with every failure in a row.
    pub retry_backoff: Duration,
    /// Failures in a row after which a session waits for the next round.
    pub max_retries: u32,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            round_interval: Duration::from_secs(30),
            missing_deps_grace: Duration::from_secs(1),
            retry_backoff: Duration::from_secs(1),
            max_retries: 3,
        }
    }
}

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
}

/// The session running for a core, and who is next.
#[derive(Debug)]
struct Running {
    peer: PeerId,
    queue: VecDeque<PeerId>,
}

/// Failed requests in a row of a core's session with a peer, and when to try again.
#[derive(Debug)]
struct Retry {
    failures: u32,
    due: Option<Instant>,
}

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
    /// Sessions whose request failed with the peer still connected.
    retries: BTreeMap<(Address, PeerId), Retry>,
    next_round: Instant,
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
            retries: BTreeMap::new(),
            next_round,
        }
    }

    /// A core was just followed or delegated: catch up with every connected peer (any of them
    /// may hold it before its subscription is known), and look for replicas.
    pub fn core_added(&mut self, core: Address) -> Vec<Action> {
        let mut actions = vec![Action::FindReplicas(core)];
        for peer in self.connected.clone() {
            actions.extend(self.want(core, peer));
        }
        actions
    }

    /// The first connection with `peer` opened.
    pub fn peer_connected(&mut self, peer: PeerId) {
        self.connected.insert(peer);
    }

    /// The last connection with `peer` closed: it holds nothing any more, its sessions end and
    /// the next peers in line start.
    pub fn peer_disconnected(&mut self, peer: &PeerId) -> Vec<Action> {
        self.connected.remove(peer);
        for replicas in self.replicas.values_mut() {
            replicas.remove(peer);
        }
        self.replicas.retain(|_, r| !r.is_empty());
        for running in self.sessions.values_mut() {
            running.queue.retain(|p| p != peer);
        }
        self.held_back.retain(|_, (from, _)| from != peer);
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
        self.want(core, peer)
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

    /// Starts a session of `core` with `peer`, or queues `peer` behind the one running.
    pub fn want(&mut self, core: Address, peer: PeerId) -> Vec<Action> {
        match self.sessions.get_mut(&core) {
            Some(running) => {
                if running.peer != peer && !running.queue.contains(&peer) {
                    running.queue.push_back(peer);
                }
                vec![]
            }
            None => {
                self.sessions.insert(core, Running { peer, queue: VecDeque::new() });
                vec![Action::Sync { core, peer }]
            }
        }
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
        actions
    }

    /// Whether a session of `core` is running.
    pub fn is_syncing(&self, core: &Address) -> bool {
        self.sessions.contains_key(core)
    }

    /// What is due at `now`: sessions for changes still held back after the grace period
    /// (`still_missing` says whether a core still misses dependencies), and the periodic round
    /// of every core `held` lists with every replica, plus a DHT lookup for each. `held` is
    /// called only when the round is due: most ticks need no list of the cores.
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
        let retries: Vec<(Address, PeerId)> = self
            .retries
            .iter_mut()
            .filter(|(_, retry)| retry.due.is_some_and(|due| now >= due))
            .map(|(key, retry)| {
                retry.due = None;
                *key
            })
            .collect();
        for (core, peer) in retries {
            actions.extend(self.want(core, peer));
        }
        if now >= self.next_round {
            self.next_round = now + self.config.round_interval;
            for core in &held() {
                let replicas: Vec<PeerId> = self.replicas.get(core).map(|r| r.iter().copied().collect()).unwrap_or_default();
                for peer in replicas {
                    actions.extend(self.want(*core, peer));
                }
                actions.push(Action::FindReplicas(*core));
            }
        }
        actions
    }

    /// Connected peers known to hold `core`.
    pub fn replicas(&self, core: &Address) -> usize {
        self.replicas.get(core).map_or(0, |r| r.len())
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
        let (mut s, p, _) = setup(3);
        let (c, d) = (core(1), core(2));
        s.replica_joined(c, p[0]);
        s.replica_joined(c, p[1]);
        s.replica_joined(c, p[2]);
        s.replica_joined(d, p[2]);
        s.replica_joined(d, p[1]);
        // p1 leaves: queued in c, queued in d.
        assert_eq!(s.peer_disconnected(&p[1]), vec![]);
        assert_eq!(s.replicas(&c), 2);
        // p0's session of c ends: p1 is skipped, p2 is next.
        assert_eq!(s.session_ended(Some(c), &p[0]), vec![Action::Sync { core: c, peer: p[2] }]);
        // p2 leaves while running both: nothing left to run.
        assert_eq!(s.peer_disconnected(&p[2]), vec![]);
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
        assert_eq!(round, vec![Action::Sync { core: c, peer: p[0] }, Action::FindReplicas(c), Action::FindReplicas(d)]);
        // The next round is one interval later.
        s.session_ended(Some(c), &p[0]);
        assert_eq!(s.tick(now + Duration::from_secs(59), || vec![c], |_| false), vec![]);
        assert_eq!(s.tick(now + Duration::from_secs(60), || vec![c], |_| false).len(), 2);
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
        s.request_failed(&p[0], at);
        s.peer_disconnected(&p[0]);
        assert_eq!(tick(&mut s, at + Duration::from_secs(10)), vec![]);
        assert_eq!(s.want(c, p[1]), vec![Action::Sync { core: c, peer: p[1] }]);
        s.peer_disconnected(&p[1]);
        assert_eq!(s.request_failed(&p[1], at), vec![]);
        assert_eq!(tick(&mut s, at + Duration::from_secs(20)), vec![]);
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
}
