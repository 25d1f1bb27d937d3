//! Device keys and the encryption of a message's text.
//!
//! A **device key** is an X25519 key pair of one node. It is derived from the node key
//! (`Keypair::derive_secret`, HKDF-SHA256 with the domain [`DEVICE_KEY_DOMAIN`], then HPKE's
//! `DeriveKeyPair`), so it lives wherever the node key lives — the repo, mode 0600 — is the same
//! after every restart, and is never written anywhere else. Its public half is published in
//! each core the node may write (see [`super::devices`]).
//!
//! A message's text is encrypted once, with ChaCha20-Poly1305 under a fresh random content
//! key; the content key is sealed to each device key of the recipient with HPKE (RFC 9180, mode
//! Base, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305). Both bind the message's
//! header (sender, recipient, nonce, time) as associated data, so a ciphertext cannot be moved
//! into another message by someone who cannot read it.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hpke::aead::ChaCha20Poly1305 as HpkeChaCha;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use kubelt_proto::msg::{MessageBody, WrappedKey};
use libp2p::identity::Keypair;
use rand_core_09::{RngCore, UnwrapErr};

/// The HKDF domain that derives a node's device key from its node key.
pub const DEVICE_KEY_DOMAIN: &[u8] = b"kubelt-device-x25519-v1";
/// HPKE `info` of the content-key wraps.
const HPKE_INFO: &[u8] = b"kubelt-msg-v1 content key";
/// Domain separator of the associated data.
const AAD_DOMAIN: &[u8] = b"kubelt-msg-v1";
/// Length of an X25519 public key, of an HPKE encapsulated key, and of a content key.
pub const KEY_LEN: usize = 32;
/// Length of a sealed content key: the key and its 16-byte tag.
pub const SEALED_KEY_LEN: usize = KEY_LEN + 16;

type Kem = X25519HkdfSha256;

/// Errors of sealing or opening a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// RSA node keys have no secret a device key could be derived from.
    #[error("this node's key type cannot derive a messaging key (use an Ed25519, secp256k1 or ECDSA node key)")]
    UnsupportedNodeKey,
    /// The recipient has no device key to encrypt to.
    #[error("the recipient has no device key")]
    NoDevices,
    /// A device key is not a valid X25519 public key.
    #[error("invalid device key")]
    BadDeviceKey,
    /// The message is not sealed to this device, or its ciphertext does not decrypt.
    #[error("this device cannot read the message")]
    NotForThisDevice,
    /// HPKE or the AEAD failed.
    #[error("encryption failed")]
    Encryption,
}

/// A node's messaging key pair.
pub struct DeviceKey {
    secret: <Kem as hpke::Kem>::PrivateKey,
    public: [u8; KEY_LEN],
}

impl std::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceKey").field("public", &hex::encode(self.public)).finish_non_exhaustive()
    }
}

impl DeviceKey {
    /// The device key of the node with `keypair` (the same every time).
    pub fn from_keypair(keypair: &Keypair) -> Result<Self, CryptoError> {
        let ikm = keypair.derive_secret(DEVICE_KEY_DOMAIN).ok_or(CryptoError::UnsupportedNodeKey)?;
        Ok(Self::derive(&ikm))
    }

    /// The key pair HPKE's `DeriveKeyPair` (HKDF-SHA256 extract and expand) makes of `ikm`.
    pub(crate) fn derive(ikm: &[u8]) -> Self {
        let (secret, public) = Kem::derive_keypair(ikm);
        let mut bytes = [0u8; KEY_LEN];
        bytes.copy_from_slice(&public.to_bytes());
        DeviceKey { secret, public: bytes }
    }

    /// Opens an HPKE single-shot seal (`enc`, `sealed`) made to this key by [`hpke_seal`].
    pub(crate) fn hpke_open(&self, enc: &[u8], sealed: &[u8], info: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let encapped = <Kem as hpke::Kem>::EncappedKey::from_bytes(enc).map_err(|_| CryptoError::NotForThisDevice)?;
        hpke::single_shot_open::<HpkeChaCha, HkdfSha256, Kem>(&OpModeR::Base, &self.secret, &encapped, info, sealed, aad)
            .map_err(|_| CryptoError::NotForThisDevice)
    }

    /// The public half, as published in cores.
    pub fn public(&self) -> [u8; KEY_LEN] {
        self.public
    }

    /// Decrypts a message's text, if it was sealed to this device.
    pub fn open(&self, body: &MessageBody) -> Result<Vec<u8>, CryptoError> {
        let wrap = body.keys.iter().find(|k| k.device.as_ref() == self.public).ok_or(CryptoError::NotForThisDevice)?;
        let aad = associated_data(body);
        let key = self.hpke_open(&wrap.enc, &wrap.sealed, HPKE_INFO, &aad)?;
        if key.len() != KEY_LEN {
            return Err(CryptoError::NotForThisDevice);
        }
        ChaCha20Poly1305::new(Key::from_slice(&key))
            .decrypt(&Nonce::default(), Payload { msg: &body.ciphertext, aad: &aad })
            .map_err(|_| CryptoError::NotForThisDevice)
    }
}

/// Encrypts `text` into `body` (whose `from`, `to`, `nonce` and `sent_at` are set) for every
/// device key in `devices`: fills `keys` and `ciphertext`.
pub fn seal(body: &mut MessageBody, text: &[u8], devices: &[[u8; KEY_LEN]]) -> Result<(), CryptoError> {
    if devices.is_empty() {
        return Err(CryptoError::NoDevices);
    }
    let mut rng = UnwrapErr(rand_core_09::OsRng);
    let mut content_key = [0u8; KEY_LEN];
    rng.fill_bytes(&mut content_key);
    let aad = associated_data(body);
    let mut keys = Vec::with_capacity(devices.len());
    for device in devices {
        let (enc, sealed) = hpke_seal(device, HPKE_INFO, &content_key, &aad)?;
        keys.push(WrappedKey { device: device.to_vec().into(), enc: enc.into(), sealed: sealed.into() });
    }
    let ciphertext = ChaCha20Poly1305::new(Key::from_slice(&content_key))
        .encrypt(&Nonce::default(), Payload { msg: text, aad: &aad })
        .map_err(|_| CryptoError::Encryption)?;
    body.keys = keys;
    body.ciphertext = ciphertext.into();
    Ok(())
}

/// HPKE single-shot seal (mode Base) of `plaintext` to the X25519 key `device`: returns the
/// encapsulated key (32 bytes) and the ciphertext with its tag.
pub(crate) fn hpke_seal(device: &[u8; KEY_LEN], info: &[u8], plaintext: &[u8], aad: &[u8]) -> Result<(Vec<u8>, Vec<u8>), CryptoError> {
    let public = <Kem as hpke::Kem>::PublicKey::from_bytes(device).map_err(|_| CryptoError::BadDeviceKey)?;
    let mut rng = UnwrapErr(rand_core_09::OsRng);
    let (enc, sealed) = hpke::single_shot_seal::<HpkeChaCha, HkdfSha256, Kem, _>(&OpModeS::Base, &public, info, plaintext, aad, &mut rng)
        .map_err(|_| CryptoError::Encryption)?;
    Ok((enc.to_bytes().to_vec(), sealed))
}

/// What both layers of encryption bind: the header of the message.
fn associated_data(body: &MessageBody) -> Vec<u8> {
    let mut aad = Vec::with_capacity(AAD_DOMAIN.len() + 2 * 43 + body.nonce.len() + 8 + 1);
    aad.extend_from_slice(AAD_DOMAIN);
    aad.push(0);
    aad.extend_from_slice(body.from.as_bytes());
    aad.push(0);
    aad.extend_from_slice(body.to.as_bytes());
    aad.push(0);
    aad.extend_from_slice(&body.nonce);
    aad.extend_from_slice(&body.sent_at.to_be_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> MessageBody {
        MessageBody { from: "0xaa".into(), to: "0xbb".into(), nonce: vec![7; 16].into(), sent_at: 1, ..Default::default() }
    }

    #[test]
    fn every_device_reads_the_message_and_no_other_key_does() {
        let a = DeviceKey::from_keypair(&Keypair::generate_ed25519()).unwrap();
        let b = DeviceKey::from_keypair(&Keypair::generate_secp256k1()).unwrap();
        let outsider = DeviceKey::from_keypair(&Keypair::generate_ed25519()).unwrap();
        let mut sealed = body();
        seal(&mut sealed, b"hello", &[a.public(), b.public()]).unwrap();
        assert_eq!(a.open(&sealed).unwrap(), b"hello");
        assert_eq!(b.open(&sealed).unwrap(), b"hello");
        assert_eq!(outsider.open(&sealed), Err(CryptoError::NotForThisDevice));
        assert!(!sealed.ciphertext.windows(5).any(|w| w == b"hello"));
        // The header is bound: the same ciphertext in another message does not open.
        let mut moved = sealed.clone();
        moved.from = "0xcc".into();
        assert_eq!(a.open(&moved), Err(CryptoError::NotForThisDevice));
        // An outsider's key put in place of a device's wrap does not open either.
        let mut swapped = sealed.clone();
        swapped.keys[0].device = outsider.public().to_vec().into();
        assert_eq!(outsider.open(&swapped), Err(CryptoError::NotForThisDevice));
    }

    #[test]
    fn the_device_key_is_the_same_for_the_same_node_key_and_differs_between_nodes() {
        let node = Keypair::generate_ed25519();
        assert_eq!(DeviceKey::from_keypair(&node).unwrap().public(), DeviceKey::from_keypair(&node).unwrap().public());
        assert_ne!(DeviceKey::from_keypair(&node).unwrap().public(), DeviceKey::from_keypair(&Keypair::generate_ed25519()).unwrap().public());
        assert!(matches!(seal(&mut body(), b"x", &[]), Err(CryptoError::NoDevices)));
    }
}
