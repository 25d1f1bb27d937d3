//! Owner statements: delegations and revocations, as wallet-signed SIWE messages.
//!
//! The owner of a core never hands its wallet key to a node. Instead the wallet signs, with
//! EIP-191 `personal_sign`, an EIP-4361 ("Sign-In with Ethereum") message that a node prints
//! (`kubelt core delegate`). Any node checks such a statement offline: it recovers the signer
//! from the signature over the exact message text and compares it with the address the
//! message names, which is the core id.
//!
//! # Delegation
//!
//! ```text
//! kubelt wants you to sign in with your Ethereum account:
//! 0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed
//!
//! Allow Kubelt node 12D3KooW… to write namespaces profile, apps of this core until 2026-01-01T00:00:00Z.
//!
//! URI: urn:kubelt:peer:12D3KooW…
//! Version: 1
//! Chain ID: 1
//! Nonce: 5mVn0v1kqQ2Vr8Rk
//! Issued At: 2025-01-01T00:00:00Z
//! Expiration Time: 2026-01-01T00:00:00Z
//! Resources:
//! - urn:kubelt:ns:profile
//! - urn:kubelt:ns:apps
//! ```
//!
//! - `URI` names the node key it authorizes: `urn:kubelt:peer:<libp2p peer id>` (the peer id is
//!   the multihash of the node's public key, so it names the key itself).
//! - `Resources` lists the namespaces (top-level keys of the core document) the key may write,
//!   `urn:kubelt:ns:<name>`, or `urn:kubelt:ns:*` for every namespace. Reading is not delegated:
//!   every replica holds the whole document.
//! - `Expiration Time` is required; `Not Before` is honoured when present. Both are compared
//!   with the *change's* time, never with the verifying node's clock (see [`super`]).
//! - The statement line is for the person signing; it is not interpreted.
//! - `Chain ID` is 1 and the domain is `kubelt`; neither is checked (the signature is the same on
//!   every chain, and there is no web origin to bind to).
//!
//! # Revocation
//!
//! Same shape with `URI: urn:kubelt:revoke:<peer id>` and, as resources, the point of the
//! core's history up to which that key's changes stay valid:
//! `urn:kubelt:keep:<actor suffix hex>:<seq>` for each Automerge actor the key wrote with (see
//! [`super::change`]). Every change by that key beyond those points — and every change that
//! depends on one — is invalid. The cut is part of the signed text, so a revocation means the
//! same thing on every replica whatever order changes arrive in, and replaying it is harmless.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use ethers_core::k256::ecdsa::{RecoveryId, Signature, VerifyingKey};
use ethers_core::utils::{hash_message, keccak256};
use kubelt_proto::core::OwnerStatement;
use libp2p::identity::PeerId;
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::address::Address;

/// The SIWE domain of the messages this module writes.
pub const DOMAIN: &str = "kubelt";
/// URI prefix naming the node key a delegation authorizes.
pub const PEER_URN: &str = "urn:kubelt:peer:";
/// URI prefix naming the node key a revocation revokes.
pub const REVOKE_URN: &str = "urn:kubelt:revoke:";
/// Resource prefix of a delegated namespace.
pub const NAMESPACE_URN: &str = "urn:kubelt:ns:";
/// Resource prefix of a revocation's cut: `urn:kubelt:keep:<actor suffix hex>:<seq>`.
pub const KEEP_URN: &str = "urn:kubelt:keep:";
/// The namespace wildcard: every namespace except the reserved one.
pub const ALL_NAMESPACES: &str = "*";
/// The namespace where the core records its own bookkeeping (revocations). No delegation
/// grants it; only a change carrying an owner-signed revocation may write it.
pub const RESERVED_NAMESPACE: &str = "_kubelt";

/// Why an owner statement (delegation or revocation) is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DelegationError {
    /// The signature is not hex.
    #[error("the signature is not hex: {0}")]
    BadHex(String),
    /// The signature is not 65 bytes (r ‖ s ‖ v).
    #[error("the signature is {0} bytes long; an Ethereum personal_sign signature is 65 bytes (r, s, v)")]
    WrongSignatureLength(usize),
    /// The signature's `v` is not 27/28 (or 0/1).
    #[error("the signature's recovery byte v = {0} is not 27, 28, 0 or 1")]
    BadRecoveryId(u8),
    /// No public key can be recovered from the signature.
    #[error("the signature is not a valid secp256k1 signature of this message")]
    BadSignature,
    /// The message is not a SIWE message of the expected kind.
    #[error("malformed statement: {0}")]
    Malformed(String),
    /// The wallet that signed is not the address the message names.
    #[error("the message names {claimed} but was signed by {signer}")]
    SignedBySomeoneElse {
        /// Who actually signed.
        signer: Address,
        /// Who the message says signs.
        claimed: Address,
    },
    /// The statement is by the owner of another core.
    #[error("the statement is by the owner of core {owner}, not of core {core}")]
    WrongCore {
        /// The core being written.
        core: Address,
        /// The core the statement is about.
        owner: Address,
    },
    /// The delegation authorizes another node key than the change's author.
    #[error("the delegation authorizes node {delegated}, not the author {author}")]
    WrongPeer {
        /// The key named in the delegation (peer id, base58).
        delegated: String,
        /// The key that signed the change (peer id, base58).
        author: String,
    },
    /// The change's time is after the delegation's expiration.
    #[error("the delegation expired at {}, the change is from {}", fmt_time(*expired_at), fmt_time(*at))]
    Expired {
        /// Expiration time (unix seconds).
        expired_at: i64,
        /// The change's time (unix seconds).
        at: i64,
    },
    /// The change's time is before the delegation's `Not Before`.
    #[error("the delegation is valid from {}, the change is from {}", fmt_time(*not_before), fmt_time(*at))]
    NotYetValid {
        /// Not-before time (unix seconds).
        not_before: i64,
        /// The change's time (unix seconds).
        at: i64,
    },
    /// The delegation does not cover this namespace.
    #[error("the delegation does not cover namespace {0:?}")]
    NamespaceNotDelegated(String),
    /// A namespace name is not allowed.
    #[error("invalid namespace {0:?}: 1 to 64 characters of A-Z a-z 0-9 . _ -, not starting with _")]
    InvalidNamespace(String),
}

/// Formats unix seconds as RFC 3339 for messages.
pub(crate) fn fmt_time(t: i64) -> String {
    OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("@{t}"))
}

/// Whether `name` may be used as a namespace: 1–64 of `[A-Za-z0-9._-]`, not starting with `_`.
pub fn is_valid_namespace(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('_')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Parses a wallet signature given as hex (`0x` optional): 65 bytes, `v` in {27, 28, 0, 1}.
pub fn parse_signature(input: &str) -> Result<Vec<u8>, DelegationError> {
    let digits = input.trim();
    let digits = digits.strip_prefix("0x").or_else(|| digits.strip_prefix("0X")).unwrap_or(digits);
    let bytes = hex::decode(digits).map_err(|e| DelegationError::BadHex(e.to_string()))?;
    if bytes.len() != 65 {
        return Err(DelegationError::WrongSignatureLength(bytes.len()));
    }
    recovery_id(bytes[64])?;
    Ok(bytes)
}

/// Builds the wire form of a statement from the message text and the hex signature the wallet
/// returned; checks the signature's shape (not yet who signed).
pub fn owner_statement(message: &str, signature_hex: &str) -> Result<OwnerStatement, DelegationError> {
    let signature = parse_signature(signature_hex)?;
    Ok(OwnerStatement { message: message.to_owned(), signature: signature.into() })
}

fn recovery_id(v: u8) -> Result<u8, DelegationError> {
    match v {
        0 | 1 => Ok(v),
        27 | 28 => Ok(v - 27),
        other => Err(DelegationError::BadRecoveryId(other)),
    }
}

/// Recovers the address that signed `message` with EIP-191 `personal_sign`.
pub fn recover_signer(message: &str, signature: &[u8]) -> Result<Address, DelegationError> {
    if signature.len() != 65 {
        return Err(DelegationError::WrongSignatureLength(signature.len()));
    }
    let mut recid = recovery_id(signature[64])?;
    let mut sig = Signature::from_slice(&signature[..64]).map_err(|_| DelegationError::BadSignature)?;
    // Wallets emit low-s signatures (EIP-2); accept a high-s one by normalizing it, which flips
    // the parity of the recovered point.
    if let Some(normalized) = sig.normalize_s() {
        sig = normalized;
        recid ^= 1;
    }
    let recid = RecoveryId::from_byte(recid).ok_or(DelegationError::BadSignature)?;
    let prehash = hash_message(message.as_bytes());
    let key = VerifyingKey::recover_from_prehash(prehash.as_bytes(), &sig, recid)
        .map_err(|_| DelegationError::BadSignature)?;
    let point = key.to_encoded_point(false);
    let hash = keccak256(&point.as_bytes()[1..]);
    let mut address = [0u8; 20];
    address.copy_from_slice(&hash[12..]);
    Ok(Address::from_bytes(address))
}

/// A content id for a statement: sha2-256 of the message, a zero byte and the signature.
pub fn statement_id(statement: &OwnerStatement) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(statement.message.as_bytes());
    hasher.update([0u8]);
    hasher.update(&statement.signature);
    hasher.finalize().into()
}

/// Parses a SIWE message and checks that the address it names signed it.
fn verify_siwe(statement: &OwnerStatement) -> Result<(siwe::Message, Address), DelegationError> {
    if statement.signature.len() != 65 {
        return Err(DelegationError::WrongSignatureLength(statement.signature.len()));
    }
    // The signature covers the exact text; parsing forgives what copy-and-paste through a
    // wallet tends to add (CRLF line ends, a trailing newline).
    let normalized = statement.message.replace("\r\n", "\n");
    let message: siwe::Message = normalized
        .trim_end()
        .parse()
        .map_err(|e: siwe::ParseError| DelegationError::Malformed(format!("not a SIWE (EIP-4361) message: {e}")))?;
    let claimed = Address::from_bytes(message.address);
    let signer = recover_signer(&statement.message, &statement.signature)?;
    if signer != claimed {
        return Err(DelegationError::SignedBySomeoneElse { signer, claimed });
    }
    Ok((message, claimed))
}

fn peer_from_uri(uri: &str, prefix: &str, what: &str) -> Result<PeerId, DelegationError> {
    let rest = uri.strip_prefix(prefix).ok_or_else(|| {
        DelegationError::Malformed(format!("the URI of a {what} is {prefix}<peer id>, not {uri}"))
    })?;
    rest.parse::<PeerId>()
        .map_err(|e| DelegationError::Malformed(format!("{rest:?} in the URI is not a libp2p peer id: {e}")))
}

/// The namespaces a delegation covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Namespaces {
    /// `urn:kubelt:ns:*`: every namespace except the reserved one.
    All,
    /// Exactly these.
    Only(BTreeSet<String>),
}

impl Namespaces {
    /// Whether `namespace` is covered. The reserved namespace never is.
    pub fn allows(&self, namespace: &str) -> bool {
        if namespace == RESERVED_NAMESPACE {
            return false;
        }
        match self {
            Namespaces::All => true,
            Namespaces::Only(set) => set.contains(namespace),
        }
    }
}

impl fmt::Display for Namespaces {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Namespaces::All => f.write_str("*"),
            Namespaces::Only(set) => {
                let names: Vec<&str> = set.iter().map(String::as_str).collect();
                f.write_str(&names.join(", "))
            }
        }
    }
}

/// A verified delegation: the owner allows a node key to write some namespaces until a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delegation {
    /// The owner, i.e. the core this delegation is for.
    pub owner: Address,
    /// The node key allowed to write.
    pub peer: PeerId,
    /// What it may write.
    pub namespaces: Namespaces,
    /// `Issued At` (unix seconds).
    pub issued_at: i64,
    /// `Not Before` (unix seconds), if any.
    pub not_before: Option<i64>,
    /// `Expiration Time` (unix seconds).
    pub expires_at: i64,
    /// [`statement_id`] of the signed statement.
    pub id: [u8; 32],
}

impl Delegation {
    /// Verifies a delegation statement: a well-formed SIWE delegation signed by the address it
    /// names. Who it is for, and when, is checked by [`Delegation::check`].
    pub fn verify(statement: &OwnerStatement) -> Result<Delegation, DelegationError> {
        let (message, owner) = verify_siwe(statement)?;
        let uri = message.uri.as_str();
        if uri.starts_with(REVOKE_URN) {
            return Err(DelegationError::Malformed("this is a revocation, not a delegation".into()));
        }
        let peer = peer_from_uri(uri, PEER_URN, "delegation")?;
        let mut names = BTreeSet::new();
        let mut all = false;
        for resource in &message.resources {
            let resource = resource.as_str();
            if let Some(name) = resource.strip_prefix(NAMESPACE_URN) {
                if name == ALL_NAMESPACES {
                    all = true;
                } else if is_valid_namespace(name) {
                    names.insert(name.to_owned());
                } else {
                    return Err(DelegationError::InvalidNamespace(name.to_owned()));
                }
            }
            // Other resources are ignored: they may mean something to other relying parties.
        }
        let namespaces = if all {
            Namespaces::All
        } else if names.is_empty() {
            return Err(DelegationError::Malformed(format!(
                "a delegation lists at least one namespace resource ({NAMESPACE_URN}<name> or {NAMESPACE_URN}*)"
            )));
        } else {
            Namespaces::Only(names)
        };
        let expires_at = message
            .expiration_time
            .as_ref()
            .map(|t| t.as_ref().unix_timestamp())
            .ok_or_else(|| DelegationError::Malformed("a delegation must have an Expiration Time".into()))?;
        Ok(Delegation {
            owner,
            peer,
            namespaces,
            issued_at: message.issued_at.as_ref().unix_timestamp(),
            not_before: message.not_before.as_ref().map(|t| t.as_ref().unix_timestamp()),
            expires_at,
            id: statement_id(statement),
        })
    }

    /// Whether the delegation lets `author` write core `core` at time `at` (unix seconds).
    pub fn check(&self, core: &Address, author: &PeerId, at: i64) -> Result<(), DelegationError> {
        if self.owner != *core {
            return Err(DelegationError::WrongCore { core: *core, owner: self.owner });
        }
        if self.peer != *author {
            return Err(DelegationError::WrongPeer { delegated: self.peer.to_string(), author: author.to_string() });
        }
        self.valid_at(at)
    }

    /// Whether `at` (unix seconds) is inside the delegation's validity window.
    pub fn valid_at(&self, at: i64) -> Result<(), DelegationError> {
        if let Some(not_before) = self.not_before {
            if at < not_before {
                return Err(DelegationError::NotYetValid { not_before, at });
            }
        }
        if at > self.expires_at {
            return Err(DelegationError::Expired { expired_at: self.expires_at, at });
        }
        Ok(())
    }
}

/// A verified revocation: the owner revokes a node key, keeping its changes up to a cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// The owner, i.e. the core.
    pub owner: Address,
    /// The revoked node key.
    pub peer: PeerId,
    /// For each actor suffix the key wrote with, the last sequence number that stays valid.
    /// Actors not listed keep nothing.
    pub keep: BTreeMap<[u8; 8], u64>,
    /// [`statement_id`] of the signed statement.
    pub id: [u8; 32],
}

impl Revocation {
    /// Verifies a revocation statement: a well-formed SIWE revocation signed by the address it
    /// names.
    pub fn verify(statement: &OwnerStatement) -> Result<Revocation, DelegationError> {
        let (message, owner) = verify_siwe(statement)?;
        let peer = peer_from_uri(message.uri.as_str(), REVOKE_URN, "revocation")?;
        let mut keep = BTreeMap::new();
        for resource in &message.resources {
            let Some(rest) = resource.as_str().strip_prefix(KEEP_URN) else { continue };
            let (suffix, seq) = rest
                .split_once(':')
                .ok_or_else(|| DelegationError::Malformed(format!("{KEEP_URN}{rest} is not {KEEP_URN}<actor>:<seq>")))?;
            let mut actor = [0u8; 8];
            hex::decode_to_slice(suffix, &mut actor)
                .map_err(|_| DelegationError::Malformed(format!("{suffix:?} is not an 8-byte hex actor suffix")))?;
            let seq: u64 =
                seq.parse().map_err(|_| DelegationError::Malformed(format!("{seq:?} is not a sequence number")))?;
            keep.insert(actor, seq);
        }
        Ok(Revocation { owner, peer, keep, id: statement_id(statement) })
    }

    /// The last valid sequence number of an actor suffix of the revoked key.
    pub fn keep_for(&self, suffix: &[u8; 8]) -> u64 {
        self.keep.get(suffix).copied().unwrap_or(0)
    }
}

fn nonce() -> String {
    siwe::generate_nonce()
}

fn whole_seconds(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(0).unwrap_or(t)
}

fn siwe_message(
    owner: &Address,
    statement: String,
    uri: String,
    now: OffsetDateTime,
    expires: Option<OffsetDateTime>,
    resources: Vec<String>,
) -> Result<String, DelegationError> {
    let rfc3339 = |t: OffsetDateTime| whole_seconds(t).format(&Rfc3339).map_err(|e| DelegationError::Malformed(e.to_string()));
    let mut text = format!(
        "{DOMAIN} wants you to sign in with your Ethereum account:\n{}\n\n{statement}\n\nURI: {uri}\nVersion: 1\nChain ID: 1\nNonce: {}\nIssued At: {}",
        owner.to_checksum(),
        nonce(),
        rfc3339(now)?,
    );
    if let Some(expires) = expires {
        text.push_str(&format!("\nExpiration Time: {}", rfc3339(expires)?));
    }
    if !resources.is_empty() {
        text.push_str("\nResources:");
        for resource in resources {
            text.push_str(&format!("\n- {resource}"));
        }
    }
    // Parse what we wrote so a message we print is always one we accept.
    let parsed: siwe::Message = text
        .parse()
        .map_err(|e: siwe::ParseError| DelegationError::Malformed(format!("cannot build the message: {e}")))?;
    debug_assert_eq!(parsed.to_string(), text);
    Ok(text)
}

/// The text of a delegation for the owner to sign (`kubelt core delegate` prints it).
///
/// `namespaces` are namespace names or `*`; `expires_in` counts from `now`.
pub fn delegation_message(
    owner: &Address,
    peer: &PeerId,
    namespaces: &[&str],
    expires_in: Duration,
    now: OffsetDateTime,
) -> Result<String, DelegationError> {
    if namespaces.is_empty() {
        return Err(DelegationError::Malformed("a delegation needs at least one namespace (or *)".into()));
    }
    for ns in namespaces {
        if *ns != ALL_NAMESPACES && !is_valid_namespace(ns) {
            return Err(DelegationError::InvalidNamespace((*ns).to_owned()));
        }
    }
    let expires = now + expires_in;
    let what = if namespaces.contains(&ALL_NAMESPACES) { "all namespaces".to_owned() } else { format!("namespaces {}", namespaces.join(", ")) };
    let statement = format!(
        "Allow Kubelt node {peer} to write {what} of this core until {}.",
        whole_seconds(expires).format(&Rfc3339).unwrap_or_default()
    );
    siwe_message(
        owner,
        statement,
        format!("{PEER_URN}{peer}"),
        now,
        Some(expires),
        namespaces.iter().map(|ns| format!("{NAMESPACE_URN}{ns}")).collect(),
    )
}

/// The text of a revocation for the owner to sign: revokes `peer`, keeping its changes up to
/// `keep` (actor suffix → last kept sequence number; see [`super::Replica::revocation_message`],
/// which fills it from the replica's history).
pub fn revocation_message(
    owner: &Address,
    peer: &PeerId,
    keep: &BTreeMap<[u8; 8], u64>,
    now: OffsetDateTime,
) -> Result<String, DelegationError> {
    let kept: u64 = keep.values().sum();
    let statement = format!(
        "Revoke Kubelt node {peer} from this core: its {kept} change(s) up to now stay, any later change is void."
    );
    siwe_message(
        owner,
        statement,
        format!("{REVOKE_URN}{peer}"),
        now,
        None,
        keep.iter().map(|(actor, seq)| format!("{KEEP_URN}{}:{seq}", hex::encode(actor))).collect(),
    )
}
