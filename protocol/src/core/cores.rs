//! The registry of every core this node replicates, and which of them are in memory.
//!
//! A node may hold many more cores than it uses at once (a hosted node: one per wallet that
//! ever signed in). Every held core is recorded in the store (`m/<core>`), and that list is all
//! that is read at start. A replica — the Automerge document and the history indexes — is
//! loaded from the store the first time something needs it and unloaded, least recently used
//! first, once more than [`Config::max_loaded_cores`] replicas or
//! [`Config::max_loaded_bytes`] (estimated) are in memory. Nothing is lost by unloading:
//! everything a replica accepted is in the store before the call that accepted it returns,
//! including the facts safety needs (delegations, revocations, equivocation proofs), and a
//! loaded replica re-derives every verdict from them. A replica with state that is not in the
//! store (a catch-up session in progress, changes held back for missing dependencies) is not
//! unloaded.

use std::collections::{BTreeSet, HashMap};

use kubelt_proto::core::{OwnerStatement, SignedChange, SyncRequest, SyncResponse};
use libp2p::identity::PeerId;

use super::address::Address;
use super::change::{Checked, Delegations, Rejected};
use super::delegation::{Delegation, DelegationError, Revocation};
use super::replica::{Accepted, ApplyError, BatchReport, Config, CoreError, Replica};
use super::sync::SyncStep;
use crate::store::{Column, Store};

/// Every core this node holds; the replicas in use are in memory. One owner (the node's event
/// loop) drives it; it does no I/O but the store's.
#[derive(Debug)]
pub struct Cores {
    store: Store,
    config: Config,
    /// Every core held (recorded in the store), loaded or not.
    held: BTreeSet<Address>,
    /// The replicas in memory, with the use counter of their last use.
    loaded: HashMap<Address, Loaded>,
    /// Counts uses, to find the least recently used replica.
    uses: u64,
    /// Delegations verified once for every replica and verification thread.
    delegations: Delegations,
    /// What loading and unloading did so far.
    stats: LoadStats,
}

#[derive(Debug)]
struct Loaded {
    replica: Replica,
    last_use: u64,
}

/// Counters of on-demand loading (for the logs, metrics and benchmarks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LoadStats {
    /// Replicas loaded from the store.
    pub loads: u64,
    /// Replicas unloaded to stay within the limits.
    pub unloads: u64,
}

impl Cores {
    /// Lists every core recorded in the store; replicas are loaded when first used.
    pub fn load(store: Store, config: Config) -> Result<Cores, CoreError> {
        let mut held = BTreeSet::new();
        for entry in store.iter_prefix(Column::Cores, b"m/") {
            let (key, _) = entry?;
            let text = String::from_utf8_lossy(&key[2..]).into_owned();
            let address = Address::parse(&text).map_err(|e| CoreError::Corrupt { key: format!("m/{text}"), reason: e.to_string() })?;
            held.insert(address);
        }
        tracing::info!(cores = held.len(), "cores held (loaded on demand)");
        Ok(Cores { store, config, held, loaded: HashMap::new(), uses: 0, delegations: Delegations::default(), stats: LoadStats::default() })
    }

    /// Holds `core` (creating an empty replica if new), without write rights unless a
    /// delegation was set before.
    pub fn follow(&mut self, core: Address) -> Result<&mut Replica, CoreError> {
        if self.held.insert(core) {
            // Opening a new replica records it in the store; until then it is not held.
            if let Err(e) = self.replica(&core) {
                self.held.remove(&core);
                return Err(e);
            }
        }
        self.replica(&core)?.ok_or(CoreError::UnknownCore(core))
    }

    /// Holds the core a delegation is for and records the delegation as this node's own.
    pub fn own(&mut self, delegation: OwnerStatement) -> Result<&mut Replica, CoreError> {
        let verified = Delegation::verify(&delegation)?;
        let replica = self.follow(verified.owner)?;
        replica.set_own_delegation(Some(delegation))?;
        Ok(replica)
    }

    /// The cores held, in address order (loaded or not).
    pub fn list(&self) -> Vec<Address> {
        self.held.iter().copied().collect()
    }

    /// How many cores are held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether no core is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Whether `core` is held (loaded or not).
    pub fn holds(&self, core: &Address) -> bool {
        self.held.contains(core)
    }

    /// The replica of a held core, loaded from the store if it is not in memory; `None` when
    /// the core is not held.
    pub fn replica(&mut self, core: &Address) -> Result<Option<&mut Replica>, CoreError> {
        if !self.held.contains(core) {
            return Ok(None);
        }
        self.uses += 1;
        let uses = self.uses;
        if !self.loaded.contains_key(core) {
            let started = std::time::Instant::now();
            let replica = Replica::open(self.store.clone(), *core, self.config.clone(), self.delegations.clone())?;
            tracing::debug!(%core, changes = replica.len(), elapsed = ?started.elapsed(), "core loaded");
            self.stats.loads += 1;
            self.loaded.insert(*core, Loaded { replica, last_use: uses });
            self.unload_beyond_limits(core);
        }
        Ok(self.loaded.get_mut(core).map(|l| {
            l.last_use = uses;
            &mut l.replica
        }))
    }

    /// Unloads the least recently used replicas (never `keep`, never a busy one) until the
    /// loaded ones fit the limits.
    fn unload_beyond_limits(&mut self, keep: &Address) {
        let (max_count, max_bytes) = (self.config.max_loaded_cores.max(1), self.config.max_loaded_bytes);
        let mut bytes: usize = self.loaded.values().map(|l| l.replica.approx_bytes()).sum();
        while self.loaded.len() > max_count || bytes > max_bytes {
            let victim = self
                .loaded
                .iter()
                .filter(|(a, l)| *a != keep && !l.replica.is_busy())
                .min_by_key(|(_, l)| l.last_use)
                .map(|(a, _)| *a);
            let Some(victim) = victim else { break };
            if let Some(gone) = self.loaded.remove(&victim) {
                bytes = bytes.saturating_sub(gone.replica.approx_bytes());
                self.stats.unloads += 1;
                tracing::debug!(core = %victim, "core unloaded (least recently used)");
            }
        }
    }

    /// One replica, loaded on demand; `None` when not held or when it cannot be loaded (the
    /// error is logged; use [`Cores::replica`] to see it).
    pub fn get_mut(&mut self, core: &Address) -> Option<&mut Replica> {
        match self.replica(core) {
            Ok(replica) => replica,
            Err(e) => {
                tracing::error!(%core, "cannot load the core: {e}");
                None
            }
        }
    }

    /// One replica if it is in memory (never loads).
    pub fn get_loaded(&self, core: &Address) -> Option<&Replica> {
        self.loaded.get(core).map(|l| &l.replica)
    }

    /// The cores whose replicas are in memory, in address order.
    pub fn loaded(&self) -> Vec<Address> {
        let mut cores: Vec<Address> = self.loaded.keys().copied().collect();
        cores.sort();
        cores
    }

    /// Every replica in memory.
    pub fn iter_loaded(&self) -> impl Iterator<Item = &Replica> {
        self.loaded.values().map(|l| &l.replica)
    }

    /// The revocations known for a held core: from the replica when it is in memory, else
    /// straight from the store (`<core>/r/`), without loading the document. Empty for a core
    /// not held.
    pub fn revocations(&self, core: &Address) -> Result<Vec<Revocation>, CoreError> {
        if let Some(loaded) = self.loaded.get(core) {
            return Ok(loaded.replica.revocations());
        }
        if !self.held.contains(core) {
            return Ok(Vec::new());
        }
        let prefix = super::replica::core_key(core, b'r', b"");
        let mut out = Vec::new();
        for entry in self.store.iter_prefix(Column::Cores, &prefix) {
            let (key, value) = entry?;
            let corrupt = |reason: String| CoreError::Corrupt { key: String::from_utf8_lossy(&key).into_owned(), reason };
            let statement = <OwnerStatement as prost::Message>::decode(&value[..]).map_err(|e| corrupt(e.to_string()))?;
            out.push(Revocation::verify(&statement).map_err(|e| corrupt(e.to_string()))?);
        }
        Ok(out)
    }

    /// What loading and unloading did so far.
    pub fn load_stats(&self) -> LoadStats {
        self.stats
    }

    fn route(&mut self, core: &str) -> Result<&mut Replica, Rejected> {
        let address = wire_core(core)?;
        self.get_mut(&address).ok_or_else(|| Rejected::UnknownCore(core.to_owned()))
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
        let replica = self
            .replica(&verified.core)?
            .ok_or_else(|| ApplyError::Rejected(Rejected::UnknownCore(verified.core.to_lower_hex())))?;
        let checked = verified.checked.map_err(ApplyError::Rejected)?;
        let report = replica.apply_checked(vec![Ok(checked)])?;
        super::replica::outcome(report)
    }

    /// Starts or continues a catch-up session for `core` with `peer`.
    pub fn sync_request(&mut self, core: &Address, peer: &PeerId) -> Option<SyncRequest> {
        self.get_mut(core)?.sync_request(peer)
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
        match self.get_mut(&batch.core) {
            Some(replica) => replica.handle_checked_sync_request(request, batch.checked, peer),
            None => {
                let error = Rejected::UnknownCore(batch.core.to_lower_hex()).to_string();
                (SyncResponse { core: request.core, error, ..Default::default() }, BatchReport::default())
            }
        }
    }

    /// Takes a catch-up response whose envelopes a [`Verifier`] checked.
    pub fn handle_verified_sync_response(&mut self, response: SyncResponse, batch: VerifiedBatch, peer: &PeerId) -> SyncStep {
        match self.get_mut(&batch.core) {
            Some(replica) => replica.handle_checked_sync_response(response, batch.checked, peer),
            None => SyncStep { error: Some(Rejected::UnknownCore(batch.core.to_lower_hex()).to_string()), ..Default::default() },
        }
    }

    /// Forgets every session with `peer` (disconnected). Sessions live only in loaded
    /// replicas.
    pub fn end_sync(&mut self, peer: &PeerId) {
        for loaded in self.loaded.values_mut() {
            loaded.replica.end_sync(peer);
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
