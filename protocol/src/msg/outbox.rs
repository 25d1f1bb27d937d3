//! The outbox's decisions, without I/O: which message goes to which replica and when.
//!
//! A message waits here from the moment it is durable until a replica of its recipient takes
//! it (or refuses it for good), or until it expires. [`Outbox::plan`] is called with the time
//! and the replicas online now; it sends each waiting message at once to a replica it has not
//! tried yet — so a replica that appears later gets it within a tick — and otherwise retries
//! with exponential backoff. Waiting messages whose recipient has no replica online ask for a
//! DHT lookup.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use kubelt_proto::msg::Envelope;
use libp2p::PeerId;

use super::envelope::MessageId;
use crate::core::Address;

/// First retry delay; doubled per failed attempt up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest retry delay.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How soon a message goes again to a replica that answered "busy".
const BUSY_RETRY: Duration = Duration::from_millis(50);
/// Most envelopes in one delivery request.
pub const MAX_BATCH: usize = 64;

struct Waiting {
    to: Address,
    envelope: Envelope,
    /// Unix ms of sending: it expires from there.
    created_at: i64,
    attempts: u32,
    next_try: Instant,
    /// Replicas tried since the last success of a lookup (tried ones wait for the backoff).
    tried: HashSet<PeerId>,
    in_flight: bool,
}

/// What to do now.
#[derive(Debug, Default)]
pub struct Plan {
    /// Delivery requests: a replica and the messages for it.
    pub sends: Vec<(PeerId, Vec<(MessageId, Envelope)>)>,
    /// Cores with waiting messages and no replica online: look their replicas up.
    pub lookups: Vec<Address>,
    /// Messages that expired undelivered (their records are to be deleted).
    pub expired: Vec<(MessageId, Address)>,
}

/// Messages waiting for a replica of their recipient.
#[derive(Default)]
pub struct Outbox {
    waiting: BTreeMap<MessageId, Waiting>,
}

impl Outbox {
    /// Adds a durable message.
    pub fn add(&mut self, id: MessageId, to: Address, envelope: Envelope, created_at: i64, now: Instant) {
        let waiting = Waiting { to, envelope, created_at, attempts: 0, next_try: now, tried: HashSet::new(), in_flight: false };
        self.waiting.insert(id, waiting);
    }

    /// Whether a message is still waiting.
    pub fn contains(&self, id: &MessageId) -> bool {
        self.waiting.contains_key(id)
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// The recipients of the waiting messages.
    pub fn recipients(&self) -> HashSet<Address> {
        self.waiting.values().map(|w| w.to).collect()
    }

    /// The recipient of a waiting message.
    pub fn recipient(&self, id: &MessageId) -> Option<Address> {
        self.waiting.get(id).map(|w| w.to)
    }

    /// Decides what to send now. `replicas` gives the replicas of a core online now.
    pub fn plan(&mut self, now: Instant, now_ms: i64, expiry: Duration, replicas: impl Fn(&Address) -> Vec<PeerId>) -> Plan {
        let mut plan = Plan::default();
        let expiry_ms = i64::try_from(expiry.as_millis()).unwrap_or(i64::MAX);
        self.waiting.retain(|id, w| {
            let expired = !w.in_flight && w.created_at.saturating_add(expiry_ms) < now_ms;
            if expired {
                plan.expired.push((*id, w.to));
            }
            !expired
        });
        let mut lookups: HashSet<Address> = HashSet::new();
        let mut sends: HashMap<PeerId, Vec<(MessageId, Envelope)>> = HashMap::new();
        let mut known: HashMap<Address, Vec<PeerId>> = HashMap::new();
        for (id, w) in self.waiting.iter_mut().filter(|(_, w)| !w.in_flight) {
            let online = known.entry(w.to).or_insert_with(|| replicas(&w.to));
            let due = w.next_try <= now;
            let untried = online.iter().find(|p| !w.tried.contains(p)).copied();
            let target = match untried {
                Some(peer) => Some(peer),
                None if due => online.first().copied(),
                None => None,
            };
            match target {
                Some(peer) => {
                    let batch = sends.entry(peer).or_default();
                    if batch.len() < MAX_BATCH {
                        batch.push((*id, w.envelope.clone()));
                        w.tried.insert(peer);
                        w.in_flight = true;
                    }
                }
                None if online.is_empty() && due => {
                    lookups.insert(w.to);
                    w.attempts += 1;
                    w.next_try = now + backoff(w.attempts);
                }
                None => {}
            }
        }
        plan.sends = sends.into_iter().collect();
        plan.lookups = lookups.into_iter().collect();
        plan
    }

    /// A replica took the message, or refused it for good: it leaves the outbox.
    pub fn done(&mut self, id: &MessageId) -> Option<Address> {
        self.waiting.remove(id).map(|w| w.to)
    }

    /// The attempt failed (no answer, or "retry later"): try again after the backoff.
    pub fn failed(&mut self, id: &MessageId, now: Instant) {
        if let Some(w) = self.waiting.get_mut(id) {
            w.in_flight = false;
            w.attempts += 1;
            w.next_try = now + backoff(w.attempts);
        }
    }

    /// The replica was busy: try again shortly, with no backoff (it is alive and answering).
    pub fn busy(&mut self, id: &MessageId, now: Instant) {
        if let Some(w) = self.waiting.get_mut(id) {
            w.in_flight = false;
            w.tried.clear();
            w.next_try = now + BUSY_RETRY;
        }
    }
}

fn backoff(attempts: u32) -> Duration {
    FIRST_BACKOFF.saturating_mul(1u32 << attempts.saturating_sub(1).min(16)).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn core(n: u8) -> Address {
        Address::from_bytes([n; 20])
    }

    #[test]
    fn a_message_goes_to_a_new_replica_at_once_and_to_a_tried_one_only_after_the_backoff() {
        let mut outbox = Outbox::default();
        let t0 = Instant::now();
        let id = MessageId([1; 16]);
        outbox.add(id, core(1), Envelope::default(), 0, t0);
        let expiry = Duration::from_secs(7 * 86400);
        // No replica online: a lookup, then nothing until the backoff passes.
        let plan = outbox.plan(t0, 0, expiry, |_| vec![]);
        assert_eq!(plan.lookups, vec![core(1)]);
        assert!(outbox.plan(t0, 0, expiry, |_| vec![]).lookups.is_empty());
        // A replica appears: sent to it at once, whatever the backoff.
        let a = PeerId::random();
        let plan = outbox.plan(t0, 0, expiry, |_| vec![a]);
        assert_eq!(plan.sends.len(), 1);
        assert_eq!(plan.sends[0].0, a);
        // In flight: not sent twice.
        assert!(outbox.plan(t0, 0, expiry, |_| vec![a]).sends.is_empty());
        outbox.failed(&id, t0);
        // Tried and failed: waits for the backoff unless another replica appears.
        assert!(outbox.plan(t0, 0, expiry, |_| vec![a]).sends.is_empty());
        let b = PeerId::random();
        assert_eq!(outbox.plan(t0, 0, expiry, |_| vec![a, b]).sends[0].0, b);
        outbox.failed(&id, t0);
        let later = t0 + Duration::from_secs(10);
        assert_eq!(outbox.plan(later, 0, expiry, |_| vec![a]).sends.len(), 1);
        assert_eq!(outbox.done(&id), Some(core(1)));
        assert!(outbox.is_empty());
    }

    #[test]
    fn a_message_nobody_took_expires() {
        let mut outbox = Outbox::default();
        let t0 = Instant::now();
        outbox.add(MessageId([2; 16]), core(2), Envelope::default(), 1_000, t0);
        let plan = outbox.plan(t0, 1_000 + 7 * 86_400_000 + 1, Duration::from_secs(7 * 86400), |_| vec![]);
        assert_eq!(plan.expired, vec![(MessageId([2; 16]), core(2))]);
        assert!(outbox.is_empty());
    }
}
