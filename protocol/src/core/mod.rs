//! Cores: wallet-owned Automerge documents, and the rules that make every replica agree.
//!
//! A **core** is a person's backend. Its id is the owner's Ethereum address ([`Address`]):
//! lower-case hex on the wire, EIP-55 when shown. Every node that replicates a core provides
//! the DHT key [`dht_key`] (sha2-256 of `kubelt-core:<address>`), carries live changes on the
//! gossipsub topic `kubelt/core/<address>` and catches up over `/kubelt/core-sync/1.0.0`.
//!
//! This module is the I/O-free heart of that: it verifies, stores and merges; the swarm moves
//! the bytes (`sync`, `node`).
//!
//! - [`address`]: core ids, EIP-55, the DHT key.
//! - [`delegation`]: owner statements. The owner signs, with EIP-191 `personal_sign`, an
//!   EIP-4361 (SIWE) message that delegates write access on some namespaces to a node key
//!   until a time, or revokes a node key keeping its history up to a cut.
//! - [`change`]: the `SignedChange` envelope — one Automerge change signed by its author's node
//!   key, with the delegation it relies on — and the checks that need no history.
//! - [`Replica`]: one core's document and the history-dependent rules; local writes
//!   ([`Replica::set`]), remote changes ([`Replica::apply_remote`], [`Replica::apply_batch`]),
//!   reads ([`Replica::get`]), revocations ([`Replica::revoke`]).
//! - [`sync`](Replica::sync_request): Automerge's sync protocol with envelopes instead of raw
//!   changes.
//! - [`private`]: private namespaces — values encrypted before they enter a change, data keys
//!   wrapped to the owner's devices and wallet.
//! - [`Cores`]: every core the node holds; replicas loaded on demand, the least recently used
//!   unloaded beyond a count and a byte budget.
//!
//! # The model
//!
//! The document's top-level keys are **namespaces**. A node may write a namespace when it holds
//! a delegation for it; the reserved namespace `_kubelt` records owner statements. Each local
//! write is one Automerge change in one envelope, stored (synced) before it is published.
//!
//! **Same verdict everywhere.** Replicas see changes in different orders, at different times,
//! with different clocks; if validity depended on any of that, cores would diverge for good. So
//! a change's validity depends only on the change, its causal history, and facts that are
//! themselves signed and only accumulate (owner revocations, equivocation proofs):
//!
//! - *Time* is the change's own timestamp raised to its dependencies' times: a change cannot
//!   claim to be older than what it builds on. Delegation expiry is judged against it, never
//!   against the local clock. (A key can still backdate changes built on old state; what a
//!   revocation does about that is below.)
//! - *Revocation* is an owner-signed statement naming the revoked key and, per actor, the last
//!   change of that key that stays valid. It travels in a change of the core. Every change of
//!   the key past the cut is invalid — including those made concurrently with the revocation or
//!   backdated — and so is everything that depends on them. A replica that had already applied
//!   such changes removes them and rebuilds its document from the remaining valid changes, so
//!   all replicas end with the same change set and the same heads.
//! - *Equivocation* — a key signing two different changes with the same actor and sequence
//!   number, which Automerge cannot hold both of — voids that actor from the repeated sequence
//!   number on; the two envelopes are the proof, and they travel as evidence.
//! - Changes whose dependencies are missing are held back (bounded) and reported, so the
//!   network layer can start a catch-up.
//!
//! # Gossip validation
//!
//! [`Cores::apply_remote`] maps onto gossipsub's validation result: `Ok(Accepted::Applied)` and
//! `Ok(Accepted::Evidence)` → `Accept` (forward); `Ok(Accepted::Duplicate)` → `Ignore`;
//! `Ok(Accepted::MissingDeps)` → `Ignore`, and start a catch-up with the peer that sent it;
//! `Err(ApplyError::Rejected)` → `Reject`; `Err(ApplyError::Core)` (the store failed) → `Ignore`.
//!
//! # Specs
//!
//! - [EIP-4361](https://eips.ethereum.org/EIPS/eip-4361) Sign-In with Ethereum (message format).
//! - [EIP-191](https://eips.ethereum.org/EIPS/eip-191) `personal_sign` (the signed bytes).
//! - [EIP-55](https://eips.ethereum.org/EIPS/eip-55) mixed-case checksum addresses.
//! - [Automerge](https://automerge.org/) 0.7 binary change format and sync protocol.
//!
//! # Example
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use kubelt_protocol::core::{Address, Config, Cores};
//! use kubelt_protocol::store::Store;
//!
//! let store = Store::open("/tmp/kubelt-db")?;
//! let mut cores = Cores::load(store, Config::default())?;
//! let core: Address = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed".parse()?;
//! let replica = cores.follow(core)?;
//! println!("{:?}", replica.get("profile", "name")?);
//! # Ok(()) }
//! ```

pub mod address;
pub mod change;
pub mod delegation;
pub mod private;

mod bounds;
mod catch_up;
mod cores;
mod devices;
mod replica;
mod sync;
mod value;
mod wallet;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod attack_tests;

#[cfg(test)]
mod fuzz_tests;

pub use address::{dht_key, Address, AddressError};
pub use catch_up::{Action as CatchUpAction, ScheduleConfig, Scheduler as CatchUpScheduler};
pub use change::{signing_bytes, Rejected, MAX_CHANGE_SIZE};
pub use cores::{Cores, LoadStats, Verified, VerifiedBatch, Verifier};
pub use delegation::{delegation_message, login_message, owner_statement, parse_signature, revocation_message, Delegation, DelegationError, Login, LoginRequest, Purpose, Revocation};
pub use replica::{Accepted, ApplyError, BatchReport, Config, CoreError, Replica, Report, WriteError, MAX_OWN_DELEGATIONS};
pub use sync::SyncStep;
pub use value::PathError;
pub use wallet::{DevWallet, WalletError};

/// Re-exported so callers can name heads without depending on automerge.
pub use automerge::ChangeHash;
