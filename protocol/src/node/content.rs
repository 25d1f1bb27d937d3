//! Content through the node: a [`BlockSource`] that reads the local store and fetches what is
//! missing over bitswap, and DAG-wide fetching for `pin add` and `get`.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use cid::Cid;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};

use super::Client;
use crate::bitswap::SessionId;
use crate::store::{BlockStore, Store};
use crate::unixfs::{self, BlockSource, UnixfsError};

/// Why a block could not be fetched.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// Bitswap gave the block up (no peer sent it in time, or it could not be stored).
    #[error(transparent)]
    Want(#[from] crate::bitswap::WantError),
    /// Bitswap gave the block up while some peers were connected only through a relay, which
    /// carries no content: they may well have it.
    #[error("{error}; {peers} connected peer(s) are reachable only through a relay, which carries no content (a relay is a meeting point: blocks wait for a direct connection, which hole punching could not make — both sides behind symmetric NATs? Forward a port to one of the nodes, or run one where it is reachable)")]
    RelayedOnly {
        /// Why bitswap gave up.
        error: crate::bitswap::WantError,
        /// How many connected peers are reachable only through a relay.
        peers: usize,
    },
    /// The block was stored but cannot be read back.
    #[error("block {0} arrived but cannot be read back from the store")]
    Store(Cid),
    /// The node's task has ended.
    #[error("the node has stopped")]
    Stopped,
}

/// Reads blocks from the store and fetches missing ones over bitswap, all in one session.
/// Dropping it ends the session.
#[derive(Clone)]
pub struct NetworkBlocks {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    client: Client,
    session: SessionId,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.client.content().close_session(self.session);
    }
}

impl NetworkBlocks {
    /// Opens a bitswap session for one operation (a `cat`, a `get`, a `pin add`).
    pub async fn new(store: Store, client: Client) -> Result<Self, FetchError> {
        let session = client.content().new_session().await.map_err(|_| FetchError::Stopped)?;
        Ok(NetworkBlocks { inner: Arc::new(Inner { store, client, session }) })
    }
}

/// Reads every block of the DAG under `root` through `source` (so a network source stores
/// them), up to `parallel` blocks at once. Returns the number of blocks in the DAG.
pub async fn fetch_dag<S: BlockSource + Clone>(source: &S, root: Cid, parallel: usize) -> Result<u64, UnixfsError> {
    let mut seen = HashSet::new();
    let mut pending = vec![root];
    let mut in_flight = FuturesUnordered::new();
    let mut count = 0u64;
    seen.insert(root);
    loop {
        while in_flight.len() < parallel.max(1) {
            let Some(cid) = pending.pop() else { break };
            let fetch = source.get(cid);
            in_flight.push(async move { fetch.await.map(|data| (cid, data)) });
        }
        let Some(result) = in_flight.next().await else { break };
        let (cid, data) = result?;
        count += 1;
        for link in unixfs::links(&cid, &data)? {
            if seen.insert(link) {
                pending.push(link);
            }
        }
    }
    Ok(count)
}

impl BlockSource for NetworkBlocks {
    fn get(&self, cid: Cid) -> BoxFuture<'static, Result<Bytes, UnixfsError>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            if let Some(data) = inner.store.get_block(&cid)? {
                return Ok(data);
            }
            inner.client.content().fetch_block(cid, inner.session).await.map_err(|e| UnixfsError::Source(e.to_string()))?;
            inner.store.get_block(&cid)?.ok_or(UnixfsError::BlockNotFound(cid))
        })
    }

    /// Every block comes out of the store, which bitswap fills only with blocks whose bytes
    /// hash to their CID (computed from the bytes as they arrive).
    fn checked(&self) -> bool {
        true
    }
}
