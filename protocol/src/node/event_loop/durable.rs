//! Group commit of local core writes: many writes, one fsync, and nothing acknowledged before
//! it is on disk.
//!
//! A local write (`core set`, `kb_setData`, a revocation, a device key) makes its change in
//! memory and logs it to RocksDB's write-ahead log without waiting for fsync
//! ([`crate::core::Config::sync_local_writes`] is off in a node). What must wait for the disk —
//! the reply to the caller and the announcement to subscribers — is queued
//! here with the log position it needs. One blocking task at a time syncs the log
//! ([`Store::sync_wal`]); writes that arrive while it runs queue up and are covered by the next
//! sync, so under load one fsync acknowledges every write that came in during the previous one,
//! and the swarm task never waits for the disk.
//!
//! Acknowledged writes are exactly as durable as before (the reply leaves after an fsync that
//! began after the write was logged); what changed is that a change is readable on this node
//! (and leaves it, on its gossip topic and in catch-up answers) from the moment it is logged,
//! up to one fsync before it is acknowledged. If the machine fails in that window the write was
//! never acknowledged; a peer that received it hands it back (it is signed and valid), and this
//! node writes under a new actor after a restart, so nothing equivocates.

use std::collections::VecDeque;

use tokio::sync::{mpsc, oneshot};

use super::EventLoop;
use crate::node::client::{CoreCommandError, CoreUpdate, NodeEvent};
use crate::store::Store;

/// What waits for the write-ahead log to be on disk.
pub(super) enum AfterSync {
    /// Answer the caller (with the storage error instead, should the sync fail).
    Reply(Box<dyn FnOnce(Result<(), String>) + Send>),
    /// Tell subscribers about a local change.
    Announce(CoreUpdate),
}

/// The queue of work waiting for a sync, and the one sync in flight.
pub(super) struct GroupCommit {
    store: Store,
    /// Work in arrival order, each with the [`Store::logged`] count it needs synced.
    waiting: VecDeque<(u64, AfterSync)>,
    syncing: bool,
    done_tx: mpsc::Sender<Result<u64, String>>,
    done: mpsc::Receiver<Result<u64, String>>,
    /// Syncs run, and writes acknowledged through them (for the logs and benchmarks).
    pub(super) syncs: u64,
}

impl GroupCommit {
    pub(super) fn new(store: Store) -> Self {
        let (done_tx, done) = mpsc::channel(1);
        GroupCommit { store, waiting: VecDeque::new(), syncing: false, done_tx, done, syncs: 0 }
    }

    /// The outcome of the sync in flight.
    pub(super) async fn next_synced(&mut self) -> Option<Result<u64, String>> {
        self.done.recv().await
    }

    fn start(&mut self) {
        if self.syncing || self.waiting.is_empty() {
            return;
        }
        self.syncing = true;
        let (store, tx) = (self.store.clone(), self.done_tx.clone());
        tokio::task::spawn_blocking(move || {
            let result = store.sync_wal().map_err(|e| e.to_string());
            // One sync in flight and room for one outcome: this never waits.
            let _ = tx.blocking_send(result);
        });
    }
}

impl EventLoop {
    /// Runs `work` once everything logged so far is on disk: now if it already is.
    pub(super) fn after_sync(&mut self, work: AfterSync) {
        let needed = self.store.logged();
        if self.store.synced() >= needed {
            self.run_after_sync(work, Ok(()));
            return;
        }
        self.durable.waiting.push_back((needed, work));
        self.durable.start();
    }

    /// Answers `reply` with `result` once what the command wrote is on disk. A refusal is
    /// answered at once: it acknowledges nothing.
    pub(super) fn reply_after_sync<T: Send + 'static>(&mut self, reply: oneshot::Sender<Result<T, CoreCommandError>>, result: Result<T, CoreCommandError>) {
        if result.is_err() {
            let _ = reply.send(result);
            return;
        }
        self.after_sync(AfterSync::Reply(Box::new(move |synced| {
            let _ = reply.send(synced.map_err(CoreCommandError::Storage).and(result));
        })));
    }

    /// A sync finished: run what it covers, and start the next for what came meanwhile.
    pub(super) fn on_synced(&mut self, result: Result<u64, String>) {
        self.durable.syncing = false;
        self.durable.syncs += 1;
        let synced = self.store.synced();
        match result {
            Ok(_) => {
                let mut done = 0usize;
                while self.durable.waiting.front().is_some_and(|(needed, _)| *needed <= synced) {
                    let Some((_, work)) = self.durable.waiting.pop_front() else { break };
                    self.run_after_sync(work, Ok(()));
                    done += 1;
                }
                tracing::trace!(done, left = self.durable.waiting.len(), "write-ahead log synced");
            }
            Err(e) => {
                tracing::error!("cannot sync the write-ahead log: {e}");
                let failed: Vec<AfterSync> = self.durable.waiting.drain(..).map(|(_, work)| work).collect();
                for work in failed {
                    self.run_after_sync(work, Err(e.clone()));
                }
            }
        }
        self.durable.start();
    }

    fn run_after_sync(&mut self, work: AfterSync, synced: Result<(), String>) {
        match (work, synced) {
            (AfterSync::Reply(reply), synced) => reply(synced),
            (AfterSync::Announce(update), Ok(())) => {
                let core = update.core;
                self.announce(NodeEvent::CoreUpdated(update));
                self.msg_core_changed(core);
            }
            // Not on disk: not announced (it was not acknowledged either).
            (AfterSync::Announce(_), Err(_)) => {}
        }
    }
}
