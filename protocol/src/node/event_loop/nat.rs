//! The event loop's NAT part: AutoNAT verdicts and the DHT mode that follows them, relay
//! reservations of a private node, the relay server's counters, and hole punching (see
//! [`crate::nat`] for the protocols and the choices).

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use libp2p::core::transport::ListenerId;
use libp2p::{autonat, dcutr, kad, relay, Multiaddr, PeerId};
use super::EventLoop;
use crate::node::client::{NatStatus, RelayServerStatus};
use crate::nat::{self, CircuitEnd, CircuitLimit, Reachability, RelayAction, RelayPlan};
use crate::swarm::DhtMode;

/// The event loop's NAT state.
#[derive(Default)]
pub(super) struct NatState {
    plan: RelayPlan,
    /// Addresses confirmed by AutoNAT (v1's public address, v2's tested ones).
    confirmed: BTreeSet<Multiaddr>,
    relay_server: Option<RelayServerStatus>,
    punched: u64,
    punch_failed: u64,
    /// The circuit limits each relay announced (relays this node reserved or dialed through,
    /// or was reached through), to explain a relayed connection the relay closed.
    circuit_limits: HashMap<PeerId, CircuitLimit>,
    /// Relayed connections closed under this node (by the relay, at its limits) since start.
    relay_cuts: u64,
    /// What the last one was, for `kubelt status`.
    last_relay_cut: Option<String>,
}

impl NatState {
    pub(super) fn new(relay_server: bool) -> Self {
        NatState { relay_server: relay_server.then(RelayServerStatus::default), ..NatState::default() }
    }
}

impl EventLoop {
    pub(super) fn nat_status(&self) -> NatStatus {
        NatStatus {
            reachability: self.nat.plan.reachability(),
            external_addresses: self.nat.confirmed.iter().map(|a| a.to_string()).collect(),
            relay_addresses: self.nat.plan.circuit_addresses().iter().map(|a| a.to_string()).collect(),
            relay_error: self.nat.plan.last_error().map(str::to_owned),
            relay_server: self.nat.relay_server.clone(),
            hole_punches_succeeded: self.nat.punched,
            hole_punches_failed: self.nat.punch_failed,
            relayed_connections_cut: self.nat.relay_cuts,
            last_relay_cut: self.nat.last_relay_cut.clone(),
        }
    }

    pub(super) fn on_autonat_event(&mut self, event: autonat::Event) {
        match event {
            autonat::Event::StatusChanged { old, new } => {
                let verdict = match &new {
                    autonat::NatStatus::Public(_) => Reachability::Public,
                    autonat::NatStatus::Private => Reachability::Private,
                    autonat::NatStatus::Unknown => Reachability::Unknown,
                };
                tracing::info!(?old, ?new, "AutoNAT: this node is {}", verdict.as_str());
                if let autonat::NatStatus::Public(addr) = new {
                    self.confirm_address(addr);
                }
                self.apply_dht_mode(verdict);
                let actions = self.nat.plan.set_reachability(verdict, Instant::now());
                self.run_relay_actions(actions);
            }
            autonat::Event::OutboundProbe(event) => tracing::debug!(?event, "AutoNAT probe"),
            autonat::Event::InboundProbe(event) => tracing::debug!(?event, "AutoNAT dial-back request"),
        }
    }

    pub(super) fn on_autonat_v2_event(&mut self, event: autonat::v2::client::Event) {
        match event.result {
            Ok(()) => {
                tracing::info!(addr = %event.tested_addr, server = %event.server, "AutoNAT v2 confirmed an external address");
                self.confirm_address(event.tested_addr);
            }
            Err(e) => tracing::debug!(addr = %event.tested_addr, server = %event.server, "AutoNAT v2: not reachable: {e}"),
        }
    }

    /// Records an address AutoNAT dialed back (unless it is private and only public ones
    /// count here).
    fn confirm_address(&mut self, addr: Multiaddr) {
        if !nat::is_relayed(&addr) && nat::is_vouchable(&addr, self.config.swarm.nat.autonat_private_addresses) {
            self.nat.confirmed.insert(addr);
        }
    }

    /// `dht_mode = "auto"`: client while private, server otherwise.
    fn apply_dht_mode(&mut self, verdict: Reachability) {
        if self.config.swarm.dht_mode != DhtMode::Auto {
            return;
        }
        let mode = if verdict == Reachability::Private { kad::Mode::Client } else { kad::Mode::Server };
        let kad = &mut self.swarm.behaviour_mut().kad;
        if kad.mode() != mode {
            tracing::info!("DHT mode follows AutoNAT: {mode}");
            kad.set_mode(Some(mode));
        }
    }

    /// A connected peer announced the relay (hop) protocol: a private node may reserve there.
    pub(super) fn on_relay_found(&mut self, relay: PeerId, addr: Multiaddr) {
        let actions = self.nat.plan.relay_found(relay, addr, Instant::now());
        self.run_relay_actions(actions);
    }

    /// The maintenance tick: retries reservations refused a while ago.
    pub(super) fn maintain_reservations(&mut self) {
        let actions = self.nat.plan.plan(Instant::now());
        self.run_relay_actions(actions);
    }

    pub(super) fn nat_peer_gone(&mut self, peer: &PeerId) {
        self.nat.plan.peer_gone(peer);
    }

    fn run_relay_actions(&mut self, actions: Vec<RelayAction>) {
        for action in actions {
            match action {
                RelayAction::Reserve { relay, addr } => {
                    let listen = nat::circuit_listen_address(relay, &addr);
                    match self.swarm.listen_on(listen.clone()) {
                        Ok(listener) => {
                            tracing::info!(%relay, "asking for a relay reservation at {listen}");
                            self.nat.plan.reserving(listener, relay, &addr);
                        }
                        Err(e) => tracing::warn!(%relay, "cannot reserve at {listen}: {e}"),
                    }
                }
                RelayAction::Release(listener) => {
                    tracing::info!("public now: giving a relay reservation up");
                    self.swarm.remove_listener(listener);
                }
            }
        }
    }

    /// A listener reported an address: a relay accepted a reservation when it is one of ours.
    /// `None`: not a reservation; `Some(announce)`: whether to announce the address.
    pub(super) fn on_reservation_addr(&mut self, listener: ListenerId, address: &Multiaddr) -> Option<bool> {
        if !self.nat.plan.reserved(listener, address.clone())? {
            return Some(false);
        }
        tracing::info!("relay reservation accepted: reachable at {address}");
        // Provider records carry the addresses of the moment: publish the cores' again so that
        // they name the circuit address too.
        for core in self.cores.replicas.list() {
            self.provide(kad::RecordKey::new(&core.dht_key()));
        }
        Some(true)
    }

    /// A listener closed: a reservation that ended (refused, relay gone, given up).
    pub(super) fn on_listener_closed(&mut self, listener: ListenerId, error: Option<String>) {
        let now = Instant::now();
        if let Some(relay) = self.nat.plan.closed(listener, error.clone(), now) {
            match error {
                Some(e) => tracing::warn!(%relay, "relay reservation failed: {e}"),
                None => tracing::info!(%relay, "relay reservation ended"),
            }
            self.maintain_reservations();
        }
    }

    pub(super) fn on_relay_server_event(&mut self, event: relay::Event) {
        let Some(status) = self.nat.relay_server.as_mut() else { return };
        match event {
            relay::Event::ReservationReqAccepted { src_peer_id, renewed } => {
                if !renewed {
                    status.reservations += 1;
                }
                tracing::info!(peer = %src_peer_id, renewed, "relay: reservation accepted");
            }
            relay::Event::ReservationReqDenied { src_peer_id, status: code } => {
                status.reservations_denied += 1;
                tracing::info!(peer = %src_peer_id, "relay: reservation refused ({code:?})");
            }
            relay::Event::ReservationClosed { src_peer_id } | relay::Event::ReservationTimedOut { src_peer_id } => {
                status.reservations = status.reservations.saturating_sub(1);
                tracing::debug!(peer = %src_peer_id, "relay: reservation ended");
            }
            relay::Event::CircuitReqAccepted { src_peer_id, dst_peer_id } => {
                status.circuits += 1;
                tracing::info!(src = %src_peer_id, dst = %dst_peer_id, "relay: circuit opened");
            }
            relay::Event::CircuitReqDenied { src_peer_id, dst_peer_id, status: code } => {
                status.circuits_denied += 1;
                tracing::info!(src = %src_peer_id, dst = %dst_peer_id, "relay: circuit refused ({code:?})");
            }
            relay::Event::CircuitClosed { src_peer_id, dst_peer_id, error } => {
                status.circuits = status.circuits.saturating_sub(1);
                match CircuitEnd::of(error.as_ref()) {
                    CircuitEnd::ByteLimit => {
                        status.circuits_closed_at_byte_limit += 1;
                        tracing::info!(src = %src_peer_id, dst = %dst_peer_id, "relay: circuit closed at its byte limit");
                    }
                    CircuitEnd::TimeLimit => {
                        status.circuits_closed_at_time_limit += 1;
                        tracing::info!(src = %src_peer_id, dst = %dst_peer_id, "relay: circuit closed at its time limit");
                    }
                    CircuitEnd::Other => tracing::info!(src = %src_peer_id, dst = %dst_peer_id, "relay: circuit closed ({error:?})"),
                }
            }
            other => tracing::debug!(?other, "relay server"),
        }
    }

    pub(super) fn on_relay_client_event(&mut self, event: relay::client::Event) {
        tracing::debug!(?event, "relay client");
        // The relay says its limits when it accepts a reservation (ours, as the destination of
        // circuits) and in every circuit (as their source). The inbound event names the source,
        // not the relay: the reservations' limits stand for those.
        let (relay, limit) = match &event {
            relay::client::Event::ReservationReqAccepted { relay_peer_id, limit, .. }
            | relay::client::Event::OutboundCircuitEstablished { relay_peer_id, limit } => (*relay_peer_id, limit),
            relay::client::Event::InboundCircuitEstablished { .. } => return,
        };
        if let Some(limit) = limit {
            self.nat.circuit_limits.insert(relay, CircuitLimit { duration: limit.duration(), bytes: limit.data_in_bytes() });
        }
    }

    /// A relayed connection to `peer` closed under this node (an error, not our close) and the
    /// peer has no direct connection left: most likely the relay ended the circuit at its
    /// limits. Said in the log and in `kubelt status`.
    pub(super) fn on_relayed_connection_cut(&mut self, peer: PeerId, relay: PeerId, lived: Duration, error: &str) {
        let text = nat::describe_relay_cut(&peer, &relay, lived, self.nat.circuit_limits.get(&relay).copied());
        tracing::info!(%peer, %relay, "{text} ({error})");
        self.nat.relay_cuts += 1;
        self.nat.last_relay_cut = Some(text);
    }

    pub(super) fn on_dcutr_event(&mut self, event: dcutr::Event) {
        match event.result {
            Ok(connection) => {
                self.nat.punched += 1;
                tracing::info!(peer = %event.remote_peer_id, ?connection, "hole punching: direct connection");
            }
            Err(e) => {
                self.nat.punch_failed += 1;
                tracing::info!(peer = %event.remote_peer_id, "hole punching failed: {e}");
            }
        }
    }

    /// Peers with a direct connection up for the handover pause: their relayed connections
    /// are closed, so that core sync, gossip and bitswap run over the direct one (and the
    /// relay's limits are freed). A catch-up request in flight on a closed connection fails
    /// and is retried over the direct one (see `core/catch_up.rs`).
    pub(super) fn tick_relay_handovers(&mut self, now: Instant) {
        if !self.net.has_handovers() {
            return;
        }
        for (peer, relayed) in self.net.due_handovers(now) {
            for connection in relayed {
                tracing::info!(%peer, "direct connection up: closing the relayed one");
                self.swarm.close_connection(connection);
            }
        }
    }
}
