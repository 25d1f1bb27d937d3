//! Who enters and who leaves the Kubelt DHT's routing table (`/kubelt/kad/1.0.0`).
//!
//! Spec: libp2p Kademlia (<https://github.com/libp2p/specs/blob/master/kad-dht/README.md>),
//! Kademlia's k-buckets (Maymounkov and Mazières, 2002, §2.2): a full bucket keeps its old
//! entries, which have stayed up longest.
//!
//! libp2p-kad enforces that rule with a liveness dial: when a new peer would enter a full
//! bucket, it dials the bucket's least recently seen entry that is not connected, and puts the
//! newcomer in its place only if that entry is still unreachable a minute later. On this node
//! that dial is nearly always wasted:
//! - connections close after the idle timeout, so "not connected" says nothing about whether
//!   an entry is alive: almost every entry of a full bucket is one;
//! - every DHT query of a newcomer reaches ~20–40 nodes, and in each of them the newcomer falls
//!   into a full bucket (in a 1,000-node network, the far buckets are all full): each answer
//!   cost one more connection and Noise handshake, to a peer that was fine. The simulation
//!   (kubelt-sim, 1,000 nodes) counted ~1,400 connections per node for the join, and the join
//!   dominated the run's CPU.
//!
//! So inserts are manual (`BucketInserts::Manual`) and follow two rules:
//! - a peer that says it serves the DHT (identify) enters the table when its bucket has room,
//!   or updates its entry if it has one; a full bucket keeps its entries, without a dial;
//! - a peer that could not be dialed (every address failed, or another peer answered there)
//!   leaves the table, as go-libp2p-kad-dht drops a peer that fails a query's dial. libp2p-kad
//!   keeps such a peer with its last address (it is only replaced through the liveness dial
//!   above), so without this rule a node that left the network stayed in the tables and every
//!   query kept asking it.

use libp2p::kad::{self, store::RecordStore, K_VALUE};
use libp2p::swarm::DialError;
use libp2p::PeerId;

/// Whether `peer` may enter the routing table without displacing anyone: it has an entry
/// already, or its bucket has room. (Nobody is admitted in the local node's own place.)
pub fn admits<S: RecordStore + Send + 'static>(kad: &mut kad::Behaviour<S>, peer: &PeerId) -> bool {
    let Some(bucket) = kad.kbucket(*peer) else { return false };
    bucket.num_entries() < K_VALUE.get() || bucket.iter().any(|entry| entry.node.key.preimage() == peer)
}

/// Whether a failed dial shows that the peer is not at any address we know: every address
/// failed at the transport (refused, unreachable, timed out, handshake failed), or another
/// peer answered there. Our own limits and a dial that was not needed say nothing about it.
pub fn shows_unreachable(error: &DialError) -> bool {
    matches!(error, DialError::Transport(_) | DialError::WrongPeerId { .. })
}

#[cfg(test)]
mod tests {
    use libp2p::identity::Keypair;
    use libp2p::kad::store::MemoryStore;
    use libp2p::kad::KBucketKey;
    use libp2p::Multiaddr;

    use super::*;

    fn kad(local: PeerId) -> kad::Behaviour<MemoryStore> {
        kad::Behaviour::new(local, MemoryStore::new(local))
    }

    /// `n` peers in bucket `bucket` of `local`'s table (their distance's highest set bit).
    fn peers_in_bucket(local: PeerId, bucket: u32, n: usize) -> Vec<PeerId> {
        let local_key = KBucketKey::from(local);
        std::iter::repeat_with(|| Keypair::generate_ed25519().public().to_peer_id())
            .filter(|p| local_key.distance(&KBucketKey::from(*p)).ilog2() == Some(bucket))
            .take(n)
            .collect()
    }

    #[test]
    fn a_full_bucket_admits_its_own_entries_and_no_one_else() {
        let local = Keypair::generate_ed25519().public().to_peer_id();
        let mut kad = kad(local);
        let peers = peers_in_bucket(local, 255, K_VALUE.get() + 1);
        let addr: Multiaddr = "/memory/1".parse().expect("an address");
        for peer in &peers[..K_VALUE.get()] {
            assert!(admits(&mut kad, peer), "the bucket has room");
            assert!(matches!(kad.add_address(peer, addr.clone()), kad::RoutingUpdate::Success));
        }
        let newcomer = peers[K_VALUE.get()];
        assert!(!admits(&mut kad, &newcomer), "a full bucket keeps its entries");
        assert!(peers[..K_VALUE.get()].iter().all(|p| admits(&mut kad, p)), "an entry may update its addresses");
        assert!(!admits(&mut kad, &local), "no entry in the local node's place");
        // Another bucket still has room.
        let near = peers_in_bucket(local, 254, 1);
        assert!(admits(&mut kad, &near[0]));
    }

    #[test]
    fn only_failures_at_the_peer_count_as_unreachable() {
        let peer = Keypair::generate_ed25519().public().to_peer_id();
        let addr: Multiaddr = "/memory/1".parse().expect("an address");
        assert!(shows_unreachable(&DialError::Transport(vec![(addr.clone(), libp2p::TransportError::MultiaddrNotSupported(addr.clone()))])));
        assert!(shows_unreachable(&DialError::WrongPeerId { obtained: peer, address: addr.clone() }));
        assert!(!shows_unreachable(&DialError::NoAddresses));
        assert!(!shows_unreachable(&DialError::Aborted));
        assert!(!shows_unreachable(&DialError::DialPeerConditionFalse(libp2p::swarm::dial_opts::PeerCondition::Disconnected)));
    }
}
