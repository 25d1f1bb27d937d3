//! Catch-up: Automerge's sync protocol, carrying verified envelopes instead of raw changes.
//!
//! `/kubelt/core-sync/1.0.0` is request-response, so one side drives a *session*: it sends a
//! [`SyncRequest`], the other answers with a [`SyncResponse`], and the driver decides whether
//! another round is needed. Each message holds an Automerge sync message (heads, needs, a bloom
//! filter of what the sender has) and, next to it, the `SignedChange` envelopes of the changes
//! Automerge decided to send. The changes Automerge itself would embed are stripped: a receiver
//! never applies a change it has not verified, and it verifies envelopes, not bare changes.
//!
//! - The driver keeps an [`automerge::sync::State`] per peer for the session; the responder
//!   keeps none (each request is answered from a fresh state, so a restarted or confused peer
//!   can never wedge it). The fresh state starts from the requester's `last_sync` when the
//!   responder holds all of it, so its Bloom filter covers what came after, not its history.
//! - Automerge is asked only for heads, needs and Bloom filters: which changes to send, and
//!   what a peer's message says about the changes sent so far, follow Automerge's rules on our
//!   own index ([`generate`], [`receive`]), checked against Automerge's own functions under
//!   `cfg(test)`. Automerge 0.7 rebuilds each change it sends from its op set and walks the
//!   whole history on every message it receives; both were most of a catch-up's cost.
//! - Only sync message format V1 is advertised, so Automerge never answers with a whole
//!   document (V2's shortcut), which we could not verify change by change.
//! - Envelopes are sent in causal order, with repeated delegations omitted
//!   ([`super::change`]); evidence envelopes ride along so facts spread even when the change
//!   carrying them is invalid.
//! - Bloom-filter false positives leave a receiver with changes whose dependencies the sender
//!   wrongly thought it had; the receiver names those dependencies in its next `need` (the
//!   sender has them: it sent their descendants).
//! - Requests are capped at [`super::Config::max_sync_request_bytes`] and responses at
//!   [`super::Config::max_sync_response_bytes`] (keep them under the codec's frame limits);
//!   what does not fit follows in the next round, in causal order.
//! - A session ends when Automerge has nothing more to say, after
//!   [`super::Config::max_sync_rounds`] rounds, or when two rounds in a row change nothing
//!   (the peer offers changes we reject).

//!
//! # Driving it (the network layer)
//!
//! ```text
//! on connect, on Accepted::MissingDeps, on a timer:
//!     if let Some(req) = cores.sync_request(&core, &peer) { send(peer, req) }
//! on an inbound request:  respond(cores.handle_sync_request(req, &peer))
//! on a response:          let step = cores.handle_sync_response(resp, &peer);
//!                         if let Some(req) = step.next { send(peer, req) }
//! on failure, timeout or disconnect: cores.end_sync(&peer)
//! ```
//!
//! One request per (core, peer) is outstanding at a time: while one is, `sync_request` returns
//! `None`.

use std::collections::{BTreeSet, HashMap, HashSet};

use automerge::sync::{Capability, ChunkList, Message as SyncMessage, State as SyncState, SyncDoc};
use automerge::{Automerge, ChangeHash};
use kubelt_proto::core::{SignedChange, SyncRequest, SyncResponse};
use prost::Message as _;
use libp2p::identity::PeerId;

use super::bounds::scan_sync_message;
use super::change::{Checked, Rejected};
use super::replica::{BatchReport, Dag, Replica, Session};

/// The outcome of one round of a session this replica drives.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct SyncStep {
    /// What the peer's envelopes did.
    pub report: BatchReport,
    /// The next request to send, or `None` when the session is over.
    pub next: Option<SyncRequest>,
    /// The peer's (or our) error, if the session ended on one.
    pub error: Option<String>,
}

impl SyncStep {
    /// A step that ends the session on `error`.
    pub fn failed(error: String) -> SyncStep {
        SyncStep { error: Some(error), ..Default::default() }
    }
}

/// Automerge's `generate_sync_message`, with the changes to send chosen from our own index and
/// returned as hashes.
///
/// Automerge 0.7 keeps no change bytes: to send changes it rebuilds each one from its op set,
/// which was most of what a catch-up cost the sending replica (and, with 20 replicas answering
/// one returning node, most of the catch-up). We never send those bytes anyway (we send the
/// stored envelopes), so Automerge is asked only for the rest of the message (heads, need, the
/// Bloom filter of what we have) and the choice of changes follows its rules on our [`Dag`]:
/// every change since the peer's `last_sync` that none of its Bloom filters holds, everything
/// that depends on one of those, and what it named in `need`.
fn generate(doc: &Automerge, dag: &Dag, state: &mut SyncState) -> Option<(SyncMessage, Vec<ChangeHash>)> {
    #[cfg(test)]
    let before = state.clone();
    let generated = generate_without_changes(doc, dag, state);
    #[cfg(test)]
    tests::same_as_automerge(doc, before, state, &generated);
    generated
}

fn generate_without_changes(doc: &Automerge, dag: &Dag, state: &mut SyncState) -> Option<(SyncMessage, Vec<ChangeHash>)> {
    // Automerge trusts the peer's `have` hashes in places; a hostile message must not take the
    // node down.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let their_have = state.their_have.as_deref().unwrap_or_default();
        if their_have.first().is_some_and(|first| !first.last_sync.iter().all(|h| dag.metas.contains_key(h))) {
            // Automerge answers with a reset before it chooses any change.
            let before = state.sent_hashes.clone();
            let message = doc.generate_sync_message(state)?;
            let sent = state.sent_hashes.difference(&before).copied().collect();
            return Some((message, sent));
        }
        let hashes: Vec<ChangeHash> = match (&state.their_have, &state.their_need) {
            (Some(have), Some(need)) => {
                dag.hashes_to_send(have, need).into_iter().filter(|h| !state.sent_hashes.contains(h)).collect()
            }
            _ => Vec::new(),
        };
        let heads = doc.get_heads();
        if state.have_responded && state.last_sent_heads == heads {
            if state.their_heads.as_ref() == Some(&heads) && hashes.is_empty() {
                return None;
            }
            if state.in_flight {
                return None;
            }
        }
        // With no `have` of theirs, Automerge chooses no changes; `have_responded` false makes
        // it answer whatever it would send (the checks above are its own).
        let their_have = state.their_have.take();
        state.have_responded = false;
        let message = doc.generate_sync_message(state);
        state.their_have = their_have;
        let message = message?;
        state.sent_hashes.extend(hashes.iter().copied());
        Some((message, hashes))
    }))
    .unwrap_or_else(|_| {
        tracing::warn!("Automerge panicked generating a sync message");
        None
    })
}

impl Dag {
    /// Automerge's `get_hashes_to_send`: the changes they named in `need`, then those since
    /// their `last_sync` that none of their Bloom filters holds, with every change that has one
    /// of those in its history (a false positive must not hold back a change they cannot apply
    /// without).
    ///
    /// An actor's changes form a chain, and each change's vector clock says how far along each
    /// chain its history reaches, so this walks the chains instead of the graph: a change lacks
    /// what they lack once its clock reaches an actor's first change that they lack, and the
    /// rest of its own chain lacks it too.
    fn hashes_to_send(&self, have: &[automerge::sync::Have], need: &[ChangeHash]) -> Vec<ChangeHash> {
        let mut named = HashSet::new();
        let mut to_send: Vec<ChangeHash> =
            need.iter().filter(|h| self.metas.contains_key(h) && named.insert(**h)).copied().collect();
        if have.is_empty() {
            return to_send;
        }
        let last_sync: Vec<ChangeHash> = have.iter().flat_map(|h| h.last_sync.iter().copied()).collect();
        let seen = self.prior_clock(&last_sync);
        // Each chain's changes since `last_sync`, with their sequence numbers.
        let since = |i: usize| {
            let from = seen.get(i).copied().unwrap_or(0);
            (1u64..).zip(&self.actors[i].chain).skip(usize::try_from(from).unwrap_or(usize::MAX))
        };
        // The first change of each chain that none of their Bloom filters holds.
        let lacking: Vec<(usize, u64)> = (0..self.actors.len())
            .filter_map(|i| since(i).find(|(_, h)| have.iter().all(|b| !b.bloom.contains_hash(h))).map(|(seq, _)| (i, seq)))
            .collect();
        if lacking.is_empty() {
            return to_send;
        }
        for i in 0..self.actors.len() {
            let own_first = lacking.iter().find(|(a, _)| *a == i).map_or(u64::MAX, |(_, seq)| *seq);
            let mut reached = false;
            for (seq, hash) in since(i) {
                reached = reached
                    || seq >= own_first
                    || self.metas.get(hash).is_some_and(|m| {
                        lacking.iter().any(|(a, first)| m.clock.get(*a).is_some_and(|s| s >= first))
                    });
                if reached && !named.contains(hash) {
                    to_send.push(*hash);
                }
            }
        }
        to_send
    }
}

/// Automerge's `receive_sync_message` for a message without changes (we never apply changes
/// that came without an envelope), on our own index: Automerge's trims the changes sent so far
/// by walking the whole history behind the peer's heads, on every message, even with nothing
/// sent; here a change sent is in their history when their heads' clock reaches it.
fn receive(doc: &Automerge, dag: &Dag, state: &mut SyncState, message: SyncMessage) {
    #[cfg(test)]
    let expected = tests::automerge_receive(doc, state.clone(), &message);
    let SyncMessage { heads, need, have, .. } = message;
    state.in_flight = false;
    let known: Vec<ChangeHash> = heads.iter().filter(|h| dag.metas.contains_key(h)).copied().collect();
    if !state.sent_hashes.is_empty() {
        let clock = dag.prior_clock(&known);
        state.sent_hashes.retain(|h| {
            let reached = dag.metas.get(h).is_some_and(|m| {
                let own = m.clock.get(m.actor as usize).copied().unwrap_or(0);
                clock.get(m.actor as usize).is_some_and(|seen| *seen >= own)
            });
            !reached
        });
    }
    if heads == doc.get_heads() {
        state.last_sent_heads.clone_from(&heads);
    }
    if known.len() == heads.len() {
        state.shared_heads.clone_from(&heads);
        // A peer that lost all its data starts over.
        if heads.is_empty() {
            state.last_sent_heads = Vec::new();
            state.sent_hashes = BTreeSet::new();
        }
    } else {
        let mut shared: BTreeSet<ChangeHash> = state.shared_heads.iter().copied().collect();
        shared.extend(known);
        state.shared_heads = shared.into_iter().collect();
    }
    state.their_have = Some(have);
    state.their_heads = Some(heads);
    state.their_need = Some(need);
    // Only V1 is advertised (see the module doc), whatever the peer says it supports.
    state.their_capabilities = Some(vec![Capability::MessageV1]);
    #[cfg(test)]
    assert_eq!(Some(&*state), expected.as_ref(), "the sync state after a message differs from Automerge's");
}

/// Decodes a peer's sync message, after [`scan_sync_message`] bounded every count in it (a
/// Bloom filter's probe count decides what Automerge allocates per lookup).
fn decode(bytes: &[u8]) -> Result<SyncMessage, String> {
    scan_sync_message(bytes).map_err(|e| format!("refused sync message: {e}"))?;
    std::panic::catch_unwind(|| SyncMessage::decode(bytes))
        .map_err(|_| "undecodable sync message".to_string())?
        .map_err(|e| format!("undecodable sync message: {e}"))
}

impl Replica {
    /// Starts or continues a catch-up session with `peer`: the request to send, or `None` when
    /// there is nothing to ask or tell (or the session hit its limits).
    ///
    /// Call it on connect, when [`super::Accepted::MissingDeps`] reports missing dependencies,
    /// and periodically; then feed each response to [`Replica::handle_sync_response`].
    pub fn sync_request(&mut self, peer: &PeerId) -> Option<SyncRequest> {
        if let Some(session) = self.sessions.get(peer) {
            if session.state.in_flight {
                // A request is outstanding; its response continues the session. (If it is
                // lost, call `end_sync`.)
                return None;
            }
        } else {
            if self.sessions.len() >= self.config.max_sync_sessions {
                if let Some(victim) = self.sessions.keys().next().copied() {
                    self.sessions.remove(&victim);
                }
            }
            let mut session = Session::default();
            // Automerge's own `need` looks only at the document; the dependencies that
            // held-back changes wait for are asked of every peer a session starts with (a
            // Bloom-filter false positive, or gossip that delivered a change without its
            // parents, would otherwise leave them unasked).
            session.peer_missing.extend(self.missing_deps());
            if let Some(heads) = self.shared_heads.get(peer) {
                if heads.iter().all(|h| self.dag.metas.contains_key(h)) {
                    session.state.shared_heads = heads.clone();
                }
            }
            self.sessions.insert(*peer, session);
        }
        let max_rounds = self.config.max_sync_rounds;
        let session = self.sessions.get_mut(peer)?;
        session.rounds += 1;
        if session.rounds > max_rounds {
            tracing::warn!(core = %self.core, %peer, "core-sync session gave up after {max_rounds} rounds");
            self.finish(peer);
            return None;
        }
        let metas = &self.dag.metas;
        session.peer_missing.retain(|h| !metas.contains_key(h));
        let extra_need: Vec<ChangeHash> = session.peer_missing.iter().copied().collect();
        let mut message = generate(&self.doc, &self.dag, &mut session.state);
        if message.is_none() && !extra_need.is_empty() {
            session.state.have_responded = false;
            message = generate(&self.doc, &self.dag, &mut session.state);
        }
        let Some((message, sent)) = message else {
            self.finish(peer);
            return None;
        };
        let (sync_message, changes, unsent) = self.outgoing(message, &sent, &extra_need, self.config.max_sync_request_bytes);
        if !unsent.is_empty() {
            // Over the size limits: let Automerge offer these again next round.
            if let Some(session) = self.sessions.get_mut(peer) {
                for h in &unsent {
                    session.state.sent_hashes.remove(h);
                }
                session.state.have_responded = false;
            }
        }
        Some(SyncRequest { core: self.core.to_lower_hex(), sync_message: sync_message.into(), changes })
    }

    /// Ends the session with `peer`, remembering what we share for the next one.
    fn finish(&mut self, peer: &PeerId) {
        if let Some(session) = self.sessions.remove(peer) {
            if self.shared_heads.len() >= self.config.max_sync_sessions && !self.shared_heads.contains_key(peer) {
                if let Some(victim) = self.shared_heads.keys().next().copied() {
                    self.shared_heads.remove(&victim);
                }
            }
            self.shared_heads.insert(*peer, session.state.shared_heads);
        }
    }

    /// Answers a peer's request: applies the envelopes it carries, then says what we have and
    /// what we need, with the envelopes the peer lacks.
    pub fn handle_sync_request(&mut self, mut request: SyncRequest, peer: &PeerId) -> SyncResponse {
        let changes = std::mem::take(&mut request.changes);
        let checked = super::replica::check_batch(&self.core, changes, &self.delegations, &self.config);
        self.handle_checked_sync_request(request, checked, peer).0
    }

    /// [`Replica::handle_sync_request`] for a request whose envelopes went through
    /// [`super::replica::check_batch`] already (on another thread). Also returns what the
    /// request's envelopes did: a request carries changes too, and whoever reports changes
    /// that entered the document must hear of these.
    pub(crate) fn handle_checked_sync_request(
        &mut self,
        request: SyncRequest,
        checked: Vec<Result<Checked, Rejected>>,
        peer: &PeerId,
    ) -> (SyncResponse, BatchReport) {
        let core = self.core.to_lower_hex();
        let error = |e: String| SyncResponse { core: core.clone(), sync_message: Default::default(), changes: Vec::new(), error: e };
        if request.core != core {
            return (error(format!("this is core {core}, not {}", request.core)), BatchReport::default());
        }
        let report = match self.apply_checked(checked) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(core = %self.core, %peer, error = %e, "core-sync: cannot store the peer's changes");
                return (error("the responder could not store changes".into()), BatchReport::default());
            }
        };
        log_report(self, peer, &report);
        let message = match decode(&request.sync_message) {
            Ok(m) => m,
            Err(e) => return (error(e), report),
        };
        let mut state = SyncState::new();
        // Their `last_sync` is what they believe we share. If we hold all of it, we do, and our
        // Bloom filter need only cover what came after it (from a fresh state it would cover our
        // whole history, on every request); a peer that claims more than it holds only misses
        // changes itself.
        if let Some(first) = message.have.first() {
            if !first.last_sync.is_empty() && first.last_sync.iter().all(|h| self.dag.metas.contains_key(h)) {
                state.shared_heads = first.last_sync.clone();
            }
        }
        receive(&self.doc, &self.dag, &mut state, message);
        // Automerge gives up on the whole message if the peer needs a change we do not hold
        // (e.g. one we found invalid); answer the rest.
        let metas = &self.dag.metas;
        if let Some(need) = state.their_need.as_mut() {
            need.retain(|h| metas.contains_key(h));
        }
        let Some((reply, sent)) = generate(&self.doc, &self.dag, &mut state) else {
            // A fresh state always has something to say; this only happens after a panic.
            return (error("the responder could not build a sync message".into()), report);
        };
        // Envelopes over the size limits are left out; the peer's next bloom filter will not
        // contain them, so the next round sends them.
        let (sync_message, changes, _unsent) = self.outgoing(reply, &sent, &report.missing, self.config.max_sync_response_bytes);
        (SyncResponse { core, sync_message: sync_message.into(), changes, error: String::new() }, report)
    }

    /// Takes a peer's response to our request: applies its envelopes and returns the next
    /// request of the session, if any.
    pub fn handle_sync_response(&mut self, mut response: SyncResponse, peer: &PeerId) -> SyncStep {
        let changes = std::mem::take(&mut response.changes);
        let checked = super::replica::check_batch(&self.core, changes, &self.delegations, &self.config);
        self.handle_checked_sync_response(response, checked, peer)
    }

    /// [`Replica::handle_sync_response`] for a response whose envelopes went through
    /// [`super::replica::check_batch`] already (on another thread).
    pub(crate) fn handle_checked_sync_response(
        &mut self,
        response: SyncResponse,
        checked: Vec<Result<Checked, Rejected>>,
        peer: &PeerId,
    ) -> SyncStep {
        let core = self.core.to_lower_hex();
        if !response.error.is_empty() || response.core != core {
            self.sessions.remove(peer);
            let error = if response.error.is_empty() { format!("response for core {}", response.core) } else { response.error };
            return SyncStep { error: Some(error), ..Default::default() };
        }
        let report = match self.apply_checked(checked) {
            Ok(r) => r,
            Err(e) => {
                self.sessions.remove(peer);
                return SyncStep { error: Some(e.to_string()), ..Default::default() };
            }
        };
        log_report(self, peer, &report);
        let heads = self.doc.get_heads();
        let session = self.sessions.entry(*peer).or_default();
        session.peer_missing.extend(report.missing.iter().copied());
        if response.sync_message.is_empty() {
            session.state.in_flight = false;
        } else {
            let received = decode(&response.sync_message).map(|m| receive(&self.doc, &self.dag, &mut session.state, m));
            if let Err(e) = received {
                self.sessions.remove(peer);
                return SyncStep { report, error: Some(e), ..Default::default() };
            }
            let metas = &self.dag.metas;
            if let Some(need) = session.state.their_need.as_mut() {
                need.retain(|h| metas.contains_key(h));
            }
        }
        let position = (heads, session.state.their_heads.clone());
        if report.applied.is_empty() && session.last_heads.as_ref() == Some(&position) {
            session.stalled += 1;
        } else {
            session.stalled = 0;
        }
        session.last_heads = Some(position);
        if session.stalled >= 2 {
            tracing::debug!(core = %self.core, %peer, "core-sync session stalled; ending it");
            self.finish(peer);
            return SyncStep { report, ..Default::default() };
        }
        let next = self.sync_request(peer);
        SyncStep { report, next, error: None }
    }

    /// Forgets the session with `peer`: call it when a request failed or timed out, or the
    /// peer disconnected, so the next [`Replica::sync_request`] starts afresh.
    pub fn end_sync(&mut self, peer: &PeerId) {
        self.sessions.remove(peer);
    }

    /// Strips the changes out of an Automerge sync message and lists their envelopes instead,
    /// in causal order and within the size limits. Returns the encoded message, the envelopes
    /// and the hashes left out.
    fn outgoing(
        &self,
        mut message: SyncMessage,
        sent: &[ChangeHash],
        extra_need: &[ChangeHash],
        max_bytes: usize,
    ) -> (Vec<u8>, Vec<SignedChange>, Vec<ChangeHash>) {
        message.changes = ChunkList::empty();
        let mut need: BTreeSet<ChangeHash> = message.need.iter().copied().collect();
        for h in extra_need {
            if need.insert(*h) {
                message.need.push(*h);
            }
        }
        message.supported_capabilities = Some(vec![Capability::MessageV1]);
        let encoded = message.encode();
        let mut order: Vec<(u64, ChangeHash)> =
            sent.iter().filter_map(|h| self.dag.metas.get(h).map(|m| (m.seq_no, *h))).collect();
        order.sort_unstable();
        // What is left for envelopes, with room for field tags and lengths.
        let mut budget = max_bytes.saturating_sub(encoded.len() + 1024);
        // A delegation goes with an author's first envelope and whenever it differs from that
        // author's previous one: the receiver's `inflate_batch` fills in the rest.
        let mut last_delegation: HashMap<bytes::Bytes, [u8; 32]> = HashMap::new();
        let mut envelopes: Vec<SignedChange> = Vec::with_capacity(order.len().min(self.config.max_sync_changes));
        let mut unsent = Vec::new();
        // Read in slices, so that a message the limits cut short reads little more than it sends.
        for slice in order.chunks(1024) {
            if !unsent.is_empty() || envelopes.len() >= self.config.max_sync_changes {
                unsent.extend(slice.iter().map(|(_, h)| *h));
                continue;
            }
            let seq_nos: Vec<u64> = slice.iter().map(|(n, _)| *n).collect();
            for (stored, (_, hash)) in self.envelopes_at(&seq_nos).into_iter().zip(slice) {
                // A prefix of a causal order is causally closed: the receiver can apply all of it.
                if !unsent.is_empty() || envelopes.len() >= self.config.max_sync_changes {
                    unsent.push(*hash);
                    continue;
                }
                let Some((mut e, id)) = stored else {
                    tracing::warn!(core = %self.core, %hash, "core-sync: stored envelope missing");
                    continue;
                };
                if last_delegation.get(&e.author) != Some(&id) {
                    e.delegation = self.statement(&id).cloned();
                }
                let c = envelope_cost(&e);
                if c > budget && !envelopes.is_empty() {
                    unsent.push(*hash);
                    continue;
                }
                budget = budget.saturating_sub(c);
                if e.delegation.is_some() {
                    last_delegation.insert(e.author.clone(), id);
                }
                envelopes.push(e);
            }
        }
        let in_doc: BTreeSet<&ChangeHash> = sent.iter().collect();
        let mut evidence = Vec::new();
        for (hash, e) in &self.evidence {
            if in_doc.contains(hash) {
                continue;
            }
            let c = envelope_cost(e);
            if c > budget {
                break;
            }
            budget -= c;
            evidence.push(e.clone());
        }
        // Evidence keeps its delegations: it follows every change, so it changes nothing that
        // `inflate_batch` fills in before it.
        envelopes.extend(evidence);
        (encoded, envelopes, unsent)
    }
}

/// An envelope's share of a message's size limit, with room for field tags and lengths.
fn envelope_cost(e: &SignedChange) -> usize {
    e.change.len() + e.author.len() + e.signature.len() + e.core.len() + e.delegation.as_ref().map_or(0, |d| d.encoded_len()) + 24
}

fn log_report(replica: &Replica, peer: &PeerId, report: &BatchReport) {
    if !report.applied.is_empty() || !report.rejected.is_empty() || !report.held.is_empty() {
        tracing::debug!(
            core = %replica.core(),
            %peer,
            applied = report.applied.len(),
            rejected = report.rejected.len(),
            held = report.held.len(),
            "core-sync batch"
        );
    }
    for (hash, reason) in report.rejected.iter().take(3) {
        tracing::debug!(core = %replica.core(), %peer, ?hash, %reason, "core-sync: change rejected");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use automerge::sync::{Message as SyncMessage, State as SyncState, SyncDoc};
    use automerge::{Automerge, ChangeHash};
    use proptest::prelude::*;
    use serde_json::json;

    use super::super::tests::{sync, Node, Wallet, T0, YEAR};

    /// Every message a test's replicas generate is checked against what Automerge itself would
    /// have generated from the same state: the same heads, needs and Bloom filters, the same
    /// changes chosen (as hashes), and the same state after.
    pub(super) fn same_as_automerge(
        doc: &Automerge,
        before: SyncState,
        ours_state: &SyncState,
        ours: &Option<(SyncMessage, Vec<ChangeHash>)>,
    ) {
        let mut state = before;
        let sent_before = state.sent_hashes.clone();
        let Ok(theirs) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| doc.generate_sync_message(&mut state))) else {
            return; // Automerge panics on this input: the check above caught it.
        };
        match (theirs, ours) {
            (None, None) => {}
            (Some(theirs), Some((ours, hashes))) => {
                assert_eq!((&theirs.heads, &theirs.need, &theirs.have), (&ours.heads, &ours.need, &ours.have));
                let chosen: BTreeSet<ChangeHash> = state.sent_hashes.difference(&sent_before).copied().collect();
                assert_eq!(chosen, hashes.iter().copied().collect::<BTreeSet<_>>(), "the changes chosen differ from Automerge's");
                assert_eq!(hashes.len(), chosen.len(), "a change chosen twice");
            }
            (theirs, ours) => panic!("Automerge generates {theirs:?}, we generate {ours:?}"),
        }
        assert_eq!(&state, ours_state, "the sync state after differs from Automerge's");
    }

    /// Automerge's own `receive_sync_message` on a copy of the state, for `receive` to compare
    /// with (`None` if it panics or errs: ours must not, and the caller checks it got a state).
    pub(super) fn automerge_receive(doc: &Automerge, mut state: SyncState, message: &SyncMessage) -> Option<SyncState> {
        let mut message = message.clone();
        message.changes = automerge::sync::ChunkList::empty();
        let mut doc = doc.clone();
        let received = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| doc.receive_sync_message(&mut state, message)));
        state.their_capabilities = Some(vec![automerge::sync::Capability::MessageV1]);
        matches!(received, Ok(Ok(()))).then_some(state)
    }

    /// What to do next in a random history of three replicas of one core.
    #[derive(Debug, Clone)]
    enum Step {
        Write { node: usize },
        Sync { from: usize, with: usize },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => (0..3usize).prop_map(|node| Step::Write { node }),
            1 => (0..3usize, 0..3usize).prop_map(|(from, with)| Step::Sync { from, with }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        /// Three replicas write and catch up with each other in a random order, so sessions
        /// start from every kind of divergence (several actors, concurrent branches, one side
        /// ahead); every message they generate goes through `same_as_automerge`, and in the end
        /// all three converge.
        #[test]
        fn changes_chosen_are_automerges_in_random_histories(steps in proptest::collection::vec(step(), 1..40)) {
            let owner = Wallet::new();
            let core = owner.address;
            let mut nodes = [Node::new(), Node::new(), Node::new()];
            let delegations: Vec<_> = nodes.iter().map(|n| owner.delegate(&n.peer, &["*"], YEAR, T0)).collect();
            for (i, step) in steps.iter().enumerate() {
                match *step {
                    Step::Write { node } => {
                        let key = nodes[node].keypair.clone();
                        let n = i as i64;
                        nodes[node].replica(core).set_at("app", &format!("k{}", i % 5), &json!(n), &key, &delegations[node], T0 + n).expect("write");
                    }
                    Step::Sync { from, with } if from != with => {
                        let (a, b) = pair(&mut nodes, from, with);
                        sync(a, b, core);
                    }
                    Step::Sync { .. } => {}
                }
            }
            let (a, b) = pair(&mut nodes, 0, 1);
            sync(a, b, core);
            let (b, c) = pair(&mut nodes, 1, 2);
            sync(c, b, core);
            let (a, b) = pair(&mut nodes, 0, 1);
            sync(a, b, core);
            let heads: Vec<_> = nodes.iter_mut().map(|n| n.replica(core).heads()).collect();
            prop_assert_eq!(&heads[0], &heads[1]);
            prop_assert_eq!(&heads[1], &heads[2]);
        }
    }

    /// A catch-up message carries an author's delegation once, with its first envelope; the
    /// receiver fills it in for the others and applies them all.
    #[test]
    fn a_delegation_is_sent_once_per_author_and_filled_in_by_the_receiver() {
        let owner = Wallet::new();
        let core = owner.address;
        let (mut a, mut b) = (Node::new(), Node::new());
        let delegation = owner.delegate(&a.peer, &["*"], YEAR, T0);
        let key = a.keypair.clone();
        for i in 0..5 {
            a.replica(core).set_at("app", &format!("k{i}"), &json!(i), &key, &delegation, T0 + i).expect("write");
        }
        b.replica(core);
        let mut request = a.cores.sync_request(&core, &b.peer);
        let mut carried = Vec::new();
        while let Some(r) = request {
            carried.extend(r.changes.iter().map(|e| e.delegation.is_some()));
            let response = b.cores.handle_sync_request(r, &a.peer);
            request = a.cores.handle_sync_response(response, &b.peer).next;
        }
        assert_eq!(carried, [true, false, false, false, false], "five envelopes, the delegation with the first");
        assert_eq!(b.replica(core).heads(), a.replica(core).heads());
    }

    fn pair(nodes: &mut [Node; 3], a: usize, b: usize) -> (&mut Node, &mut Node) {
        assert_ne!(a, b);
        if a < b {
            let (x, y) = nodes.split_at_mut(b);
            (&mut x[a], &mut y[0])
        } else {
            let (x, y) = nodes.split_at_mut(a);
            (&mut y[0], &mut x[b])
        }
    }
}
