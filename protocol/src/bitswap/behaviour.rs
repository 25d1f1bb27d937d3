//! The bitswap [`NetworkBehaviour`]: glues the [`Ledger`] (serving) and the [`WantManager`]
//! (requesting) to the swarm and the [`Store`].
//!
//! Received blocks arrive already hashed from the handlers; the behaviour stores the wanted
//! ones in one batch per message and drops the rest. Answers are built lazily — blocks are read
//! from the store only when a connection has room for them
//! ([`Config::max_queued_bytes_per_peer`]) — so a peer wanting a thousand blocks costs no more
//! memory than its queue.
//!
//! The swarm task never waits for the store's disk. A peer's answers are built at once from
//! what memory holds (RocksDB's memtables and block cache, the page cache: `RWF_NOWAIT`); the
//! rest is looked up on a blocking thread ([`MAX_LOOK_UPS`] at a time, one per peer) and the
//! answers built when the results come back. Received blocks are written there too, up to
//! [`MAX_WRITING_BYTES`] at a time (beyond that the swarm task writes them itself, as the
//! handlers would otherwise queue without bound). A slow disk then slows the transfers that
//! need it, not every other protocol of the node.

use std::collections::{HashMap, HashSet, VecDeque};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use cid::Cid;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use libp2p::core::transport::PortUse;
use libp2p::core::Endpoint;
use libp2p::swarm::{
    ConnectionClosed, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, NotifyHandler, THandler,
    THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

use super::handler::{Handler, HandlerConfig, HandlerIn, HandlerOut, MessageKind, OutboundMessage};
use super::ledger::{Built, Found, Ledger};
use super::message::{Message, ReceivedMessage, WantType};
use super::session::{BlockOutcome, SessionConfig, SessionEvent, WantManager};
use super::{Config, Event, FrameError, SessionId, Stats, Version, WantError};
use crate::store::{Block, BlockStore, Store, StoreError};

type Mh = cid::multihash::Multihash<64>;

/// Wantlist entries per message (~50 bytes each: far below the frame limit).
const MAX_ENTRIES_PER_MESSAGE: usize = 8192;
/// Peers whose next answer is being looked up at once (each on a blocking thread).
const MAX_LOOK_UPS: usize = 4;
/// Wants one look-up covers at most (it stops earlier once its blocks reach the message's
/// target size).
const WANTS_PER_LOOK_UP: usize = 1024;
/// Bytes of received blocks being written on blocking threads at once.
const MAX_WRITING_BYTES: usize = 64 << 20;

/// A peer's next answer, looked up: what the store said of each want, by multihash.
type LookedUp = (PeerId, HashMap<Mh, Found>);
/// Received blocks, with who wanted them, their bytes, and how writing them went.
type Written = (PeerId, Vec<(Block, Vec<(SessionId, Cid)>)>, usize, Result<(), StoreError>);

#[derive(Debug, Default)]
struct PeerConns {
    /// Connections and the answer bytes queued in each one's handler.
    conns: Vec<(ConnectionId, usize)>,
    version: Option<Version>,
    /// The peer refused every bitswap protocol.
    unsupported: bool,
}

/// Bitswap. See the [module docs](super).
pub struct Behaviour {
    config: Config,
    store: Store,
    wants: WantManager,
    ledger: Ledger,
    peers: HashMap<PeerId, PeerConns>,
    /// Peers whose ledger may have answers to send, round-robin.
    serve_queue: VecDeque<PeerId>,
    serve_set: HashSet<PeerId>,
    events: VecDeque<ToSwarm<Event, HandlerIn>>,
    stats: Stats,
    tick: Option<tokio::time::Interval>,
    waker: Option<Waker>,
    /// Answers being looked up, one per peer.
    looking_up: FuturesUnordered<tokio::task::JoinHandle<LookedUp>>,
    looking_up_for: HashSet<PeerId>,
    /// Received blocks being written, and their bytes.
    writing: FuturesUnordered<tokio::task::JoinHandle<Written>>,
    writing_bytes: usize,
}

impl Behaviour {
    /// Bitswap serving from and storing into `store`.
    pub fn new(store: Store, config: Config) -> Self {
        let wants = WantManager::new(SessionConfig {
            max_in_flight_per_peer: config.max_in_flight_per_peer.max(1),
            max_in_flight_total: config.max_in_flight_total.max(1),
            request_timeout: config.request_timeout,
            want_timeout: config.want_timeout,
            provider_search_interval: config.provider_search_interval,
            max_bad_blocks: config.max_bad_blocks.max(1),
        });
        let ledger = Ledger::new(config.max_wantlist_entries_per_peer);
        Behaviour {
            config,
            store,
            wants,
            ledger,
            peers: HashMap::new(),
            serve_queue: VecDeque::new(),
            serve_set: HashSet::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
            tick: None,
            waker: None,
            looking_up: FuturesUnordered::new(),
            looking_up_for: HashSet::new(),
            writing: FuturesUnordered::new(),
            writing_bytes: 0,
        }
    }

    /// Opens an empty session; add wants with [`Self::want`].
    pub fn new_session(&mut self) -> SessionId {
        self.wants.new_session()
    }

    /// Wants `cids` in `session` (a new session when `None`), and returns the session.
    ///
    /// Each CID ends with exactly one event for this session: [`Event::BlockReceived`] (at once,
    /// with `from: None`, if the block is already stored) or [`Event::NotFound`] — unless it is
    /// cancelled first.
    pub fn want(&mut self, cids: impl IntoIterator<Item = Cid>, session: Option<SessionId>) -> SessionId {
        let session = session.unwrap_or_else(|| self.wants.new_session());
        let now = Instant::now();
        let mut missing = Vec::new();
        for cid in cids {
            match self.store.block_size(&cid) {
                Ok(Some(size)) => self.events.push_back(ToSwarm::GenerateEvent(Event::BlockReceived { session, cid, from: None, size })),
                Ok(None) => missing.push(cid),
                Err(e) => {
                    tracing::warn!(%cid, error = %e, "cannot check the store; fetching the block");
                    missing.push(cid);
                }
            }
        }
        self.wants.want(session, missing, now);
        self.after_change(now);
        session
    }

    /// Fetches one block in a session of its own.
    pub fn get(&mut self, cid: Cid) -> SessionId {
        self.want([cid], None)
    }

    /// Stops wanting `cid` in `session` (no event follows for it).
    pub fn cancel(&mut self, session: SessionId, cid: &Cid) {
        self.wants.cancel(session, cid);
        self.after_change(Instant::now());
    }

    /// Ends a session and cancels its remaining wants.
    pub fn close_session(&mut self, session: SessionId) {
        self.wants.close_session(session);
        self.after_change(Instant::now());
    }

    /// Tells bitswap that blocks were added to the store by someone else (an import, the
    /// API): peers waiting for them get them, and our own wants for them end with
    /// [`Event::BlockReceived`] `from: None`.
    pub fn notify_new_blocks(&mut self, cids: impl IntoIterator<Item = Cid>) {
        let now = Instant::now();
        let cids: Vec<Cid> = cids.into_iter().collect();
        for cid in &cids {
            if let BlockOutcome::Wanted(requesters) = self.wants.local_block(cid) {
                let size = self.store.block_size(cid).ok().flatten().unwrap_or(0);
                for (session, cid) in requesters {
                    self.events.push_back(ToSwarm::GenerateEvent(Event::BlockReceived { session, cid, from: None, size }));
                }
            }
        }
        for peer in self.ledger.blocks_added(cids.iter()) {
            self.schedule_serve(peer);
        }
        self.after_change(now);
    }

    /// The blocks we want, highest priority first.
    pub fn wantlist(&self) -> Vec<Cid> {
        self.wants.wantlist()
    }

    /// What `peer` wants from us.
    pub fn peer_wantlist(&self, peer: &PeerId) -> Vec<Cid> {
        self.ledger.wantlist(peer).into_iter().map(|(c, _)| c).collect()
    }

    /// Whether `peer` was banned for sending bad blocks.
    pub fn is_banned(&self, peer: &PeerId) -> bool {
        self.wants.is_banned(peer)
    }

    /// Counters and gauges.
    pub fn stats(&self) -> Stats {
        let (active, in_flight) = self.wants.load();
        Stats { active_wants: active as u64, in_flight: in_flight as u64, peers: self.peers.len() as u64, ..self.stats }
    }

    /// The config in use.
    pub fn config(&self) -> &Config {
        &self.config
    }

    fn after_change(&mut self, now: Instant) {
        self.wants.schedule(now);
        self.flush();
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    fn schedule_serve(&mut self, peer: PeerId) {
        if self.serve_set.insert(peer) {
            self.serve_queue.push_back(peer);
        }
    }

    /// Sends the want entries and reports the events the state machine produced.
    fn flush(&mut self) {
        for (peer, entries) in self.wants.take_outbox() {
            let Some(conn) = self.peers.get(&peer).and_then(|p| p.conns.first()).map(|c| c.0) else { continue };
            for chunk in entries.chunks(MAX_ENTRIES_PER_MESSAGE) {
                let message = Message { wantlist: chunk.to_vec(), ..Default::default() };
                self.stats.want_entries_sent += chunk.len() as u64;
                let size = message.size_estimate();
                self.events.push_back(ToSwarm::NotifyHandler {
                    peer_id: peer,
                    handler: NotifyHandler::One(conn),
                    event: HandlerIn::Send(OutboundMessage::new(message, MessageKind::Wants, size)),
                });
            }
        }
        while let Some(ev) = self.wants.next_event() {
            let ev = match ev {
                SessionEvent::FindProviders { session, cid } => Event::FindProviders { session, cid },
                SessionEvent::NotFound { session, cid, error } => Event::NotFound { session, cid, error },
            };
            self.events.push_back(ToSwarm::GenerateEvent(ev));
        }
    }

    fn on_connection_established(&mut self, peer: PeerId, conn: ConnectionId) {
        let entry = self.peers.entry(peer).or_default();
        entry.conns.push((conn, 0));
        if entry.conns.len() == 1 {
            let supports_have = entry.version.is_none_or(Version::supports_have);
            let now = Instant::now();
            self.wants.peer_connected(peer, supports_have, now);
            self.after_change(now);
        }
    }

    fn on_connection_closed(&mut self, peer: PeerId, conn: ConnectionId, remaining: usize) {
        let Some(entry) = self.peers.get_mut(&peer) else { return };
        entry.conns.retain(|(c, _)| *c != conn);
        if remaining == 0 || entry.conns.is_empty() {
            self.peers.remove(&peer);
            self.wants.peer_disconnected(&peer);
            self.ledger.remove_peer(&peer);
            self.serve_set.remove(&peer);
            self.serve_queue.retain(|p| *p != peer);
            // A look-up under way ends without an answer (the peer's ledger is gone).
            self.after_change(Instant::now());
        }
    }

    fn on_message(&mut self, peer: PeerId, msg: ReceivedMessage) {
        let now = Instant::now();
        self.stats.messages_received += 1;
        if msg.malformed_entries > 0 {
            tracing::debug!(%peer, n = msg.malformed_entries, "skipped wantlist entries or presences with bad CIDs");
        }
        // A peer that talks bitswap to us speaks it, whatever an earlier negotiation said.
        if let Some(p) = self.peers.get_mut(&peer) {
            if p.unsupported {
                p.unsupported = false;
                let supports_have = p.version.is_none_or(Version::supports_have);
                self.wants.peer_connected(peer, supports_have, now);
            }
        }

        if msg.full || !msg.wantlist.is_empty() {
            let dropped = self.ledger.receive_wantlist(peer, msg.full, &msg.wantlist);
            if dropped > 0 {
                tracing::debug!(%peer, dropped, "peer's wantlist is full; entries ignored");
            }
            self.schedule_serve(peer);
        }

        for (cid, presence) in &msg.presences {
            self.wants.on_presence(peer, cid, *presence);
        }

        let mut wanted: Vec<(Block, Vec<(SessionId, Cid)>)> = Vec::new();
        let mut bad = 0usize;
        for block in msg.blocks {
            match self.wants.on_block(peer, &block.cid, now) {
                BlockOutcome::Wanted(requesters) => wanted.push((block, requesters)),
                BlockOutcome::Unwanted { recently_wanted, expected_from_sender } => {
                    let stored = self.store.has_block(&block.cid).unwrap_or(false);
                    if stored || recently_wanted {
                        self.stats.dup_blocks += 1;
                        self.stats.dup_bytes += block.data.len() as u64;
                    } else if expected_from_sender {
                        tracing::warn!(%peer, cid = %block.cid, size = block.data.len(), "block matches no CID we asked for: dropped");
                        bad += 1;
                    } else {
                        tracing::debug!(%peer, cid = %block.cid, "unsolicited block dropped");
                        self.stats.unwanted_blocks += 1;
                    }
                }
            }
        }
        for b in &msg.bad_blocks {
            tracing::warn!(%peer, reason = %b.reason, size = b.size, "undecodable block dropped");
        }
        bad += msg.bad_blocks.len();

        if !wanted.is_empty() {
            let bytes: usize = wanted.iter().map(|(b, _)| b.data.len()).sum();
            if self.writing_bytes + bytes <= MAX_WRITING_BYTES {
                self.writing_bytes += bytes;
                let store = self.store.clone();
                self.writing.push(tokio::task::spawn_blocking(move || {
                    let result = catch_panic(|| store.put_blocks(wanted.iter().map(|(b, _)| b)));
                    (peer, wanted, bytes, result)
                }));
            } else {
                // The disk is behind by that much: wait for it here, as the handlers would
                // otherwise bring more without bound.
                let result = self.store.put_blocks(wanted.iter().map(|(b, _)| b));
                self.on_written(peer, wanted, result);
            }
        }

        for _ in 0..bad {
            self.stats.bad_blocks += 1;
            if self.wants.on_bad_block(peer) {
                self.stats.peers_banned += 1;
                tracing::warn!(%peer, "peer banned from bitswap requests for sending bad blocks");
                self.events.push_back(ToSwarm::GenerateEvent(Event::PeerMisbehaved {
                    peer,
                    reason: format!("sent {} block(s) that failed verification", self.config.max_bad_blocks),
                }));
            }
        }
        self.wants.schedule(now);
        self.flush();
    }

    /// Received blocks are stored (or could not be): tells their sessions, and the peers that
    /// want them from us.
    fn on_written(&mut self, peer: PeerId, wanted: Vec<(Block, Vec<(SessionId, Cid)>)>, result: Result<(), StoreError>) {
        match result {
            Ok(()) => {
                for (block, requesters) in &wanted {
                    self.stats.blocks_received += 1;
                    self.stats.block_bytes_received += block.data.len() as u64;
                    for (session, cid) in requesters {
                        self.events.push_back(ToSwarm::GenerateEvent(Event::BlockReceived {
                            session: *session,
                            cid: *cid,
                            from: Some(peer),
                            size: block.data.len(),
                        }));
                    }
                }
                let woken = self.ledger.blocks_added(wanted.iter().map(|(b, _)| &b.cid));
                for p in woken {
                    self.schedule_serve(p);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot store received blocks");
                for (block, requesters) in &wanted {
                    for (session, cid) in requesters {
                        let error = WantError::Store { cid: block.cid, reason: e.to_string() };
                        self.events.push_back(ToSwarm::GenerateEvent(Event::NotFound { session: *session, cid: *cid, error }));
                    }
                }
            }
        }
    }

    /// Sends peers with room in their connection's queue the answers memory holds, and starts
    /// looking up the rest on a blocking thread.
    fn serve(&mut self) {
        let mut rounds = self.serve_queue.len();
        while rounds > 0 {
            rounds -= 1;
            let Some(peer) = self.serve_queue.pop_front() else { break };
            if self.looking_up_for.contains(&peer) {
                // Its look-up's end serves it again.
                self.serve_set.remove(&peer);
                continue;
            }
            let Some(conns) = self.peers.get_mut(&peer) else {
                self.serve_set.remove(&peer);
                continue;
            };
            if conns.unsupported {
                self.serve_set.remove(&peer);
                continue;
            }
            // The connection with the least queued.
            let Some(slot) = conns.conns.iter_mut().min_by_key(|(_, q)| *q) else {
                self.serve_set.remove(&peer);
                continue;
            };
            // A look-up (a hop to a blocking thread and back) waits until it can fill a quarter
            // of the queue, so that a peer draining its queue costs a few, not one per message.
            let max_queued = self.config.max_queued_bytes_per_peer;
            let min_room = (max_queued / 4).max(self.config.target_message_size).min(max_queued);
            if slot.1 > 0 && max_queued.saturating_sub(slot.1) < min_room {
                // Full: a `Sent` from this peer's handler puts it back.
                self.serve_set.remove(&peer);
                continue;
            }
            // Enough for the room left in the peer's queue: the answers are built at once.
            let target = max_queued.saturating_sub(slot.1).max(self.config.target_message_size);
            self.serve_set.remove(&peer);
            // What memory holds goes out at once (on a fast path: the block a look-up just read
            // is in the page cache).
            let store = self.store.clone();
            if !self.send_answers(peer, &mut |cid, want_type| in_memory(&store, cid, want_type)) {
                // Full: a `Sent` from this peer's handler puts it back.
                continue;
            }
            let wants = self.ledger.to_look_up(&peer, WANTS_PER_LOOK_UP);
            if wants.is_empty() {
                continue;
            }
            if self.looking_up.len() >= MAX_LOOK_UPS {
                // Served again once a look-up ends.
                self.schedule_serve(peer);
                continue;
            }
            self.looking_up_for.insert(peer);
            self.looking_up.push(tokio::task::spawn_blocking(move || {
                let mut found = HashMap::new();
                let mut bytes = 0;
                for (cid, want_type) in wants {
                    if bytes >= target {
                        break;
                    }
                    // A store that panics costs this want its answer (DONT_HAVE), not the node.
                    let answer = catch_panic(|| Ok(Found::look_up(&store, &cid, want_type)))
                        .unwrap_or(Found::Block(None));
                    bytes += answer.bytes();
                    found.insert(*cid.hash(), answer);
                }
                (peer, found)
            }));
        }
    }

    /// Builds and sends `peer`'s next answers from what `found` knows, while its queue has
    /// room; returns whether it still has (false also when the peer is gone).
    fn send_answers(&mut self, peer: PeerId, found: &mut dyn FnMut(&Cid, WantType) -> Option<Found>) -> bool {
        let (target, max) = (self.config.target_message_size, self.config.max_message_size);
        loop {
            let Some(slot) = self.peers.get_mut(&peer).and_then(|p| p.conns.iter_mut().min_by_key(|(_, q)| *q)) else { return false };
            if slot.1 >= self.config.max_queued_bytes_per_peer {
                return false;
            }
            let Some((message, built)) = self.ledger.next_message_from(&peer, found, target, max) else { return true };
            let size = message.size_estimate();
            slot.1 += size;
            let conn = slot.0;
            self.send_answer(peer, conn, message, size, built);
        }
    }

    fn send_answer(&mut self, peer: PeerId, conn: ConnectionId, message: Message, size: usize, built: Built) {
        self.stats.haves_sent += built.haves as u64;
        self.stats.dont_haves_sent += built.dont_haves as u64;
        self.events.push_back(ToSwarm::NotifyHandler {
            peer_id: peer,
            handler: NotifyHandler::One(conn),
            event: HandlerIn::Send(OutboundMessage::new(message, MessageKind::Response, size)),
        });
    }

    /// Takes in the look-ups and writes that ended; whether any did.
    fn poll_store_work(&mut self, cx: &mut Context<'_>) -> bool {
        let mut any = false;
        while let Poll::Ready(Some(done)) = self.looking_up.poll_next_unpin(cx) {
            any = true;
            match done {
                Ok((peer, mut found)) => {
                    self.looking_up_for.remove(&peer);
                    self.send_answers(peer, &mut |cid, _| found.remove(cid.hash()));
                    if self.ledger.has_work(&peer) {
                        self.schedule_serve(peer);
                    }
                }
                // Only a runtime shutting down cancels a blocking task.
                Err(e) => tracing::debug!(error = %e, "a block look-up did not finish"),
            }
        }
        while let Poll::Ready(Some(done)) = self.writing.poll_next_unpin(cx) {
            any = true;
            match done {
                Ok((peer, wanted, bytes, result)) => {
                    self.writing_bytes -= bytes;
                    self.on_written(peer, wanted, result);
                }
                Err(e) => tracing::debug!(error = %e, "a block write did not finish"),
            }
        }
        if any {
            self.wants.schedule(Instant::now());
            self.flush();
        }
        any
    }

    fn release_queued(&mut self, peer: PeerId, conn: ConnectionId, size: usize) {
        if let Some(p) = self.peers.get_mut(&peer) {
            if let Some(slot) = p.conns.iter_mut().find(|(c, _)| *c == conn) {
                slot.1 = slot.1.saturating_sub(size);
            }
        }
        if self.ledger.has_work(&peer) {
            self.schedule_serve(peer);
        }
    }

    fn tick_interval(&self) -> Duration {
        let shortest = self.config.request_timeout.min(self.config.want_timeout).min(self.config.provider_search_interval);
        (shortest / 4).clamp(Duration::from_millis(10), Duration::from_millis(500))
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = Handler;
    type ToSwarm = Event;

    fn handle_established_inbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        _peer: PeerId,
        _local_addr: &Multiaddr,
        _remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(Handler::new(self.handler_config()))
    }

    fn handle_established_outbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        _peer: PeerId,
        _addr: &Multiaddr,
        _role_override: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(Handler::new(self.handler_config()))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            // A relay is a meeting point, not a transit provider for content: blocks wait for
            // the direct connection that hole punching makes (see `crate::nat`).
            FromSwarm::ConnectionEstablished(e) if e.endpoint.is_relayed() => {
                tracing::debug!(peer = %e.peer_id, "relayed connection: not used for bitswap");
            }
            FromSwarm::ConnectionEstablished(e) => self.on_connection_established(e.peer_id, e.connection_id),
            FromSwarm::ConnectionClosed(ConnectionClosed { peer_id, connection_id, remaining_established, .. }) => {
                self.on_connection_closed(peer_id, connection_id, remaining_established)
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(&mut self, peer: PeerId, conn: ConnectionId, event: THandlerOutEvent<Self>) {
        match event {
            HandlerOut::Received(msg) => self.on_message(peer, msg),
            HandlerOut::InboundError(e) => {
                match &e {
                    FrameError::Decode(_) | FrameError::TooLarge { .. } | FrameError::InvalidLength => {
                        self.stats.malformed_messages += 1;
                        tracing::warn!(%peer, error = %e, "bad bitswap frame; stream dropped");
                    }
                    _ => tracing::debug!(%peer, error = %e, "inbound bitswap stream ended"),
                }
            }
            HandlerOut::InboundRefused => tracing::debug!(%peer, "inbound bitswap stream refused: too many"),
            HandlerOut::Sent { kind, size, blocks, block_bytes, .. } => {
                self.stats.messages_sent += 1;
                self.stats.blocks_sent += blocks as u64;
                self.stats.block_bytes_sent += block_bytes as u64;
                if kind == MessageKind::Response {
                    self.release_queued(peer, conn, size);
                }
            }
            HandlerOut::SendFailed { kind, size, error } => {
                self.stats.send_failures += 1;
                tracing::debug!(%peer, %error, ?kind, "bitswap message dropped");
                if kind == MessageKind::Response {
                    self.release_queued(peer, conn, size);
                }
            }
            HandlerOut::Negotiated(version) => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.version = Some(version);
                }
                self.wants.set_supports_have(&peer, version.supports_have());
                self.after_change(Instant::now());
            }
            HandlerOut::Unsupported { dropped_response_bytes } => {
                tracing::debug!(%peer, "peer does not speak bitswap");
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.unsupported = true;
                    if let Some(slot) = p.conns.iter_mut().find(|(c, _)| *c == conn) {
                        slot.1 = slot.1.saturating_sub(dropped_response_bytes);
                    }
                }
                self.wants.peer_disconnected(&peer);
                self.after_change(Instant::now());
            }
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ToSwarm<Event, THandlerInEvent<Self>>> {
        self.waker = Some(cx.waker().clone());
        if let Some(ev) = self.events.pop_front() {
            return Poll::Ready(ev);
        }

        // Timers only run while we want something.
        if self.wants.load().0 > 0 {
            let period = self.tick_interval();
            let mut tick = self.tick.take().unwrap_or_else(|| {
                let mut i = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                i
            });
            while tick.poll_tick(cx).is_ready() {
                self.wants.tick(Instant::now());
                self.flush();
            }
            self.tick = Some(tick);
        } else {
            self.tick = None;
        }

        // Polling the store work after serving registers this task's waker with the look-ups
        // just started (a FuturesUnordered does not wake its owner for new futures).
        loop {
            self.serve();
            if !self.poll_store_work(cx) {
                break;
            }
        }
        match self.events.pop_front() {
            Some(ev) => Poll::Ready(ev),
            None => Poll::Pending,
        }
    }
}

impl Behaviour {
    fn handler_config(&self) -> HandlerConfig {
        HandlerConfig {
            max_message_size: self.config.max_message_size,
            max_inbound_streams: self.config.max_inbound_streams.max(1),
            max_response_streams: self.config.max_response_streams.max(1),
            send_timeout: self.config.send_timeout,
            keep_alive: self.config.keep_alive,
        }
    }
}

impl std::fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("bitswap::Behaviour").field("peers", &self.peers.len()).field("stats", &self.stats()).finish()
    }
}

/// What the store holds for a want, if memory can tell without waiting for the disk.
fn in_memory(store: &Store, cid: &Cid, want_type: WantType) -> Option<Found> {
    let found = match want_type {
        WantType::Block => store.get_block_in_memory(cid).map(|b| b.map(Found::Block)),
        WantType::Have => store.has_block_in_memory(cid).map(|h| h.map(Found::Have)),
    };
    // An error is the look-up's to report.
    found.ok().flatten()
}

/// Runs store work that a dependency might panic in; the panic becomes a store error.
fn catch_panic<T>(work: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).unwrap_or_else(|_| {
        Err(StoreError::Io { what: "store work panicked".into(), source: std::io::Error::other("panic") })
    })
}
