//! The registry of every core this node replicates.

use std::collections::BTreeMap;

use kubelt_proto::core::{OwnerStatement, SignedChange, SyncRequest, SyncResponse};
use libp2p::identity::PeerId;

use super::address::Address;
use super::change::{Checked, Delegations, Rejected};
use super::delegation::{Delegation, DelegationError};
use super::replica::{Accepted, ApplyError, BatchReport, Config, CoreError, Replica};
use super::sync::SyncStep;
use crate::store::{Column, Store};

/// Every core this node holds, loaded from the store at start. One owner (the node's event
/// loop) drives it; it does no I/O but the store's.
#[derive(Debug)]
pub struct Cores {
    store: Store,
    config: Config,
    replicas: BTreeMap<Address, Replica>,
    /// Delegations verified once for every replica and verification thread.
    delegations: Delegations,
}

impl Cores {
    /// Loads every core recorded in the store.
    pub fn load(store: Store, config: Config) -> Result<Cores, CoreError> {
        let mut addresses = Vec::new();
        for entry in store.iter_prefix(Column::Cores, b"m/") {
            let (key, _) = entry?;
            let text = String::from_utf8_lossy(&key[2..]).into_owned();
            let address = Address::parse(&text).map_err(|e| CoreError::Corrupt { key: format!("m/{text}"), reason: e.to_string() })?;
            addresses.push(address);
        }
        let mut replicas = BTreeMap::new();
        let delegations = Delegations::default();
        for address in addresses {
            let started = std::time::Instant::now();
            let replica = Replica::open(store.clone(), address, config.clone(), delegations.clone())?;
            tracing::info!(core = %address, changes = replica.len(), elapsed = ?started.elapsed(), "core loaded");
            replicas.insert(address, replica);
        }
        Ok(Cores { store, config, replicas, delegations })
    }

    /// Holds `core` (creating an empty replica if new), without write rights unless a
    /// delegation was set before.
    pub fn follow(&mut self, core: Address) -> Result<&mut Replica, CoreError> {
        if !self.replicas.contains_key(&core) {
            let replica = Replica::open(self.store.clone(), core, self.config.clone(), self.delegations.clone())?;
            self.replicas.insert(core, replica);
        }
        self.replicas.get_mut(&core).ok_or(CoreError::UnknownCore(core))
    }

    /// Holds the core a delegation is for and records the delegation as this node's own.
    pub fn own(&mut self, delegation: OwnerStatement) -> Result<&mut Replica, CoreError> {
        let verified = Delegation::verify(&delegation)?;
        let replica = self.follow(verified.owner)?;
        replica.set_own_delegation(Some(delegation))?;
        Ok(replica)
    }

    /// The cores held, in address order.
    pub fn list(&self) -> Vec<Address> {
        self.replicas.keys().copied().collect()
    }

    /// One replica.
    pub fn get(&self, core: &Address) -> Option<&Replica> {
        self.replicas.get(core)
    }

    /// One replica, mutable.
    pub fn get_mut(&mut self, core: &Address) -> Option<&mut Replica> {
        self.replicas.get_mut(core)
    }

    /// Every replica.
    pub fn iter(&self) -> impl Iterator<Item = &Replica> {
        self.replicas.values()
    }

    fn route(&mut self, core: &str) -> Result<&mut Replica, Rejected> {
        let address = wire_core(core)?;
        self.replicas.get_mut(&address).ok_or_else(|| Rejected::UnknownCore(core.to_owned()))
    }

    /// Verifies and applies a remote envelope to the core it names (see
    /// [`Replica::apply_remote`]).
    pub fn apply_remote(&mut self, envelope: SignedChange) -> Result<Accepted, ApplyError> {
        let replica = self.route(&envelope.core).map_err(ApplyError::Rejected)?;
        replica.apply_remote(envelope)
    }

    /// A verifier of envelopes that runs the history-free checks on any thread (signatures,
    /// delegations, bounded decoding), so the thread that owns the replicas only does the
    /// history checks ([`Cores::apply_verified`]).
    pub fn verifier(&self) -> Verifier {
        Verifier { delegations: self.delegations.clone(), config: self.config.clone() }
    }

    /// Applies an envelope that a [`Verifier`] checked (see [`Replica::apply_remote`]).
    pub fn apply_verified(&mut self, verified: Verified) -> Result<Accepted, ApplyError> {
        let replica = self.replicas.get_mut(&verified.core).ok_or_else(|| {
            ApplyError::Rejected(Rejected::UnknownCore(verified.core.to_lower_hex()))
        })?;
        let checked = verified.checked.map_err(ApplyError::Rejected)?;
        let report = replica.apply_checked(vec![Ok(checked)])?;
        super::replica::outcome(report)
    }

    /// Starts or continues a catch-up session for `core` with `peer`.
    pub fn sync_request(&mut self, core: &Address, peer: &PeerId) -> Option<SyncRequest> {
        self.replicas.get_mut(core)?.sync_request(peer)
    }

    /// Answers a catch-up request.
    pub fn handle_sync_request(&mut self, request: SyncRequest, peer: &PeerId) -> SyncResponse {
        match self.route(&request.core) {
            Ok(replica) => replica.handle_sync_request(request, peer),
            Err(e) => SyncResponse { core: request.core, error: e.to_string(), ..Default::default() },
        }
    }

    /// Takes a catch-up response; returns the next request of the session, if any.
    pub fn handle_sync_response(&mut self, response: SyncResponse, peer: &PeerId) -> SyncStep {
        match self.route(&response.core) {
            Ok(replica) => replica.handle_sync_response(response, peer),
            Err(e) => SyncStep { error: Some(e.to_string()), ..Default::default() },
        }
    }

    /// Answers a catch-up request whose envelopes a [`Verifier`] checked; also returns what
    /// the request's own envelopes did.
    pub fn handle_verified_sync_request(&mut self, request: SyncRequest, batch: VerifiedBatch, peer: &PeerId) -> (SyncResponse, BatchReport) {
        match self.replicas.get_mut(&batch.core) {
            Some(replica) => replica.handle_checked_sync_request(request, batch.checked, peer),
            None => {
                let error = Rejected::UnknownCore(batch.core.to_lower_hex()).to_string();
                (SyncResponse { core: request.core, error, ..Default::default() }, BatchReport::default())
            }
        }
    }

    /// Takes a catch-up response whose envelopes a [`Verifier`] checked.
    pub fn handle_verified_sync_response(&mut self, response: SyncResponse, batch: VerifiedBatch, peer: &PeerId) -> SyncStep {
        match self.replicas.get_mut(&batch.core) {
            Some(replica) => replica.handle_checked_sync_response(response, batch.checked, peer),
            None => SyncStep { error: Some(Rejected::UnknownCore(batch.core.to_lower_hex()).to_string()), ..Default::default() },
        }
    }

    /// Forgets every session with `peer` (disconnected).
    pub fn end_sync(&mut self, peer: &PeerId) {
        for replica in self.replicas.values_mut() {
            replica.end_sync(peer);
        }
    }

    /// Verifies a delegation statement for a core without holding it (for the CLI and API).
    pub fn verify_delegation(statement: &OwnerStatement) -> Result<Delegation, DelegationError> {
        Delegation::verify(statement)
    }
}

/// A core id as the wire carries it: the lower-case `0x` address, in that one spelling.
fn wire_core(core: &str) -> Result<Address, Rejected> {
    let address = Address::parse(core).map_err(|e| Rejected::MalformedEnvelope(format!("core {core:?}: {e}")))?;
    if address.to_lower_hex() != core {
        return Err(Rejected::MalformedEnvelope(format!("core {core:?} is not in lower-case wire form")));
    }
    Ok(address)
}

/// Runs the history-free checks of remote envelopes off the thread that owns the replicas.
#[derive(Debug, Clone)]
pub struct Verifier {
    delegations: Delegations,
    config: Config,
}

/// An envelope after the history-free checks, ready for [`Cores::apply_verified`].
#[derive(Debug)]
pub struct Verified {
    core: Address,
    checked: Result<Checked, Rejected>,
}

/// The envelopes of a catch-up message after the history-free checks.
#[derive(Debug)]
pub struct VerifiedBatch {
    core: Address,
    checked: Vec<Result<Checked, Rejected>>,
}

impl Verified {
    /// The core the envelope is for.
    pub fn core(&self) -> Address {
        self.core
    }
}

impl Verifier {
    /// Checks the envelopes of a catch-up message for `core` (the wire form of its id), with
    /// panics in dependencies caught. CPU-bound: call it from a blocking thread.
    pub fn verify_sync_batch(&self, core: &str, envelopes: Vec<SignedChange>) -> Result<VerifiedBatch, Rejected> {
        let address = wire_core(core)?;
        let delegations = &self.delegations;
        let config = &self.config;
        let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            super::replica::check_batch(&address, envelopes, delegations, config)
        }))
        .unwrap_or_else(|_| vec![Err(Rejected::MalformedChange("verification panicked".into()))]);
        Ok(VerifiedBatch { core: address, checked })
    }

    /// Checks one envelope received as `data` (a gossip message on `topic_core`'s topic):
    /// decodes the envelope, refuses one for another core than its topic's, then verifies the
    /// author's signature, the delegation and the change, with panics in dependencies caught.
    /// CPU-bound: call it from a blocking thread.
    pub fn verify_gossip(&self, topic_core: Address, data: &[u8]) -> Result<Verified, Rejected> {
        if data.len() > self.config.max_change_size + 64 * 1024 {
            return Err(Rejected::TooLarge { size: data.len(), max: self.config.max_change_size });
        }
        let envelope = std::panic::catch_unwind(|| <SignedChange as prost::Message>::decode(data))
            .map_err(|_| Rejected::MalformedEnvelope("the decoder panicked".into()))?
            .map_err(|e| Rejected::MalformedEnvelope(e.to_string()))?;
        let expected = topic_core.to_lower_hex();
        if envelope.core != expected {
            return Err(Rejected::WrongCore { expected, got: envelope.core });
        }
        let delegations = &self.delegations;
        let max = self.config.max_change_size;
        let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            super::change::check_envelope(&topic_core, envelope, delegations, max)
        }))
        .unwrap_or_else(|_| Err(Rejected::MalformedChange("verification panicked".into())));
        Ok(Verified { core: topic_core, checked })
    }
}
