//! The core replicas a node holds: [`CoresClient`], the `cores` sub-handle of the [`Client`].

use kubelt_proto::core::OwnerStatement;
use libp2p::PeerId;
use serde::Serialize;
use tokio::sync::oneshot;

use super::{Client, Command, NodeError};
use crate::core::private::object::ObjectKey;
use crate::core::private::KeyId;
use crate::core::Address;

/// A request to the event loop's cores part.
#[derive(Debug)]
pub(crate) enum CoreCommand {
    Follow { core: Address, reply: oneshot::Sender<Result<CoreSummary, CoreCommandError>> },
    Submit { statement: OwnerStatement, reply: oneshot::Sender<Result<SubmitOutcome, CoreCommandError>> },
    Set {
        core: Address,
        namespace: String,
        path: String,
        value: serde_json::Value,
        /// Refuse the write when the core's stored changes would pass this many bytes.
        max_bytes: Option<u64>,
        reply: oneshot::Sender<Result<CoreSummary, CoreCommandError>>,
    },
    Get {
        core: Address,
        namespace: String,
        path: String,
        reply: oneshot::Sender<Result<serde_json::Value, CoreCommandError>>,
    },
    List { reply: oneshot::Sender<Vec<CoreSummary>> },
    ListLoaded { reply: oneshot::Sender<Vec<CoreSummary>> },
    Summary { core: Address, reply: oneshot::Sender<Result<CoreSummary, CoreCommandError>> },
    Holding { core: Option<Address>, reply: oneshot::Sender<Holding> },
    RevocationMessage { core: Address, peer: PeerId, reply: oneshot::Sender<Result<String, CoreCommandError>> },
    Private { core: Address, namespace: String, reply: oneshot::Sender<Result<CoreSummary, CoreCommandError>> },
    Unlock { core: Address, signature: Vec<u8>, reply: oneshot::Sender<Result<UnlockOutcome, CoreCommandError>> },
    /// The data key for a new private object (`id: None`) or the one an object names.
    ObjectKey { core: Address, id: Option<KeyId>, reply: oneshot::Sender<Result<ObjectKey, CoreCommandError>> },
}

/// A core held by this node, as `kubelt core ls` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct CoreSummary {
    /// The owner's address, EIP-55 checksummed.
    pub address: String,
    /// Current heads (hex change hashes), sorted.
    pub heads: Vec<String>,
    /// Changes in the document.
    pub changes: usize,
    /// Changes held back for missing dependencies.
    pub pending: usize,
    /// Other peers known to hold this core (subscribed to its topic).
    pub replicas: usize,
    /// Of those, the peers in this node's gossipsub mesh of the core: a change reaches them
    /// at once; the others learn of it from gossip at a heartbeat, or from catch-up.
    #[serde(default)]
    pub mesh: usize,
    /// Whether this node holds a delegation to write.
    pub writable: bool,
    /// Top-level namespaces of the document.
    pub namespaces: Vec<String>,
    /// Bytes of the core's stored changes (what its document is made of).
    #[serde(default)]
    pub bytes: u64,
}

/// How many cores a node holds and keeps in memory, and whether it holds one of them:
/// answered without loading any replica.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[non_exhaustive]
pub struct Holding {
    /// Whether the node holds the core asked about.
    pub holds: bool,
    /// Cores held.
    pub held: usize,
    /// Replicas in memory now.
    pub loaded: usize,
    /// Replicas loaded from the store since the node started.
    pub loads: u64,
    /// Replicas unloaded (least recently used) since the node started.
    pub unloads: u64,
}

/// Which kind of owner statement was submitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum StatementKind {
    /// The owner lets a node's key write the core.
    Delegation,
    /// The owner takes a node's key's right back.
    Revocation,
}

impl std::fmt::Display for StatementKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StatementKind::Delegation => "delegation",
            StatementKind::Revocation => "revocation",
        })
    }
}

/// What a submitted owner statement did.
#[derive(Debug, Clone, Serialize)]
pub struct SubmitOutcome {
    /// Delegation or revocation.
    pub kind: StatementKind,
    /// The core, EIP-55 checksummed.
    pub core: String,
    /// The node key the statement names.
    pub peer: String,
}

/// Changes that entered a core's document on this node (local writes, gossip, catch-up).
#[derive(Debug, Clone)]
pub struct CoreUpdate {
    /// The core that changed.
    pub core: Address,
    /// Hex hashes of the changes applied, in order.
    pub applied: Vec<String>,
}

/// What `core unlock` did.
#[derive(Debug, Clone, serde::Serialize)]
#[non_exhaustive]
pub struct UnlockOutcome {
    /// The core, EIP-55.
    pub core: String,
    /// Data keys this node now holds for the core.
    pub keys: usize,
}

/// Why a core command failed. Each case is its own variant, so that callers (the JSON-RPC API,
/// apps) can tell "not held" from "revoked" from "bad input"; the message says what to fix.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CoreCommandError {
    /// This node does not hold the core.
    #[error("this node does not hold core {0} (follow it, or submit a delegation)")]
    NotHeld(String),
    /// This node holds the core but has no delegation to write it.
    #[error("this node has no delegation to write to core {0}")]
    NotWritable(String),
    /// The owner revoked this node's key: it may no longer write the core.
    #[error("this node's key was revoked by the owner of core {0}")]
    Revoked(String),
    /// The owner statement is not a valid delegation or revocation.
    #[error("not a valid {kind}: {reason}")]
    InvalidStatement {
        /// What the statement claimed to be.
        kind: StatementKind,
        /// What is wrong with it.
        reason: String,
    },
    /// The delegation authorizes another node's key.
    #[error("this delegation authorizes peer {delegated}, not this node ({this}): submit it on that node")]
    OtherNode {
        /// The key the delegation names.
        delegated: String,
        /// This node's peer id.
        this: String,
    },
    /// The namespace, path or value is not acceptable.
    #[error("{0}")]
    InvalidInput(String),
    /// The write would break the core's rules (e.g. a namespace the delegation does not cover).
    #[error("{0}")]
    Refused(String),
    /// The value is private and this node holds no key for it (see `core::private`).
    #[error("encrypted: this node holds no key for this private value of core {0} (run `kubelt core unlock {0}`, or wait for a device of the owner to share its key)")]
    Encrypted(String),
    /// The private value's ciphertext does not open under its key: refused as a value.
    #[error("undecryptable private value at {0}: tampered or malformed ciphertext")]
    Undecryptable(String),
    /// The write would take the core past the bytes it may hold here (a hosted node's quota).
    #[error("quota exceeded: core {core} holds {used} bytes on this node and may hold at most {limit}; the write was refused")]
    Full {
        /// The core, EIP-55.
        core: String,
        /// Bytes it holds (with the write, estimated).
        used: u64,
        /// Bytes it may hold.
        limit: u64,
    },
    /// The store failed.
    #[error("storage failed: {0}")]
    Storage(String),
    /// The node has stopped.
    #[error("the node has stopped")]
    Stopped,
}

/// The core replicas of a node.
#[derive(Debug, Clone, Copy)]
pub struct CoresClient<'a>(pub(super) &'a Client);

impl CoresClient<'_> {
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T, CoreCommandError>>) -> CoreCommand) -> Result<T, CoreCommandError> {
        self.0.ask(|reply| Command::Cores(make(reply))).await.map_err(|_| CoreCommandError::Stopped)?
    }

    /// Holds a replica of a core without write rights.
    pub async fn follow(&self, core: Address) -> Result<CoreSummary, CoreCommandError> {
        self.ask(|reply| CoreCommand::Follow { core, reply }).await
    }

    /// Verifies and applies an owner-signed delegation (for this node) or revocation.
    pub async fn submit(&self, statement: OwnerStatement) -> Result<SubmitOutcome, CoreCommandError> {
        self.ask(|reply| CoreCommand::Submit { statement, reply }).await
    }

    /// Writes a JSON value at `namespace/path`; returns once the change is on disk.
    pub async fn set(&self, core: Address, namespace: String, path: String, value: serde_json::Value) -> Result<CoreSummary, CoreCommandError> {
        self.ask(|reply| CoreCommand::Set { core, namespace, path, value, max_bytes: None, reply }).await
    }

    /// [`CoresClient::set`], refused with [`CoreCommandError::Full`] when the core's stored
    /// changes would pass `max_bytes` with this write (its size estimated from the value).
    pub async fn set_within(&self, core: Address, namespace: String, path: String, value: serde_json::Value, max_bytes: u64) -> Result<CoreSummary, CoreCommandError> {
        self.ask(|reply| CoreCommand::Set { core, namespace, path, value, max_bytes: Some(max_bytes), reply }).await
    }

    /// Reads the JSON value at `namespace/path` (`path` empty: the whole namespace).
    pub async fn get(&self, core: Address, namespace: String, path: String) -> Result<serde_json::Value, CoreCommandError> {
        self.ask(|reply| CoreCommand::Get { core, namespace, path, reply }).await
    }

    /// The revocation text for the owner to sign: it keeps the changes `peer` made so far.
    pub async fn revocation_message(&self, core: Address, peer: PeerId) -> Result<String, CoreCommandError> {
        self.ask(|reply| CoreCommand::RevocationMessage { core, peer, reply }).await
    }

    /// Declares a namespace private: values written there from now on are encrypted.
    pub async fn private(&self, core: Address, namespace: String) -> Result<CoreSummary, CoreCommandError> {
        self.ask(|reply| CoreCommand::Private { core, namespace, reply }).await
    }

    /// Unlocks the core's private data with the owner's signature of
    /// [`crate::core::private::unlock_message`].
    pub async fn unlock(&self, core: Address, signature: Vec<u8>) -> Result<UnlockOutcome, CoreCommandError> {
        self.ask(|reply| CoreCommand::Unlock { core, signature, reply }).await
    }

    /// The data key to encrypt a new private object of `core` with (see
    /// [`crate::core::private::object`]): this node must write the core. A new key is made
    /// (and its wraps are on disk) first when none is fresh.
    pub async fn object_key(&self, core: Address) -> Result<ObjectKey, CoreCommandError> {
        self.ask(|reply| CoreCommand::ObjectKey { core, id: None, reply }).await
    }

    /// The data key `id` of `core`, named by a private object's header, to decrypt it:
    /// [`CoreCommandError::Encrypted`] when this node holds no such key.
    pub async fn object_key_by_id(&self, core: Address, id: KeyId) -> Result<ObjectKey, CoreCommandError> {
        self.ask(|reply| CoreCommand::ObjectKey { core, id: Some(id), reply }).await
    }

    /// One core held, as [`CoresClient::list`] shows it.
    pub async fn summary(&self, core: Address) -> Result<CoreSummary, CoreCommandError> {
        self.ask(|reply| CoreCommand::Summary { core, reply }).await
    }

    /// How many cores are held and in memory, and whether `core` is held, without loading
    /// any replica (cheap on a node that hosts many cores).
    pub async fn holding(&self, core: Option<Address>) -> Result<Holding, NodeError> {
        self.0.ask(|reply| Command::Cores(CoreCommand::Holding { core, reply })).await
    }

    /// The cores whose replicas are in memory now (never loads one).
    pub async fn list_loaded(&self) -> Result<Vec<CoreSummary>, NodeError> {
        self.0.ask(|reply| Command::Cores(CoreCommand::ListLoaded { reply })).await
    }

    /// Every core held, loading each replica in turn (on a node that hosts many cores this is
    /// slow: prefer [`CoresClient::holding`] or [`CoresClient::summary`]).
    pub async fn list(&self) -> Result<Vec<CoreSummary>, NodeError> {
        self.0.ask(|reply| Command::Cores(CoreCommand::List { reply })).await
    }
}
