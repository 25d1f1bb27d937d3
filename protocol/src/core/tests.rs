//! Unit tests of cores, with real signatures: secp256k1 wallets made here, EIP-191 signing,
//! ed25519 node keys.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use automerge::transaction::CommitOptions;
use automerge::{ActorId, Automerge, Change, ChangeHash, ReadDoc};
use kubelt_proto::core::{OwnerStatement, SignedChange};
use libp2p::identity::{Keypair, PeerId};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::json;
use time::OffsetDateTime;

use super::change::{self, RevocationRecord};
use super::delegation::{self, Namespaces};
use super::*;
use crate::store::Store;

pub(super) type TestResult = anyhow::Result<()>;

/// A wallet: the owner of a core.
pub(super) struct Wallet {
    pub(super) dev: DevWallet,
    pub(super) address: Address,
}

impl Wallet {
    pub(super) fn new() -> Self {
        let dev = DevWallet::random();
        Wallet { address: dev.address(), dev }
    }

    /// EIP-191 personal_sign: r ‖ s ‖ v with v = 27/28.
    pub(super) fn sign(&self, message: &str) -> Vec<u8> {
        self.dev.sign(message).expect("signing")
    }

    pub(super) fn statement(&self, message: String) -> OwnerStatement {
        self.dev.statement(message).expect("signing")
    }

    pub(super) fn delegate(&self, peer: &PeerId, namespaces: &[&str], expires_in: Duration, now: i64) -> OwnerStatement {
        self.dev.delegate(peer, namespaces, expires_in, at(now)).expect("delegation")
    }
}

pub(super) fn at(t: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(t).expect("time")
}

pub(super) const T0: i64 = 1_750_000_000;
pub(super) const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

/// A node that writes changes by hand (no replica rules), to craft any history.
pub(super) struct Writer {
    pub(super) keypair: Keypair,
    pub(super) peer: PeerId,
    pub(super) doc: Automerge,
    pub(super) delegation: OwnerStatement,
    pub(super) core: Address,
}

impl Writer {
    pub(super) fn new(owner: &Wallet, namespaces: &[&str], expires_in: Duration) -> Self {
        let keypair = Keypair::generate_ed25519();
        let peer = keypair.public().to_peer_id();
        let delegation = owner.delegate(&peer, namespaces, expires_in, T0);
        let suffix: [u8; 8] = rand::random();
        let doc = Automerge::new().with_actor(change::actor_id(&peer, suffix));
        Writer { keypair, peer, doc, delegation, core: owner.address }
    }

    pub(super) fn commit(&mut self, time: i64, message: Option<String>, f: impl FnOnce(&mut automerge::transaction::Transaction<'_>)) -> SignedChange {
        let mut tx = self.doc.transaction();
        f(&mut tx);
        let mut options = CommitOptions::default().with_time(time);
        if let Some(m) = message {
            options = options.with_message(m);
        }
        let (hash, _) = tx.commit_with(options);
        let hash = hash.expect("a change");
        let change = self.doc.get_change_by_hash(&hash).expect("change");
        change::seal(&self.core, change.raw_bytes().to_vec(), &self.keypair, &self.delegation).expect("seal")
    }

    pub(super) fn write(&mut self, namespace: &str, key: &str, value: serde_json::Value, time: i64) -> SignedChange {
        let path = vec![key.to_owned()];
        self.commit(time, None, |tx| super::value::set_path(tx, namespace, &path, &value).expect("write"))
    }

    pub(super) fn revoke(&mut self, statement: &OwnerStatement, time: i64) -> SignedChange {
        let record = RevocationRecord::new(statement);
        let id = hex::encode(delegation::statement_id(statement));
        let message = serde_json::to_string(&record).expect("json");
        let path = vec!["revocations".to_owned(), id];
        let value = json!({ "message": record.message, "signature": record.signature });
        self.commit(time, Some(message), |tx| {
            super::value::set_path(tx, delegation::RESERVED_NAMESPACE, &path, &value).expect("write")
        })
    }

    pub(super) fn absorb(&mut self, envelopes: &[&SignedChange]) {
        let changes: Vec<Change> =
            envelopes.iter().map(|e| Change::from_bytes(e.change.to_vec()).expect("change")).collect();
        self.doc.apply_changes(changes).expect("apply");
    }

    pub(super) fn actor_suffix(&self) -> [u8; 8] {
        change::split_actor(self.doc.get_actor()).expect("actor").1
    }
}

pub(super) fn hash_of(envelope: &SignedChange) -> ChangeHash {
    Change::from_bytes(envelope.change.to_vec()).expect("change").hash()
}

/// A node with its own store.
pub(super) struct Node {
    pub(super) _dir: tempfile::TempDir,
    pub(super) cores: Cores,
    pub(super) keypair: Keypair,
    pub(super) peer: PeerId,
}

impl Node {
    pub(super) fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path().join("db")).expect("store");
        let cores = Cores::load(store, Config::default()).expect("cores");
        let keypair = Keypair::generate_ed25519();
        let peer = keypair.public().to_peer_id();
        Node { _dir: dir, cores, keypair, peer }
    }

    pub(super) fn replica(&mut self, core: Address) -> &mut Replica {
        self.cores.follow(core).expect("follow")
    }
}

pub(super) fn rejected(result: Result<Accepted, ApplyError>) -> Rejected {
    match result {
        Err(ApplyError::Rejected(r)) => r,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

/// Drives one catch-up session of `a` with `b`; returns the number of round trips.
pub(super) fn sync(a: &mut Node, b: &mut Node, core: Address) -> usize {
    let (a_peer, b_peer) = (a.peer, b.peer);
    a.replica(core);
    b.replica(core);
    let mut request = a.cores.sync_request(&core, &b_peer);
    let mut rounds = 0;
    while let Some(r) = request {
        rounds += 1;
        assert!(rounds < 40, "sync does not converge");
        let response = b.cores.handle_sync_request(r, &a_peer);
        assert!(response.error.is_empty(), "responder error: {}", response.error);
        let step = a.cores.handle_sync_response(response, &b_peer);
        assert!(step.error.is_none(), "requester error: {:?}", step.error);
        request = step.next;
    }
    rounds
}

pub(super) fn snapshot(replica: &Replica) -> (Vec<ChangeHash>, serde_json::Value) {
    let mut doc = serde_json::Map::new();
    for ns in replica.namespaces() {
        doc.insert(ns.clone(), replica.get(&ns, "").expect("get").unwrap_or_default());
    }
    (replica.heads(), serde_json::Value::Object(doc))
}

#[test]
fn delegation_round_trip_recovers_owner_key_namespaces_and_expiry() -> TestResult {
    let owner = Wallet::new();
    let node = Keypair::generate_ed25519().public().to_peer_id();
    let message = delegation_message(&owner.address, &node, &["profile", "apps"], YEAR, at(T0))?;
    assert!(message.contains(&owner.address.to_checksum()), "{message}");
    assert!(message.contains(&format!("URI: urn:kubelt:peer:{node}")), "{message}");
    let signature = owner.sign(&message);
    let statement = owner_statement(&message, &format!("0x{}", hex::encode(&signature)))?;
    let d = Delegation::verify(&statement)?;
    assert_eq!(d.owner, owner.address);
    assert_eq!(d.peer, node);
    assert_eq!(d.namespaces, Namespaces::Only(["apps".to_owned(), "profile".to_owned()].into()));
    assert_eq!(d.expires_at, T0 + YEAR.as_secs() as i64);
    d.check(&owner.address, &node, T0 + 10)?;
    assert!(matches!(d.check(&owner.address, &node, T0 + YEAR.as_secs() as i64 + 1), Err(DelegationError::Expired { .. })));

    // v as 0/1 instead of 27/28, and no 0x prefix.
    let mut raw = signature.clone();
    raw[64] -= 27;
    assert_eq!(Delegation::verify(&owner_statement(&message, &hex::encode(&raw))?)?.owner, owner.address);

    // A wallet that signed the text with CRLF line ends and a trailing newline.
    let pasted = format!("{}\r\n", message.replace('\n', "\r\n"));
    assert_eq!(Delegation::verify(&owner.statement(pasted))?.peer, node);

    // Shape errors say what is wrong.
    assert!(matches!(parse_signature("0xzz"), Err(DelegationError::BadHex(_))));
    assert!(matches!(parse_signature(&format!("0x{}", hex::encode(&signature[..64]))), Err(DelegationError::WrongSignatureLength(64))));
    raw[64] = 5;
    assert!(matches!(parse_signature(&hex::encode(&raw)), Err(DelegationError::BadRecoveryId(5))));
    let garbage = OwnerStatement { message: "hello".into(), signature: signature.clone().into() };
    assert!(matches!(Delegation::verify(&garbage), Err(DelegationError::Malformed(_))));
    Ok(())
}

#[test]
fn delegation_signed_by_another_wallet_is_rejected() -> TestResult {
    let owner = Wallet::new();
    let thief = Wallet::new();
    let node = Keypair::generate_ed25519().public().to_peer_id();
    let message = delegation_message(&owner.address, &node, &["*"], YEAR, at(T0))?;
    let forged = thief.statement(message.clone());
    match Delegation::verify(&forged) {
        Err(DelegationError::SignedBySomeoneElse { signer, claimed }) => {
            assert_eq!(signer, thief.address);
            assert_eq!(claimed, owner.address);
        }
        other => panic!("expected SignedBySomeoneElse, got {other:?}"),
    }
    // A message edited after signing recovers some other address.
    let genuine = owner.statement(message.clone());
    let edited = OwnerStatement { message: message.replace("urn:kubelt:ns:*", "urn:kubelt:ns:wallet"), signature: genuine.signature };
    assert!(matches!(Delegation::verify(&edited), Err(DelegationError::SignedBySomeoneElse { .. })));
    // A revocation is not a delegation.
    let revocation = owner.statement(revocation_message(&owner.address, &node, &BTreeMap::new(), at(T0))?);
    assert!(matches!(Delegation::verify(&revocation), Err(DelegationError::Malformed(_))));
    assert!(Revocation::verify(&revocation).is_ok());
    Ok(())
}

#[test]
fn two_replicas_writing_concurrently_converge_through_sync() -> TestResult {
    let owner = Wallet::new();
    let core = owner.address;
    let (mut a, mut b) = (Node::new(), Node::new());
    let da = owner.delegate(&a.peer, &["profile"], YEAR, T0);
    let db = owner.delegate(&b.peer, &["*"], YEAR, T0);
    let (ka, kb) = (a.keypair.clone(), b.keypair.clone());
    for i in 0..5 {
        a.replica(core).set_at("profile", &format!("a{i}"), &json!(i), &ka, &da, T0 + i)?;
        b.replica(core).set_at("profile", &format!("b{i}"), &json!({ "n": i, "tags": ["x", i] }), &kb, &db, T0 + i)?;
    }
    // Both create the `profile` map concurrently; both sides' keys must stay visible.
    b.replica(core).set_at("apps", "todo/items", &json!(["milk"]), &kb, &db, T0 + 9)?;
    assert_ne!(a.replica(core).heads(), b.replica(core).heads());

    let rounds = sync(&mut a, &mut b, core);
    let (sa, sb) = (snapshot(a.replica(core)), snapshot(b.replica(core)));
    assert_eq!(sa, sb, "replicas diverged after {rounds} rounds");
    assert_eq!(a.replica(core).len(), 11);
    let profile = a.replica(core).get("profile", "")?.unwrap_or_default();
    assert_eq!(profile["a4"], json!(4));
    assert_eq!(profile["b3"], json!({ "n": 3, "tags": ["x", 3] }));
    assert_eq!(a.replica(core).get("apps", "todo/items/0")?, Some(json!("milk")));
    println!("two replicas converged in {rounds} round trip(s)");

    // Nothing more to say.
    assert!(a.cores.sync_request(&core, &b.peer).is_some_and(|r| r.changes.is_empty()));
    Ok(())
}

/// The replica that drives a session pushes what the other lacks in its requests, so a
/// responder takes changes too: it must report them, as a driver reports what responses
/// brought, or its node never announces them (an API subscriber, or a test waiting on the
/// node's events, would not hear of them).
#[test]
fn changes_a_catch_up_request_carries_are_reported_by_the_responder() -> TestResult {
    let owner = Wallet::new();
    let core = owner.address;
    let (mut a, mut b) = (Node::new(), Node::new());
    let da = owner.delegate(&a.peer, &["*"], YEAR, T0);
    let ka = a.keypair.clone();
    let mut written = Vec::new();
    for i in 0..3 {
        a.replica(core).set_at("app", &format!("k{i}"), &json!(i), &ka, &da, T0 + i)?;
        written.extend(a.replica(core).heads());
    }
    b.replica(core);
    let verifier = b.cores.verifier();
    let mut applied = Vec::new();
    let mut request = a.cores.sync_request(&core, &b.peer);
    let mut rounds = 0;
    while let Some(mut r) = request {
        rounds += 1;
        assert!(rounds < 40, "the session does not end");
        let batch = verifier.verify_sync_batch(&r.core.clone(), std::mem::take(&mut r.changes))?;
        let (response, report) = b.cores.handle_verified_sync_request(r, batch, &a.peer);
        assert!(response.error.is_empty() && report.rejected.is_empty(), "{response:?} {report:?}");
        applied.extend(report.applied);
        request = a.cores.handle_sync_response(response, &b.peer).next;
    }
    applied.sort();
    written.sort();
    assert_eq!(applied, written, "the responder reports every change the requests brought");
    assert_eq!(snapshot(b.replica(core)), snapshot(a.replica(core)));
    Ok(())
}

#[test]
fn change_by_a_never_delegated_key_is_rejected() -> TestResult {
    let owner = Wallet::new();
    let mut node = Node::new();
    let delegated = Writer::new(&owner, &["*"], YEAR);
    let mut intruder = Writer::new(&owner, &["*"], YEAR);
    // The intruder presents someone else's delegation.
    intruder.delegation = delegated.delegation.clone();
    let envelope = intruder.write("profile", "name", json!("eve"), T0 + 1);
    let reason = rejected(node.replica(owner.address).apply_remote(envelope.clone()));
    assert!(matches!(reason, Rejected::Delegation(DelegationError::WrongPeer { .. })), "{reason}");
    println!("never-delegated key: {reason}");
    // Or none at all.
    let mut bare = envelope;
    bare.delegation = None;
    let reason = rejected(node.replica(owner.address).apply_remote(bare));
    assert!(matches!(reason, Rejected::MalformedEnvelope(_)), "{reason}");
    // Or a delegation signed by another wallet for this core's key.
    let thief = Wallet::new();
    let mut forged = Writer::new(&owner, &["*"], YEAR);
    forged.delegation = thief.statement(delegation_message(&owner.address, &forged.peer, &["*"], YEAR, at(T0))?);
    let reason = rejected(node.replica(owner.address).apply_remote(forged.write("profile", "name", json!("eve"), T0)));
    assert!(matches!(reason, Rejected::Delegation(DelegationError::SignedBySomeoneElse { .. })), "{reason}");
    assert!(node.replica(owner.address).is_empty());
    Ok(())
}

#[test]
fn expired_delegation_is_judged_by_change_time_not_arrival_time() -> TestResult {
    let owner = Wallet::new();
    let core = owner.address;
    let mut node = Node::new();
    let mut short = Writer::new(&owner, &["*"], Duration::from_secs(100));
    let mut long = Writer::new(&owner, &["*"], YEAR);

    // Made while valid: accepted, even though "now" is long after the expiry.
    let ok = short.write("profile", "a", json!(1), T0 + 50);
    assert!(matches!(node.replica(core).apply_remote(ok.clone()), Ok(Accepted::Applied(_))));

    // Made after expiry.
    let late = short.write("profile", "b", json!(2), T0 + 200);
    let reason = rejected(node.replica(core).apply_remote(late));
    assert!(matches!(reason, Rejected::Delegation(DelegationError::Expired { .. })), "{reason}");
    println!("expired: {reason}");

    // Backdated: claims T0+60 but builds on a change from T0+300, so its time is T0+300.
    let mut short2 = Writer::new(&owner, &["*"], Duration::from_secs(100));
    long.absorb(&[&ok]);
    let recent = long.write("apps", "x", json!(1), T0 + 300);
    assert!(matches!(node.replica(core).apply_remote(recent.clone()), Ok(Accepted::Applied(_))));
    short2.absorb(&[&ok, &recent]);
    let backdated = short2.write("profile", "c", json!(3), T0 + 60);
    let reason = rejected(node.replica(core).apply_remote(backdated));
    assert!(matches!(reason, Rejected::Delegation(DelegationError::Expired { at, .. }) if at == T0 + 300), "{reason}");

    // A local write checks the same rule.
    let keypair = node.keypair.clone();
    let d = owner.delegate(&node.peer, &["*"], Duration::from_secs(100), T0);
    let err = node.replica(core).set_at("profile", "z", &json!(1), &keypair, &d, T0 + 10).unwrap_err();
    assert!(matches!(err, WriteError::Delegation(DelegationError::Expired { .. })), "{err}");
    Ok(())
}

#[test]
fn change_for_another_core_is_rejected() -> TestResult {
    let owner = Wallet::new();
    let other = Wallet::new();
    let mut node = Node::new();
    node.replica(owner.address);
    node.replica(other.address);
    let mut w = Writer::new(&other, &["*"], YEAR);
    let envelope = w.write("profile", "name", json!("x"), T0);
    // Presented to the wrong replica.
    let reason = rejected(node.replica(owner.address).apply_remote(envelope.clone()));
    assert!(matches!(reason, Rejected::WrongCore { .. }), "{reason}");
    // Relabelled as the other core: the signature covers the core.
    let mut relabelled = envelope.clone();
    relabelled.core = owner.address.to_lower_hex();
    let reason = rejected(node.replica(owner.address).apply_remote(relabelled));
    assert!(matches!(reason, Rejected::BadSignature), "{reason}");
    // Re-signed for this core, but the delegation is from the other owner.
    let resealed = change::seal(&owner.address, envelope.change.to_vec(), &w.keypair, &w.delegation)?;
    let reason = rejected(node.replica(owner.address).apply_remote(resealed));
    assert!(matches!(reason, Rejected::Delegation(DelegationError::WrongCore { .. })), "{reason}");
    // A core this node does not hold.
    let stranger = Wallet::new();
    let mut s = Writer::new(&stranger, &["*"], YEAR);
    let reason = rejected(node.cores.apply_remote(s.write("p", "k", json!(1), T0)));
    assert!(matches!(reason, Rejected::UnknownCore(_)), "{reason}");
    // The right core accepts it.
    assert!(matches!(node.cores.apply_remote(envelope), Ok(Accepted::Applied(_))));
    Ok(())
}

#[test]
fn namespaces_outside_the_delegation_and_the_reserved_one_are_rejected() -> TestResult {
    let owner = Wallet::new();
    let core = owner.address;
    let mut node = Node::new();
    let mut w = Writer::new(&owner, &["profile"], YEAR);
    let ok = w.write("profile", "name", json!("a"), T0);
    let nested = w.write("profile", "nested", json!({ "deep": { "x": 1 } }), T0 + 1);
    for e in [&ok, &nested] {
        assert!(matches!(node.replica(core).apply_remote(e.clone()), Ok(Accepted::Applied(_))));
    }

    let mut bad = Writer::new(&owner, &["profile"], YEAR);
    let reason = rejected(node.replica(core).apply_remote(bad.write("apps", "x", json!(1), T0)));
    assert!(matches!(&reason, Rejected::Namespace { namespace, .. } if namespace == "apps"), "{reason}");
    println!("namespace: {reason}");

    let mut all = Writer::new(&owner, &["*"], YEAR);
    let reason = rejected(node.replica(core).apply_remote(all.write("_kubelt", "revocations", json!({}), T0)));
    assert!(matches!(&reason, Rejected::Namespace { namespace, .. } if namespace == "_kubelt"), "{reason}");

    // A nested write is attributed to the namespace of the object it writes (found through the
    // object's creation), not to the key it names.
    let deep_path: Vec<String> = vec!["nested".into(), "deep".into(), "y".into()];
    let mut friend = Writer::new(&owner, &["profile"], YEAR);
    friend.absorb(&[&ok, &nested]);
    let deep = friend.commit(T0 + 2, None, |tx| super::value::set_path(tx, "profile", &deep_path, &json!(2)).expect("write"));
    let mut sneaky = Writer::new(&owner, &["apps"], YEAR);
    sneaky.absorb(&[&ok, &nested]);
    let intrusion = sneaky.commit(T0 + 2, None, |tx| super::value::set_path(tx, "profile", &deep_path, &json!(666)).expect("write"));
    let reason = rejected(node.replica(core).apply_remote(intrusion));
    assert!(matches!(&reason, Rejected::Namespace { namespace, .. } if namespace == "profile"), "{reason}");
    assert!(matches!(node.replica(core).apply_remote(deep), Ok(Accepted::Applied(_))));
    assert_eq!(node.replica(core).get("profile", "nested/deep")?, Some(json!({ "x": 1, "y": 2 })));
    Ok(())
}

#[test]
fn malformed_envelopes_bad_automerge_bytes_and_oversized_changes_are_rejected() -> TestResult {
    let owner = Wallet::new();
    let core = owner.address;
    let mut node = Node::new();
    let mut w = Writer::new(&owner, &["*"], YEAR);
    let good = w.write("profile", "name", json!("a"), T0);
    let replica = node.replica(core);

    let mut no_author = good.clone();
    no_author.author = Default::default();
    assert!(matches!(rejected(replica.apply_remote(no_author)), Rejected::MalformedEnvelope(_)));
    let mut bad_author = good.clone();
    bad_author.author = vec![1, 2, 3].into();
    let reason = rejected(replica.apply_remote(bad_author));
    assert!(matches!(reason, Rejected::MalformedEnvelope(_)), "{reason}");
    println!("malformed envelope: {reason}");
    let mut bad_sig = good.clone();
    bad_sig.signature = vec![0u8; 64].into();
    assert!(matches!(rejected(replica.apply_remote(bad_sig)), Rejected::BadSignature));

    // Garbage "change" bytes, properly signed.
    let garbage = change::seal(&core, vec![0x85, 0x6f, 0x4a, 0x83, 1, 2, 3, 4, 1, 9, 9, 9], &w.keypair, &w.delegation)?;
    let reason = rejected(replica.apply_remote(garbage));
    assert!(matches!(reason, Rejected::MalformedChange(_)), "{reason}");
    println!("malformed automerge: {reason}");
    let random = change::seal(&core, (0..200).map(|_| rand::random::<u8>()).collect(), &w.keypair, &w.delegation)?;
    assert!(matches!(rejected(replica.apply_remote(random)), Rejected::MalformedChange(_)));
    // A valid change truncated.
    let truncated = change::seal(&core, good.change[..good.change.len() - 3].to_vec(), &w.keypair, &w.delegation)?;
    assert!(matches!(rejected(replica.apply_remote(truncated)), Rejected::MalformedChange(_)));

    // Over 1 MiB.
    let big = w.write("profile", "blob", json!("x".repeat(MAX_CHANGE_SIZE + 10)), T0 + 1);
    let reason = rejected(replica.apply_remote(big));
    assert!(matches!(reason, Rejected::TooLarge { .. }), "{reason}");
    println!("oversized: {reason}");

    // A change whose actor is not the author's.
    let mut other = Writer::new(&owner, &["*"], YEAR);
    let stolen = change::seal(&core, good.change.to_vec(), &other.keypair, &other.delegation)?;
    assert!(matches!(rejected(replica.apply_remote(stolen)), Rejected::ActorMismatch { .. }));
    let _ = other.write("profile", "x", json!(1), T0);

    assert!(replica.is_empty());
    assert!(matches!(replica.apply_remote(good), Ok(Accepted::Applied(_))));
    Ok(())
}

/// The scenario of the revocation tests: a1 ← b1 ← r (revokes A keeping a1) ← b2, and A's
/// a2 ← a3 (after the cut, concurrent with the revocation), and C's c1 built on a2.
struct RevocationScenario {
    owner: Wallet,
    all: Vec<SignedChange>,
    valid: Vec<SignedChange>,
    revocation: SignedChange,
    after_cut: Vec<SignedChange>,
}

fn revocation_scenario() -> anyhow::Result<RevocationScenario> {
    let owner = Wallet::new();
    let mut a = Writer::new(&owner, &["*"], YEAR);
    let mut b = Writer::new(&owner, &["*"], YEAR);
    let mut c = Writer::new(&owner, &["*"], YEAR);
    let a1 = a.write("profile", "name", json!("alice"), T0 + 1);
    b.absorb(&[&a1]);
    let b1 = b.write("apps", "b", json!(1), T0 + 2);
    let keep = BTreeMap::from([(a.actor_suffix(), delegation::Kept { seq: 1, hash: hash_of(&a1) })]);
    let statement = owner.statement(revocation_message(&owner.address, &a.peer, &keep, at(T0 + 3))?);
    let r = b.revoke(&statement, T0 + 3);
    let a2 = a.write("profile", "name", json!("mallory"), T0 + 4);
    let a3 = a.write("profile", "x", json!(1), T0 + 5);
    c.absorb(&[&a1, &a2]);
    let c1 = c.write("apps", "c", json!(1), T0 + 6);
    let b2 = b.write("apps", "b2", json!(2), T0 + 8);
    Ok(RevocationScenario {
        owner,
        all: vec![a1.clone(), b1.clone(), r.clone(), a2.clone(), a3.clone(), c1.clone(), b2.clone()],
        valid: vec![a1, b1, r.clone(), b2],
        revocation: r,
        after_cut: vec![a2, a3, c1],
    })
}

#[test]
fn change_by_a_revoked_key_after_the_revocation_is_rejected_and_earlier_ones_stay() -> TestResult {
    let s = revocation_scenario()?;
    let core = s.owner.address;
    let mut node = Node::new();
    let replica = node.replica(core);
    for e in &s.valid {
        assert!(matches!(replica.apply_remote(e.clone()), Ok(Accepted::Applied(_))));
    }
    let reason = rejected(replica.apply_remote(s.after_cut[0].clone()));
    assert!(matches!(reason, Rejected::Revoked { seq: 2, keep: 1, .. }), "{reason}");
    println!("revoked: {reason}");
    // Its descendants, by the revoked key or anyone else, are invalid too.
    let reason = rejected(replica.apply_remote(s.after_cut[1].clone()));
    assert!(matches!(reason, Rejected::DependsOnInvalid(_) | Rejected::Revoked { .. }), "{reason}");
    let reason = rejected(replica.apply_remote(s.after_cut[2].clone()));
    assert!(matches!(reason, Rejected::DependsOnInvalid(_)), "{reason}");
    // The change made before the revocation stays.
    assert_eq!(replica.get("profile", "name")?, Some(json!("alice")));
    assert!(replica.contains(&hash_of(&s.valid[0])));
    assert_eq!(replica.revocations().len(), 1);
    Ok(())
}

#[test]
fn arrival_order_does_not_change_the_verdict_even_when_the_revocation_comes_last() -> TestResult {
    let s = revocation_scenario()?;
    let core = s.owner.address;
    let mut orders: Vec<Vec<SignedChange>> = Vec::new();
    orders.push(s.all.clone());
    // Revocation last: A's later changes and C's change get applied first, then invalidated.
    let mut late = s.all.clone();
    late.retain(|e| e != &s.revocation);
    late.push(s.revocation.clone());
    orders.push(late);
    // Reverse (everything held back until the first change arrives).
    orders.push(s.all.iter().rev().cloned().collect());
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..12 {
        let mut o = s.all.clone();
        o.shuffle(&mut rng);
        orders.push(o);
    }

    let expected_heads = {
        let mut h = vec![hash_of(&s.valid[3])];
        h.sort();
        h
    };
    let mut reference: Option<(Vec<ChangeHash>, serde_json::Value)> = None;
    for (i, order) in orders.iter().enumerate() {
        // One by one, as gossip would deliver them.
        let mut node = Node::new();
        let replica = node.replica(core);
        let mut rebuilt = false;
        for e in order {
            match replica.apply_remote(e.clone()) {
                Ok(Accepted::Applied(r)) | Ok(Accepted::Evidence(r)) => rebuilt |= !r.invalidated.is_empty(),
                _ => {}
            }
        }
        if i == 1 {
            assert!(rebuilt, "the late revocation must invalidate already applied changes");
        }
        let snap = snapshot(replica);
        assert_eq!(snap.0, expected_heads, "order {i}");
        assert_eq!(replica.len(), 4, "order {i}");
        assert_eq!(replica.get("profile", "name")?, Some(json!("alice")), "order {i}");
        match &reference {
            None => reference = Some(snap),
            Some(r) => assert_eq!(&snap, r, "order {i} diverged"),
        }
        // All at once, as a sync batch would deliver them.
        let mut node = Node::new();
        let replica = node.replica(core);
        replica.apply_batch(order.clone())?;
        assert_eq!(Some(snapshot(replica)), reference, "batch order {i} diverged");
    }
    println!("{} arrival orders, one verdict", orders.len());
    Ok(())
}

#[test]
fn a_replica_holding_changes_a_revocation_voids_converges_with_one_that_never_had_them() -> TestResult {
    let owner = Wallet::new();
    let core = owner.address;
    let (mut a, mut b) = (Node::new(), Node::new());
    let (ka, kb) = (a.keypair.clone(), b.keypair.clone());
    let da = owner.delegate(&a.peer, &["*"], YEAR, T0);
    let db = owner.delegate(&b.peer, &["*"], YEAR, T0);
    a.replica(core).set_at("profile", "name", &json!("alice"), &ka, &da, T0 + 1)?;
    sync(&mut b, &mut a, core);
    // The owner revokes A from B's view of the core; meanwhile A keeps writing.
    assert_eq!(b.replica(core).revocation_keep(&a.peer).values().map(|k| k.seq).collect::<Vec<_>>(), vec![1]);
    let statement = owner.statement(b.replica(core).revocation_message(&a.peer, at(T0 + 2))?);
    b.replica(core).revoke_at(&statement, &kb, &db, T0 + 2)?;
    a.replica(core).set_at("profile", "name", &json!("mallory"), &ka, &da, T0 + 3)?;
    b.replica(core).set_at("apps", "b", &json!(1), &kb, &db, T0 + 4)?;
    sync(&mut a, &mut b, core);
    sync(&mut b, &mut a, core);
    assert_eq!(snapshot(a.replica(core)), snapshot(b.replica(core)));
    assert_eq!(a.replica(core).get("profile", "name")?, Some(json!("alice")));
    assert_eq!(a.replica(core).get("apps", "b")?, Some(json!(1)));
    // A can no longer write.
    let err = a.replica(core).set_at("profile", "name", &json!("again"), &ka, &da, T0 + 5).unwrap_err();
    assert!(matches!(err, WriteError::Revoked(_)), "{err}");
    Ok(())
}

#[test]
fn an_equivocating_key_loses_both_changes_in_any_order() -> TestResult {
    let owner = Wallet::new();
    let core = owner.address;
    let mut w = Writer::new(&owner, &["*"], YEAR);
    let first = w.write("profile", "name", json!("a"), T0);
    let mut fork = w.doc.fork();
    fork.set_actor(w.doc.get_actor().clone());
    let twin_a = w.write("profile", "name", json!("b"), T0 + 1);
    let twin_b = {
        let mut tx = fork.transaction();
        super::value::set_path(&mut tx, "profile", &["name".into()], &json!("c")).expect("write");
        let (hash, _) = tx.commit_with(CommitOptions::default().with_time(T0 + 1));
        let change = fork.get_change_by_hash(&hash.expect("hash")).expect("change");
        change::seal(&core, change.raw_bytes().to_vec(), &w.keypair, &w.delegation)?
    };
    let mut results = Vec::new();
    for order in [[&first, &twin_a, &twin_b], [&first, &twin_b, &twin_a], [&twin_b, &twin_a, &first]] {
        let mut node = Node::new();
        let replica = node.replica(core);
        for e in order {
            let _ = replica.apply_remote(e.clone());
        }
        results.push(snapshot(replica));
        assert_eq!(replica.get("profile", "name")?, Some(json!("a")));
    }
    assert!(results.windows(2).all(|w| w[0] == w[1]));
    Ok(())
}

#[test]
fn held_back_changes_are_reported_and_applied_when_their_dependency_arrives() -> TestResult {
    let owner = Wallet::new();
    let mut node = Node::new();
    let mut w = Writer::new(&owner, &["*"], YEAR);
    let parent = w.write("profile", "a", json!(1), T0);
    let child = w.write("profile", "b", json!(2), T0 + 1);
    let replica = node.replica(owner.address);
    match replica.apply_remote(child.clone())? {
        Accepted::MissingDeps { missing } => assert_eq!(missing, vec![hash_of(&parent)]),
        other => panic!("expected MissingDeps, got {other:?}"),
    }
    assert_eq!(replica.missing_deps(), vec![hash_of(&parent)]);
    match replica.apply_remote(parent)? {
        Accepted::Applied(r) => assert_eq!(r.applied.len(), 2),
        other => panic!("expected Applied, got {other:?}"),
    }
    assert_eq!(replica.pending_len(), 0);
    assert!(matches!(replica.apply_remote(child)?, Accepted::Duplicate));
    Ok(())
}

/// Each app login on a node delegates its own namespaces to the node key: a second login must
/// not take the first app's namespaces away (it did: one delegation per core, the newest won).
#[test]
fn a_node_keeps_one_delegation_per_login_and_writes_under_the_one_that_covers() -> TestResult {
    let owner = Wallet::new();
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("db");
    let keypair = Keypair::generate_ed25519();
    let peer = keypair.public().to_peer_id();
    let notes = owner.delegate(&peer, &["notes"], YEAR, T0);
    let photos = owner.delegate(&peer, &["photos"], YEAR, T0 + 10);
    let short = owner.delegate(&peer, &["short"], Duration::from_secs(60), T0 + 20);
    {
        let mut cores = Cores::load(Store::open(&path)?, Config::default())?;
        let replica = cores.own(notes.clone())?;
        replica.set_own_delegation_at(Some(photos.clone()), T0 + 10)?;
        replica.set_own_delegation_at(Some(short.clone()), T0 + 20)?;
        // The same login twice is one delegation.
        replica.set_own_delegation_at(Some(photos.clone()), T0 + 30)?;
        assert_eq!(replica.own_delegation(), Some(&photos), "the newest is the node's main one");
        assert_eq!(replica.own_delegation_for_at("notes", T0 + 40), Some(&notes));
        assert_eq!(replica.own_delegation_for_at("photos", T0 + 40), Some(&photos));
        assert_eq!(replica.own_delegation_for_at("short", T0 + 40), Some(&short));
        // Past its expiry a delegation is not chosen; a namespace nobody covers gets the newest.
        assert_eq!(replica.own_delegation_for_at("short", T0 + 200), Some(&photos));
        assert_eq!(replica.own_delegation_for_at("other", T0 + 40), Some(&photos));
        let (n, p) = (replica.own_delegation_for_at("notes", T0 + 40).cloned(), replica.own_delegation_for_at("photos", T0 + 40).cloned());
        replica.set_at("notes", "a", &json!(1), &keypair, &n.expect("notes"), T0 + 41)?;
        replica.set_at("photos", "b", &json!(2), &keypair, &p.expect("photos"), T0 + 42)?;
        // A namespace under the other login's delegation is refused, as any replica would.
        assert!(replica.set_at("notes", "c", &json!(3), &keypair, &photos, T0 + 43).is_err());
    }
    // All of them survive a restart; one added after the short one expired drops it.
    let mut cores = Cores::load(Store::open(&path)?, Config::default())?;
    let replica = cores.get_mut(&owner.address).expect("core reloaded");
    assert_eq!(replica.own_delegation_for_at("notes", T0 + 50), Some(&notes));
    assert_eq!(replica.own_delegation_for_at("short", T0 + 50), Some(&short));
    let later = owner.delegate(&peer, &["later"], YEAR, T0 + 500);
    replica.set_own_delegation_at(Some(later.clone()), T0 + 500)?;
    assert_eq!(replica.own_delegation_for_at("short", T0 + 50), Some(&later), "expired delegation dropped");
    assert_eq!(replica.own_delegation_for_at("notes", T0 + 500), Some(&notes));
    // At most MAX_OWN_DELEGATIONS are kept, the oldest going first.
    for i in 0..MAX_OWN_DELEGATIONS as i64 {
        let d = owner.delegate(&peer, &[&format!("ns{i}")], YEAR, T0 + 600 + i);
        replica.set_own_delegation_at(Some(d), T0 + 600 + i)?;
    }
    assert_ne!(replica.own_delegation_for_at("notes", T0 + 700), Some(&notes), "the oldest went first");
    assert!(replica.own_delegation_for_at("ns0", T0 + 700).is_some());
    // Clearing removes all.
    replica.set_own_delegation(None)?;
    assert_eq!(replica.own_delegation(), None);
    Ok(())
}

#[test]
fn cores_survive_reopening_the_store() -> TestResult {
    let owner = Wallet::new();
    let core = owner.address;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("db");
    let keypair = Keypair::generate_ed25519();
    let peer = keypair.public().to_peer_id();
    let delegation = owner.delegate(&peer, &["*"], YEAR, T0);
    let s = revocation_scenario()?;
    let before;
    let before_revoked;
    {
        let mut cores = Cores::load(Store::open(&path)?, Config::default())?;
        let replica = cores.own(delegation.clone())?;
        for i in 0..20 {
            replica.set_at("profile", &format!("k{i}"), &json!(i), &keypair, &delegation, T0 + i)?;
        }
        before = snapshot(replica);
        // A second core with a revocation and invalidated changes.
        let r2 = cores.follow(s.owner.address)?;
        r2.apply_batch(s.all.clone())?;
        before_revoked = snapshot(r2);
        // No flush: every accepted change was synced when accepted.
    }
    let mut cores = Cores::load(Store::open(&path)?, Config::default())?;
    assert_eq!(cores.list().len(), 2);
    let replica = cores.get_mut(&core).expect("core reloaded");
    assert_eq!(snapshot(replica), before);
    assert_eq!(replica.own_delegation(), Some(&delegation));
    // Writes continue after the restart (with a new actor session).
    replica.set_at("profile", "after", &json!(true), &keypair, &delegation, T0 + 100)?;
    assert_eq!(replica.len(), 21);
    let r2 = cores.get_mut(&s.owner.address).expect("second core reloaded");
    assert_eq!(snapshot(r2), before_revoked);
    assert_eq!(r2.revocations().len(), 1);
    // The revocation is still in force.
    let reason = rejected(r2.apply_remote(s.after_cut[0].clone()));
    assert!(matches!(reason, Rejected::KnownInvalid(_) | Rejected::Revoked { .. }), "{reason}");
    Ok(())
}

#[test]
fn ten_thousand_changes_catch_up_quickly() -> TestResult {
    const N: usize = 10_000;
    let owner = Wallet::new();
    let core = owner.address;
    let mut w = Writer::new(&owner, &["*"], YEAR);
    let started = Instant::now();
    let envelopes: Vec<SignedChange> =
        (0..N).map(|i| w.write("data", &format!("k{}", i % 500), json!(i), T0 + i as i64)).collect();
    let made = started.elapsed();

    let dir = tempfile::tempdir()?;
    let path = dir.path().join("db");
    let mut a = Node { _dir: tempfile::tempdir()?, cores: Cores::load(Store::open(&path)?, Config::default())?, keypair: Keypair::generate_ed25519(), peer: PeerId::random() };
    let started = Instant::now();
    let report = a.replica(core).apply_batch(envelopes)?;
    let ingest = started.elapsed();
    assert_eq!(report.applied.len(), N, "rejected: {:?}", report.rejected.first());

    let mut b = Node::new();
    b.replica(core);
    let started = Instant::now();
    let rounds = sync(&mut b, &mut a, core);
    let catch_up = started.elapsed();
    assert_eq!(b.replica(core).heads(), a.replica(core).heads());
    assert_eq!(b.replica(core).len(), N);
    assert_eq!(b.replica(core).get("data", "k499")?, Some(json!(N - 1)));

    drop(a);
    let started = Instant::now();
    let mut reopened = Cores::load(Store::open(&path)?, Config::default())?;
    let reload = started.elapsed();
    assert_eq!(reopened.get_mut(&core).map(|r| r.len()), Some(N));

    println!(
        "10k changes: made+signed {made:?}, ingested (verify + store + apply) {ingest:?}, \
         catch-up by sync {catch_up:?} in {rounds} round trip(s), reload from store {reload:?}"
    );
    assert!(catch_up < Duration::from_secs(10), "catch-up took {catch_up:?}");
    Ok(())
}

#[test]
fn sync_refuses_bare_automerge_changes_without_envelopes() -> TestResult {
    // A peer that embeds raw changes in the Automerge sync message is refused: changes travel
    // in signed envelopes, and nothing of the bare ones is applied.
    let owner = Wallet::new();
    let core = owner.address;
    let mut node = Node::new();
    node.replica(core);
    let mut rogue = Automerge::new().with_actor(ActorId::random());
    rogue.transact::<_, _, automerge::AutomergeError>(|tx| {
        use automerge::transaction::Transactable;
        tx.put(automerge::ROOT, "profile", "pwned")?;
        Ok(())
    }).map_err(|f| anyhow::anyhow!("{:?}", f.error))?;
    let mut state = automerge::sync::State::new();
    use automerge::sync::SyncDoc;
    let _ = rogue.generate_sync_message(&mut state);
    let theirs = node.cores.get_mut(&core).expect("core").document().clone();
    let mut their_state = automerge::sync::State::new();
    let first = theirs.generate_sync_message(&mut their_state).expect("message");
    rogue.receive_sync_message(&mut state, first)?;
    let message = rogue.generate_sync_message(&mut state).expect("message with changes");
    assert!(!message.changes.is_empty());
    let request = kubelt_proto::core::SyncRequest { core: core.to_lower_hex(), sync_message: message.encode().into(), changes: vec![] };
    let response = node.cores.handle_sync_request(request, &PeerId::random());
    assert!(response.error.contains("must not embed changes"), "{}", response.error);
    assert!(node.cores.get_mut(&core).expect("core").is_empty());
    assert_eq!(node.cores.get_mut(&core).expect("core").get("profile", "")?, None);
    Ok(())
}

#[test]
fn dht_key_and_topic_use_the_lower_case_address() {
    use sha2::Digest;
    let owner = Wallet::new();
    let expected: [u8; 32] = sha2::Sha256::digest(format!("kubelt-core:{}", owner.address.to_lower_hex())).into();
    assert_eq!(dht_key(&owner.address), expected);
    assert_eq!(owner.address.topic(), format!("kubelt/core/{}", owner.address.to_lower_hex()));
}

#[test]
fn catch_up_is_split_into_bounded_messages() -> TestResult {
    const N: usize = 2_000;
    let owner = Wallet::new();
    let core = owner.address;
    let mut w = Writer::new(&owner, &["*"], YEAR);
    let mut v = Writer::new(&owner, &["*"], YEAR);
    let mut envelopes: Vec<SignedChange> = (0..N).map(|i| w.write("a", &format!("k{i}"), json!(i), T0)).collect();
    envelopes.extend((0..N / 2).map(|i| v.write("b", &format!("k{i}"), json!(i), T0)));
    let config = Config { max_sync_changes: 300, ..Config::default() };
    let small = |cores: Cores| Node { _dir: tempfile::tempdir().expect("dir"), cores, keypair: Keypair::generate_ed25519(), peer: PeerId::random() };
    let (da, db) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let mut a = small(Cores::load(Store::open(da.path())?, config.clone())?);
    let mut b = small(Cores::load(Store::open(db.path())?, config)?);
    a.replica(core).apply_batch(envelopes[..N].to_vec())?;
    b.replica(core).apply_batch(envelopes[N..].to_vec())?;
    let rounds = sync(&mut a, &mut b, core);
    assert_eq!(snapshot(a.replica(core)), snapshot(b.replica(core)));
    assert_eq!(a.replica(core).len(), N + N / 2);
    println!("{} changes both ways in messages of at most 300: {rounds} round trips", N + N / 2);
    assert!(rounds > 2);
    Ok(())
}

#[test]
fn a_change_dated_far_in_the_future_is_refused_for_now() -> TestResult {
    let owner = Wallet::new();
    let mut node = Node::new();
    let mut w = Writer::new(&owner, &["*"], Duration::from_secs(100 * 365 * 24 * 3600));
    let future = w.write("profile", "x", json!(1), OffsetDateTime::now_utc().unix_timestamp() + 86_400);
    let reason = rejected(node.replica(owner.address).apply_remote(future.clone()));
    assert!(matches!(reason, Rejected::FromTheFuture { .. }), "{reason}");
    // Not remembered as invalid: the same change is judged normally once the clock allows.
    let replica = node.replica(owner.address);
    replica.config.max_clock_skew = 2 * 86_400;
    assert!(matches!(replica.apply_remote(future), Ok(Accepted::Applied(_))));
    Ok(())
}

#[test]
fn cores_can_move_to_the_event_loop_task() {
    fn assert_send<T: Send>() {}
    assert_send::<Cores>();
    assert_send::<Replica>();
}

#[test]
fn replicas_beyond_the_limit_are_unloaded_and_reloaded_with_every_fact() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("db");
    let config = Config { max_loaded_cores: 2, ..Config::default() };
    let mut cores = Cores::load(Store::open(&path)?, config.clone())?;
    let keypair = Keypair::generate_ed25519();
    let peer = keypair.public().to_peer_id();
    // Five cores written by this node, plus one whose owner revoked a key.
    let owners: Vec<Wallet> = (0..5).map(|_| Wallet::new()).collect();
    for (i, owner) in owners.iter().enumerate() {
        let delegation = owner.delegate(&peer, &["*"], YEAR, T0);
        let replica = cores.own(delegation.clone())?;
        replica.set_at("notes", "n", &json!(i), &keypair, &delegation, T0 + 1)?;
        assert!(cores.loaded().len() <= 2, "{} replicas in memory", cores.loaded().len());
    }
    let s = revocation_scenario()?;
    cores.follow(s.owner.address)?.apply_batch(s.valid.clone())?;
    assert_eq!(cores.len(), 6);
    assert!(cores.loaded().len() <= 2);
    assert!(cores.load_stats().unloads >= 4, "{:?}", cores.load_stats());
    // A revocation is read from the store without loading the core.
    for owner in &owners {
        cores.get_mut(&owner.address).expect("held");
    }
    assert!(cores.get_loaded(&s.owner.address).is_none(), "the revoked core was unloaded");
    let revoked = cores.revocations(&s.owner.address)?;
    assert_eq!(revoked.len(), 1);
    assert!(cores.get_loaded(&s.owner.address).is_none(), "reading the revocations loaded the core");
    // Every core reloads with its values, and the revocation is still in force.
    for (i, owner) in owners.iter().enumerate() {
        let replica = cores.get_mut(&owner.address).expect("held");
        assert_eq!(replica.get("notes", "n")?, Some(json!(i)));
    }
    let reason = rejected(cores.apply_remote(s.after_cut[0].clone()));
    assert!(matches!(reason, Rejected::Revoked { .. } | Rejected::KnownInvalid(_)), "{reason}");
    // A node started on the store lists every core and loads none.
    drop(cores);
    let reopened = Cores::load(Store::open(&path)?, config)?;
    assert_eq!((reopened.len(), reopened.loaded().len()), (6, 0));
    Ok(())
}

#[test]
fn a_busy_replica_is_not_unloaded() -> TestResult {
    let config = Config { max_loaded_cores: 1, ..Config::default() };
    let dir = tempfile::tempdir()?;
    let mut cores = Cores::load(Store::open(dir.path().join("db"))?, config)?;
    let owner = Wallet::new();
    let mut w = Writer::new(&owner, &["*"], YEAR);
    let first = w.write("notes", "a", json!(1), T0);
    let second = w.write("notes", "b", json!(2), T0 + 1);
    // The child arrives first: held back for its parent, so the replica keeps state that is
    // not in the store.
    let report = cores.follow(owner.address)?.apply_batch(vec![second])?;
    assert_eq!(report.held.len(), 1);
    cores.follow(Wallet::new().address)?;
    assert!(cores.get_loaded(&owner.address).is_some(), "a replica holding back changes was unloaded");
    let report = cores.get_mut(&owner.address).expect("held").apply_batch(vec![first])?;
    assert_eq!(report.applied.len(), 2);
    cores.follow(Wallet::new().address)?;
    assert!(cores.get_loaded(&owner.address).is_none(), "an idle replica stays loaded beyond the limit");
    Ok(())
}

/// Catch-up leaves out copies of changes held already by the hash of their bytes; that hash
/// must be the one Automerge gives the change, for changes written by hand and by a replica,
/// small and large (Automerge compresses large columns only in `bytes()`, never here).
#[test]
fn raw_change_hash_is_automerges_hash() -> TestResult {
    let owner = Wallet::new();
    let mut writer = Writer::new(&owner, &["*"], YEAR);
    let small = writer.write("notes", "a", json!(1), T0 + 1);
    let large = writer.write("notes", "b", json!("x".repeat(4096)), T0 + 2);
    for envelope in [&small, &large] {
        assert_eq!(change::raw_change_hash(&envelope.change), Some(hash_of(envelope)));
    }
    let mut node = Node::new();
    let keypair = node.keypair.clone();
    let delegation = owner.delegate(&node.peer, &["*"], YEAR, unix_now_for_tests());
    node.cores.own(delegation.clone())?;
    let replica = node.replica(owner.address);
    let local = replica.set("notes", "c", &json!({"deep": [1, 2, 3]}), &keypair, &delegation)?;
    assert_eq!(change::raw_change_hash(&local.change), Some(hash_of(&local)));
    assert!(replica.contains(&hash_of(&local)));
    // Anything not framed as an uncompressed change chunk is not recognised.
    assert_eq!(change::raw_change_hash(b"not a change at all"), None);
    let mut other_type = small.change.to_vec();
    other_type[8] = 2;
    assert_eq!(change::raw_change_hash(&other_type), None);
    Ok(())
}

fn unix_now_for_tests() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

/// A batch decodes each author's key once (`AuthorKeys`): envelopes whose author bytes differ
/// from the cached author's, by a valid key or by junk, still get their own verdicts, on both
/// the single-thread path and the threaded one.
#[test]
fn a_batch_verdict_per_envelope_does_not_depend_on_the_authors_seen_before() -> TestResult {
    let owner = Wallet::new();
    let core = owner.address;
    let mut w = Writer::new(&owner, &["*"], YEAR);
    let other = Keypair::generate_ed25519().public().encode_protobuf();
    for size in [8, 100] {
        let mut batch: Vec<SignedChange> = (0..size).map(|i| w.write("app", &format!("k{size}-{i}"), json!(i), T0 + i as i64)).collect();
        batch[3].author = other.clone().into();
        batch[5].author = vec![8, 1, 18, 3, 1, 2, 3].into();
        let verdicts = super::replica::check_batch(&core, batch, &change::Delegations::default(), &Config::default());
        for (i, verdict) in verdicts.iter().enumerate() {
            match i {
                3 => assert!(matches!(verdict, Err(Rejected::BadSignature)), "{i}: {verdict:?}"),
                5 => assert!(matches!(verdict, Err(Rejected::MalformedEnvelope(_))), "{i}: {verdict:?}"),
                _ => assert!(verdict.is_ok(), "{i}: {verdict:?}"),
            }
        }
    }
    Ok(())
}
