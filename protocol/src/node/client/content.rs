//! Blocks over bitswap and provider records: [`ContentClient`], the `content` sub-handle of the
//! [`Client`].

use cid::Cid;
use tokio::sync::oneshot;

use super::{Client, Command, NodeError};
use crate::bitswap::SessionId;
use crate::node::content::FetchError;

/// A request to the event loop's content part.
#[derive(Debug)]
pub(crate) enum ContentCommand {
    NewSession { reply: oneshot::Sender<SessionId> },
    CloseSession { session: SessionId },
    /// Resolves once the block is in the store, or with the reason it could not be fetched.
    FetchBlock { cid: Cid, session: SessionId, reply: oneshot::Sender<Result<(), FetchError>> },
    /// Announce in the DHT that this node has `cid`.
    Provide { cid: Cid },
    /// Blocks were added locally: peers that want them get them.
    BlocksAdded { cids: Vec<Cid> },
}

/// Blocks over bitswap and provider records of a node.
#[derive(Debug, Clone, Copy)]
pub struct ContentClient<'a>(pub(super) &'a Client);

impl ContentClient<'_> {
    /// Starts a bitswap session: blocks fetched in one session are asked first from the peers
    /// that sent earlier blocks of it.
    pub async fn new_session(&self) -> Result<SessionId, NodeError> {
        self.0.ask(|reply| Command::Content(ContentCommand::NewSession { reply })).await
    }

    /// Ends a session (best effort: never blocks).
    pub fn close_session(&self, session: SessionId) {
        self.0.try_tell(Command::Content(ContentCommand::CloseSession { session }));
    }

    /// Fetches a block over bitswap into the store.
    pub async fn fetch_block(&self, cid: Cid, session: SessionId) -> Result<(), FetchError> {
        self.0
            .ask(|reply| Command::Content(ContentCommand::FetchBlock { cid, session, reply }))
            .await
            .map_err(|_| FetchError::Stopped)?
    }

    /// Announces `cid` in the DHT.
    pub async fn provide(&self, cid: Cid) -> Result<(), NodeError> {
        self.0.tell(Command::Content(ContentCommand::Provide { cid })).await
    }

    /// Tells bitswap about blocks added locally.
    pub async fn blocks_added(&self, cids: Vec<Cid>) -> Result<(), NodeError> {
        self.0.tell(Command::Content(ContentCommand::BlocksAdded { cids })).await
    }
}
