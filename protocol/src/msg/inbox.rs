//! Inboxes, deletions and the outbox on disk (column `messages`), with an index in memory that
//! enforces the bounds before anything is written.
//!
//! | key | value |
//! |---|---|
//! | `i/<core>/<id>` | a message in `<core>`'s inbox: [`StoredMessage`] |
//! | `t/<core>/<id>` | a deleted message: when it was deleted (unix ms, u64 BE) |
//! | `o/<id>` | a message this node sends and no replica has taken yet: [`OutboxRecord`] |
//! | `c/<core>` | a core followed only to read its device keys (a contact): no inbox here |
//!
//! `<core>` is the lower-case address (42 bytes), `<id>` the 16 id bytes. The index decides;
//! the writes it asks for are returned as [`Write`]s, so the event loop can commit many of them
//! with one synced write (see `node/event_loop/msg.rs`).

use std::collections::{BTreeMap, HashMap, HashSet};

use kubelt_proto::msg::Envelope;
use kubelt_proto::Message;

use super::envelope::{body_of, MessageId, Refused, Verified, ID_LEN};
use super::Config;
use crate::core::Address;
use crate::store::{Column, Store, StoreError};

/// A message as stored in an inbox.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredMessage {
    /// The envelope as received (encoded).
    #[prost(bytes = "vec", tag = "1")]
    pub envelope: Vec<u8>,
    /// When this replica took it (unix ms).
    #[prost(int64, tag = "2")]
    pub received_at: i64,
    /// Whether it was read on this node.
    #[prost(bool, tag = "3")]
    pub read: bool,
}

/// A message waiting in the outbox.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OutboxRecord {
    /// The envelope (encoded).
    #[prost(bytes = "vec", tag = "1")]
    pub envelope: Vec<u8>,
    /// When it was sent (unix ms): it expires from there.
    #[prost(int64, tag = "2")]
    pub created_at: i64,
}

/// A write the index asks for.
#[derive(Debug, Clone)]
pub enum Write {
    /// Put a key and value.
    Put(Vec<u8>, Vec<u8>),
    /// Delete a key.
    Delete(Vec<u8>),
}

/// What the index keeps of one message.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The sender core.
    pub from: Address,
    /// The key that signed it (a revocation of it in the sender core removes the message).
    pub author: libp2p::PeerId,
    /// When the sender sealed it (unix ms).
    pub sent_at: i64,
    /// When this node took it (unix ms).
    pub received_at: i64,
    /// Bytes of the stored envelope.
    pub size: usize,
    /// Whether it was read on this node.
    pub read: bool,
}

/// One core's inbox.
#[derive(Debug, Default)]
struct Inbox {
    messages: BTreeMap<MessageId, Entry>,
    per_sender: HashMap<Address, usize>,
    bytes: usize,
    /// Deleted ids and when they were deleted (unix ms).
    deleted: HashMap<MessageId, i64>,
}

/// What [`Inboxes::admit`] decided for a verified message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admitted {
    /// New: stored once the returned writes are committed.
    New,
    /// Already held, or deleted here: nothing to do.
    Known,
}

/// Every inbox of the node, and the contacts.
#[derive(Debug, Default)]
pub struct Inboxes {
    inboxes: HashMap<Address, Inbox>,
    /// Which core each held id is in.
    by_id: HashMap<MessageId, Address>,
    contacts: HashSet<Address>,
    /// Messages held per sender core, over all inboxes: whether a change of a core can concern
    /// a stored message (a revocation removes them).
    senders: HashMap<Address, usize>,
}

fn inbox_key(kind: u8, core: &Address, id: &MessageId) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 + 42 + 1 + ID_LEN);
    key.push(kind);
    key.push(b'/');
    key.extend_from_slice(core.to_lower_hex().as_bytes());
    key.push(b'/');
    key.extend_from_slice(&id.0);
    key
}

/// The key of an outbox record.
pub fn outbox_key(id: &MessageId) -> Vec<u8> {
    let mut key = b"o/".to_vec();
    key.extend_from_slice(&id.0);
    key
}

fn contact_key(core: &Address) -> Vec<u8> {
    format!("c/{}", core.to_lower_hex()).into_bytes()
}

/// Splits `<kind>/<core>/<id>`.
fn parse_inbox_key(key: &[u8]) -> Option<(Address, MessageId)> {
    let rest = key.get(2..)?;
    let (core, id) = rest.split_at_checked(42)?;
    let core = Address::parse(std::str::from_utf8(core).ok()?).ok()?;
    Some((core, MessageId::from_slice(id.get(1..)?)?))
}

fn corrupt(reason: impl ToString) -> StoreError {
    StoreError::Corrupt { column: Column::Messages.name(), reason: reason.to_string() }
}

impl Inboxes {
    /// Reads the index from the store, and the outbox records.
    pub fn load(store: &Store) -> Result<(Inboxes, Vec<(MessageId, OutboxRecord)>), StoreError> {
        let mut inboxes = Inboxes::default();
        for item in store.iter_prefix(Column::Messages, b"i/") {
            let (key, value) = item?;
            let (core, id) = parse_inbox_key(&key).ok_or_else(|| corrupt("bad inbox key"))?;
            let stored = StoredMessage::decode(value.as_ref()).map_err(corrupt)?;
            let envelope = Envelope::decode(stored.envelope.as_slice()).map_err(corrupt)?;
            let body = body_of(&envelope).ok_or_else(|| corrupt("bad message body"))?;
            let from = Address::parse(&body.from).map_err(corrupt)?;
            let author = libp2p::identity::PublicKey::try_decode_protobuf(&envelope.author).map_err(corrupt)?.to_peer_id();
            let entry = Entry { from, author, sent_at: body.sent_at, received_at: stored.received_at, size: stored.envelope.len(), read: stored.read };
            inboxes.insert(core, id, entry);
        }
        for item in store.iter_prefix(Column::Messages, b"t/") {
            let (key, value) = item?;
            let (core, id) = parse_inbox_key(&key).ok_or_else(|| corrupt("bad deletion key"))?;
            let at = <[u8; 8]>::try_from(value.as_ref()).map(i64::from_be_bytes).unwrap_or(0);
            inboxes.inboxes.entry(core).or_default().deleted.insert(id, at);
        }
        for item in store.iter_prefix(Column::Messages, b"c/") {
            let (key, _) = item?;
            let core = std::str::from_utf8(&key[2..]).ok().and_then(|s| Address::parse(s).ok()).ok_or_else(|| corrupt("bad contact key"))?;
            inboxes.contacts.insert(core);
        }
        let mut outbox = Vec::new();
        for item in store.iter_prefix(Column::Messages, b"o/") {
            let (key, value) = item?;
            let id = MessageId::from_slice(&key[2..]).ok_or_else(|| corrupt("bad outbox key"))?;
            outbox.push((id, OutboxRecord::decode(value.as_ref()).map_err(corrupt)?));
        }
        Ok((inboxes, outbox))
    }

    fn insert(&mut self, core: Address, id: MessageId, entry: Entry) {
        let inbox = self.inboxes.entry(core).or_default();
        *inbox.per_sender.entry(entry.from).or_default() += 1;
        *self.senders.entry(entry.from).or_default() += 1;
        inbox.bytes += entry.size;
        inbox.messages.insert(id, entry);
        self.by_id.insert(id, core);
    }

    fn remove(&mut self, core: &Address, id: &MessageId) -> Option<Entry> {
        let inbox = self.inboxes.get_mut(core)?;
        let entry = inbox.messages.remove(id)?;
        if let Some(n) = inbox.per_sender.get_mut(&entry.from) {
            *n -= 1;
            if *n == 0 {
                inbox.per_sender.remove(&entry.from);
            }
        }
        if let Some(n) = self.senders.get_mut(&entry.from) {
            *n -= 1;
            if *n == 0 {
                self.senders.remove(&entry.from);
            }
        }
        inbox.bytes -= entry.size;
        self.by_id.remove(id);
        Some(entry)
    }

    /// Decides whether a verified message enters its recipient's inbox, within the bounds of
    /// `config`; a new one is indexed at once and `writes` gets its record.
    pub fn admit(&mut self, message: &Verified, now_ms: i64, config: &Config, writes: &mut Vec<Write>) -> Result<Admitted, Refused> {
        let inbox = self.inboxes.entry(message.to).or_default();
        if inbox.messages.contains_key(&message.id) || inbox.deleted.contains_key(&message.id) {
            return Ok(Admitted::Known);
        }
        let record = StoredMessage { envelope: message.envelope.encode_to_vec(), received_at: now_ms, read: false };
        let size = record.envelope.len();
        let full = inbox.per_sender.get(&message.from).copied().unwrap_or(0) >= config.max_per_sender
            || inbox.messages.len() >= config.max_messages
            || inbox.bytes + size > config.max_inbox_bytes;
        if full {
            return Err(Refused::InboxFull(message.to.to_checksum()));
        }
        writes.push(Write::Put(inbox_key(b'i', &message.to, &message.id), record.encode_to_vec()));
        let entry = Entry { from: message.from, author: message.author, sent_at: message.sent_at, received_at: now_ms, size, read: false };
        self.insert(message.to, message.id, entry);
        Ok(Admitted::New)
    }

    /// Undoes [`Inboxes::admit`] of a message whose write failed.
    pub fn forget(&mut self, core: &Address, id: &MessageId) {
        self.remove(core, id);
    }

    /// The core whose inbox holds `id`.
    pub fn core_of(&self, id: &MessageId) -> Option<Address> {
        self.by_id.get(id).copied()
    }

    /// The index entries of a core's inbox, oldest first by time sent.
    pub fn entries(&self, core: &Address) -> Vec<(MessageId, Entry)> {
        let mut out: Vec<_> = self.inboxes.get(core).map(|i| i.messages.iter().map(|(id, e)| (*id, e.clone())).collect()).unwrap_or_default();
        out.sort_by_key(|(id, e)| (e.sent_at, *id));
        out
    }

    /// One entry.
    pub fn entry(&self, id: &MessageId) -> Option<(Address, Entry)> {
        let core = self.core_of(id)?;
        Some((core, self.inboxes.get(&core)?.messages.get(id)?.clone()))
    }

    /// Deletes a message here, and remembers the deletion so that no replica or replay brings
    /// it back. Returns the writes, or `None` when the id is not held.
    pub fn delete(&mut self, id: &MessageId, now_ms: i64) -> Option<Vec<Write>> {
        let core = self.core_of(id)?;
        self.remove(&core, id)?;
        self.inboxes.entry(core).or_default().deleted.insert(*id, now_ms);
        Some(vec![Write::Delete(inbox_key(b'i', &core, id)), Write::Put(inbox_key(b't', &core, id), (now_ms as u64).to_be_bytes().to_vec())])
    }

    /// The sender cores of the messages held, over all inboxes.
    pub fn sender_cores(&self) -> Vec<Address> {
        self.senders.keys().copied().collect()
    }

    /// Whether some inbox here holds a message of sender core `core`.
    pub fn has_sender(&self, core: &Address) -> bool {
        self.senders.contains_key(core)
    }

    /// Removes every message of sender core `from` signed by one of `revoked` (keys its owner
    /// revoked), in every inbox, and remembers each as deleted so that no host or replay brings
    /// it back. Returns the removed ids and the writes. A revocation voids a key's messages
    /// whatever time they claim: the time is the author's own word, which a stolen key can
    /// backdate, and a message has no causal tie to the sender core that could anchor it.
    pub fn remove_revoked(&mut self, from: &Address, revoked: &HashSet<libp2p::PeerId>, now_ms: i64) -> (Vec<MessageId>, Vec<Write>) {
        if revoked.is_empty() || !self.has_sender(from) {
            return (Vec::new(), Vec::new());
        }
        let mut gone = Vec::new();
        for (core, inbox) in &self.inboxes {
            for (id, entry) in &inbox.messages {
                if entry.from == *from && revoked.contains(&entry.author) {
                    gone.push((*core, *id));
                }
            }
        }
        let mut writes = Vec::new();
        let mut ids = Vec::with_capacity(gone.len());
        for (core, id) in gone {
            self.remove(&core, &id);
            self.inboxes.entry(core).or_default().deleted.insert(id, now_ms);
            writes.push(Write::Delete(inbox_key(b'i', &core, &id)));
            writes.push(Write::Put(inbox_key(b't', &core, &id), (now_ms as u64).to_be_bytes().to_vec()));
            ids.push(id);
        }
        (ids, writes)
    }

    /// Marks a message read; returns the write (the record with `read` set).
    pub fn mark_read(&mut self, id: &MessageId, stored: &StoredMessage) -> Option<Write> {
        let core = self.core_of(id)?;
        let entry = self.inboxes.get_mut(&core)?.messages.get_mut(id)?;
        if entry.read {
            return None;
        }
        entry.read = true;
        let record = StoredMessage { read: true, ..stored.clone() };
        Some(Write::Put(inbox_key(b'i', &core, id), record.encode_to_vec()))
    }

    /// Reads a stored message.
    pub fn stored(&self, store: &Store, id: &MessageId) -> Result<Option<StoredMessage>, StoreError> {
        let Some(core) = self.core_of(id) else { return Ok(None) };
        match store.get(Column::Messages, &inbox_key(b'i', &core, id))? {
            Some(bytes) => Ok(Some(StoredMessage::decode(bytes.as_slice()).map_err(corrupt)?)),
            None => Ok(None),
        }
    }

    /// Every id held or deleted in a core's inbox, sorted (what an inventory lists).
    pub fn inventory(&self, core: &Address) -> Vec<MessageId> {
        let Some(inbox) = self.inboxes.get(core) else { return Vec::new() };
        let mut ids: Vec<MessageId> = inbox.messages.keys().chain(inbox.deleted.keys()).copied().collect();
        ids.sort();
        ids
    }

    /// Whether an id is held or was deleted in a core's inbox.
    pub fn knows(&self, core: &Address, id: &MessageId) -> bool {
        self.inboxes.get(core).is_some_and(|i| i.messages.contains_key(id) || i.deleted.contains_key(id))
    }

    /// Drops deletion records older than `max_age_ms`: no replica keeps, and no replica
    /// accepts, a message that old any more.
    pub fn prune_deletions(&mut self, now_ms: i64, max_age_ms: i64) -> Vec<Write> {
        let mut writes = Vec::new();
        for (core, inbox) in &mut self.inboxes {
            inbox.deleted.retain(|id, at| {
                let keep = *at >= now_ms.saturating_sub(max_age_ms);
                if !keep {
                    writes.push(Write::Delete(inbox_key(b't', core, id)));
                }
                keep
            });
        }
        writes
    }

    /// Whether a core was followed only to read its device keys.
    pub fn is_contact(&self, core: &Address) -> bool {
        self.contacts.contains(core)
    }

    /// Records (or clears) a core as a contact; returns the write.
    pub fn set_contact(&mut self, core: Address, contact: bool) -> Option<Write> {
        if contact {
            self.contacts.insert(core).then(|| Write::Put(contact_key(&core), Vec::new()))
        } else {
            self.contacts.remove(&core).then(|| Write::Delete(contact_key(&core)))
        }
    }

    /// Messages held, in all inboxes.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no inbox holds a message.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// Applies writes in one batch; `sync` waits until they are on disk.
pub fn commit(store: &Store, writes: &[Write], sync: bool) -> Result<(), StoreError> {
    let mut batch = store.batch();
    for write in writes {
        match write {
            Write::Put(k, v) => batch.put(Column::Messages, k, v),
            Write::Delete(k) => batch.delete(Column::Messages, k),
        }
    }
    batch.commit(sync)
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::PeerId;

    fn message(n: u8, from: Address, to: Address, author: PeerId) -> Verified {
        Verified { id: MessageId([n; ID_LEN]), from, to, sent_at: i64::from(n), author, envelope: Envelope::default() }
    }

    #[test]
    fn a_revocation_removes_exactly_the_revoked_keys_messages_of_that_sender_and_they_do_not_come_back() {
        let (alice, carol) = (Address::from_bytes([1; 20]), Address::from_bytes([3; 20]));
        let (bob, dave) = (Address::from_bytes([2; 20]), Address::from_bytes([4; 20]));
        let (stolen, good) = (PeerId::random(), PeerId::random());
        let mut inboxes = Inboxes::default();
        let config = Config::default();
        let mut writes = Vec::new();
        for (n, from, to, author) in [(1, alice, bob, stolen), (2, alice, dave, stolen), (3, alice, bob, good), (4, carol, bob, stolen)] {
            assert_eq!(inboxes.admit(&message(n, from, to, author), 0, &config, &mut writes), Ok(Admitted::New));
        }
        assert!(inboxes.has_sender(&alice) && inboxes.has_sender(&carol));
        // Nothing revoked, or another sender core: nothing removed.
        assert!(inboxes.remove_revoked(&alice, &HashSet::new(), 10).0.is_empty());
        assert!(inboxes.remove_revoked(&dave, &HashSet::from([stolen]), 10).0.is_empty());

        let (mut gone, writes) = inboxes.remove_revoked(&alice, &HashSet::from([stolen]), 10);
        gone.sort();
        assert_eq!(gone, vec![MessageId([1; ID_LEN]), MessageId([2; ID_LEN])], "both inboxes, only alice's messages by the stolen key");
        assert_eq!(writes.len(), 4, "a delete and a deletion record each");
        assert_eq!(inboxes.len(), 2);
        assert!(inboxes.entry(&MessageId([3; ID_LEN])).is_some(), "alice's other key keeps its message");
        assert!(inboxes.entry(&MessageId([4; ID_LEN])).is_some(), "carol's core revoked nothing");
        // Offered again (by another host, or a replay): known as deleted, not stored.
        let mut again = Vec::new();
        assert_eq!(inboxes.admit(&message(1, alice, bob, stolen), 20, &config, &mut again), Ok(Admitted::Known));
        assert!(again.is_empty());
        assert!(inboxes.knows(&bob, &MessageId([1; ID_LEN])));
        // A second pass finds nothing more.
        assert!(inboxes.remove_revoked(&alice, &HashSet::from([stolen]), 30).0.is_empty());
    }
}
