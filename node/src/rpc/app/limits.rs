//! Who may sign in, and the quotas that keep one app or wallet from taking a node.
//!
//! A personal node (the default) lets only the wallets in `[app] owners` sign in. A hosted
//! node (`[app] hosted = true`, `kubelt run --hosted`) lets any wallet sign in and have its
//! core on the node, under [`Quotas`]. Rates are counted in fixed one-minute windows per key
//! (core, IP); the counter maps are bounded: stale windows are swept when they grow.
//! Every refusal is [`super::code::QUOTA_EXCEEDED`] with a message that names the quota, and
//! touches nothing else.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kubelt_protocol::core::Address;
use kubelt_protocol::store::{Column, Store};

use super::code;
use crate::rpc::RpcError;

/// Limits of a node that serves apps.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Quotas {
    /// Cores a hosted node creates for wallets that sign in.
    pub cores: usize,
    /// Calls per minute per core (every app method).
    pub requests_per_minute: u32,
    /// Open WebSocket connections per token.
    pub websockets_per_token: usize,
    /// kb_getNonce calls per minute per client IP.
    pub logins_per_minute_per_ip: u32,
    /// Bytes a core may hold here through the app API: its document (every stored change)
    /// plus the objects put with kb_putObject on this node.
    pub bytes_per_core: u64,
    /// Largest request body (at most [`crate::rpc::MAX_REQUEST_BYTES`], the hard limit).
    pub max_request_bytes: usize,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            cores: 1000,
            requests_per_minute: 6000,
            websockets_per_token: 8,
            logins_per_minute_per_ip: 20,
            bytes_per_core: 64 << 20,
            max_request_bytes: crate::rpc::MAX_REQUEST_BYTES,
        }
    }
}

/// The app API's settings (`[app]` of `config.toml`, with the flags applied).
#[derive(Debug, Clone, Default)]
pub struct AppSettings {
    /// Wallets that may sign in on a personal node.
    pub owners: Vec<Address>,
    /// Any wallet may sign in (under the quotas).
    pub hosted: bool,
    /// Origins CORS answers; empty: any.
    pub cors_origins: Vec<String>,
    pub quotas: Quotas,
}

impl AppSettings {
    /// Whether `address` may sign in here.
    pub fn may_log_in(&self, address: &Address) -> Result<(), RpcError> {
        if self.hosted || self.owners.contains(address) {
            return Ok(());
        }
        Err(RpcError::new(
            code::OWNER_NOT_ALLOWED,
            format!("{} is not an owner of this personal node (its operator adds owners with [app] owners or --owner)", address.to_checksum()),
        ))
    }
}

/// Keys a rate map holds before it sweeps stale windows.
const SWEEP_AT: usize = 10_000;

/// Counts events per key in one-minute windows.
struct Rate<K> {
    windows: Mutex<HashMap<K, (Instant, u32)>>,
}

impl<K: Hash + Eq> Rate<K> {
    fn new() -> Self {
        Rate { windows: Mutex::new(HashMap::new()) }
    }

    /// Counts one event of `key`; `false` when it is over `limit` this minute.
    fn allow(&self, key: K, limit: u32) -> bool {
        let now = Instant::now();
        let minute = std::time::Duration::from_secs(60);
        let Ok(mut windows) = self.windows.lock() else { return false };
        if windows.len() >= SWEEP_AT {
            windows.retain(|_, (start, _)| now.duration_since(*start) < minute);
        }
        let entry = windows.entry(key).or_insert((now, 0));
        if now.duration_since(entry.0) >= minute {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
        entry.1 <= limit
    }
}

/// The counters behind the quotas.
pub struct Limits {
    quotas: Quotas,
    requests: Rate<Address>,
    logins: Rate<Option<IpAddr>>,
    websockets: Arc<Mutex<HashMap<String, usize>>>,
    /// Bytes of objects put for each core, as stored under [`OBJECT_BYTES_PREFIX`] (read
    /// once, then kept here; the lock also orders the read-modify-write of the record).
    object_bytes: Mutex<HashMap<Address, u64>>,
}

/// Key prefix (column `meta`) of the bytes of objects put for a core on this node.
const OBJECT_BYTES_PREFIX: &str = "app-object-bytes/";

fn object_key(core: &Address) -> Vec<u8> {
    format!("{OBJECT_BYTES_PREFIX}{}", core.to_lower_hex()).into_bytes()
}

impl Limits {
    pub fn new(quotas: Quotas) -> Self {
        Limits { quotas, requests: Rate::new(), logins: Rate::new(), websockets: Default::default(), object_bytes: Default::default() }
    }

    /// Bytes of the objects put for `core` on this node (kb_putObject), every version.
    pub fn object_bytes(&self, store: &Store, core: &Address) -> Result<u64, RpcError> {
        let mut known = self.object_bytes.lock().map_err(|_| RpcError::new(crate::rpc::code::INTERNAL_ERROR, "lock poisoned"))?;
        Self::read_object_bytes(&mut known, store, core)
    }

    fn read_object_bytes(known: &mut HashMap<Address, u64>, store: &Store, core: &Address) -> Result<u64, RpcError> {
        if let Some(bytes) = known.get(core) {
            return Ok(*bytes);
        }
        let stored = store.get(Column::Meta, &object_key(core)).map_err(RpcError::node)?;
        let bytes = stored.and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok()).map(u64::from_be_bytes).unwrap_or(0);
        known.insert(*core, bytes);
        Ok(bytes)
    }

    /// Counts `bytes` more of objects for `core` (durably, before the object is recorded).
    pub fn add_object_bytes(&self, store: &Store, core: &Address, bytes: u64) -> Result<(), RpcError> {
        let mut known = self.object_bytes.lock().map_err(|_| RpcError::new(crate::rpc::code::INTERNAL_ERROR, "lock poisoned"))?;
        let total = Self::read_object_bytes(&mut known, store, core)?.saturating_add(bytes);
        store.put_sync(Column::Meta, &object_key(core), &total.to_be_bytes()).map_err(RpcError::node)?;
        known.insert(*core, total);
        Ok(())
    }

    pub fn quotas(&self) -> &Quotas {
        &self.quotas
    }

    /// Counts a call on `core`.
    pub fn request(&self, core: &Address) -> Result<(), RpcError> {
        if self.requests.allow(*core, self.quotas.requests_per_minute) {
            return Ok(());
        }
        Err(RpcError::new(
            code::QUOTA_EXCEEDED,
            format!("quota exceeded: at most {} calls per minute per core; wait a minute", self.quotas.requests_per_minute),
        ))
    }

    /// Counts a login from `ip`.
    pub fn login(&self, ip: Option<IpAddr>) -> Result<(), RpcError> {
        if self.logins.allow(ip, self.quotas.logins_per_minute_per_ip) {
            return Ok(());
        }
        Err(RpcError::new(
            code::QUOTA_EXCEEDED,
            format!("quota exceeded: at most {} logins per minute from one address; wait a minute", self.quotas.logins_per_minute_per_ip),
        ))
    }

    /// Counts a WebSocket connection of token `jti` until the guard is dropped.
    pub fn open_connection(&self, jti: &str) -> Result<ConnectionGuard, RpcError> {
        let mut open = self.websockets.lock().map_err(|_| RpcError::new(crate::rpc::code::INTERNAL_ERROR, "lock poisoned"))?;
        let count = open.entry(jti.to_owned()).or_insert(0);
        if *count >= self.quotas.websockets_per_token {
            return Err(RpcError::new(
                code::QUOTA_EXCEEDED,
                format!("quota exceeded: at most {} WebSocket connections per token", self.quotas.websockets_per_token),
            ));
        }
        *count += 1;
        Ok(ConnectionGuard { jti: jti.to_owned(), open: self.websockets.clone() })
    }
}

/// One open WebSocket connection of a token, counted while it lives.
pub struct ConnectionGuard {
    jti: String,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if let Ok(mut open) = self.open.lock() {
            if let Some(count) = open.get_mut(&self.jti) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    open.remove(&self.jti);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_refuse_past_the_limit_and_connections_are_released() {
        let limits = Limits::new(Quotas { requests_per_minute: 3, websockets_per_token: 1, ..Quotas::default() });
        let core = Address::parse("0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed").unwrap();
        let other = Address::parse("0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359").unwrap();
        for _ in 0..3 {
            limits.request(&core).unwrap();
        }
        assert_eq!(limits.request(&core).unwrap_err().code, code::QUOTA_EXCEEDED);
        limits.request(&other).unwrap();
        let guard = limits.open_connection("t").unwrap();
        assert_eq!(limits.open_connection("t").err().map(|e| e.code), Some(code::QUOTA_EXCEEDED));
        drop(guard);
        limits.open_connection("t").unwrap();
    }
}
