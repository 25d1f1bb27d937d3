//! Property tests of the decoders that take a peer's bytes in the core model: envelopes as
//! gossip delivers them, change chunks, sync messages and owner statements. Each takes
//! arbitrary bytes and mutations of valid encodings (bit flips, truncations, overwritten
//! length fields) and must give a verdict without panicking; what the scanners accept must be
//! within their bounds. `PROPTEST_CASES` sets the number of cases (2,000 by default).

use std::sync::OnceLock;

use automerge::sync::SyncDoc;
use automerge::Automerge;
use kubelt_proto::core::{OwnerStatement, SignedChange};
use kubelt_proto::Message as _;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use serde_json::json;

use super::bounds::{scan_change, scan_sync_message, MAX_OPS_PER_CHANGE};
use super::tests::*;
use super::*;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000)
}

/// Valid encodings to mutate: envelopes of a small history, their change bytes, a sync
/// message, and a delegation.
struct Samples {
    core: Address,
    envelopes: Vec<Vec<u8>>,
    changes: Vec<Vec<u8>>,
    sync_message: Vec<u8>,
    delegation: OwnerStatement,
}

fn samples() -> &'static Samples {
    static SAMPLES: OnceLock<Samples> = OnceLock::new();
    SAMPLES.get_or_init(|| {
        let owner = Wallet::new();
        let mut writer = Writer::new(&owner, &["*"], YEAR);
        let mut envelopes = Vec::new();
        envelopes.push(writer.write("profile", "name", json!("alice"), T0 + 1));
        envelopes.push(writer.write("profile", "tags", json!(["a", "b", {"c": [1, 2.5, null]}]), T0 + 2));
        envelopes.push(writer.write("notes", "n", json!("x".repeat(300)), T0 + 3));
        let mut doc = Automerge::new();
        let changes: Vec<automerge::Change> = envelopes
            .iter()
            .map(|e| automerge::Change::from_bytes(e.change.to_vec()).expect("change"))
            .collect();
        doc.apply_changes(changes).expect("apply");
        let mut state = automerge::sync::State::new();
        let sync_message = doc.generate_sync_message(&mut state).expect("message").encode();
        Samples {
            core: owner.address,
            changes: envelopes.iter().map(|e| e.change.to_vec()).collect(),
            envelopes: envelopes.iter().map(|e| e.encode_to_vec()).collect(),
            sync_message,
            delegation: writer.delegation.clone(),
        }
    })
}

/// A mutation of a valid encoding.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    /// Overwrites bytes at an offset with a large LEB128 value (a hostile length or count).
    BigVarint(usize, u64),
    Insert(usize, Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(i, x)| Mutation::Flip(i, x)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), prop_oneof![Just(u64::from(u32::MAX)), Just(1u64 << 40), Just(u64::MAX), 1u64..1_000_000_000])
            .prop_map(|(i, v)| Mutation::BigVarint(i, v)),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..16)).prop_map(|(i, b)| Mutation::Insert(i, b)),
    ]
}

fn apply(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        if bytes.is_empty() {
            break;
        }
        match m {
            Mutation::Flip(i, x) => {
                let len = bytes.len();
                bytes[i % len] ^= x;
            }
            Mutation::Truncate(n) => bytes.truncate(n % bytes.len()),
            Mutation::BigVarint(i, v) => {
                let at = i % bytes.len();
                let mut varint = Vec::new();
                crate::testing::write_uleb(&mut varint, *v);
                let end = (at + varint.len()).min(bytes.len());
                bytes.splice(at..end, varint);
            }
            Mutation::Insert(i, b) => {
                let at = i % (bytes.len() + 1);
                bytes.splice(at..at, b.iter().copied());
            }
        }
    }
    bytes
}

fn verifier_and_core() -> (Verifier, Address) {
    static CORES: OnceLock<(tempfile::TempDir, Cores)> = OnceLock::new();
    let (_, cores) = CORES.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::Store::open(dir.path().join("db")).expect("store");
        let cores = Cores::load(store, Config::default()).expect("cores");
        (dir, cores)
    });
    (cores.verifier(), samples().core)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn scanning_arbitrary_bytes_as_a_change_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        if let Ok(header) = scan_change(&bytes) {
            prop_assert!(header.ops <= MAX_OPS_PER_CHANGE);
            prop_assert!(header.start_op + header.ops <= u64::from(u32::MAX));
        }
    }

    #[test]
    fn mutated_changes_are_decoded_within_bounds_or_refused(
        which in 0..3usize,
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let bytes = apply(samples().changes[which].clone(), &mutations);
        if let Ok(header) = scan_change(&bytes) {
            prop_assert!(header.ops <= MAX_OPS_PER_CHANGE);
            // What the scan accepts, Automerge decodes (or refuses) without taking the test down.
            let _ = change::decode_change(&bytes);
        }
    }

    #[test]
    fn mutated_gossip_envelopes_get_a_verdict(
        which in 0..3usize,
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let (verifier, core) = verifier_and_core();
        let bytes = apply(samples().envelopes[which].clone(), &mutations);
        let _ = verifier.verify_gossip(core, &bytes);
    }

    #[test]
    fn arbitrary_gossip_bytes_get_a_verdict(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let (verifier, core) = verifier_and_core();
        prop_assert!(verifier.verify_gossip(core, &bytes).map(|v| v.core() == core).unwrap_or(true));
    }

    #[test]
    fn mutated_sync_messages_are_scanned_before_automerge_decodes_them(
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let bytes = apply(samples().sync_message.clone(), &mutations);
        if scan_sync_message(&bytes).is_ok() {
            let decoded = std::panic::catch_unwind(|| automerge::sync::Message::decode(&bytes));
            prop_assert!(decoded.is_ok(), "Automerge panicked on a scanned sync message");
        }
    }

    #[test]
    fn arbitrary_sync_messages_never_panic_the_scanner(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = scan_sync_message(&bytes);
    }

    #[test]
    fn mutated_owner_statements_are_verified_or_refused(
        mutations in proptest::collection::vec(mutation(), 1..4),
        signature_mutations in proptest::collection::vec(mutation(), 0..2),
    ) {
        let d = &samples().delegation;
        let message = String::from_utf8_lossy(&apply(d.message.clone().into_bytes(), &mutations)).into_owned();
        let signature = apply(d.signature.to_vec(), &signature_mutations);
        let statement = OwnerStatement { message, signature: signature.into() };
        let _ = Delegation::verify(&statement);
        let _ = Revocation::verify(&statement);
    }
}

#[test]
fn a_mutated_envelope_never_stops_a_replica_from_taking_valid_ones() -> TestResult {
    let owner = Wallet::new();
    let mut writer = Writer::new(&owner, &["*"], YEAR);
    let first = writer.write("profile", "name", json!("alice"), T0 + 1);
    let second = writer.write("profile", "name", json!("bob"), T0 + 2);
    let mut node = Node::new();
    let replica = node.replica(owner.address);
    let runner_cases = cases().min(500);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases: runner_cases, ..ProptestConfig::default() });
    let strategy = proptest::collection::vec(mutation(), 1..4);
    for _ in 0..runner_cases {
        let mutations = strategy.new_tree(&mut runner).map_err(|e| anyhow::anyhow!("{e}"))?.current();
        let bytes = apply(first.encode_to_vec(), &mutations);
        if let Ok(envelope) = SignedChange::decode(&bytes[..]) {
            let _ = replica.apply_remote(envelope);
        }
    }
    let _ = replica.apply_remote(first);
    let _ = replica.apply_remote(second);
    assert_eq!(replica.get("profile", "name")?, Some(json!("bob")));
    Ok(())
}
