//! The peer book: peers this node has talked to, kept in the `peers` column so that a node that
//! restarts can rejoin the network through them even when no bootstrap peer is reachable.

use std::time::{SystemTime, UNIX_EPOCH};

use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

use crate::store::{Column, Store, StoreError};

/// Most addresses remembered per peer.
const MAX_ADDRESSES_PER_PEER: usize = 8;

/// Most peers remembered; the least recently seen are forgotten beyond this.
pub(crate) const MAX_KNOWN_PEERS: usize = 2048;

/// A remembered peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownPeer {
    /// The peer.
    #[serde(with = "peer_id_string")]
    pub peer_id: PeerId,
    /// Addresses it was reached at or announced.
    pub addresses: Vec<Multiaddr>,
    /// Unix seconds of the last time we were connected.
    pub last_seen: u64,
}

/// Reads and writes [`KnownPeer`]s.
#[derive(Debug, Clone)]
pub struct PeerBook {
    store: Store,
}

impl PeerBook {
    /// The peer book kept in `store`.
    pub fn new(store: Store) -> Self {
        PeerBook { store }
    }

    /// Remembers addresses of a peer (merged with what is known, newest first).
    pub fn remember(&self, peer_id: PeerId, addresses: impl IntoIterator<Item = Multiaddr>) -> Result<(), StoreError> {
        let key = peer_id.to_bytes();
        let mut known = self.get(&peer_id)?.unwrap_or(KnownPeer { peer_id, addresses: vec![], last_seen: 0 });
        let mut merged: Vec<Multiaddr> = addresses.into_iter().collect();
        for old in known.addresses.drain(..) {
            if !merged.contains(&old) {
                merged.push(old);
            }
        }
        merged.truncate(MAX_ADDRESSES_PER_PEER);
        known.addresses = merged;
        known.last_seen = now_secs();
        let value = serde_json::to_vec(&known).map_err(|e| corrupt(e.to_string()))?;
        self.store.put(Column::Peers, &key, &value)
    }

    /// One remembered peer.
    pub fn get(&self, peer_id: &PeerId) -> Result<Option<KnownPeer>, StoreError> {
        match self.store.get(Column::Peers, &peer_id.to_bytes())? {
            None => Ok(None),
            Some(value) => serde_json::from_slice(&value).map(Some).map_err(|e| corrupt(e.to_string())),
        }
    }

    /// Every remembered peer, most recently seen first. Undecodable records are skipped with a
    /// warning rather than failing the start-up.
    pub fn all(&self) -> Result<Vec<KnownPeer>, StoreError> {
        let mut peers = Vec::new();
        for entry in self.store.iter(Column::Peers) {
            let (_, value) = entry?;
            match serde_json::from_slice::<KnownPeer>(&value) {
                Ok(peer) => peers.push(peer),
                Err(e) => tracing::warn!("skipping unreadable peer record: {e}"),
            }
        }
        peers.sort_by_key(|p| std::cmp::Reverse(p.last_seen));
        Ok(peers)
    }
}

impl PeerBook {
    /// Forgets all but the `keep` most recently seen peers, so that churn (or a flood of
    /// identities) cannot grow the book without bound. Returns how many were forgotten.
    pub fn prune(&self, keep: usize) -> Result<usize, StoreError> {
        let peers = self.all()?;
        let mut forgotten = 0;
        for peer in peers.iter().skip(keep) {
            self.store.delete_sync(Column::Peers, &peer.peer_id.to_bytes())?;
            forgotten += 1;
        }
        Ok(forgotten)
    }
}

fn corrupt(reason: String) -> StoreError {
    StoreError::Corrupt { column: Column::Peers.name(), reason }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

mod peer_id_string {
    use libp2p::PeerId;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(peer_id: &PeerId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&peer_id.to_base58())
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PeerId, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_peers_merge_addresses_and_survive_reopen() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let peer = PeerId::random();
        let a: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse()?;
        let b: Multiaddr = "/ip4/127.0.0.1/udp/2/quic-v1".parse()?;
        {
            let book = PeerBook::new(Store::open(dir.path())?);
            book.remember(peer, [a.clone()])?;
            book.remember(peer, [b.clone(), a.clone()])?;
        }
        let book = PeerBook::new(Store::open(dir.path())?);
        let all = book.all()?;
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].addresses, vec![b, a]);
        Ok(())
    }

    #[test]
    fn pruning_keeps_the_most_recently_seen_peers() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let book = PeerBook::new(Store::open(dir.path())?);
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse()?;
        let mut peers = Vec::new();
        for i in 0..10u64 {
            let peer = PeerId::random();
            let record = KnownPeer { peer_id: peer, addresses: vec![addr.clone()], last_seen: 1000 + i };
            book.store.put(Column::Peers, &peer.to_bytes(), &serde_json::to_vec(&record)?)?;
            peers.push(peer);
        }
        assert_eq!(book.prune(4)?, 6);
        let kept: Vec<PeerId> = book.all()?.into_iter().map(|p| p.peer_id).collect();
        assert_eq!(kept, peers[6..].iter().rev().copied().collect::<Vec<_>>());
        assert_eq!(book.prune(4)?, 0);
        Ok(())
    }
}
