//! Messages between cores: [`MsgClient`], the `msg` sub-handle of the [`Client`].
//!
//! The event loop keeps the inboxes and the outbox; the CPU work of a message — sealing it to
//! the recipient's device keys, opening it — runs here, on the caller's side, on a blocking
//! thread, so that a busy sender does not slow the swarm.

use std::sync::Arc;
use std::time::Duration;

use kubelt_proto::core::OwnerStatement;
use kubelt_proto::msg::Envelope;
use libp2p::identity::Keypair;
use serde::Serialize;
use tokio::sync::oneshot;

use super::{Client, Command, NodeEvent};
use crate::core::Address;
use crate::msg::envelope::{self, body_of, MessageId, SealError};
use crate::msg::inbox::Entry;
use crate::msg::DeviceKey;

/// A request to the event loop's messaging part.
#[derive(Debug)]
pub(crate) enum MsgCommand {
    /// What sealing a message from `from` to `to` needs.
    Prepare { from: Address, to: Address, reply: oneshot::Sender<Result<Sealer, MsgError>> },
    /// Keep a sealed message (durably) and deliver it.
    Queue { id: MessageId, to: Address, envelope: Envelope, created_at: i64, reply: oneshot::Sender<Result<bool, MsgError>> },
    /// The messages of a core's inbox received after `since` (unix ms).
    Inbox { core: Address, since: Option<i64>, reply: oneshot::Sender<Result<RawMessages, MsgError>> },
    /// One message, marked read.
    Read { id: MessageId, reply: oneshot::Sender<Result<RawMessages, MsgError>> },
    /// One message, left as it is (read or not).
    Get { id: MessageId, reply: oneshot::Sender<Result<RawMessages, MsgError>> },
    Delete { id: MessageId, reply: oneshot::Sender<Result<(), MsgError>> },
    Outbox { reply: oneshot::Sender<Vec<OutboxEntry>> },
}

/// What sealing one message needs: this node's key and delegation for the sender core, and
/// the recipient's device keys.
pub(crate) struct Sealer {
    pub keypair: Keypair,
    pub delegation: OwnerStatement,
    pub devices: Vec<[u8; 32]>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").field("devices", &self.devices.len()).finish_non_exhaustive()
    }
}

/// Stored messages and the key that may open them (opened on the caller's side).
#[derive(Debug)]
pub(crate) struct RawMessages {
    pub device: Option<Arc<DeviceKey>>,
    pub messages: Vec<(MessageId, Address, Entry, Envelope)>,
}

/// A message as `kubelt msg inbox` lists it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct InboxMessage {
    /// 32 hex digits.
    pub id: String,
    /// The sender core, EIP-55.
    pub from: String,
    /// The recipient core, EIP-55.
    pub to: String,
    /// When the sender sealed it (unix ms, the sender's clock).
    pub sent_at: i64,
    /// When this node received it (unix ms).
    pub received_at: i64,
    /// The text, when this node is one of the recipient's devices; `null` elsewhere (or when
    /// the text is not UTF-8).
    pub text: Option<String>,
    /// Whether it was read on this node.
    pub read: bool,
}

/// A message waiting in the outbox.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct OutboxEntry {
    /// 32 hex digits.
    pub id: String,
    /// The recipient core, EIP-55.
    pub to: String,
}

/// What `send` did.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Sent {
    /// 32 hex digits.
    pub id: String,
    /// The recipient core, EIP-55.
    pub to: String,
    /// Whether a replica of the recipient took it before `send` returned; otherwise it waits
    /// in the outbox.
    pub delivered: bool,
}

/// Why a messaging command failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum MsgError {
    /// This node does not hold the sender core.
    #[error("this node does not hold core {0}: it must be able to write the sender core")]
    NotHeld(String),
    /// This node holds the sender core without a delegation to write it.
    #[error("this node has no delegation to write core {0}, so it cannot send as it")]
    NotWritable(String),
    /// No device key of the recipient is known (yet).
    #[error("no device key of core {core} is known{}", if *following { " yet: this node now follows the core to learn them; retry once a replica is online" } else { ": no node that writes the core has published one" })]
    NoDeviceKeys {
        /// The recipient core.
        core: String,
        /// Whether this node just started following the core to learn its keys.
        following: bool,
    },
    /// The owner of the sender core revoked this node's key: it cannot send as that core.
    #[error("the owner of core {0} revoked this node's key: it cannot send as that core any more")]
    Revoked(String),
    /// A replica of the recipient refused the message for good (it is not kept for retries).
    #[error("a replica of core {to} refused the message: {reason}")]
    Refused {
        /// The recipient core.
        to: String,
        /// The replica's reason.
        reason: String,
    },
    /// No message with this id in any inbox of this node.
    #[error("no message {0} on this node")]
    NotFound(String),
    /// The message cannot be sealed (too large, too many devices).
    #[error(transparent)]
    Seal(#[from] SealError),
    /// This node does not host the core's inbox.
    #[error("this node does not hold core {0}")]
    NoInbox(String),
    /// The store failed.
    #[error("storage failed: {0}")]
    Storage(String),
    /// The node has stopped.
    #[error("the node has stopped")]
    Stopped,
}

/// Messages between cores.
#[derive(Debug, Clone, Copy)]
pub struct MsgClient<'a>(pub(super) &'a Client);

/// How long `send` waits for the recipient's device keys after it started following the
/// recipient core.
const KEYS_WAIT: Duration = Duration::from_secs(15);

impl MsgClient<'_> {
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T, MsgError>>) -> MsgCommand) -> Result<T, MsgError> {
        self.0.ask(|reply| Command::Msg(make(reply))).await.map_err(|_| MsgError::Stopped)?
    }

    /// Sends `text` from core `from` (which this node writes) to core `to`. Returns once the
    /// message is durable in the outbox; waits up to `wait` for a replica to take it. When
    /// the recipient core is not held yet, this node follows it and waits for its device keys.
    pub async fn send(&self, from: Address, to: Address, text: Vec<u8>, wait: Duration) -> Result<Sent, MsgError> {
        let deadline = tokio::time::Instant::now() + KEYS_WAIT;
        let sealer = loop {
            match self.ask(|reply| MsgCommand::Prepare { from, to, reply }).await {
                Err(MsgError::NoDeviceKeys { following: true, .. }) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => break other?,
            }
        };
        let created_at = now_ms();
        let (id, envelope) = tokio::task::spawn_blocking(move || {
            envelope::seal(&sealer.keypair, &sealer.delegation, &from, &to, &text, &sealer.devices, created_at)
        })
        .await
        .map_err(|_| MsgError::Stopped)??;
        let mut events = self.0.events();
        let delivered = self.ask(|reply| MsgCommand::Queue { id, to, envelope, created_at, reply }).await?;
        let delivered = delivered || wait_delivered(&mut events, id, wait).await.map_err(|reason| MsgError::Refused { to: to.to_checksum(), reason })?;
        Ok(Sent { id: id.to_string(), to: to.to_checksum(), delivered })
    }

    /// The messages of a core's inbox on this node (received after `since`, unix ms), oldest
    /// first, opened when this node is one of the core's devices.
    pub async fn inbox(&self, core: Address, since: Option<i64>) -> Result<Vec<InboxMessage>, MsgError> {
        let raw = self.ask(|reply| MsgCommand::Inbox { core, since, reply }).await?;
        open_all(raw).await
    }

    /// One message (marked read on this node).
    pub async fn read(&self, id: MessageId) -> Result<InboxMessage, MsgError> {
        let raw = self.ask(|reply| MsgCommand::Read { id, reply }).await?;
        open_all(raw).await?.pop().ok_or_else(|| MsgError::NotFound(id.to_string()))
    }

    /// One message, without marking it read (what an app's subscription shows).
    pub async fn get(&self, id: MessageId) -> Result<InboxMessage, MsgError> {
        let raw = self.ask(|reply| MsgCommand::Get { id, reply }).await?;
        open_all(raw).await?.pop().ok_or_else(|| MsgError::NotFound(id.to_string()))
    }

    /// Deletes a message on this node; no host brings it back.
    pub async fn delete(&self, id: MessageId) -> Result<(), MsgError> {
        self.ask(|reply| MsgCommand::Delete { id, reply }).await
    }

    /// Messages waiting for a replica of their recipient.
    pub async fn outbox(&self) -> Result<Vec<OutboxEntry>, MsgError> {
        self.0.ask(|reply| Command::Msg(MsgCommand::Outbox { reply })).await.map_err(|_| MsgError::Stopped)
    }
}

/// Whether a replica took message `id` within `wait` (`Ok(false)`: not yet, it waits in the
/// outbox); `Err` with the reason when a replica refused it for good.
async fn wait_delivered(events: &mut tokio::sync::broadcast::Receiver<NodeEvent>, id: MessageId, wait: Duration) -> Result<bool, String> {
    let until = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(until, events.recv()).await {
            Ok(Ok(NodeEvent::MessageDelivered { id: got, .. })) if got == id => return Ok(true),
            Ok(Ok(NodeEvent::MessageRefused { id: got, reason, .. })) if got == id => return Err(reason),
            Ok(Ok(_)) | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(_)) | Err(_) => return Ok(false),
        }
    }
}

/// Opens stored messages on a blocking thread.
async fn open_all(raw: RawMessages) -> Result<Vec<InboxMessage>, MsgError> {
    tokio::task::spawn_blocking(move || {
        raw.messages
            .into_iter()
            .map(|(id, to, entry, envelope)| {
                let text = raw
                    .device
                    .as_ref()
                    .and_then(|device| device.open(&body_of(&envelope)?).ok())
                    .and_then(|bytes| String::from_utf8(bytes).ok());
                InboxMessage {
                    id: id.to_string(),
                    from: entry.from.to_checksum(),
                    to: to.to_checksum(),
                    sent_at: entry.sent_at,
                    received_at: entry.received_at,
                    text,
                    read: entry.read,
                }
            })
            .collect()
    })
    .await
    .map_err(|_| MsgError::Stopped)
}

/// Unix milliseconds now.
pub(crate) fn now_ms() -> i64 {
    i64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}
