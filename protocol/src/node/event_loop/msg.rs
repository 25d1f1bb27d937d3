//! The event loop's share of messaging: commands from the [`MsgClient`](crate::node::MsgClient),
//! `/kubelt/msg/1.0.0` requests and answers, the outbox, inbox replication among hosts, and
//! publishing this node's device key in the cores it writes.
//!
//! Nothing slow runs here. Envelopes are verified on blocking threads (at most
//! [`MAX_VERIFYING`] requests at once, [`MAX_VERIFYING_PER_PEER`] per peer; more are answered
//! "busy"), and accepted messages and outbox records are written by one blocking task at a time:
//! whatever accumulates while a write is on its way goes in the next one, so many messages
//! share one fsync (group commit). A sender hears "accepted" only once its message is on disk.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kubelt_proto::msg::{msg_request, outcome, Deliver, Envelope, Inventory, MsgRequest, MsgResponse, Outcome};
use kubelt_proto::Message;
use libp2p::{kad, request_response, PeerId};
use tokio::sync::{mpsc, oneshot};

use super::{EventLoop, QueryPurpose};
use crate::core::change::Delegations;
use crate::core::Address;
use crate::msg::envelope::{self, MessageId, Refused, Verified};
use crate::msg::inbox::{self, Admitted, Inboxes, OutboxRecord, Write};
use crate::msg::outbox::{Outbox, MAX_BATCH};
use crate::msg::senders::{Arrival, Parked, Senders};
use crate::msg::{inbox_topic, DeviceKey, RateLimiter};
use crate::node::client::{now_ms, MsgCommand, MsgError, NodeEvent, OutboxEntry, RawMessages, Sealer};
use crate::store::Store;

/// Delivery requests being verified at once, over all peers.
const MAX_VERIFYING: usize = 64;
/// Delivery requests of one peer being verified at once.
const MAX_VERIFYING_PER_PEER: usize = 32;
/// Envelopes in one delivery request (more are refused as malformed).
const MAX_ENVELOPES_PER_REQUEST: usize = 256;
/// Ids in one inventory.
const MAX_INVENTORY_IDS: usize = 50_000;
/// Envelopes and wanted ids in one inventory answer.
const MAX_INVENTORY_ANSWER: usize = 256;
/// How often this node checks that its device key is published in the cores it writes.
const DEVICE_KEY_CHECK: Duration = Duration::from_secs(1);

/// What the event loop holds for messaging.
pub(super) struct MsgState {
    config: crate::msg::Config,
    store: Store,
    /// This node's device key (`None` for RSA node keys, which cannot derive one).
    pub(super) device: Option<Arc<DeviceKey>>,
    inboxes: Inboxes,
    outbox: Outbox,
    limiter: RateLimiter,
    /// Messages whose sender core is being caught up before their verdict.
    senders: Senders,
    delegations: Delegations,
    work_tx: mpsc::Sender<MsgWork>,
    work: mpsc::Receiver<MsgWork>,
    verifying: HashMap<PeerId, usize>,
    verifying_total: usize,
    writer: Writer,
    outbound: HashMap<request_response::OutboundRequestId, Outbound>,
    /// Cores whose inbox topic this node subscribes to.
    hosting: HashSet<Address>,
    /// When this node last compared inventories with each host of each core.
    inventories: HashMap<(Address, PeerId), Instant>,
    last_device_check: Option<Instant>,
    /// Whether the stored messages were checked against the revocations in the store since
    /// start (a crash between applying a revocation and removing its messages, or messages
    /// stored by an older version).
    revocations_swept: bool,
}

/// Work that comes back to the event loop from blocking threads.
pub(super) enum MsgWork {
    /// Envelopes, verified.
    Verified { origin: Origin, results: Vec<Result<Verified, Refused>> },
    /// A group of writes is on disk (or failed).
    Written { waiters: Vec<Waiter>, result: Result<(), String> },
}

/// Where envelopes in verification came from.
pub(super) enum Origin {
    /// A delivery request, to be answered; `refused` are its envelopes refused before
    /// verification, by position.
    Delivery { peer: PeerId, channel: request_response::ResponseChannel<MsgResponse>, refused: HashMap<usize, Refused>, total: usize },
    /// An inventory answer of another host.
    Replication { peer: PeerId },
}

impl Origin {
    fn peer(&self) -> PeerId {
        match self {
            Origin::Delivery { peer, .. } | Origin::Replication { peer } => *peer,
        }
    }
}

/// What waits for a group write.
pub(super) enum Waiter {
    /// Answer a delivery request; announce and forward the new messages.
    Answer { peer: PeerId, channel: request_response::ResponseChannel<MsgResponse>, outcomes: Vec<Outcome>, new: Vec<NewMessage> },
    /// Announce and forward messages learned from another host.
    Learned { peer: PeerId, new: Vec<NewMessage> },
    /// A message this node sends (boxed: the largest waiter by far).
    Queued(Box<Queued>),
    /// A command that only needed the write.
    Done(oneshot::Sender<Result<(), MsgError>>),
    /// Nobody waits (outbox clean-up, read marks).
    Nothing,
}

/// A message this node sends: into the outbox (or, hosted here, it is delivered).
pub(super) struct Queued {
    id: MessageId,
    to: Address,
    envelope: Envelope,
    created_at: i64,
    local: Option<NewMessage>,
    reply: oneshot::Sender<Result<bool, MsgError>>,
}

/// A message that entered an inbox.
pub(super) struct NewMessage {
    id: MessageId,
    to: Address,
    from: Address,
    envelope: Envelope,
}

/// What an outbound request was for.
enum Outbound {
    /// Outbox messages for a replica.
    Outbox(Vec<MessageId>),
    /// Messages pushed to another host (nobody waits for the answer).
    Forward,
    /// An inventory of a core's inbox.
    Inventory(Address),
}

/// Writes of accumulated work, one group on disk at a time.
#[derive(Default)]
struct Writer {
    writes: Vec<Write>,
    waiters: Vec<Waiter>,
    busy: bool,
}

impl MsgState {
    pub(super) fn new(keypair: &libp2p::identity::Keypair, store: Store, config: crate::msg::Config) -> Result<Self, crate::store::StoreError> {
        let (inboxes, records) = Inboxes::load(&store)?;
        let mut outbox = Outbox::default();
        let now = Instant::now();
        for (id, record) in records {
            match Envelope::decode(record.envelope.as_slice()).ok().and_then(|e| Some((envelope::recipient_hint(&e).ok()?, e))) {
                Some((to, envelope)) => outbox.add(id, to, envelope, record.created_at, now),
                None => tracing::warn!(%id, "unreadable outbox record skipped"),
            }
        }
        let device = match DeviceKey::from_keypair(keypair) {
            Ok(key) => Some(Arc::new(key)),
            Err(e) => {
                tracing::warn!("messaging: {e}; this node can host inboxes but not read messages");
                None
            }
        };
        let (work_tx, work) = mpsc::channel(MAX_VERIFYING + 16);
        let senders = Senders::new(config.senders);
        Ok(MsgState {
            config,
            store,
            device,
            inboxes,
            outbox,
            limiter: RateLimiter::default(),
            senders,
            delegations: Delegations::default(),
            work_tx,
            work,
            verifying: HashMap::new(),
            verifying_total: 0,
            writer: Writer::default(),
            outbound: HashMap::new(),
            hosting: HashSet::new(),
            inventories: HashMap::new(),
            last_device_check: None,
            revocations_swept: false,
        })
    }

    /// The next piece of work back from a blocking thread.
    pub(super) async fn next_work(&mut self) -> Option<MsgWork> {
        self.work.recv().await
    }

    /// Starts verifying envelopes on a blocking thread; gives `origin` back when over the
    /// limits (the caller answers "busy").
    fn verify(&mut self, origin: Origin, envelopes: Vec<Envelope>) -> Result<(), Box<Origin>> {
        let peer = origin.peer();
        let mine = self.verifying.get(&peer).copied().unwrap_or(0);
        if self.verifying_total >= MAX_VERIFYING || mine >= MAX_VERIFYING_PER_PEER {
            return Err(Box::new(origin));
        }
        *self.verifying.entry(peer).or_default() += 1;
        self.verifying_total += 1;
        let delegations = self.delegations.clone();
        let max_age = i64::try_from(self.config.max_age.as_millis()).unwrap_or(i64::MAX);
        let tx = self.work_tx.clone();
        tokio::task::spawn_blocking(move || {
            let now = now_ms();
            let results = envelopes.into_iter().map(|e| envelope::verify(e, &delegations, now, max_age)).collect();
            // Capacity covers every request in verification: this never waits long.
            let _ = tx.blocking_send(MsgWork::Verified { origin, results });
        });
        Ok(())
    }

    fn verified(&mut self, peer: &PeerId) {
        self.verifying_total = self.verifying_total.saturating_sub(1);
        if let Some(n) = self.verifying.get_mut(peer) {
            *n -= 1;
            if *n == 0 {
                self.verifying.remove(peer);
            }
        }
    }

    /// Queues writes and what waits for them; starts a group write when none is on its way.
    fn write(&mut self, writes: Vec<Write>, waiter: Waiter) {
        self.writer.writes.extend(writes);
        self.writer.waiters.push(waiter);
        self.start_write();
    }

    fn start_write(&mut self) {
        if self.writer.busy || self.writer.waiters.is_empty() {
            return;
        }
        self.writer.busy = true;
        let writes = std::mem::take(&mut self.writer.writes);
        let waiters = std::mem::take(&mut self.writer.waiters);
        let store = self.store.clone();
        let tx = self.work_tx.clone();
        tokio::task::spawn_blocking(move || {
            let result = if writes.is_empty() { Ok(()) } else { inbox::commit(&store, &writes, true).map_err(|e| e.to_string()) };
            let _ = tx.blocking_send(MsgWork::Written { waiters, result });
        });
    }
}

fn outcome(result: Result<(), &Refused>) -> Outcome {
    match result {
        Ok(()) => Outcome { status: outcome::Status::Accepted as i32, reason: String::new() },
        Err(r) if r.retry() => Outcome { status: outcome::Status::Retry as i32, reason: r.to_string() },
        Err(r) => Outcome { status: outcome::Status::Refused as i32, reason: r.to_string() },
    }
}

fn storage(e: impl std::fmt::Display) -> MsgError {
    MsgError::Storage(e.to_string())
}

impl EventLoop {
    pub(super) fn on_msg_command(&mut self, command: MsgCommand) {
        match command {
            MsgCommand::Prepare { from, to, reply } => {
                let _ = reply.send(self.msg_prepare(from, to));
            }
            MsgCommand::Queue { id, to, envelope, created_at, reply } => self.msg_queue(id, to, envelope, created_at, reply),
            MsgCommand::Inbox { core, since, reply } => {
                let _ = reply.send(self.msg_inbox(core, since));
            }
            MsgCommand::Read { id, reply } => {
                let _ = reply.send(self.msg_read(id, true));
            }
            MsgCommand::Get { id, reply } => {
                let _ = reply.send(self.msg_read(id, false));
            }
            MsgCommand::Delete { id, reply } => match self.msg.inboxes.delete(&id, now_ms()) {
                Some(writes) => self.msg.write(writes, Waiter::Done(reply)),
                None => {
                    let _ = reply.send(Err(MsgError::NotFound(id.to_string())));
                }
            },
            MsgCommand::Outbox { reply } => {
                let ids: Vec<OutboxEntry> = self.msg_outbox();
                let _ = reply.send(ids);
            }
        }
    }

    fn msg_prepare(&mut self, from: Address, to: Address) -> Result<Sealer, MsgError> {
        let local = *self.swarm.local_peer_id();
        let sender = self.cores.replicas.get_mut(&from).ok_or_else(|| MsgError::NotHeld(from.to_checksum()))?;
        let delegation = sender.own_delegation().cloned().ok_or_else(|| MsgError::NotWritable(from.to_checksum()))?;
        if sender.revocations().iter().any(|r| r.peer == local) {
            return Err(MsgError::Revoked(from.to_checksum()));
        }
        let Some(recipient) = self.cores.replicas.get_mut(&to) else {
            // Learn the recipient's device keys: follow its core, as a contact (no inbox here).
            self.cores.replicas.follow(to).map_err(storage)?;
            if let Some(write) = self.msg.inboxes.set_contact(to, true) {
                inbox::commit(&self.store, &[write], true).map_err(storage)?;
            }
            self.join_core(to);
            tracing::info!(core = %to, "following the recipient's core to learn its device keys");
            return Err(MsgError::NoDeviceKeys { core: to.to_checksum(), following: true });
        };
        let devices: Vec<[u8; 32]> = recipient.device_keys().into_iter().map(|(_, key)| key).collect();
        if devices.is_empty() {
            // Still catching up when the core was just followed.
            let following = self.msg.inboxes.is_contact(&to) && recipient.is_empty();
            return Err(MsgError::NoDeviceKeys { core: to.to_checksum(), following });
        }
        Ok(Sealer { keypair: self.cores.keypair.clone(), delegation, devices })
    }

    fn msg_queue(&mut self, id: MessageId, to: Address, envelope: Envelope, created_at: i64, reply: oneshot::Sender<Result<bool, MsgError>>) {
        let mut writes = Vec::new();
        let local = if self.msg_hosts(&to) {
            // This node hosts the recipient's inbox: it takes the message itself.
            let verified = envelope::verify(envelope.clone(), &self.msg.delegations, now_ms(), i64::MAX);
            match verified.map(|v| (self.msg.inboxes.admit(&v, now_ms(), &self.msg.config, &mut writes), v)) {
                Ok((Ok(Admitted::New), v)) => Some(NewMessage { id, to, from: v.from, envelope: envelope.clone() }),
                Ok((Ok(Admitted::Known), _)) => None,
                Ok((Err(e), _)) | Err(e) => {
                    let _ = reply.send(Err(MsgError::Storage(e.to_string())));
                    return;
                }
            }
        } else {
            None
        };
        if local.is_none() || !self.msg_hosts_online(&to).is_empty() {
            let record = OutboxRecord { envelope: envelope.encode_to_vec(), created_at };
            writes.push(Write::Put(inbox::outbox_key(&id), record.encode_to_vec()));
        }
        self.msg.write(writes, Waiter::Queued(Box::new(Queued { id, to, envelope, created_at, local, reply })));
    }

    fn msg_inbox(&mut self, core: Address, since: Option<i64>) -> Result<RawMessages, MsgError> {
        if !self.msg_hosts(&core) {
            return Err(MsgError::NoInbox(core.to_checksum()));
        }
        let mut messages = Vec::new();
        for (id, entry) in self.msg.inboxes.entries(&core) {
            if since.is_some_and(|s| entry.received_at <= s) {
                continue;
            }
            if let Some(stored) = self.msg.inboxes.stored(&self.store, &id).map_err(storage)? {
                if let Ok(envelope) = Envelope::decode(stored.envelope.as_slice()) {
                    messages.push((id, core, entry, envelope));
                }
            }
        }
        Ok(RawMessages { device: self.msg.device.clone(), messages })
    }

    /// One stored message; `mark` marks it read on this node.
    fn msg_read(&mut self, id: MessageId, mark: bool) -> Result<RawMessages, MsgError> {
        let (core, mut entry) = self.msg.inboxes.entry(&id).ok_or_else(|| MsgError::NotFound(id.to_string()))?;
        let stored = self.msg.inboxes.stored(&self.store, &id).map_err(storage)?.ok_or_else(|| MsgError::NotFound(id.to_string()))?;
        let envelope = Envelope::decode(stored.envelope.as_slice()).map_err(storage)?;
        if mark {
            if let Some(write) = self.msg.inboxes.mark_read(&id, &stored) {
                self.msg.write(vec![write], Waiter::Nothing);
            }
            entry.read = true;
        }
        Ok(RawMessages { device: self.msg.device.clone(), messages: vec![(id, core, entry, envelope)] })
    }

    fn msg_outbox(&self) -> Vec<OutboxEntry> {
        let mut entries = Vec::new();
        for item in self.store.iter_prefix(crate::store::Column::Messages, b"o/") {
            let Ok((key, _)) = item else { continue };
            if let Some(id) = MessageId::from_slice(&key[2..]) {
                if let Some(to) = self.msg.outbox.recipient(&id) {
                    entries.push(OutboxEntry { id: id.to_string(), to: to.to_checksum() });
                }
            }
        }
        entries
    }

    /// Whether this node hosts a core's inbox: it holds the core, and not only as a contact.
    fn msg_hosts(&self, core: &Address) -> bool {
        self.cores.replicas.holds(core) && !self.msg.inboxes.is_contact(core)
    }

    /// Connected peers that host a core's inbox.
    fn msg_hosts_online(&self, core: &Address) -> Vec<PeerId> {
        let topic = inbox_topic(core).hash();
        self.swarm.behaviour().gossipsub.all_peers().filter(|(_, topics)| topics.contains(&&topic)).map(|(peer, _)| *peer).collect()
    }

    /// A core this node holds was followed on purpose: it hosts the core's inbox from now on.
    pub(super) fn msg_core_followed(&mut self, core: Address) {
        if let Some(write) = self.msg.inboxes.set_contact(core, false) {
            self.msg.write(vec![write], Waiter::Nothing);
        }
    }

    pub(super) fn on_msg_event(&mut self, event: request_response::Event<MsgRequest, MsgResponse>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request { request, channel, .. } => self.on_msg_request(peer, request, channel),
                request_response::Message::Response { request_id, response } => self.on_msg_response(peer, request_id, response),
            },
            request_response::Event::OutboundFailure { peer, request_id, error, .. } => {
                tracing::debug!(%peer, "messaging request failed: {error}");
                if let Some(Outbound::Outbox(ids)) = self.msg.outbound.remove(&request_id) {
                    let now = Instant::now();
                    for id in ids {
                        self.msg.outbox.failed(&id, now);
                    }
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, "messaging answer failed: {error}");
            }
            _ => {}
        }
    }

    fn msg_answer(&mut self, channel: request_response::ResponseChannel<MsgResponse>, response: MsgResponse) {
        let _ = self.swarm.behaviour_mut().msg.send_response(channel, response);
    }

    fn on_msg_request(&mut self, peer: PeerId, request: MsgRequest, channel: request_response::ResponseChannel<MsgResponse>) {
        match request.kind {
            Some(msg_request::Kind::Deliver(Deliver { envelopes })) => {
                if envelopes.len() > MAX_ENVELOPES_PER_REQUEST {
                    let error = format!("at most {MAX_ENVELOPES_PER_REQUEST} messages per request");
                    return self.msg_answer(channel, MsgResponse { error, ..Default::default() });
                }
                // Envelopes for cores whose inbox is not hosted here are refused before any work.
                let mut refused = HashMap::new();
                let mut to_verify = Vec::with_capacity(envelopes.len());
                for (i, e) in envelopes.into_iter().enumerate() {
                    match envelope::recipient_hint(&e) {
                        Ok(to) if self.msg_hosts(&to) => to_verify.push(e),
                        Ok(to) => drop(refused.insert(i, Refused::NotHeld(to.to_checksum()))),
                        Err(r) => drop(refused.insert(i, r)),
                    }
                }
                if to_verify.is_empty() {
                    let outcomes = (0..refused.len()).map(|i| outcome(Err(&refused[&i]))).collect();
                    return self.msg_answer(channel, MsgResponse { outcomes, ..Default::default() });
                }
                let total = refused.len() + to_verify.len();
                if let Err(Origin::Delivery { channel, .. }) = self.msg.verify(Origin::Delivery { peer, channel, refused, total }, to_verify).map_err(|o| *o) {
                    tracing::debug!(%peer, "messaging: too many deliveries in verification; answering busy");
                    let outcomes = (0..total).map(|_| outcome(Err(&Refused::Busy))).collect();
                    self.msg_answer(channel, MsgResponse { outcomes, ..Default::default() });
                }
            }
            Some(msg_request::Kind::Inventory(inventory)) => {
                let response = self.msg_inventory_answer(inventory);
                self.msg_answer(channel, response);
            }
            None => self.msg_answer(channel, MsgResponse { error: "empty request".into(), ..Default::default() }),
        }
    }

    /// Answers another host's inventory: the messages it lacks, and the ids this node lacks.
    fn msg_inventory_answer(&mut self, inventory: Inventory) -> MsgResponse {
        let Ok(core) = Address::parse(&inventory.core) else {
            return MsgResponse { error: "malformed core".into(), ..Default::default() };
        };
        if !self.msg_hosts(&core) {
            return MsgResponse { error: Refused::NotHeld(core.to_checksum()).to_string(), ..Default::default() };
        }
        if inventory.ids.len() > MAX_INVENTORY_IDS {
            return MsgResponse { error: format!("at most {MAX_INVENTORY_IDS} ids"), ..Default::default() };
        }
        let theirs: HashSet<MessageId> = inventory.ids.iter().filter_map(|id| MessageId::from_slice(id)).collect();
        let mut response = MsgResponse::default();
        for id in &theirs {
            if response.want.len() >= MAX_INVENTORY_ANSWER {
                break;
            }
            if !self.msg.inboxes.knows(&core, id) {
                response.want.push(id.0.to_vec().into());
            }
        }
        for (id, _) in self.msg.inboxes.entries(&core) {
            if response.envelopes.len() >= MAX_INVENTORY_ANSWER {
                break;
            }
            if !theirs.contains(&id) {
                if let Ok(Some(stored)) = self.msg.inboxes.stored(&self.store, &id) {
                    if let Ok(envelope) = Envelope::decode(stored.envelope.as_slice()) {
                        response.envelopes.push(envelope);
                    }
                }
            }
        }
        response
    }

    fn on_msg_response(&mut self, peer: PeerId, request_id: request_response::OutboundRequestId, response: MsgResponse) {
        match self.msg.outbound.remove(&request_id) {
            Some(Outbound::Outbox(ids)) => {
                let now = Instant::now();
                let mut writes = Vec::new();
                for (i, id) in ids.into_iter().enumerate() {
                    let status = response.outcomes.get(i).map(|o| o.status());
                    match status {
                        Some(outcome::Status::Accepted) | Some(outcome::Status::Refused) => {
                            if let Some(to) = self.msg.outbox.done(&id) {
                                writes.push(Write::Delete(inbox::outbox_key(&id)));
                                if status == Some(outcome::Status::Accepted) {
                                    tracing::debug!(%peer, %id, "message delivered");
                                    self.announce(NodeEvent::MessageDelivered { id, to });
                                } else {
                                    let reason = response.outcomes.get(i).map(|o| o.reason.clone()).unwrap_or_default();
                                    tracing::warn!(%peer, %id, "a replica refused the message for good: {reason}");
                                    self.announce(NodeEvent::MessageRefused { id, to, reason });
                                }
                            }
                        }
                        Some(outcome::Status::Retry) if response.outcomes[i].reason == Refused::Busy.to_string() => self.msg.outbox.busy(&id, now),
                        _ => self.msg.outbox.failed(&id, now),
                    }
                }
                if !writes.is_empty() {
                    self.msg.write(writes, Waiter::Nothing);
                }
            }
            Some(Outbound::Inventory(core)) => {
                if !response.error.is_empty() {
                    tracing::debug!(%peer, %core, "inventory refused: {}", response.error);
                    return;
                }
                let wanted: Vec<Envelope> = response
                    .want
                    .iter()
                    .take(MAX_INVENTORY_ANSWER)
                    .filter_map(|id| MessageId::from_slice(id))
                    .filter_map(|id| self.msg.inboxes.stored(&self.store, &id).ok().flatten())
                    .filter_map(|stored| Envelope::decode(stored.envelope.as_slice()).ok())
                    .collect();
                if !wanted.is_empty() {
                    self.msg_send_request(peer, wanted, Outbound::Forward);
                }
                let envelopes: Vec<Envelope> = response.envelopes.into_iter().take(MAX_INVENTORY_ANSWER).collect();
                if !envelopes.is_empty() && self.msg.verify(Origin::Replication { peer }, envelopes).is_err() {
                    tracing::debug!(%peer, "messaging: too much in verification; the next inventory brings the rest");
                }
            }
            Some(Outbound::Forward) | None => {}
        }
    }

    fn msg_send_request(&mut self, peer: PeerId, envelopes: Vec<Envelope>, purpose: Outbound) {
        let request = MsgRequest { kind: Some(msg_request::Kind::Deliver(Deliver { envelopes })) };
        let id = self.swarm.behaviour_mut().msg.send_request(&peer, request);
        self.msg.outbound.insert(id, purpose);
    }

    /// Work back from a blocking thread.
    pub(super) fn on_msg_work(&mut self, work: MsgWork) {
        match work {
            MsgWork::Verified { origin: Origin::Delivery { peer, channel, mut refused, total }, results } => {
                self.msg.verified(&peer);
                // Put the early refusals back in their places.
                let mut verified = results.into_iter();
                let results = (0..total).map(|i| refused.remove(&i).map_or_else(|| verified.next().unwrap_or(Err(Refused::Busy)), Err)).collect();
                let (outcomes, writes, new) = self.msg_admit(&peer, results, false);
                self.msg.write(writes, Waiter::Answer { peer, channel, outcomes, new });
            }
            MsgWork::Verified { origin: Origin::Replication { peer }, results } => {
                self.msg.verified(&peer);
                let (_, writes, new) = self.msg_admit(&peer, results, false);
                if !new.is_empty() {
                    self.msg.write(writes, Waiter::Learned { peer, new });
                }
            }
            MsgWork::Written { waiters, result } => {
                self.msg.writer.busy = false;
                for waiter in waiters {
                    self.msg_written(waiter, &result);
                }
                self.msg.start_write();
            }
        }
    }

    /// The checks that need this node's state, for verified envelopes: hosted here, sender
    /// not revoked, the sender core's rate, the inbox bounds, duplicates. A message whose
    /// sender core this node does not hold waits for that core's catch-up (it is parked and
    /// the sender asked to retry), unless `decide_now` (the wait is over).
    fn msg_admit(&mut self, peer: &PeerId, results: Vec<Result<Verified, Refused>>, decide_now: bool) -> (Vec<Outcome>, Vec<Write>, Vec<NewMessage>) {
        let now = Instant::now();
        let now_ms = now_ms();
        let mut writes = Vec::new();
        let mut new = Vec::new();
        let mut follow = Vec::new();
        // Revoked keys of the sender cores held here, from the store when a replica is not in
        // memory (a revocation is a durable fact, never only a loaded one).
        let mut revoked: HashMap<Address, Vec<PeerId>> = HashMap::new();
        for v in results.iter().flatten() {
            if let std::collections::hash_map::Entry::Vacant(entry) = revoked.entry(v.from) {
                entry.insert(match self.cores.replicas.revocations(&v.from) {
                    Ok(list) => list.into_iter().map(|r| r.peer).collect(),
                    Err(e) => {
                        tracing::error!(core = %v.from, "cannot read the core's revocations: {e}");
                        Vec::new()
                    }
                });
            }
        }
        let outcomes = results
            .into_iter()
            .map(|result| {
                let admitted = result.and_then(|v| {
                    if !self.msg_hosts(&v.to) {
                        return Err(Refused::NotHeld(v.to.to_checksum()));
                    }
                    if !decide_now && !self.cores.replicas.holds(&v.from) {
                        if self.msg.inboxes.knows(&v.to, &v.id) {
                            return Ok(());
                        }
                        let from = v.from;
                        if self.msg.senders.park(v, *peer, now) == (Arrival::Parked { follow: true }) {
                            follow.push(from);
                        }
                        return Err(Refused::SenderPending(from.to_checksum()));
                    }
                    if revoked.get(&v.from).is_some_and(|peers| peers.contains(&v.author)) {
                        return Err(Refused::Revoked(v.author.to_base58()));
                    }
                    if self.msg.inboxes.knows(&v.to, &v.id) {
                        return Ok(());
                    }
                    let (rate, burst) = (self.msg.config.rate_per_sender, self.msg.config.burst_per_sender);
                    if !self.msg.limiter.take(v.from, now, rate, burst) {
                        return Err(Refused::RateLimited(v.from.to_checksum()));
                    }
                    if self.msg.inboxes.admit(&v, now_ms, &self.msg.config, &mut writes)? == Admitted::New {
                        new.push(NewMessage { id: v.id, to: v.to, from: v.from, envelope: v.envelope });
                    }
                    Ok(())
                });
                if let Err(reason) = &admitted {
                    if !reason.retry() {
                        tracing::warn!(%peer, "refused a message: {reason}");
                    }
                }
                outcome(admitted.as_ref().map(|_| ()))
            })
            .collect();
        for core in follow {
            self.msg_follow_sender(core);
        }
        (outcomes, writes, new)
    }

    /// Follows a sender core as a contact (no inbox of it here) and starts its catch-up, so
    /// that the verdict on its messages knows its revocations.
    fn msg_follow_sender(&mut self, core: Address) {
        if self.cores.replicas.holds(&core) {
            return;
        }
        // The contact mark is on disk before the core is held: a crash in between must not
        // leave this node hosting the sender's inbox (its other correspondents' messages).
        // One synced write per new sender core, bounded by the parking limits.
        if let Some(write) = self.msg.inboxes.set_contact(core, true) {
            if let Err(e) = inbox::commit(&self.store, &[write], true) {
                self.msg.inboxes.set_contact(core, false);
                tracing::error!(%core, "cannot record the sender core as a contact: {e}; its messages are decided without it");
                return;
            }
        }
        if let Err(e) = self.cores.replicas.follow(core) {
            tracing::error!(%core, "cannot follow the sender core: {e}; its messages are decided without it");
            return;
        }
        self.join_core(core);
        tracing::info!(%core, "catching up a sender core before deciding on its messages");
    }

    /// A catch-up session of `core` ended in sync: the messages that waited for it are decided.
    pub(super) fn msg_sender_caught_up(&mut self, core: Address) {
        if self.msg.senders.is_waiting(&core) {
            let parked = self.msg.senders.caught_up(&core);
            tracing::debug!(%core, messages = parked.len(), "sender core caught up; deciding on its messages");
            self.msg_release(parked);
        }
    }

    /// Decides on parked messages with what this node knows now.
    fn msg_release(&mut self, parked: Vec<Parked>) {
        let mut by_peer: HashMap<PeerId, Vec<Result<Verified, Refused>>> = HashMap::new();
        for Parked { message, peer } in parked {
            by_peer.entry(peer).or_default().push(Ok(message));
        }
        for (peer, results) in by_peer {
            let (_, writes, new) = self.msg_admit(&peer, results, true);
            if !new.is_empty() {
                self.msg.write(writes, Waiter::Learned { peer, new });
            }
        }
    }

    /// Changes entered core `core`: if this node stores messages sent as that core, those
    /// signed by a key its owner has revoked are removed (whenever the revocation arrives).
    pub(super) fn msg_core_changed(&mut self, core: Address) {
        if !self.msg.inboxes.has_sender(&core) {
            return;
        }
        let revoked: HashSet<PeerId> = match self.cores.replicas.revocations(&core) {
            Ok(list) => list.into_iter().map(|r| r.peer).collect(),
            Err(e) => {
                tracing::error!(%core, "cannot read the core's revocations: {e}");
                return;
            }
        };
        let (ids, writes) = self.msg.inboxes.remove_revoked(&core, &revoked, now_ms());
        if !ids.is_empty() {
            tracing::warn!(sender = %core, removed = ids.len(), "removed stored messages signed by a key the sender core's owner revoked");
            self.msg.write(writes, Waiter::Nothing);
        }
    }

    /// A group write finished: answer, announce, forward, or undo.
    fn msg_written(&mut self, waiter: Waiter, result: &Result<(), String>) {
        match (waiter, result) {
            (Waiter::Answer { peer, channel, outcomes, new }, Ok(())) => {
                self.msg_answer(channel, MsgResponse { outcomes, ..Default::default() });
                self.msg_learned(Some(peer), new);
            }
            (Waiter::Answer { channel, mut outcomes, new, .. }, Err(e)) => {
                tracing::error!("cannot store messages: {e}");
                for m in &new {
                    self.msg.inboxes.forget(&m.to, &m.id);
                }
                for o in &mut outcomes {
                    *o = Outcome { status: outcome::Status::Retry as i32, reason: "storage failed".into() };
                }
                self.msg_answer(channel, MsgResponse { outcomes, ..Default::default() });
            }
            (Waiter::Learned { peer, new }, Ok(())) => self.msg_learned(Some(peer), new),
            (Waiter::Learned { new, .. }, Err(e)) => {
                tracing::error!("cannot store messages: {e}");
                for m in &new {
                    self.msg.inboxes.forget(&m.to, &m.id);
                }
            }
            (Waiter::Queued(queued), Ok(())) => {
                let Queued { id, to, envelope, created_at, local, reply } = *queued;
                let delivered = local.is_some();
                if let Some(message) = local {
                    self.announce(NodeEvent::MessageDelivered { id, to });
                    self.msg_learned(None, vec![message]);
                } else {
                    self.msg.outbox.add(id, to, envelope, created_at, Instant::now());
                    self.msg_dispatch(Instant::now());
                }
                let _ = reply.send(Ok(delivered));
            }
            (Waiter::Queued(queued), Err(e)) => {
                let Queued { id, to, local, reply, .. } = *queued;
                if local.is_some() {
                    self.msg.inboxes.forget(&to, &id);
                }
                let _ = reply.send(Err(MsgError::Storage(e.clone())));
            }
            (Waiter::Done(reply), result) => {
                let _ = reply.send(result.clone().map_err(MsgError::Storage));
            }
            (Waiter::Nothing, Ok(())) => {}
            (Waiter::Nothing, Err(e)) => tracing::error!("messaging write failed: {e}"),
        }
    }

    /// Messages that entered an inbox: announced, and pushed to the other hosts online.
    fn msg_learned(&mut self, source: Option<PeerId>, new: Vec<NewMessage>) {
        let mut forwards: HashMap<PeerId, Vec<Envelope>> = HashMap::new();
        for message in new {
            self.announce(NodeEvent::MessageReceived { core: message.to, id: message.id, from: message.from });
            for host in self.msg_hosts_online(&message.to) {
                if Some(host) != source {
                    forwards.entry(host).or_default().push(message.envelope.clone());
                }
            }
        }
        for (host, envelopes) in forwards {
            for chunk in envelopes.chunks(MAX_BATCH) {
                self.msg_send_request(host, chunk.to_vec(), Outbound::Forward);
            }
        }
    }

    /// Sends what the outbox decides now.
    fn msg_dispatch(&mut self, now: Instant) {
        if self.msg.outbox.is_empty() {
            return;
        }
        let hosts: HashMap<Address, Vec<PeerId>> = self.msg.outbox.recipients().into_iter().map(|core| (core, self.msg_hosts_online(&core))).collect();
        let expiry = self.msg.config.outbox_expiry;
        let plan = self.msg.outbox.plan(now, now_ms(), expiry, |core| hosts.get(core).cloned().unwrap_or_default());
        for (peer, batch) in plan.sends {
            let (ids, envelopes): (Vec<MessageId>, Vec<Envelope>) = batch.into_iter().unzip();
            self.msg_send_request(peer, envelopes, Outbound::Outbox(ids));
        }
        for core in plan.lookups {
            tracing::debug!(%core, "no replica of the recipient online; looking for one");
            let query = self.swarm.behaviour_mut().kad.get_providers(kad::RecordKey::new(&core.dht_key()));
            self.queries.insert(query, QueryPurpose::CoreReplicas(core));
        }
        if !plan.expired.is_empty() {
            let writes = plan.expired.iter().map(|(id, _)| Write::Delete(inbox::outbox_key(id))).collect();
            for (id, to) in &plan.expired {
                tracing::warn!(%id, %to, "no replica of the recipient took the message before it expired; dropped");
            }
            self.msg.write(writes, Waiter::Nothing);
        }
    }

    /// Time-driven messaging: the outbox, the inbox topics, inventories, device keys.
    pub(super) fn tick_msg(&mut self, now: Instant) {
        self.msg_dispatch(now);
        if !self.msg.revocations_swept {
            self.msg.revocations_swept = true;
            for core in self.msg.inboxes.sender_cores() {
                self.msg_core_changed(core);
            }
        }
        let due = self.msg.senders.due(now);
        if !due.is_empty() {
            tracing::debug!(messages = due.len(), "no catch-up of their sender cores in time; deciding with what this node knows");
            self.msg_release(due);
        }
        self.msg_join_inboxes();
        self.msg_inventories(now);
        if self.msg.last_device_check.is_none_or(|t| now.duration_since(t) >= DEVICE_KEY_CHECK) {
            self.msg.last_device_check = Some(now);
            self.msg_publish_device_key();
        }
    }

    /// Subscribes to the inbox topic of every core this node hosts (and leaves the others).
    fn msg_join_inboxes(&mut self) {
        let hosted: HashSet<Address> = self.cores.replicas.list().into_iter().filter(|c| !self.msg.inboxes.is_contact(c)).collect();
        for core in hosted.difference(&self.msg.hosting).copied().collect::<Vec<_>>() {
            if let Err(e) = self.swarm.behaviour_mut().gossipsub.subscribe(&inbox_topic(&core)) {
                tracing::warn!(%core, "cannot announce the inbox: {e}");
                continue;
            }
            self.msg.hosting.insert(core);
        }
        for core in self.msg.hosting.difference(&hosted).copied().collect::<Vec<_>>() {
            let _ = self.swarm.behaviour_mut().gossipsub.unsubscribe(&inbox_topic(&core));
            self.msg.hosting.remove(&core);
        }
    }

    /// Compares inventories with each host met, at once and then periodically.
    fn msg_inventories(&mut self, now: Instant) {
        let interval = self.msg.config.inventory_interval;
        let mut online = HashSet::new();
        for core in self.msg.hosting.iter().copied().collect::<Vec<_>>() {
            for peer in self.msg_hosts_online(&core) {
                online.insert((core, peer));
                let due = self.msg.inventories.get(&(core, peer)).is_none_or(|t| now.duration_since(*t) >= interval);
                if due {
                    self.msg.inventories.insert((core, peer), now);
                    let ids = self.msg.inboxes.inventory(&core).into_iter().take(MAX_INVENTORY_IDS).map(|id| id.0.to_vec().into()).collect();
                    let request = MsgRequest { kind: Some(msg_request::Kind::Inventory(Inventory { core: core.to_lower_hex(), ids })) };
                    let id = self.swarm.behaviour_mut().msg.send_request(&peer, request);
                    self.msg.outbound.insert(id, Outbound::Inventory(core));
                }
            }
        }
        // Hosts that left are met anew when they come back.
        self.msg.inventories.retain(|key, _| online.contains(key));
    }

    /// Publishes this node's device key in every core in memory that it writes, where it is
    /// missing. Cores not in memory get it when next used: a login (a delegation) runs this
    /// at once, and a loaded core within a second.
    pub(super) fn msg_publish_device_key(&mut self) {
        let Some(device) = self.msg.device.clone() else { return };
        for core in self.cores.replicas.loaded() {
            let Some(replica) = self.cores.replicas.get_mut(&core) else { continue };
            if replica.own_delegation().is_none() {
                continue;
            }
            match replica.publish_device_key(device.public(), &self.cores.keypair) {
                Ok(Some(envelope)) => {
                    let heads = replica.heads();
                    tracing::info!(%core, "published this node's device key in the core");
                    self.announce_local(core, &heads);
                    self.publish(core, envelope);
                }
                Ok(None) => {}
                // Revoked or expired: this node no longer writes the core.
                Err(e) => tracing::debug!(%core, "cannot publish the device key: {e}"),
            }
        }
    }
}
