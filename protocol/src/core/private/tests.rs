//! Private namespaces between real replicas (each with its own RocksDB), real wallet
//! signatures and real device keys; changes travel by the catch-up protocol.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use time::OffsetDateTime;

use super::*;
use crate::core::tests::{sync, Node, TestResult, Wallet};
use crate::core::DevWallet;

const DAY: Duration = Duration::from_secs(24 * 3600);

/// A node of the test: its store, its device key and its keyring for the one core.
struct Device {
    node: Node,
    keyring: Keyring,
}

impl Device {
    /// A node that writes `namespaces` of the owner's core (its device key published).
    fn delegated(owner: &Wallet, namespaces: &[&str]) -> Self {
        let mut device = Self::follower(owner);
        let statement = owner.dev.delegate(&device.node.peer, namespaces, DAY, OffsetDateTime::now_utc()).expect("delegation");
        let key = DeviceKey::from_keypair(&device.node.keypair).expect("device key").public();
        let keypair = device.node.keypair.clone();
        let replica = device.node.cores.own(statement).expect("own");
        replica.publish_device_key(key, &keypair).expect("publish");
        device
    }

    /// A node that only follows the core.
    fn follower(owner: &Wallet) -> Self {
        let mut node = Node::new();
        node.replica(owner.address);
        let device = Arc::new(DeviceKey::from_keypair(&node.keypair).expect("device key"));
        Device { keyring: Keyring::new(owner.address, Some(device)), node }
    }

    fn replica(&mut self) -> &mut Replica {
        let core = self.keyring.core;
        self.node.replica(core)
    }

    fn declare(&mut self, namespace: &str) {
        let keypair = self.node.keypair.clone();
        let replica = self.replica();
        let delegation = replica.own_delegation().cloned().expect("writer");
        declare(replica, namespace, &keypair, &delegation).expect("declare");
    }

    fn set(&mut self, namespace: &str, path: &str, value: serde_json::Value) -> Result<Vec<SignedChange>, PrivateError> {
        let keypair = self.node.keypair.clone();
        let core = self.keyring.core;
        let replica = self.node.cores.get_mut(&core).expect("held");
        let delegation = replica.own_delegation().cloned().expect("writer");
        set(replica, &mut self.keyring, namespace, path, &value, &keypair, &delegation)
    }

    fn get(&mut self, namespace: &str, path: &str) -> Result<Option<serde_json::Value>, PrivateError> {
        let core = self.keyring.core;
        let replica = self.node.cores.get_mut(&core).expect("held");
        get(replica, &mut self.keyring, namespace, path)
    }

    /// What the node does after applying changes: wrap held keys to new devices.
    fn share(&mut self) -> Option<SignedChange> {
        let keypair = self.node.keypair.clone();
        let core = self.keyring.core;
        let replica = self.node.cores.get_mut(&core).expect("held");
        share(replica, &mut self.keyring, &keypair).expect("share")
    }
}

/// Every device catches up with every other (both directions), twice (so what one learns from
/// a third reaches the rest).
fn sync_all(devices: &mut [&mut Device], core: Address) {
    for _ in 0..2 {
        for i in 0..devices.len() {
            for j in 0..devices.len() {
                if i != j {
                    let (a, b) = if i < j {
                        let (l, r) = devices.split_at_mut(j);
                        (&mut *l[i], &mut *r[0])
                    } else {
                        let (l, r) = devices.split_at_mut(i);
                        (&mut *r[0], &mut *l[j])
                    };
                    sync(&mut a.node, &mut b.node, core);
                }
            }
        }
    }
}

/// Every file under the node's store directory contains none of `needle`.
fn store_lacks(device: &Device, needle: &[u8]) -> bool {
    fn walk(dir: &std::path::Path, needle: &[u8]) -> bool {
        std::fs::read_dir(dir).expect("read dir").flatten().all(|entry| {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, needle)
            } else {
                let bytes = std::fs::read(&path).unwrap_or_default();
                !bytes.windows(needle.len()).any(|w| w == needle)
            }
        })
    }
    walk(device.node._dir.path(), needle)
}

fn encrypted(result: Result<Option<serde_json::Value>, PrivateError>) -> bool {
    matches!(result, Err(PrivateError::Encrypted { .. }))
}

#[test]
fn private_values_are_ciphertext_on_every_replica_and_plain_on_the_devices() -> TestResult {
    let owner = Wallet::new();
    let core = owner.address;
    let mut a = Device::delegated(&owner, &["notes", "profile"]);
    let mut b = Device::delegated(&owner, &["notes"]);
    let mut follower = Device::follower(&owner);
    sync_all(&mut [&mut a, &mut b, &mut follower], core);

    a.declare("notes");
    a.set("notes", "diary", json!("the-secret-plaintext-value-1"))?;
    let (keypair, delegation) = (a.node.keypair.clone(), a.replica().own_delegation().cloned().expect("writer"));
    a.replica().set("profile", "name", &json!("plain-control-value"), &keypair, &delegation)?;
    sync_all(&mut [&mut a, &mut b, &mut follower], core);

    assert_eq!(a.get("notes", "diary")?, Some(json!("the-secret-plaintext-value-1")));
    assert_eq!(b.get("notes", "diary")?, Some(json!("the-secret-plaintext-value-1")));
    // The follower replicates and verifies the same document, but cannot read the value.
    assert_eq!(follower.replica().heads(), a.replica().heads());
    assert!(encrypted(follower.get("notes", "diary")));
    let raw = follower.replica().get("notes", "diary")?.expect("stored");
    assert!(raw.as_str().is_some_and(|s| s.starts_with(CIPHERTEXT_PREFIX)), "raw value {raw}");
    // Plain namespaces stay plain.
    assert_eq!(follower.get("profile", "name")?, Some(json!("plain-control-value")));

    // B writes; A reads. Objects and nested paths round-trip.
    b.set("notes", "todo", json!({"items": ["the-secret-plaintext-value-2"], "done": false}))?;
    sync_all(&mut [&mut a, &mut b, &mut follower], core);
    assert_eq!(a.get("notes", "todo/items/0")?, Some(json!("the-secret-plaintext-value-2")));
    assert_eq!(
        a.get("notes", "")?,
        Some(json!({"diary": "the-secret-plaintext-value-1", "todo": {"items": ["the-secret-plaintext-value-2"], "done": false}}))
    );
    assert_eq!(follower.get("notes", "")?, Some(json!({"diary": {"$encrypted": "no key"}, "todo": {"$encrypted": "no key"}})));

    // The grep can fail: a plain value is found in the same files.
    assert!(!store_lacks(&follower, b"plain-control-value"), "the grep finds plain values");
    assert!(store_lacks(&follower, b"the-secret-plaintext-value"), "plaintext in the follower's store");
    assert!(store_lacks(&b, b"the-secret-plaintext-value"), "plaintext in a device's store");
    Ok(())
}

#[test]
fn writing_a_private_value_needs_a_declared_namespace_and_keeps_the_marker() -> TestResult {
    let owner = Wallet::new();
    let mut a = Device::delegated(&owner, &["notes"]);
    assert!(matches!(a.set("notes", "x", json!(1)), Err(PrivateError::NotPrivate(_))));
    a.declare("notes");
    assert!(matches!(a.set("notes", MARKER, json!(false)), Err(PrivateError::ReservedKey)));
    a.set("notes", "", json!({"a": 1, "b": [2]}))?;
    assert!(is_private(a.replica(), "notes"));
    assert_eq!(a.get("notes", "")?, Some(json!({"a": 1, "b": [2]})));
    assert_eq!(a.get("notes", "b/0")?, Some(json!(2)));
    assert_eq!(a.get("notes", "missing")?, None);
    Ok(())
}

#[test]
fn a_new_device_gets_the_keys_from_one_that_holds_them_and_reads_old_values() -> TestResult {
    let owner = Wallet::new();
    let core = owner.address;
    let mut a = Device::delegated(&owner, &["notes"]);
    a.declare("notes");
    a.set("notes", "old", json!("written-before-c"))?;
    let mut c = Device::delegated(&owner, &["notes"]);
    sync_all(&mut [&mut a, &mut c], core);
    assert!(encrypted(c.get("notes", "old")));
    assert!(a.share().is_some(), "A wraps its key to C's device key");
    assert!(a.share().is_none(), "nothing more to share");
    sync_all(&mut [&mut a, &mut c], core);
    assert_eq!(c.get("notes", "old")?, Some(json!("written-before-c")));
    Ok(())
}

#[test]
fn a_node_unlocked_by_the_wallet_signature_reads_and_a_wrong_signature_is_refused() -> TestResult {
    let owner = Wallet::new();
    let core = owner.address;
    let mut a = Device::delegated(&owner, &["notes"]);
    let mut b = Device::delegated(&owner, &["notes"]);
    let mut host = Device::follower(&owner);
    sync_all(&mut [&mut a, &mut b, &mut host], core);
    a.declare("notes");
    a.set("notes", "k", json!("before-unlock"))?;

    // The owner unlocks A: A publishes the wallet key and wraps what it holds to it.
    let message = unlock_message(&core);
    let signature = owner.dev.sign(&message)?;
    assert_eq!(signature, owner.dev.sign(&message)?, "RFC 6979: the same signature every time");
    a.keyring.unlock(&signature)?;
    assert!(a.share().is_some());
    // B writes later, with a key B makes: wrapped to the wallet key A published.
    sync_all(&mut [&mut a, &mut b, &mut host], core);
    b.set("notes", "k2", json!("after-unlock"))?;
    sync_all(&mut [&mut a, &mut b, &mut host], core);

    // A signature by another wallet, or of another text, unlocks nothing.
    let stranger = DevWallet::random();
    assert!(matches!(host.keyring.unlock(&stranger.sign(&message)?), Err(PrivateError::BadUnlock(_))));
    assert!(matches!(host.keyring.unlock(&owner.dev.sign("something else")?), Err(PrivateError::BadUnlock(_))));
    assert!(encrypted(host.get("notes", "k")));

    // The hosting node, given the signature (made outside it), reads everything.
    let secret = host.keyring.unlock(&signature)?;
    assert_eq!(host.get("notes", "k")?, Some(json!("before-unlock")));
    assert_eq!(host.get("notes", "k2")?, Some(json!("after-unlock")));
    // The remembered secret restores the unlock.
    let mut restored = Keyring::new(core, None);
    restored.unlock_with_secret(secret);
    assert_eq!(get(host.replica(), &mut restored, "notes", "k2")?, Some(json!("after-unlock")));
    Ok(())
}

#[test]
fn after_a_revocation_the_next_write_rotates_the_key_and_the_revoked_device_reads_only_old_values() -> TestResult {
    let owner = Wallet::new();
    let core = owner.address;
    let mut a = Device::delegated(&owner, &["notes"]);
    let mut b = Device::delegated(&owner, &["notes"]);
    let mut c = Device::delegated(&owner, &["notes"]);
    sync_all(&mut [&mut a, &mut b, &mut c], core);
    a.declare("notes");
    a.set("notes", "old", json!("seen-by-c"))?;
    sync_all(&mut [&mut a, &mut b, &mut c], core);
    assert_eq!(c.get("notes", "old")?, Some(json!("seen-by-c")));
    let first_key = a.keyring.keys.keys().copied().collect::<Vec<_>>();

    // The owner revokes C; A carries the revocation.
    let c_peer = c.node.peer;
    let message = a.replica().revocation_message(&c_peer, OffsetDateTime::now_utc())?;
    let revocation = owner.statement(message);
    let keypair = a.node.keypair.clone();
    let delegation = a.replica().own_delegation().cloned().expect("writer");
    a.replica().revoke(&revocation, &keypair, &delegation)?;
    assert!(a.share().is_none(), "nothing is wrapped to a revoked device");

    a.set("notes", "new", json!("not-for-c"))?;
    assert_eq!(a.keyring.len(), 2, "a new key");
    assert_ne!(a.keyring.keys.keys().copied().collect::<Vec<_>>(), first_key);
    sync_all(&mut [&mut a, &mut b, &mut c], core);
    assert_eq!(c.replica().heads(), a.replica().heads());

    assert_eq!(c.get("notes", "old")?, Some(json!("seen-by-c")));
    assert!(encrypted(c.get("notes", "new")));
    assert_eq!(b.get("notes", "old")?, Some(json!("seen-by-c")));
    assert_eq!(b.get("notes", "new")?, Some(json!("not-for-c")));
    // B's next write uses the fresh key, not the stale one.
    b.set("notes", "b", json!("also-not-for-c"))?;
    assert_eq!(b.keyring.len(), 2);
    sync_all(&mut [&mut a, &mut b, &mut c], core);
    assert!(encrypted(c.get("notes", "b")));
    Ok(())
}

#[test]
fn tampered_ciphertext_in_a_validly_signed_change_is_kept_as_a_change_and_refused_as_a_value() -> TestResult {
    let owner = Wallet::new();
    let core = owner.address;
    let mut a = Device::delegated(&owner, &["notes"]);
    let mut b = Device::delegated(&owner, &["notes"]);
    let mut follower = Device::follower(&owner);
    sync_all(&mut [&mut a, &mut b, &mut follower], core);
    a.declare("notes");
    a.set("notes", "v", json!("genuine"))?;
    sync_all(&mut [&mut a, &mut b, &mut follower], core);

    // B (a delegated key, so its change is validly signed) writes a ciphertext with one byte
    // flipped, a moved ciphertext and garbage, bypassing the encryption.
    let genuine = b.replica().get("notes", "v")?.expect("stored");
    let text = genuine.as_str().expect("string").to_owned();
    let mut flipped = text.clone().into_bytes();
    let last = flipped.len() - 1;
    flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
    let keypair = b.node.keypair.clone();
    let delegation = b.replica().own_delegation().cloned().expect("writer");
    b.replica().set("notes", "flipped", &json!(String::from_utf8(flipped)?), &keypair, &delegation)?;
    b.replica().set("notes", "moved", &genuine, &keypair, &delegation)?;
    b.replica().set("notes", "garbage", &json!("kbenc1:zz:%%%"), &keypair, &delegation)?;
    sync_all(&mut [&mut a, &mut b, &mut follower], core);

    // Same document everywhere: the changes are valid whoever holds the key.
    assert_eq!(a.replica().heads(), b.replica().heads());
    assert_eq!(follower.replica().heads(), b.replica().heads());
    for path in ["flipped", "moved", "garbage"] {
        let verdict = a.get("notes", path);
        assert!(matches!(verdict, Err(PrivateError::Undecryptable { .. })), "{path}: {verdict:?}");
    }
    assert_eq!(a.get("notes", "v")?, Some(json!("genuine")));
    let whole = a.get("notes", "")?.expect("namespace");
    assert_eq!(whole["flipped"], json!({"$encrypted": "undecryptable"}));
    assert_eq!(whole["v"], json!("genuine"));
    Ok(())
}

#[test]
fn concurrent_writes_of_one_private_value_merge_as_last_writer_wins() -> TestResult {
    let owner = Wallet::new();
    let core = owner.address;
    let mut a = Device::delegated(&owner, &["notes"]);
    let mut b = Device::delegated(&owner, &["notes"]);
    sync_all(&mut [&mut a, &mut b], core);
    a.declare("notes");
    a.set("notes", "doc", json!({"x": 0}))?;
    sync_all(&mut [&mut a, &mut b], core);
    a.set("notes", "doc", json!({"x": 1, "from": "a"}))?;
    b.set("notes", "doc", json!({"x": 2, "from": "b"}))?;
    sync_all(&mut [&mut a, &mut b], core);
    let (va, vb) = (a.get("notes", "doc")?, b.get("notes", "doc")?);
    assert_eq!(va, vb);
    let winner = va.expect("value");
    assert!(winner == json!({"x": 1, "from": "a"}) || winner == json!({"x": 2, "from": "b"}), "{winner}");
    Ok(())
}

