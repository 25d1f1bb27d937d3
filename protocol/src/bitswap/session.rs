//! The requesting side: which peer to ask for which block, and when to give up — an I/O-free
//! state machine driven by explicit time, after boxo's sessions.
//!
//! Every wanted block is a [`Want`] in one of these phases:
//!
//! ```text
//!            ┌──────────── HAVE ─────────────┐
//!            v                               │
//!   Queued ──┬─> Fetching(peer) ── block ──> done (cancels go to every other asked peer)
//!     ^      │      │ DONT_HAVE / no progress for `request_timeout` / peer gone or banned
//!     └──────┼──────┘
//!            ├─> Searching (want-have broadcast) ── all answered or timed out ──> Queued
//!            └─> WaitingProviders (nobody to ask: FindProviders) ── new peer / HAVE ──> …
//! ```
//!
//! Scheduling (in want order, so a file arrives roughly front to back):
//! 1. a peer that said HAVE, the least loaded one: want-block;
//! 2. else a peer of the session (one that already sent us blocks or HAVEs) optimistically:
//!    want-block to the least loaded, want-have to the others;
//! 3. else want-have to every connected peer not asked yet (`sendDontHave`);
//! 4. else, if answers are still due, wait; peers speaking bitswap < 1.2 (no HAVE) get a
//!    want-block one at a time;
//! 5. else nobody has it: ask the node for a provider search and wait for new peers.
//!
//! Each peer has at most `max_in_flight_per_peer` want-blocks outstanding, and all peers together
//! `max_in_flight_total`; least-loaded choice spreads a session's blocks over every peer that has
//! them. A want-block times out when its peer sends us no block for `request_timeout` (a deep
//! pipeline on a slow link is progress, not a timeout). New peers get want-have for every
//! active want. Whole wants expire after `want_timeout`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use cid::Cid;
use libp2p::PeerId;

use super::message::{Presence, WantType, WantlistEntry};
use super::{SessionId, WantError};

type Mh = cid::multihash::Multihash<64>;

/// How many multihashes of finished or cancelled wants we remember, to tell a late block from a
/// forged one.
const RECENT_CAPACITY: usize = 16 * 1024;
/// How many banned peers we remember (oldest forgotten first), so that bans cannot grow without
/// bound.
const BANNED_CAPACITY: usize = 4096;
/// How many capacity-blocked wants one scheduling pass looks past before it stops.
const SCAN_LIMIT: usize = 256;

/// The knobs of the requesting side (copied from [`super::Config`]).
#[derive(Debug, Clone)]
pub(crate) struct SessionConfig {
    pub max_in_flight_per_peer: usize,
    pub max_in_flight_total: usize,
    pub request_timeout: Duration,
    pub want_timeout: Duration,
    pub provider_search_interval: Duration,
    pub max_bad_blocks: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// In the ready queue, waiting for a decision (or for capacity).
    Queued,
    /// want-have sent; waiting for HAVE / DONT_HAVE.
    Searching { since: Instant },
    /// want-block sent to `peer`.
    Fetching { peer: PeerId, since: Instant },
    /// Nobody connected can be asked; a provider search was requested.
    WaitingProviders,
}

#[derive(Debug)]
struct Want {
    /// The CID we put on the wire (the first one asked for).
    cid: Cid,
    /// Who asked, and with which CID (a CIDv0 and a CIDv1 of one block are one want).
    requesters: Vec<(SessionId, Cid)>,
    priority: i32,
    created: Instant,
    phase: Phase,
    /// Peers that said HAVE, in answer order.
    have: Vec<PeerId>,
    /// Peers that said DONT_HAVE, failed to deliver, or are banned.
    dont_have: BTreeSet<PeerId>,
    /// Peers asked want-have that have not answered yet.
    pending_have: BTreeSet<PeerId>,
    /// Peers holding a want of ours for this block (they get a cancel when it is done).
    sent_to: BTreeSet<PeerId>,
}

#[derive(Debug)]
struct PeerState {
    in_flight: usize,
    supports_have: bool,
    /// When the peer last sent us a block: a deep pipeline is alive while blocks keep coming.
    last_block: Option<Instant>,
}

#[derive(Debug, Default)]
struct Session {
    /// Peers that sent a block or a HAVE for this session: asked first for its next blocks.
    peers: BTreeSet<PeerId>,
    wants: HashSet<Mh>,
    last_provider_search: Option<Instant>,
}

/// What the state machine asks the behaviour to report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SessionEvent {
    /// Nobody connected has `cid`: look up providers and dial them.
    FindProviders { session: SessionId, cid: Cid },
    /// The want for `cid` was given up.
    NotFound { session: SessionId, cid: Cid, error: WantError },
}

/// Whether a received block was wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BlockOutcome {
    /// Store it and tell these sessions, each with the CID it asked for.
    Wanted(Vec<(SessionId, Cid)>),
    /// Nobody wants it (any more).
    Unwanted {
        /// We wanted it a moment ago: a late duplicate, not an attack.
        recently_wanted: bool,
        /// We have want-blocks outstanding at the sender, which was supposed to send blocks we
        /// asked for: an unknown block from it is most likely a corrupted one.
        expected_from_sender: bool,
    },
}

/// All of our wants, sessions and per-peer load.
#[derive(Debug)]
pub(crate) struct WantManager {
    cfg: SessionConfig,
    wants: HashMap<Mh, Want>,
    ready: VecDeque<Mh>,
    peers: BTreeMap<PeerId, PeerState>,
    banned: BTreeSet<PeerId>,
    banned_order: VecDeque<PeerId>,
    penalties: HashMap<PeerId, u32>,
    sessions: HashMap<SessionId, Session>,
    outbox: BTreeMap<PeerId, Vec<WantlistEntry>>,
    events: VecDeque<SessionEvent>,
    in_flight_total: usize,
    next_session: u64,
    next_priority: i32,
    recent: VecDeque<Mh>,
    recent_set: HashSet<Mh>,
}

impl WantManager {
    pub(crate) fn new(cfg: SessionConfig) -> Self {
        WantManager {
            cfg,
            wants: HashMap::new(),
            ready: VecDeque::new(),
            peers: BTreeMap::new(),
            banned: BTreeSet::new(),
            banned_order: VecDeque::new(),
            penalties: HashMap::new(),
            sessions: HashMap::new(),
            outbox: BTreeMap::new(),
            events: VecDeque::new(),
            in_flight_total: 0,
            next_session: 1,
            next_priority: i32::MAX,
            recent: VecDeque::new(),
            recent_set: HashSet::new(),
        }
    }

    /// Opens a session.
    pub(crate) fn new_session(&mut self) -> SessionId {
        let id = SessionId(self.next_session);
        self.next_session += 1;
        self.sessions.insert(id, Session::default());
        id
    }

    /// Adds wants to `session` (opened if unknown). The caller already filtered out blocks it has.
    pub(crate) fn want(&mut self, session: SessionId, cids: impl IntoIterator<Item = Cid>, now: Instant) {
        self.next_session = self.next_session.max(session.0 + 1);
        let s = self.sessions.entry(session).or_default();
        for cid in cids {
            let mh = *cid.hash();
            s.wants.insert(mh);
            match self.wants.get_mut(&mh) {
                Some(w) => {
                    if !w.requesters.iter().any(|(id, c)| *id == session && *c == cid) {
                        w.requesters.push((session, cid));
                    }
                }
                None => {
                    let priority = self.next_priority;
                    self.next_priority = self.next_priority.saturating_sub(1).max(1);
                    self.wants.insert(
                        mh,
                        Want {
                            cid,
                            requesters: vec![(session, cid)],
                            priority,
                            created: now,
                            phase: Phase::Queued,
                            have: Vec::new(),
                            dont_have: BTreeSet::new(),
                            pending_have: BTreeSet::new(),
                            sent_to: BTreeSet::new(),
                        },
                    );
                    self.ready.push_back(mh);
                }
            }
        }
    }

    /// Drops `session`'s want for `cid`; the want ends (cancels are sent) when no session is left.
    pub(crate) fn cancel(&mut self, session: SessionId, cid: &Cid) {
        let mh = *cid.hash();
        if let Some(s) = self.sessions.get_mut(&session) {
            s.wants.remove(&mh);
        }
        let Some(w) = self.wants.get_mut(&mh) else { return };
        w.requesters.retain(|(id, _)| *id != session);
        if w.requesters.is_empty() {
            self.finish(&mh, None);
        }
    }

    /// Closes `session`, cancelling its wants.
    pub(crate) fn close_session(&mut self, session: SessionId) {
        let Some(s) = self.sessions.remove(&session) else { return };
        for mh in s.wants {
            let Some(w) = self.wants.get_mut(&mh) else { continue };
            w.requesters.retain(|(id, _)| *id != session);
            if w.requesters.is_empty() {
                self.finish(&mh, None);
            }
        }
    }

    /// The blocks we want, in want order.
    pub(crate) fn wantlist(&self) -> Vec<Cid> {
        let mut v: Vec<(&i32, Cid)> = self.wants.values().map(|w| (&w.priority, w.cid)).collect();
        v.sort_by(|a, b| b.0.cmp(a.0));
        v.into_iter().map(|(_, c)| c).collect()
    }

    /// Number of active wants and of want-blocks in flight.
    pub(crate) fn load(&self) -> (usize, usize) {
        (self.wants.len(), self.in_flight_total)
    }

    /// A peer that may speak bitswap connected: it gets want-have for every active want.
    pub(crate) fn peer_connected(&mut self, peer: PeerId, supports_have: bool, now: Instant) {
        if self.peers.contains_key(&peer) || self.banned.contains(&peer) {
            return;
        }
        self.peers.insert(peer, PeerState { in_flight: 0, supports_have, last_block: None });
        let mut entries = Vec::new();
        for (mh, w) in &mut self.wants {
            if w.sent_to.contains(&peer) || w.dont_have.contains(&peer) {
                continue;
            }
            if supports_have {
                entries.push(WantlistEntry::want(w.cid, WantType::Have, w.priority, true));
                w.pending_have.insert(peer);
                w.sent_to.insert(peer);
                if w.phase == Phase::WaitingProviders {
                    w.phase = Phase::Searching { since: now };
                }
            } else if w.phase == Phase::WaitingProviders {
                w.phase = Phase::Queued;
                self.ready.push_back(*mh);
            }
        }
        // Highest priority first, like every other list we send.
        entries.sort_by_key(|e| std::cmp::Reverse(e.priority));
        if !entries.is_empty() {
            self.outbox.entry(peer).or_default().extend(entries);
        }
    }

    /// The negotiated version tells whether a peer understands want-have.
    pub(crate) fn set_supports_have(&mut self, peer: &PeerId, supports_have: bool) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.supports_have = supports_have;
        }
        if !supports_have {
            // It will never answer a want-have (a 1.1 peer reads it as a want-block and may
            // send the block, which is fine).
            for (mh, w) in &mut self.wants {
                if w.pending_have.remove(peer) && w.pending_have.is_empty() && w.have.is_empty() {
                    if let Phase::Searching { .. } = w.phase {
                        w.phase = Phase::Queued;
                        self.ready.push_back(*mh);
                    }
                }
            }
        }
    }

    /// A peer left (or turned out not to speak bitswap): its pending requests go elsewhere.
    pub(crate) fn peer_disconnected(&mut self, peer: &PeerId) {
        if self.peers.remove(peer).is_none() {
            return;
        }
        self.outbox.remove(peer);
        for s in self.sessions.values_mut() {
            s.peers.remove(peer);
        }
        for (mh, w) in &mut self.wants {
            w.have.retain(|p| p != peer);
            w.sent_to.remove(peer);
            w.pending_have.remove(peer);
            w.dont_have.remove(peer);
            match w.phase {
                Phase::Fetching { peer: p, .. } if p == *peer => {
                    self.in_flight_total -= 1;
                    w.phase = Phase::Queued;
                    self.ready.push_back(*mh);
                }
                Phase::Searching { .. } if w.pending_have.is_empty() => {
                    w.phase = Phase::Queued;
                    self.ready.push_back(*mh);
                }
                _ => {}
            }
        }
    }

    /// A HAVE or DONT_HAVE arrived.
    pub(crate) fn on_presence(&mut self, peer: PeerId, cid: &Cid, presence: Presence) {
        let mh = *cid.hash();
        let banned = self.banned.contains(&peer);
        let Some(w) = self.wants.get_mut(&mh) else { return };
        w.pending_have.remove(&peer);
        match presence {
            Presence::Have if !banned => {
                if !w.have.contains(&peer) {
                    w.have.push(peer);
                }
                w.dont_have.remove(&peer);
                for (sid, _) in &w.requesters {
                    if let Some(s) = self.sessions.get_mut(sid) {
                        s.peers.insert(peer);
                    }
                }
                if matches!(w.phase, Phase::Searching { .. } | Phase::WaitingProviders) {
                    w.phase = Phase::Queued;
                    self.ready.push_back(mh);
                }
            }
            Presence::Have => {}
            Presence::DontHave => {
                w.have.retain(|p| *p != peer);
                w.dont_have.insert(peer);
                match w.phase {
                    Phase::Fetching { peer: p, .. } if p == peer => {
                        if let Some(ps) = self.peers.get_mut(&peer) {
                            ps.in_flight -= 1;
                        }
                        self.in_flight_total -= 1;
                        w.phase = Phase::Queued;
                        self.ready.push_back(mh);
                    }
                    Phase::Searching { .. } if w.pending_have.is_empty() => {
                        w.phase = Phase::Queued;
                        self.ready.push_back(mh);
                    }
                    _ => {}
                }
            }
        }
    }

    /// A block with CID `cid` (computed from its bytes) arrived from `peer`.
    ///
    /// When it is wanted the want ends here: the caller must store the block and tell the
    /// returned sessions.
    pub(crate) fn on_block(&mut self, peer: PeerId, cid: &Cid, now: Instant) -> BlockOutcome {
        let mh = *cid.hash();
        let expected_from_sender = match self.peers.get_mut(&peer) {
            Some(p) => {
                p.last_block = Some(now);
                p.in_flight > 0
            }
            None => false,
        };
        let Some(w) = self.wants.get(&mh) else {
            return BlockOutcome::Unwanted { recently_wanted: self.recent_set.contains(&mh), expected_from_sender };
        };
        let requesters = w.requesters.clone();
        for (sid, _) in &requesters {
            if let Some(s) = self.sessions.get_mut(sid) {
                s.peers.insert(peer);
            }
        }
        self.finish(&mh, Some(peer));
        BlockOutcome::Wanted(requesters)
    }

    /// The block was added to the store locally (an import): a want for it ends here.
    pub(crate) fn local_block(&mut self, cid: &Cid) -> BlockOutcome {
        let mh = *cid.hash();
        let Some(w) = self.wants.get(&mh) else {
            return BlockOutcome::Unwanted { recently_wanted: self.recent_set.contains(&mh), expected_from_sender: false };
        };
        let requesters = w.requesters.clone();
        self.finish(&mh, None);
        BlockOutcome::Wanted(requesters)
    }

    /// `peer` sent a block that failed verification. Returns true when this bans it: it is
    /// asked for nothing any more and its outstanding requests go to other peers.
    pub(crate) fn on_bad_block(&mut self, peer: PeerId) -> bool {
        let n = self.penalties.entry(peer).or_insert(0);
        *n += 1;
        if *n < self.cfg.max_bad_blocks || self.banned.contains(&peer) {
            return false;
        }
        self.banned.insert(peer);
        self.banned_order.push_back(peer);
        if self.banned_order.len() > BANNED_CAPACITY {
            if let Some(old) = self.banned_order.pop_front() {
                self.banned.remove(&old);
                self.penalties.remove(&old);
            }
        }
        if self.penalties.len() > 4096 {
            // Bound the memory; a banned peer stays banned via `banned`.
            self.penalties.retain(|p, _| *p == peer);
        }
        self.peer_disconnected(&peer);
        for w in self.wants.values_mut() {
            w.dont_have.insert(peer);
        }
        true
    }

    /// Whether `peer` is banned for sending bad blocks.
    pub(crate) fn is_banned(&self, peer: &PeerId) -> bool {
        self.banned.contains(peer)
    }

    /// Expires wants, times out silent peers, repeats provider searches; then schedules.
    pub(crate) fn tick(&mut self, now: Instant) {
        let mut expired = Vec::new();
        let mut session_searches: Vec<(SessionId, Cid, i32)> = Vec::new();
        for (mh, w) in &mut self.wants {
            if now.duration_since(w.created) >= self.cfg.want_timeout {
                expired.push(*mh);
                continue;
            }
            match w.phase {
                Phase::Fetching { peer, since } => {
                    let progress = self.peers.get(&peer).and_then(|p| p.last_block).map_or(since, |t| t.max(since));
                    if now.duration_since(progress) >= self.cfg.request_timeout {
                        tracing::debug!(cid = %w.cid, %peer, "want-block timed out, trying another peer");
                        if let Some(p) = self.peers.get_mut(&peer) {
                            p.in_flight -= 1;
                        }
                        self.in_flight_total -= 1;
                        w.have.retain(|p| *p != peer);
                        w.dont_have.insert(peer);
                        w.phase = Phase::Queued;
                        self.ready.push_back(*mh);
                    }
                }
                Phase::Searching { since } if now.duration_since(since) >= self.cfg.request_timeout => {
                    // Silence counts as "no": they may still answer later.
                    w.pending_have.clear();
                    w.phase = Phase::Queued;
                    self.ready.push_back(*mh);
                }
                Phase::WaitingProviders => {
                    for (sid, _) in &w.requesters {
                        session_searches.push((*sid, w.cid, w.priority));
                    }
                }
                _ => {}
            }
        }
        for mh in expired {
            let Some(w) = self.wants.get(&mh) else { continue };
            let error = WantError::TimedOut {
                cid: w.cid,
                after: now.duration_since(w.created),
                peers_asked: w.sent_to.union(&w.dont_have).count(),
                dont_have: w.dont_have.len(),
            };
            for (session, cid) in w.requesters.clone() {
                if let Some(s) = self.sessions.get_mut(&session) {
                    s.wants.remove(&mh);
                }
                self.events.push_back(SessionEvent::NotFound { session, cid, error: error.clone() });
            }
            self.finish(&mh, None);
        }
        // Oldest want first: one search per session and interval.
        session_searches.sort_by_key(|s| std::cmp::Reverse(s.2));
        for (sid, cid, _) in session_searches {
            self.request_providers(sid, cid, now);
        }
        self.schedule(now);
    }

    /// Decides for queued wants, in want order, until capacity runs out.
    pub(crate) fn schedule(&mut self, now: Instant) {
        let mut blocked = VecDeque::new();
        while let Some(mh) = self.ready.pop_front() {
            if self.in_flight_total >= self.cfg.max_in_flight_total {
                self.ready.push_front(mh);
                break;
            }
            let Some(w) = self.wants.get(&mh) else { continue };
            if w.phase != Phase::Queued {
                continue;
            }
            if !self.decide(mh, now) {
                blocked.push_back(mh);
                if blocked.len() >= SCAN_LIMIT || self.all_peers_full() {
                    break;
                }
            }
        }
        blocked.append(&mut self.ready);
        self.ready = blocked;
    }

    /// The wantlist entries to send, per peer, since the last call.
    pub(crate) fn take_outbox(&mut self) -> BTreeMap<PeerId, Vec<WantlistEntry>> {
        std::mem::take(&mut self.outbox)
    }

    /// The next event to report.
    pub(crate) fn next_event(&mut self) -> Option<SessionEvent> {
        self.events.pop_front()
    }

    fn all_peers_full(&self) -> bool {
        self.peers.values().all(|p| p.in_flight >= self.cfg.max_in_flight_per_peer)
    }

    fn usable(&self, peer: &PeerId) -> Option<&PeerState> {
        if self.banned.contains(peer) {
            return None;
        }
        self.peers.get(peer)
    }

    /// Takes one decision for a queued want. Returns false when it must wait for capacity.
    fn decide(&mut self, mh: Mh, now: Instant) -> bool {
        let per_peer = self.cfg.max_in_flight_per_peer;
        let Some(w) = self.wants.get(&mh) else { return true };

        // 1. Least loaded peer that said HAVE.
        let mut any_have = false;
        let mut best: Option<(usize, PeerId)> = None;
        for p in &w.have {
            if w.dont_have.contains(p) {
                continue;
            }
            let Some(ps) = self.usable(p) else { continue };
            any_have = true;
            if ps.in_flight < per_peer && best.is_none_or(|(n, _)| ps.in_flight < n) {
                best = Some((ps.in_flight, *p));
            }
        }
        if let Some((_, peer)) = best {
            self.fetch(mh, peer, now);
            return true;
        }
        if any_have {
            return false;
        }

        // 2. The sessions' peers, optimistically.
        let mut session_peers: BTreeSet<PeerId> = BTreeSet::new();
        for (sid, _) in &w.requesters {
            if let Some(s) = self.sessions.get(sid) {
                session_peers.extend(s.peers.iter().copied());
            }
        }
        session_peers.retain(|p| !w.dont_have.contains(p) && self.usable(p).is_some_and(|ps| ps.supports_have));
        if !session_peers.is_empty() {
            let best = session_peers
                .iter()
                .filter_map(|p| self.peers.get(p).map(|ps| (ps.in_flight, *p)))
                .filter(|(n, _)| *n < per_peer)
                .min();
            let Some((_, peer)) = best else { return false };
            // Ask the other session peers *and* every connected peer not asked yet: a peer
            // that answers HAVE becomes a candidate for this block, so a session does not stay
            // pinned to the first peer that delivered while others hold the same blocks.
            let others: Vec<PeerId> = self
                .peers
                .iter()
                .filter(|(p, ps)| {
                    **p != peer
                        && ps.supports_have
                        && !self.banned.contains(p)
                        && !w.sent_to.contains(p)
                        && !w.dont_have.contains(p)
                })
                .map(|(p, _)| *p)
                .collect();
            self.fetch(mh, peer, now);
            self.ask_have(mh, &others, now);
            return true;
        }

        // 3. Everyone connected that we have not asked.
        let fresh: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(p, ps)| ps.supports_have && !self.banned.contains(p) && !w.sent_to.contains(p) && !w.dont_have.contains(p))
            .map(|(p, _)| *p)
            .collect();
        if !fresh.is_empty() {
            self.ask_have(mh, &fresh, now);
            return true;
        }

        // 4. Answers still due; or old peers, one want-block at a time.
        if !w.pending_have.is_empty() {
            let since = now;
            if let Some(w) = self.wants.get_mut(&mh) {
                w.phase = Phase::Searching { since };
            }
            return true;
        }
        let old = self
            .peers
            .iter()
            .filter(|(p, ps)| !ps.supports_have && !self.banned.contains(p) && !w.dont_have.contains(p))
            .map(|(p, ps)| (ps.in_flight, *p))
            .min();
        if let Some((n, peer)) = old {
            if n >= per_peer {
                return false;
            }
            self.fetch(mh, peer, now);
            return true;
        }

        // 5. Nobody to ask.
        let searches: Vec<(SessionId, Cid)> = w.requesters.clone();
        if let Some(w) = self.wants.get_mut(&mh) {
            w.phase = Phase::WaitingProviders;
        }
        for (sid, cid) in searches {
            self.request_providers(sid, cid, now);
        }
        true
    }

    fn request_providers(&mut self, session: SessionId, cid: Cid, now: Instant) {
        let Some(s) = self.sessions.get_mut(&session) else { return };
        if s.last_provider_search.is_some_and(|t| now.duration_since(t) < self.cfg.provider_search_interval) {
            return;
        }
        s.last_provider_search = Some(now);
        self.events.push_back(SessionEvent::FindProviders { session, cid });
    }

    fn fetch(&mut self, mh: Mh, peer: PeerId, now: Instant) {
        let Some(w) = self.wants.get_mut(&mh) else { return };
        let Some(ps) = self.peers.get_mut(&peer) else { return };
        ps.in_flight += 1;
        self.in_flight_total += 1;
        w.phase = Phase::Fetching { peer, since: now };
        w.pending_have.remove(&peer);
        w.sent_to.insert(peer);
        self.outbox.entry(peer).or_default().push(WantlistEntry::want(w.cid, WantType::Block, w.priority, ps.supports_have));
    }

    fn ask_have(&mut self, mh: Mh, peers: &[PeerId], now: Instant) {
        let Some(w) = self.wants.get_mut(&mh) else { return };
        for p in peers {
            if w.sent_to.insert(*p) {
                w.pending_have.insert(*p);
                self.outbox.entry(*p).or_default().push(WantlistEntry::want(w.cid, WantType::Have, w.priority, true));
            }
        }
        if w.phase == Phase::Queued {
            w.phase = Phase::Searching { since: now };
        }
    }

    /// Ends a want: frees its request slot and cancels it at every peer holding it (except the
    /// one that just sent the block, which dropped it when sending).
    fn finish(&mut self, mh: &Mh, delivered_by: Option<PeerId>) {
        let Some(w) = self.wants.remove(mh) else { return };
        if let Phase::Fetching { peer, .. } = w.phase {
            if let Some(p) = self.peers.get_mut(&peer) {
                p.in_flight -= 1;
            }
            self.in_flight_total -= 1;
        }
        for p in &w.sent_to {
            if Some(*p) != delivered_by && self.peers.contains_key(p) {
                self.outbox.entry(*p).or_default().push(WantlistEntry::cancel(w.cid));
            }
        }
        for (sid, _) in &w.requesters {
            if let Some(s) = self.sessions.get_mut(sid) {
                s.wants.remove(mh);
            }
        }
        if self.recent_set.insert(*mh) {
            self.recent.push_back(*mh);
            if self.recent.len() > RECENT_CAPACITY {
                if let Some(old) = self.recent.pop_front() {
                    self.recent_set.remove(&old);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use crate::store::Block;

    fn cfg() -> SessionConfig {
        SessionConfig {
            max_in_flight_per_peer: 2,
            max_in_flight_total: 3,
            request_timeout: Duration::from_secs(5),
            want_timeout: Duration::from_secs(60),
            provider_search_interval: Duration::from_secs(10),
            max_bad_blocks: 1,
        }
    }

    fn cid(i: u32) -> Cid {
        Block::new_v1(0x55, Bytes::from(i.to_be_bytes().to_vec())).cid
    }

    /// Peers with a stable order, so that tie-breaks are predictable.
    fn peers(n: usize) -> Vec<PeerId> {
        let mut v: Vec<PeerId> = (0..n).map(|_| PeerId::random()).collect();
        v.sort();
        v
    }

    fn summary(out: &BTreeMap<PeerId, Vec<WantlistEntry>>, peer: &PeerId) -> Vec<(Cid, &'static str)> {
        out.get(peer)
            .map(|es| {
                es.iter()
                    .map(|e| {
                        let kind = match (e.cancel, e.want_type) {
                            (true, _) => "cancel",
                            (false, WantType::Block) => "block",
                            (false, WantType::Have) => "have",
                        };
                        (e.cid, kind)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn new_session_broadcasts_want_have_then_fetches_from_the_peer_that_has_it() {
        let t0 = Instant::now();
        let mut m = WantManager::new(cfg());
        let p = peers(2);
        m.peer_connected(p[0], true, t0);
        m.peer_connected(p[1], true, t0);
        let s = m.new_session();
        m.want(s, [cid(1)], t0);
        m.schedule(t0);
        let out = m.take_outbox();
        assert_eq!(summary(&out, &p[0]), vec![(cid(1), "have")]);
        assert_eq!(summary(&out, &p[1]), vec![(cid(1), "have")]);

        m.on_presence(p[0], &cid(1), Presence::DontHave);
        m.on_presence(p[1], &cid(1), Presence::Have);
        m.schedule(t0);
        let out = m.take_outbox();
        assert!(summary(&out, &p[0]).is_empty());
        assert_eq!(summary(&out, &p[1]), vec![(cid(1), "block")]);

        assert_eq!(m.on_block(p[1], &cid(1), t0), BlockOutcome::Wanted(vec![(s, cid(1))]));
        // p0 still holds our want (it said DONT_HAVE and keeps it): it gets a cancel.
        let out = m.take_outbox();
        assert_eq!(summary(&out, &p[0]), vec![(cid(1), "cancel")]);
        assert!(summary(&out, &p[1]).is_empty());
        assert_eq!(m.load(), (0, 0));
    }

    #[test]
    fn blocks_of_a_session_spread_over_every_peer_that_has_them_within_limits() {
        let t0 = Instant::now();
        let mut m = WantManager::new(cfg());
        let p = peers(2);
        m.peer_connected(p[0], true, t0);
        m.peer_connected(p[1], true, t0);
        let s = m.new_session();
        let cids: Vec<Cid> = (0..6).map(cid).collect();
        m.want(s, cids.clone(), t0);
        m.schedule(t0);
        m.take_outbox();
        for c in &cids {
            m.on_presence(p[0], c, Presence::Have);
            m.on_presence(p[1], c, Presence::Have);
        }
        m.schedule(t0);
        let out = m.take_outbox();
        // Total limit 3, per-peer 2: alternate between the peers.
        assert_eq!(summary(&out, &p[0]), vec![(cids[0], "block"), (cids[2], "block")]);
        assert_eq!(summary(&out, &p[1]), vec![(cids[1], "block")]);
        assert_eq!(m.load(), (6, 3));

        m.on_block(p[0], &cids[0], t0);
        m.schedule(t0);
        let out = m.take_outbox();
        // Both have one in flight again: the tie goes to the first that said HAVE.
        assert_eq!(summary(&out, &p[0]), vec![(cids[3], "block")]);
    }

    #[test]
    fn later_wants_also_ask_peers_outside_the_session_so_the_load_can_spread() {
        let t0 = Instant::now();
        let mut m = WantManager::new(cfg());
        let p = peers(2);
        m.peer_connected(p[0], true, t0);
        let s = m.new_session();
        m.want(s, [cid(1)], t0);
        m.schedule(t0);
        m.on_presence(p[0], &cid(1), Presence::Have);
        m.schedule(t0);
        m.on_block(p[0], &cid(1), t0);
        m.take_outbox();
        // p1 connects after the session found p0: the next wants go as want-block to p0 and
        // as want-have to p1, whose HAVE makes it a candidate for the blocks p0 has no room for.
        m.peer_connected(p[1], true, t0);
        m.take_outbox();
        m.want(s, [cid(2), cid(3), cid(4)], t0);
        m.schedule(t0);
        let out = m.take_outbox();
        assert_eq!(summary(&out, &p[0]), vec![(cid(2), "block"), (cid(3), "block")]);
        assert_eq!(summary(&out, &p[1]), vec![(cid(2), "have"), (cid(3), "have")]);
        m.on_presence(p[1], &cid(4), Presence::Have);
        m.schedule(t0);
        assert_eq!(summary(&m.take_outbox(), &p[1]), vec![(cid(4), "block")]);
    }

    #[test]
    fn later_wants_go_straight_to_session_peers_as_want_block() {
        let t0 = Instant::now();
        let mut m = WantManager::new(cfg());
        let p = peers(2);
        m.peer_connected(p[0], true, t0);
        m.peer_connected(p[1], true, t0);
        let s = m.new_session();
        m.want(s, [cid(1)], t0);
        m.schedule(t0);
        m.on_presence(p[0], &cid(1), Presence::Have);
        m.on_presence(p[1], &cid(1), Presence::Have);
        m.schedule(t0);
        m.on_block(p[0], &cid(1), t0);
        m.take_outbox();
        // Both peers are now session peers: no want-have round trip for the next block.
        m.want(s, [cid(2)], t0);
        m.schedule(t0);
        let out = m.take_outbox();
        assert_eq!(summary(&out, &p[0]), vec![(cid(2), "block")]);
        assert_eq!(summary(&out, &p[1]), vec![(cid(2), "have")]);
    }

    #[test]
    fn dont_have_and_silence_move_the_request_to_another_peer() {
        let t0 = Instant::now();
        let mut m = WantManager::new(cfg());
        let p = peers(3);
        for x in &p {
            m.peer_connected(*x, true, t0);
        }
        let s = m.new_session();
        m.want(s, [cid(1)], t0);
        m.schedule(t0);
        for x in &p {
            m.on_presence(*x, &cid(1), Presence::Have);
        }
        m.schedule(t0);
        m.take_outbox();
        // p0 was asked first; it now says DONT_HAVE.
        m.on_presence(p[0], &cid(1), Presence::DontHave);
        m.schedule(t0);
        assert_eq!(summary(&m.take_outbox(), &p[1]), vec![(cid(1), "block")]);
        // p1 stays silent past the request timeout: p2 is next.
        m.tick(t0 + Duration::from_secs(4));
        assert!(m.take_outbox().is_empty());
        m.tick(t0 + Duration::from_secs(5));
        assert_eq!(summary(&m.take_outbox(), &p[2]), vec![(cid(1), "block")]);
        assert_eq!(m.load(), (1, 1));
    }

    #[test]
    fn a_peer_sending_blocks_is_not_timed_out_while_its_pipeline_moves() {
        let t0 = Instant::now();
        let mut cfg = cfg();
        cfg.max_in_flight_per_peer = 10;
        cfg.max_in_flight_total = 10;
        let mut m = WantManager::new(cfg);
        let p = peers(1);
        m.peer_connected(p[0], true, t0);
        let s = m.new_session();
        m.want(s, [cid(1), cid(2)], t0);
        m.schedule(t0);
        m.on_presence(p[0], &cid(1), Presence::Have);
        m.on_presence(p[0], &cid(2), Presence::Have);
        m.schedule(t0);
        m.take_outbox();
        m.on_block(p[0], &cid(1), t0 + Duration::from_secs(4));
        m.tick(t0 + Duration::from_secs(8));
        assert_eq!(m.load(), (1, 1), "cid 2 is still in flight at p0");
        m.tick(t0 + Duration::from_secs(9));
        assert_eq!(m.load(), (1, 0), "no block for 5 s: timed out");
    }

    #[test]
    fn nobody_to_ask_requests_providers_and_new_peers_get_the_wants() {
        let t0 = Instant::now();
        let mut m = WantManager::new(cfg());
        let s = m.new_session();
        m.want(s, [cid(1), cid(2)], t0);
        m.schedule(t0);
        assert_eq!(m.next_event(), Some(SessionEvent::FindProviders { session: s, cid: cid(1) }));
        assert_eq!(m.next_event(), None, "one search per session and interval");
        m.tick(t0 + Duration::from_secs(10));
        assert_eq!(m.next_event(), Some(SessionEvent::FindProviders { session: s, cid: cid(1) }));

        let p = peers(1);
        m.peer_connected(p[0], true, t0 + Duration::from_secs(11));
        let out = m.take_outbox();
        assert_eq!(summary(&out, &p[0]), vec![(cid(1), "have"), (cid(2), "have")]);
        m.on_presence(p[0], &cid(2), Presence::Have);
        m.schedule(t0 + Duration::from_secs(11));
        assert_eq!(summary(&m.take_outbox(), &p[0]), vec![(cid(2), "block")]);
    }

    #[test]
    fn unknown_block_times_out_with_a_clear_error() {
        let t0 = Instant::now();
        let mut m = WantManager::new(cfg());
        let p = peers(1);
        m.peer_connected(p[0], true, t0);
        let s = m.new_session();
        m.want(s, [cid(9)], t0);
        m.schedule(t0);
        m.on_presence(p[0], &cid(9), Presence::DontHave);
        m.schedule(t0);
        assert!(matches!(m.next_event(), Some(SessionEvent::FindProviders { .. })));
        m.take_outbox();
        m.tick(t0 + Duration::from_secs(60));
        let Some(SessionEvent::NotFound { session, cid: c, error }) = m.next_event() else { panic!("no NotFound") };
        assert_eq!((session, c), (s, cid(9)));
        let text = error.to_string();
        assert!(text.contains("not found within") && text.contains("1 answered DONT_HAVE"), "{text}");
        // The want is gone and the peer told so.
        assert_eq!(summary(&m.take_outbox(), &p[0]), vec![(cid(9), "cancel")]);
        assert_eq!(m.load(), (0, 0));
    }

    #[test]
    fn a_forged_block_bans_the_peer_and_its_requests_move_on() {
        let t0 = Instant::now();
        let mut m = WantManager::new(cfg());
        let p = peers(2);
        m.peer_connected(p[0], true, t0);
        let s = m.new_session();
        m.want(s, [cid(1)], t0);
        m.schedule(t0);
        m.on_presence(p[0], &cid(1), Presence::Have);
        m.schedule(t0);
        m.take_outbox();
        let outcome = m.on_block(p[0], &cid(666), t0);
        assert_eq!(outcome, BlockOutcome::Unwanted { recently_wanted: false, expected_from_sender: true });
        assert!(m.on_bad_block(p[0]));
        assert!(m.is_banned(&p[0]));
        assert_eq!(m.load(), (1, 0));
        // A banned peer is not asked again, even when it reconnects.
        m.peer_connected(p[0], true, t0);
        m.peer_connected(p[1], true, t0);
        m.schedule(t0);
        let out = m.take_outbox();
        assert!(summary(&out, &p[0]).is_empty());
        assert_eq!(summary(&out, &p[1]), vec![(cid(1), "have")]);
    }

    #[test]
    fn late_duplicates_are_recognised_and_cancel_ends_the_want_everywhere() {
        let t0 = Instant::now();
        let mut m = WantManager::new(cfg());
        let p = peers(2);
        m.peer_connected(p[0], true, t0);
        m.peer_connected(p[1], true, t0);
        let (s1, s2) = (m.new_session(), m.new_session());
        m.want(s1, [cid(1)], t0);
        m.want(s2, [cid(1)], t0);
        m.schedule(t0);
        m.take_outbox();
        m.cancel(s1, &cid(1));
        assert!(m.take_outbox().is_empty(), "s2 still wants it");
        m.cancel(s2, &cid(1));
        let out = m.take_outbox();
        assert_eq!(summary(&out, &p[0]), vec![(cid(1), "cancel")]);
        assert_eq!(
            m.on_block(p[1], &cid(1), t0),
            BlockOutcome::Unwanted { recently_wanted: true, expected_from_sender: false }
        );
    }

    #[test]
    fn disconnect_requeues_in_flight_wants_to_remaining_peers() {
        let t0 = Instant::now();
        let mut m = WantManager::new(cfg());
        let p = peers(2);
        m.peer_connected(p[0], true, t0);
        m.peer_connected(p[1], true, t0);
        let s = m.new_session();
        m.want(s, [cid(1)], t0);
        m.schedule(t0);
        m.on_presence(p[0], &cid(1), Presence::Have);
        m.on_presence(p[1], &cid(1), Presence::Have);
        m.schedule(t0);
        m.take_outbox();
        m.peer_disconnected(&p[0]);
        m.schedule(t0);
        assert_eq!(summary(&m.take_outbox(), &p[1]), vec![(cid(1), "block")]);
        assert_eq!(m.load(), (1, 1));
    }

    #[test]
    fn peers_without_have_support_are_asked_for_blocks_one_at_a_time() {
        let t0 = Instant::now();
        let mut m = WantManager::new(cfg());
        let p = peers(1);
        m.peer_connected(p[0], false, t0);
        let s = m.new_session();
        m.want(s, [cid(1)], t0);
        m.schedule(t0);
        assert_eq!(summary(&m.take_outbox(), &p[0]), vec![(cid(1), "block")]);
    }
}
