//! A development wallet: a secp256k1 key that signs owner statements with EIP-191
//! `personal_sign`, as a browser wallet would. For `kubelt core submit --sign-with`, testnets,
//! tests and benchmarks; real owners sign in their own wallet.

use std::path::Path;
use std::time::Duration;

use k256::ecdsa::SigningKey;
use kubelt_proto::core::OwnerStatement;
use libp2p::PeerId;
use time::OffsetDateTime;

use super::address::eip191_hash;
use super::{delegation_message, Address, DelegationError};

/// Errors of reading or using a key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WalletError {
    /// The key file could not be read or written.
    #[error("cannot read or write the key file {path}: {source}")]
    Io {
        /// The key file.
        path: String,
        /// What the file system said.
        source: std::io::Error,
    },
    /// The key file does not hold a key.
    #[error("not a hex secp256k1 private key (32 bytes): {0}")]
    BadKey(String),
    /// The signer failed.
    #[error("signing failed: {0}")]
    Signing(String),
    /// The statement to sign could not be built.
    #[error(transparent)]
    Message(#[from] DelegationError),
}

/// A secp256k1 private key and its Ethereum address.
pub struct DevWallet {
    key: SigningKey,
    address: Address,
}

impl DevWallet {
    /// A new random key.
    pub fn random() -> Self {
        Self::from_key(SigningKey::random(&mut rand::thread_rng()))
    }

    fn from_key(key: SigningKey) -> Self {
        let address = Address::of_key(key.verifying_key());
        DevWallet { key, address }
    }

    /// A key given as 64 hex digits (with or without `0x`).
    pub fn from_hex(text: &str) -> Result<Self, WalletError> {
        let bytes = hex::decode(text.trim().trim_start_matches("0x")).map_err(|e| WalletError::BadKey(e.to_string()))?;
        let key = SigningKey::from_slice(&bytes).map_err(|e| WalletError::BadKey(e.to_string()))?;
        Ok(Self::from_key(key))
    }

    /// Reads a key file holding the key as hex.
    pub fn from_file(path: &Path) -> Result<Self, WalletError> {
        let text = std::fs::read_to_string(path).map_err(|source| WalletError::Io { path: path.display().to_string(), source })?;
        Self::from_hex(&text)
    }

    /// Writes a new random key to `path` (never over an existing file), mode 0600.
    pub fn create(path: &Path) -> Result<Self, WalletError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let wallet = Self::random();
        let io = |source| WalletError::Io { path: path.display().to_string(), source };
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io)?;
        writeln!(file, "0x{}", hex::encode(wallet.key.to_bytes())).map_err(io)?;
        Ok(wallet)
    }

    /// The wallet's address: the id of the core it owns.
    pub fn address(&self) -> Address {
        self.address
    }

    /// EIP-191 `personal_sign`: 65 bytes r ‖ s ‖ v, v = 27 or 28.
    pub fn sign(&self, message: &str) -> Result<Vec<u8>, WalletError> {
        let hash = eip191_hash(message.as_bytes());
        let (signature, recovery) = self.key.sign_prehash_recoverable(&hash).map_err(|e| WalletError::Signing(e.to_string()))?;
        let mut bytes = signature.to_bytes().to_vec();
        bytes.push(recovery.to_byte() + 27);
        Ok(bytes)
    }

    /// The signed statement for `message`.
    pub fn statement(&self, message: String) -> Result<OwnerStatement, WalletError> {
        let signature = self.sign(&message)?;
        Ok(OwnerStatement { message, signature: signature.into() })
    }

    /// A signed delegation of this wallet's core to `peer`.
    pub fn delegate(&self, peer: &PeerId, namespaces: &[&str], expires_in: Duration, now: OffsetDateTime) -> Result<OwnerStatement, WalletError> {
        self.statement(delegation_message(&self.address, peer, namespaces, expires_in, now)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_known_key_has_its_known_address_and_signatures_recover_to_it() -> anyhow::Result<()> {
        let wallet = DevWallet::from_hex("0x4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318")?;
        assert_eq!(wallet.address().to_checksum(), "0x2c7536E3605D9C16a7a3D7b1898e529396a65c23");
        let signature = wallet.sign("hello")?;
        assert_eq!(super::super::delegation::recover_signer("hello", &signature)?, wallet.address());
        assert!(DevWallet::from_hex("0x1234").is_err());
        Ok(())
    }

    /// The same key and message signed by eth-account (Python), outside this code: the hash,
    /// the signature (RFC 6979, deterministic) and the recovered address must all match.
    #[test]
    fn signatures_match_eth_account_byte_for_byte() -> anyhow::Result<()> {
        assert_eq!(hex::encode(eip191_hash(b"Hello World")), "a1de988600a42c4b4ab089b619297c17d53cffae5d5120d82d8a92d0bb3b78f2");
        let wallet = DevWallet::from_hex("0x4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318")?;
        let theirs = "6f267aa61dda3067280942299172e2b9f6b4252b492e7c0343ecce6e7edfe0b24110a805ba6777e4303501ea9dfae133855f4ee2e34fd0444bb23d11f296eef31c";
        assert_eq!(hex::encode(wallet.sign("Hello World")?), theirs);
        assert_eq!(super::super::delegation::recover_signer("Hello World", &hex::decode(theirs)?)?, wallet.address());
        Ok(())
    }
}
