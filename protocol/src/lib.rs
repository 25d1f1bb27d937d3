//! Kubelt node library.
//!
//! A Kubelt node joins a libp2p swarm, finds other Kubelt nodes over Kademlia
//! (`/kubelt/kad/1.0.0`), exchanges content with bitswap (wire-compatible with Kubo) and syncs
//! cores (wallet-owned Automerge documents) over gossipsub with request-response catch-up.
//!
//! - [`store`]: RocksDB with one column family per kind of record.
//! - [`swarm`]: the composed `NetworkBehaviour` and how the swarm is built from a [`swarm::Config`].
//! - [`node`]: the one task that owns the swarm, and the [`node::Client`] handle that talks to it.
//! - [`unixfs`], [`car`]: Kubo-compatible DAGs of files and directories, CAR v1.
//! - [`bitswap`]: `/ipfs/bitswap/1.2.0`, wire-compatible with Kubo.
//! - [`core`]: wallet-owned cores: delegations, signed changes, Automerge replicas (no I/O).
//! - [`sync`]: cores on the network: gossipsub topics and `/kubelt/core-sync/1.0.0`.
//! - [`dht_store`]: the DHT's provider records, bounded per remote provider.
//! - [`dht_routing`]: who enters and leaves the DHT's routing table.
//! - [`nat`]: nodes behind NAT: AutoNAT verdicts, relay reservations, hole punching.

pub mod bitswap;
pub mod codec;
pub mod dht_store;
pub mod dht_routing;
pub mod store;
pub mod swarm;
pub mod node;
pub mod unixfs;
pub mod car;
pub mod core;
pub mod sync;
pub mod msg;
pub mod nat;
#[doc(hidden)]
pub mod testing;

/// Locks a mutex whose holders leave its data whole between statements (bookkeeping, spare
/// buffers, counters): a panic in one holder does not poison it for the others.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
