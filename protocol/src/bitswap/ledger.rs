//! The serving side: what every peer wants from us, and which answer to send next.
//!
//! Semantics follow boxo's decision engine:
//! - want-block: send the block when we have it; otherwise DONT_HAVE if the peer asked for it,
//!   and keep the want so the block goes out as soon as we get it.
//! - want-have: answer HAVE (the want is then done) or DONT_HAVE (the want stays, and a HAVE
//!   follows when we get the block).
//! - a want-have never downgrades a pending want-block; cancel removes; a `full` wantlist
//!   replaces the previous one.
//!
//! No I/O: the answers are built from look-ups ([`Found`]) that the behaviour makes on a
//! blocking thread for the wants [`Ledger::to_look_up`] names, or straight through the
//! [`BlockStore`] trait ([`Ledger::next_message`]), with which the decisions are tested on an
//! in-memory store. Wants are keyed by multihash, as the store is: a CIDv0 and a CIDv1 of the
//! same bytes are one want.

use std::collections::{HashMap, HashSet, VecDeque};

use bytes::Bytes;
use cid::Cid;
use libp2p::PeerId;

use super::message::{Message, Presence, WantType, WantlistEntry, BLOCK_OVERHEAD, CID_OVERHEAD};
use crate::store::{Block, BlockStore};

type Mh = cid::multihash::Multihash<64>;

#[derive(Debug, Clone)]
struct Entry {
    cid: Cid,
    want_type: WantType,
    send_dont_have: bool,
    /// The CID is in the peer's task queue.
    queued: bool,
    /// We already told the peer we lack it; say nothing more until we get it.
    dont_have_sent: bool,
}

#[derive(Debug, Default)]
struct PeerLedger {
    wants: HashMap<Mh, Entry>,
    /// Wants to look at, in arrival order; the answer is decided when the message is built.
    queue: VecDeque<Mh>,
    /// A block read for the previous message that did not fit in it.
    stash: Option<Block>,
}

/// What the store said about a wanted block.
#[derive(Debug, Clone)]
pub(crate) enum Found {
    /// For a want-block: the bytes, or `None` when the block is not stored (or unreadable).
    Block(Option<Bytes>),
    /// For a want-have: whether it is stored.
    Have(bool),
}

impl Found {
    /// Looks up what a want of `want_type` needs; store errors are logged and count as missing.
    pub(crate) fn look_up(store: &dyn BlockStore, cid: &Cid, want_type: WantType) -> Found {
        match want_type {
            WantType::Block => Found::Block(store.get_block(cid).unwrap_or_else(|e| {
                tracing::warn!(%cid, error = %e, "cannot read block to serve");
                None
            })),
            WantType::Have => Found::Have(store.has_block(cid).unwrap_or_else(|e| {
                tracing::warn!(%cid, error = %e, "cannot check block");
                false
            })),
        }
    }

    /// Bytes this look-up brought in.
    pub(crate) fn bytes(&self) -> usize {
        match self {
            Found::Block(Some(data)) => data.len(),
            _ => 0,
        }
    }
}

/// What one built message carries, for the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Built {
    pub blocks: usize,
    pub block_bytes: usize,
    pub haves: usize,
    pub dont_haves: usize,
}

/// Every connected peer's wantlist and pending answers.
#[derive(Debug)]
pub(crate) struct Ledger {
    peers: HashMap<PeerId, PeerLedger>,
    /// Which peers want a multihash, to answer them when the block arrives later.
    wanted_by: HashMap<Mh, HashSet<PeerId>>,
    max_entries_per_peer: usize,
}

impl Ledger {
    /// A ledger that keeps at most `max_entries_per_peer` wants per peer (extra ones are ignored).
    pub(crate) fn new(max_entries_per_peer: usize) -> Self {
        Ledger { peers: HashMap::new(), wanted_by: HashMap::new(), max_entries_per_peer }
    }

    /// Applies a received wantlist. Returns how many entries were dropped because the peer's
    /// wantlist is full.
    pub(crate) fn receive_wantlist(&mut self, peer: PeerId, full: bool, entries: &[WantlistEntry]) -> usize {
        let ledger = self.peers.entry(peer).or_default();
        if full {
            let keep: HashSet<Mh> = entries.iter().filter(|e| !e.cancel).map(|e| *e.cid.hash()).collect();
            let gone: Vec<Mh> = ledger.wants.keys().filter(|mh| !keep.contains(*mh)).copied().collect();
            for mh in gone {
                ledger.wants.remove(&mh);
                unindex(&mut self.wanted_by, &mh, &peer);
            }
        }
        let mut dropped = 0;
        for e in entries {
            let mh = *e.cid.hash();
            if e.cancel {
                if ledger.wants.remove(&mh).is_some() {
                    unindex(&mut self.wanted_by, &mh, &peer);
                }
                continue;
            }
            match ledger.wants.get_mut(&mh) {
                Some(entry) => {
                    // A want-have does not downgrade a want-block.
                    if e.want_type == WantType::Block && entry.want_type == WantType::Have {
                        entry.want_type = WantType::Block;
                        entry.dont_have_sent = false;
                    }
                    entry.send_dont_have = e.send_dont_have;
                    entry.cid = e.cid;
                    // Re-check even after a DONT_HAVE: the block may have arrived by a path
                    // that did not call `blocks_added`. No second DONT_HAVE is sent.
                    if !entry.queued {
                        entry.queued = true;
                        ledger.queue.push_back(mh);
                    }
                }
                None => {
                    if ledger.wants.len() >= self.max_entries_per_peer {
                        dropped += 1;
                        continue;
                    }
                    ledger.wants.insert(
                        mh,
                        Entry { cid: e.cid, want_type: e.want_type, send_dont_have: e.send_dont_have, queued: true, dont_have_sent: false },
                    );
                    ledger.queue.push_back(mh);
                    self.wanted_by.entry(mh).or_default().insert(peer);
                }
            }
        }
        dropped
    }

    /// We got new blocks: queue an answer for every peer that wants them. Returns those peers.
    pub(crate) fn blocks_added<'a>(&mut self, cids: impl IntoIterator<Item = &'a Cid>) -> Vec<PeerId> {
        let mut woken = Vec::new();
        for cid in cids {
            let mh = cid.hash();
            let Some(peers) = self.wanted_by.get(mh) else { continue };
            for peer in peers {
                let Some(ledger) = self.peers.get_mut(peer) else { continue };
                let Some(entry) = ledger.wants.get_mut(mh) else { continue };
                entry.dont_have_sent = false;
                if !entry.queued {
                    entry.queued = true;
                    ledger.queue.push_back(*mh);
                }
                if !woken.contains(peer) {
                    woken.push(*peer);
                }
            }
        }
        woken
    }

    /// Whether an answer may be pending for `peer`.
    pub(crate) fn has_work(&self, peer: &PeerId) -> bool {
        self.peers.get(peer).is_some_and(|l| l.stash.is_some() || !l.queue.is_empty())
    }

    /// Forgets a disconnected peer (it sends its whole wantlist again when it reconnects).
    pub(crate) fn remove_peer(&mut self, peer: &PeerId) {
        if let Some(ledger) = self.peers.remove(peer) {
            for mh in ledger.wants.keys() {
                unindex(&mut self.wanted_by, mh, peer);
            }
        }
    }

    /// The CIDs `peer` currently wants from us.
    pub(crate) fn wantlist(&self, peer: &PeerId) -> Vec<(Cid, WantType)> {
        self.peers.get(peer).map(|l| l.wants.values().map(|e| (e.cid, e.want_type)).collect()).unwrap_or_default()
    }

    /// The wants the next answer for `peer` will look at, in order (at most `limit`): look them
    /// up, until their blocks reach the message's target, and hand the results to
    /// [`Ledger::next_message_from`].
    pub(crate) fn to_look_up(&self, peer: &PeerId, limit: usize) -> Vec<(Cid, WantType)> {
        let Some(ledger) = self.peers.get(peer) else { return Vec::new() };
        ledger.queue.iter().filter_map(|mh| ledger.wants.get(mh)).take(limit).map(|e| (e.cid, e.want_type)).collect()
    }

    /// Builds the next answer for `peer`, looking blocks up in `store` (see
    /// [`Ledger::next_message_from`]).
    #[cfg(test)]
    pub(crate) fn next_message(&mut self, peer: &PeerId, store: &dyn BlockStore, target: usize, max: usize) -> Option<(Message, Built)> {
        self.next_message_from(peer, &mut |cid, want_type| Some(Found::look_up(store, cid, want_type)), target, max)
    }

    /// Builds the next answer for `peer`: blocks, HAVEs and DONT_HAVEs in want order until the
    /// message reaches `target` bytes, never beyond `max` (a block that would cross `max` waits
    /// for the next message). Blocks larger than `max` can never be sent and are answered like
    /// missing ones. `found` gives what the store said of each want; where it knows nothing
    /// (the want came or changed after the look-ups), the message ends and the want stays first
    /// in line.
    pub(crate) fn next_message_from(
        &mut self,
        peer: &PeerId,
        found: &mut dyn FnMut(&Cid, WantType) -> Option<Found>,
        target: usize,
        max: usize,
    ) -> Option<(Message, Built)> {
        let ledger = self.peers.get_mut(peer)?;
        let mut msg = Message::default();
        let mut built = Built::default();
        let mut size = 16usize;
        let max_block = max.saturating_sub(1024);

        if let Some(block) = ledger.stash.take() {
            size += block.data.len() + BLOCK_OVERHEAD;
            built.blocks += 1;
            built.block_bytes += block.data.len();
            msg.blocks.push(block);
        }
        while size < target {
            let Some(&mh) = ledger.queue.front() else { break };
            let Some(entry) = ledger.wants.get_mut(&mh) else {
                ledger.queue.pop_front();
                continue;
            };
            let cid = entry.cid;
            let Some(answer) = found(&cid, entry.want_type) else { break };
            ledger.queue.pop_front();
            entry.queued = false;
            match (entry.want_type, answer) {
                (WantType::Block, Found::Have(_)) => {
                    // Upgraded to a want-block after the look-up: looked up again next time.
                    entry.queued = true;
                    ledger.queue.push_front(mh);
                    break;
                }
                (WantType::Block, Found::Block(data)) => {
                    let data = match data {
                        Some(data) if data.len() > max_block => {
                            tracing::warn!(%cid, size = data.len(), "block too large for a bitswap message");
                            None
                        }
                        data => data,
                    };
                    match data {
                        Some(data) => {
                            ledger.wants.remove(&mh);
                            unindex(&mut self.wanted_by, &mh, peer);
                            let block = Block { cid, data: Bytes::clone(&data) };
                            if size + data.len() + BLOCK_OVERHEAD > max && !msg.is_empty() {
                                ledger.stash = Some(block);
                                break;
                            }
                            size += data.len() + BLOCK_OVERHEAD;
                            built.blocks += 1;
                            built.block_bytes += data.len();
                            msg.blocks.push(block);
                        }
                        None => {
                            if entry.send_dont_have && !entry.dont_have_sent {
                                entry.dont_have_sent = true;
                                size += CID_OVERHEAD;
                                built.dont_haves += 1;
                                msg.presences.push((cid, Presence::DontHave));
                            } else {
                                entry.dont_have_sent = true;
                            }
                        }
                    }
                }
                (WantType::Have, answer) => {
                    let have = match answer {
                        Found::Have(have) => have,
                        Found::Block(data) => data.is_some(),
                    };
                    if have {
                        ledger.wants.remove(&mh);
                        unindex(&mut self.wanted_by, &mh, peer);
                        size += CID_OVERHEAD;
                        built.haves += 1;
                        msg.presences.push((cid, Presence::Have));
                    } else {
                        if entry.send_dont_have && !entry.dont_have_sent {
                            size += CID_OVERHEAD;
                            built.dont_haves += 1;
                            msg.presences.push((cid, Presence::DontHave));
                        }
                        entry.dont_have_sent = true;
                    }
                }
            }
        }
        if ledger.wants.is_empty() && ledger.queue.is_empty() && ledger.stash.is_none() {
            self.peers.remove(peer);
        }
        (!msg.is_empty()).then_some((msg, built))
    }
}

fn unindex(index: &mut HashMap<Mh, HashSet<PeerId>>, mh: &Mh, peer: &PeerId) {
    if let Some(peers) = index.get_mut(mh) {
        peers.remove(peer);
        if peers.is_empty() {
            index.remove(mh);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::StoreError;
    use std::sync::Mutex;

    /// An in-memory block store for decision tests.
    #[derive(Default)]
    pub(crate) struct MemStore(pub Mutex<HashMap<Mh, Bytes>>);

    impl MemStore {
        pub(crate) fn insert(&self, block: &Block) {
            self.0.lock().unwrap().insert(*block.cid.hash(), block.data.clone());
        }
    }

    impl BlockStore for MemStore {
        fn get_block(&self, cid: &Cid) -> Result<Option<Bytes>, StoreError> {
            Ok(self.0.lock().unwrap().get(cid.hash()).cloned())
        }
        fn has_block(&self, cid: &Cid) -> Result<bool, StoreError> {
            Ok(self.0.lock().unwrap().contains_key(cid.hash()))
        }
    }

    fn block(i: u32, size: usize) -> Block {
        let mut data = vec![0u8; size];
        data[..4].copy_from_slice(&i.to_be_bytes());
        Block::new_v1(0x55, Bytes::from(data))
    }

    /// `n` blocks of `size` bytes, stored in `store`.
    fn stored_blocks(store: &MemStore, n: u32, size: usize) -> Vec<Block> {
        let blocks: Vec<Block> = (0..n).map(|i| block(i, size)).collect();
        for b in &blocks {
            store.insert(b);
        }
        blocks
    }

    fn want(b: &Block, t: WantType, dont_have: bool) -> WantlistEntry {
        WantlistEntry::want(b.cid, t, 1, dont_have)
    }

    const MAX: usize = 4 << 20;

    #[test]
    fn want_block_is_answered_with_the_block_and_then_forgotten() {
        let store = MemStore::default();
        let (b, peer) = (block(1, 100), PeerId::random());
        store.insert(&b);
        let mut ledger = Ledger::new(100);
        ledger.receive_wantlist(peer, false, &[want(&b, WantType::Block, true)]);
        let (msg, built) = ledger.next_message(&peer, &store, MAX, MAX).unwrap();
        assert_eq!(msg.blocks, vec![b.clone()]);
        assert_eq!(built.blocks, 1);
        assert!(ledger.wantlist(&peer).is_empty());
        assert!(ledger.next_message(&peer, &store, MAX, MAX).is_none());
    }

    #[test]
    fn missing_block_gets_dont_have_once_then_the_block_when_it_arrives() {
        let store = MemStore::default();
        let (b, peer) = (block(1, 100), PeerId::random());
        let mut ledger = Ledger::new(100);
        ledger.receive_wantlist(peer, false, &[want(&b, WantType::Block, true)]);
        let (msg, _) = ledger.next_message(&peer, &store, MAX, MAX).unwrap();
        assert_eq!(msg.presences, vec![(b.cid, Presence::DontHave)]);
        // Asked again: no second DONT_HAVE.
        ledger.receive_wantlist(peer, false, &[want(&b, WantType::Block, true)]);
        assert!(ledger.next_message(&peer, &store, MAX, MAX).is_none());
        store.insert(&b);
        assert_eq!(ledger.blocks_added([&b.cid]), vec![peer]);
        let (msg, _) = ledger.next_message(&peer, &store, MAX, MAX).unwrap();
        assert_eq!(msg.blocks, vec![b]);
    }

    #[test]
    fn want_have_is_answered_have_or_dont_have_only_when_asked() {
        let store = MemStore::default();
        let (have, lack, silent, peer) = (block(1, 10), block(2, 10), block(3, 10), PeerId::random());
        store.insert(&have);
        let mut ledger = Ledger::new(100);
        ledger.receive_wantlist(
            peer,
            false,
            &[want(&have, WantType::Have, true), want(&lack, WantType::Have, true), want(&silent, WantType::Have, false)],
        );
        let (msg, built) = ledger.next_message(&peer, &store, MAX, MAX).unwrap();
        assert_eq!(msg.presences, vec![(have.cid, Presence::Have), (lack.cid, Presence::DontHave)]);
        assert!(msg.blocks.is_empty());
        assert_eq!((built.haves, built.dont_haves), (1, 1));
        // The two unanswered-by-block wants stay; a later block triggers HAVE.
        assert_eq!(ledger.wantlist(&peer).len(), 2);
        store.insert(&silent);
        ledger.blocks_added([&silent.cid]);
        let (msg, _) = ledger.next_message(&peer, &store, MAX, MAX).unwrap();
        assert_eq!(msg.presences, vec![(silent.cid, Presence::Have)]);
    }

    #[test]
    fn cancel_removes_and_want_have_does_not_downgrade_want_block() {
        let store = MemStore::default();
        let (a, b, peer) = (block(1, 10), block(2, 10), PeerId::random());
        store.insert(&a);
        store.insert(&b);
        let mut ledger = Ledger::new(100);
        ledger.receive_wantlist(peer, false, &[want(&a, WantType::Block, false), want(&b, WantType::Block, false)]);
        ledger.receive_wantlist(peer, false, &[WantlistEntry::cancel(a.cid), want(&b, WantType::Have, false)]);
        let (msg, _) = ledger.next_message(&peer, &store, MAX, MAX).unwrap();
        assert_eq!(msg.blocks, vec![b]);
        assert!(msg.presences.is_empty());
    }

    #[test]
    fn full_wantlist_replaces_the_previous_one() {
        let store = MemStore::default();
        let (a, b, peer) = (block(1, 10), block(2, 10), PeerId::random());
        let mut ledger = Ledger::new(100);
        ledger.receive_wantlist(peer, false, &[want(&a, WantType::Block, false)]);
        ledger.receive_wantlist(peer, true, &[want(&b, WantType::Block, false)]);
        let cids: Vec<Cid> = ledger.wantlist(&peer).into_iter().map(|(c, _)| c).collect();
        assert_eq!(cids, vec![b.cid]);
        store.insert(&a);
        assert!(ledger.blocks_added([&a.cid]).is_empty());
    }

    #[test]
    fn blocks_are_batched_up_to_the_target_and_never_beyond_the_max() {
        let store = MemStore::default();
        let peer = PeerId::random();
        let blocks = stored_blocks(&store, 10, 1000);
        let mut ledger = Ledger::new(100);
        let entries: Vec<_> = blocks.iter().map(|b| want(b, WantType::Block, false)).collect();
        ledger.receive_wantlist(peer, false, &entries);
        // Target 2500 bytes: three blocks (the third crosses the target).
        let (msg, _) = ledger.next_message(&peer, &store, 2500, 100_000).unwrap();
        assert_eq!(msg.blocks, blocks[..3].to_vec());
        // Max 2060 bytes: the second block waits for the next message, in order.
        let (msg, _) = ledger.next_message(&peer, &store, 10_000, 2060).unwrap();
        assert_eq!(msg.blocks, blocks[3..4].to_vec());
        let (msg, _) = ledger.next_message(&peer, &store, 10_000, 100_000).unwrap();
        assert_eq!(msg.blocks, blocks[4..].to_vec());
        assert!(!ledger.has_work(&peer));
    }

    /// Answers built from look-ups made earlier (on another thread): a want the look-ups did
    /// not cover ends the message and stays first in line; a want-have upgraded to a
    /// want-block after its look-up is looked up again; a cancelled one is dropped.
    #[test]
    fn answers_from_earlier_look_ups_stop_where_the_look_ups_stop() {
        let store = MemStore::default();
        let peer = PeerId::random();
        let blocks = stored_blocks(&store, 4, 100);
        let mut ledger = Ledger::new(100);
        ledger.receive_wantlist(
            peer,
            false,
            &[want(&blocks[0], WantType::Block, true), want(&blocks[1], WantType::Have, true), want(&blocks[2], WantType::Block, true)],
        );
        let planned = ledger.to_look_up(&peer, 2);
        assert_eq!(planned, vec![(blocks[0].cid, WantType::Block), (blocks[1].cid, WantType::Have)]);
        let looked: HashMap<Cid, Found> = planned.iter().map(|(cid, t)| (*cid, Found::look_up(&store, cid, *t))).collect();
        // Meanwhile the peer upgrades its want-have and wants one more block.
        ledger.receive_wantlist(peer, false, &[want(&blocks[1], WantType::Block, true), want(&blocks[3], WantType::Block, true)]);
        let (msg, _) = ledger.next_message_from(&peer, &mut |cid, _| looked.get(cid).cloned(), MAX, MAX).unwrap();
        assert_eq!(msg.blocks, vec![blocks[0].clone()], "stops at the upgraded want");
        assert!(msg.presences.is_empty());
        assert_eq!(ledger.to_look_up(&peer, 10).first(), Some(&(blocks[1].cid, WantType::Block)));
        // Nothing looked up: no message, nothing lost.
        assert!(ledger.next_message_from(&peer, &mut |_, _| None, MAX, MAX).is_none());
        ledger.receive_wantlist(peer, false, &[WantlistEntry::cancel(blocks[2].cid)]);
        let (msg, _) = ledger.next_message(&peer, &store, MAX, MAX).unwrap();
        assert_eq!(msg.blocks, vec![blocks[1].clone(), blocks[3].clone()]);
        assert!(!ledger.has_work(&peer));
    }

    #[test]
    fn wantlist_size_is_bounded_per_peer() {
        let peer = PeerId::random();
        let mut ledger = Ledger::new(2);
        let entries: Vec<_> = (0..5).map(|i| want(&block(i, 10), WantType::Have, false)).collect();
        assert_eq!(ledger.receive_wantlist(peer, false, &entries), 3);
        assert_eq!(ledger.wantlist(&peer).len(), 2);
        ledger.remove_peer(&peer);
        assert!(ledger.wanted_by.is_empty());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 128, failure_persistence: None, ..Default::default() })]

        /// Answers built from look-ups that cover any part of the wants (as a blocking thread's
        /// results do, however far they got) lose nothing and send nothing twice: in the end
        /// every stored block wanted is sent once, every stored want-have gets one HAVE, and no
        /// DONT_HAVE names a stored block.
        #[test]
        fn partial_look_ups_answer_every_want_once(
            wants in proptest::collection::vec((proptest::bool::ANY, proptest::bool::ANY, proptest::bool::ANY), 1..40),
            covered in proptest::collection::vec(0usize..8, 1..60),
            target in 100usize..2000,
        ) {
            let store = MemStore::default();
            let peer = PeerId::random();
            let mut ledger = Ledger::new(1000);
            let blocks: Vec<Block> = (0..wants.len()).map(|i| block(i as u32, 60)).collect();
            let mut entries = Vec::new();
            for (b, &(stored, want_block, dont_have)) in blocks.iter().zip(&wants) {
                if stored {
                    store.insert(b);
                }
                entries.push(want(b, if want_block { WantType::Block } else { WantType::Have }, dont_have));
            }
            ledger.receive_wantlist(peer, false, &entries);
            let mut sent: HashMap<Cid, usize> = HashMap::new();
            let mut haves: HashMap<Cid, usize> = HashMap::new();
            let mut dont_haves = Vec::new();
            let mut take = |msg: Message| {
                for b in msg.blocks {
                    *sent.entry(b.cid).or_default() += 1;
                }
                for (cid, presence) in msg.presences {
                    match presence {
                        Presence::Have => *haves.entry(cid).or_default() += 1,
                        Presence::DontHave => dont_haves.push(cid),
                    }
                }
            };
            // Look-ups that got as far as `n` wants, then the answers built from them.
            for &n in &covered {
                let looked: HashMap<Cid, Found> = ledger.to_look_up(&peer, n).into_iter().map(|(cid, t)| (cid, Found::look_up(&store, &cid, t))).collect();
                while let Some((msg, _)) = ledger.next_message_from(&peer, &mut |cid, _| looked.get(cid).cloned(), target, 4 << 20) {
                    take(msg);
                }
            }
            while let Some((msg, _)) = ledger.next_message(&peer, &store, target, 4 << 20) {
                take(msg);
            }
            for (b, &(stored, want_block, _)) in blocks.iter().zip(&wants) {
                let (blocks_sent, have_sent) = (sent.get(&b.cid).copied().unwrap_or(0), haves.get(&b.cid).copied().unwrap_or(0));
                proptest::prop_assert_eq!(blocks_sent, usize::from(stored && want_block), "block {}", b.cid);
                proptest::prop_assert_eq!(have_sent, usize::from(stored && !want_block), "HAVE {}", b.cid);
                proptest::prop_assert!(!(stored && dont_haves.contains(&b.cid)), "DONT_HAVE for stored {}", b.cid);
            }
        }
    }
}
