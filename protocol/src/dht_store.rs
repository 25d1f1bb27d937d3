//! The record store of the Kubelt DHT (`/kubelt/kad/1.0.0`): provider records only, bounded
//! per remote provider, and never at the expense of this node's own.
//!
//! Spec: libp2p Kademlia (<https://github.com/libp2p/specs/blob/master/kad-dht/README.md>),
//! `ADD_PROVIDER` / `GET_PROVIDERS`. The node uses the DHT for provider records alone (cores'
//! replicas, content's providers); it stores no value records (`PUT_VALUE` is refused).
//!
//! libp2p's `MemoryStore` counts every key, ours and other peers', against one limit
//! (`max_provided_keys`, 1,024 by default). A DHT server that stored 1,024 keys of others could
//! then no longer provide a core of its own, and one peer could fill that table by itself. Here:
//! - this node's own provider records are never refused for room (their number is the node's
//!   own choice: the cores it holds, the content it pins);
//! - other peers' records are bounded in all ([`Limits::remote_records`]) and per provider
//!   ([`Limits::per_provider`]): one peer cannot take the table from the others; what is over
//!   a limit is refused (not evicted), as Kademlia's own Sybil defence does for full keys;
//! - a record keeps at most [`Limits::addresses`] addresses.
//!
//! Kademlia accepts a provider record only from the provider itself (`libp2p-kad` drops one
//! whose provider is not the sending peer), so counting per provider is counting per peer.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};

use libp2p::kad::store::{self, MemoryStore, MemoryStoreConfig, RecordStore};
use libp2p::kad::{ProviderRecord, Record, RecordKey};
use libp2p::PeerId;

/// Bounds of other peers' provider records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Provider records of other peers, in all (a record is one key × one provider).
    pub remote_records: usize,
    /// Provider records of one other peer.
    pub per_provider: usize,
    /// Providers kept per key (Kademlia's replication factor).
    pub providers_per_key: usize,
    /// Addresses kept per record.
    pub addresses: usize,
}

impl Default for Limits {
    /// 65,536 records of others (~20 MB at most with their addresses); 4,096 per provider, so
    /// a community node hosting thousands of cores is still stored by the servers closest to
    /// them; 20 providers per key; 16 addresses per record.
    fn default() -> Self {
        Limits { remote_records: 65_536, per_provider: 4_096, providers_per_key: 20, addresses: 16 }
    }
}

/// The DHT record store of a Kubelt node (see the module doc).
pub struct DhtStore {
    local: PeerId,
    inner: MemoryStore,
    limits: Limits,
    /// Other peers' provider records, by provider.
    remote_by_provider: HashMap<PeerId, usize>,
    remote_total: usize,
}

impl DhtStore {
    /// A store for the node `local`.
    pub fn new(local: PeerId, limits: Limits) -> Self {
        let config = MemoryStoreConfig {
            // No value records: the node never puts one, and other peers' are refused in `put`.
            max_records: 0,
            max_value_bytes: 0,
            max_providers_per_key: limits.providers_per_key,
            // The bounds that matter are ours, above; never refuse our own keys for room.
            max_provided_keys: usize::MAX,
        };
        DhtStore { local, inner: MemoryStore::with_config(local, config), limits, remote_by_provider: HashMap::new(), remote_total: 0 }
    }

    /// Other peers' provider records held now, in all.
    pub fn remote_records(&self) -> usize {
        self.remote_total
    }

    /// Provider records of `provider` held now.
    pub fn records_of(&self, provider: &PeerId) -> usize {
        self.remote_by_provider.get(provider).copied().unwrap_or(0)
    }

    fn holds(&self, key: &RecordKey, provider: &PeerId) -> bool {
        self.inner.providers(key).iter().any(|p| p.provider == *provider)
    }

    fn forget_one(&mut self, provider: &PeerId) {
        if let Some(n) = self.remote_by_provider.get_mut(provider) {
            *n -= 1;
            self.remote_total -= 1;
            if *n == 0 {
                self.remote_by_provider.remove(provider);
            }
        }
    }
}

impl RecordStore for DhtStore {
    type RecordsIter<'a> = <MemoryStore as RecordStore>::RecordsIter<'a>;
    type ProvidedIter<'a> = <MemoryStore as RecordStore>::ProvidedIter<'a>;

    fn get(&self, k: &RecordKey) -> Option<Cow<'_, Record>> {
        self.inner.get(k)
    }

    fn put(&mut self, _r: Record) -> store::Result<()> {
        Err(store::Error::MaxRecords)
    }

    fn remove(&mut self, k: &RecordKey) {
        self.inner.remove(k)
    }

    fn records(&self) -> Self::RecordsIter<'_> {
        self.inner.records()
    }

    fn add_provider(&mut self, mut record: ProviderRecord) -> store::Result<()> {
        record.addresses.truncate(self.limits.addresses);
        if record.provider == self.local {
            return self.inner.add_provider(record);
        }
        let provider = record.provider;
        let key = record.key.clone();
        if self.holds(&key, &provider) {
            // A refresh of a record already counted.
            return self.inner.add_provider(record);
        }
        if self.remote_total >= self.limits.remote_records || self.records_of(&provider) >= self.limits.per_provider {
            return Err(store::Error::MaxProvidedKeys);
        }
        self.inner.add_provider(record)?;
        // A key already holding its share of providers ignores a new one: count what was kept.
        if self.holds(&key, &provider) {
            *self.remote_by_provider.entry(provider).or_default() += 1;
            self.remote_total += 1;
        }
        Ok(())
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        self.inner.providers(key)
    }

    fn provided(&self) -> Self::ProvidedIter<'_> {
        self.inner.provided()
    }

    fn remove_provider(&mut self, k: &RecordKey, p: &PeerId) {
        let counted = *p != self.local && self.holds(k, p);
        self.inner.remove_provider(k, p);
        if counted {
            self.forget_one(p);
        }
    }
}

/// This node's provider announcements, paced: each starts a Kademlia query that contacts ~20
/// peers, and a node holding 10,000 cores must not start 10,000 of them in one turn of the
/// swarm task (at start-up, or when a relay reservation gives it a new address). A key is
/// queued once however often it is asked for; [`ProvideQueue::take`] hands out at most
/// `per_tick` keys per [`ProvideQueue::tick`].
#[derive(Debug)]
pub struct ProvideQueue {
    queue: VecDeque<RecordKey>,
    queued: HashSet<RecordKey>,
    per_tick: usize,
    taken: usize,
}

impl ProvideQueue {
    /// A queue handing out `per_tick` keys per tick.
    pub fn new(per_tick: usize) -> Self {
        ProvideQueue { queue: VecDeque::new(), queued: HashSet::new(), per_tick, taken: 0 }
    }

    /// Asks for `key` to be provided (again); nothing if it is already waiting.
    pub fn push(&mut self, key: RecordKey) {
        if self.queued.insert(key.clone()) {
            self.queue.push_back(key);
        }
    }

    /// The keys to provide now, within what is left of this tick's share.
    pub fn take(&mut self) -> Vec<RecordKey> {
        let n = self.per_tick.saturating_sub(self.taken).min(self.queue.len());
        self.taken += n;
        let keys: Vec<RecordKey> = self.queue.drain(..n).collect();
        for key in &keys {
            self.queued.remove(key);
        }
        keys
    }

    /// A new tick: a new share.
    pub fn tick(&mut self) {
        self.taken = 0;
    }

    /// Keys waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether no key waits.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::Multiaddr;
    use proptest::prelude::*;

    fn key(i: u32) -> RecordKey {
        RecordKey::new(&format!("key-{i}"))
    }

    fn record(i: u32, provider: PeerId) -> ProviderRecord {
        ProviderRecord::new(key(i), provider, vec!["/ip4/127.0.0.1/tcp/1".parse::<Multiaddr>().expect("addr")])
    }

    fn small() -> Limits {
        Limits { remote_records: 10, per_provider: 4, providers_per_key: 3, addresses: 2 }
    }

    #[test]
    fn one_peer_cannot_fill_the_table_and_ours_always_fit() {
        let local = PeerId::random();
        let mut store = DhtStore::new(local, small());
        let flooder = PeerId::random();
        for i in 0..100 {
            let _ = store.add_provider(record(i, flooder));
        }
        assert_eq!(store.records_of(&flooder), 4, "one provider holds at most its share");
        // Others still get in, up to the total.
        for n in 0..10 {
            let other = PeerId::random();
            for i in 0..2 {
                let _ = store.add_provider(record(1000 + n * 10 + i, other));
            }
        }
        assert_eq!(store.remote_records(), 10);
        assert!(store.add_provider(record(5000, PeerId::random())).is_err(), "the table is full for others");
        // Our own records are never refused for room (the old store refused past 1,024 keys).
        for i in 0..2_000 {
            store.add_provider(record(10_000 + i, local)).expect("our own record");
        }
        assert_eq!(store.provided().count(), 2_000);
        assert_eq!(store.remote_records(), 10, "our records are not counted as others'");
    }

    #[test]
    fn refreshes_and_removals_keep_the_counts_true() {
        let local = PeerId::random();
        let mut store = DhtStore::new(local, small());
        let peer = PeerId::random();
        for _ in 0..10 {
            store.add_provider(record(1, peer)).expect("refresh");
        }
        assert_eq!(store.records_of(&peer), 1, "a refresh is not a new record");
        store.remove_provider(&key(1), &peer);
        store.remove_provider(&key(1), &peer);
        assert_eq!((store.records_of(&peer), store.remote_records()), (0, 0));
        // A key with its share of providers ignores another one, which is then not counted.
        for _ in 0..3 {
            store.add_provider(record(2, PeerId::random())).expect("room");
        }
        let late = PeerId::random();
        store.add_provider(record(2, late)).expect("ignored, not refused");
        assert_eq!(store.records_of(&late), 0);
        assert_eq!(store.remote_records(), 3);
    }

    #[test]
    fn value_records_are_refused_and_addresses_are_capped() {
        let local = PeerId::random();
        let mut store = DhtStore::new(local, small());
        assert!(store.put(Record::new(key(1), vec![1, 2, 3])).is_err());
        let peer = PeerId::random();
        let many: Vec<Multiaddr> = (0..50).map(|p| format!("/ip4/10.0.0.1/tcp/{p}").parse().expect("addr")).collect();
        store.add_provider(ProviderRecord::new(key(3), peer, many)).expect("stored");
        assert_eq!(store.providers(&key(3))[0].addresses.len(), 2);
    }

    #[test]
    fn announcements_are_paced_and_queued_once() {
        let mut queue = ProvideQueue::new(3);
        for i in 0..10 {
            queue.push(key(i));
            queue.push(key(i));
        }
        assert_eq!(queue.len(), 10, "a key waits once");
        assert_eq!(queue.take(), vec![key(0), key(1), key(2)]);
        assert!(queue.take().is_empty(), "the tick's share is spent");
        queue.tick();
        assert_eq!(queue.take().len(), 3);
        // A key handed out can be asked for again (a new address to announce).
        queue.push(key(0));
        queue.tick();
        let next = queue.take();
        assert_eq!(next, vec![key(6), key(7), key(8)]);
        queue.tick();
        assert_eq!(queue.take(), vec![key(9), key(0)]);
        assert!(queue.is_empty());
    }

    proptest! {
        /// Whatever the sequence of adds and removals from a few peers, the counts match what
        /// the store holds and never pass the limits.
        #[test]
        fn counts_match_the_records_held(ops in proptest::collection::vec((0u8..4, 0u32..12, any::<bool>()), 0..200)) {
            let local = PeerId::random();
            let peers: Vec<PeerId> = (0..4).map(|_| PeerId::random()).collect();
            let mut store = DhtStore::new(local, small());
            for (p, k, add) in ops {
                let peer = peers[p as usize];
                if add {
                    let _ = store.add_provider(record(k, peer));
                } else {
                    store.remove_provider(&key(k), &peer);
                }
                for peer in &peers {
                    let held = (0..12).filter(|k| store.providers(&key(*k)).iter().any(|r| r.provider == *peer)).count();
                    prop_assert_eq!(held, store.records_of(peer));
                    prop_assert!(held <= small().per_provider);
                }
                prop_assert!(store.remote_records() <= small().remote_records);
            }
        }
    }
}
