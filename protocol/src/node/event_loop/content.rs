//! The event loop's content part: bitswap fetches for the [`ContentClient`](crate::node::ContentClient)
//! and the provider records that find blocks' holders.

use std::collections::HashMap;

use cid::Cid;
use libp2p::{kad, PeerId};
use tokio::sync::oneshot;

use super::{EventLoop, QueryPurpose};
use crate::bitswap;
use crate::node::client::ContentCommand;
use crate::node::content::FetchError;

/// What the event loop tracks for content.
#[derive(Default)]
pub(super) struct Content {
    /// `fetch_block` calls waiting for their block.
    pending_fetches: HashMap<Cid, Vec<oneshot::Sender<Result<(), FetchError>>>>,
    /// Wanted blocks received over bitswap from each connected peer.
    blocks_from: HashMap<PeerId, u64>,
}

impl Content {
    /// Wanted blocks received from `peer` since it connected.
    pub(super) fn blocks_from(&self, peer: &PeerId) -> u64 {
        self.blocks_from.get(peer).copied().unwrap_or(0)
    }

    pub(super) fn peer_gone(&mut self, peer: &PeerId) {
        self.blocks_from.remove(peer);
    }
}

impl EventLoop {
    pub(super) fn on_content_command(&mut self, command: ContentCommand) {
        match command {
            ContentCommand::NewSession { reply } => {
                let _ = reply.send(self.swarm.behaviour_mut().bitswap.new_session());
            }
            ContentCommand::CloseSession { session } => self.swarm.behaviour_mut().bitswap.close_session(session),
            ContentCommand::FetchBlock { cid, session, reply } => {
                let first = !self.content.pending_fetches.contains_key(&cid);
                self.content.pending_fetches.entry(cid).or_default().push(reply);
                if first {
                    self.swarm.behaviour_mut().bitswap.want([cid], Some(session));
                }
            }
            ContentCommand::Provide { cid } => {
                self.provide(kad::RecordKey::new(&cid.hash().to_bytes()));
            }
            ContentCommand::BlocksAdded { cids } => self.swarm.behaviour_mut().bitswap.notify_new_blocks(cids),
        }
    }

    pub(super) fn on_bitswap_event(&mut self, event: bitswap::Event) {
        match event {
            bitswap::Event::BlockReceived { cid, from, .. } => {
                // One event per session that wanted the block: count the block once, with its
                // first event (the one that finds the waiters).
                let Some(waiters) = self.content.pending_fetches.remove(&cid) else { return };
                if let Some(peer) = from.filter(|p| self.net.is_connected(p)) {
                    *self.content.blocks_from.entry(peer).or_default() += 1;
                }
                for waiter in waiters {
                    let _ = waiter.send(Ok(()));
                }
            }
            bitswap::Event::NotFound { cid, error, .. } => {
                let relayed = self.net.relayed_only_peers();
                for waiter in self.content.pending_fetches.remove(&cid).unwrap_or_default() {
                    let error = error.clone();
                    let _ = waiter.send(Err(if relayed > 0 { FetchError::RelayedOnly { error, peers: relayed } } else { FetchError::Want(error) }));
                }
            }
            bitswap::Event::FindProviders { cid, .. } => {
                if self.queries.values().any(|q| matches!(q, QueryPurpose::BlockProviders(c) if *c == cid)) {
                    return;
                }
                let key = kad::RecordKey::new(&cid.hash().to_bytes());
                let query = self.swarm.behaviour_mut().kad.get_providers(key);
                self.queries.insert(query, QueryPurpose::BlockProviders(cid));
            }
            bitswap::Event::PeerMisbehaved { peer, reason } => {
                tracing::warn!(%peer, "disconnecting a peer that sent bad blocks: {reason}");
                let _ = self.swarm.disconnect_peer_id(peer);
            }
        }
    }

    /// Dials providers found for a wanted block; bitswap asks them once connected.
    pub(super) fn on_block_providers(&mut self, cid: Cid, result: kad::GetProvidersResult) {
        if let Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) = result {
            let dialed = self.dial_found(providers);
            if dialed > 0 {
                tracing::debug!(%cid, providers = dialed, "dialing providers");
            }
        }
    }
}
