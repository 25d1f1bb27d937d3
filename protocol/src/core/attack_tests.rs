//! Regression tests of the attacks in the hardening review: hand-built Automerge bytes and
//! hostile histories against one replica, each checked for a clear rejection, a replica that
//! keeps working, and replicas that keep the same heads.

use std::collections::BTreeMap;
use std::num::NonZeroU64;

use automerge::transaction::CommitOptions;
use automerge::{Automerge, Change, ExpandedChange, ReadDoc};
use kubelt_proto::core::{OwnerStatement, SignedChange};
use libp2p::identity::Keypair;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::tests::*;
use super::{change, delegation};
use super::*;

use crate::testing::{write_sleb as sleb, write_uleb as uleb};

/// A change chunk built by hand: any header values and any columns (spec, bytes).
fn raw_change(actor: &[u8], seq: u64, start_op: u64, columns: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut body = Vec::new();
    uleb(&mut body, 0); // no dependencies
    uleb(&mut body, actor.len() as u64);
    body.extend_from_slice(actor);
    uleb(&mut body, seq);
    uleb(&mut body, start_op);
    sleb(&mut body, T0 * 1000);
    uleb(&mut body, 0); // no message
    uleb(&mut body, 0); // no other actors
    uleb(&mut body, columns.len() as u64);
    for (spec, data) in columns {
        uleb(&mut body, *spec);
        uleb(&mut body, data.len() as u64);
    }
    for (_, data) in columns {
        body.extend_from_slice(data);
    }
    let mut hashed = vec![1u8];
    uleb(&mut hashed, body.len() as u64);
    hashed.extend_from_slice(&body);
    let checksum = Sha256::digest(&hashed);
    let mut chunk = vec![0x85, 0x6f, 0x4a, 0x83];
    chunk.extend_from_slice(&checksum[..4]);
    chunk.extend_from_slice(&hashed);
    chunk
}

/// An action column declaring `ops` operations in four bytes (one run).
fn action_run(ops: i64) -> (u64, Vec<u8>) {
    let mut column = Vec::new();
    sleb(&mut column, ops);
    uleb(&mut column, 1);
    ((4 << 4) | 2, column)
}

fn seal_as(writer: &Writer, bytes: Vec<u8>) -> SignedChange {
    change::seal(&writer.core, bytes, &writer.keypair, &writer.delegation).expect("seal")
}

/// Re-encodes an honest change of `writer` after `edit` changed its expanded form.
fn tampered(writer: &mut Writer, edit: impl FnOnce(&mut ExpandedChange)) -> SignedChange {
    let honest = writer.write("profile", "name", json!("honest"), T0 + 1);
    let mut expanded = Change::from_bytes(honest.change.to_vec()).expect("change").decode();
    edit(&mut expanded);
    let bytes = Change::from(expanded).raw_bytes().to_vec();
    seal_as(writer, bytes)
}

/// A node with its own delegation, to show that local writes still work after an attack.
fn writable_node(owner: &Wallet) -> (Node, OwnerStatement) {
    let mut node = Node::new();
    let delegation = owner.delegate(&node.peer, &["*"], YEAR, T0);
    node.replica(owner.address);
    (node, delegation)
}

fn local_write_works(node: &mut Node, owner: &Wallet, delegation: &OwnerStatement) -> TestResult {
    let keypair = node.keypair.clone();
    let replica = node.replica(owner.address);
    replica.set_at("notes", "after", &json!("still writable"), &keypair, delegation, T0 + 10)?;
    assert_eq!(replica.get("notes", "after")?, Some(json!("still writable")));
    Ok(())
}

#[test]
fn a_change_declaring_millions_of_operations_is_refused_before_automerge_expands_it() -> TestResult {
    let owner = Wallet::new();
    let writer = Writer::new(&owner, &["*"], YEAR);
    let (mut node, delegation) = writable_node(&owner);
    let actor = writer.doc.get_actor().to_bytes().to_vec();
    for ops in [8_000_000i64, 1 << 40] {
        let bytes = raw_change(&actor, 1, 1, &[action_run(ops)]);
        assert!(bytes.len() < 120, "the attack is a tiny message ({} bytes)", bytes.len());
        // Even with a valid signature and delegation, the declared count is refused.
        let reason = rejected(node.replica(owner.address).apply_remote(seal_as(&writer, bytes)));
        assert!(matches!(&reason, Rejected::MalformedChange(m) if m.contains("more than")), "{reason}");
    }
    local_write_works(&mut node, &owner, &delegation)
}

#[test]
fn the_signature_is_checked_before_the_change_is_parsed() -> TestResult {
    let owner = Wallet::new();
    let writer = Writer::new(&owner, &["*"], YEAR);
    let mut node = Node::new();
    let actor = writer.doc.get_actor().to_bytes().to_vec();
    let mut envelope = seal_as(&writer, raw_change(&actor, 1, 1, &[action_run(8_000_000)]));
    let mut signature = envelope.signature.to_vec();
    signature[0] ^= 1;
    envelope.signature = signature.into();
    let reason = rejected(node.replica(owner.address).apply_remote(envelope));
    assert_eq!(reason, Rejected::BadSignature);
    // No key, no delegation: a stranger's change is refused by its signature, whatever it holds.
    let stranger = Keypair::generate_ed25519();
    let bytes = raw_change(change::actor_id(&stranger.public().to_peer_id(), [1; 8]).to_bytes(), 1, 1, &[action_run(1 << 40)]);
    let mut forged = change::seal(&owner.address, bytes, &stranger, &writer.delegation)?;
    forged.signature = vec![0u8; 64].into();
    assert_eq!(rejected(node.replica(owner.address).apply_remote(forged)), Rejected::BadSignature);
    Ok(())
}

#[test]
fn an_operation_counter_past_32_bits_costs_a_rejection_not_the_node() -> TestResult {
    let owner = Wallet::new();
    let mut writer = Writer::new(&owner, &["*"], YEAR);
    let (mut node, delegation) = writable_node(&owner);
    // An object id whose counter Automerge cannot hold (it unwraps a u32 conversion).
    let envelope = tampered(&mut writer, |e| {
        let actor = e.actor_id.clone();
        if let Some(op) = e.operations.get_mut(0) {
            op.obj = automerge::legacy::ObjectId::Id(automerge::legacy::OpId::new(1 << 32, &actor));
        }
    });
    let reason = rejected(node.replica(owner.address).apply_remote(envelope));
    assert!(matches!(reason, Rejected::MalformedChange(_) | Rejected::BadReference(_)), "{reason}");
    local_write_works(&mut node, &owner, &delegation)
}

#[test]
fn a_start_op_that_does_not_follow_from_the_history_is_refused_and_local_writes_keep_working() -> TestResult {
    let owner = Wallet::new();
    let (mut node, delegation) = writable_node(&owner);
    for start in [3_000_000_000u64, u64::from(u32::MAX)] {
        // A key delegated for one namespace, backdating a new actor's change with a huge start.
        let mut writer = Writer::new(&owner, &["profile"], YEAR);
        let envelope = tampered(&mut writer, |e| e.start_op = NonZeroU64::new(start).expect("nonzero"));
        let reason = rejected(node.replica(owner.address).apply_remote(envelope));
        assert!(
            matches!(&reason, Rejected::BadStartOp { expected: 1, got } if *got == start)
                || matches!(&reason, Rejected::MalformedChange(m) if m.contains("32-bit")),
            "{reason}"
        );
    }
    // The honest start is accepted.
    let mut writer = Writer::new(&owner, &["profile"], YEAR);
    let honest = writer.write("profile", "name", json!("ok"), T0 + 1);
    assert!(matches!(node.replica(owner.address).apply_remote(honest), Ok(Accepted::Applied(_))));
    local_write_works(&mut node, &owner, &delegation)
}

#[test]
fn a_change_cannot_claim_a_time_before_its_delegation_was_issued() -> TestResult {
    let owner = Wallet::new();
    let mut writer = Writer::new(&owner, &["*"], YEAR);
    let backdated = writer.write("profile", "name", json!("old"), T0 - 86_400);
    let hash = hash_of(&backdated);
    let mut node = Node::new();
    let replica = node.replica(owner.address);
    assert!(matches!(replica.apply_remote(backdated), Ok(Accepted::Applied(_))));
    assert_eq!(replica.change_time(&hash), Some(T0), "the delegation's issue time is the floor");
    Ok(())
}

/// A sync message with one Bloom filter of `probes` probes (Automerge allocates that many
/// entries per lookup).
fn sync_message_with_probes(probes: u64) -> Vec<u8> {
    let mut m = vec![0x42];
    uleb(&mut m, 0); // heads
    uleb(&mut m, 0); // need
    uleb(&mut m, 1); // one have
    uleb(&mut m, 0); // last sync
    let mut bloom = Vec::new();
    uleb(&mut bloom, 1); // entries
    uleb(&mut bloom, 10); // bits per entry
    uleb(&mut bloom, probes);
    bloom.extend_from_slice(&[0xff, 0xff]);
    uleb(&mut m, bloom.len() as u64);
    m.extend_from_slice(&bloom);
    uleb(&mut m, 0); // changes
    m
}

#[test]
fn a_sync_request_whose_bloom_filter_declares_billions_of_probes_is_refused() -> TestResult {
    let owner = Wallet::new();
    let mut writer = Writer::new(&owner, &["*"], YEAR);
    let mut node = Node::new();
    let change = writer.write("profile", "name", json!("x"), T0 + 1);
    node.replica(owner.address).apply_remote(change)?;
    let stranger = Keypair::generate_ed25519().public().to_peer_id();
    let request = kubelt_proto::core::SyncRequest {
        core: owner.address.to_lower_hex(),
        sync_message: sync_message_with_probes(u64::from(u32::MAX)).into(),
        changes: Vec::new(),
    };
    assert!(request.sync_message.len() < 64);
    let response = node.cores.handle_sync_request(request, &stranger);
    assert!(response.error.contains("probes"), "{}", response.error);
    // A sane filter is answered.
    let request = kubelt_proto::core::SyncRequest {
        core: owner.address.to_lower_hex(),
        sync_message: sync_message_with_probes(7).into(),
        changes: Vec::new(),
    };
    let response = node.cores.handle_sync_request(request, &stranger);
    assert!(response.error.is_empty(), "{}", response.error);
    Ok(())
}

/// D writes X, B builds on X (B1), B carries the owner's revocation of D keeping X (R).
struct Revoked {
    owner: Wallet,
    d: Writer,
    x: SignedChange,
    b1: SignedChange,
    r: SignedChange,
}

fn revoked_after_one_change() -> anyhow::Result<Revoked> {
    let owner = Wallet::new();
    let mut d = Writer::new(&owner, &["*"], YEAR);
    let mut b = Writer::new(&owner, &["*"], YEAR);
    let x = d.write("profile", "name", json!("x"), T0 + 1);
    b.absorb(&[&x]);
    let b1 = b.write("apps", "b", json!(1), T0 + 2);
    let keep = BTreeMap::from([(d.actor_suffix(), delegation::Kept { seq: 1, hash: hash_of(&x) })]);
    let statement = owner.statement(revocation_message(&owner.address, &d.peer, &keep, at(T0 + 3))?);
    let r = b.revoke(&statement, T0 + 3);
    Ok(Revoked { owner, d, x, b1, r })
}

#[test]
fn a_revoked_key_cannot_fill_memory_with_held_back_changes() -> TestResult {
    let Revoked { owner, mut d, x, b1, r } = revoked_after_one_change()?;
    let mut node = Node::new();
    let replica = node.replica(owner.address);
    for e in [&x, &b1, &r] {
        assert!(matches!(replica.apply_remote(e.clone()), Ok(Accepted::Applied(_))));
    }
    // D writes on: every later change is past the cut. Drop the first so the rest would wait
    // for a missing dependency.
    let later: Vec<SignedChange> = (0..20).map(|i| d.write("profile", "n", json!(i), T0 + 3 + i)).collect();
    for e in &later[1..] {
        let reason = rejected(replica.apply_remote(e.clone()));
        assert!(matches!(reason, Rejected::Revoked { .. } | Rejected::DependsOnInvalid(_)), "{reason}");
    }
    assert_eq!(replica.pending_len(), 0, "nothing of a revoked key is held back");
    Ok(())
}

#[test]
fn held_back_changes_are_bounded_per_author() -> TestResult {
    let owner = Wallet::new();
    let mut flood = Writer::new(&owner, &["*"], YEAR);
    let mut honest = Writer::new(&owner, &["*"], YEAR);
    let dir = tempfile::tempdir()?;
    let store = crate::store::Store::open(dir.path().join("db"))?;
    let config = Config { max_pending_bytes_per_author: 64 << 10, ..Config::default() };
    let mut cores = Cores::load(store, config)?;
    let replica = cores.follow(owner.address)?;
    // Each change of the flood misses its first ancestor, so all are held back.
    let changes: Vec<SignedChange> =
        (0..200).map(|i| flood.write("blob", &format!("k{i}"), json!("x".repeat(2000)), T0 + 1)).collect();
    let first_honest = honest.write("notes", "a", json!(1), T0 + 1);
    let second_honest = honest.write("notes", "b", json!(2), T0 + 2);
    replica.apply_remote(second_honest)?;
    for e in &changes[1..] {
        replica.apply_remote(e.clone())?;
    }
    let held = replica.pending_len();
    assert!(held < 60, "{held} changes of one author held back");
    // The other author's held-back change was not crowded out.
    assert!(matches!(replica.apply_remote(first_honest), Ok(Accepted::Applied(r)) if r.applied.len() == 2));
    Ok(())
}

#[test]
fn equivocation_proofs_are_durable_and_a_late_replica_learns_every_fact() -> TestResult {
    let Revoked { owner, mut d, x, b1, r } = revoked_after_one_change()?;
    let core = owner.address;
    let mut old = Node::new();
    for e in [&x, &b1, &r] {
        old.replica(core).apply_remote(e.clone())?;
    }
    // The revoked key makes junk equivocation pairs under 300 new actors.
    for i in 0..300u64 {
        let actor = change::actor_id(&d.peer, i.to_be_bytes());
        for value in ["a", "b"] {
            let mut doc = Automerge::new().with_actor(actor.clone());
            let mut tx = doc.transaction();
            super::value::set_path(&mut tx, "junk", &["k".into()], &json!(value))?;
            let (hash, _) = tx.commit_with(CommitOptions::default().with_time(T0 + 4));
            let bytes = doc.get_change_by_hash(&hash.expect("hash")).expect("change").raw_bytes().to_vec();
            let _ = old.replica(core).apply_remote(seal_as(&d, bytes));
        }
    }
    assert_eq!(old.replica(core).len(), 3);
    // A replica that joins now learns the revocation through catch-up and refuses D.
    let mut late = Node::new();
    sync(&mut late, &mut old, core);
    assert_eq!(late.replica(core).revocations().len(), 1);
    assert_eq!(snapshot(late.replica(core)), snapshot(old.replica(core)));
    let after = d.write("profile", "name", json!("mallory"), T0 + 5);
    let reason = rejected(late.replica(core).apply_remote(after));
    assert!(matches!(reason, Rejected::Revoked { .. }), "{reason}");
    Ok(())
}

/// Every permutation of `items`.
fn permutations<T: Clone>(items: &[T]) -> Vec<Vec<T>> {
    if items.len() <= 1 {
        return vec![items.to_vec()];
    }
    let mut out = Vec::new();
    for i in 0..items.len() {
        let mut rest = items.to_vec();
        let first = rest.remove(i);
        for mut p in permutations(&rest) {
            p.insert(0, first.clone());
            out.push(p);
        }
    }
    out
}

#[test]
fn a_revoked_key_cannot_erase_what_its_revocation_kept_in_any_arrival_order() -> TestResult {
    // D writes X; B builds on X; the owner revokes D keeping X. D (in hostile hands) then signs
    // X': another change with X's actor and sequence number. It used to void D's actor from
    // seq 1 and, with it, B's change and the revocation itself: every replica lost the core.
    let Revoked { owner, d, x, b1, r } = revoked_after_one_change()?;
    let core = owner.address;
    let twin = {
        let mut doc = Automerge::new().with_actor(d.doc.get_actor().clone());
        let mut tx = doc.transaction();
        super::value::set_path(&mut tx, "profile", &["name".into()], &json!("evil"))?;
        let (hash, _) = tx.commit_with(CommitOptions::default().with_time(T0 + 1));
        let bytes = doc.get_change_by_hash(&hash.expect("hash")).expect("change").raw_bytes().to_vec();
        seal_as(&d, bytes)
    };
    assert_ne!(hash_of(&twin), hash_of(&x));
    // The reference: a replica that got everything in order holds X, B's change and the
    // revocation, and keeps them when the twin arrives.
    let mut reference = Node::new();
    for e in [&x, &b1, &r] {
        reference.replica(core).apply_remote(e.clone())?;
    }
    let reason = rejected(reference.replica(core).apply_remote(twin.clone()));
    assert!(matches!(reason, Rejected::NotKept { seq: 1, .. }), "{reason}");
    let expected = snapshot(reference.replica(core));
    assert_eq!(reference.replica(core).len(), 3);
    assert_eq!(reference.replica(core).get("profile", "name")?, Some(json!("x")));
    // Any arrival order, by gossip one at a time, then a catch-up with the reference: the same
    // three changes, the same heads; and the same in one batch.
    let mut orders = 0;
    for order in permutations(&[x.clone(), b1.clone(), r.clone(), twin.clone()]) {
        let mut node = Node::new();
        for e in &order {
            let _ = node.replica(core).apply_remote(e.clone());
        }
        sync(&mut node, &mut reference, core);
        assert_eq!(snapshot(node.replica(core)), expected, "gossip order {orders}");
        let mut node = Node::new();
        node.replica(core).apply_batch(order.clone())?;
        sync(&mut node, &mut reference, core);
        assert_eq!(snapshot(node.replica(core)), expected, "batch order {orders}");
        orders += 1;
    }
    assert_eq!(orders, 24);
    Ok(())
}
