//! A local development wallet: a hex secp256k1 key file that signs owner statements with
//! EIP-191 `personal_sign`, for `kubelt core submit --sign-with` and tests. Real owners sign
//! in their own wallet instead.

use anyhow::Context;
use ethers_core::k256::ecdsa::SigningKey;
use ethers_core::utils::{hash_message, secret_key_to_address, to_checksum};

/// A secp256k1 key read from a file.
pub struct DevWallet {
    key: SigningKey,
}

impl DevWallet {
    /// Reads a key file holding 32 bytes as hex (with or without `0x`).
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<DevWallet> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the key file {}", path.display()))?;
        Self::from_hex(text.trim()).with_context(|| format!("{} does not hold a hex secp256k1 private key", path.display()))
    }

    /// Writes a new random key to `path` (refusing to overwrite one), mode 0600.
    pub fn create(path: &std::path::Path) -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let key = SigningKey::random(&mut rand::thread_rng());
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("cannot create {} (it must not exist yet)", path.display()))?;
        writeln!(file, "0x{}", hex::encode(key.to_bytes()))?;
        Ok(())
    }

    pub fn from_hex(text: &str) -> anyhow::Result<DevWallet> {
        let bytes = hex::decode(text.trim_start_matches("0x")).context("not hex")?;
        let key = SigningKey::from_slice(&bytes).context("not a valid secp256k1 private key (32 bytes)")?;
        Ok(DevWallet { key })
    }

    /// The wallet's address, EIP-55 checksummed.
    pub fn address(&self) -> String {
        to_checksum(&secret_key_to_address(&self.key), None)
    }

    /// EIP-191 `personal_sign`: 65 bytes r ‖ s ‖ v (v = 27 or 28), as 0x-hex.
    pub fn sign(&self, message: &str) -> anyhow::Result<String> {
        let hash = hash_message(message.as_bytes());
        let (signature, recovery) = self.key.sign_prehash_recoverable(hash.as_bytes()).context("signing failed")?;
        let mut bytes = signature.to_bytes().to_vec();
        bytes.push(recovery.to_byte() + 27);
        Ok(format!("0x{}", hex::encode(bytes)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_recover_to_the_wallet_address() -> anyhow::Result<()> {
        let wallet = DevWallet::from_hex("0x4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318")?;
        assert_eq!(wallet.address(), "0x2c7536E3605D9C16a7a3D7b1898e529396a65c23");
        let signature = wallet.sign("hello")?;
        let recovered = kubelt_protocol::core::delegation::recover_signer("hello", &hex::decode(&signature[2..])?)?;
        assert_eq!(recovered.to_checksum(), wallet.address());
        Ok(())
    }
}
