//! Private namespaces: values that only the owner's devices (and nodes the owner's wallet
//! unlocked) can read, on every replica.
//!
//! Every replica of a core — a follower, a community node that hosts it — holds and verifies
//! the whole document, so privacy cannot come from access control: a private value is
//! **encrypted before it enters a change**, and the document, the change log, gossip and
//! catch-up carry only its ciphertext.
//!
//! # Declaring a namespace private
//!
//! A writer whose delegation covers a namespace sets the key [`MARKER`] (`_private`) of that
//! namespace to `true` ([`declare`]). It is an ordinary signed change of that namespace, so
//! the existing validity rules apply unchanged (only a key delegated for the namespace can
//! make it). Values written there before the declaration stay as they were (plain).
//!
//! # Values
//!
//! [`set`] encrypts the JSON value written at a path with XChaCha20-Poly1305 under the core's
//! current **data key**, with a random 24-byte nonce, binding the core, the namespace, the
//! path and the key id as associated data (a ciphertext moved to another path or core does
//! not open). The document holds the string `kbenc1:<key id, hex>:<base64 of nonce ‖
//! ciphertext>` in place of the value: one Automerge scalar, so concurrent writes of one
//! private value merge as last-writer-wins, not key by key. Writing an object at the empty path
//! encrypts each of its keys separately. Key *names* (the path) stay visible.
//!
//! [`get`] decrypts. A node that holds no key for the value gets [`PrivateError::Encrypted`];
//! a ciphertext that does not open under its key (tampered or garbage written by a delegated
//! key) gets [`PrivateError::Undecryptable`] and a warning in the log. Inside a larger result
//! (reading a whole namespace), such leaves read as `{"$encrypted": "no key"}` and
//! `{"$encrypted": "undecryptable"}`. **The change that carries such a value stays valid**:
//! validity must not depend on who holds the key, or replicas with and without it would
//! disagree about the document; the value is refused when read, on every key holder alike.
//!
//! # Data keys
//!
//! A data key is 32 random bytes; its id is the first 8 bytes of sha2-256 of a domain and the
//! key (so a node that unwraps a key checks it is the one named). Keys are **wrapped** with
//! HPKE (the same suite as messages, see [`crate::msg::crypto`]) to each current device key of
//! the core (`Replica::device_keys`) and to each **wallet key** published by a current device.
//! A node writes wraps only in its own device namespace: `_device:<peer>/keys/<key id>/<X25519
//! public key, hex>` = hex(encapsulated key ‖ sealed key). The HPKE associated data is the core
//! and the key id.
//!
//! A device that holds keys wraps them to every current device or wallet key that lacks a wrap,
//! whenever it sees one ([`share`]; the node runs it after each change it applies), so a new
//! device reads the old values too.
//!
//! **Rotation.** A key is *stale* when someone outside the current devices and wallet keys may
//! hold it: a wrap of it names a recipient that is no longer current (a revoked or expired
//! device), or was published by a node that is no longer current. The next private write after
//! that makes a new key wrapped only to the current recipients. A revoked device still reads
//! what it could read before (it may have kept it anyway), not what is written after.
//!
//! # The wallet
//!
//! [`unlock_message`] is a fixed text per core. The owner signs it with `personal_sign`;
//! wallets sign deterministically (RFC 6979), so the signature is the same every time and is
//! a secret only the wallet can make again. [`Keyring::unlock`] checks that the owner signed it,
//! then derives an X25519 key pair from `sha2-256(domain ‖ core ‖ r ‖ s)` with HPKE's
//! `DeriveKeyPair` (HKDF-SHA256 extract and expand). A device that holds that key publishes its
//! public half at `_device:<peer>/wallet`, and from then on every device wraps data keys to it
//! too: any node that is given the signature (a hosting node, a new device without a
//! delegation yet) can read. Limits: the wallet key opens keys only after one device has been
//! unlocked; and a device that was *given the signature* keeps the wallet key, so revoking it
//! does not stop it reading keys wrapped to the wallet later (revocation protects against
//! devices that only ever held wrapped keys).
//!
//! # Objects
//!
//! Private objects (files) are encrypted with the same data keys, in the streaming format of
//! [`object`]; [`object_key`] gives the key a new object uses and [`Keyring::object_key`] the
//! key an object's header names.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use kubelt_proto::core::{OwnerStatement, SignedChange};
use libp2p::identity::{Keypair, PeerId};
use rand::RngCore;
use serde_json::{Map, Value as Json};
use sha2::{Digest, Sha256};
use unify_base64::Engine as _;

use super::address::Address;
use super::delegation::{device_namespace, recover_signer, DEVICE_NAMESPACE_PREFIX};
use super::replica::{unix_now, Replica, WriteError};
use super::value::{self, PathError};
use crate::msg::crypto::{hpke_seal, DeviceKey, KEY_LEN};

/// The key, inside a namespace, whose value `true` makes the namespace private.
pub const MARKER: &str = "_private";
/// How a private value starts in the document.
pub const CIPHERTEXT_PREFIX: &str = "kbenc1:";
/// The node-wide store key prefix (column `meta`) of a remembered wallet unlock.
pub const UNLOCK_STORE_PREFIX: &str = "private-unlock/";

const KEYS_PATH: &str = "keys";
const WALLET_PATH: &str = "wallet";
const WRAP_INFO: &[u8] = b"kubelt-private-v1 data key";
const VALUE_DOMAIN: &[u8] = b"kubelt-private-v1 value";
const KEY_ID_DOMAIN: &[u8] = b"kubelt-private-v1 key id";
const UNLOCK_DOMAIN: &[u8] = b"kubelt-private-v1 unlock";
/// Encapsulated key (32) and sealed data key with its tag (48).
const WRAP_LEN: usize = KEY_LEN + KEY_LEN + 16;
const NONCE_LEN: usize = 24;
/// Most wraps one replica examines (a bound against a core stuffed with wraps).
const MAX_WRAPS: usize = 100_000;
/// How long a rotation decision is reused when nothing else changed.
const FRESH_FOR: std::time::Duration = std::time::Duration::from_secs(10);

/// A data key's id.
pub type KeyId = [u8; 8];

/// Why a private read or write failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PrivateError {
    /// This node holds no key that opens the value.
    #[error("encrypted: this node holds no key for this private value of core {core} (a device of the owner shares it once this node's delegation is seen, or run `kubelt core unlock {core}`)")]
    Encrypted {
        /// The core, EIP-55.
        core: String,
    },
    /// The value's ciphertext does not open under its key: tampered, or garbage written by a
    /// delegated key. The change carrying it is valid; the value is refused.
    #[error("undecryptable private value at {path}: its ciphertext does not open under its key (tampered or malformed)")]
    Undecryptable {
        /// `namespace/path` of the value.
        path: String,
    },
    /// The namespace was not declared private.
    #[error("namespace {0:?} is not private (declare it with `kubelt core private`)")]
    NotPrivate(String),
    /// The path names the marker key itself.
    #[error("{MARKER:?} is reserved in a private namespace")]
    ReservedKey,
    /// This node has no device key (RSA node key) so it cannot hold data keys.
    #[error("this node has no device key (RSA node keys cannot have one)")]
    NoDeviceKey,
    /// The signature is not the owner's signature of the unlock message.
    #[error("not the owner's signature of the unlock message: {0}")]
    BadUnlock(String),
    /// The write failed.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// The path is invalid.
    #[error(transparent)]
    Path(#[from] PathError),
    /// The AEAD or HPKE failed.
    #[error("encryption failed")]
    Encryption,
}

/// The text the owner signs to unlock a core's private data on a node.
pub fn unlock_message(core: &Address) -> String {
    format!(
        "Unlock the private data of my Kubelt core {}.\n\nSigning this lets the node you give the signature to read the private namespaces of this core. Give it only to nodes you own.",
        core.to_checksum()
    )
}

/// The keys one node holds for one core: its device key, the wallet key if unlocked, and the
/// data keys it unwrapped.
pub struct Keyring {
    core: Address,
    device: Option<Arc<DeviceKey>>,
    wallet: Option<(DeviceKey, [u8; 32])>,
    keys: BTreeMap<KeyId, [u8; KEY_LEN]>,
    /// The last rotation decision: the fresh key, the state of others' changes it was made on
    /// ([`Replica::others_state`]) and when. Reused while neither changes (and for at most
    /// [`FRESH_FOR`], so an expired delegation is noticed): deciding costs scans of the device
    /// namespaces that would otherwise add ~10% to every private write.
    fresh: Option<(KeyId, (usize, usize), std::time::Instant)>,
    /// Wraps that did not open (publisher, key id, recipient): not tried again.
    failed: BTreeSet<(PeerId, KeyId, [u8; KEY_LEN])>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring").field("core", &self.core).field("keys", &self.keys.len()).field("unlocked", &self.wallet.is_some()).finish_non_exhaustive()
    }
}

impl Keyring {
    /// An empty keyring of `core` for a node with `device` key.
    pub fn new(core: Address, device: Option<Arc<DeviceKey>>) -> Self {
        Keyring { core, device, wallet: None, keys: BTreeMap::new(), fresh: None, failed: BTreeSet::new() }
    }

    /// Checks that `signature` is the owner's signature of [`unlock_message`] and derives the
    /// wallet key from it. Returns the secret to remember ([`Keyring::unlock_with_secret`]).
    pub fn unlock(&mut self, signature: &[u8]) -> Result<[u8; 32], PrivateError> {
        let signer = recover_signer(&unlock_message(&self.core), signature).map_err(|e| PrivateError::BadUnlock(e.to_string()))?;
        if signer != self.core {
            return Err(PrivateError::BadUnlock(format!("signed by {}, not by the owner {}", signer.to_checksum(), self.core.to_checksum())));
        }
        let mut hash = Sha256::new();
        hash.update(UNLOCK_DOMAIN);
        hash.update(self.core.to_string().as_bytes());
        hash.update(&signature[..64]);
        let secret: [u8; 32] = hash.finalize().into();
        self.unlock_with_secret(secret);
        Ok(secret)
    }

    /// Restores a wallet unlock from the secret [`Keyring::unlock`] returned.
    pub fn unlock_with_secret(&mut self, secret: [u8; 32]) {
        self.wallet = Some((DeviceKey::derive(&secret), secret));
        self.failed.clear();
    }

    /// Whether the wallet unlocked this keyring.
    pub fn is_unlocked(&self) -> bool {
        self.wallet.is_some()
    }

    /// How many data keys this node holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether this node holds no data key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Unwraps the data keys wrapped to this node's device or wallet key that it lacks.
    pub fn refresh(&mut self, replica: &Replica) {
        let aad_core = self.core;
        for wrap in wraps(replica) {
            if self.keys.contains_key(&wrap.key) || self.failed.contains(&(wrap.publisher, wrap.key, wrap.recipient)) {
                continue;
            }
            let opener = match (&self.device, &self.wallet) {
                (Some(d), _) if d.public() == wrap.recipient => &**d,
                (_, Some((w, _))) if w.public() == wrap.recipient => w,
                _ => continue,
            };
            let opened = opener
                .hpke_open(&wrap.bytes[..KEY_LEN], &wrap.bytes[KEY_LEN..], WRAP_INFO, &wrap_aad(&aad_core, &wrap.key))
                .ok()
                .and_then(|k| <[u8; KEY_LEN]>::try_from(k.as_slice()).ok())
                .filter(|k| key_id(k) == wrap.key);
            match opened {
                Some(key) => {
                    self.keys.insert(wrap.key, key);
                }
                None => {
                    tracing::warn!(core = %self.core, publisher = %wrap.publisher, "a data key wrapped to this node does not open");
                    self.failed.insert((wrap.publisher, wrap.key, wrap.recipient));
                }
            }
        }
    }
}

/// Whether `namespace` was declared private.
pub fn is_private(replica: &Replica, namespace: &str) -> bool {
    matches!(replica.read_path(namespace, &[MARKER.to_owned()]), Ok(Some(Json::Bool(true))))
}

/// Declares `namespace` private (a change of that namespace, so the writer's delegation must
/// cover it). Writing it again is [`WriteError::NoChange`].
pub fn declare(replica: &mut Replica, namespace: &str, keypair: &Keypair, delegation: &OwnerStatement) -> Result<SignedChange, PrivateError> {
    if is_private(replica, namespace) {
        return Err(WriteError::NoChange.into());
    }
    Ok(replica.set(namespace, MARKER, &Json::Bool(true), keypair, delegation)?)
}

/// Recipients of a key's wraps, and the nodes that published them.
type Holders = (BTreeSet<[u8; KEY_LEN]>, BTreeSet<PeerId>);

/// One wrap found in the document.
struct Wrap {
    publisher: PeerId,
    key: KeyId,
    recipient: [u8; KEY_LEN],
    bytes: Vec<u8>,
}

/// Every well-formed wrap in every device namespace (bounded).
fn wraps(replica: &Replica) -> Vec<Wrap> {
    let mut out = Vec::new();
    for ns in value::namespaces(&replica.doc) {
        let Some(publisher) = ns.strip_prefix(DEVICE_NAMESPACE_PREFIX).and_then(|p| p.parse::<PeerId>().ok()) else { continue };
        let Ok(Some(Json::Object(keys))) = replica.read_path(&ns, &[KEYS_PATH.to_owned()]) else { continue };
        for (id, recipients) in keys {
            let Some(key) = hex::decode(&id).ok().and_then(|b| KeyId::try_from(b.as_slice()).ok()) else { continue };
            let Json::Object(recipients) = recipients else { continue };
            for (recipient, wrap) in recipients {
                let Some(recipient) = hex::decode(&recipient).ok().and_then(|b| <[u8; KEY_LEN]>::try_from(b.as_slice()).ok()) else { continue };
                let Some(bytes) = wrap.as_str().and_then(|w| hex::decode(w).ok()).filter(|b| b.len() == WRAP_LEN) else { continue };
                out.push(Wrap { publisher, key, recipient, bytes });
                if out.len() >= MAX_WRAPS {
                    return out;
                }
            }
        }
    }
    out
}

/// The current device keys and the wallet keys they published: who may hold data keys now.
fn recipients(replica: &Replica) -> (BTreeSet<PeerId>, BTreeSet<[u8; KEY_LEN]>) {
    let devices = replica.device_keys();
    let mut allowed: BTreeSet<[u8; KEY_LEN]> = devices.iter().map(|(_, k)| *k).collect();
    let current: BTreeSet<PeerId> = devices.into_iter().map(|(p, _)| p).collect();
    for peer in &current {
        if let Ok(Some(Json::String(hex_key))) = replica.read_path(&device_namespace(peer), &[WALLET_PATH.to_owned()]) {
            if let Some(k) = hex::decode(hex_key).ok().and_then(|b| <[u8; KEY_LEN]>::try_from(b.as_slice()).ok()) {
                allowed.insert(k);
            }
        }
    }
    (current, allowed)
}

fn key_id(key: &[u8; KEY_LEN]) -> KeyId {
    let digest = Sha256::new().chain_update(KEY_ID_DOMAIN).chain_update(key).finalize();
    let mut id = [0u8; 8];
    id.copy_from_slice(&digest[..8]);
    id
}

fn wrap_aad(core: &Address, key: &KeyId) -> Vec<u8> {
    let mut aad = core.to_string().into_bytes();
    aad.push(0);
    aad.extend_from_slice(key);
    aad
}

/// Wraps `key` to each of `to`: (recipient hex, wrap hex).
fn wrap_to(core: &Address, id: &KeyId, key: &[u8; KEY_LEN], to: impl IntoIterator<Item = [u8; KEY_LEN]>) -> Result<Vec<(String, String)>, PrivateError> {
    to.into_iter()
        .map(|r| {
            let (enc, sealed) = hpke_seal(&r, WRAP_INFO, key, &wrap_aad(core, id)).map_err(|_| PrivateError::Encryption)?;
            Ok((hex::encode(r), hex::encode([enc, sealed].concat())))
        })
        .collect()
}

/// Writes wraps (and the wallet key) into this node's device namespace, as one change.
fn write_wraps(
    replica: &mut Replica,
    keypair: &Keypair,
    delegation: &OwnerStatement,
    wraps: Vec<(KeyId, String, String)>,
    wallet: Option<[u8; KEY_LEN]>,
) -> Result<SignedChange, PrivateError> {
    let ns = device_namespace(&keypair.public().to_peer_id());
    let ns2 = ns.clone();
    Ok(replica.local_change(keypair, delegation, unix_now(), None, &ns, move |tx| {
        for (id, recipient, wrap) in &wraps {
            value::set_path(tx, &ns2, &[KEYS_PATH.to_owned(), hex::encode(id), recipient.clone()], &Json::String(wrap.clone()))?;
        }
        if let Some(w) = wallet {
            value::set_path(tx, &ns2, &[WALLET_PATH.to_owned()], &Json::String(hex::encode(w)))?;
        }
        Ok(())
    })?)
}

/// Who may hold each key according to the document: the recipients of its wraps and the nodes
/// that published them.
fn holders(wraps: &[Wrap]) -> BTreeMap<KeyId, Holders> {
    let mut out: BTreeMap<KeyId, Holders> = BTreeMap::new();
    for w in wraps {
        let entry = out.entry(w.key).or_default();
        entry.0.insert(w.recipient);
        entry.1.insert(w.publisher);
    }
    out
}

/// Wraps every data key this node holds to every current device and wallet key that lacks a
/// wrap of it, and publishes this node's wallet key if it is unlocked. Returns the change to
/// publish, if any. Nothing happens on a node that does not write the core.
pub fn share(replica: &mut Replica, keyring: &mut Keyring, keypair: &Keypair) -> Result<Option<SignedChange>, PrivateError> {
    let Some(delegation) = replica.own_delegation().cloned() else { return Ok(None) };
    keyring.refresh(replica);
    if keyring.keys.is_empty() && keyring.wallet.is_none() {
        return Ok(None);
    }
    let me = keypair.public().to_peer_id();
    let (current, allowed) = recipients(replica);
    if !current.contains(&me) {
        // Not a current device (no published key, or revoked): nothing to share as.
        return Ok(None);
    }
    let wallet = keyring.wallet.as_ref().map(|(w, _)| w.public());
    let published_wallet = match replica.read_path(&device_namespace(&me), &[WALLET_PATH.to_owned()]) {
        Ok(Some(Json::String(s))) => hex::decode(s).ok(),
        _ => None,
    };
    let wallet = wallet.filter(|w| published_wallet.as_deref() != Some(&w[..]));
    let mut allowed = allowed;
    allowed.extend(wallet);
    let found = wraps(replica);
    let holders = holders(&found);
    let mut new = Vec::new();
    for (id, key) in &keyring.keys {
        let have = holders.get(id).map(|(r, _)| r.clone()).unwrap_or_default();
        let missing: Vec<[u8; KEY_LEN]> = allowed.iter().filter(|r| !have.contains(*r)).copied().collect();
        for (r, w) in wrap_to(&replica.core(), id, key, missing)? {
            new.push((*id, r, w));
        }
    }
    if new.is_empty() && wallet.is_none() {
        return Ok(None);
    }
    write_wraps(replica, keypair, &delegation, new, wallet).map(Some)
}

/// The data key the next private write uses, making (and wrapping) a new one when none that
/// this node holds is still fresh. Returns it and the changes made on the way.
fn current_key(replica: &mut Replica, keyring: &mut Keyring, keypair: &Keypair, delegation: &OwnerStatement) -> Result<(KeyId, [u8; KEY_LEN], Vec<SignedChange>), PrivateError> {
    let device = keyring.device.clone().ok_or(PrivateError::NoDeviceKey)?;
    let me = keypair.public().to_peer_id();
    if let Some((id, state, at)) = keyring.fresh {
        if state == replica.others_state(&me) && at.elapsed() < FRESH_FOR {
            if let Some(key) = keyring.keys.get(&id) {
                return Ok((id, *key, Vec::new()));
            }
        }
    }
    let mut changes = Vec::new();
    if let Some(c) = replica.publish_device_key(device.public(), keypair)? {
        changes.push(c);
    }
    keyring.refresh(replica);
    let (current_peers, allowed) = recipients(replica);
    let found = wraps(replica);
    let holders = holders(&found);
    let fresh = keyring.keys.iter().rev().find(|(id, _)| {
        holders.get(*id).is_some_and(|(recipients, publishers)| recipients.is_subset(&allowed) && publishers.is_subset(&current_peers))
    });
    if let Some((id, key)) = fresh {
        keyring.fresh = Some((*id, replica.others_state(&me), std::time::Instant::now()));
        return Ok((*id, *key, changes));
    }
    let mut key = [0u8; KEY_LEN];
    rand::rngs::OsRng.fill_bytes(&mut key);
    let id = key_id(&key);
    let mut to = allowed;
    to.insert(device.public());
    let wraps = wrap_to(&replica.core(), &id, &key, to)?.into_iter().map(|(r, w)| (id, r, w)).collect();
    changes.push(write_wraps(replica, keypair, delegation, wraps, None)?);
    keyring.keys.insert(id, key);
    keyring.fresh = Some((id, replica.others_state(&me), std::time::Instant::now()));
    tracing::info!(core = %replica.core(), key = %hex::encode(id), "new data key for private values");
    Ok((id, key, changes))
}

fn value_aad(core: &Address, namespace: &str, path: &[String], id: &KeyId) -> Vec<u8> {
    let mut aad = VALUE_DOMAIN.to_vec();
    for part in [core.to_string().as_str(), namespace, path.join("/").as_str()] {
        aad.push(0);
        aad.extend_from_slice(part.as_bytes());
    }
    aad.push(0);
    aad.extend_from_slice(id);
    aad
}

fn encrypt(core: &Address, namespace: &str, path: &[String], id: &KeyId, key: &[u8; KEY_LEN], plain: &Json) -> Result<Json, PrivateError> {
    let bytes = serde_json::to_vec(plain).map_err(|_| PrivateError::Encryption)?;
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let aad = value_aad(core, namespace, path, id);
    let ct = XChaCha20Poly1305::new(Key::from_slice(key))
        .encrypt(XNonce::from_slice(&nonce), Payload { msg: &bytes, aad: &aad })
        .map_err(|_| PrivateError::Encryption)?;
    let body = unify_base64::engine::general_purpose::STANDARD_NO_PAD.encode([&nonce[..], &ct].concat());
    Ok(Json::String(format!("{CIPHERTEXT_PREFIX}{}:{body}", hex::encode(id))))
}

/// Writes `value` at `namespace/path`, encrypted. Returns the changes to publish, in order (a
/// device key or a new data key may come first).
pub fn set(
    replica: &mut Replica,
    keyring: &mut Keyring,
    namespace: &str,
    path: &str,
    value: &Json,
    keypair: &Keypair,
    delegation: &OwnerStatement,
) -> Result<Vec<SignedChange>, PrivateError> {
    if !is_private(replica, namespace) {
        return Err(PrivateError::NotPrivate(namespace.to_owned()));
    }
    let segments = value::parse_path(path)?;
    if segments.first().is_some_and(|s| s == MARKER) {
        return Err(PrivateError::ReservedKey);
    }
    let (id, key, mut changes) = current_key(replica, keyring, keypair, delegation)?;
    let core = replica.core();
    let sealed = if segments.is_empty() {
        let Json::Object(map) = value else { return Err(PathError::NamespaceNotObject.into()) };
        let mut out = Map::new();
        for (k, v) in map {
            if k != MARKER {
                out.insert(k.clone(), encrypt(&core, namespace, std::slice::from_ref(k), &id, &key, v)?);
            }
        }
        out.insert(MARKER.to_owned(), Json::Bool(true));
        Json::Object(out)
    } else {
        encrypt(&core, namespace, &segments, &id, &key, value)?
    };
    match replica.set(namespace, path, &sealed, keypair, delegation) {
        Ok(c) => changes.push(c),
        Err(WriteError::NoChange) if !changes.is_empty() => {}
        Err(e) => return Err(e.into()),
    }
    Ok(changes)
}

/// Opens one ciphertext written at `namespace/path`.
fn decrypt(replica: &Replica, keyring: &mut Keyring, namespace: &str, path: &[String], text: &str) -> Result<Json, PrivateError> {
    let core = replica.core();
    let undecryptable = || {
        let path = format!("{namespace}/{}", path.join("/"));
        tracing::warn!(%core, %path, "a private value does not decrypt: refused");
        PrivateError::Undecryptable { path }
    };
    let rest = text.strip_prefix(CIPHERTEXT_PREFIX).ok_or_else(undecryptable)?;
    let (id_hex, body) = rest.split_once(':').ok_or_else(undecryptable)?;
    let id = hex::decode(id_hex).ok().and_then(|b| KeyId::try_from(b.as_slice()).ok()).ok_or_else(undecryptable)?;
    if !keyring.keys.contains_key(&id) {
        keyring.refresh(replica);
    }
    let key = keyring.keys.get(&id).ok_or_else(|| PrivateError::Encrypted { core: core.to_checksum() })?;
    let bytes = unify_base64::engine::general_purpose::STANDARD_NO_PAD.decode(body).map_err(|_| undecryptable())?;
    if bytes.len() < NONCE_LEN {
        return Err(undecryptable());
    }
    let (nonce, ct) = bytes.split_at(NONCE_LEN);
    let aad = value_aad(&core, namespace, path, &id);
    let plain = XChaCha20Poly1305::new(Key::from_slice(key))
        .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad: &aad })
        .map_err(|_| undecryptable())?;
    serde_json::from_slice(&plain).map_err(|_| undecryptable())
}

fn is_ciphertext(v: &Json) -> Option<&str> {
    v.as_str().filter(|s| s.starts_with(CIPHERTEXT_PREFIX))
}

/// Decrypts every ciphertext leaf of `value` (read at `path`); unreadable leaves become
/// `{"$encrypted": "no key" | "undecryptable"}`.
fn open_leaves(replica: &Replica, keyring: &mut Keyring, namespace: &str, path: &mut Vec<String>, value: Json) -> Json {
    match value {
        Json::Object(map) => {
            let top = path.is_empty();
            let mut out = Map::new();
            for (k, v) in map {
                if top && k == MARKER {
                    continue;
                }
                path.push(k.clone());
                let v = open_leaves(replica, keyring, namespace, path, v);
                path.pop();
                out.insert(k, v);
            }
            Json::Object(out)
        }
        Json::String(s) if s.starts_with(CIPHERTEXT_PREFIX) => match decrypt(replica, keyring, namespace, path, &s) {
            Ok(v) => v,
            Err(PrivateError::Encrypted { .. }) => serde_json::json!({"$encrypted": "no key"}),
            Err(_) => serde_json::json!({"$encrypted": "undecryptable"}),
        },
        other => other,
    }
}

/// Reads `namespace/path`, decrypting private values. On a plain namespace this is
/// [`Replica::get`].
pub fn get(replica: &Replica, keyring: &mut Keyring, namespace: &str, path: &str) -> Result<Option<Json>, PrivateError> {
    let segments = value::parse_path(path)?;
    if !is_private(replica, namespace) {
        return Ok(replica.read_path(namespace, &segments)?);
    }
    if let Some(v) = replica.read_path(namespace, &segments)? {
        if let Some(text) = is_ciphertext(&v) {
            return decrypt(replica, keyring, namespace, &segments, text).map(Some);
        }
        let mut walked = segments.clone();
        return Ok(Some(open_leaves(replica, keyring, namespace, &mut walked, v)));
    }
    // Absent, or below a value that was encrypted as a whole.
    for depth in (1..segments.len()).rev() {
        if let Some(v) = replica.read_path(namespace, &segments[..depth])? {
            let Some(text) = is_ciphertext(&v) else { return Ok(None) };
            let plain = decrypt(replica, keyring, namespace, &segments[..depth], text)?;
            return Ok(segments[depth..].iter().try_fold(plain, |v, s| match v {
                Json::Object(mut m) => m.remove(s),
                Json::Array(mut a) => s.parse::<usize>().ok().filter(|i| *i < a.len()).map(|i| a.swap_remove(i)),
                _ => None,
            }));
        }
    }
    Ok(None)
}

/// The data key the next private object is encrypted with: the key the next private value
/// would use ([`set`]), made and wrapped first when none is fresh. Returns the changes made on
/// the way (publish them, and have them on disk, before anything is encrypted with the key:
/// an object whose key's wraps were lost can never be read).
pub fn object_key(replica: &mut Replica, keyring: &mut Keyring, keypair: &Keypair, delegation: &OwnerStatement) -> Result<(object::ObjectKey, Vec<SignedChange>), PrivateError> {
    let (id, key, changes) = current_key(replica, keyring, keypair, delegation)?;
    Ok((object::ObjectKey::new(id, key), changes))
}

impl Keyring {
    /// The data key `id` (named by a private object's header), unwrapping the keys wrapped
    /// to this node first if it is not held yet. [`PrivateError::Encrypted`] if this node
    /// holds no such key.
    pub fn object_key(&mut self, replica: &Replica, id: &KeyId) -> Result<object::ObjectKey, PrivateError> {
        if !self.keys.contains_key(id) {
            self.refresh(replica);
        }
        self.keys.get(id).map(|key| object::ObjectKey::new(*id, *key)).ok_or_else(|| PrivateError::Encrypted { core: self.core.to_checksum() })
    }
}

pub mod object;

#[cfg(test)]
mod tests;
