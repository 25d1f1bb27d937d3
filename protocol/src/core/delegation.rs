//! Owner statements: delegations and revocations, as wallet-signed SIWE messages.
//!
//! The owner of a core never hands its wallet key to a node. Instead the wallet signs, with
//! EIP-191 `personal_sign`, an EIP-4361 ("Sign-In with Ethereum") message that a node prints
//! (`kubelt core delegate`). Any node checks such a statement offline: it recovers the signer
//! from the signature over the exact message text and compares it with the address the
//! message names, which is the core id.
//!
//! # Bound to its purpose
//!
//! A wallet shows the person a SIWE message and asks them to sign in. Every site on the web
//! asks for such signatures, so a signed SIWE message must only count as a Kubelt statement
//! when it cannot be anything else, and must grant exactly what the person read. A statement is
//! refused unless:
//!
//! - the domain is [`DOMAIN`] (`kubelt`) — the only [`Purpose`] accepted so far is
//!   [`Purpose::Cli`]; wallets that check SIWE domains (MetaMask does) warn when a page asks
//!   for a sign-in naming another domain than its own origin, so a phishing page cannot ask
//!   for a `kubelt` sign-in unnoticed there;
//! - the chain id is [`CHAIN_ID`];
//! - the statement line is **exactly** the text this module derives from the message's own
//!   fields ([`delegation_statement`], [`revocation_statement`]): what the person read is what
//!   is granted, and a sign-in that says "claim your free NFT" grants nothing;
//! - every resource is a `urn:kubelt:` resource that this kind of statement uses: no unknown
//!   `urn:kubelt:` resources, no resources of other schemes;
//! - the text is laid out exactly as EIP-4361 writes it (the `siwe` parser skips two lines
//!   without reading them; a wallet would show what is written there);
//! - the signature's `s` is in the lower half of the curve order (EIP-2, as Ethereum
//!   transactions and OpenZeppelin's `ECDSA.recover` require; every wallet signs that way): the
//!   high-s twin of a signature is refused rather than normalized, so a relay cannot mint a
//!   second encoding (and a second [`statement_id`]) of the same statement.
//!
//! # Delegation
//!
//! ```text
//! kubelt wants you to sign in with your Ethereum account:
//! 0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed
//!
//! Allow Kubelt node 12D3KooW… to write namespaces apps, profile of this core until 2026-01-01T00:00:00Z.
//!
//! URI: urn:kubelt:peer:12D3KooW…
//! Version: 1
//! Chain ID: 1
//! Nonce: 5mVn0v1kqQ2Vr8Rk
//! Issued At: 2025-01-01T00:00:00Z
//! Expiration Time: 2026-01-01T00:00:00Z
//! Resources:
//! - urn:kubelt:ns:apps
//! - urn:kubelt:ns:profile
//! ```
//!
//! - `URI` names the node key it authorizes: `urn:kubelt:peer:<libp2p peer id>` (the peer id is
//!   the multihash of the node's public key, so it names the key itself).
//! - `Resources` lists the namespaces (top-level keys of the core document) the key may write,
//!   `urn:kubelt:ns:<name>`, or `urn:kubelt:ns:*` for every namespace. Reading is not delegated:
//!   every replica holds the whole document.
//! - `Expiration Time` is required; `Not Before` is honoured when present. Both are compared
//!   with the *change's* time, never with the verifying node's clock (see [`super`]).
//! - The statement line names the peer, the namespaces (sorted; "all namespaces" for `*`) and
//!   the expiry (RFC 3339, UTC, whole seconds), see [`delegation_statement`].
//!
//! # App login
//!
//! An app asks the person's wallet to sign in (`kb_getNonce`, `kb_verifyNonce` in the app API).
//! The message is a SIWE sign-in for the app's own origin (so wallets show no warning on that
//! page, and do on any other), through a Kubelt node, whose statement line says exactly what the
//! app gets ([`login_statement`]):
//!
//! ```text
//! notes.example wants you to sign in with your Ethereum account:
//! 0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed
//!
//! Sign in to notes.example through Kubelt node 12D3KooW…: the app may read namespace profile, and read and write namespace notes of this core until 2026-01-01T00:00:00Z.
//!
//! URI: urn:kubelt:peer:12D3KooW…
//! …
//! Resources:
//! - urn:kubelt:read:profile
//! - urn:kubelt:ns:notes
//! ```
//!
//! The node turns it into a token for the app. The written namespaces (`urn:kubelt:ns:`) are
//! also a delegation of the node's key: [`Delegation::verify`] accepts an app login as one, so
//! every replica checks the node's writes against the owner's signature, trusting no node.
//!
//! # Revocation
//!
//! Same shape with `URI: urn:kubelt:revoke:<peer id>`, no expiry, and, as resources, the point
//! of the core's history up to which that key's changes stay valid:
//! `urn:kubelt:keep:<actor suffix hex>:<seq>:<change hash hex>` for each Automerge actor the key
//! wrote with (see [`super::change`]): the last kept change of that actor, by sequence number
//! *and* hash. Every change by that key beyond those points — and every change that depends on
//! one — is invalid; so is any other change the key signed with a kept sequence number (a stolen
//! key cannot swap a kept change for one of its own making). The cut is part of the signed text, so a revocation means the
//! same thing on every replica whatever order changes arrive in, and replaying it is harmless.
//! The statement line says how many changes stay ([`revocation_statement`]), so a revocation
//! that keeps nothing reads "all of its changes are void".

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use k256::ecdsa::{RecoveryId, Signature, VerifyingKey};
use kubelt_proto::core::OwnerStatement;
use libp2p::identity::PeerId;
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

use super::address::{eip191_hash, Address};
use automerge::ChangeHash;

/// The SIWE domain of the statements `kubelt core delegate`/`revoke` print, and the only one
/// accepted so far (see [`Purpose`]). Not a web origin: a wallet that checks SIWE domains
/// against the asking page's origin (MetaMask does) warns when a web page asks for it.
pub const DOMAIN: &str = "kubelt";
/// The EIP-155 chain id every owner statement names: 1, Ethereum mainnet.
///
/// A personal_sign signature recovers to the same address on every chain, so the chain adds no
/// security to the signature itself; it is fixed so that a sign-in a dapp asked for on another
/// chain (say Polygon, 137) is never mistaken for a Kubelt statement, and because a future
/// contract-wallet (EIP-1271) check would have to know which chain to ask.
pub const CHAIN_ID: u64 = 1;
/// The prefix of every URI and resource of an owner statement.
pub const KUBELT_URN: &str = "urn:kubelt:";
/// URI prefix naming the node key a delegation authorizes.
pub const PEER_URN: &str = "urn:kubelt:peer:";
/// URI prefix naming the node key a revocation revokes.
pub const REVOKE_URN: &str = "urn:kubelt:revoke:";
/// Resource prefix of a delegated namespace.
pub const NAMESPACE_URN: &str = "urn:kubelt:ns:";
/// Resource prefix of a namespace an app login may only read (app logins only: reading is
/// every replica's right, so this grants the app's token, not the node key, anything).
pub const READ_URN: &str = "urn:kubelt:read:";
/// Resource prefix of a revocation's cut: `urn:kubelt:keep:<actor suffix hex>:<seq>:<hash>`.
pub const KEEP_URN: &str = "urn:kubelt:keep:";
/// The namespace wildcard: every namespace except the reserved one.
pub const ALL_NAMESPACES: &str = "*";
/// The namespace where the core records its own bookkeeping (revocations). No delegation
/// grants it; only a change carrying an owner-signed revocation may write it.
pub const RESERVED_NAMESPACE: &str = "_kubelt";
/// The prefix of device namespaces: `_device:<peer id>` holds the messaging key of that node
/// (see [`crate::msg`]). Every delegated key may write its own, and only its own, whatever
/// namespaces its delegation lists.
pub const DEVICE_NAMESPACE_PREFIX: &str = "_device:";

/// The device namespace of a node key.
pub fn device_namespace(peer: &PeerId) -> String {
    format!("{DEVICE_NAMESPACE_PREFIX}{peer}")
}

/// Whether the delegation lets its key write `namespace`: the namespaces it lists, and its own
/// device namespace; never the reserved namespace nor another key's device namespace.
pub fn may_write(delegation: &Delegation, namespace: &str) -> bool {
    match namespace.strip_prefix(DEVICE_NAMESPACE_PREFIX) {
        Some(peer) => peer == delegation.peer.to_base58(),
        None => delegation.namespaces.allows(namespace),
    }
}

/// What a delegation was signed for. It fixes the SIWE domain the message must carry, which
/// [`Delegation::verify_for`] checks and records in [`Delegation::domain`].
///
/// [`Delegation::verify`] — the check every change goes through — accepts both, telling them
/// apart by the message's domain: [`DOMAIN`] is the CLI's, any other is an app's origin, whose
/// statement line must then be the app login's ([`login_statement`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Purpose {
    /// A delegation printed by `kubelt core delegate` and signed in the owner's wallet: domain
    /// [`DOMAIN`].
    Cli,
    /// An app login (`kb_getNonce`/`kb_verifyNonce`): the domain is the app's origin host
    /// (`notes.example.org`, `localhost:5421`), which wallets compare with the page asking.
    App {
        /// The app's origin host, with its port if any.
        domain: String,
    },
}

impl Purpose {
    /// The SIWE domain a message signed for this purpose carries.
    pub fn domain(&self) -> &str {
        match self {
            Purpose::Cli => DOMAIN,
            Purpose::App { domain } => domain,
        }
    }

    /// The purpose of a message naming `domain`: [`DOMAIN`] is the CLI's, a valid origin host
    /// an app's.
    pub fn of_domain(domain: &str) -> Result<Purpose, DelegationError> {
        if domain == DOMAIN {
            return Ok(Purpose::Cli);
        }
        if !is_valid_app_domain(domain) {
            return Err(DelegationError::Malformed(format!(
                "{:?} is not an app origin (host[:port], letters, digits, '.', '-')",
                quote(domain)
            )));
        }
        Ok(Purpose::App { domain: domain.to_owned() })
    }
}

/// Whether `domain` may name an app: an origin's host and optional port, as browsers send it
/// in `Origin`/`Host` (no user info, no path), 1–253 characters, and not [`DOMAIN`].
pub fn is_valid_app_domain(domain: &str) -> bool {
    let (host, port) = match domain.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (domain, None),
    };
    let host_ok = !host.is_empty()
        && domain.len() <= 253
        && !host.starts_with(['-', '.'])
        && !host.ends_with(['-', '.'])
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'));
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok());
    host_ok && port_ok && domain != DOMAIN
}

/// At most this many characters of an untrusted string are quoted in an error (errors are
/// logged and returned over the API; a peer must not make them megabytes long).
const QUOTE_MAX: usize = 120;

/// `text`, cut to [`QUOTE_MAX`] characters for an error message.
fn quote(text: &str) -> String {
    match text.char_indices().nth(QUOTE_MAX) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

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
    /// The message is a sign-in for another site (or another purpose).
    #[error("the message is a sign-in for {found:?}, not {expected:?}: a sign-in for another site is not a Kubelt statement")]
    WrongDomain {
        /// The domain this statement must name.
        expected: String,
        /// The domain it names (quoted, possibly cut).
        found: String,
    },
    /// The message names another chain than [`CHAIN_ID`].
    #[error("the message names chain {found}; Kubelt statements name chain {expected} (Ethereum mainnet)")]
    WrongChain {
        /// [`CHAIN_ID`].
        expected: u64,
        /// The chain id in the message.
        found: u64,
    },
    /// The statement line is not the text derived from what the message grants, so the person
    /// who signed did not read what it grants.
    #[error("the statement line {found:?} is not what the message grants; it must read exactly {expected:?}")]
    StatementMismatch {
        /// The canonical statement for the message's peer, namespaces, expiry or cut.
        expected: String,
        /// The statement line of the message (quoted, possibly cut; empty when missing).
        found: String,
    },
    /// A `urn:kubelt:` resource this kind of statement does not use.
    #[error("unknown resource {resource:?}: a {kind} lists only {allowed}… resources")]
    UnknownResource {
        /// The resource (quoted, possibly cut).
        resource: String,
        /// `delegation` or `revocation`.
        kind: &'static str,
        /// The prefix of the resources it may list.
        allowed: &'static str,
    },
    /// A resource of another scheme than `urn:kubelt:`.
    #[error("resource {0:?} is not a urn:kubelt: resource; a Kubelt statement lists nothing else, so that a sign-in for another service cannot double as one")]
    ForeignResource(String),
    /// The text is not laid out as EIP-4361 writes it (something is where the parser does not
    /// look, or a value is spelled unusually).
    #[error("the message is not laid out as EIP-4361 writes it: line {line} reads {found:?} where {expected:?} belongs")]
    NotCanonical {
        /// 1-based line number.
        line: usize,
        /// What the line reads (quoted, possibly cut).
        found: String,
        /// What belongs there.
        expected: String,
    },
    /// The signature's `s` is in the upper half of the curve order.
    #[error("the signature's s is in the upper half of the curve order: wallets sign with low s (EIP-2), so this signature was altered; use the one the wallet returned")]
    HighS,
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

/// Parses a wallet signature given as hex (`0x` optional): 65 bytes r ‖ s ‖ v, `v` in
/// {27, 28, 0, 1} (hardware wallets return 0/1), `s` low (see [`recover_signer`]). Returns it
/// with `v` as 27/28, so that one statement submitted from two wallets' spellings is one
/// [`statement_id`].
pub fn parse_signature(input: &str) -> Result<Vec<u8>, DelegationError> {
    let digits = input.trim();
    let digits = digits.strip_prefix("0x").or_else(|| digits.strip_prefix("0X")).unwrap_or(digits);
    let mut bytes = hex::decode(digits).map_err(|e| DelegationError::BadHex(e.to_string()))?;
    let recid = signature_parts(&bytes)?.1;
    bytes[64] = recid + 27;
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

/// Splits a 65-byte r ‖ s ‖ v signature into a k256 signature and the recovery id (0 or 1).
///
/// A high-s signature is refused, not normalized. For every signature (r, s, v) there is a
/// twin (r, n − s, v ^ 1) that recovers the same key; wallets only produce the low-s one (EIP-2),
/// so the twin can only come from someone who altered the bytes, and accepting it would give
/// one statement two [`statement_id`]s.
fn signature_parts(signature: &[u8]) -> Result<(Signature, u8), DelegationError> {
    let (rs, v) = match signature {
        [rs @ .., v] if signature.len() == 65 => (rs, *v),
        _ => return Err(DelegationError::WrongSignatureLength(signature.len())),
    };
    let recid = recovery_id(v)?;
    let sig = Signature::from_slice(rs).map_err(|_| DelegationError::BadSignature)?;
    if sig.normalize_s().is_some() {
        return Err(DelegationError::HighS);
    }
    Ok((sig, recid))
}

/// Recovers the address that signed `message` with EIP-191 `personal_sign` (the keccak-256 of
/// `"\x19Ethereum Signed Message:\n" ‖ decimal length ‖ message`). High-s signatures are
/// refused (see [`DelegationError::HighS`]).
pub fn recover_signer(message: &str, signature: &[u8]) -> Result<Address, DelegationError> {
    let (sig, recid) = signature_parts(signature)?;
    let recid = RecoveryId::from_byte(recid).ok_or(DelegationError::BadSignature)?;
    let prehash = eip191_hash(message.as_bytes());
    let key = VerifyingKey::recover_from_prehash(&prehash, &sig, recid).map_err(|_| DelegationError::BadSignature)?;
    Ok(Address::of_key(&key))
}

/// A content id for a statement: sha2-256 of the message, a zero byte and the signature.
pub fn statement_id(statement: &OwnerStatement) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(statement.message.as_bytes());
    hasher.update([0u8]);
    hasher.update(&statement.signature);
    hasher.finalize().into()
}

/// Parses a SIWE message, checks that the address it names signed it and that the text is
/// laid out exactly as EIP-4361 writes it.
fn verify_siwe(statement: &OwnerStatement) -> Result<(siwe::Message, Address), DelegationError> {
    if statement.signature.len() != 65 {
        return Err(DelegationError::WrongSignatureLength(statement.signature.len()));
    }
    // The signature covers the exact text; parsing forgives what copy-and-paste through a
    // wallet tends to add (CRLF line ends, a trailing newline).
    let normalized = statement.message.replace("\r\n", "\n");
    let text = normalized.trim_end();
    let message: siwe::Message = text
        .parse()
        .map_err(|e: siwe::ParseError| DelegationError::Malformed(format!("not a SIWE (EIP-4361) message: {e}")))?;
    let claimed = Address::from_bytes(message.address);
    let signer = recover_signer(&statement.message, &statement.signature)?;
    if signer != claimed {
        return Err(DelegationError::SignedBySomeoneElse { signer, claimed });
    }
    check_layout(text, &message)?;
    Ok((message, claimed))
}

/// Checks that `text` is what EIP-4361 writes for `message`, so that nothing the wallet shows
/// is left unread by the parser.
///
/// The `siwe` parser skips the line after the address and the line after the statement without
/// looking at them, and keeps the nonce and Request ID as free text; a wallet shows all of it.
/// So the text must equal the parsed message written back, hold no control characters (a lone
/// CR starts a new line in some wallets), and the nonce and Request ID must keep to the
/// characters EIP-4361's grammar allows them.
fn check_layout(text: &str, message: &siwe::Message) -> Result<(), DelegationError> {
    if let Some((line, content)) =
        text.split('\n').enumerate().find(|(_, line)| line.chars().any(char::is_control))
    {
        return Err(DelegationError::Malformed(format!(
            "line {} holds a control character: {:?}",
            line + 1,
            quote(content)
        )));
    }
    if !message.nonce.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(DelegationError::Malformed(format!(
            "the nonce {:?} is not letters and digits (EIP-4361)",
            quote(&message.nonce)
        )));
    }
    // EIP-4361: request-id = *pchar (RFC 3986).
    let pchar = |b: u8| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=:@".contains(&b);
    if let Some(id) = &message.request_id {
        if !id.bytes().all(pchar) {
            return Err(DelegationError::Malformed(format!(
                "the Request ID {:?} holds characters EIP-4361 does not allow there",
                quote(id)
            )));
        }
    }
    let written = message.to_string();
    let mut found = text.split('\n');
    for (line, expected) in written.split('\n').enumerate() {
        let actual = found.next().unwrap_or_default();
        if actual != expected {
            return Err(DelegationError::NotCanonical { line: line + 1, found: quote(actual), expected: quote(expected) });
        }
    }
    match found.next() {
        Some(extra) => Err(DelegationError::NotCanonical {
            line: written.split('\n').count() + 1,
            found: quote(extra),
            expected: String::new(),
        }),
        None => Ok(()),
    }
}

/// Checks what binds a message to Kubelt rather than to some other site: its domain (given by
/// the purpose) and its chain.
fn check_binding(message: &siwe::Message, domain: &str) -> Result<(), DelegationError> {
    let found = message.domain.as_str();
    if found != domain {
        return Err(DelegationError::WrongDomain { expected: domain.to_owned(), found: quote(found) });
    }
    if message.chain_id != CHAIN_ID {
        return Err(DelegationError::WrongChain { expected: CHAIN_ID, found: message.chain_id });
    }
    Ok(())
}

/// Checks that the statement line is exactly `expected`, the text derived from what the
/// message grants.
fn check_statement(message: &siwe::Message, expected: String) -> Result<(), DelegationError> {
    match &message.statement {
        Some(found) if *found == expected => Ok(()),
        found => Err(DelegationError::StatementMismatch {
            expected,
            found: quote(found.as_deref().unwrap_or_default()),
        }),
    }
}

/// The error for a resource a statement of `kind` does not use (`allowed` is the prefix of the
/// ones it does).
fn unexpected_resource(resource: &str, kind: &'static str, allowed: &'static str) -> DelegationError {
    if resource.starts_with(KUBELT_URN) {
        DelegationError::UnknownResource { resource: quote(resource), kind, allowed }
    } else {
        DelegationError::ForeignResource(quote(resource))
    }
}

fn peer_from_uri(uri: &str, prefix: &str, what: &str) -> Result<PeerId, DelegationError> {
    let rest = uri.strip_prefix(prefix).ok_or_else(|| {
        DelegationError::Malformed(format!("the URI of a {what} is {prefix}<peer id>, not {}", quote(uri)))
    })?;
    rest.parse::<PeerId>()
        .map_err(|e| DelegationError::Malformed(format!("{:?} in the URI is not a libp2p peer id: {e}", quote(rest))))
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

    /// Parses namespace names or `*` (the wildcard wins over names). At least one is needed.
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Namespaces, DelegationError> {
        let mut set = BTreeSet::new();
        let mut all = false;
        for name in names {
            if name == ALL_NAMESPACES {
                all = true;
            } else if is_valid_namespace(name) {
                set.insert(name.to_owned());
            } else {
                return Err(DelegationError::InvalidNamespace(quote(name)));
            }
        }
        if all {
            Ok(Namespaces::All)
        } else if set.is_empty() {
            Err(DelegationError::Malformed(format!(
                "a delegation lists at least one namespace resource ({NAMESPACE_URN}<name> or {NAMESPACE_URN}*)"
            )))
        } else {
            Ok(Namespaces::Only(set))
        }
    }

    /// The resources a delegation message lists for these namespaces, in canonical order.
    fn resources(&self) -> Vec<String> {
        match self {
            Namespaces::All => vec![format!("{NAMESPACE_URN}{ALL_NAMESPACES}")],
            Namespaces::Only(set) => set.iter().map(|ns| format!("{NAMESPACE_URN}{ns}")).collect(),
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

/// The statement line of a delegation: what the person signing reads, derived from exactly
/// what the message grants — the peer, the namespaces (sorted) and the expiry (unix seconds,
/// written RFC 3339 in UTC). [`Delegation::verify`] refuses any other statement line.
pub fn delegation_statement(peer: &PeerId, namespaces: &Namespaces, expires_at: i64) -> String {
    let what = match namespaces {
        Namespaces::All => "all namespaces".to_owned(),
        Namespaces::Only(set) if set.len() == 1 => format!("namespace {namespaces}"),
        Namespaces::Only(_) => format!("namespaces {namespaces}"),
    };
    format!("Allow Kubelt node {peer} to write {what} of this core until {}.", fmt_time(expires_at))
}

/// The statement line of a revocation, derived from the revoked peer and the cut (how many of
/// its changes stay). [`Revocation::verify`] refuses any other statement line.
pub fn revocation_statement(peer: &PeerId, keep: &BTreeMap<[u8; 8], Kept>) -> String {
    let kept = keep.values().fold(0u64, |sum, k| sum.saturating_add(k.seq));
    if kept == 0 {
        format!("Revoke Kubelt node {peer} from this core: all of its changes are void.")
    } else {
        format!("Revoke Kubelt node {peer} from this core: its {kept} change(s) up to now stay, any later change is void.")
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
    /// The SIWE domain the owner signed for ([`Purpose::domain`]): `kubelt` for delegations
    /// made with `kubelt core delegate`; an app's origin once app logins exist.
    pub domain: String,
    /// [`statement_id`] of the signed statement.
    pub id: [u8; 32],
}

impl Delegation {
    /// Verifies a delegation statement for changes: a SIWE delegation signed by the address it
    /// names, for [`Purpose::Cli`] (domain `kubelt`) or for an app login ([`Purpose::App`]:
    /// any other valid origin, with the app login's statement line and at least one written
    /// namespace), bound to its purpose as the module doc says. The verdict depends on the
    /// signed text alone. Who it is for, and when, is checked by [`Delegation::check`].
    pub fn verify(statement: &OwnerStatement) -> Result<Delegation, DelegationError> {
        let (message, owner) = verify_siwe(statement)?;
        let purpose = Purpose::of_domain(message.domain.as_str())?;
        Self::from_message(statement, message, owner, &purpose)
    }

    /// Verifies a delegation statement signed for `purpose`: its domain must be
    /// `purpose.domain()`, its chain [`CHAIN_ID`], its statement line [`delegation_statement`]
    /// of what it grants, and it lists only `urn:kubelt:ns:` resources.
    pub fn verify_for(statement: &OwnerStatement, purpose: &Purpose) -> Result<Delegation, DelegationError> {
        let (message, owner) = verify_siwe(statement)?;
        Self::from_message(statement, message, owner, purpose)
    }

    /// The checks after the signature's ([`verify_siwe`]).
    fn from_message(statement: &OwnerStatement, message: siwe::Message, owner: Address, purpose: &Purpose) -> Result<Delegation, DelegationError> {
        if let Purpose::App { domain } = purpose {
            let login = Login::from_message(statement, message, owner, domain)?;
            return login.delegation.ok_or_else(|| {
                DelegationError::Malformed("this app login writes no namespace, so it delegates nothing".into())
            });
        }
        check_binding(&message, purpose.domain())?;
        let uri = message.uri.as_str();
        if uri.starts_with(REVOKE_URN) {
            return Err(DelegationError::Malformed("this is a revocation, not a delegation".into()));
        }
        let peer = peer_from_uri(uri, PEER_URN, "delegation")?;
        let mut names = Vec::with_capacity(message.resources.len());
        for resource in &message.resources {
            let resource = resource.as_str();
            match resource.strip_prefix(NAMESPACE_URN) {
                Some(name) => names.push(name),
                // Anything else may mean something to another relying party, which is exactly
                // why a Kubelt delegation must not carry it: refuse rather than ignore.
                None => return Err(unexpected_resource(resource, "delegation", NAMESPACE_URN)),
            }
        }
        let namespaces = Namespaces::from_names(names)?;
        let expires_at = message
            .expiration_time
            .as_ref()
            .map(|t| t.as_ref().unix_timestamp())
            .ok_or_else(|| DelegationError::Malformed("a delegation must have an Expiration Time".into()))?;
        check_statement(&message, delegation_statement(&peer, &namespaces, expires_at))?;
        Ok(Delegation {
            owner,
            peer,
            namespaces,
            issued_at: message.issued_at.as_ref().unix_timestamp(),
            not_before: message.not_before.as_ref().map(|t| t.as_ref().unix_timestamp()),
            expires_at,
            domain: message.domain.as_str().to_owned(),
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

/// A verified app login: the owner signs in to an app at `domain` through the Kubelt node
/// `peer`, granting the app's token read access to `reads` and read and write access to
/// `writes`; the same signature delegates `writes` to the node key ([`Login::delegation`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    /// The owner, i.e. the core.
    pub owner: Address,
    /// The node the owner signed in through.
    pub peer: PeerId,
    /// The app's origin host.
    pub domain: String,
    /// Namespaces the app may only read.
    pub reads: BTreeSet<String>,
    /// Namespaces the app may read and write, if any.
    pub writes: Option<Namespaces>,
    /// The nonce the node issued for this login (single use: the node checks it).
    pub nonce: String,
    /// `Issued At` (unix seconds).
    pub issued_at: i64,
    /// `Expiration Time` (unix seconds): the login's and the delegation's end.
    pub expires_at: i64,
    /// The delegation of `writes` to the node key, when the app may write.
    pub delegation: Option<Delegation>,
}

impl Login {
    /// Verifies an app login for `domain`: signed by the address it names, domain `domain`,
    /// chain [`CHAIN_ID`], URI `urn:kubelt:peer:<node>`, only `urn:kubelt:read:` and
    /// `urn:kubelt:ns:` resources, an expiry, and the statement line [`login_statement`] of
    /// exactly what it grants.
    pub fn verify(statement: &OwnerStatement, domain: &str) -> Result<Login, DelegationError> {
        if !is_valid_app_domain(domain) {
            return Err(DelegationError::WrongDomain { expected: "an app origin".into(), found: quote(domain) });
        }
        let (message, owner) = verify_siwe(statement)?;
        Self::from_message(statement, message, owner, domain)
    }

    /// The checks after the signature's ([`verify_siwe`]).
    fn from_message(statement: &OwnerStatement, message: siwe::Message, owner: Address, domain: &str) -> Result<Login, DelegationError> {
        check_binding(&message, domain)?;
        let peer = peer_from_uri(message.uri.as_str(), PEER_URN, "login")?;
        let mut reads = Vec::new();
        let mut writes = Vec::new();
        for resource in &message.resources {
            let resource = resource.as_str();
            if let Some(name) = resource.strip_prefix(READ_URN) {
                reads.push(name);
            } else if let Some(name) = resource.strip_prefix(NAMESPACE_URN) {
                writes.push(name);
            } else {
                return Err(unexpected_resource(resource, "login", KUBELT_URN));
            }
        }
        let reads = read_namespaces(reads)?;
        let writes = if writes.is_empty() { None } else { Some(Namespaces::from_names(writes)?) };
        if reads.is_empty() && writes.is_none() {
            return Err(DelegationError::Malformed("a login grants at least one namespace".into()));
        }
        let expires_at = message
            .expiration_time
            .as_ref()
            .map(|t| t.as_ref().unix_timestamp())
            .ok_or_else(|| DelegationError::Malformed("a login must have an Expiration Time".into()))?;
        check_statement(&message, login_statement(domain, &peer, &reads, writes.as_ref(), expires_at))?;
        let issued_at = message.issued_at.as_ref().unix_timestamp();
        let not_before = message.not_before.as_ref().map(|t| t.as_ref().unix_timestamp());
        let delegation = writes.clone().map(|namespaces| Delegation {
            owner,
            peer,
            namespaces,
            issued_at,
            not_before,
            expires_at,
            domain: domain.to_owned(),
            id: statement_id(statement),
        });
        Ok(Login { owner, peer, domain: domain.to_owned(), reads, writes, nonce: message.nonce.clone(), issued_at, expires_at, delegation })
    }
}

/// The namespaces a login lets the app only read: each a valid namespace name.
fn read_namespaces<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<BTreeSet<String>, DelegationError> {
    names
        .into_iter()
        .map(|name| if is_valid_namespace(name) { Ok(name.to_owned()) } else { Err(DelegationError::InvalidNamespace(quote(name))) })
        .collect()
}

/// The statement line of an app login, derived from exactly what it grants: the app's domain,
/// the node, the namespaces read only and those read and written (sorted), and the expiry.
/// [`Login::verify`] (and so [`Delegation::verify`] for app domains) refuses any other line.
pub fn login_statement(domain: &str, peer: &PeerId, reads: &BTreeSet<String>, writes: Option<&Namespaces>, expires_at: i64) -> String {
    let list = |names: Vec<&str>| match names.as_slice() {
        [one] => format!("namespace {one}"),
        many => format!("namespaces {}", many.join(", ")),
    };
    let mut grants = Vec::new();
    if !reads.is_empty() {
        grants.push(format!("read {}", list(reads.iter().map(String::as_str).collect())));
    }
    match writes {
        Some(Namespaces::All) => grants.push("read and write all namespaces".to_owned()),
        Some(Namespaces::Only(set)) => grants.push(format!("read and write {}", list(set.iter().map(String::as_str).collect()))),
        None => {}
    }
    format!(
        "Sign in to {domain} through Kubelt node {peer}: the app may {} of this core until {}.",
        grants.join(", and "),
        fmt_time(expires_at)
    )
}

/// What an app asks to sign in for: the fields of its login message.
#[derive(Debug, Clone)]
pub struct LoginRequest<'a> {
    /// The app's origin host.
    pub domain: &'a str,
    /// The wallet signing in, i.e. the core.
    pub owner: Address,
    /// The node the app signs in through.
    pub peer: PeerId,
    /// Namespaces the app may only read.
    pub reads: &'a [&'a str],
    /// Namespaces the app may read and write (delegated to the node key).
    pub writes: &'a [&'a str],
    /// How long the login (and the delegation) lasts.
    pub expires_in: Duration,
    /// The node's single-use nonce: at least 8 letters and digits, as EIP-4361 requires.
    pub nonce: &'a str,
}

/// The text of an app login for the owner to sign (`kb_getNonce` returns it), in the one form
/// [`Login::verify`] accepts.
pub fn login_message(request: &LoginRequest<'_>, now: OffsetDateTime) -> Result<String, DelegationError> {
    let LoginRequest { domain, owner, peer, reads, writes, expires_in, nonce } = *request;
    if !is_valid_app_domain(domain) {
        return Err(DelegationError::WrongDomain { expected: "an app origin".into(), found: quote(domain) });
    }
    let mut read_set = read_namespaces(reads.iter().copied())?;
    let writes = if writes.is_empty() { None } else { Some(Namespaces::from_names(writes.iter().copied())?) };
    // A namespace the app may write it may read: list it once, as written.
    if let Some(w) = &writes {
        read_set.retain(|name| !w.allows(name));
    }
    if read_set.is_empty() && writes.is_none() {
        return Err(DelegationError::Malformed("a login grants at least one namespace".into()));
    }
    let expires_at = expiry(expires_in, now)?;
    let mut resources: Vec<String> = read_set.iter().map(|ns| format!("{READ_URN}{ns}")).collect();
    resources.extend(writes.as_ref().map(Namespaces::resources).unwrap_or_default());
    siwe_message(
        domain,
        &owner,
        login_statement(domain, &peer, &read_set, writes.as_ref(), expires_at),
        format!("{PEER_URN}{peer}"),
        now,
        Some(expires_at),
        resources,
        nonce,
    )
}

/// A verified revocation: the owner revokes a node key, keeping its changes up to a cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// The owner, i.e. the core.
    pub owner: Address,
    /// The revoked node key.
    pub peer: PeerId,
    /// For each actor suffix the key wrote with, the last change that stays valid. Actors not
    /// listed keep nothing.
    pub keep: BTreeMap<[u8; 8], Kept>,
    /// [`statement_id`] of the signed statement.
    pub id: [u8; 32],
}

impl Revocation {
    /// Verifies a revocation statement: a SIWE revocation with domain `kubelt` signed by the
    /// address it names, bound to its purpose as the module doc says (statement line
    /// [`revocation_statement`], only `urn:kubelt:keep:` resources).
    pub fn verify(statement: &OwnerStatement) -> Result<Revocation, DelegationError> {
        let (message, owner) = verify_siwe(statement)?;
        check_binding(&message, DOMAIN)?;
        let peer = peer_from_uri(message.uri.as_str(), REVOKE_URN, "revocation")?;
        if message.expiration_time.is_some() || message.not_before.is_some() {
            // The wallet would show a time the revocation does not honour.
            return Err(DelegationError::Malformed(
                "a revocation holds for good: it has no Expiration Time or Not Before".into(),
            ));
        }
        let mut keep = BTreeMap::new();
        for resource in &message.resources {
            let resource = resource.as_str();
            let Some(rest) = resource.strip_prefix(KEEP_URN) else {
                return Err(unexpected_resource(resource, "revocation", KEEP_URN));
            };
            let (actor, kept) = parse_keep(rest)?;
            if keep.insert(actor, kept).is_some() {
                return Err(DelegationError::Malformed(format!(
                    "actor {} is listed twice; a revocation keeps one point per actor",
                    hex::encode(actor)
                )));
            }
        }
        check_statement(&message, revocation_statement(&peer, &keep))?;
        Ok(Revocation { owner, peer, keep, id: statement_id(statement) })
    }

    /// The last valid sequence number of an actor suffix of the revoked key (0: none).
    pub fn keep_for(&self, suffix: &[u8; 8]) -> u64 {
        self.keep.get(suffix).map_or(0, |k| k.seq)
    }

    /// The hash of the last kept change of an actor suffix of the revoked key.
    pub fn kept_hash(&self, suffix: &[u8; 8]) -> Option<ChangeHash> {
        self.keep.get(suffix).map(|k| k.hash)
    }
}

/// The last change of one actor that a revocation keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kept {
    /// Its sequence number in the actor.
    pub seq: u64,
    /// Its hash: the kept history of the actor is this change and its ancestors.
    pub hash: ChangeHash,
}

/// Parses `<actor suffix hex>:<seq>:<hash hex>` of a keep resource, spelled as
/// [`revocation_message`] writes it (lower-case hex, decimal without sign or leading zeros), so
/// that every kept point has one spelling.
fn parse_keep(rest: &str) -> Result<([u8; 8], Kept), DelegationError> {
    let malformed =
        || DelegationError::Malformed(format!("{:?} is not {KEEP_URN}<actor>:<seq>:<change hash>", quote(&format!("{KEEP_URN}{rest}"))));
    let mut parts = rest.split(':');
    let (Some(suffix), Some(seq_text), Some(hash_text), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(malformed());
    };
    let mut actor = [0u8; 8];
    hex::decode_to_slice(suffix, &mut actor).map_err(|_| malformed())?;
    let seq: u64 = seq_text.parse().map_err(|_| malformed())?;
    let mut hash = [0u8; 32];
    hex::decode_to_slice(hash_text, &mut hash).map_err(|_| malformed())?;
    if hex::encode(actor) != suffix || seq.to_string() != seq_text || seq == 0 || hex::encode(hash) != hash_text {
        return Err(malformed());
    }
    Ok((actor, Kept { seq, hash: ChangeHash(hash) }))
}

/// The keep resource of one actor, as [`parse_keep`] reads it.
fn keep_resource(actor: &[u8; 8], kept: &Kept) -> String {
    format!("{KEEP_URN}{}:{}:{}", hex::encode(actor), kept.seq, hex::encode(kept.hash.0))
}

/// A fresh SIWE nonce (letters and digits).
pub fn nonce() -> String {
    siwe::generate_nonce()
}

fn whole_seconds(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(0).unwrap_or(t)
}

/// Writes a SIWE message in the canonical form the verifiers demand: chain [`CHAIN_ID`],
/// times in UTC to the second.
#[allow(clippy::too_many_arguments)] // the fields of the message, each once
fn siwe_message(
    domain: &str,
    owner: &Address,
    statement: String,
    uri: String,
    now: OffsetDateTime,
    expires_at: Option<i64>,
    resources: Vec<String>,
    nonce: &str,
) -> Result<String, DelegationError> {
    let rfc3339 = |t: OffsetDateTime| {
        whole_seconds(t.to_offset(UtcOffset::UTC))
            .format(&Rfc3339)
            .map_err(|e| DelegationError::Malformed(format!("cannot write the time {t}: {e}")))
    };
    let mut text = format!(
        "{domain} wants you to sign in with your Ethereum account:\n{}\n\n{statement}\n\nURI: {uri}\nVersion: 1\nChain ID: {CHAIN_ID}\nNonce: {nonce}\nIssued At: {}",
        owner.to_checksum(),
        rfc3339(now)?,
    );
    if let Some(expires_at) = expires_at {
        let expires = OffsetDateTime::from_unix_timestamp(expires_at)
            .map_err(|e| DelegationError::Malformed(format!("the expiry is out of range: {e}")))?;
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
    check_layout(&text, &parsed)?;
    Ok(text)
}

/// The text of a delegation for the owner to sign (`kubelt core delegate` prints it), in the
/// one form [`Delegation::verify`] accepts: namespaces sorted, the statement line
/// [`delegation_statement`].
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
    let namespaces = Namespaces::from_names(namespaces.iter().copied())?;
    let expires_at = expiry(expires_in, now)?;
    siwe_message(
        DOMAIN,
        owner,
        delegation_statement(peer, &namespaces, expires_at),
        format!("{PEER_URN}{peer}"),
        now,
        Some(expires_at),
        namespaces.resources(),
        &nonce(),
    )
}

/// `now + expires_in` in whole unix seconds, or an error when out of range.
fn expiry(expires_in: Duration, now: OffsetDateTime) -> Result<i64, DelegationError> {
    let expires = time::Duration::try_from(expires_in)
        .ok()
        .and_then(|d| now.checked_add(d))
        .ok_or_else(|| DelegationError::Malformed(format!("an expiry {expires_in:?} from now is out of range")))?;
    Ok(whole_seconds(expires).unix_timestamp())
}

/// The text of a revocation for the owner to sign: revokes `peer`, keeping its changes up to
/// `keep` (actor suffix → last kept change; see [`super::Replica::revocation_message`], which
/// fills it from the replica's history). The statement line is [`revocation_statement`].
pub fn revocation_message(
    owner: &Address,
    peer: &PeerId,
    keep: &BTreeMap<[u8; 8], Kept>,
    now: OffsetDateTime,
) -> Result<String, DelegationError> {
    siwe_message(
        DOMAIN,
        owner,
        revocation_statement(peer, keep),
        format!("{REVOKE_URN}{peer}"),
        now,
        None,
        keep.iter().map(|(actor, kept)| keep_resource(actor, kept)).collect(),
        &nonce(),
    )
}

#[cfg(test)]
mod tests {
    /// A refusal case: its name, the message, and the error it must give.
    type Case = (&'static str, Siwe, fn(&DelegationError) -> bool);

    use libp2p::identity::Keypair;

    use super::*;
    use crate::core::DevWallet;

    type TestResult = anyhow::Result<()>;

    const T0: i64 = 1_750_000_000;
    const YEAR: i64 = 365 * 24 * 3600;

    /// The fields of a SIWE message, to write any message, canonical or not.
    #[derive(Clone)]
    struct Siwe {
        domain: String,
        owner: Address,
        statement: String,
        uri: String,
        chain: u64,
        expires_at: Option<i64>,
        resources: Vec<String>,
    }

    impl Siwe {
        fn text(&self) -> String {
            let mut text = format!(
                "{} wants you to sign in with your Ethereum account:\n{}\n\n{}\n\nURI: {}\nVersion: 1\nChain ID: {}\nNonce: 32891756\nIssued At: {}",
                self.domain,
                self.owner.to_checksum(),
                self.statement,
                self.uri,
                self.chain,
                fmt_time(T0)
            );
            if let Some(expires_at) = self.expires_at {
                text.push_str(&format!("\nExpiration Time: {}", fmt_time(expires_at)));
            }
            if !self.resources.is_empty() {
                text.push_str("\nResources:");
                for resource in &self.resources {
                    text.push_str(&format!("\n- {resource}"));
                }
            }
            text
        }
    }

    fn peer() -> PeerId {
        Keypair::generate_ed25519().public().to_peer_id()
    }

    /// The owner's signature over `message`, made with a real secp256k1 key.
    fn signed(owner: &DevWallet, message: String) -> anyhow::Result<OwnerStatement> {
        Ok(owner.statement(message)?)
    }

    /// The hardening issue's phishing page: a sign-in for evil.example on Polygon that reads
    /// "claim your free NFT" and also lists the Kubelt wildcard namespace for the attacker's
    /// node.
    fn evil_sign_in(owner: Address, attacker: &PeerId) -> Siwe {
        Siwe {
            domain: "evil.example".into(),
            owner,
            statement: "claim your free NFT".into(),
            uri: format!("{PEER_URN}{attacker}"),
            chain: 137,
            expires_at: Some(T0 + YEAR),
            resources: vec!["https://evil.example/nft/claim".into(), format!("{NAMESPACE_URN}*")],
        }
    }

    /// The same grant, written as `kubelt core delegate` writes it.
    fn canonical_delegation(owner: Address, attacker: &PeerId) -> Siwe {
        Siwe {
            domain: DOMAIN.into(),
            owner,
            statement: delegation_statement(attacker, &Namespaces::All, T0 + YEAR),
            uri: format!("{PEER_URN}{attacker}"),
            chain: CHAIN_ID,
            expires_at: Some(T0 + YEAR),
            resources: vec![format!("{NAMESPACE_URN}*")],
        }
    }

    #[test]
    fn a_sign_in_for_another_site_is_not_a_delegation_for_any_of_its_reasons() -> TestResult {
        let owner = DevWallet::random();
        let attacker = peer();

        let evil = signed(&owner, evil_sign_in(owner.address(), &attacker).text())?;
        let refused = Delegation::verify(&evil);
        assert!(matches!(&refused, Err(DelegationError::WrongChain { found: 137, .. })), "{refused:?}");

        // Each reason alone is enough.
        let canonical = canonical_delegation(owner.address(), &attacker);
        let mut wrong_domain = canonical.clone();
        wrong_domain.domain = "evil.example".into();
        let mut wrong_chain = canonical.clone();
        wrong_chain.chain = 137;
        let mut altered_statement = canonical.clone();
        altered_statement.statement = "claim your free NFT".into();
        let mut unknown_resource = canonical.clone();
        unknown_resource.resources.push("urn:kubelt:nft:claim".into());
        let mut foreign_resource = canonical.clone();
        foreign_resource.resources.insert(0, "https://evil.example/nft/claim".into());
        let cases: [Case; 5] = [
            // Under a site's domain, only an app login's statement line (which names the site,
            // the node and the grant) delegates anything.
            ("wrong domain", wrong_domain, |e| matches!(e, DelegationError::StatementMismatch { expected, .. } if expected.starts_with("Sign in to evil.example through Kubelt node"))),
            ("wrong chain", wrong_chain, |e| matches!(e, DelegationError::WrongChain { expected: 1, found: 137 })),
            ("altered statement", altered_statement, |e| matches!(e, DelegationError::StatementMismatch { found, .. } if found == "claim your free NFT")),
            ("unknown kubelt resource", unknown_resource, |e| matches!(e, DelegationError::UnknownResource { resource, .. } if resource == "urn:kubelt:nft:claim")),
            ("foreign resource", foreign_resource, |e| matches!(e, DelegationError::ForeignResource(r) if r == "https://evil.example/nft/claim")),
        ];
        let mut wrong = Vec::new();
        for (reason, siwe, expected) in cases {
            match Delegation::verify(&signed(&owner, siwe.text())?) {
                Err(e) if expected(&e) => println!("{reason}: {e}"),
                other => wrong.push(format!("{reason}: expected its own refusal, got {other:?}")),
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");

        // Written as the node writes it, the same grant is a delegation.
        let accepted = Delegation::verify(&signed(&owner, canonical.text())?)?;
        assert_eq!((accepted.owner, accepted.peer, accepted.namespaces, accepted.domain.as_str()), (owner.address(), attacker, Namespaces::All, "kubelt"));
        assert_eq!(accepted.expires_at, T0 + YEAR);
        Ok(())
    }

    #[test]
    fn a_phishing_page_cannot_obtain_a_revocation() -> TestResult {
        let owner = DevWallet::random();
        let victim = peer();
        let keep: BTreeMap<[u8; 8], Kept> = [([7u8; 8], Kept { seq: 3, hash: ChangeHash([0xaa; 32]) })].into();
        let canonical = Siwe {
            domain: DOMAIN.into(),
            owner: owner.address(),
            statement: revocation_statement(&victim, &keep),
            uri: format!("{REVOKE_URN}{victim}"),
            chain: CHAIN_ID,
            expires_at: None,
            resources: vec![format!("{KEEP_URN}0707070707070707:3:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")],
        };
        let revocation = Revocation::verify(&signed(&owner, canonical.text())?)?;
        assert_eq!((revocation.peer, revocation.keep), (victim, keep));

        let mut phishing = canonical.clone();
        phishing.domain = "evil.example".into();
        phishing.statement = "claim your free NFT".into();
        phishing.resources.clear();
        let mut wrong_domain = canonical.clone();
        wrong_domain.domain = "evil.example".into();
        let mut wrong_chain = canonical.clone();
        wrong_chain.chain = 137;
        let mut keeps_nothing = canonical.clone(); // says 3 changes stay, keeps none
        keeps_nothing.resources.clear();
        let mut unknown_resource = canonical.clone();
        unknown_resource.resources.push(format!("{NAMESPACE_URN}*"));
        let mut foreign_resource = canonical.clone();
        foreign_resource.resources.push("ipfs://bafy".into());
        let mut expiring = canonical.clone();
        expiring.expires_at = Some(T0 + YEAR);
        let mut twice = canonical.clone();
        twice.resources.push(format!("{KEEP_URN}0707070707070707:9:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"));
        let mut odd_spelling = canonical.clone();
        odd_spelling.resources = vec![format!("{KEEP_URN}0707070707070707:03:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")];
        let cases: [Case; 9] = [
            ("phishing", phishing, |e| matches!(e, DelegationError::WrongDomain { .. })),
            ("wrong domain", wrong_domain, |e| matches!(e, DelegationError::WrongDomain { .. })),
            ("wrong chain", wrong_chain, |e| matches!(e, DelegationError::WrongChain { .. })),
            ("statement and cut disagree", keeps_nothing, |e| matches!(e, DelegationError::StatementMismatch { .. })),
            ("unknown kubelt resource", unknown_resource, |e| matches!(e, DelegationError::UnknownResource { kind: "revocation", .. })),
            ("foreign resource", foreign_resource, |e| matches!(e, DelegationError::ForeignResource(_))),
            ("an expiry it would not honour", expiring, |e| matches!(e, DelegationError::Malformed(_))),
            ("actor twice", twice, |e| matches!(e, DelegationError::Malformed(_))),
            ("sequence spelled oddly", odd_spelling, |e| matches!(e, DelegationError::Malformed(_))),
        ];
        let mut wrong = Vec::new();
        for (reason, siwe, expected) in cases {
            match Revocation::verify(&signed(&owner, siwe.text())?) {
                Err(e) if expected(&e) => println!("{reason}: {e}"),
                other => wrong.push(format!("{reason}: expected its own refusal, got {other:?}")),
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
        Ok(())
    }

    #[test]
    fn text_the_parser_skips_or_a_wallet_shows_differently_is_refused() -> TestResult {
        let owner = DevWallet::random();
        let canonical = canonical_delegation(owner.address(), &peer()).text();
        Delegation::verify(&signed(&owner, canonical.clone())?)?;
        let address_line = format!("{}\n", owner.address().to_checksum());
        let cases = [
            // The siwe parser does not read the line after the address, nor the one after the
            // statement; a wallet shows both.
            ("hidden line after the address", canonical.replacen(&address_line, &format!("{address_line}Claim your free NFT!"), 1)),
            ("hidden line after the statement", canonical.replacen(".\n\nURI", ".\nClaim your free NFT!\nURI", 1)),
            ("lone CR", canonical.replacen("Nonce: 32891756", "Nonce: 32891756\rClaim your free NFT!", 1)),
            ("nonce that is not letters and digits", canonical.replacen("Nonce: 32891756", "Nonce: 32891756-claim-your-NFT", 1)),
        ];
        for (reason, text) in cases {
            match Delegation::verify(&signed(&owner, text)?) {
                Err(e @ (DelegationError::NotCanonical { .. } | DelegationError::Malformed(_))) => println!("{reason}: {e}"),
                other => panic!("{reason}: expected a refusal, got {other:?}"),
            }
        }
        Ok(())
    }

    #[test]
    fn messages_the_node_prints_are_the_canonical_form() -> TestResult {
        let owner = DevWallet::random();
        let node = peer();
        // Not UTC, not whole seconds, names unsorted and repeated: still one canonical text.
        let now = OffsetDateTime::from_unix_timestamp(T0)?.replace_nanosecond(123_456_789)?.to_offset(UtcOffset::from_hms(2, 0, 0)?);
        let cases: [(&[&str], &str); 3] = [
            (&["profile", "apps", "profile"], "namespaces apps, profile"),
            (&["profile"], "namespace profile"),
            (&["apps", "*"], "all namespaces"),
        ];
        for (names, what) in cases {
            let message = delegation_message(&owner.address(), &node, names, Duration::from_secs(3600), now)?;
            let d = Delegation::verify(&signed(&owner, message.clone())?)?;
            assert!(message.contains(&format!("to write {what} of this core until {}.", fmt_time(T0 + 3600))), "{message}");
            assert_eq!(d.expires_at, T0 + 3600);
            assert_eq!(d.domain, DOMAIN);
        }
        // The dev wallet's own delegations pass.
        Delegation::verify(&owner.delegate(&node, &["apps"], Duration::from_secs(60), now)?)?;

        let keep: BTreeMap<[u8; 8], Kept> =
            [([1u8; 8], Kept { seq: 3, hash: ChangeHash([1; 32]) }), ([2u8; 8], Kept { seq: 2, hash: ChangeHash([2; 32]) })].into();
        let message = revocation_message(&owner.address(), &node, &keep, now)?;
        assert!(message.contains("its 5 change(s) up to now stay"), "{message}");
        assert_eq!(Revocation::verify(&signed(&owner, message)?)?.keep, keep);
        let message = revocation_message(&owner.address(), &node, &BTreeMap::new(), now)?;
        assert!(message.contains("all of its changes are void"), "{message}");
        assert!(Revocation::verify(&signed(&owner, message)?)?.keep.is_empty());
        Ok(())
    }

    /// eth-account's documented `sign_message` example (key, message "I♥SF", signature), from
    /// outside our code.
    const VECTOR_KEY: &str = "0xb25c7db31feed9122727bf0939dc769a96564b2de4c4726d035b36ecf1e5b364";
    const VECTOR_ADDRESS: &str = "0x5ce9454909639D2D17A3F753ce7d93fa0b9aB12E";
    const VECTOR_MESSAGE: &str = "I♥SF";
    const VECTOR_SIGNATURE: &str = "0xe6ca9bba58c88611fad66a6ce8f996908195593807c4b38bd528d2cff09d4eb33e5bfbbf4d3e39b1a2fd816a7680c19ebebaf3a141b239934ad43cb33fcec8ce1c";
    /// The same signature with s replaced by n − s and v flipped (eth-account still recovers
    /// the address from it).
    const VECTOR_HIGH_S: &str = "0xe6ca9bba58c88611fad66a6ce8f996908195593807c4b38bd528d2cff09d4eb3c1a40440b2c1c64e5d027e95897f3e5ffbf3e9456d9666a874fe21d9906778731b";

    #[test]
    fn an_eip191_signature_made_by_eth_account_recovers_its_address() -> TestResult {
        let signature = parse_signature(VECTOR_SIGNATURE)?;
        assert_eq!(recover_signer(VECTOR_MESSAGE, &signature)?.to_checksum(), VECTOR_ADDRESS);
        // Our dev wallet signs byte for byte as eth-account does (RFC 6979 nonces).
        assert_eq!(DevWallet::from_hex(VECTOR_KEY)?.sign(VECTOR_MESSAGE)?, signature);
        // v given as 0/1 is read as 27/28.
        let mut zero_one = signature.clone();
        zero_one[64] -= 27;
        assert_eq!(parse_signature(&hex::encode(&zero_one))?, signature);
        Ok(())
    }

    #[test]
    fn a_high_s_signature_is_refused_not_normalized() -> TestResult {
        let high = hex::decode(VECTOR_HIGH_S.trim_start_matches("0x"))?;
        assert!(matches!(recover_signer(VECTOR_MESSAGE, &high), Err(DelegationError::HighS)));
        assert!(matches!(parse_signature(VECTOR_HIGH_S), Err(DelegationError::HighS)));
        Ok(())
    }

    #[test]
    fn a_delegation_signed_by_eth_account_is_accepted() -> TestResult {
        let peer = "12D3KooWRawPbxPtP1eZaJpumGnyWX2DcUyd3RQnydr3eAto4Az7";
        let message = format!(
            "kubelt wants you to sign in with your Ethereum account:\n\
             {VECTOR_ADDRESS}\n\
             \n\
             Allow Kubelt node {peer} to write namespaces apps, profile of this core until 2026-01-01T00:00:00Z.\n\
             \n\
             URI: urn:kubelt:peer:{peer}\n\
             Version: 1\n\
             Chain ID: 1\n\
             Nonce: 5mVn0v1kqQ2Vr8Rk\n\
             Issued At: 2025-01-01T00:00:00Z\n\
             Expiration Time: 2026-01-01T00:00:00Z\n\
             Resources:\n\
             - urn:kubelt:ns:apps\n\
             - urn:kubelt:ns:profile"
        );
        // eth-account 0.14: Account.sign_message(encode_defunct(text=message), VECTOR_KEY).
        let signature = "0x93ed509e0c489077661821edb6c186ce96f5060cc0bbf43510d3439bac00f08f7503bc80625db6ef04a5566672ed9dacdec53e7499988400f62f0ab7d29690a61c";
        let d = Delegation::verify(&owner_statement(&message, signature)?)?;
        assert_eq!(d.owner.to_checksum(), VECTOR_ADDRESS);
        assert_eq!(d.peer.to_string(), peer);
        assert_eq!(d.namespaces, Namespaces::Only(["apps".to_owned(), "profile".to_owned()].into()));
        assert_eq!(d.expires_at, 1_767_225_600);
        assert_eq!(d.domain, "kubelt");
        assert_eq!(Delegation::verify_for(&owner_statement(&message, signature)?, &Purpose::Cli)?, d);
        Ok(())
    }

    #[test]
    fn an_app_login_grants_its_token_and_delegates_exactly_the_written_namespaces() -> TestResult {
        let owner = DevWallet::random();
        let node = peer();
        let now = OffsetDateTime::from_unix_timestamp(T0)?;
        let request = LoginRequest {
            domain: "notes.example:8443",
            owner: owner.address(),
            peer: node,
            reads: &["profile", "notes"],
            writes: &["notes"],
            expires_in: Duration::from_secs(3600),
            nonce: "n0nce123abc",
        };
        let text = login_message(&request, now)?;
        assert!(text.starts_with("notes.example:8443 wants you to sign in with your Ethereum account:"), "{text}");
        assert!(text.contains("Sign in to notes.example:8443 through Kubelt node"), "{text}");
        assert!(text.contains("the app may read namespace profile, and read and write namespace notes of this core until"), "{text}");
        let statement = signed(&owner, text.clone())?;

        let login = Login::verify(&statement, "notes.example:8443")?;
        assert_eq!((login.owner, login.peer, login.nonce.as_str()), (owner.address(), node, "n0nce123abc"));
        assert_eq!(login.reads, BTreeSet::from(["profile".to_owned()]));
        assert_eq!(login.expires_at, T0 + 3600);
        let delegation = login.delegation.clone().expect("the login writes a namespace");
        assert!(delegation.namespaces.allows("notes") && !delegation.namespaces.allows("profile"));

        // Every replica verifies the same signed text as a delegation, with no trust in the node.
        let verified = Delegation::verify(&statement)?;
        assert_eq!(verified, delegation);
        assert_eq!(verified.domain, "notes.example:8443");

        // Presented for another site, it is refused.
        let elsewhere = Login::verify(&statement, "other.example");
        assert!(matches!(&elsewhere, Err(DelegationError::WrongDomain { found, .. }) if found == "notes.example:8443"), "{elsewhere:?}");
        // A read-only login delegates nothing.
        let read_only = LoginRequest { domain: "notes.example", reads: &["profile"], writes: &[], ..request };
        let read_only = signed(&owner, login_message(&read_only, now)?)?;
        assert!(Login::verify(&read_only, "notes.example")?.delegation.is_none());
        assert!(matches!(Delegation::verify(&read_only), Err(DelegationError::Malformed(m)) if m.contains("delegates nothing")));
        // A tampered grant no longer matches its statement line.
        let widened = text.replace("- urn:kubelt:read:profile", "- urn:kubelt:ns:profile");
        assert!(matches!(Login::verify(&signed(&owner, widened)?, "notes.example:8443"), Err(DelegationError::StatementMismatch { .. })));
        // Signed by someone else than the address it names.
        let forged = OwnerStatement { message: text, signature: DevWallet::random().sign(&statement.message)?.into() };
        assert!(matches!(Login::verify(&forged, "notes.example:8443"), Err(DelegationError::SignedBySomeoneElse { .. })));
        Ok(())
    }

    #[test]
    fn app_domains_are_origin_hosts() {
        for ok in ["localhost", "localhost:5421", "notes.example.org", "127.0.0.1:8080", "a-b.c"] {
            assert!(is_valid_app_domain(ok), "{ok}");
        }
        for bad in ["", "kubelt", "user@host", "host/path", "host:", "host:99999", "-x.org", "x.org.", "ho st", "x:1:2", &"a".repeat(254)] {
            assert!(!is_valid_app_domain(bad), "{bad}");
        }
    }
}
