//! The nonces of app logins: issued by `kb_getNonce` with the exact message to sign, taken
//! once by `kb_verifyNonce`.
//!
//! A nonce is good for [`NONCE_TTL`] (5 minutes), once, for the address and app origin it was
//! issued for (the message it was issued with, which the client never sends back, is what the
//! signature is checked against). At most [`MAX_PENDING`] wait at once; used and expired ones
//! are remembered a while longer so that the refusal says which it was.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kubelt_protocol::core::Address;

use super::code;
use crate::rpc::RpcError;

/// How long a nonce may be used.
pub const NONCE_TTL: Duration = Duration::from_secs(300);
/// Nonces waiting to be used, at most.
pub const MAX_PENDING: usize = 10_000;

/// A login waiting for its signature.
#[derive(Debug, Clone)]
pub struct Pending {
    pub address: Address,
    pub domain: String,
    pub message: String,
    issued: Instant,
}

/// What a nonce became.
enum Spent {
    Used,
    Expired,
}

#[derive(Default)]
pub struct Logins {
    pending: Mutex<HashMap<String, Pending>>,
    spent: Mutex<HashMap<String, (Spent, Instant)>>,
}

fn poisoned() -> RpcError {
    RpcError::new(crate::rpc::code::INTERNAL_ERROR, "login table lock poisoned")
}

impl Logins {
    /// Records a nonce issued for `address` at `domain` with the message to sign.
    pub fn issue(&self, nonce: String, address: Address, domain: String, message: String) -> Result<(), RpcError> {
        let now = Instant::now();
        let mut pending = self.pending.lock().map_err(|_| poisoned())?;
        if pending.len() >= MAX_PENDING {
            let mut spent = self.spent.lock().map_err(|_| poisoned())?;
            pending.retain(|nonce, p| {
                let fresh = now.duration_since(p.issued) < NONCE_TTL;
                if !fresh && spent.len() < MAX_PENDING {
                    spent.insert(nonce.clone(), (Spent::Expired, now));
                }
                fresh
            });
        }
        if pending.len() >= MAX_PENDING {
            return Err(RpcError::new(
                code::QUOTA_EXCEEDED,
                format!("quota exceeded: {MAX_PENDING} logins are waiting for their signature on this node; try again in a few minutes"),
            ));
        }
        pending.insert(nonce, Pending { address, domain, message, issued: now });
        Ok(())
    }

    /// Takes a nonce for its login: it can never be used again.
    pub fn take(&self, nonce: &str) -> Result<Pending, RpcError> {
        let now = Instant::now();
        let taken = self.pending.lock().map_err(|_| poisoned())?.remove(nonce);
        let mut spent = self.spent.lock().map_err(|_| poisoned())?;
        spent.retain(|_, (_, at)| now.duration_since(*at) < NONCE_TTL * 2);
        match taken {
            Some(pending) if now.duration_since(pending.issued) < NONCE_TTL => {
                if spent.len() < MAX_PENDING {
                    spent.insert(nonce.to_owned(), (Spent::Used, now));
                }
                Ok(pending)
            }
            Some(_) => Err(expired()),
            None => Err(match spent.get(nonce) {
                Some((Spent::Used, _)) => RpcError::new(code::NONCE_USED, "this nonce was already used for a login: get a new one with kb_getNonce"),
                Some((Spent::Expired, _)) => expired(),
                None => RpcError::new(code::NONCE_UNKNOWN, "this node issued no such nonce (or forgot it): get one with kb_getNonce"),
            }),
        }
    }

    /// Ages every nonce by `by` (tests).
    #[cfg(test)]
    pub fn age(&self, by: Duration) {
        if let Ok(mut pending) = self.pending.lock() {
            for p in pending.values_mut() {
                p.issued = p.issued.checked_sub(by).unwrap_or(p.issued);
            }
        }
    }
}

fn expired() -> RpcError {
    RpcError::new(code::NONCE_EXPIRED, "the nonce is older than 5 minutes: get a new one with kb_getNonce")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nonce_is_used_once_and_not_after_five_minutes() {
        let logins = Logins::default();
        let address = Address::parse("0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed").unwrap();
        logins.issue("n1".into(), address, "localhost".into(), "m".into()).unwrap();
        assert_eq!(logins.take("n1").unwrap().message, "m");
        assert_eq!(logins.take("n1").unwrap_err().code, code::NONCE_USED);
        assert_eq!(logins.take("n2").unwrap_err().code, code::NONCE_UNKNOWN);
        logins.issue("n3".into(), address, "localhost".into(), "m".into()).unwrap();
        logins.age(NONCE_TTL + Duration::from_secs(1));
        assert_eq!(logins.take("n3").unwrap_err().code, code::NONCE_EXPIRED);
    }
}
