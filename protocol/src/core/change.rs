//! `SignedChange` envelopes: one Automerge change, signed by the node key that made it.
//!
//! # Wire format (`kubelt.core.v1.SignedChange`)
//!
//! | field | content |
//! |---|---|
//! | `core` | lower-case `0x` address of the core |
//! | `change` | the bytes of **one uncompressed** Automerge change chunk, at most [`MAX_CHANGE_SIZE`] |
//! | `author` | the author's libp2p public key, protobuf encoding |
//! | `signature` | the author's signature over [`signing_bytes`]`(core, change)` |
//! | `delegation` | the owner-signed delegation the author relies on (see [`super::delegation`]) |
//!
//! - **Signing bytes** are `"kubelt-core-change-v1" 0x00 <core, 42 ASCII bytes> 0x00
//!   sha2-256(change)`: domain-separated so a node signature over a change can never be
//!   replayed as anything else (a libp2p record, a change of another core).
//! - **Actor binding**: the change's Automerge actor id must be the author's peer id bytes
//!   followed by an 8-byte suffix ([`actor_id`]). The suffix is random per writing session, so
//!   a node never reuses a (actor, seq) pair even after a crash or a rebuild. Binding the actor to
//!   the key means a change's author is a property of the change bytes themselves: an envelope
//!   cannot re-attribute a change, and two changes with the same actor and sequence number are a
//!   signed proof that the key equivocated.
//! - **Compressed chunks are refused**, so a 1 MiB envelope cannot inflate into gigabytes.
//! - **Revocations** travel in the change itself: its commit message is
//!   `{"kubelt":"revocation","message":…,"signature":"0x…"}` ([`RevocationRecord`]) and its
//!   operations may only touch the reserved `_kubelt` namespace.
//! - **Batches** (the `changes` lists of `SyncRequest`/`SyncResponse`) may omit the delegation
//!   of an envelope whose author already appeared earlier in the same list; it is the same as
//!   that earlier envelope's. The signature does not cover the delegation, so this loses
//!   nothing, and it saves ~700 bytes per change on catch-up.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use automerge::legacy::{ElementId, Key, ObjectId, OpId, OpType};
use automerge::{ActorId, Change, ChangeHash, ExpandedChange};
use kubelt_proto::core::{OwnerStatement, SignedChange};
use libp2p::identity::{Keypair, PeerId, PublicKey, SigningError};
use sha2::{Digest, Sha256};

use super::address::Address;
use super::bounds::scan_change;
use super::delegation::{Delegation, DelegationError, Revocation, RESERVED_NAMESPACE};

/// Largest change an envelope may carry (bytes).
pub const MAX_CHANGE_SIZE: usize = 1 << 20;

/// Largest author key (protobuf-encoded libp2p public key; RSA keys are the large ones).
const MAX_AUTHOR_KEY: usize = 2048;
/// Largest author signature.
const MAX_SIGNATURE: usize = 1024;

/// Domain separator of [`signing_bytes`].
pub const SIGNING_DOMAIN: &[u8] = b"kubelt-core-change-v1";

/// Length of the random part of an actor id.
pub const ACTOR_SUFFIX_LEN: usize = 8;

/// The bytes an author signs for a change of `core`.
pub fn signing_bytes(core: &Address, change: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIGNING_DOMAIN.len() + 1 + 42 + 1 + 32);
    out.extend_from_slice(SIGNING_DOMAIN);
    out.push(0);
    out.extend_from_slice(core.to_lower_hex().as_bytes());
    out.push(0);
    out.extend_from_slice(&Sha256::digest(change));
    out
}

/// The Automerge actor id of a writing session of `peer`.
pub fn actor_id(peer: &PeerId, suffix: [u8; ACTOR_SUFFIX_LEN]) -> ActorId {
    let mut bytes = peer.to_bytes();
    bytes.extend_from_slice(&suffix);
    ActorId::from(bytes)
}

/// Splits an actor id into the peer id and the session suffix; `None` if it is not of that shape.
pub fn split_actor(actor: &ActorId) -> Option<(PeerId, [u8; ACTOR_SUFFIX_LEN])> {
    let bytes = actor.to_bytes();
    if bytes.len() <= ACTOR_SUFFIX_LEN {
        return None;
    }
    let (peer, suffix) = bytes.split_at(bytes.len() - ACTOR_SUFFIX_LEN);
    let peer = PeerId::from_bytes(peer).ok()?;
    let mut out = [0u8; ACTOR_SUFFIX_LEN];
    out.copy_from_slice(suffix);
    Some((peer, out))
}

/// Wraps change bytes in an envelope signed by `keypair`.
pub fn seal(
    core: &Address,
    change: Vec<u8>,
    keypair: &Keypair,
    delegation: &OwnerStatement,
) -> Result<SignedChange, SigningError> {
    let signature = keypair.sign(&signing_bytes(core, &change))?;
    Ok(SignedChange {
        core: core.to_lower_hex(),
        change: change.into(),
        author: keypair.public().encode_protobuf().into(),
        signature: signature.into(),
        delegation: Some(delegation.clone()),
    })
}

/// The commit message of a change that carries a revocation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RevocationRecord {
    /// Always `"revocation"`.
    pub kubelt: String,
    /// The SIWE revocation message, as signed.
    pub message: String,
    /// The wallet signature, `0x` hex.
    pub signature: String,
}

impl RevocationRecord {
    /// The record for a statement.
    pub fn new(statement: &OwnerStatement) -> Self {
        RevocationRecord {
            kubelt: "revocation".into(),
            message: statement.message.clone(),
            signature: format!("0x{}", hex::encode(&statement.signature)),
        }
    }

    /// The statement it records.
    pub fn statement(&self) -> Result<OwnerStatement, DelegationError> {
        super::delegation::owner_statement(&self.message, &self.signature)
    }
}

const REVOCATION_PREFIX: &str = "{\"kubelt\":\"revocation\"";

/// Why a change was not accepted. Every replica gives the same verdict for the same change and
/// history; the messages are meant for logs and for the person debugging a node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejected {
    /// The envelope is for another core.
    #[error("the change is for core {got}, not {expected}")]
    WrongCore {
        /// The core that was asked to apply it.
        expected: String,
        /// The core the envelope names.
        got: String,
    },
    /// This node does not hold the core the envelope names.
    #[error("this node does not replicate core {0}")]
    UnknownCore(String),
    /// The change bytes exceed [`MAX_CHANGE_SIZE`].
    #[error("the change is {size} bytes, more than the {max} allowed")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The cap.
        max: usize,
    },
    /// A missing or undecodable envelope field.
    #[error("malformed envelope: {0}")]
    MalformedEnvelope(String),
    /// The change bytes are not one valid uncompressed Automerge change.
    #[error("malformed Automerge change: {0}")]
    MalformedChange(String),
    /// The author's signature does not verify.
    #[error("the author's signature does not verify")]
    BadSignature,
    /// The change's actor id is not the author's peer id plus a suffix.
    #[error("the change's actor {actor} does not belong to the author {author}")]
    ActorMismatch {
        /// Actor id, hex.
        actor: String,
        /// The envelope's author (peer id, base58).
        author: String,
    },
    /// The delegation is invalid or does not cover this change (wrong core, wrong key,
    /// expired at the change's time, …).
    #[error("delegation: {0}")]
    Delegation(DelegationError),
    /// The change writes a namespace the delegation does not cover, or the reserved one.
    #[error("the change writes namespace {namespace:?}: {reason}")]
    Namespace {
        /// The top-level key written.
        namespace: String,
        /// Why that is not allowed.
        reason: String,
    },
    /// The change carries a revocation that does not verify.
    #[error("revocation: {0}")]
    Revocation(DelegationError),
    /// The author's key was revoked by the owner and this change is past the kept history.
    #[error("node key {author} was revoked by the owner; change {seq} of its session is after the last kept ({keep})")]
    Revoked {
        /// The revoked key (peer id, base58).
        author: String,
        /// The change's sequence number in its actor.
        seq: u64,
        /// The last kept sequence number of that actor.
        keep: u64,
    },
    /// The author signed two different changes with the same actor and sequence number.
    #[error("node key {author} signed two different changes with sequence number {seq}: all its changes from there on are void")]
    Equivocation {
        /// The key (peer id, base58).
        author: String,
        /// The sequence number used twice.
        seq: u64,
    },
    /// The author's key was revoked, and this change takes the place of the change the
    /// revocation kept at that sequence number.
    #[error("node key {author} was revoked by the owner; its change {seq} conflicts with the change the revocation kept")]
    NotKept {
        /// The revoked key (peer id, base58).
        author: String,
        /// The change's sequence number in its actor.
        seq: u64,
    },
    /// The change's first operation counter does not follow from its history.
    #[error("the change starts at operation {got}; its history puts its first operation at {expected}")]
    BadStartOp {
        /// One past the largest counter of the change's history.
        expected: u64,
        /// What the change says.
        got: u64,
    },
    /// A dependency is a change that is itself invalid.
    #[error("depends on invalid change {0}")]
    DependsOnInvalid(ChangeHash),
    /// The change skips or repeats sequence numbers of its actor.
    #[error("sequence number {got} of its actor, expected {expected}")]
    SequenceGap {
        /// What its history implies.
        expected: u64,
        /// What it says.
        got: u64,
    },
    /// An operation refers to an object or operation outside the change's causal history.
    #[error("bad reference: {0}")]
    BadReference(String),
    /// The change claims a time too far ahead of this node's clock; it is refused for now,
    /// not judged (see [`super::Config::max_clock_skew`]).
    #[error("the change is dated {}, more than the allowed clock skew ahead of this node ({}); retry later", super::delegation::fmt_time(*time), super::delegation::fmt_time(*horizon))]
    FromTheFuture {
        /// The change's own timestamp.
        time: i64,
        /// This node's clock plus the allowed skew.
        horizon: i64,
    },
    /// This replica already found the change invalid.
    #[error("already found invalid: {0}")]
    KnownInvalid(String),
}

/// A change that passed every check that does not depend on the core's history.
#[derive(Debug, Clone)]
pub(crate) struct Checked {
    /// The envelope, with its delegation filled in.
    pub envelope: SignedChange,
    pub change: Change,
    pub expanded: ExpandedChange,
    pub hash: ChangeHash,
    pub author: PeerId,
    pub suffix: [u8; ACTOR_SUFFIX_LEN],
    pub delegation: Arc<Delegation>,
    pub delegation_id: [u8; 32],
    /// The revocation the change carries, if any.
    pub revocation: Option<(Revocation, OwnerStatement)>,
}

/// Delegations verified for a core, by [`super::delegation::statement_id`], shared by every
/// replica and every verification thread. Only delegations by a core's owner are kept (nobody
/// else can make those), and only up to [`Delegations::CAP`]: it is a cache, and losing an entry
/// costs one ECDSA recovery. Failures are not kept: an envelope reaches delegation checking only
/// after its author's signature verified, and peers' budgets bound how often that happens.
#[derive(Debug, Clone, Default)]
pub(crate) struct Delegations(Arc<Mutex<HashMap<[u8; 32], Arc<Delegation>>>>);

impl Delegations {
    /// Most cached delegations.
    pub(crate) const CAP: usize = 8192;

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Arc<Delegation>>> {
        // A panic while holding the lock cannot leave the map inconsistent (single inserts).
        crate::lock(&self.0)
    }

    /// Verifies `statement` as a delegation of `core`, from the cache when possible.
    pub(crate) fn verify(&self, core: &Address, statement: &OwnerStatement) -> Result<Arc<Delegation>, DelegationError> {
        let id = super::delegation::statement_id(statement);
        if let Some(hit) = self.lock().get(&id) {
            return Ok(hit.clone());
        }
        let delegation = Arc::new(Delegation::verify(statement)?);
        if delegation.owner != *core {
            return Err(DelegationError::WrongCore { core: *core, owner: delegation.owner });
        }
        let mut map = self.lock();
        if map.len() >= Self::CAP {
            map.clear();
        }
        map.insert(id, delegation.clone());
        Ok(delegation)
    }
}

/// Decodes change bytes: one uncompressed change chunk, within the bounds of
/// [`super::bounds`]. Automerge runs inside `catch_unwind`: a panic on hostile bytes costs a
/// rejection, not the node.
pub(crate) fn decode_change(bytes: &[u8]) -> Result<(Change, ExpandedChange), Rejected> {
    scan_change(bytes).map_err(Rejected::MalformedChange)?;
    decode_scanned(bytes)
}

/// [`decode_change`] for bytes that [`scan_change`] already accepted.
fn decode_scanned(bytes: &[u8]) -> Result<(Change, ExpandedChange), Rejected> {
    let decoded = std::panic::catch_unwind(|| {
        let change = Change::from_bytes(bytes.to_vec()).map_err(|e| Rejected::MalformedChange(e.to_string()))?;
        let expanded = change.decode();
        Ok((change, expanded))
    });
    decoded.unwrap_or_else(|_| Err(Rejected::MalformedChange("inconsistent operations".into())))
}

/// Parses the revocation a change's commit message carries, if it carries one.
pub(crate) fn carried_revocation(
    change: &Change,
    core: &Address,
) -> Result<Option<(Revocation, OwnerStatement)>, Rejected> {
    let Some(message) = change.message() else { return Ok(None) };
    if !message.starts_with(REVOCATION_PREFIX) {
        return Ok(None);
    }
    let record: RevocationRecord = serde_json::from_str(message)
        .map_err(|e| Rejected::Revocation(DelegationError::Malformed(format!("revocation record: {e}"))))?;
    let statement = record.statement().map_err(Rejected::Revocation)?;
    let revocation = Revocation::verify(&statement).map_err(Rejected::Revocation)?;
    if revocation.owner != *core {
        return Err(Rejected::Revocation(DelegationError::WrongCore { core: *core, owner: revocation.owner }));
    }
    Ok(Some((revocation, statement)))
}

/// An envelope whose author's signature verified over the raw bytes, and whose change header
/// (scanned, not yet decoded by Automerge) names an actor of that author.
#[derive(Debug, Clone)]
pub(crate) struct Signed {
    envelope: SignedChange,
    author: PeerId,
    suffix: [u8; ACTOR_SUFFIX_LEN],
}

/// The first checks of an envelope, in the order that keeps hostile bytes away from
/// dependencies: core, sizes, the author's signature over the raw change bytes, then a bounded
/// scan of the change header ([`scan_change`]) for the actor, which must be the author's.
/// Nothing here decodes the change with Automerge or verifies the owner's ECDSA signature.
pub(crate) fn check_signed(core: &Address, envelope: SignedChange, max_size: usize, keys: &mut AuthorKeys) -> Result<Signed, Rejected> {
    let core_hex = core.to_lower_hex();
    if envelope.core != core_hex {
        return Err(Rejected::WrongCore { expected: core_hex, got: envelope.core.clone() });
    }
    if envelope.change.len() > max_size {
        return Err(Rejected::TooLarge { size: envelope.change.len(), max: max_size });
    }
    if envelope.author.is_empty() || envelope.author.len() > MAX_AUTHOR_KEY {
        return Err(Rejected::MalformedEnvelope("no author key, or one too long".into()));
    }
    let (author_key, author) = keys.decode(&envelope.author)?;
    if envelope.signature.is_empty() || envelope.signature.len() > MAX_SIGNATURE {
        return Err(Rejected::MalformedEnvelope("no signature, or one too long".into()));
    }
    if envelope.delegation.is_none() {
        return Err(Rejected::MalformedEnvelope("no delegation".into()));
    }
    if !author_key.verify(&signing_bytes(core, &envelope.change), &envelope.signature) {
        return Err(Rejected::BadSignature);
    }
    let header = scan_change(&envelope.change).map_err(Rejected::MalformedChange)?;
    let author = *author;
    let suffix = match split_actor(&ActorId::from(header.actor.as_slice())) {
        Some((peer, suffix)) if peer == author => suffix,
        _ => return Err(Rejected::ActorMismatch { actor: hex::encode(&header.actor), author: author.to_string() }),
    };
    Ok(Signed { envelope, author, suffix })
}

/// The rest of the history-free checks of a [`Signed`] envelope: the owner's delegation of the
/// author (verified through `delegations`), then the change decoded by Automerge, then the
/// revocation it may carry.
pub(crate) fn check_delegated(core: &Address, signed: Signed, delegations: &Delegations) -> Result<Checked, Rejected> {
    let Signed { envelope, author, suffix } = signed;
    let statement = envelope.delegation.as_ref().ok_or_else(|| Rejected::MalformedEnvelope("no delegation".into()))?;
    let delegation = delegations.verify(core, statement).map_err(Rejected::Delegation)?;
    if delegation.peer != author {
        return Err(Rejected::Delegation(DelegationError::WrongPeer {
            delegated: delegation.peer.to_string(),
            author: author.to_string(),
        }));
    }
    let delegation_id = delegation.id;
    let (change, expanded) = decode_scanned(&envelope.change)?;
    let revocation = carried_revocation(&change, core)?;
    let hash = change.hash();
    Ok(Checked { envelope, change, expanded, hash, author, suffix, delegation, delegation_id, revocation })
}

/// Every history-free check of one envelope ([`check_signed`], then [`check_delegated`]).
pub(crate) fn check_envelope(
    core: &Address,
    envelope: SignedChange,
    delegations: &Delegations,
    max_size: usize,
) -> Result<Checked, Rejected> {
    check_envelope_with(core, envelope, delegations, max_size, &mut AuthorKeys::default())
}

/// [`check_envelope`] with the authors' keys decoded once for a whole batch.
pub(crate) fn check_envelope_with(
    core: &Address,
    envelope: SignedChange,
    delegations: &Delegations,
    max_size: usize,
    keys: &mut AuthorKeys,
) -> Result<Checked, Rejected> {
    check_delegated(core, check_signed(core, envelope, max_size, keys)?, delegations)
}

/// Most authors whose keys one [`AuthorKeys`] keeps.
const MAX_CACHED_AUTHORS: usize = 64;

/// Authors' public keys, decoded once per batch of envelopes: a catch-up batch comes from few
/// authors, and decoding an ed25519 key (a point decompression) was a tenth of each envelope's
/// check. Keyed by the exact bytes, so a key taken from here is the one those bytes decode to:
/// the verdict is the same as without it.
#[derive(Default)]
pub(crate) struct AuthorKeys(HashMap<bytes::Bytes, (PublicKey, PeerId)>);

impl AuthorKeys {
    fn decode(&mut self, bytes: &bytes::Bytes) -> Result<&(PublicKey, PeerId), Rejected> {
        if !self.0.contains_key(bytes) {
            let key = PublicKey::try_decode_protobuf(bytes).map_err(|e| Rejected::MalformedEnvelope(format!("author key: {e}")))?;
            if self.0.len() >= MAX_CACHED_AUTHORS {
                self.0.clear();
            }
            let peer = key.to_peer_id();
            self.0.insert(bytes.clone(), (key, peer));
        }
        // Present: it was there, or was inserted just above.
        Ok(&self.0[bytes])
    }
}

/// The hash Automerge gives the change in `bytes`, computed without decoding them: SHA-256 over
/// an uncompressed change chunk after its magic bytes and checksum (chunk type, length, body),
/// which is how Automerge hashes a change. `None` for bytes not framed as a change chunk.
///
/// Only ever used to recognise a change already held (equal hashes mean equal bytes), never
/// to trust one: whatever it does not recognise goes through [`check_envelope`].
pub(crate) fn raw_change_hash(bytes: &[u8]) -> Option<ChangeHash> {
    if bytes.len() <= 9 || bytes[..4] != super::bounds::CHUNK_MAGIC || bytes[8] != super::bounds::CHUNK_TYPE_CHANGE {
        return None;
    }
    Some(ChangeHash(Sha256::digest(&bytes[8..]).into()))
}

/// Fills in delegations omitted from a batch: an envelope without one uses the delegation of
/// the last earlier envelope by the same author.
pub(crate) fn inflate_batch(envelopes: &mut [SignedChange]) {
    let mut last: HashMap<bytes::Bytes, OwnerStatement> = HashMap::new();
    for envelope in envelopes.iter_mut() {
        match &envelope.delegation {
            Some(d) => {
                last.insert(envelope.author.clone(), d.clone());
            }
            None => {
                if let Some(d) = last.get(&envelope.author) {
                    envelope.delegation = Some(d.clone());
                }
            }
        }
    }
}


/// What the core's history knows about operations and objects, as seen from one change's
/// causal past.
pub(crate) trait History {
    /// Whether operation `counter` of `actor` exists and is in the change's causal history.
    fn op_in_history(&self, actor: &ActorId, counter: u64) -> Result<(), String>;
    /// The namespace (top-level key) of the object created by operation `counter` of `actor`,
    /// which must be in the change's causal history.
    fn object_namespace(&self, actor: &ActorId, counter: u64) -> Result<Arc<str>, String>;
}

/// What a change touches.
#[derive(Debug, Default)]
pub(crate) struct Touched {
    /// Top-level keys written.
    pub namespaces: BTreeSet<Arc<str>>,
    /// Objects the change creates: operation counter -> namespace.
    pub objects: Vec<(u64, Arc<str>)>,
}

/// Walks a change's operations: every referenced object and operation must be in the change
/// itself or in its causal history, and every operation is attributed to the namespace of
/// the object it writes.
pub(crate) fn inspect(expanded: &ExpandedChange, history: &impl History) -> Result<Touched, Rejected> {
    let start = expanded.start_op.get();
    let own = &expanded.actor_id;
    let mut local_objects: HashMap<u64, Arc<str>> = HashMap::new();
    let mut touched = Touched::default();
    let in_change = |id: &OpId, before: u64| id.actor() == own && id.counter() >= start && id.counter() < before;
    for (i, op) in expanded.operations.iter().enumerate() {
        let counter = start + i as u64;
        let check_ref = |id: &OpId| -> Result<(), Rejected> {
            if in_change(id, counter) {
                Ok(())
            } else {
                history
                    .op_in_history(id.actor(), id.counter())
                    .map_err(|e| Rejected::BadReference(format!("operation {}@{}: {e}", id.counter(), id.actor())))
            }
        };
        let namespace: Arc<str> = match &op.obj {
            ObjectId::Root => match &op.key {
                Key::Map(name) => Arc::from(name.as_str()),
                Key::Seq(_) => return Err(Rejected::BadReference("list operation on the root map".into())),
            },
            ObjectId::Id(id) => {
                if in_change(id, counter) {
                    local_objects.get(&id.counter()).cloned().ok_or_else(|| {
                        Rejected::BadReference(format!("object {}@{} is not an object of this change", id.counter(), id.actor()))
                    })?
                } else {
                    history.object_namespace(id.actor(), id.counter()).map_err(|e| {
                        Rejected::BadReference(format!("object {}@{}: {e}", id.counter(), id.actor()))
                    })?
                }
            }
        };
        if let Key::Seq(ElementId::Id(id)) = &op.key {
            check_ref(id)?;
        }
        for pred in op.pred.iter() {
            check_ref(pred)?;
        }
        if let OpType::Make(_) = op.action {
            local_objects.insert(counter, namespace.clone());
            touched.objects.push((counter, namespace.clone()));
        }
        touched.namespaces.insert(namespace);
    }
    Ok(touched)
}

/// Checks the namespaces a change writes against its delegation: delegated namespaces and the
/// author's own device namespace only, and the reserved one only (and exclusively) when the
/// change carries a revocation.
pub(crate) fn check_namespaces(
    touched: &Touched,
    delegation: &Delegation,
    carries_revocation: bool,
) -> Result<(), Rejected> {
    for namespace in &touched.namespaces {
        let ns: &str = namespace;
        if carries_revocation {
            if ns != RESERVED_NAMESPACE {
                return Err(Rejected::Namespace {
                    namespace: ns.to_owned(),
                    reason: format!("a change carrying a revocation may only write {RESERVED_NAMESPACE}"),
                });
            }
        } else if ns == RESERVED_NAMESPACE {
            return Err(Rejected::Namespace {
                namespace: ns.to_owned(),
                reason: "reserved for owner-signed records (revocations)".into(),
            });
        } else if !super::delegation::may_write(delegation, ns) {
            let reason = if ns.starts_with(super::delegation::DEVICE_NAMESPACE_PREFIX) {
                "a node key publishes only its own device key".to_owned()
            } else {
                format!("the delegation covers only {}", delegation.namespaces)
            };
            return Err(Rejected::Namespace { namespace: ns.to_owned(), reason });
        }
    }
    Ok(())
}
