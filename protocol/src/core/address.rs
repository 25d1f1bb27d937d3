//! Core ids: the owner's Ethereum address.
//!
//! On the wire (store keys, envelopes, topics, the DHT key) an address is written in lower-case
//! hex with a `0x` prefix; when shown to a person it is written with the EIP-55 mixed-case
//! checksum. Input is accepted in either form: all-lower or all-upper hex is taken as is, mixed
//! case must carry a correct EIP-55 checksum (a typo in a mixed-case address is caught instead of
//! silently naming someone else's core).

use std::fmt;
use std::str::FromStr;

use k256::ecdsa::VerifyingKey;
use sha2::{Digest, Sha256};
use sha3::Keccak256;

/// Keccak-256 (Ethereum's hash; not the NIST SHA3-256).
fn keccak256(bytes: &[u8]) -> [u8; 32] {
    Keccak256::digest(bytes).into()
}

/// The EIP-191 `personal_sign` hash of `message`: keccak-256 of
/// `"\x19Ethereum Signed Message:\n" ‖ decimal length ‖ message`.
pub fn eip191_hash(message: &[u8]) -> [u8; 32] {
    let mut hasher = Keccak256::new();
    hasher.update(b"\x19Ethereum Signed Message:\n");
    hasher.update(message.len().to_string().as_bytes());
    hasher.update(message);
    hasher.finalize().into()
}

/// An Ethereum address: the id of a core and of its owner.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Address([u8; 20]);

/// Why a string is not an Ethereum address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddressError {
    /// The string does not start with `0x`.
    #[error("an Ethereum address starts with 0x: {0:?}")]
    MissingPrefix(String),
    /// Not 40 hex digits after the prefix.
    #[error("an Ethereum address has 40 hex digits after 0x, {0:?} has {1}")]
    WrongLength(String, usize),
    /// A character that is not a hex digit.
    #[error("an Ethereum address is hex, {0:?} is not")]
    NotHex(String),
    /// Mixed case that does not match the EIP-55 checksum: probably a typo.
    #[error("{0:?} fails its EIP-55 checksum (a typo?); the checksummed form of these digits is {1}")]
    BadChecksum(String, String),
}

impl Address {
    /// The address from its 20 bytes.
    pub const fn from_bytes(bytes: [u8; 20]) -> Self {
        Address(bytes)
    }

    /// The address of a secp256k1 public key: the last 20 bytes of the keccak-256 of its
    /// uncompressed point (without the 0x04 tag).
    pub fn of_key(key: &VerifyingKey) -> Self {
        let point = key.to_encoded_point(false);
        let hash = keccak256(&point.as_bytes()[1..]);
        let mut bytes = [0u8; 20];
        bytes.copy_from_slice(&hash[12..]);
        Address(bytes)
    }

    /// The 20 bytes.
    pub fn as_bytes(&self) -> &[u8; 20] {
        &self.0
    }

    /// Lower-case `0x`-prefixed hex: the form used on the wire and in store keys.
    pub fn to_lower_hex(&self) -> String {
        format!("0x{}", hex::encode(self.0))
    }

    /// EIP-55 mixed-case checksummed form: the form shown to people.
    pub fn to_checksum(&self) -> String {
        let lower = hex::encode(self.0);
        let hash = keccak256(lower.as_bytes());
        let mut out = String::with_capacity(42);
        out.push_str("0x");
        for (i, c) in lower.chars().enumerate() {
            let nibble = (hash[i / 2] >> if i % 2 == 0 { 4 } else { 0 }) & 0x0f;
            if c.is_ascii_alphabetic() && nibble >= 8 {
                out.push(c.to_ascii_uppercase());
            } else {
                out.push(c);
            }
        }
        out
    }

    /// Parses `0x` + 40 hex digits, checking the EIP-55 checksum when the case is mixed.
    pub fn parse(input: &str) -> Result<Self, AddressError> {
        let trimmed = input.trim();
        let digits = trimmed
            .strip_prefix("0x")
            .or_else(|| trimmed.strip_prefix("0X"))
            .ok_or_else(|| AddressError::MissingPrefix(input.to_owned()))?;
        if digits.len() != 40 {
            return Err(AddressError::WrongLength(input.to_owned(), digits.len()));
        }
        let mut bytes = [0u8; 20];
        hex::decode_to_slice(digits, &mut bytes).map_err(|_| AddressError::NotHex(input.to_owned()))?;
        let address = Address(bytes);
        let has_lower = digits.chars().any(|c| c.is_ascii_lowercase());
        let has_upper = digits.chars().any(|c| c.is_ascii_uppercase());
        if has_lower && has_upper {
            let checksummed = address.to_checksum();
            if checksummed[2..] != *digits {
                return Err(AddressError::BadChecksum(input.to_owned(), checksummed));
            }
        }
        Ok(address)
    }

    /// The Kademlia key under which every replica of this core is provided:
    /// sha2-256 of `kubelt-core:<lower-case address>`.
    pub fn dht_key(&self) -> [u8; 32] {
        dht_key(self)
    }

    /// The gossipsub topic that carries this core's live changes: `kubelt/core/<address>`.
    pub fn topic(&self) -> String {
        format!("kubelt/core/{}", self.to_lower_hex())
    }
}

/// The DHT key of a core: sha2-256 of `kubelt-core:<lower-case address>` (DESIGN.md, "Cores").
pub fn dht_key(core: &Address) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(b"kubelt-core:");
    hasher.update(core.to_lower_hex().as_bytes());
    hasher.finalize().into()
}

impl FromStr for Address {
    type Err = AddressError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Address::parse(s)
    }
}

/// Shows the EIP-55 form; use [`Address::to_lower_hex`] for the wire.
impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_checksum())
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Address({})", self.to_checksum())
    }
}

impl serde::Serialize for Address {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_lower_hex())
    }
}

impl<'de> serde::Deserialize<'de> for Address {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Address::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Test vectors from EIP-55.
    const EIP55: [&str; 4] = [
        "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
        "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
        "0xdbF03B407c01E7cD3CBea99509d93f8DDDC8C6FB",
        "0xD1220A0cf47c7B9Be7A2E6BA89F429762e7b9aDb",
    ];

    #[test]
    fn eip55_vectors_round_trip() {
        for s in EIP55 {
            let a = Address::parse(s).unwrap();
            assert_eq!(a.to_checksum(), s);
            assert_eq!(a.to_string(), s);
            assert_eq!(Address::parse(&s.to_lowercase()).unwrap(), a);
            assert_eq!(a.to_lower_hex(), s.to_lowercase());
        }
    }

    #[test]
    fn bad_addresses_are_rejected_with_a_reason() {
        assert!(matches!(Address::parse("5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"), Err(AddressError::MissingPrefix(_))));
        assert!(matches!(Address::parse("0x5aAeb6"), Err(AddressError::WrongLength(_, 6))));
        assert!(matches!(Address::parse("0xzzAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"), Err(AddressError::NotHex(_))));
        // One flipped case.
        let err = Address::parse("0x5AAeb6053F3E94C9b9A09f33669435E7Ef1BeAed").unwrap_err();
        assert!(err.to_string().contains("0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"), "{err}");
    }

    #[test]
    fn dht_key_is_sha256_of_the_prefixed_lower_case_address() {
        let a = Address::parse(EIP55[0]).unwrap();
        let expected: [u8; 32] = Sha256::digest(format!("kubelt-core:{}", EIP55[0].to_lowercase())).into();
        assert_eq!(a.dht_key(), expected);
    }
}
