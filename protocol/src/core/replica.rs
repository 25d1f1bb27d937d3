//! One replica of one core: the Automerge document, the verified history behind it, and the
//! rules that decide which changes belong to it.
//!
//! A [`Replica`] is a plain state machine: no tasks, no sockets, no clock except where a local
//! write stamps its own change. Everything it accepts is written to the [`Store`] (synced)
//! before the call that accepted it returns.
//!
//! # Validity
//!
//! A change is valid when
//! 1. its envelope passes the history-free checks ([`super::change`]): core, size, decoding,
//!    the author's signature, actor bound to the author, a delegation signed by the owner for
//!    that author;
//! 2. all its dependencies are valid (a change whose dependency is missing is *held back*, not
//!    judged);
//! 3. its sequence number is the next one of its actor in its own history, and no other change
//!    with the same actor and sequence number is known (else the author equivocated);
//! 4. its **time** — its own timestamp, raised to the latest time of its dependencies (a change
//!    cannot be older than what it builds on) and to its delegation's issue time (a key cannot
//!    write before it was authorized) — lies inside the delegation's window;
//! 5. its first operation counter (`start_op`) is one past the largest counter of its causal
//!    history, as Automerge numbers a change made on that history: operation ids are Lamport
//!    timestamps, and a change claiming a larger one would win every conflict it enters (and
//!    one near `u32::MAX` would stop the next local write);
//! 6. every object and operation it refers to is in its causal history, and every top-level key
//!    it writes is a namespace the delegation covers (the reserved `_kubelt` only for a change
//!    carrying an owner-signed revocation, and then nothing else);
//! 7. its author is not cut off: if the author's key is revoked, the change is at or before the
//!    revocation's kept sequence number of its actor (and is not a second change at a kept
//!    sequence number); otherwise, if its actor equivocated, it is before the equivocated
//!    sequence number.
//!
//! Rules 2–7 look only at the change and its causal past, plus two kinds of self-certifying
//! facts that only accumulate: owner-signed revocations and signed equivocation proofs (two
//! envelopes of one key with the same actor and sequence number). The verdict is a function of
//! the set of changes and facts seen, not of their order: every replica that has seen the same
//! changes and facts has the same valid set. A revocation's keep is **authoritative** for its
//! key: equivocation proofs about a revoked key are ignored, so a key in hostile hands cannot,
//! by equivocating after its cut, void what the owner kept or what others built on it. This is
//! the one way a fact can make changes valid again: a replica that had voided changes for an
//! equivocation of a key it then learns was revoked restores them. That is why invalidated
//! changes stay in the store (their verdicts are derived from the facts at every rebuild: with
//! vector clocks, "descends from a cut-off change of actor A" is `clock[A] > keep`), and why a
//! fact that lifts a cut clears the remembered rejections.
//!
//! Facts spread with the changes that carry them; the envelopes that taught a replica a fact
//! are kept as *evidence* — durably, never evicted — and attached to every sync exchange, so a
//! replica that joins late, or never saw the invalid carrier, still learns every fact. Only
//! owner-signed revocations and envelopes of delegated (and not revoked) keys add evidence, one
//! proof per equivocating actor.
//!
//! # Hostile input
//!
//! Envelopes are checked in an order that keeps hostile bytes away from dependencies (see
//! [`super::change`]): the author's signature over the raw bytes first, then a bounded scan of
//! the change header ([`super::bounds`]), then the owner's delegation, and only then Automerge's
//! decoder, inside `catch_unwind`. Sync messages are scanned the same way before Automerge
//! decodes them. Held-back changes are bounded by count, bytes and bytes per author; a revoked
//! key's changes past its cut are refused at once, never held.
//!
//! # Store layout (column `cores`)
//!
//! | key | value |
//! |---|---|
//! | `m/<core>` | [`CoreMeta`] JSON: this node's own delegation, if it writes the core |
//! | `<core>/c/<u64 BE>` | a change that was admitted, in admission (topological) order: [`StoredChange`] (it may be invalid under facts learned later) |
//! | `<core>/d/<statement id>` | a delegation statement (`OwnerStatement` protobuf), shared by changes |
//! | `<core>/r/<statement id>` | a known revocation statement |
//! | `<core>/k/<actor>` | an equivocating actor's last valid sequence number (u64 BE) |
//! | `<core>/e/<change hash>` | an evidence envelope (`SignedChange` protobuf) |
//!
//! `<core>` is the lower-case address.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use automerge::sync::State as SyncState;
use automerge::transaction::{CommitOptions, Transaction};
use automerge::{ActorId, Automerge, Change, ChangeHash, ReadDoc};
use kubelt_proto::core::{OwnerStatement, SignedChange};
use libp2p::identity::{Keypair, PeerId};
use prost::Message as _;
use time::OffsetDateTime;

use super::address::Address;
use super::change::{
    self, check_envelope, check_envelope_with, check_namespaces, inflate_batch, inspect, seal, AuthorKeys, Checked,
    Delegations, History, Rejected, RevocationRecord, Touched,
};
use super::delegation::{self, Delegation, DelegationError, Kept, Revocation, RESERVED_NAMESPACE};
use super::value::{self, PathError};
use crate::store::{Column, Store, StoreError};

/// Limits of a replica.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// Largest change accepted (bytes).
    pub max_change_size: usize,
    /// Changes held back for missing dependencies; the oldest are dropped beyond this.
    pub max_pending: usize,
    /// Bytes of changes held back for missing dependencies, over all authors; the oldest are
    /// dropped beyond this.
    pub max_pending_bytes: usize,
    /// Bytes of held-back changes of one author key; that author's oldest are dropped beyond
    /// this, so one key cannot crowd out the others.
    pub max_pending_bytes_per_author: usize,
    /// Rounds of one catch-up session before giving up (a peer that keeps offering changes we
    /// reject must not keep us busy forever).
    pub max_sync_rounds: u32,
    /// Peers with an open catch-up session.
    pub max_sync_sessions: usize,
    /// Changes rejected because of their history, remembered so their descendants are rejected
    /// at once instead of being held back.
    pub max_remembered_rejections: usize,
    /// Threads that verify envelope signatures of a large batch.
    pub verify_threads: usize,
    /// How far (seconds) a remote change's own timestamp may be ahead of this node's clock.
    /// Later ones are refused *for now* (not judged invalid: they are accepted once the clock
    /// catches up, e.g. by a later catch-up). This bounds how far one key can push the time of
    /// everything built on its changes, which could otherwise lock out keys whose delegations
    /// expire earlier.
    pub max_clock_skew: i64,
    /// Most envelopes in one sync message (the rest follow in the next round).
    pub max_sync_changes: usize,
    /// Most bytes of a `SyncRequest` this replica writes (at least one envelope is always
    /// sent). Keep it under the codec's request limit.
    pub max_sync_request_bytes: usize,
    /// Most bytes of a `SyncResponse` this replica writes. Keep it under the codec's
    /// response limit.
    pub max_sync_response_bytes: usize,
    /// Whether applying remote changes waits for fsync (local writes always do).
    pub sync_remote_changes: bool,
    /// Whether a local write waits for fsync itself. `false` only where the owner of the
    /// replicas syncs the write-ahead log before it acknowledges the write (the node's group
    /// commit): the write is then logged at once, readable at once, and durable after the
    /// owner's next [`crate::store::Store::sync_wal`].
    pub sync_local_writes: bool,
    /// Replicas kept in memory at once ([`super::Cores`] loads the others on demand and
    /// unloads the least recently used beyond this).
    pub max_loaded_cores: usize,
    /// Estimated bytes of the replicas kept in memory at once (see
    /// [`Replica::approx_bytes`]); the least recently used are unloaded beyond this.
    pub max_loaded_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_change_size: change::MAX_CHANGE_SIZE,
            max_pending: 20_000,
            max_pending_bytes: 64 << 20,
            max_pending_bytes_per_author: 16 << 20,
            max_sync_rounds: 32,
            max_sync_sessions: 256,
            max_remembered_rejections: 100_000,
            verify_threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(8),
            max_clock_skew: 600,
            max_sync_changes: 50_000,
            max_sync_request_bytes: 6 << 20,
            max_sync_response_bytes: 32 << 20,
            sync_remote_changes: false,
            sync_local_writes: true,
            max_loaded_cores: 1024,
            max_loaded_bytes: 256 << 20,
        }
    }
}

/// Errors of loading and persisting replicas.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoreError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored record does not decode.
    #[error("corrupt core record {key}: {reason}")]
    Corrupt {
        /// The key, printable.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The statement given as this node's delegation is not one.
    #[error("delegation: {0}")]
    Delegation(#[from] DelegationError),
    /// The core is not held by this node.
    #[error("this node does not replicate core {0}")]
    UnknownCore(Address),
}

/// Why a local write failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// The namespace or path is not writable.
    #[error(transparent)]
    Path(#[from] PathError),
    /// The namespace name is invalid or reserved.
    #[error("invalid namespace {0:?}")]
    Namespace(String),
    /// The delegation does not allow this write (wrong core, key, namespace, expired).
    #[error("delegation: {0}")]
    Delegation(#[from] DelegationError),
    /// This node's key was revoked by the owner.
    #[error("this node's key {0} was revoked by the owner of the core")]
    Revoked(PeerId),
    /// The change failed the same checks a remote replica would apply (a bug if it happens).
    #[error("the change would be rejected by other replicas: {0}")]
    Rejected(Rejected),
    /// The write changes nothing.
    #[error("the write produced no change")]
    NoChange,
    /// The node key could not sign.
    #[error("signing failed: {0}")]
    Signing(String),
    /// The change could not be persisted.
    #[error(transparent)]
    Core(#[from] CoreError),
}

impl From<StoreError> for WriteError {
    fn from(e: StoreError) -> Self {
        WriteError::Core(CoreError::Store(e))
    }
}

/// Why a remote change was not accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// The change is invalid: reject it (gossipsub `Reject`), do not forward it.
    #[error(transparent)]
    Rejected(Rejected),
    /// The replica could not store it: nothing was decided, do not forward it.
    #[error(transparent)]
    Core(#[from] CoreError),
}

/// The outcome of an accepted remote change.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Accepted {
    /// The change — and any held-back change it unblocked — is now in the document and stored.
    /// Forward it.
    Applied(Report),
    /// The change is not (or not yet) part of the document, but it taught this replica a new
    /// revocation or equivocation proof. Forward it: every replica needs the fact.
    Evidence(Report),
    /// Already known.
    Duplicate,
    /// Held back until these dependencies arrive; ask a peer for them (core-sync).
    MissingDeps {
        /// Dependencies this replica lacks.
        missing: Vec<ChangeHash>,
    },
}

/// What an accepted change did to the document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Changes added to the document, in the order applied.
    pub applied: Vec<ChangeHash>,
    /// Changes removed from the document because a new fact invalidated them.
    pub invalidated: Vec<ChangeHash>,
    /// Whether the document was rebuilt from the stored changes.
    pub rebuilt: bool,
}

/// The outcome of a batch of remote changes.
#[derive(Debug, Clone, Default)]
pub struct BatchReport {
    /// Changes added to the document, in the order applied.
    pub applied: Vec<ChangeHash>,
    /// Envelopes already known.
    pub duplicates: usize,
    /// Envelopes held back for missing dependencies.
    pub held: Vec<ChangeHash>,
    /// Dependencies of held-back changes that this replica lacks.
    pub missing: Vec<ChangeHash>,
    /// Envelopes rejected, with the change hash when it could be decoded.
    pub rejected: Vec<(Option<ChangeHash>, Rejected)>,
    /// Changes removed from the document because a new fact invalidated them.
    pub invalidated: Vec<ChangeHash>,
    /// Whether the document was rebuilt.
    pub rebuilt: bool,
    /// Whether the batch taught a new revocation or equivocation.
    pub learned: bool,
}

/// Stored form of a valid change: the envelope minus the core (in the key) and the delegation
/// (stored once under its id).
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct StoredChange {
    #[prost(bytes = "vec", tag = "1")]
    pub change: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub author: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub signature: Vec<u8>,
    #[prost(bytes = "vec", tag = "4")]
    pub delegation_id: Vec<u8>,
}

/// Per-core record `m/<core>`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(super) struct CoreMeta {
    /// Format version.
    pub version: u32,
    /// This node's newest delegation for the core (`None`: the node only follows it); kept
    /// for binaries that read only this field.
    pub delegation: Option<StatementJson>,
    /// All of this node's delegations for the core, oldest first (version 2; empty in version 1
    /// records, whose one delegation is `delegation`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delegations: Vec<StatementJson>,
}

/// JSON form of an owner statement.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct StatementJson {
    pub message: String,
    pub signature: String,
}

impl StatementJson {
    fn from_statement(s: &OwnerStatement) -> Self {
        StatementJson { message: s.message.clone(), signature: format!("0x{}", hex::encode(&s.signature)) }
    }
    fn to_statement(&self) -> Result<OwnerStatement, DelegationError> {
        delegation::owner_statement(&self.message, &self.signature)
    }
}

pub(super) fn meta_key(core: &Address) -> Vec<u8> {
    format!("m/{}", core.to_lower_hex()).into_bytes()
}

pub(super) fn core_key(core: &Address, kind: u8, rest: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(45 + rest.len());
    key.extend_from_slice(core.to_lower_hex().as_bytes());
    key.push(b'/');
    key.push(kind);
    key.push(b'/');
    key.extend_from_slice(rest);
    key
}

/// What the replica knows about one valid change.
#[derive(Debug, Clone)]
pub(super) struct Meta {
    /// Position in the store's admission order.
    pub seq_no: u64,
    /// Its time: own timestamp raised to its dependencies' (unix seconds).
    pub time: i64,
    /// Vector clock: for each actor index, the last sequence number in this change's history
    /// (itself included).
    pub clock: Box<[u64]>,
    /// The largest operation counter in this change's history (itself included): the next
    /// change built on it starts at `max_op + 1`.
    pub max_op: u64,
    /// Its actor's index in [`Dag::actors`] (its own sequence number is `clock[actor]`).
    pub actor: u32,
}

#[derive(Debug, Clone)]
pub(super) struct ActorInfo {
    pub id: ActorId,
    pub peer: PeerId,
    pub suffix: [u8; change::ACTOR_SUFFIX_LEN],
    /// Valid changes by sequence number (index = seq - 1).
    pub chain: Vec<ChangeHash>,
    /// First operation counter of each change of `chain`.
    pub start_ops: Vec<u64>,
    /// One past the last operation counter of each change of `chain`.
    pub ends: Vec<u64>,
}

/// The valid history, indexed for the checks.
#[derive(Debug, Default)]
pub(super) struct Dag {
    pub metas: HashMap<ChangeHash, Meta>,
    pub actors: Vec<ActorInfo>,
    pub actor_index: HashMap<ActorId, u32>,
    /// Objects by creating operation (actor index, counter) -> namespace.
    pub objects: HashMap<(u32, u64), Arc<str>>,
    pub next_seq_no: u64,
}

impl Dag {
    /// The vector clock of the history of `deps` (unknown hashes count for nothing).
    pub(super) fn prior_clock(&self, deps: &[ChangeHash]) -> Vec<u64> {
        let mut clock: Vec<u64> = Vec::new();
        for dep in deps {
            if let Some(meta) = self.metas.get(dep) {
                if clock.len() < meta.clock.len() {
                    clock.resize(meta.clock.len(), 0);
                }
                for (c, d) in clock.iter_mut().zip(meta.clock.iter()) {
                    *c = (*c).max(*d);
                }
            }
        }
        clock
    }

    pub(super) fn max_time(&self, deps: &[ChangeHash]) -> i64 {
        deps.iter().filter_map(|d| self.metas.get(d)).map(|m| m.time).max().unwrap_or(i64::MIN)
    }

    /// The largest operation counter in the history of `deps` (0 for none).
    fn max_op(&self, deps: &[ChangeHash]) -> u64 {
        deps.iter().filter_map(|d| self.metas.get(d)).map(|m| m.max_op).max().unwrap_or(0)
    }
}

/// The core's history seen from one change's causal past.
struct HistoryView<'a> {
    dag: &'a Dag,
    prior: &'a [u64],
}

impl HistoryView<'_> {
    fn locate(&self, actor: &ActorId, counter: u64) -> Result<u32, String> {
        let idx = *self.dag.actor_index.get(actor).ok_or("unknown actor")?;
        let info = &self.dag.actors[idx as usize];
        let pos = info.start_ops.partition_point(|&s| s <= counter);
        if pos == 0 || counter >= info.ends[pos - 1] {
            return Err("no such operation".into());
        }
        let seq = pos as u64;
        if self.prior.get(idx as usize).copied().unwrap_or(0) < seq {
            return Err("not in the change's causal history".into());
        }
        Ok(idx)
    }
}

impl History for HistoryView<'_> {
    fn op_in_history(&self, actor: &ActorId, counter: u64) -> Result<(), String> {
        self.locate(actor, counter).map(|_| ())
    }

    fn object_namespace(&self, actor: &ActorId, counter: u64) -> Result<Arc<str>, String> {
        let idx = self.locate(actor, counter)?;
        self.dag.objects.get(&(idx, counter)).cloned().ok_or_else(|| "not an object".into())
    }
}

/// What admitting a change will record.
struct Plan {
    prior: Vec<u64>,
    time: i64,
    max_op: u64,
    actor: Option<u32>,
    touched: Touched,
}

/// What an envelope taught a replica.
#[derive(Debug, Default, Clone, Copy)]
struct Learned {
    /// A new fact (revocation or equivocation proof).
    any: bool,
    /// A fact that lifts an earlier cut, so changes once invalid may be valid again.
    relaxed: bool,
}

/// Why an actor is cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    Revoked,
    Equivocated,
}

/// Envelopes held back for missing dependencies, bounded by count, by bytes and by bytes per
/// author key (only envelopes whose author's signature and delegation verified get here).
#[derive(Default)]
struct Pending {
    items: HashMap<ChangeHash, (u64, Checked)>,
    arrival: BTreeMap<u64, ChangeHash>,
    waiting: HashMap<ChangeHash, Vec<ChangeHash>>,
    /// Bytes held in total.
    bytes: usize,
    /// Bytes held by author, with the arrival numbers of that author's items.
    by_author: HashMap<PeerId, (usize, BTreeSet<u64>)>,
    next: u64,
}

fn held_size(item: &Checked) -> usize {
    item.envelope.encoded_len() + 256
}

impl Pending {
    fn insert(&mut self, item: Checked, missing: &[ChangeHash]) {
        let hash = item.hash;
        for m in missing {
            self.waiting.entry(*m).or_default().push(hash);
        }
        let n = self.next;
        self.next += 1;
        let size = held_size(&item);
        self.bytes += size;
        let author = self.by_author.entry(item.author).or_default();
        author.0 += size;
        author.1.insert(n);
        self.arrival.insert(n, hash);
        self.items.insert(hash, (n, item));
    }

    fn remove(&mut self, hash: &ChangeHash) -> Option<Checked> {
        let (n, item) = self.items.remove(hash)?;
        self.arrival.remove(&n);
        let size = held_size(&item);
        self.bytes = self.bytes.saturating_sub(size);
        if let Some(author) = self.by_author.get_mut(&item.author) {
            author.0 = author.0.saturating_sub(size);
            author.1.remove(&n);
            if author.1.is_empty() {
                self.by_author.remove(&item.author);
            }
        }
        Some(item)
    }

    /// Drops the oldest items of authors over `per_author` bytes, then the oldest of all until
    /// the count and byte caps hold. Returns how many were dropped.
    fn evict(&mut self, max_items: usize, max_bytes: usize, per_author: usize) -> usize {
        let mut evicted = 0;
        let heavy: Vec<PeerId> = self.by_author.iter().filter(|(_, (b, _))| *b > per_author).map(|(p, _)| *p).collect();
        for author in heavy {
            while let Some(oldest) = self.by_author.get(&author).filter(|(b, _)| *b > per_author).and_then(|(_, ns)| ns.first().copied()) {
                let Some(hash) = self.arrival.get(&oldest).copied() else { break };
                self.remove(&hash);
                evicted += 1;
            }
        }
        while self.items.len() > max_items || self.bytes > max_bytes {
            let Some((_, hash)) = self.arrival.first_key_value().map(|(n, h)| (*n, *h)) else { break };
            self.remove(&hash);
            evicted += 1;
        }
        if evicted > 0 {
            let items = &self.items;
            self.waiting.retain(|_, ws| {
                ws.retain(|w| items.contains_key(w));
                !ws.is_empty()
            });
        }
        evicted
    }
}

/// A catch-up session this replica drives with one peer (see [`super::sync`]).
#[derive(Default)]
pub(super) struct Session {
    pub state: SyncState,
    pub rounds: u32,
    /// Dependencies of changes this peer sent that are still missing: the peer has them.
    pub peer_missing: HashSet<ChangeHash>,
    pub last_heads: Option<(Vec<ChangeHash>, Option<Vec<ChangeHash>>)>,
    pub stalled: u32,
}

/// How many delegations of this node a replica keeps (one per app login with its own
/// namespaces, plus the CLI's); the oldest goes first.
pub const MAX_OWN_DELEGATIONS: usize = 16;

/// One replica of one core.
pub struct Replica {
    pub(super) core: Address,
    pub(super) store: Store,
    pub(super) config: Config,
    /// This node's delegations for the core, oldest first (at most [`MAX_OWN_DELEGATIONS`]):
    /// each app login on this node delegates its own namespaces, and a write uses the newest
    /// one that covers its namespace.
    own_delegations: Vec<(OwnerStatement, Delegation)>,
    pub(super) doc: Automerge,
    pub(super) dag: Dag,
    /// Delegation statements by id (those of stored changes, and this node's).
    pub(super) statements: HashMap<[u8; 32], OwnerStatement>,
    /// Ids of the statements stored under `d/`.
    stored_statements: HashSet<[u8; 32]>,
    pub(super) delegations: Delegations,
    /// Known revocations by statement id, and by revoked key.
    revocations: BTreeMap<[u8; 32], (Revocation, OwnerStatement)>,
    revoked_peers: HashMap<PeerId, Vec<[u8; 32]>>,
    /// Equivocating actors -> last valid sequence number.
    equivocations: HashMap<ActorId, u64>,
    /// Stored changes that the known facts invalidate (derived at every rebuild; their records
    /// stay in the store so that a fact that restores them — a revocation whose keep overrides
    /// an equivocation — brings them back), and recent rejections for history reasons.
    invalid: HashMap<ChangeHash, String>,
    recent_invalid: HashMap<ChangeHash, String>,
    /// Evidence envelopes: the carriers of known revocations and the two envelopes of each
    /// equivocation proof. Durable and never evicted: they are the facts every replica needs,
    /// and only owner-signed statements or envelopes of delegated keys can add to them.
    pub(super) evidence: BTreeMap<ChangeHash, SignedChange>,
    /// The two evidence envelopes that prove each equivocating actor's cut.
    equivocation_proofs: HashMap<ActorId, [ChangeHash; 2]>,
    /// Recently seen (actor, seq) -> envelope, to catch equivocation among changes that never
    /// become valid here (a detection aid, bounded by bytes).
    seen: Seen,
    pending: Pending,
    local_actor: Option<(PeerId, ActorId)>,
    pub(super) sessions: HashMap<PeerId, Session>,
    /// Heads shared with a peer at the end of the last session, to start the next one with a
    /// small bloom filter.
    pub(super) shared_heads: HashMap<PeerId, Vec<ChangeHash>>,
    /// Bytes of the stored change records behind the document (see [`Replica::approx_bytes`]).
    stored_bytes: usize,
    /// Values read lately (see [`Replica::read_path`]).
    reads: std::sync::Mutex<ReadCache>,
}

/// Values read from the document since its heads last changed: reading a key is a seek in
/// Automerge's op set (measured: ~40% of a `kb_getData`'s CPU), and apps read the same keys
/// over and over between writes. Any change to the document changes its heads, and a cache
/// whose heads are not the document's is emptied before use, so a value is never stale.
#[derive(Default)]
struct ReadCache {
    heads: Vec<ChangeHash>,
    values: HashMap<(String, Vec<String>), Option<serde_json::Value>>,
    bytes: usize,
}

/// Values and bytes a replica's read cache holds (it starts over beyond either).
const READ_CACHE_VALUES: usize = 256;
const READ_CACHE_BYTES: usize = 64 << 10;

/// A cheap upper estimate of a JSON value's size; `None` above `max` (not worth caching).
fn json_size(value: &serde_json::Value, max: usize) -> Option<usize> {
    use serde_json::Value as J;
    let mut total = 0usize;
    let mut stack = vec![value];
    while let Some(v) = stack.pop() {
        total += 16;
        match v {
            J::String(s) => total += s.len(),
            J::Array(items) => stack.extend(items.iter()),
            J::Object(map) => {
                for (k, item) in map {
                    total += k.len() + 16;
                    stack.push(item);
                }
            }
            _ => {}
        }
        if total > max {
            return None;
        }
    }
    Some(total)
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("core", &self.core)
            .field("changes", &self.dag.metas.len())
            .field("pending", &self.pending.items.len())
            .finish()
    }
}

/// Bytes of envelopes remembered by (actor, seq) to catch equivocations among changes that are
/// not valid here.
const SEEN_BYTES: usize = 8 << 20;

/// Envelopes by (actor, seq), oldest dropped first beyond [`SEEN_BYTES`].
#[derive(Default)]
struct Seen {
    map: HashMap<(ActorId, u64), (ChangeHash, SignedChange)>,
    order: VecDeque<(ActorId, u64)>,
    bytes: usize,
}

impl Seen {
    fn get(&self, key: &(ActorId, u64)) -> Option<&(ChangeHash, SignedChange)> {
        self.map.get(key)
    }

    fn insert(&mut self, key: (ActorId, u64), hash: ChangeHash, envelope: &SignedChange) {
        if self.map.contains_key(&key) {
            return;
        }
        self.bytes += envelope.encoded_len();
        self.order.push_back(key.clone());
        self.map.insert(key, (hash, envelope.clone()));
        while self.bytes > SEEN_BYTES {
            let Some(old) = self.order.pop_front() else { break };
            if let Some((_, e)) = self.map.remove(&old) {
                self.bytes = self.bytes.saturating_sub(e.encoded_len());
            }
        }
    }
}

pub(super) fn unix_now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

fn corrupt(key: &[u8], reason: impl ToString) -> CoreError {
    CoreError::Corrupt { key: String::from_utf8_lossy(key).into_owned(), reason: reason.to_string() }
}

/// Whether a rejection depends only on the change and its history (then every envelope of the
/// same change gets it, and its descendants are invalid too), as opposed to the envelope's
/// delegation or encoding.
fn is_intrinsic(r: &Rejected) -> bool {
    matches!(
        r,
        Rejected::Revoked { .. }
            | Rejected::Equivocation { .. }
            | Rejected::DependsOnInvalid(_)
            | Rejected::SequenceGap { .. }
            | Rejected::BadStartOp { .. }
            | Rejected::BadReference(_)
    )
}

impl Replica {
    /// Creates or opens the replica of `core`, loading everything stored.
    pub(super) fn open(store: Store, core: Address, config: Config, delegations: Delegations) -> Result<Replica, CoreError> {
        let mut replica = Replica {
            core,
            store,
            config,
            own_delegations: Vec::new(),
            doc: Automerge::new(),
            dag: Dag::default(),
            statements: HashMap::new(),
            stored_statements: HashSet::new(),
            delegations,
            revocations: BTreeMap::new(),
            revoked_peers: HashMap::new(),
            equivocations: HashMap::new(),
            invalid: HashMap::new(),
            recent_invalid: HashMap::new(),
            evidence: BTreeMap::new(),
            equivocation_proofs: HashMap::new(),
            seen: Seen::default(),
            pending: Pending::default(),
            local_actor: None,
            sessions: HashMap::new(),
            shared_heads: HashMap::new(),
            stored_bytes: 0,
            reads: std::sync::Mutex::new(ReadCache::default()),
        };
        replica.load()?;
        Ok(replica)
    }

    fn load(&mut self) -> Result<(), CoreError> {
        let core = self.core;
        let store = self.store.clone();
        let key = meta_key(&core);
        match self.store.get(Column::Cores, &key)? {
            Some(bytes) => {
                let meta: CoreMeta = serde_json::from_slice(&bytes).map_err(|e| corrupt(&key, e))?;
                let stored = if meta.delegations.is_empty() { meta.delegation.into_iter().collect() } else { meta.delegations };
                for d in stored {
                    let statement = d.to_statement().map_err(|e| corrupt(&key, e))?;
                    let verified = Delegation::verify(&statement).map_err(|e| corrupt(&key, e))?;
                    self.remember_statement(statement.clone());
                    self.own_delegations.push((statement, verified));
                }
            }
            None => self.store.put_sync(Column::Cores, &key, &serde_json::to_vec(&CoreMeta::default()).unwrap_or_default())?,
        }
        let prefix = core_key(&core, b'd', b"");
        for entry in store.iter_prefix(Column::Cores, &prefix) {
            let (k, v) = entry?;
            let statement = OwnerStatement::decode(&v[..]).map_err(|e| corrupt(&k, e))?;
            let id = self.remember_statement(statement);
            self.stored_statements.insert(id);
        }
        let prefix = core_key(&core, b'r', b"");
        for entry in store.iter_prefix(Column::Cores, &prefix) {
            let (k, v) = entry?;
            let statement = OwnerStatement::decode(&v[..]).map_err(|e| corrupt(&k, e))?;
            let revocation = Revocation::verify(&statement).map_err(|e| corrupt(&k, e))?;
            self.add_revocation(revocation, statement);
        }
        let prefix = core_key(&core, b'k', b"");
        for entry in store.iter_prefix(Column::Cores, &prefix) {
            let (k, v) = entry?;
            let actor = ActorId::from(&k[prefix.len()..]);
            let keep = <[u8; 8]>::try_from(&v[..]).map(u64::from_be_bytes).map_err(|_| corrupt(&k, "not a u64"))?;
            self.equivocations.insert(actor, keep);
        }
        // Invalidated changes were once recorded under `x/` and deleted; their verdicts are
        // now derived from the facts at every rebuild. Drop the old records.
        let prefix = core_key(&core, b'x', b"");
        let mut legacy = store.batch();
        for entry in store.iter_prefix(Column::Cores, &prefix) {
            let (k, _) = entry?;
            legacy.delete(Column::Cores, &k);
        }
        if !legacy.is_empty() {
            legacy.commit(true)?;
        }
        let prefix = core_key(&core, b'e', b"");
        for entry in store.iter_prefix(Column::Cores, &prefix) {
            let (k, v) = entry?;
            let hash = ChangeHash::try_from(&k[prefix.len()..]).map_err(|e| corrupt(&k, e))?;
            let envelope = SignedChange::decode(&v[..]).map_err(|e| corrupt(&k, e))?;
            self.evidence.insert(hash, envelope);
        }
        self.rebuild_from_store()
    }

    /// Re-derives the history indexes, the verdicts and the document from the stored changes
    /// and the known facts.
    fn rebuild_from_store(&mut self) -> Result<(), CoreError> {
        self.dag = Dag::default();
        self.invalid.clear();
        self.doc = Automerge::new();
        self.local_actor = None;
        self.sessions.clear();
        self.shared_heads.clear();
        let store = self.store.clone();
        let prefix = core_key(&self.core, b'c', b"");
        let mut records = Vec::new();
        for entry in store.iter_prefix(Column::Cores, &prefix) {
            let (k, v) = entry?;
            let seq_no = <[u8; 8]>::try_from(&k[prefix.len()..])
                .map(u64::from_be_bytes)
                .map_err(|_| corrupt(&k, "bad sequence key"))?;
            records.push((seq_no, v));
        }
        let mut changes = Vec::with_capacity(records.len());
        self.stored_bytes = records.iter().map(|(_, v)| v.len()).sum();
        let mut dropped = store.batch();
        for (seq_no, bytes) in records {
            let key = core_key(&self.core, b'c', &seq_no.to_be_bytes());
            let record = StoredChange::decode(&bytes[..]).map_err(|e| corrupt(&key, e))?;
            let checked = match self.checked_from_store(&record) {
                Ok(c) => c,
                Err(reason) => {
                    tracing::error!(core = %self.core, %reason, "dropping a stored change that no longer decodes");
                    dropped.delete(Column::Cores, &key);
                    continue;
                }
            };
            let verdict = if checked.change.deps().iter().all(|d| self.dag.metas.contains_key(d)) {
                self.plan(&checked)
            } else {
                Err(Rejected::DependsOnInvalid(
                    checked.change.deps().iter().find(|d| !self.dag.metas.contains_key(*d)).copied().unwrap_or(checked.hash),
                ))
            };
            match verdict {
                Ok(plan) => {
                    // Keep the stored position (commit_plan numbers the change next_seq_no).
                    self.dag.next_seq_no = seq_no;
                    self.commit_plan(&checked, plan);
                    changes.push(checked.change);
                }
                Err(reason) => {
                    // Kept in the store: a later fact may restore it (see `invalid`).
                    tracing::debug!(core = %self.core, hash = %checked.hash, %reason, "stored change is invalid under the known facts");
                    self.invalid.insert(checked.hash, reason.to_string());
                }
            }
        }
        if !dropped.is_empty() {
            dropped.commit(true)?;
        }
        self.apply_to_doc(changes);
        Ok(())
    }

    fn apply_to_doc(&mut self, changes: Vec<Change>) {
        if changes.is_empty() {
            return;
        }
        let doc = &mut self.doc;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| doc.apply_changes(changes)));
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(core = %self.core, error = %e, "Automerge refused verified changes"),
            Err(_) => tracing::error!(core = %self.core, "Automerge panicked on verified changes"),
        }
    }

    fn checked_from_store(&mut self, record: &StoredChange) -> Result<Checked, String> {
        let id: [u8; 32] = record.delegation_id.as_slice().try_into().map_err(|_| "bad delegation id".to_string())?;
        let statement = self.statements.get(&id).cloned().ok_or("delegation statement missing")?;
        let delegation = self.delegations.verify(&self.core, &statement).map_err(|e| e.to_string())?;
        let (change, expanded) = change::decode_change(&record.change).map_err(|e| e.to_string())?;
        let (author, suffix) = change::split_actor(change.actor_id()).ok_or("actor is not a peer id")?;
        let revocation = change::carried_revocation(&change, &self.core).map_err(|e| e.to_string())?;
        let hash = change.hash();
        Ok(Checked {
            envelope: SignedChange {
                core: self.core.to_lower_hex(),
                change: record.change.clone().into(),
                author: record.author.clone().into(),
                signature: record.signature.clone().into(),
                delegation: Some(statement),
            },
            change,
            expanded,
            hash,
            author,
            suffix,
            delegation,
            delegation_id: id,
            revocation,
        })
    }

    fn remember_statement(&mut self, statement: OwnerStatement) -> [u8; 32] {
        let id = delegation::statement_id(&statement);
        self.statements.entry(id).or_insert(statement);
        id
    }


    fn add_revocation(&mut self, revocation: Revocation, statement: OwnerStatement) -> bool {
        if self.revocations.contains_key(&revocation.id) {
            return false;
        }
        self.revoked_peers.entry(revocation.peer).or_default().push(revocation.id);
        self.revocations.insert(revocation.id, (revocation, statement));
        true
    }

    /// The last valid sequence number of an actor, if the actor is cut off.
    ///
    /// A revocation's keep is authoritative for the key it revokes: an equivocation of that
    /// key (which may happen after the cut, when the key is in hostile hands) can neither void
    /// what the owner kept nor what others built on it. Equivocation proofs count only for keys
    /// that are not revoked.
    fn keep_for(&self, actor: &ActorId, peer: &PeerId, suffix: &[u8; 8]) -> Option<(u64, Cut)> {
        if let Some(ids) = self.revoked_peers.get(peer) {
            let keep = ids.iter().filter_map(|id| self.revocations.get(id)).map(|(r, _)| r.keep_for(suffix)).min();
            if let Some(keep) = keep {
                return Some((keep, Cut::Revoked));
            }
        }
        self.equivocations.get(actor).map(|&keep| (keep, Cut::Equivocated))
    }

    /// Whether `hash` (change `seq` of an actor of a revoked key) is another change than the
    /// one a revocation kept at that sequence number.
    fn replaces_kept(&self, peer: &PeerId, suffix: &[u8; 8], seq: u64, hash: &ChangeHash) -> bool {
        self.revoked_peers.get(peer).is_some_and(|ids| {
            ids.iter()
                .filter_map(|id| self.revocations.get(id))
                .filter_map(|(r, _)| r.keep.get(suffix))
                .any(|kept| kept.seq == seq && kept.hash != *hash)
        })
    }

    /// The history-dependent checks of a change whose dependencies are all valid.
    fn plan(&self, item: &Checked) -> Result<Plan, Rejected> {
        let change = &item.change;
        let deps = change.deps();
        let prior = self.dag.prior_clock(deps);
        // A change cannot be older than what it builds on, nor older than the delegation it
        // relies on: a key cannot place its writes before it was authorized.
        let time = change.timestamp().max(self.dag.max_time(deps)).max(item.delegation.issued_at);
        let actor = self.dag.actor_index.get(change.actor_id()).copied();
        let seq = change.seq();
        let cut = self.keep_for(change.actor_id(), &item.author, &item.suffix);
        if let Some(idx) = actor {
            if let Some(existing) = self.dag.actors[idx as usize].chain.get((seq as usize).wrapping_sub(1)) {
                if *existing != item.hash {
                    return Err(match cut {
                        Some((_, Cut::Revoked)) => Rejected::NotKept { author: item.author.to_string(), seq },
                        _ => Rejected::Equivocation { author: item.author.to_string(), seq },
                    });
                }
            }
        }
        let expected = actor.and_then(|i| prior.get(i as usize).copied()).unwrap_or(0) + 1;
        if seq != expected {
            return Err(Rejected::SequenceGap { expected, got: seq });
        }
        // Operation ids are Lamport timestamps: a change starts right after the largest counter
        // of its history, as Automerge numbers them. A change that claims a larger start would
        // win every conflict (and one near `u32::MAX` would stop the next local write).
        let max_op = self.dag.max_op(deps);
        let start_op = change.start_op().get();
        if start_op != max_op + 1 {
            return Err(Rejected::BadStartOp { expected: max_op + 1, got: start_op });
        }
        let max_op = max_op.max((start_op + change.len() as u64).saturating_sub(1));
        if self.replaces_kept(&item.author, &item.suffix, seq, &item.hash) {
            return Err(Rejected::NotKept { author: item.author.to_string(), seq });
        }
        if let Some((keep, cut)) = cut {
            if seq > keep {
                return Err(match cut {
                    Cut::Revoked => Rejected::Revoked { author: item.author.to_string(), seq, keep },
                    Cut::Equivocated => Rejected::Equivocation { author: item.author.to_string(), seq: keep + 1 },
                });
            }
        }
        item.delegation.check(&self.core, &item.author, time).map_err(Rejected::Delegation)?;
        for other in change.other_actor_ids() {
            let known = self
                .dag
                .actor_index
                .get(other)
                .is_some_and(|i| prior.get(*i as usize).copied().unwrap_or(0) > 0);
            if !known {
                return Err(Rejected::BadReference(format!("actor {other} is not in the change's history")));
            }
        }
        let touched = inspect(&item.expanded, &HistoryView { dag: &self.dag, prior: &prior })?;
        check_namespaces(&touched, &item.delegation, item.revocation.is_some())?;
        Ok(Plan { prior, time, max_op, actor, touched })
    }

    fn commit_plan(&mut self, item: &Checked, plan: Plan) {
        let dag = &mut self.dag;
        let seq_no = dag.next_seq_no;
        dag.next_seq_no += 1;
        let idx = match plan.actor {
            Some(i) => i,
            None => {
                let i = dag.actors.len() as u32;
                dag.actors.push(ActorInfo {
                    id: item.change.actor_id().clone(),
                    peer: item.author,
                    suffix: item.suffix,
                    chain: Vec::new(),
                    start_ops: Vec::new(),
                    ends: Vec::new(),
                });
                dag.actor_index.insert(item.change.actor_id().clone(), i);
                i
            }
        };
        let mut clock = plan.prior;
        if clock.len() <= idx as usize {
            clock.resize(idx as usize + 1, 0);
        }
        clock[idx as usize] = item.change.seq();
        let info = &mut dag.actors[idx as usize];
        let start = item.change.start_op().get();
        info.chain.push(item.hash);
        info.start_ops.push(start);
        info.ends.push(start + item.change.len() as u64);
        for (counter, namespace) in plan.touched.objects {
            dag.objects.insert((idx, counter), namespace);
        }
        dag.metas.insert(
            item.hash,
            Meta { seq_no, time: plan.time, clock: clock.into_boxed_slice(), max_op: plan.max_op, actor: idx },
        );
    }

    fn is_invalid(&self, hash: &ChangeHash) -> Option<&String> {
        self.invalid.get(hash).or_else(|| self.recent_invalid.get(hash))
    }

    /// Derives every verdict anew from the stored changes and the known facts, after a new fact
    /// changed what is valid: remembered rejections go too, as they may no longer hold.
    fn rederive(&mut self) -> Result<(), CoreError> {
        self.recent_invalid.clear();
        self.rebuild_from_store()
    }

    fn remember_rejection(&mut self, hash: ChangeHash, reason: &Rejected) {
        if self.recent_invalid.len() >= self.config.max_remembered_rejections {
            self.recent_invalid.clear();
        }
        self.recent_invalid.insert(hash, reason.to_string());
    }

    fn add_evidence(&mut self, hash: ChangeHash, envelope: SignedChange, batch: &mut crate::store::StoreBatch<'_>) {
        if self.evidence.contains_key(&hash) {
            return;
        }
        batch.put(Column::Cores, &core_key(&self.core, b'e', &hash.0), &envelope.encode_to_vec());
        self.evidence.insert(hash, envelope);
    }

    /// Drops evidence that no longer proves anything (a superseded equivocation proof), unless
    /// it also carries a revocation.
    fn drop_evidence(&mut self, hash: &ChangeHash, batch: &mut crate::store::StoreBatch<'_>) {
        let carries_revocation = self
            .evidence
            .get(hash)
            .and_then(|e| change::decode_change(&e.change).ok())
            .is_some_and(|(c, _)| change::carried_revocation(&c, &self.core).ok().flatten().is_some());
        if !carries_revocation && self.evidence.remove(hash).is_some() {
            batch.delete(Column::Cores, &core_key(&self.core, b'e', &hash.0));
        }
    }

    /// Verifies and applies remote envelopes (a gossip message, a sync batch). Envelopes may
    /// come in any order; everything accepted is stored before this returns.
    pub fn apply_batch(&mut self, envelopes: Vec<SignedChange>) -> Result<BatchReport, CoreError> {
        let checked = check_batch(&self.core, envelopes, &self.delegations, &self.config);
        self.apply_checked(checked)
    }

    /// The checks that need the core's history, for envelopes that went through
    /// [`check_batch`] (possibly on another thread), then storing what is valid.
    pub(crate) fn apply_checked(&mut self, checked: Vec<Result<Checked, Rejected>>) -> Result<BatchReport, CoreError> {
        let mut report = BatchReport::default();
        if checked.is_empty() {
            return Ok(report);
        }
        let horizon = unix_now().saturating_add(self.config.max_clock_skew);
        let store = self.store.clone();
        let mut batch = store.batch();
        let mut learned = Learned::default();
        let mut ready: VecDeque<Checked> = VecDeque::new();
        let mut admitted: Vec<Checked> = Vec::new();
        let mut items = Vec::with_capacity(checked.len());
        for result in checked {
            match result {
                Ok(item) => items.push(item),
                Err(reason) => report.rejected.push((None, reason)),
            }
        }
        // Facts first, then verdicts: a revocation in this batch decides about the other
        // envelopes of the batch whatever their order in it.
        for item in &items {
            let new = self.learn(item, &mut batch);
            learned.any |= new.any;
            learned.relaxed |= new.relaxed;
        }
        if learned.relaxed {
            // A cut was lifted: changes it voided are valid again.
            self.rederive()?;
        }
        for item in items {
            if item.change.timestamp() > horizon && !self.dag.metas.contains_key(&item.hash) {
                report.rejected.push((Some(item.hash), Rejected::FromTheFuture { time: item.change.timestamp(), horizon }));
                continue;
            }
            if self.dag.metas.contains_key(&item.hash) || self.pending.items.contains_key(&item.hash) {
                report.duplicates += 1;
                continue;
            }
            if let Some(reason) = self.is_invalid(&item.hash) {
                report.rejected.push((Some(item.hash), Rejected::KnownInvalid(reason.clone())));
                continue;
            }
            self.route(item, &mut ready, &mut report);
            self.drain(&mut ready, &mut admitted, &mut report);
        }

        let evicted = self.pending.evict(
            self.config.max_pending,
            self.config.max_pending_bytes,
            self.config.max_pending_bytes_per_author,
        );
        if evicted > 0 {
            tracing::warn!(core = %self.core, evicted, "held-back changes dropped: over the limits for changes missing dependencies");
        }
        report.held.retain(|h| self.pending.items.contains_key(h));
        let mut missing: BTreeSet<ChangeHash> = BTreeSet::new();
        for hash in &report.held {
            if let Some((_, item)) = self.pending.items.get(hash) {
                for d in item.change.deps() {
                    if !self.dag.metas.contains_key(d) && !self.pending.items.contains_key(d) {
                        missing.insert(*d);
                    }
                }
            }
        }
        report.missing = missing.into_iter().collect();

        // Everything admitted is stored; a new fact may make some of it (or older changes)
        // invalid, or valid again, and then the verdicts are derived anew from the store.
        for item in &admitted {
            self.persist_change(item, &mut batch);
        }
        let rederive = learned.any && !self.cut_violations().is_empty();
        if !batch.is_empty() {
            // Remote changes go to the write-ahead log without waiting for fsync: they survive a
            // crash of the process, and on a crash of the machine the other replicas still hold
            // them. A later local write is synced, and its sync covers everything logged before
            // it, so no acknowledged change can reach the disk without its dependencies.
            batch.commit(self.config.sync_remote_changes)?;
        }
        report.learned = learned.any;
        if !rederive {
            report.applied = admitted.iter().map(|a| a.hash).collect();
            self.apply_to_doc(admitted.into_iter().map(|a| a.change).collect());
            return Ok(report);
        }
        let admitted_hashes: HashSet<ChangeHash> = admitted.iter().map(|a| a.hash).collect();
        let before: HashSet<ChangeHash> =
            self.dag.metas.keys().filter(|h| !admitted_hashes.contains(h)).copied().collect();
        self.rederive()?;
        for item in &admitted {
            if self.dag.metas.contains_key(&item.hash) {
                report.applied.push(item.hash);
            } else {
                let reason = self.invalid.get(&item.hash).cloned().unwrap_or_default();
                report.rejected.push((Some(item.hash), Rejected::KnownInvalid(reason)));
            }
        }
        let mut removed: Vec<ChangeHash> = before.into_iter().filter(|h| !self.dag.metas.contains_key(h)).collect();
        removed.sort();
        if !removed.is_empty() {
            tracing::info!(core = %self.core, count = removed.len(), "rebuilt the document without invalidated changes");
        }
        report.invalidated = removed;
        report.rebuilt = true;
        Ok(report)
    }

    /// Admits ready changes in causal order; each admission may unblock held-back changes.
    fn drain(&mut self, ready: &mut VecDeque<Checked>, admitted: &mut Vec<Checked>, report: &mut BatchReport) {
        while let Some(item) = ready.pop_front() {
            match self.plan(&item) {
                Ok(plan) => {
                    self.commit_plan(&item, plan);
                    if let Some(waiters) = self.pending.waiting.remove(&item.hash) {
                        for w in waiters {
                            let ready_now = self
                                .pending
                                .items
                                .get(&w)
                                .is_some_and(|(_, c)| c.change.deps().iter().all(|d| self.dag.metas.contains_key(d)));
                            if ready_now {
                                if let Some(c) = self.pending.remove(&w) {
                                    ready.push_back(c);
                                }
                            }
                        }
                    }
                    admitted.push(item);
                }
                Err(reason) => self.reject_with_descendants(item.hash, reason, report),
            }
        }
    }

    /// Learns the facts an envelope proves: a revocation it carries, an equivocation of its
    /// author.
    fn learn(&mut self, item: &Checked, batch: &mut crate::store::StoreBatch<'_>) -> Learned {
        let mut learned = Learned::default();
        if let Some((revocation, statement)) = &item.revocation {
            if self.add_revocation(revocation.clone(), statement.clone()) {
                tracing::info!(core = %self.core, peer = %revocation.peer, "learned a revocation");
                batch.put(Column::Cores, &core_key(&self.core, b'r', &revocation.id), &statement.encode_to_vec());
                self.add_evidence(item.hash, item.envelope.clone(), batch);
                learned.any = true;
                // The revocation's keep now rules the key's actors: equivocation cuts of them
                // no longer apply, and may have voided changes the owner kept.
                learned.relaxed |= self.forget_equivocations_of(&revocation.peer, batch);
            }
        }
        let actor = item.change.actor_id().clone();
        let seq = item.change.seq();
        if self.revoked_peers.contains_key(&item.author) {
            // What a revoked key does is judged by its revocation alone.
            return learned;
        }
        let twin = self
            .dag
            .actor_index
            .get(&actor)
            .and_then(|i| self.dag.actors[*i as usize].chain.get((seq as usize).wrapping_sub(1)).copied())
            .filter(|h| *h != item.hash)
            .map(|h| (h, None))
            .or_else(|| {
                self.seen
                    .get(&(actor.clone(), seq))
                    .filter(|(h, _)| *h != item.hash)
                    .map(|(h, e)| (*h, Some(e.clone())))
            });
        if let Some((twin_hash, twin_envelope)) = twin {
            let keep = seq.saturating_sub(1);
            let current = self.equivocations.get(&actor).copied();
            if current.is_none_or(|c| keep < c) {
                tracing::warn!(core = %self.core, author = %item.author, seq, "equivocation: two changes with one sequence number");
                self.equivocations.insert(actor.clone(), keep);
                batch.put(Column::Cores, &core_key(&self.core, b'k', actor.to_bytes()), &keep.to_be_bytes());
                let twin_envelope = twin_envelope.or_else(|| self.envelope(&twin_hash));
                if let Some(env) = twin_envelope {
                    self.add_evidence(twin_hash, env, batch);
                }
                self.add_evidence(item.hash, item.envelope.clone(), batch);
                // One proof per actor: the one with the lowest sequence number.
                if let Some(old) = self.equivocation_proofs.insert(actor, [twin_hash, item.hash]) {
                    for hash in old.iter().filter(|h| **h != twin_hash && **h != item.hash) {
                        self.drop_evidence(hash, batch);
                    }
                }
                learned.any = true;
            }
        } else {
            self.seen.insert((actor, seq), item.hash, &item.envelope);
        }
        learned
    }

    /// Removes the equivocation cuts of `peer`'s actors (its revocation rules them now).
    /// Returns whether there were any.
    fn forget_equivocations_of(&mut self, peer: &PeerId, batch: &mut crate::store::StoreBatch<'_>) -> bool {
        let actors: Vec<ActorId> = self
            .equivocations
            .keys()
            .filter(|a| change::split_actor(a).is_some_and(|(p, _)| p == *peer))
            .cloned()
            .collect();
        for actor in &actors {
            self.equivocations.remove(actor);
            batch.delete(Column::Cores, &core_key(&self.core, b'k', actor.to_bytes()));
        }
        !actors.is_empty()
    }

    fn route(&mut self, item: Checked, ready: &mut VecDeque<Checked>, report: &mut BatchReport) {
        let deps = item.change.deps();
        if let Some(bad) = deps.iter().find(|d| self.is_invalid(d).is_some()).copied() {
            let reason = Rejected::DependsOnInvalid(bad);
            self.remember_rejection(item.hash, &reason);
            report.rejected.push((Some(item.hash), reason));
            return;
        }
        // A change past its actor's cut is invalid whatever its history: refuse it now rather
        // than hold it (a revoked key must not be able to fill memory with held-back changes).
        let seq = item.change.seq();
        if let Some((keep, cut)) = self.keep_for(item.change.actor_id(), &item.author, &item.suffix) {
            if seq > keep {
                let reason = match cut {
                    Cut::Revoked => Rejected::Revoked { author: item.author.to_string(), seq, keep },
                    Cut::Equivocated => Rejected::Equivocation { author: item.author.to_string(), seq: keep + 1 },
                };
                self.remember_rejection(item.hash, &reason);
                report.rejected.push((Some(item.hash), reason));
                return;
            }
        }
        let missing: Vec<ChangeHash> = deps.iter().filter(|d| !self.dag.metas.contains_key(d)).copied().collect();
        if missing.is_empty() {
            ready.push_back(item);
        } else {
            report.held.push(item.hash);
            self.pending.insert(item, &missing);
        }
    }

    fn reject_with_descendants(&mut self, hash: ChangeHash, reason: Rejected, report: &mut BatchReport) {
        let mut stack = vec![(hash, reason)];
        while let Some((hash, reason)) = stack.pop() {
            let intrinsic = is_intrinsic(&reason);
            if intrinsic {
                self.remember_rejection(hash, &reason);
                if let Some(waiters) = self.pending.waiting.remove(&hash) {
                    for w in waiters {
                        if self.pending.remove(&w).is_some() {
                            stack.push((w, Rejected::DependsOnInvalid(hash)));
                        }
                    }
                }
            }
            report.rejected.push((Some(hash), reason));
        }
    }

    /// Valid changes that the known cuts (revocations, equivocations) invalidate.
    fn cut_violations(&self) -> HashSet<ChangeHash> {
        let cuts: Vec<(usize, u64)> = self
            .dag
            .actors
            .iter()
            .enumerate()
            .filter_map(|(i, a)| {
                let (keep, _) = self.keep_for(&a.id, &a.peer, &a.suffix)?;
                // A change in the kept position that is not the kept change goes, with what
                // follows it.
                let at_keep = usize::try_from(keep).ok().and_then(|k| k.checked_sub(1)).and_then(|k| a.chain.get(k));
                let replaced = at_keep.is_some_and(|h| self.replaces_kept(&a.peer, &a.suffix, keep, h));
                Some((i, if replaced { keep - 1 } else { keep }))
            })
            .collect();
        if cuts.is_empty() {
            return HashSet::new();
        }
        self.dag
            .metas
            .iter()
            .filter(|(_, m)| cuts.iter().any(|(i, keep)| m.clock.get(*i).copied().unwrap_or(0) > *keep))
            .map(|(h, _)| *h)
            .collect()
    }

    fn persist_change(&mut self, item: &Checked, batch: &mut crate::store::StoreBatch<'_>) {
        let Some(meta) = self.dag.metas.get(&item.hash) else { return };
        let record = StoredChange {
            change: item.envelope.change.to_vec(),
            author: item.envelope.author.to_vec(),
            signature: item.envelope.signature.to_vec(),
            delegation_id: item.delegation_id.to_vec(),
        };
        let bytes = record.encode_to_vec();
        self.stored_bytes += bytes.len();
        batch.put(Column::Cores, &core_key(&self.core, b'c', &meta.seq_no.to_be_bytes()), &bytes);
        if !self.stored_statements.contains(&item.delegation_id) {
            let statement = item.envelope.delegation.clone().or_else(|| self.statements.get(&item.delegation_id).cloned());
            if let Some(statement) = statement {
                batch.put(Column::Cores, &core_key(&self.core, b'd', &item.delegation_id), &statement.encode_to_vec());
                self.statements.insert(item.delegation_id, statement);
                self.stored_statements.insert(item.delegation_id);
            }
        }
    }

    /// The stored envelope of a valid change.
    pub fn envelope(&self, hash: &ChangeHash) -> Option<SignedChange> {
        let meta = self.dag.metas.get(hash)?;
        self.envelope_at(meta.seq_no)
    }

    pub(super) fn envelope_at(&self, seq_no: u64) -> Option<SignedChange> {
        let bytes = self.store.get(Column::Cores, &core_key(&self.core, b'c', &seq_no.to_be_bytes())).ok()??;
        let (mut envelope, id) = self.stored_envelope(&bytes, self.core.to_lower_hex())?;
        envelope.delegation = self.statements.get(&id).cloned();
        Some(envelope)
    }

    /// The stored envelopes at `seq_nos` (sorted), read in one pass, without their delegations
    /// (each comes with the id of its delegation, for [`Replica::statement`]); `None` for a
    /// record that is missing or unreadable.
    pub(super) fn envelopes_at(&self, seq_nos: &[u64]) -> Vec<Option<(SignedChange, [u8; 32])>> {
        let prefix = core_key(&self.core, b'c', &[]);
        let keys: Vec<Vec<u8>> = seq_nos.iter().map(|n| [&prefix[..], &n.to_be_bytes()].concat()).collect();
        let core = self.core.to_lower_hex();
        match self.store.get_sorted(Column::Cores, &keys) {
            Ok(values) => values.into_iter().map(|v| self.stored_envelope(&v?, core.clone())).collect(),
            Err(e) => {
                tracing::warn!(core = %self.core, "cannot read stored changes: {e}");
                vec![None; seq_nos.len()]
            }
        }
    }

    fn stored_envelope(&self, bytes: &[u8], core: String) -> Option<(SignedChange, [u8; 32])> {
        let record = StoredChange::decode(bytes).ok()?;
        let id: [u8; 32] = record.delegation_id.as_slice().try_into().ok()?;
        let envelope = SignedChange {
            core,
            change: record.change.into(),
            author: record.author.into(),
            signature: record.signature.into(),
            delegation: None,
        };
        Some((envelope, id))
    }

    /// A stored owner statement (a delegation) by its id.
    pub(super) fn statement(&self, id: &[u8; 32]) -> Option<&OwnerStatement> {
        self.statements.get(id)
    }

    /// Verifies and applies one remote envelope (a gossip message).
    ///
    /// `Ok` means: forward it (`Applied`, `Evidence`), ignore it (`Duplicate`), or fetch its
    /// dependencies (`MissingDeps`). `Err` means: reject it, do not forward.
    pub fn apply_remote(&mut self, envelope: SignedChange) -> Result<Accepted, ApplyError> {
        outcome(self.apply_batch(vec![envelope])?)
    }

    fn local_actor(&mut self, author: PeerId) -> ActorId {
        match &self.local_actor {
            Some((peer, actor)) if *peer == author => actor.clone(),
            _ => {
                let suffix: [u8; change::ACTOR_SUFFIX_LEN] = rand::random();
                let actor = change::actor_id(&author, suffix);
                self.local_actor = Some((author, actor.clone()));
                actor
            }
        }
    }

    /// Makes, verifies, stores (synced) and returns one local change.
    pub(super) fn local_change(
        &mut self,
        keypair: &Keypair,
        statement: &OwnerStatement,
        time: i64,
        message: Option<String>,
        namespace: &str,
        write: impl FnOnce(&mut Transaction<'_>) -> Result<(), PathError>,
    ) -> Result<SignedChange, WriteError> {
        let author = keypair.public().to_peer_id();
        let delegation = self.delegations.verify(&self.core, statement)?;
        let heads = self.doc.get_heads();
        let effective = time.max(self.dag.max_time(&heads)).max(delegation.issued_at);
        delegation.check(&self.core, &author, effective)?;
        if namespace != RESERVED_NAMESPACE && !delegation::may_write(&delegation, namespace) {
            return Err(DelegationError::NamespaceNotDelegated(namespace.to_owned()).into());
        }
        let actor = self.local_actor(author);
        let (_, suffix) = change::split_actor(&actor).ok_or(WriteError::NoChange)?;
        let next_seq = self.dag.actor_index.get(&actor).map(|i| self.dag.actors[*i as usize].chain.len() as u64).unwrap_or(0) + 1;
        if let Some((keep, _)) = self.keep_for(&actor, &author, &suffix) {
            if next_seq > keep {
                return Err(WriteError::Revoked(author));
            }
        }
        self.doc.set_actor(actor);
        let mut options = CommitOptions::default().with_time(time);
        if let Some(m) = message {
            options = options.with_message(m);
        }
        // Automerge asserts its own invariants with panics; should one fire, the write fails and
        // the document is rebuilt from the store, and the node goes on.
        let doc = &mut self.doc;
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| doc.transact_with(|_| options, write)));
        let hash = match outcome {
            Ok(Ok(success)) => success.hash.ok_or(WriteError::NoChange)?,
            Ok(Err(failure)) => return Err(failure.error.into()),
            Err(_) => {
                tracing::error!(core = %self.core, "Automerge panicked in a local transaction; rebuilding the document");
                self.rebuild_from_store()?;
                return Err(WriteError::Rejected(Rejected::MalformedChange("Automerge failed to make the change".into())));
            }
        };
        let change = self.doc.get_change_by_hash(&hash).ok_or(WriteError::NoChange)?;
        let envelope = seal(&self.core, change.raw_bytes().to_vec(), keypair, statement)
            .map_err(|e| WriteError::Signing(e.to_string()))?;
        // The same checks every other replica will run.
        let checked = check_envelope(&self.core, envelope.clone(), &self.delegations, self.config.max_change_size);
        let verdict = checked.and_then(|c| self.plan(&c).map(|p| (c, p)));
        let (checked, plan) = match verdict {
            Ok(v) => v,
            Err(reason) => {
                tracing::error!(core = %self.core, %reason, "a local change failed verification; rolling back");
                self.rebuild_from_store()?;
                return Err(WriteError::Rejected(reason));
            }
        };
        self.commit_plan(&checked, plan);
        let store = self.store.clone();
        let mut batch = store.batch();
        self.persist_change(&checked, &mut batch);
        batch.commit(self.config.sync_local_writes).map_err(CoreError::from)?;
        Ok(envelope)
    }

    /// Writes `value` at `namespace/path` as this node (`keypair`, authorized by `delegation`):
    /// makes one Automerge change, signs it, stores it (synced: it survives a crash once this
    /// returns) and returns the envelope to publish.
    pub fn set(
        &mut self,
        namespace: &str,
        path: &str,
        value: &serde_json::Value,
        keypair: &Keypair,
        delegation: &OwnerStatement,
    ) -> Result<SignedChange, WriteError> {
        self.set_at(namespace, path, value, keypair, delegation, unix_now())
    }

    /// [`Replica::set`] with an explicit change time (unix seconds).
    pub fn set_at(
        &mut self,
        namespace: &str,
        path: &str,
        value: &serde_json::Value,
        keypair: &Keypair,
        delegation: &OwnerStatement,
        time: i64,
    ) -> Result<SignedChange, WriteError> {
        if !delegation::is_valid_namespace(namespace) {
            return Err(WriteError::Namespace(namespace.to_owned()));
        }
        let segments = value::parse_path(path)?;
        self.local_change(keypair, delegation, time, None, namespace, |tx| {
            value::set_path(tx, namespace, &segments, value)
        })
    }

    /// Reads `namespace/path` (`""` for the whole namespace); `None` when nothing is there.
    pub fn get(&self, namespace: &str, path: &str) -> Result<Option<serde_json::Value>, PathError> {
        let segments = value::parse_path(path)?;
        self.read_path(namespace, &segments)
    }

    /// Reads `namespace/segments` through the cache of values read since the document last
    /// changed (see `ReadCache`).
    pub(super) fn read_path(&self, namespace: &str, segments: &[String]) -> Result<Option<serde_json::Value>, PathError> {
        let heads = self.doc.get_heads();
        let key = (namespace.to_owned(), segments.to_vec());
        if let Ok(mut cache) = self.reads.lock() {
            if cache.heads != heads {
                *cache = ReadCache { heads: heads.clone(), ..ReadCache::default() };
            } else if let Some(hit) = cache.values.get(&key) {
                return Ok(hit.clone());
            }
        }
        let value = value::get_path(&self.doc, namespace, segments)?;
        let size = match &value {
            Some(v) => json_size(v, READ_CACHE_BYTES / 4),
            None => Some(0),
        };
        if let (Some(size), Ok(mut cache)) = (size, self.reads.lock()) {
            if cache.heads == heads {
                if cache.values.len() >= READ_CACHE_VALUES || cache.bytes + size > READ_CACHE_BYTES {
                    cache.values.clear();
                    cache.bytes = 0;
                }
                cache.bytes += size + namespace.len() + segments.iter().map(String::len).sum::<usize>();
                cache.values.insert(key, value.clone());
            }
        }
        Ok(value)
    }

    /// The namespaces present in the document.
    pub fn namespaces(&self) -> Vec<String> {
        value::namespaces(&self.doc)
    }

    /// Carries an owner-signed revocation into the core as a change of this node (any valid
    /// delegation will do: the owner's signature is the authority). Applies it locally, which
    /// invalidates the revoked key's later changes here at once.
    pub fn revoke(
        &mut self,
        revocation: &OwnerStatement,
        keypair: &Keypair,
        delegation: &OwnerStatement,
    ) -> Result<SignedChange, WriteError> {
        self.revoke_at(revocation, keypair, delegation, unix_now())
    }

    /// [`Replica::revoke`] with an explicit change time.
    pub fn revoke_at(
        &mut self,
        revocation: &OwnerStatement,
        keypair: &Keypair,
        delegation: &OwnerStatement,
        time: i64,
    ) -> Result<SignedChange, WriteError> {
        let verified = Revocation::verify(revocation)?;
        if verified.owner != self.core {
            return Err(DelegationError::WrongCore { core: self.core, owner: verified.owner }.into());
        }
        // If this replica's history already contains changes of the revoked key past the cut,
        // the first carrier descends from them and is itself cut off; it then carries the
        // revocation again on the cleaned history.
        let mut last = None;
        for _ in 0..2 {
            let envelope = self.carry_revocation(revocation, &verified, keypair, delegation, time)?;
            let hash = change::decode_change(&envelope.change).map(|(c, _)| c.hash()).map_err(WriteError::Rejected)?;
            let carried = self.contains(&hash);
            last = Some(envelope);
            if carried {
                break;
            }
        }
        last.ok_or(WriteError::NoChange)
    }

    fn carry_revocation(
        &mut self,
        revocation: &OwnerStatement,
        verified: &Revocation,
        keypair: &Keypair,
        delegation: &OwnerStatement,
        time: i64,
    ) -> Result<SignedChange, WriteError> {
        let record = RevocationRecord::new(revocation);
        let message = serde_json::to_string(&record).map_err(|e| WriteError::Signing(e.to_string()))?;
        let id_hex = hex::encode(verified.id);
        let value = serde_json::json!({
            "peer": verified.peer.to_string(),
            "message": record.message,
            "signature": record.signature,
        });
        let path = vec!["revocations".to_owned(), id_hex];
        let envelope = self.local_change(keypair, delegation, time, Some(message), RESERVED_NAMESPACE, |tx| {
            value::set_path(tx, RESERVED_NAMESPACE, &path, &value)
        })?;
        // Learn the fact through the ordinary path so the cut applies here too.
        let store = self.store.clone();
        let mut batch = store.batch();
        let checked = check_envelope(&self.core, envelope.clone(), &self.delegations, self.config.max_change_size)
            .map_err(WriteError::Rejected)?;
        let learned = self.learn(&checked, &mut batch);
        if !batch.is_empty() {
            batch.commit(true).map_err(CoreError::from)?;
        }
        if learned.relaxed || (learned.any && !self.cut_violations().is_empty()) {
            self.rederive()?;
        }
        Ok(envelope)
    }

    /// For each actor `peer` wrote with, the last change this replica holds: the cut a
    /// revocation signed now would keep.
    pub fn revocation_keep(&self, peer: &PeerId) -> BTreeMap<[u8; 8], Kept> {
        self.dag
            .actors
            .iter()
            .filter(|a| a.peer == *peer)
            .filter_map(|a| a.chain.last().map(|hash| (a.suffix, Kept { seq: a.chain.len() as u64, hash: *hash })))
            .collect()
    }

    /// The revocation message for the owner to sign, keeping what this replica holds of `peer`.
    pub fn revocation_message(&self, peer: &PeerId, now: OffsetDateTime) -> Result<String, DelegationError> {
        delegation::revocation_message(&self.core, peer, &self.revocation_keep(peer), now)
    }

    /// Revocations this replica knows.
    pub fn revocations(&self) -> Vec<Revocation> {
        self.revocations.values().map(|(r, _)| r.clone()).collect()
    }

    /// Known revocations that no valid change of the document records (their carrier was
    /// itself invalid). A node with write access should carry them again with
    /// [`Replica::revoke`] so that followers learn them through the document.
    pub fn uncarried_revocations(&self) -> Vec<OwnerStatement> {
        self.revocations
            .values()
            .filter(|(r, _)| {
                self.get(RESERVED_NAMESPACE, &format!("revocations/{}", hex::encode(r.id))).ok().flatten().is_none()
            })
            .map(|(_, s)| s.clone())
            .collect()
    }

    /// How many valid changes keys other than `peer` made, and how many revocations are
    /// known: what changes when someone else alters which devices are current or who holds a
    /// data key (see `private`'s cache of its rotation decision).
    pub(super) fn others_state(&self, peer: &PeerId) -> (usize, usize) {
        (self.dag.actors.iter().filter(|a| a.peer != *peer).map(|a| a.chain.len()).sum(), self.revocations.len())
    }

    /// The core id.
    pub fn core(&self) -> Address {
        self.core
    }

    /// The document's heads, sorted.
    pub fn heads(&self) -> Vec<ChangeHash> {
        let mut heads = self.doc.get_heads();
        heads.sort();
        heads
    }

    /// Number of valid changes.
    pub fn len(&self) -> usize {
        self.dag.metas.len()
    }

    /// Whether the core has no change yet.
    pub fn is_empty(&self) -> bool {
        self.dag.metas.is_empty()
    }

    /// Bytes of the stored change records of the core (what the document is made of).
    pub fn stored_bytes(&self) -> usize {
        self.stored_bytes
    }

    /// A rough estimate of the memory this replica takes: the document and its history indexes
    /// grow with the changes (measured: about 4 bytes in memory per stored byte, plus ~300 bytes
    /// of indexes per change), plus what waits for dependencies.
    pub fn approx_bytes(&self) -> usize {
        4 * self.stored_bytes + 300 * self.dag.metas.len() + self.pending.bytes + self.evidence.len() * 1024 + 4096
    }

    /// Whether the replica holds state that is not in the store: catch-up sessions in
    /// progress, or changes held back for missing dependencies. Such a replica is not unloaded.
    pub fn is_busy(&self) -> bool {
        !self.sessions.is_empty() || !self.pending.items.is_empty()
    }

    /// Changes held back for missing dependencies.
    pub fn pending_len(&self) -> usize {
        self.pending.items.len()
    }

    /// Dependencies this replica lacks for its held-back changes (ask peers for them).
    pub fn missing_deps(&self) -> Vec<ChangeHash> {
        let mut out: BTreeSet<ChangeHash> = BTreeSet::new();
        for (_, item) in self.pending.items.values() {
            for d in item.change.deps() {
                if !self.dag.metas.contains_key(d) && !self.pending.items.contains_key(d) {
                    out.insert(*d);
                }
            }
        }
        out.into_iter().collect()
    }

    /// This node's newest delegation for the core, if it writes it: the one its device key,
    /// revocations and messages are signed under.
    pub fn own_delegation(&self) -> Option<&OwnerStatement> {
        self.own_delegations.last().map(|(statement, _)| statement)
    }

    /// The delegation a write of `namespace` now goes under: the newest of this node's
    /// delegations that is valid now and covers the namespace; else the newest (whose refusal
    /// then names what is wrong).
    pub fn own_delegation_for(&self, namespace: &str) -> Option<&OwnerStatement> {
        self.own_delegation_for_at(namespace, unix_now())
    }

    /// [`Self::own_delegation_for`] at a given time (unix seconds).
    pub fn own_delegation_for_at(&self, namespace: &str, now: i64) -> Option<&OwnerStatement> {
        self.own_delegations
            .iter()
            .rev()
            .find(|(_, d)| d.valid_at(now).is_ok() && delegation::may_write(d, namespace))
            .map(|(statement, _)| statement)
            .or_else(|| self.own_delegation())
    }

    /// Adds (verifying it) a delegation of this node for the core, or clears them all (`None`);
    /// persisted. Delegations expired at `now` are dropped, and the oldest beyond
    /// [`MAX_OWN_DELEGATIONS`]: a new login keeps the earlier apps' namespaces writable.
    pub fn set_own_delegation(&mut self, statement: Option<OwnerStatement>) -> Result<(), CoreError> {
        self.set_own_delegation_at(statement, unix_now())
    }

    /// [`Self::set_own_delegation`] at a given time (unix seconds).
    pub fn set_own_delegation_at(&mut self, statement: Option<OwnerStatement>, now: i64) -> Result<(), CoreError> {
        let mut kept = match &statement {
            None => Vec::new(),
            Some(s) => {
                let d = Delegation::verify(s)?;
                if d.owner != self.core {
                    return Err(DelegationError::WrongCore { core: self.core, owner: d.owner }.into());
                }
                let id = self.remember_statement(s.clone());
                self.store.put_sync(Column::Cores, &core_key(&self.core, b'd', &id), &s.encode_to_vec())?;
                self.stored_statements.insert(id);
                let mut kept: Vec<_> = self
                    .own_delegations
                    .iter()
                    .filter(|(_, old)| old.id != d.id && old.expires_at >= now)
                    .cloned()
                    .collect();
                kept.push((s.clone(), d));
                kept
            }
        };
        if kept.len() > MAX_OWN_DELEGATIONS {
            kept.drain(..kept.len() - MAX_OWN_DELEGATIONS);
        }
        let json: Vec<StatementJson> = kept.iter().map(|(s, _)| StatementJson::from_statement(s)).collect();
        let meta = CoreMeta { version: 2, delegation: json.last().cloned(), delegations: json };
        self.store.put_sync(
            Column::Cores,
            &meta_key(&self.core),
            &serde_json::to_vec(&meta).map_err(|e| corrupt(&meta_key(&self.core), e))?,
        )?;
        self.own_delegations = kept;
        Ok(())
    }

    /// The Automerge document (read-only).
    pub fn document(&self) -> &Automerge {
        &self.doc
    }

    /// The time of a valid change as the rules see it (own timestamp raised to its
    /// dependencies'), unix seconds.
    pub fn change_time(&self, hash: &ChangeHash) -> Option<i64> {
        self.dag.metas.get(hash).map(|m| m.time)
    }

    /// Whether a change is valid and in the document.
    pub fn contains(&self, hash: &ChangeHash) -> bool {
        self.dag.metas.contains_key(hash)
    }
}

/// The history-free checks of a batch of envelopes of `core` ([`change::check_envelope`]), on
/// several threads for large batches. Needs nothing of the replica but the shared delegation
/// cache, so it runs off the thread that owns the replicas.
pub(crate) fn check_batch(
    core: &Address,
    mut envelopes: Vec<SignedChange>,
    delegations: &Delegations,
    config: &Config,
) -> Vec<Result<Checked, Rejected>> {
    inflate_batch(&mut envelopes);
    let max = config.max_change_size;
    let threads = config.verify_threads.max(1);
    if envelopes.len() < 64 || threads == 1 {
        let mut keys = AuthorKeys::default();
        return envelopes.into_iter().map(|e| check_envelope_with(core, e, delegations, max, &mut keys)).collect();
    }
    let chunk = envelopes.len().div_ceil(threads);
    let mut chunks: Vec<Vec<SignedChange>> = Vec::new();
    let mut iter = envelopes.into_iter();
    loop {
        let part: Vec<SignedChange> = iter.by_ref().take(chunk).collect();
        if part.is_empty() {
            break;
        }
        chunks.push(part);
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|part| {
                scope.spawn(move || {
                    let mut keys = AuthorKeys::default();
                    part.into_iter().map(|e| check_envelope_with(core, e, delegations, max, &mut keys)).collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|_| vec![Err(Rejected::MalformedChange("verification panicked".into()))]))
            .collect()
    })
}

/// The gossip verdict of a one-envelope batch.
pub(super) fn outcome(report: BatchReport) -> Result<Accepted, ApplyError> {
    let summary = Report { applied: report.applied.clone(), invalidated: report.invalidated.clone(), rebuilt: report.rebuilt };
    if !report.applied.is_empty() {
        Ok(Accepted::Applied(summary))
    } else if report.learned {
        Ok(Accepted::Evidence(summary))
    } else if let Some((_, reason)) = report.rejected.into_iter().next() {
        Err(ApplyError::Rejected(reason))
    } else if !report.held.is_empty() {
        Ok(Accepted::MissingDeps { missing: report.missing })
    } else {
        Ok(Accepted::Duplicate)
    }
}
