//! Verdicts that wait for the sender's core.
//!
//! A message is valid when its author's delegation verifies (it travels in the envelope) **and**
//! the owner of the sender core has not revoked the author. The second half is a fact of the
//! sender core, so a replica that does not hold that core cannot judge it. Such a replica
//! follows the sender core as a contact (no inbox of it is hosted here), catches it up, and
//! decides only then — or after [`Limits::wait`] (5 s) when no replica of the sender core
//! answers: a revocation it learns later still removes the message (see
//! [`super::inbox::Inboxes::remove_revoked`]), so every replica ends with the same messages
//! whatever the order in which the message, the sender core and the revocation reached it.
//!
//! This table holds the messages parked meanwhile. It does no I/O: the event loop asks it to
//! [`park`](Senders::park) a verified message, tells it when a sender core is
//! [`caught up`](Senders::caught_up), and asks it every tick which waits are
//! [`due`](Senders::due). It is bounded: at most [`Limits::per_inbox`] messages parked per
//! recipient inbox and [`Limits::total`] in all (the sender of a message that does not fit is
//! asked to retry later, as for a busy replica); a sender core is waited for at most once per
//! [`Limits::wait`].

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use libp2p::PeerId;

use super::envelope::{MessageId, Verified};
use crate::core::Address;

/// The bounds of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Messages parked for one recipient inbox.
    pub per_inbox: usize,
    /// Messages parked in all.
    pub total: usize,
    /// How long a verdict waits for the sender core to be caught up.
    pub wait: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { per_inbox: 64, total: 1_024, wait: Duration::from_secs(5) }
    }
}

/// A verified message parked until its sender core is caught up, and the peer it came from
/// (not sent back to it once admitted).
#[derive(Debug, Clone)]
pub struct Parked {
    /// The message.
    pub message: Verified,
    /// Who delivered it.
    pub peer: PeerId,
}

/// What [`Senders::park`] did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Parked; `follow` is true for the first message of a sender core not waited for yet:
    /// the caller follows that core (as a contact) and starts its catch-up.
    Parked {
        /// Start following the sender core.
        follow: bool,
    },
    /// The same message is parked already.
    AlreadyParked,
    /// Over a bound: not parked; the sender retries later.
    Full,
}

/// One sender core being caught up.
#[derive(Debug)]
struct Waiting {
    since: Instant,
    messages: Vec<Parked>,
}

/// Messages waiting for their sender cores (see the module doc).
#[derive(Debug, Default)]
pub struct Senders {
    limits: Limits,
    waiting: HashMap<Address, Waiting>,
    ids: HashSet<MessageId>,
    per_inbox: HashMap<Address, usize>,
}

impl Senders {
    /// An empty table with these bounds.
    pub fn new(limits: Limits) -> Self {
        Senders { limits, ..Default::default() }
    }

    /// Parks a verified message whose sender core this node does not hold (yet).
    pub fn park(&mut self, message: Verified, peer: PeerId, now: Instant) -> Arrival {
        if self.ids.contains(&message.id) {
            return Arrival::AlreadyParked;
        }
        let in_inbox = self.per_inbox.get(&message.to).copied().unwrap_or(0);
        if in_inbox >= self.limits.per_inbox || self.ids.len() >= self.limits.total {
            return Arrival::Full;
        }
        self.ids.insert(message.id);
        *self.per_inbox.entry(message.to).or_default() += 1;
        let mut follow = false;
        let waiting = self.waiting.entry(message.from).or_insert_with(|| {
            follow = true;
            Waiting { since: now, messages: Vec::new() }
        });
        waiting.messages.push(Parked { message, peer });
        Arrival::Parked { follow }
    }

    /// The sender core `core` is caught up: its parked messages, to be decided now.
    pub fn caught_up(&mut self, core: &Address) -> Vec<Parked> {
        match self.waiting.remove(core) {
            Some(waiting) => self.release(waiting.messages),
            None => Vec::new(),
        }
    }

    /// The messages whose sender cores were waited for [`Limits::wait`] by `now`: decided with
    /// what this node knows by then.
    pub fn due(&mut self, now: Instant) -> Vec<Parked> {
        let wait = self.limits.wait;
        let due: Vec<Address> = self.waiting.iter().filter(|(_, w)| now.saturating_duration_since(w.since) >= wait).map(|(core, _)| *core).collect();
        let mut out = Vec::new();
        for core in due {
            if let Some(waiting) = self.waiting.remove(&core) {
                out.extend(self.release(waiting.messages));
            }
        }
        out
    }

    fn release(&mut self, messages: Vec<Parked>) -> Vec<Parked> {
        for parked in &messages {
            self.ids.remove(&parked.message.id);
            if let Some(n) = self.per_inbox.get_mut(&parked.message.to) {
                *n -= 1;
                if *n == 0 {
                    self.per_inbox.remove(&parked.message.to);
                }
            }
        }
        messages
    }

    /// Whether a verdict waits for `core`.
    pub fn is_waiting(&self, core: &Address) -> bool {
        self.waiting.contains_key(core)
    }

    /// Whether a message is parked.
    pub fn is_parked(&self, id: &MessageId) -> bool {
        self.ids.contains(id)
    }

    /// Messages parked in all.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether nothing is parked.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kubelt_proto::msg::Envelope;

    fn message(n: u32, from: u8, to: u8) -> Verified {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&n.to_be_bytes());
        id[4] = from;
        id[5] = to;
        Verified {
            id: MessageId(id),
            from: Address::from_bytes([from; 20]),
            to: Address::from_bytes([to; 20]),
            sent_at: 0,
            author: PeerId::random(),
            envelope: Envelope::default(),
        }
    }

    #[test]
    fn the_first_message_of_a_sender_core_asks_to_follow_it_and_the_next_ones_wait_with_it() {
        let mut table = Senders::new(Limits::default());
        let (now, peer) = (Instant::now(), PeerId::random());
        assert_eq!(table.park(message(1, 1, 9), peer, now), Arrival::Parked { follow: true });
        assert_eq!(table.park(message(2, 1, 9), peer, now), Arrival::Parked { follow: false });
        assert_eq!(table.park(message(1, 1, 9), peer, now), Arrival::AlreadyParked);
        assert_eq!(table.park(message(3, 2, 9), peer, now), Arrival::Parked { follow: true });
        assert!(table.is_waiting(&Address::from_bytes([1; 20])));
        let released: Vec<MessageId> = table.caught_up(&Address::from_bytes([1; 20])).into_iter().map(|p| p.message.id).collect();
        assert_eq!(released, vec![message(1, 1, 9).id, message(2, 1, 9).id]);
        assert!(!table.is_waiting(&Address::from_bytes([1; 20])));
        assert!(!table.is_parked(&message(1, 1, 9).id));
        assert_eq!(table.len(), 1, "the other sender core still waits");
        assert!(table.caught_up(&Address::from_bytes([1; 20])).is_empty(), "released once");
        // A message of a sender core caught up already starts a new wait (the caller only parks
        // messages of cores it does not hold).
        assert_eq!(table.park(message(4, 1, 9), peer, now), Arrival::Parked { follow: true });
    }

    #[test]
    fn a_wait_ends_after_the_limit_even_if_the_sender_core_never_arrives() {
        let limits = Limits { wait: Duration::from_secs(5), ..Limits::default() };
        let mut table = Senders::new(limits);
        let (t0, peer) = (Instant::now(), PeerId::random());
        table.park(message(1, 1, 9), peer, t0);
        table.park(message(2, 2, 9), peer, t0 + Duration::from_secs(3));
        assert!(table.due(t0 + Duration::from_millis(4_999)).is_empty());
        let first: Vec<Address> = table.due(t0 + Duration::from_secs(5)).into_iter().map(|p| p.message.from).collect();
        assert_eq!(first, vec![Address::from_bytes([1; 20])]);
        let second: Vec<Address> = table.due(t0 + Duration::from_secs(8)).into_iter().map(|p| p.message.from).collect();
        assert_eq!(second, vec![Address::from_bytes([2; 20])]);
        assert!(table.is_empty());
    }

    #[test]
    fn the_table_is_bounded_per_inbox_and_in_all_and_frees_room_on_release() {
        let limits = Limits { per_inbox: 3, total: 5, wait: Duration::from_secs(5) };
        let mut table = Senders::new(limits);
        let (now, peer) = (Instant::now(), PeerId::random());
        // One inbox: 3 parked, the 4th refused, whoever sends it.
        for n in 0..3 {
            assert!(matches!(table.park(message(n, n as u8 + 1, 9), peer, now), Arrival::Parked { .. }));
        }
        assert_eq!(table.park(message(10, 50, 9), peer, now), Arrival::Full);
        // Other inboxes fill the total.
        assert!(matches!(table.park(message(20, 60, 8), peer, now), Arrival::Parked { .. }));
        assert!(matches!(table.park(message(21, 60, 7), peer, now), Arrival::Parked { .. }));
        assert_eq!(table.park(message(22, 61, 6), peer, now), Arrival::Full);
        assert_eq!(table.len(), 5);
        // Releasing one sender core frees its room in its inbox and in the total.
        assert_eq!(table.caught_up(&Address::from_bytes([1; 20])).len(), 1);
        assert!(matches!(table.park(message(10, 50, 9), peer, now), Arrival::Parked { follow: true }));
        assert_eq!(table.park(message(23, 62, 6), peer, now), Arrival::Full);
        // Everything drains by the deadline.
        assert_eq!(table.due(now + Duration::from_secs(5)).len(), 5);
        assert!(table.is_empty());
        assert!(table.per_inbox.is_empty() && table.ids.is_empty());
    }
}
