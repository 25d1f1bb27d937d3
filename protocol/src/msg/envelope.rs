//! Message envelopes: sealing one, and the checks a replica runs on one it receives.
//!
//! | field | content |
//! |---|---|
//! | `body` | encoded `MessageBody`: sender and recipient cores, a 16-byte nonce, the time, the content key wrapped to each device key, the ciphertext |
//! | `author` | the author's libp2p public key (protobuf) |
//! | `signature` | the author's signature over [`signing_bytes`]`(body)` |
//! | `delegation` | the owner-signed delegation that lets the author write the sender core |
//! | `to` | the recipient core again, unsigned: lets a replica refuse a core it does not hold before any work |
//!
//! The **id** of a message is the first 16 bytes of sha2-256 of the body: nobody can make two
//! messages with one id, so "duplicates by id are one message" needs no tie-break between
//! replicas.
//!
//! Checks run in this order, each on bounded input ([`verify`]): sizes of every field; the
//! author's signature over the raw body bytes; only then the body is decoded, its counts and
//! lengths bounded; the recipient hint; the time; and last the delegation (SIWE parsing and an
//! ECDSA recovery, cached by statement id). Everything runs inside `catch_unwind`.

use std::fmt;
use std::str::FromStr;

use kubelt_proto::core::OwnerStatement;
use kubelt_proto::msg::{Envelope, MessageBody};
use kubelt_proto::Message;
use libp2p::identity::{Keypair, PeerId, PublicKey};
use sha2::{Digest, Sha256};

use super::crypto::{self, CryptoError, KEY_LEN, SEALED_KEY_LEN};
use crate::core::change::Delegations;
use crate::core::{Address, DelegationError};

/// Domain separator of [`signing_bytes`].
pub const SIGNING_DOMAIN: &[u8] = b"kubelt-msg-v1";
/// Largest text of one message (bytes, before encryption).
pub const MAX_TEXT: usize = 64 * 1024;
/// Most device keys one message is sealed to.
pub const MAX_DEVICES: usize = 32;
/// Largest encoded body: the text and its tag, the wraps, the header.
pub const MAX_BODY: usize = MAX_TEXT + 16 + MAX_DEVICES * (KEY_LEN * 2 + SEALED_KEY_LEN + 8) + 256;
/// Largest encoded envelope: the body, author key, signature and delegation.
pub const MAX_ENVELOPE: usize = MAX_BODY + MAX_AUTHOR_KEY + MAX_SIGNATURE + MAX_STATEMENT + 64;
/// Largest author key (protobuf-encoded libp2p public key).
const MAX_AUTHOR_KEY: usize = 2048;
/// Largest author signature.
const MAX_SIGNATURE: usize = 1024;
/// Largest delegation statement (message text and signature).
const MAX_STATEMENT: usize = 8192;
/// Length of a body's nonce and of a message id.
pub const ID_LEN: usize = 16;
/// How far (ms) a message's time may be ahead of this node's clock.
pub const MAX_CLOCK_SKEW_MS: i64 = 10 * 60 * 1000;

/// A message id: the first 16 bytes of sha2-256 of the signed body.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId(pub [u8; ID_LEN]);

impl MessageId {
    /// The id of the message whose body is `body`.
    pub fn of_body(body: &[u8]) -> Self {
        let digest = Sha256::digest(body);
        let mut id = [0u8; ID_LEN];
        id.copy_from_slice(&digest[..ID_LEN]);
        MessageId(id)
    }

    /// From wire bytes; `None` unless exactly 16 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; ID_LEN]>::try_from(bytes).ok().map(MessageId)
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

/// A string that is not a message id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a message id is 32 hex digits: {0}")]
pub struct BadMessageId(String);

impl FromStr for MessageId {
    type Err = BadMessageId;
    fn from_str(s: &str) -> Result<Self, BadMessageId> {
        let bytes = hex::decode(s.trim()).map_err(|e| BadMessageId(e.to_string()))?;
        MessageId::from_slice(&bytes).ok_or_else(|| BadMessageId(format!("got {} digits", s.trim().len())))
    }
}

/// The bytes an author signs for a message body.
pub fn signing_bytes(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIGNING_DOMAIN.len() + 1 + 32);
    out.extend_from_slice(SIGNING_DOMAIN);
    out.push(0);
    out.extend_from_slice(&Sha256::digest(body));
    out
}

/// Why a message was refused. The messages are for logs and for the sender.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refused {
    /// A field or the whole envelope is over its limit.
    #[error("the message is too large: {0}")]
    TooLarge(String),
    /// A missing, undecodable or out-of-bounds field.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The author's signature does not verify.
    #[error("the author's signature does not verify")]
    BadSignature,
    /// The delegation is invalid, or not the sender core's delegation of the author at the
    /// message's time.
    #[error("delegation: {0}")]
    Delegation(DelegationError),
    /// The owner of the sender core revoked the author's key.
    #[error("node key {0} was revoked by the owner of the sender core")]
    Revoked(String),
    /// This replica does not hold the recipient core.
    #[error("this node does not hold core {0}")]
    NotHeld(String),
    /// The message is dated more than the allowed skew ahead of this node's clock.
    #[error("the message is dated in the future; retry later")]
    FromTheFuture,
    /// The message is older than any replica keeps messages (a replay).
    #[error("the message is older than {max_days} days")]
    TooOld {
        /// The age limit.
        max_days: u64,
    },
    /// The sender core sent more messages than this replica takes per second.
    #[error("too many messages from core {0}; retry later")]
    RateLimited(String),
    /// The recipient's inbox on this replica is full (for this sender, or in bytes).
    #[error("the inbox of core {0} is full")]
    InboxFull(String),
    /// This replica has too much work in flight.
    #[error("busy; retry later")]
    Busy,
    /// This replica is catching up the sender core before its verdict (a revocation of the
    /// author may be there).
    #[error("this replica is catching up the sender core {0} before its verdict; retry in a few seconds")]
    SenderPending(String),
}

impl Refused {
    /// Whether the sender should try again later (the message itself may be fine).
    pub fn retry(&self) -> bool {
        matches!(self, Refused::FromTheFuture | Refused::RateLimited(_) | Refused::InboxFull(_) | Refused::Busy | Refused::SenderPending(_))
    }
}

/// A message whose signature, bounds, time and delegation were checked.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The message id.
    pub id: MessageId,
    /// The sender core.
    pub from: Address,
    /// The recipient core.
    pub to: Address,
    /// Unix milliseconds, the author's clock.
    pub sent_at: i64,
    /// The author's key.
    pub author: PeerId,
    /// The envelope as received (stored and forwarded as is).
    pub envelope: Envelope,
}

/// Errors of sealing a message.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    #[error("the text is {0} bytes; a message holds at most {MAX_TEXT}")]
    /// The text is over [`MAX_TEXT`].
    TooLarge(usize),
    #[error("the recipient has {0} device keys; a message is sealed to at most {MAX_DEVICES}")]
    /// The recipient has more than [`MAX_DEVICES`] device keys.
    TooManyDevices(usize),
    #[error(transparent)]
    /// Encryption failed.
    Crypto(#[from] CryptoError),
    #[error("signing failed: {0}")]
    /// The node key could not sign.
    Signing(String),
}

/// Seals `text` from core `from` (this node, authorized by `delegation`) to core `to`, for
/// each of `devices` (the recipient's device keys).
pub fn seal(
    keypair: &Keypair,
    delegation: &OwnerStatement,
    from: &Address,
    to: &Address,
    text: &[u8],
    devices: &[[u8; KEY_LEN]],
    sent_at_ms: i64,
) -> Result<(MessageId, Envelope), SealError> {
    if text.len() > MAX_TEXT {
        return Err(SealError::TooLarge(text.len()));
    }
    if devices.len() > MAX_DEVICES {
        return Err(SealError::TooManyDevices(devices.len()));
    }
    let mut body = MessageBody {
        from: from.to_lower_hex(),
        to: to.to_lower_hex(),
        nonce: rand::random::<[u8; ID_LEN]>().to_vec().into(),
        sent_at: sent_at_ms,
        ..Default::default()
    };
    crypto::seal(&mut body, text, devices)?;
    let body = body.encode_to_vec();
    let signature = keypair.sign(&signing_bytes(&body)).map_err(|e| SealError::Signing(e.to_string()))?;
    let id = MessageId::of_body(&body);
    let envelope = Envelope {
        body: body.into(),
        author: keypair.public().encode_protobuf().into(),
        signature: signature.into(),
        delegation: Some(delegation.clone()),
        to: to.to_lower_hex(),
    };
    Ok((id, envelope))
}

/// The recipient core an envelope says it is for (the unsigned hint, checked by [`verify`]).
pub fn recipient_hint(envelope: &Envelope) -> Result<Address, Refused> {
    Address::parse(&envelope.to).map_err(|e| Refused::Malformed(format!("recipient: {e}")))
}

/// Checks a received envelope (see the module doc for the order). `max_age_ms` bounds how old
/// a message may be. CPU-bound (signature, ECDSA recovery): call it off the event loop.
pub(crate) fn verify(envelope: Envelope, delegations: &Delegations, now_ms: i64, max_age_ms: i64) -> Result<Verified, Refused> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| verify_inner(envelope, delegations, now_ms, max_age_ms)))
        .unwrap_or_else(|_| Err(Refused::Malformed("verification panicked".into())))
}

fn verify_inner(envelope: Envelope, delegations: &Delegations, now_ms: i64, max_age_ms: i64) -> Result<Verified, Refused> {
    let too_large = |what: &str, size: usize, max: usize| Refused::TooLarge(format!("{what} is {size} bytes, at most {max}"));
    if envelope.body.len() > MAX_BODY {
        return Err(too_large("the body", envelope.body.len(), MAX_BODY));
    }
    if envelope.author.len() > MAX_AUTHOR_KEY {
        return Err(too_large("the author key", envelope.author.len(), MAX_AUTHOR_KEY));
    }
    if envelope.signature.len() > MAX_SIGNATURE {
        return Err(too_large("the signature", envelope.signature.len(), MAX_SIGNATURE));
    }
    let statement = envelope.delegation.as_ref().ok_or_else(|| Refused::Malformed("no delegation".into()))?;
    if statement.message.len() + statement.signature.len() > MAX_STATEMENT {
        return Err(too_large("the delegation", statement.message.len() + statement.signature.len(), MAX_STATEMENT));
    }
    let to = recipient_hint(&envelope)?;

    // The signature over the raw bytes, before anything decodes the body.
    let author_key = PublicKey::try_decode_protobuf(&envelope.author).map_err(|e| Refused::Malformed(format!("author key: {e}")))?;
    if !author_key.verify(&signing_bytes(&envelope.body), &envelope.signature) {
        return Err(Refused::BadSignature);
    }
    let author = author_key.to_peer_id();

    let body = MessageBody::decode(envelope.body.as_ref()).map_err(|e| Refused::Malformed(format!("body: {e}")))?;
    if body.nonce.len() != ID_LEN {
        return Err(Refused::Malformed(format!("the nonce is {} bytes, not {ID_LEN}", body.nonce.len())));
    }
    if body.keys.is_empty() || body.keys.len() > MAX_DEVICES {
        return Err(Refused::Malformed(format!("sealed to {} device keys; 1 to {MAX_DEVICES} allowed", body.keys.len())));
    }
    for key in &body.keys {
        if key.device.len() != KEY_LEN || key.enc.len() != KEY_LEN || key.sealed.len() != SEALED_KEY_LEN {
            return Err(Refused::Malformed("a wrapped key has the wrong length".into()));
        }
    }
    if body.ciphertext.len() < 16 || body.ciphertext.len() > MAX_TEXT + 16 {
        return Err(Refused::Malformed(format!("the ciphertext is {} bytes", body.ciphertext.len())));
    }
    let from = Address::parse(&body.from).map_err(|e| Refused::Malformed(format!("sender: {e}")))?;
    if body.to != to.to_lower_hex() {
        return Err(Refused::Malformed("the recipient hint differs from the signed recipient".into()));
    }
    if body.sent_at > now_ms.saturating_add(MAX_CLOCK_SKEW_MS) {
        return Err(Refused::FromTheFuture);
    }
    if body.sent_at < now_ms.saturating_sub(max_age_ms) {
        return Err(Refused::TooOld { max_days: (max_age_ms / 86_400_000).max(0) as u64 });
    }

    // Last, the owner's statement: SIWE parsing and an ECDSA recovery (cached by id).
    let delegation = delegations.verify(&from, statement).map_err(Refused::Delegation)?;
    delegation.check(&from, &author, body.sent_at.div_euclid(1000)).map_err(Refused::Delegation)?;

    Ok(Verified { id: MessageId::of_body(&envelope.body), from, to, sent_at: body.sent_at, author, envelope })
}

/// Decodes the body of an envelope already verified (stored or just sealed).
pub fn body_of(envelope: &Envelope) -> Option<MessageBody> {
    MessageBody::decode(envelope.body.as_ref()).ok()
}
