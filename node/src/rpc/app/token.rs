//! App tokens: JWTs signed by this node with its ed25519 key (EdDSA, `jsonwebtoken`), checked
//! on every call — signature, expiry (no leeway), audience (this node's peer id) and
//! revocation. A token signed by another node fails the signature; a token this node signed
//! for another audience cannot exist, but is refused as such all the same.
//!
//! The signature is the costly part (an ed25519 verification, ~35% of a `kb_getData`'s CPU
//! when it ran on every call): a token whose exact bytes verified once is remembered (at most
//! [`VERIFIED_CACHE`] tokens), and its expiry, audience and revocation are still checked on
//! every call. A token that differs in any byte is verified anew.
//!
//! `kb_logout` revokes a token by its `jti`. Revocations are kept in a file of the repo
//! (`app-revoked.json`), rewritten atomically on each logout, so a revoked token stays refused
//! after a restart; an entry is dropped once its token would have expired anyway, which bounds
//! the file by the logins the node accepted in the last token lifetime.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use libp2p::identity::Keypair;
use serde::{Deserialize, Serialize};

use super::code;
use crate::rpc::registry::Capability;
use crate::rpc::RpcError;

/// The claims of an app token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// The core (the owner's address, EIP-55).
    pub sub: String,
    /// The node that issued it: its peer id.
    pub aud: String,
    pub iat: i64,
    pub exp: i64,
    /// Unique id, for revocation.
    pub jti: String,
    /// Namespaces the app may read only.
    pub read: Vec<String>,
    /// Namespaces the app may read and write (`*`: every namespace).
    pub write: Vec<String>,
    /// The app's origin host it signed in for.
    pub dom: String,
}

impl Claims {
    /// What the token grants on `namespace`.
    pub fn capability(&self, namespace: &str) -> Option<Capability> {
        if self.write.iter().any(|w| w == "*" || w == namespace) {
            Some(Capability::Write)
        } else if self.read.iter().any(|r| r == namespace) {
            Some(Capability::Read)
        } else {
            None
        }
    }
}

/// Issues and checks tokens.
pub struct Tokens {
    peer: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
    revoked: Mutex<HashMap<String, i64>>,
    revoked_path: PathBuf,
    /// Tokens whose signature verified, by their exact text (see the module doc).
    verified: Mutex<HashMap<String, Claims>>,
}

/// Tokens whose verified signature is remembered; the map starts over when full.
const VERIFIED_CACHE: usize = 4096;

/// PKCS#8 v1 prefix of an ed25519 private key (RFC 8410): the DER `jsonwebtoken` signs with,
/// around the 32-byte seed.
const PKCS8_ED25519_PREFIX: [u8; 16] = [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];

impl Tokens {
    /// The tokens of the node with `keypair` (ed25519); revocations are loaded from
    /// `revoked_path` if it exists.
    pub fn new(keypair: &Keypair, revoked_path: PathBuf) -> anyhow::Result<Tokens> {
        let peer = keypair.public().to_peer_id().to_base58();
        let ed = keypair.clone().try_into_ed25519().map_err(|_| anyhow::anyhow!("the app API needs an ed25519 node key"))?;
        let mut der = PKCS8_ED25519_PREFIX.to_vec();
        der.extend_from_slice(ed.secret().as_ref());
        let encoding = EncodingKey::from_ed_der(&der);
        let decoding = DecodingKey::from_ed_der(&ed.public().to_bytes());
        let revoked: HashMap<String, i64> = match std::fs::read(&revoked_path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| anyhow::anyhow!("{} is not a list of revoked tokens: {e}", revoked_path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => return Err(anyhow::anyhow!("cannot read {}: {e}", revoked_path.display())),
        };
        Ok(Tokens { peer, encoding, decoding, revoked: Mutex::new(revoked), revoked_path, verified: Mutex::new(HashMap::new()) })
    }

    /// This node's peer id: every token's audience.
    pub fn audience(&self) -> &str {
        &self.peer
    }

    /// Signs a token with these claims.
    pub fn issue(&self, claims: &Claims) -> Result<String, RpcError> {
        jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), claims, &self.encoding)
            .map_err(|e| RpcError::new(crate::rpc::code::INTERNAL_ERROR, format!("cannot sign the token: {e}")))
    }

    /// Checks a token: signed by this node, not expired, for this node, not revoked.
    pub fn verify(&self, token: &str) -> Result<Claims, RpcError> {
        let known = self.verified.lock().ok().and_then(|v| v.get(token).cloned());
        let claims = match known {
            Some(claims) => {
                // Signature and audience were checked when these exact bytes first came in.
                if claims.exp < time::OffsetDateTime::now_utc().unix_timestamp() {
                    return Err(RpcError::new(code::TOKEN_EXPIRED, "the token has expired: sign in again"));
                }
                claims
            }
            None => {
                let claims = self.verify_signed(token)?;
                if let Ok(mut verified) = self.verified.lock() {
                    if verified.len() >= VERIFIED_CACHE {
                        verified.clear();
                    }
                    verified.insert(token.to_owned(), claims.clone());
                }
                claims
            }
        };
        if self.is_revoked(&claims.jti) {
            return Err(RpcError::new(code::TOKEN_REVOKED, "the token was revoked (kb_logout): sign in again"));
        }
        Ok(claims)
    }

    /// The signature, expiry and audience checks of `jsonwebtoken`.
    fn verify_signed(&self, token: &str) -> Result<Claims, RpcError> {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = 0;
        validation.set_audience(&[&self.peer]);
        validation.set_required_spec_claims(&["exp", "aud", "sub"]);
        let claims = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => RpcError::new(code::TOKEN_EXPIRED, "the token has expired: sign in again"),
                ErrorKind::InvalidAudience => RpcError::new(code::TOKEN_OTHER_NODE, "the token was issued for another node"),
                ErrorKind::InvalidSignature => RpcError::new(
                    code::TOKEN_INVALID,
                    "the token's signature is not this node's: it was tampered with or signed by another node",
                ),
                _ => RpcError::new(code::TOKEN_INVALID, format!("not a token of this node: {e}")),
            })?
            .claims;
        Ok(claims)
    }

    /// Whether the token with this id was revoked.
    pub fn is_revoked(&self, jti: &str) -> bool {
        self.revoked.lock().map(|r| r.contains_key(jti)).unwrap_or(true)
    }

    /// Revokes a token for good (persisted before this returns).
    pub fn revoke(&self, claims: &Claims) -> Result<(), RpcError> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let snapshot = {
            let mut revoked = self.revoked.lock().map_err(|_| RpcError::new(crate::rpc::code::INTERNAL_ERROR, "revocations lock poisoned"))?;
            revoked.retain(|_, exp| *exp >= now);
            revoked.insert(claims.jti.clone(), claims.exp);
            serde_json::to_vec(&*revoked).map_err(RpcError::node)?
        };
        let tmp = self.revoked_path.with_extension("json.tmp");
        std::fs::write(&tmp, &snapshot)
            .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|()| std::fs::rename(&tmp, &self.revoked_path))
            .map_err(|e| RpcError::node(format!("cannot record the logout in {}: {e}", self.revoked_path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(aud: &str, exp: i64) -> Claims {
        Claims {
            sub: "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed".into(),
            aud: aud.into(),
            iat: 0,
            exp,
            jti: "j1".into(),
            read: vec!["profile".into()],
            write: vec!["notes".into()],
            dom: "localhost".into(),
        }
    }

    #[test]
    fn tokens_are_checked_for_signer_expiry_audience_tampering_and_revocation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revoked.json");
        let key = Keypair::generate_ed25519();
        let tokens = Tokens::new(&key, path.clone()).unwrap();
        let later = time::OffsetDateTime::now_utc().unix_timestamp() + 3600;
        let good = claims(tokens.audience(), later);
        let token = tokens.issue(&good).unwrap();
        assert_eq!(tokens.verify(&token).unwrap(), good);
        assert_eq!(good.capability("notes"), Some(Capability::Write));
        assert_eq!(good.capability("profile"), Some(Capability::Read));
        assert_eq!(good.capability("other"), None);

        // Checked again (from the cache of verified signatures), the same answers.
        assert_eq!(tokens.verify(&token).unwrap(), good);
        let soon = time::OffsetDateTime::now_utc().unix_timestamp() + 1;
        let short = tokens.issue(&Claims { jti: "short".into(), ..claims(tokens.audience(), soon) }).unwrap();
        assert!(tokens.verify(&short).is_ok());
        std::thread::sleep(std::time::Duration::from_millis(2100));
        assert_eq!(tokens.verify(&short).unwrap_err().code, code::TOKEN_EXPIRED, "a remembered token still expires");
        let expired = tokens.issue(&claims(tokens.audience(), 1000)).unwrap();
        assert_eq!(tokens.verify(&expired).unwrap_err().code, code::TOKEN_EXPIRED);
        let elsewhere = tokens.issue(&claims("12D3KooWOther", later)).unwrap();
        assert_eq!(tokens.verify(&elsewhere).unwrap_err().code, code::TOKEN_OTHER_NODE);
        let other_node = Tokens::new(&Keypair::generate_ed25519(), dir.path().join("o.json")).unwrap();
        let foreign = other_node.issue(&claims(tokens.audience(), later)).unwrap();
        assert_eq!(tokens.verify(&foreign).unwrap_err().code, code::TOKEN_INVALID);
        // Tampered: the payload of another token under this token's signature.
        let parts: Vec<&str> = token.split('.').collect();
        let widened = tokens.issue(&Claims { write: vec!["*".into()], ..good.clone() }).unwrap();
        let forged = format!("{}.{}.{}", parts[0], widened.split('.').nth(1).unwrap(), parts[2]);
        assert_eq!(tokens.verify(&forged).unwrap_err().code, code::TOKEN_INVALID);
        assert_eq!(tokens.verify("junk").unwrap_err().code, code::TOKEN_INVALID);

        tokens.revoke(&good).unwrap();
        assert_eq!(tokens.verify(&token).unwrap_err().code, code::TOKEN_REVOKED);
        let reopened = Tokens::new(&key, path).unwrap();
        assert_eq!(reopened.verify(&token).unwrap_err().code, code::TOKEN_REVOKED, "a logout must survive a restart");
    }
}
