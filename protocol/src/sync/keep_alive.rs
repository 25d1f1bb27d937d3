//! Which connections stay open: gossipsub, wrapped so that its streams no longer decide.
//!
//! libp2p closes a connection once no handler asks to keep it and it has had no open stream
//! for the swarm's idle timeout (`swarm::Config::idle_connection_timeout`). Gossipsub opens
//! one long-lived stream each way to every peer as soon as either side subscribes to anything
//! (it sends its subscriptions on connect), and libp2p counts those streams as open: every
//! connection a node holding one core ever had stayed open, whatever the timeout. Kademlia
//! dials the peers a query asks, so after a few lookups every node of a small network was
//! connected to nearly every other (the simulation measured N − 1 connections per node).
//!
//! [`Gossip`] hides gossipsub's streams from that count (as ping does with its own) and keeps a
//! connection open while:
//! - the peer shares a topic with this node: a replica of a core it holds (or a shared inbox):
//!   the core's gossip and catch-up go over it, and the catch-up scheduler would dial a lost
//!   replica again at once;
//! - gossipsub has the peer in a mesh (gossipsub's own rule, unchanged);
//! - the peer is among the first [`Keep::low_water`] peers this node counts (replicas
//!   included), as Kubo's connection manager keeps its low water mark: a node with few peers
//!   keeps them, and the node's `target_peers` are not dialed again every idle timeout;
//! - the peer dialed this node, while this node keeps fewer than [`Keep::high_water`] peers in
//!   all (three times the low water mark, Kubo's ratio of 32 to 96).
//!
//! Any other connection (peers met through DHT queries, mostly) closes once idle for the
//! timeout. The other protocols keep their own rules (bitswap for a minute after a block, a
//! relay reservation, a request in flight).
//!
//! Either side closes a connection it does not keep, so keeping must agree at both ends, or
//! the side that wants the connection dials again and again. The first rule alone did not
//! agree: a node dials its low-water peers once its first connections (the bootstraps, the
//! peers of its first DHT queries) are gone, and by then the peers it dials have filled their
//! own low water marks, so they closed the connection after the idle timeout and it dialed
//! the next one (the simulation measured 2.7 connections opened per idle node per second,
//! 300 nodes). The inbound rule makes them agree: the dialed side keeps what others dial to
//! keep, up to the high water mark; what the dialing side does not keep (a DHT query's peer)
//! it closes itself.
//!
//! [`Keep`] decides, without I/O; the behaviour only tells each connection's handler.
//!
//! The wrapper also opens gossipsub's outbound stream at once on a peer's second connection
//! (see [`Handler`]): gossipsub 0.50 shares one send queue among a peer's connections, and a
//! handler without an outbound stream checks that queue without registering to be woken, so
//! after a relayed connection gave way to a hole-punched one, the next message waited for
//! something else (the next ping, up to 5 s) to poll the new connection.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::{Deref, DerefMut};
use std::task::{Context, Poll, Waker};

use libp2p::core::transport::PortUse;
use libp2p::core::upgrade::{InboundUpgrade, OutboundUpgrade, UpgradeInfo};
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::gossipsub::{self, Hasher, SubscriptionError, Topic, TopicHash};
use libp2p::swarm::handler::{
    ConnectionEvent, DialUpgradeError, FullyNegotiatedInbound, FullyNegotiatedOutbound, InboundUpgradeSend, ListenUpgradeError, OutboundUpgradeSend,
    UpgradeInfoSend,
};
// libp2p's own `Either` (the one its handlers and the derive use).
use libp2p::swarm::derive_prelude::Either;
use libp2p::swarm::{
    ConnectionClosed, ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm, NetworkBehaviour, NotifyHandler, Stream,
    SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::PeerId;

use super::CountingTransform;

/// Which connected peers this node keeps connections to (see the module doc). Fed with what
/// happened; each call answers the peers whose verdict changed.
#[derive(Debug, Default)]
pub struct Keep {
    /// Peers kept although they share no topic, at most this many minus the peers that do.
    low_water: usize,
    /// Peers that dialed this node are kept while fewer than this many are kept in all.
    high_water: usize,
    /// The topics this node subscribes to.
    ours: HashSet<TopicHash>,
    /// Connected peers in the order they connected.
    peers: HashMap<PeerId, Peer>,
    /// Order of the next peer to connect.
    next: u64,
}

#[derive(Debug)]
struct Peer {
    /// When it connected, in the order of [`Keep::next`]: the oldest are kept first.
    order: u64,
    /// Its first connection (of those open) was dialed by the peer.
    inbound: bool,
    /// Topics of ours it subscribes to.
    shared: HashSet<TopicHash>,
    /// Kept for the low water mark.
    low: bool,
    /// Kept because it dialed this node, below the high water mark.
    dialed_us: bool,
}

impl Peer {
    fn kept(&self) -> bool {
        self.low || self.dialed_us || !self.shared.is_empty()
    }

    fn set(&mut self, low: bool, dialed_us: bool) -> Option<bool> {
        let was = self.kept();
        self.low = low;
        self.dialed_us = dialed_us;
        (self.kept() != was).then_some(self.kept())
    }
}

/// [`Keep::high_water`] in low water marks (Kubo's connection manager: 32 and 96).
const HIGH_WATER_FACTOR: usize = 3;

impl Keep {
    /// Keeps up to `low_water` peers that share no topic, fewer as more do, and the peers
    /// that dialed this node while fewer than three times `low_water` are kept.
    pub fn new(low_water: usize) -> Self {
        Keep { low_water, high_water: low_water.saturating_mul(HIGH_WATER_FACTOR), ..Keep::default() }
    }

    /// The low water mark.
    pub fn low_water(&self) -> usize {
        self.low_water
    }

    /// The high water mark.
    pub fn high_water(&self) -> usize {
        self.high_water
    }

    /// Whether the connections to `peer` are kept.
    pub fn is_kept(&self, peer: &PeerId) -> bool {
        self.peers.get(peer).is_some_and(Peer::kept)
    }

    /// Connected peers that are kept.
    pub fn kept(&self) -> usize {
        self.peers.values().filter(|p| p.kept()).count()
    }

    /// The first connection to `peer` opened, dialed by the peer if `inbound` (its
    /// subscriptions come after).
    pub fn connected(&mut self, peer: PeerId, inbound: bool) -> Vec<(PeerId, bool)> {
        if self.peers.contains_key(&peer) {
            return Vec::new();
        }
        self.peers.insert(peer, Peer { order: self.next, inbound, shared: HashSet::new(), low: false, dialed_us: false });
        self.next += 1;
        self.rebalance()
    }

    /// The last connection to `peer` closed.
    pub fn disconnected(&mut self, peer: &PeerId) -> Vec<(PeerId, bool)> {
        match self.peers.remove(peer) {
            Some(gone) if gone.kept() => self.rebalance(),
            _ => Vec::new(),
        }
    }

    /// `peer` subscribed to `topic`.
    pub fn peer_subscribed(&mut self, peer: PeerId, topic: &TopicHash) -> Vec<(PeerId, bool)> {
        if !self.ours.contains(topic) {
            return Vec::new();
        }
        self.share(peer, topic)
    }

    /// `peer` unsubscribed from `topic`.
    pub fn peer_unsubscribed(&mut self, peer: PeerId, topic: &TopicHash) -> Vec<(PeerId, bool)> {
        self.unshare(peer, topic)
    }

    /// This node subscribed to `topic`; `peers` are the connected peers subscribed to it.
    pub fn subscribed(&mut self, topic: TopicHash, peers: impl IntoIterator<Item = PeerId>) -> Vec<(PeerId, bool)> {
        self.ours.insert(topic.clone());
        let mut changed = Vec::new();
        for peer in peers {
            changed.extend(self.share(peer, &topic));
        }
        dedup_last(changed)
    }

    /// This node unsubscribed from `topic`.
    pub fn unsubscribed(&mut self, topic: &TopicHash) -> Vec<(PeerId, bool)> {
        if !self.ours.remove(topic) {
            return Vec::new();
        }
        let sharing: Vec<PeerId> = self.peers.iter().filter(|(_, p)| p.shared.contains(topic)).map(|(id, _)| *id).collect();
        let mut changed = Vec::new();
        for peer in sharing {
            changed.extend(self.unshare(peer, topic));
        }
        dedup_last(changed)
    }

    fn share(&mut self, peer: PeerId, topic: &TopicHash) -> Vec<(PeerId, bool)> {
        let Some(p) = self.peers.get_mut(&peer) else { return Vec::new() };
        let was_shared = !p.shared.is_empty();
        p.shared.insert(topic.clone());
        if was_shared {
            return Vec::new();
        }
        let was_kept = p.low || p.dialed_us;
        // A replica needs no slot: its slot goes to the next peer in line.
        p.low = false;
        p.dialed_us = false;
        let mut changed = if was_kept { Vec::new() } else { vec![(peer, true)] };
        changed.extend(self.rebalance());
        dedup_last(changed)
    }

    fn unshare(&mut self, peer: PeerId, topic: &TopicHash) -> Vec<(PeerId, bool)> {
        let Some(p) = self.peers.get_mut(&peer) else { return Vec::new() };
        if !p.shared.remove(topic) || !p.shared.is_empty() {
            return Vec::new();
        }
        // No longer a replica: kept only if a low-water slot is free, as any peer.
        let mut changed = vec![(peer, false)];
        changed.extend(self.rebalance());
        dedup_last(changed)
    }

    /// Gives the low-water slots to the peers that connected first among those sharing no
    /// topic, then keeps the oldest of the others that dialed this node up to the high water
    /// mark; answers the peers whose verdict changed.
    fn rebalance(&mut self) -> Vec<(PeerId, bool)> {
        let sharing = self.peers.values().filter(|p| !p.shared.is_empty()).count();
        let slots = self.low_water.saturating_sub(sharing);
        let mut others: Vec<(u64, PeerId)> = self.peers.iter().filter(|(_, p)| p.shared.is_empty()).map(|(id, p)| (p.order, *id)).collect();
        others.sort_unstable();
        let mut kept = sharing + others.len().min(slots);
        let mut changed = Vec::new();
        for (rank, (_, id)) in others.into_iter().enumerate() {
            let Some(p) = self.peers.get_mut(&id) else { continue };
            let low = rank < slots;
            let dialed_us = !low && p.inbound && kept < self.high_water;
            if dialed_us {
                kept += 1;
            }
            if let Some(keep) = p.set(low, dialed_us) {
                changed.push((id, keep));
            }
        }
        changed
    }
}

/// The last verdict of each peer, in the order of first mention.
fn dedup_last(changes: Vec<(PeerId, bool)>) -> Vec<(PeerId, bool)> {
    let mut out: Vec<(PeerId, bool)> = Vec::with_capacity(changes.len());
    for (peer, keep) in changes {
        match out.iter_mut().find(|(p, _)| *p == peer) {
            Some(entry) => entry.1 = keep,
            None => out.push((peer, keep)),
        }
    }
    out
}

/// The gossipsub of a Kubelt node.
pub(crate) type Inner = gossipsub::Behaviour<CountingTransform>;

/// Gossipsub whose streams do not keep connections open, with [`Keep`] deciding which do.
/// Dereferences to gossipsub; [`Gossip::subscribe`] and [`Gossip::unsubscribe`] replace
/// gossipsub's own so that the verdicts follow this node's topics.
pub struct Gossip {
    inner: Inner,
    keep: Keep,
    /// Open connections per connected peer.
    connections: HashMap<PeerId, Vec<ConnectionId>>,
    /// Verdicts to hand to connection handlers.
    pending: VecDeque<(PeerId, ConnectionId, bool)>,
    waker: Option<Waker>,
}

impl Gossip {
    /// Wraps `inner`, keeping up to `low_water` connections besides those to replicas.
    pub fn new(inner: Inner, low_water: usize) -> Self {
        Gossip { inner, keep: Keep::new(low_water), connections: HashMap::new(), pending: VecDeque::new(), waker: None }
    }

    /// What decides which connections are kept.
    pub fn keep(&self) -> &Keep {
        &self.keep
    }

    /// Gossipsub's `subscribe`; connections to peers already on the topic are kept from now on.
    pub fn subscribe<H: Hasher>(&mut self, topic: &Topic<H>) -> Result<bool, SubscriptionError> {
        let subscribed = self.inner.subscribe(topic)?;
        let hash = topic.hash();
        let peers: Vec<PeerId> = self.inner.all_peers().filter(|(_, topics)| topics.contains(&&hash)).map(|(p, _)| *p).collect();
        let changed = self.keep.subscribed(hash, peers);
        self.tell(changed);
        Ok(subscribed)
    }

    /// Gossipsub's `unsubscribe`; connections kept only for this topic are no longer kept.
    pub fn unsubscribe<H: Hasher>(&mut self, topic: &Topic<H>) -> bool {
        let was = self.inner.unsubscribe(topic);
        let changed = self.keep.unsubscribed(&topic.hash());
        self.tell(changed);
        was
    }

    fn tell(&mut self, changed: Vec<(PeerId, bool)>) {
        if changed.is_empty() {
            return;
        }
        for (peer, keep) in changed {
            for id in self.connections.get(&peer).into_iter().flatten() {
                self.pending.push_back((peer, *id, keep));
            }
        }
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    fn handler(&self, peer: &PeerId, inner: THandler<Inner>) -> Handler<THandler<Inner>> {
        Handler { inner, keep: self.keep.is_kept(peer) }
    }
}

impl Deref for Gossip {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

impl DerefMut for Gossip {
    fn deref_mut(&mut self) -> &mut Inner {
        &mut self.inner
    }
}

impl NetworkBehaviour for Gossip {
    type ConnectionHandler = Handler<THandler<Inner>>;
    type ToSwarm = gossipsub::Event;

    fn handle_pending_inbound_connection(&mut self, connection_id: ConnectionId, local_addr: &Multiaddr, remote_addr: &Multiaddr) -> Result<(), ConnectionDenied> {
        self.inner.handle_pending_inbound_connection(connection_id, local_addr, remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        let inner = self.inner.handle_established_inbound_connection(connection_id, peer, local_addr, remote_addr)?;
        Ok(self.handler(&peer, inner))
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.inner.handle_pending_outbound_connection(connection_id, maybe_peer, addresses, effective_role)
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        let inner = self.inner.handle_established_outbound_connection(connection_id, peer, addr, role_override, port_use)?;
        Ok(self.handler(&peer, inner))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        self.inner.on_swarm_event(event);
        match event {
            FromSwarm::ConnectionEstablished(e) => {
                self.connections.entry(e.peer_id).or_default().push(e.connection_id);
                let changed = self.keep.connected(e.peer_id, e.endpoint.is_listener());
                self.tell(changed);
            }
            FromSwarm::ConnectionClosed(ConnectionClosed { peer_id, connection_id, remaining_established, .. }) => {
                if let Some(ids) = self.connections.get_mut(&peer_id) {
                    ids.retain(|id| *id != connection_id);
                }
                self.pending.retain(|(_, id, _)| *id != connection_id);
                if remaining_established == 0 {
                    self.connections.remove(&peer_id);
                    let changed = self.keep.disconnected(&peer_id);
                    self.tell(changed);
                }
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(&mut self, peer_id: PeerId, connection_id: ConnectionId, event: THandlerOutEvent<Self>) {
        self.inner.on_connection_handler_event(peer_id, connection_id, event);
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        if let Some((peer_id, id, keep)) = self.pending.pop_front() {
            return Poll::Ready(ToSwarm::NotifyHandler { peer_id, handler: NotifyHandler::One(id), event: Either::Right(keep) });
        }
        match self.inner.poll(cx) {
            Poll::Ready(event) => {
                match &event {
                    ToSwarm::GenerateEvent(gossipsub::Event::Subscribed { peer_id, topic, .. }) => {
                        let changed = self.keep.peer_subscribed(*peer_id, topic);
                        self.tell(changed);
                    }
                    ToSwarm::GenerateEvent(gossipsub::Event::Unsubscribed { peer_id, topic }) => {
                        let changed = self.keep.peer_unsubscribed(*peer_id, topic);
                        self.tell(changed);
                    }
                    _ => {}
                }
                Poll::Ready(event.map_in(Either::Left))
            }
            Poll::Pending => {
                self.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// A connection handler whose streams do not keep the connection open; it keeps it while the
/// behaviour says so (`Either::Right`) or the inner handler asks.
pub struct Handler<H: ConnectionHandler> {
    inner: H,
    keep: bool,
}

impl<H: ConnectionHandler> ConnectionHandler for Handler<H> {
    type FromBehaviour = Either<H::FromBehaviour, bool>;
    type ToBehaviour = H::ToBehaviour;
    type InboundProtocol = Quiet<H::InboundProtocol>;
    type OutboundProtocol = Quiet<H::OutboundProtocol>;
    type InboundOpenInfo = H::InboundOpenInfo;
    type OutboundOpenInfo = H::OutboundOpenInfo;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol, Self::InboundOpenInfo> {
        self.inner.listen_protocol().map_upgrade(Quiet)
    }

    fn connection_keep_alive(&self) -> bool {
        self.keep || self.inner.connection_keep_alive()
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, Self::OutboundOpenInfo, Self::ToBehaviour>> {
        self.inner.poll(cx).map(|event| event.map_protocol(Quiet))
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Option<Self::ToBehaviour>> {
        self.inner.poll_close(cx)
    }

    fn on_behaviour_event(&mut self, event: Self::FromBehaviour) {
        match event {
            Either::Left(event) => self.inner.on_behaviour_event(event),
            Either::Right(keep) => self.keep = keep,
        }
    }

    fn on_connection_event(&mut self, event: ConnectionEvent<Self::InboundProtocol, Self::OutboundProtocol, Self::InboundOpenInfo, Self::OutboundOpenInfo>) {
        let event = match event {
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound { protocol, info }) => {
                ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound { protocol, info })
            }
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound { protocol, info }) => {
                ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound { protocol, info })
            }
            ConnectionEvent::AddressChange(change) => ConnectionEvent::AddressChange(change),
            ConnectionEvent::DialUpgradeError(DialUpgradeError { info, error }) => ConnectionEvent::DialUpgradeError(DialUpgradeError { info, error }),
            ConnectionEvent::ListenUpgradeError(ListenUpgradeError { info, error }) => ConnectionEvent::ListenUpgradeError(ListenUpgradeError { info, error }),
            ConnectionEvent::LocalProtocolsChange(change) => ConnectionEvent::LocalProtocolsChange(change),
            ConnectionEvent::RemoteProtocolsChange(change) => ConnectionEvent::RemoteProtocolsChange(change),
            // `ConnectionEvent` is non-exhaustive; libp2p 0.57 has no other variant.
            _ => return,
        };
        self.inner.on_connection_event(event);
    }
}

/// An upgrade whose stream is left out of the connection's keep-alive count
/// ([`Stream::ignore_for_keep_alive`]), as ping leaves out its own.
#[derive(Debug, Clone)]
pub struct Quiet<U>(U);

impl<U: UpgradeInfoSend> UpgradeInfo for Quiet<U> {
    type Info = U::Info;
    type InfoIter = U::InfoIter;

    fn protocol_info(&self) -> Self::InfoIter {
        self.0.protocol_info()
    }
}

impl<U: InboundUpgradeSend> InboundUpgrade<Stream> for Quiet<U> {
    type Output = U::Output;
    type Error = U::Error;
    type Future = U::Future;

    fn upgrade_inbound(self, mut socket: Stream, info: Self::Info) -> Self::Future {
        socket.ignore_for_keep_alive();
        self.0.upgrade_inbound(socket, info)
    }
}

impl<U: OutboundUpgradeSend> OutboundUpgrade<Stream> for Quiet<U> {
    type Output = U::Output;
    type Error = U::Error;
    type Future = U::Future;

    fn upgrade_outbound(self, mut socket: Stream, info: Self::Info) -> Self::Future {
        socket.ignore_for_keep_alive();
        self.0.upgrade_outbound(socket, info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(n: usize) -> Vec<PeerId> {
        (0..n).map(|_| PeerId::random()).collect()
    }

    fn topic(name: &str) -> TopicHash {
        TopicHash::from_raw(name)
    }

    #[test]
    fn the_first_peers_are_kept_up_to_the_low_water_mark_and_the_next_in_line_replaces_one_that_leaves() {
        let mut keep = Keep::new(2);
        let p = peers(4);
        assert_eq!(keep.connected(p[0], false), vec![(p[0], true)]);
        assert_eq!(keep.connected(p[1], false), vec![(p[1], true)]);
        assert!(keep.connected(p[2], false).is_empty(), "past the low water mark a peer met through the DHT is not kept");
        assert!(keep.connected(p[3], false).is_empty());
        assert_eq!(keep.kept(), 2);
        assert_eq!(keep.disconnected(&p[0]), vec![(p[2], true)], "the oldest peer not kept takes the slot");
        assert!(keep.disconnected(&p[3]).is_empty(), "a peer not kept leaves no slot");
        assert!(keep.is_kept(&p[1]) && keep.is_kept(&p[2]) && !keep.is_kept(&p[3]));
    }

    #[test]
    fn peers_that_dialed_this_node_are_kept_up_to_the_high_water_mark() {
        let mut keep = Keep::new(2);
        assert_eq!(keep.high_water(), 6);
        let p = peers(9);
        // Two peers this node dialed: the low water mark.
        keep.connected(p[0], false);
        keep.connected(p[1], false);
        // A third one it dialed (a DHT query's peer) is not kept: this side closes it.
        assert!(keep.connected(p[2], false).is_empty());
        // Peers that dialed it are kept until 6 are kept in all.
        for peer in &p[3..7] {
            assert_eq!(keep.connected(*peer, true), vec![(*peer, true)], "a peer that dialed this node below the high water mark");
        }
        assert!(keep.connected(p[7], true).is_empty(), "past the high water mark a peer that dialed is not kept either");
        assert_eq!(keep.kept(), 6);
        // A replica takes a low-water slot (as before): the newest low-water peer gives way,
        // and the number kept stays at the high water mark.
        let core = topic("kubelt/core/c");
        keep.subscribed(core.clone(), []);
        assert_eq!(keep.peer_subscribed(p[8], &core), Vec::new(), "not connected yet: nothing to keep");
        assert_eq!(keep.connected(p[8], true), Vec::new());
        assert_eq!(keep.peer_subscribed(p[8], &core), vec![(p[8], true), (p[1], false)]);
        assert_eq!(keep.kept(), 6);
        // One that leaves frees its place for the oldest peer that dialed and is not kept.
        assert_eq!(keep.disconnected(&p[3]), vec![(p[7], true)]);
        assert!(!keep.is_kept(&p[1]) && !keep.is_kept(&p[2]) && keep.is_kept(&p[7]));
        assert_eq!(keep.kept(), 6);
    }

    #[test]
    fn peers_sharing_a_topic_are_kept_beyond_the_low_water_mark_and_take_its_slots() {
        let mut keep = Keep::new(2);
        let p = peers(5);
        for peer in &p {
            keep.connected(*peer, false);
        }
        let core = topic("kubelt/core/a");
        // A peer subscribing to a topic this node does not hold changes nothing.
        assert!(keep.peer_subscribed(p[4], &core).is_empty());
        // This node subscribes; p[4] is already on the topic: a replica, kept; it needs no
        // slot, and the replicas count toward the low water mark, so the newest kept peer
        // (p[1]) gives its slot up.
        assert_eq!(keep.subscribed(core.clone(), [p[4]]), vec![(p[4], true), (p[1], false)]);
        // Two more replicas: no slot left for peers that share nothing.
        assert_eq!(keep.peer_subscribed(p[3], &core), vec![(p[3], true), (p[0], false)]);
        assert_eq!(keep.peer_subscribed(p[2], &core), vec![(p[2], true)]);
        assert_eq!(keep.kept(), 3);
        assert!(!keep.is_kept(&p[0]) && !keep.is_kept(&p[1]));
        // A replica that leaves the topic is back in line with the others; the slots it and the
        // departed replica free go to the oldest.
        assert_eq!(keep.peer_unsubscribed(p[2], &core), vec![(p[2], false)]);
        assert_eq!(keep.disconnected(&p[3]), vec![(p[0], true)]);
        // This node leaves the topic: nobody is a replica, the two oldest are kept.
        assert_eq!(keep.unsubscribed(&core), vec![(p[4], false), (p[1], true)]);
        assert!(keep.is_kept(&p[0]) && keep.is_kept(&p[1]) && !keep.is_kept(&p[2]) && !keep.is_kept(&p[4]));
    }

    /// A swarm with nothing but [`Gossip`] on the memory transport: no ping or other protocol
    /// that would wake a connection by chance.
    fn gossip_swarm() -> libp2p::Swarm<Gossip> {
        use libp2p::core::transport::{MemoryTransport, Transport as _};
        let build = || -> Result<libp2p::Swarm<Gossip>, Box<dyn std::error::Error>> {
            Ok(libp2p::SwarmBuilder::with_new_identity()
                .with_tokio()
                .with_other_transport(|key| {
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                        MemoryTransport::default()
                            .upgrade(libp2p::core::upgrade::Version::V1)
                            .authenticate(libp2p::noise::Config::new(key)?)
                            .multiplex(libp2p::yamux::Config::default()),
                    )
                })?
                .with_behaviour(|key| {
                    let inner = crate::sync::gossipsub(key, crate::sync::GossipCounters::default(), std::time::Duration::from_millis(200))?;
                    Ok(Gossip::new(inner, 4))
                })?
                .with_swarm_config(|c| c.with_idle_connection_timeout(std::time::Duration::from_secs(60)))
                .build())
        };
        build().expect("a swarm on the memory transport")
    }

    #[tokio::test]
    async fn a_message_queued_after_the_first_connection_closed_goes_out_on_the_second_at_once() {
        use futures::StreamExt;
        use libp2p::swarm::SwarmEvent;
        use std::time::Duration;
        let (mut a, mut b) = (gossip_swarm(), gossip_swarm());
        let addr: Multiaddr = format!("/memory/{}", rand::random::<u64>()).parse().expect("a memory address");
        a.listen_on(addr.clone()).expect("listening");
        let topic = gossipsub::IdentTopic::new("kubelt/test/handover");
        a.behaviour_mut().subscribe(&topic).expect("subscribing");
        b.behaviour_mut().subscribe(&topic).expect("subscribing");
        // Two connections from B to A, as a relayed one and a hole-punched one are, counted as A
        // (the publisher) sees them: its handler on the first holds the outbound stream, and A
        // learns of B's subscription over it. The second comes once the first is quiet (300 ms
        // after it is up and the subscription known), as a hole-punched one comes after the
        // relayed one.
        let mut connections = Vec::new();
        let mut subscribed = false;
        for round in 0..2 {
            b.dial(addr.clone()).expect("dialing");
            let mut quiet = Box::pin(tokio::time::sleep(Duration::from_secs(3600)));
            let mut armed = false;
            let setup = async {
                loop {
                    tokio::select! {
                        event = a.select_next_some() => match event {
                            SwarmEvent::Behaviour(gossipsub::Event::Subscribed { .. }) => subscribed = true,
                            SwarmEvent::ConnectionEstablished { connection_id, .. } => connections.push(connection_id),
                            _ => {}
                        },
                        _ = b.select_next_some() => {}
                        _ = &mut quiet => return,
                    }
                    if !armed && connections.len() > round && subscribed {
                        armed = true;
                        quiet.as_mut().reset(tokio::time::Instant::now() + Duration::from_millis(300));
                    }
                }
            };
            tokio::time::timeout(Duration::from_secs(10), setup).await.expect("a connection and A's view of B's subscription");
        }
        assert_eq!(connections.len(), 2);
        // The first connection goes, as the relayed one does after the handover.
        assert!(a.close_connection(connections[0]));
        let closed = async {
            loop {
                tokio::select! {
                    event = a.select_next_some() => if let SwarmEvent::ConnectionClosed { .. } = event { return },
                    _ = b.select_next_some() => {}
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), closed).await.expect("the first connection closes");
        // The change comes a moment later (gossipsub pokes the remaining handler when it sees
        // the close, while nothing is queued yet).
        let settle = async {
            loop {
                tokio::select! {
                    _ = a.select_next_some() => {}
                    _ = b.select_next_some() => {}
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_millis(300), settle).await;
        a.behaviour_mut().publish(topic.clone(), b"after the handover".to_vec()).expect("B is subscribed: publishing");
        let delivered = async {
            loop {
                tokio::select! {
                    _ = a.select_next_some() => {}
                    event = b.select_next_some() => {
                        if let SwarmEvent::Behaviour(gossipsub::Event::Message { message, .. }) = event {
                            return message.data;
                        }
                    }
                }
            }
        };
        // Nothing else wakes A's remaining connection (no ping runs here): only the send queue,
        // which patched gossipsub's handler registers with while it has no stream.
        let data = tokio::time::timeout(Duration::from_secs(3), delivered).await.expect("the message goes out on the remaining connection at once");
        assert_eq!(data, b"after the handover");
    }

    #[test]
    fn a_replica_is_kept_with_a_low_water_mark_of_zero() {
        let mut keep = Keep::new(0);
        let p = peers(2);
        assert!(keep.connected(p[0], false).is_empty());
        let core = topic("kubelt/core/b");
        assert!(keep.subscribed(core.clone(), []).is_empty());
        assert!(keep.connected(p[1], false).is_empty());
        assert_eq!(keep.peer_subscribed(p[1], &core), vec![(p[1], true)]);
        assert!(keep.peer_subscribed(p[1], &topic("kubelt/core/other")).is_empty());
        assert_eq!(keep.disconnected(&p[1]), Vec::new(), "a replica that left frees no slot when there are none");
        assert_eq!(keep.kept(), 0);
    }
}
