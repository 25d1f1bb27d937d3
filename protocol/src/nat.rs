//! Nodes behind NAT: reachability, relays and hole punching, with libp2p's own protocols.
//!
//! - **AutoNAT** ([v1 spec](https://github.com/libp2p/specs/blob/master/autonat/autonat-v1.md),
//!   `/libp2p/autonat/1.0.0`) gives the node's verdict — [`Reachability`] `public`, `private` or
//!   `unknown` — by asking connected peers to dial it back, again every
//!   [`Config::autonat_interval`] (and ten times that once it is sure). **AutoNAT v2**
//!   ([spec](https://github.com/libp2p/specs/blob/master/autonat/autonat-v2.md),
//!   `/libp2p/autonat/2/dial-request`, `/2/dial-back`) confirms each candidate address on its
//!   own; rust-libp2p's v2 client tests an address once and has no overall verdict (a port
//!   forwarded later would never be noticed), so the verdict comes from v1, as in Kubo.
//!   Every node answers both (a dial-back is one bounded, throttled dial).
//! - **Circuit relay v2** ([spec](https://github.com/libp2p/specs/blob/master/relay/circuit-v2.md),
//!   `/libp2p/circuit/relay/0.2.0/{hop,stop}`): bootstrap nodes and nodes configured with
//!   `relay = true` serve reservations and circuits within [`RelayLimits`]. Every node is a relay
//!   client: a private node reserves a slot on up to [`MAX_RESERVATIONS`] relays it is connected
//!   to, and its `/p2p-circuit` addresses go into identify, provider records and peer books.
//! - **DCUtR** ([spec](https://github.com/libp2p/specs/blob/master/relay/DCUtR.md),
//!   `/libp2p/dcutr`) turns a relayed connection into a direct one (TCP simultaneous open, QUIC
//!   hole punching). Once a direct connection is up, the relayed one is closed, so core sync and
//!   gossip move to it; bitswap never uses a relayed connection (a relay is a meeting point,
//!   not a transit provider for content).
//!
//! What the node decides from all this lives here without I/O ([`RelayPlan`]); the event loop
//! (`node/event_loop/nat.rs`) feeds it swarm events and carries out its answers.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use serde::Serialize;

/// Most relays a private node holds a reservation on at once.
pub const MAX_RESERVATIONS: usize = 2;
/// How long a relay that refused a reservation (or lost it) is left alone.
pub const RELAY_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Whether other nodes can dial this one, as AutoNAT found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reachability {
    /// Not known yet (no AutoNAT server answered, or they disagreed).
    #[default]
    Unknown,
    /// Peers dialed this node back: it is reachable.
    Public,
    /// Dial-backs failed: the node is behind a NAT or a firewall.
    Private,
}

impl Reachability {
    /// `public`, `private` or `unknown`, as `kubelt status` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Reachability::Unknown => "unknown",
            Reachability::Public => "public",
            Reachability::Private => "private",
        }
    }
}

/// Limits of the relay server: what a reservation and a circuit may use.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayLimits {
    /// Reservations held at once, over all peers.
    pub max_reservations: usize,
    /// Reservations one peer may hold.
    pub max_reservations_per_peer: usize,
    /// How long a reservation lasts before the peer must renew it.
    pub reservation_duration: Duration,
    /// Circuits open at once.
    pub max_circuits: usize,
    /// Circuits one peer may have open (as source or destination).
    pub max_circuits_per_peer: usize,
    /// How long one circuit may stay open.
    pub max_circuit_duration: Duration,
    /// Bytes one circuit may carry (both directions together) before the relay closes it.
    pub max_circuit_bytes: u64,
}

impl Default for RelayLimits {
    fn default() -> Self {
        RelayLimits {
            max_reservations: 128,
            max_reservations_per_peer: 4,
            reservation_duration: Duration::from_secs(3600),
            max_circuits: 16,
            max_circuits_per_peer: 4,
            max_circuit_duration: Duration::from_secs(120),
            // Core changes, gossip and the DHT, not content: see the module docs.
            max_circuit_bytes: 1 << 20,
        }
    }
}

impl RelayLimits {
    /// libp2p's relay configuration with these limits (and its default rate limits).
    pub fn relay_config(&self) -> libp2p::relay::Config {
        libp2p::relay::Config {
            max_reservations: self.max_reservations,
            max_reservations_per_peer: self.max_reservations_per_peer,
            reservation_duration: self.reservation_duration,
            max_circuits: self.max_circuits,
            max_circuits_per_peer: self.max_circuits_per_peer,
            max_circuit_duration: self.max_circuit_duration,
            max_circuit_bytes: self.max_circuit_bytes,
            ..libp2p::relay::Config::default()
        }
    }
}

/// NAT-related settings of the swarm.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Run AutoNAT (v1 and v2, as client and server). Off only where no address has an IP:
    /// on libp2p's memory transport (the simulation) identify reports a new observed address
    /// for every connection, an ephemeral memory port, and AutoNAT v2 tested every one (up to
    /// ten every 5 s, each with a dial-back) with nothing to learn.
    pub autonat: bool,
    /// How often AutoNAT asks for a dial-back while unsure (ten times slower once sure).
    pub autonat_interval: Duration,
    /// Trust dial-backs to, and answer for, private and loopback addresses (LANs, test
    /// networks). Off on the internet: a peer on the same LAN would call a NATed node public.
    pub autonat_private_addresses: bool,
    /// Serve as a relay with these limits (bootstrap nodes, `relay = true`).
    pub relay_server: Option<RelayLimits>,
}

impl Default for Config {
    fn default() -> Self {
        Config { autonat: true, autonat_interval: Duration::from_secs(90), autonat_private_addresses: false, relay_server: None }
    }
}

impl Config {
    /// libp2p's AutoNAT v1 configuration.
    pub fn autonat_config(&self) -> libp2p::autonat::Config {
        let interval = self.autonat_interval.max(Duration::from_millis(100));
        libp2p::autonat::Config {
            boot_delay: interval.min(Duration::from_secs(15)),
            retry_interval: interval,
            refresh_interval: interval * 10,
            throttle_server_period: interval.min(Duration::from_secs(90)),
            only_global_ips: !self.autonat_private_addresses,
            ..libp2p::autonat::Config::default()
        }
    }
}

fn is_loopback(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        _ => false,
    })
}

/// Whether an address goes through a relay (`/p2p-circuit`).
pub fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

/// Whether an address's IP is one AutoNAT may vouch for: any IP when private addresses are
/// allowed, otherwise neither private, loopback, link-local nor unspecified.
pub fn is_vouchable(addr: &Multiaddr, private_allowed: bool) -> bool {
    if private_allowed {
        return true;
    }
    addr.iter().all(|p| match p {
        Protocol::Ip4(ip) => !(ip.is_private() || ip.is_loopback() || ip.is_link_local() || ip.is_unspecified()),
        Protocol::Ip6(ip) => !(ip.is_loopback() || ip.is_unspecified() || ip.is_unique_local() || ip.is_unicast_link_local()),
        Protocol::Memory(_) => false,
        _ => true,
    })
}

/// What the relay client side of a node wants done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayAction {
    /// Reserve a slot: listen on `<relay address>/p2p/<relay>/p2p-circuit`.
    Reserve {
        /// The relay.
        relay: PeerId,
        /// Where it is reached.
        addr: Multiaddr,
    },
    /// Give a reservation up (the node turned public).
    Release(ListenerId),
}

/// One reservation asked for or held.
#[derive(Debug, Clone)]
struct Reservation {
    relay: PeerId,
    /// Whether the relay was reached over loopback (then its loopback addresses are ours too).
    loopback: bool,
    /// The `/p2p-circuit` address, once the relay accepted.
    circuit: Option<Multiaddr>,
}

/// The relay client's decisions, without I/O: which relays are known, which hold a
/// reservation, which refused recently. Driven by the event loop.
#[derive(Debug, Default)]
pub struct RelayPlan {
    reachability: Reachability,
    /// Connected peers that serve as relays, with an address to reach each.
    relays: HashMap<PeerId, Multiaddr>,
    reservations: HashMap<ListenerId, Reservation>,
    /// Relays that refused or dropped a reservation, left alone until then.
    backoff: HashMap<PeerId, Instant>,
    /// Why the last reservation failed, for `kubelt status`.
    last_error: Option<String>,
}

impl RelayPlan {
    /// The verdict the plan works from.
    pub fn reachability(&self) -> Reachability {
        self.reachability
    }

    /// A new verdict: a private node reserves slots, a public one gives them up.
    pub fn set_reachability(&mut self, reachability: Reachability, now: Instant) -> Vec<RelayAction> {
        self.reachability = reachability;
        match reachability {
            Reachability::Public => self.reservations.keys().map(|id| RelayAction::Release(*id)).collect(),
            Reachability::Private => self.plan(now),
            Reachability::Unknown => vec![],
        }
    }

    /// A connected peer serves as a relay, reachable at `addr`.
    pub fn relay_found(&mut self, relay: PeerId, addr: Multiaddr, now: Instant) -> Vec<RelayAction> {
        self.relays.insert(relay, addr);
        self.plan(now)
    }

    /// The last connection to `peer` closed.
    pub fn peer_gone(&mut self, peer: &PeerId) {
        self.relays.remove(peer);
    }

    /// The swarm accepted the listener for a reservation asked for by [`RelayAction::Reserve`]
    /// at `addr`.
    pub fn reserving(&mut self, listener: ListenerId, relay: PeerId, addr: &Multiaddr) {
        self.reservations.insert(listener, Reservation { relay, loopback: is_loopback(addr), circuit: None });
    }

    /// The relay accepted: `addr` is this node's address through it. `None` for a listener that
    /// is not a reservation; `Some(false)` for an address not worth announcing (the relay's
    /// loopback address, when it is reached over a network).
    pub fn reserved(&mut self, listener: ListenerId, addr: Multiaddr) -> Option<bool> {
        let r = self.reservations.get_mut(&listener)?;
        if is_loopback(&addr) && !r.loopback {
            return Some(false);
        }
        r.circuit = Some(addr);
        Some(true)
    }

    /// A reservation's listener closed (refused, relay gone, or released); with `error`, the
    /// relay is left alone for [`RELAY_RETRY_AFTER`]. Returns the relay it was on.
    pub fn closed(&mut self, listener: ListenerId, error: Option<String>, now: Instant) -> Option<PeerId> {
        let reservation = self.reservations.remove(&listener)?;
        if let Some(error) = error {
            self.backoff.insert(reservation.relay, now + RELAY_RETRY_AFTER);
            self.last_error = Some(format!("relay {}: {error}", reservation.relay));
        }
        Some(reservation.relay)
    }

    /// What to do now (called by the maintenance tick too, so refused relays are retried).
    pub fn plan(&mut self, now: Instant) -> Vec<RelayAction> {
        self.backoff.retain(|_, until| *until > now);
        if self.reachability != Reachability::Private {
            return vec![];
        }
        let held: HashSet<PeerId> = self.reservations.values().map(|r| r.relay).collect();
        let mut candidates: Vec<(&PeerId, &Multiaddr)> =
            self.relays.iter().filter(|(peer, _)| !held.contains(peer) && !self.backoff.contains_key(peer)).collect();
        candidates.sort_by_key(|(peer, _)| peer.to_bytes());
        candidates
            .into_iter()
            .take(MAX_RESERVATIONS.saturating_sub(held.len()))
            .map(|(relay, addr)| RelayAction::Reserve { relay: *relay, addr: addr.clone() })
            .collect()
    }

    /// Whether `listener` is a reservation.
    pub fn is_reservation(&self, listener: &ListenerId) -> bool {
        self.reservations.contains_key(listener)
    }

    /// The `/p2p-circuit` addresses of accepted reservations.
    pub fn circuit_addresses(&self) -> Vec<Multiaddr> {
        let mut addrs: Vec<Multiaddr> = self.reservations.values().filter_map(|r| r.circuit.clone()).collect();
        addrs.sort();
        addrs
    }

    /// Why the last reservation failed, if one did.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }
}

/// The limits a relay announced for the circuits through it (in reservations and circuits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CircuitLimit {
    /// How long a circuit may stay open.
    pub duration: Option<Duration>,
    /// Bytes a circuit may carry (both directions together).
    pub bytes: Option<u64>,
}

/// Why a relay server ended a circuit, from the error libp2p's relay reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitEnd {
    /// It carried more than `max_circuit_bytes`.
    ByteLimit,
    /// It was open for `max_circuit_duration`.
    TimeLimit,
    /// Closed by one side, or failed.
    Other,
}

impl CircuitEnd {
    /// libp2p-relay 0.22 ends a circuit at its byte limit with an `Other` error saying "Max
    /// circuit bytes reached." and at its time limit with `TimedOut` (`copy_future.rs`).
    pub fn of(error: Option<&std::io::Error>) -> CircuitEnd {
        match error {
            Some(e) if e.kind() == std::io::ErrorKind::TimedOut => CircuitEnd::TimeLimit,
            Some(e) if e.to_string().contains("Max circuit bytes") => CircuitEnd::ByteLimit,
            _ => CircuitEnd::Other,
        }
    }
}

/// The relay in a `/p2p-circuit` address: the peer id just before `/p2p-circuit`.
pub fn relay_of(addr: &Multiaddr) -> Option<PeerId> {
    let mut relay = None;
    for p in addr.iter() {
        match p {
            Protocol::P2p(peer) => relay = Some(peer),
            Protocol::P2pCircuit => return relay,
            _ => {}
        }
    }
    None
}

/// What a node at home is told when a relay closes a relayed connection that it did not close
/// itself and that was its only connection to `peer`. The relay does not say why; its
/// announced limits and the connection's age do: open as long as the time limit, it was that;
/// shorter, it was the byte limit, or the relay or the peer going away.
pub fn describe_relay_cut(peer: &PeerId, relay: &PeerId, lived: Duration, limit: Option<CircuitLimit>) -> String {
    let secs = lived.as_secs_f64();
    let head = format!("the relayed connection to {peer} through {relay} was closed after {secs:.1} s");
    let Some(limit) = limit else {
        return format!("{head} (the relay announced no limits): the relay or the peer went away");
    };
    let bytes = limit.bytes.map(human_bytes);
    let duration = limit.duration.map(|d| format!("{} s", d.as_secs()));
    let limits = [bytes.clone(), duration.clone()].into_iter().flatten().collect::<Vec<_>>().join(" and ");
    let reached_time = limit.duration.is_some_and(|d| lived + Duration::from_millis(500) >= d);
    let why = if reached_time {
        format!("the relay's time limit of {} per circuit", duration.unwrap_or_default())
    } else if let Some(bytes) = bytes {
        format!("most likely the relay's limit of {bytes} per circuit (or the relay or the peer went away)")
    } else {
        "the relay or the peer went away".to_string()
    };
    format!(
        "{head}: {why}. A relay ({limits} per circuit) carries core changes and small messages, \
         never content; large transfers wait for a direct connection (hole punching)"
    )
}

fn human_bytes(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes & ((1 << 20) - 1) == 0 {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes & ((1 << 10) - 1) == 0 {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} bytes")
    }
}

/// The address to reserve on `relay` through, reached at `addr`: `<addr>/p2p/<relay>/p2p-circuit`.
pub fn circuit_listen_address(relay: PeerId, addr: &Multiaddr) -> Multiaddr {
    let mut addr = addr.clone();
    if matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
        addr.pop();
    }
    addr.with(Protocol::P2p(relay)).with(Protocol::P2pCircuit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay_addr(i: u8) -> Multiaddr {
        format!("/ip4/192.0.2.{i}/tcp/4420").parse().unwrap()
    }

    #[test]
    fn a_private_node_reserves_on_at_most_two_relays_and_a_public_one_releases_them() {
        let now = Instant::now();
        let mut plan = RelayPlan::default();
        let relays: Vec<PeerId> = (0..3).map(|_| PeerId::random()).collect();
        for (i, relay) in relays.iter().enumerate() {
            assert!(plan.relay_found(*relay, relay_addr(i as u8), now).is_empty(), "no reservation before the verdict");
        }
        let actions = plan.set_reachability(Reachability::Private, now);
        assert_eq!(actions.len(), MAX_RESERVATIONS);
        for (i, action) in actions.iter().enumerate() {
            let RelayAction::Reserve { relay, .. } = action else { panic!("{action:?}") };
            plan.reserving(ListenerId::next(), *relay, &relay_addr(i as u8));
            assert!(i < MAX_RESERVATIONS);
        }
        assert!(plan.plan(now).is_empty(), "two reservations are enough");
        let released = plan.set_reachability(Reachability::Public, now);
        assert_eq!(released.len(), MAX_RESERVATIONS);
        assert!(released.iter().all(|a| matches!(a, RelayAction::Release(_))));
    }

    #[test]
    fn a_relay_that_refused_is_left_alone_for_a_while() {
        let now = Instant::now();
        let mut plan = RelayPlan::default();
        let relay = PeerId::random();
        plan.set_reachability(Reachability::Private, now);
        let actions = plan.relay_found(relay, relay_addr(1), now);
        assert_eq!(actions, vec![RelayAction::Reserve { relay, addr: relay_addr(1) }]);
        let listener = ListenerId::next();
        plan.reserving(listener, relay, &relay_addr(1));
        assert_eq!(plan.closed(listener, Some("reservation refused".into()), now), Some(relay));
        assert!(plan.last_error().is_some_and(|e| e.contains("refused")));
        assert!(plan.plan(now + Duration::from_secs(1)).is_empty());
        assert_eq!(plan.plan(now + RELAY_RETRY_AFTER + Duration::from_secs(1)).len(), 1);
    }

    #[test]
    fn circuit_addresses_are_listed_once_accepted() {
        let now = Instant::now();
        let mut plan = RelayPlan::default();
        let relay = PeerId::random();
        plan.set_reachability(Reachability::Private, now);
        plan.relay_found(relay, relay_addr(1), now);
        let listener = ListenerId::next();
        plan.reserving(listener, relay, &relay_addr(1));
        assert!(plan.circuit_addresses().is_empty());
        let circuit = circuit_listen_address(relay, &relay_addr(1));
        assert_eq!(plan.reserved(listener, circuit.clone()), Some(true));
        let loopback = circuit_listen_address(relay, &"/ip4/127.0.0.1/tcp/4420".parse().unwrap());
        assert_eq!(plan.reserved(listener, loopback), Some(false), "the relay's loopback address is no use to others");
        assert_eq!(plan.reserved(ListenerId::next(), circuit.clone()), None);
        assert_eq!(plan.circuit_addresses(), vec![circuit.clone()]);
        assert!(is_relayed(&circuit));
        assert!(!is_relayed(&relay_addr(1)));
    }

    #[test]
    fn a_relay_cut_names_the_limit_it_most_likely_hit() {
        let (peer, relay) = (PeerId::random(), PeerId::random());
        let limit = CircuitLimit { duration: Some(Duration::from_secs(10)), bytes: Some(64 << 10) };
        let at_time = describe_relay_cut(&peer, &relay, Duration::from_secs_f64(9.8), Some(limit));
        assert!(at_time.contains("time limit of 10 s per circuit"), "{at_time}");
        let early = describe_relay_cut(&peer, &relay, Duration::from_secs(2), Some(limit));
        assert!(early.contains("limit of 64 KiB per circuit"), "{early}");
        assert!(early.contains("never content"), "{early}");
        assert!(describe_relay_cut(&peer, &relay, Duration::from_secs(2), None).contains("no limits"));
        assert_eq!(human_bytes(1 << 20), "1 MiB");
        assert_eq!(human_bytes(1000), "1000 bytes");
    }

    #[test]
    fn the_relay_of_a_circuit_address_is_the_peer_before_p2p_circuit() {
        let (relay, peer) = (PeerId::random(), PeerId::random());
        let addr = circuit_listen_address(relay, &relay_addr(1)).with(Protocol::P2p(peer));
        assert_eq!(relay_of(&addr), Some(relay));
        assert_eq!(relay_of(&relay_addr(1).with(Protocol::P2p(peer))), None);
    }

    #[test]
    fn a_circuit_end_is_read_from_the_relay_s_error() {
        let bytes = std::io::Error::other("Max circuit bytes reached.");
        assert_eq!(CircuitEnd::of(Some(&bytes)), CircuitEnd::ByteLimit);
        assert_eq!(CircuitEnd::of(Some(&std::io::ErrorKind::TimedOut.into())), CircuitEnd::TimeLimit);
        assert_eq!(CircuitEnd::of(Some(&std::io::ErrorKind::BrokenPipe.into())), CircuitEnd::Other);
        assert_eq!(CircuitEnd::of(None), CircuitEnd::Other);
    }

    #[test]
    fn only_public_ips_are_vouched_for_unless_private_ones_are_allowed() {
        let private: Multiaddr = "/ip4/10.1.2.3/tcp/1".parse().unwrap();
        let loopback: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().unwrap();
        let public: Multiaddr = "/ip4/1.2.3.4/tcp/1".parse().unwrap();
        assert!(!is_vouchable(&private, false));
        assert!(!is_vouchable(&loopback, false));
        assert!(is_vouchable(&public, false));
        assert!(is_vouchable(&private, true));
    }
}
