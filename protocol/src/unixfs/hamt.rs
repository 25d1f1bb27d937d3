//! HAMT-sharded UnixFS directories, as Kubo builds them for big directories.
//!
//! Spec: UnixFS v1 "HAMTDirectory" (<https://github.com/ipfs/specs/blob/main/UNIXFS.md>), and
//! boxo v0.11 `ipld/unixfs/hamt` for the exact bytes:
//! - an entry name is hashed with murmur3-x64-128 (seed 0); the first 64 bits (`h1`,
//!   big-endian) are the key (`hashType` 0x22);
//! - with fanout 256, level `d` of the trie uses byte `d` of the key as the slot index;
//! - a slot holds one entry, or a sub-shard when several entries share the slot. This is
//!   canonical for a set of names, whatever the insertion order;
//! - a shard node is dag-pb: links in slot order, named `%02X` + entry name for entries and
//!   `%02X` alone for sub-shards; `Data` is `UnixFS{Type: HAMTShard, Data: occupancy
//!   bitfield, hashType: 0x22, fanout: 256}`. The bitfield is big-endian (slot `i` is bit
//!   `i % 8` of byte `len - 1 - i / 8`) with leading zero bytes dropped (go-bitfield).

use std::collections::BTreeMap;

use bytes::Bytes;
use cid::Cid;

use super::dag_pb::{self, LinkRef, DAG_PB};
use super::importer::{ImportOptions, Imported};
use super::UnixfsError;
use crate::store::Block;

/// `hashType` of murmur3-x64-64, the only HAMT hash in use.
pub const HASH_MURMUR3: u64 = 0x22;
/// Kubo's shard width (`DefaultShardWidth`).
pub const DEFAULT_FANOUT: u64 = 256;

/// murmur3-x64-128 with seed 0, truncated to `h1` as big-endian bytes: go's
/// `murmur3.New64().Sum(nil)`.
pub fn murmur3_x64_64(data: &[u8]) -> [u8; 8] {
    const C1: u64 = 0x87c3_7b91_1142_53d5;
    const C2: u64 = 0x4cf5_ad43_2745_937f;
    fn fmix(mut k: u64) -> u64 {
        k ^= k >> 33;
        k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
        k ^= k >> 33;
        k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        k ^ (k >> 33)
    }
    let (mut h1, mut h2) = (0u64, 0u64);
    let mut blocks = data.chunks_exact(16);
    for block in &mut blocks {
        let k1 = u64::from_le_bytes(block[..8].try_into().expect("8 bytes"));
        let k2 = u64::from_le_bytes(block[8..].try_into().expect("8 bytes"));
        h1 ^= k1.wrapping_mul(C1).rotate_left(31).wrapping_mul(C2);
        h1 = h1.rotate_left(27).wrapping_add(h2).wrapping_mul(5).wrapping_add(0x52dc_e729);
        h2 ^= k2.wrapping_mul(C2).rotate_left(33).wrapping_mul(C1);
        h2 = h2.rotate_left(31).wrapping_add(h1).wrapping_mul(5).wrapping_add(0x3849_5ab5);
    }
    let tail = blocks.remainder();
    let mut k1 = 0u64;
    let mut k2 = 0u64;
    for (i, &byte) in tail.iter().enumerate() {
        if i < 8 {
            k1 |= u64::from(byte) << (8 * i);
        } else {
            k2 |= u64::from(byte) << (8 * (i - 8));
        }
    }
    if tail.len() > 8 {
        h2 ^= k2.wrapping_mul(C2).rotate_left(33).wrapping_mul(C1);
    }
    if !tail.is_empty() {
        h1 ^= k1.wrapping_mul(C1).rotate_left(31).wrapping_mul(C2);
    }
    let len = data.len() as u64;
    h1 ^= len;
    h2 ^= len;
    h1 = h1.wrapping_add(h2);
    h2 = h2.wrapping_add(h1);
    h1 = fmix(h1);
    h2 = fmix(h2);
    h1 = h1.wrapping_add(h2);
    h1.to_be_bytes()
}

/// Reads the slot indexes out of a name's hash, `bits` at a time, most significant first
/// (go-unixfs `hashBits`).
#[derive(Debug, Clone)]
pub struct HashBits {
    hash: [u8; 8],
    consumed: usize,
}

impl HashBits {
    /// The hash of an entry name.
    pub fn new(name: &str) -> Self {
        HashBits { hash: murmur3_x64_64(name.as_bytes()), consumed: 0 }
    }

    /// The next `bits`-bit index, or `None` once the 64 bits are used up.
    pub fn next(&mut self, bits: usize) -> Option<usize> {
        if bits == 0 || self.consumed + bits > 64 {
            return None;
        }
        let value = u64::from_be_bytes(self.hash);
        let index = (value << self.consumed) >> (64 - bits);
        self.consumed += bits;
        Some(index as usize)
    }
}

/// Number of hex digits of a slot prefix for `fanout` (2 for 256).
pub fn prefix_len(fanout: u64) -> usize {
    format!("{:X}", fanout.saturating_sub(1)).len()
}

/// log2 of a valid fanout (a power of two, multiple of 8), else `None`.
pub fn fanout_bits(fanout: u64) -> Option<usize> {
    (fanout.is_power_of_two() && (8..=1 << 16).contains(&fanout)).then(|| fanout.trailing_zeros() as usize)
}

/// One directory entry on its way into the trie.
#[derive(Debug, Clone)]
struct Entry {
    name: String,
    cid: Cid,
    tsize: u64,
}

#[derive(Debug, Default)]
struct Shard {
    slots: BTreeMap<usize, Slot>,
}

#[derive(Debug)]
enum Slot {
    Entry(Entry, HashBits),
    Shard(Box<Shard>),
}

impl Shard {
    fn insert(&mut self, entry: Entry, mut bits: HashBits, width: usize) -> Result<(), UnixfsError> {
        let index = bits.next(width).ok_or_else(|| UnixfsError::HamtTooDeep(entry.name.clone()))?;
        match self.slots.remove(&index) {
            None => {
                self.slots.insert(index, Slot::Entry(entry, bits));
            }
            Some(Slot::Entry(other, other_bits)) if other.name == entry.name => {
                // Same name: the new entry replaces the old one.
                drop((other, other_bits));
                self.slots.insert(index, Slot::Entry(entry, bits));
            }
            Some(Slot::Entry(other, other_bits)) => {
                let mut child = Shard::default();
                child.insert(other, other_bits, width)?;
                child.insert(entry, bits, width)?;
                self.slots.insert(index, Slot::Shard(Box::new(child)));
            }
            Some(Slot::Shard(mut child)) => {
                child.insert(entry, bits, width)?;
                self.slots.insert(index, Slot::Shard(child));
            }
        }
        Ok(())
    }

    /// Emits this shard and its sub-shards (children first); returns the link to it.
    fn write(self, opts: &ImportOptions, fanout: u64, out: &mut impl Extend<Block>) -> (Cid, u64) {
        let pad = prefix_len(fanout);
        let mut bitfield = vec![0u8; (fanout / 8) as usize];
        let mut links: Vec<(String, Cid, u64)> = Vec::with_capacity(self.slots.len());
        for (index, slot) in self.slots {
            let byte = bitfield.len() - 1 - index / 8;
            bitfield[byte] |= 1 << (index % 8);
            match slot {
                Slot::Entry(entry, _) => links.push((format!("{index:0pad$X}{}", entry.name), entry.cid, entry.tsize)),
                Slot::Shard(child) => {
                    let (cid, tsize) = child.write(opts, fanout, out);
                    links.push((format!("{index:0pad$X}"), cid, tsize));
                }
            }
        }
        let first = bitfield.iter().position(|&b| b != 0).unwrap_or(bitfield.len());
        let data = dag_pb::hamt_shard_data(&bitfield[first..], HASH_MURMUR3, fanout);
        let bytes = dag_pb::encode_node(
            links.iter().map(|(name, cid, tsize)| LinkRef { cid, name, tsize: *tsize }),
            Some(&data),
        );
        let tsize = bytes.len() as u64 + links.iter().map(|l| l.2).sum::<u64>();
        let block = opts.block(DAG_PB, Bytes::from(bytes));
        let cid = block.cid;
        out.extend(std::iter::once(block));
        (cid, tsize)
    }
}

/// Builds a HAMT directory (fanout 256) over `entries` (name, CID, Tsize); emits its blocks,
/// children first, and returns the root. `size` of the result is 0: callers add file sizes.
pub fn build(
    entries: impl IntoIterator<Item = (String, Cid, u64)>,
    opts: &ImportOptions,
    out: &mut impl Extend<Block>,
) -> Result<Imported, UnixfsError> {
    let fanout = DEFAULT_FANOUT;
    let width = fanout_bits(fanout).expect("256 is a valid fanout");
    let mut root = Shard::default();
    for (name, cid, tsize) in entries {
        let bits = HashBits::new(&name);
        root.insert(Entry { name, cid, tsize }, bits, width)?;
    }
    let (cid, tsize) = root.write(opts, fanout, out);
    Ok(Imported { cid, size: 0, tsize })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unixfs::dag_pb::DIRECTORY_DATA;

    #[test]
    fn murmur3_matches_reference_vectors() {
        // h1 of murmur3-x64-128 (seed 0): the reference digest of the fox sentence is
        // 6c1b07bc7bbc4be3 47939ac4a93c437a (h1 then h2, little-endian).
        assert_eq!(murmur3_x64_64(b""), [0; 8]);
        assert_eq!(u64::from_be_bytes(murmur3_x64_64(b"The quick brown fox jumps over the lazy dog")), 0xe34b_bc7b_bc07_1b6c);
    }

    #[test]
    fn hash_bits_walk_the_hash_from_the_top() {
        let mut bits = HashBits { hash: [0xab, 0xcd, 0, 0, 0, 0, 0, 0xff], consumed: 0 };
        assert_eq!(bits.next(8), Some(0xab));
        assert_eq!(bits.next(4), Some(0xc));
        assert_eq!(bits.next(4), Some(0xd));
        assert_eq!(bits.next(40), Some(0));
        assert_eq!(bits.next(8), Some(0xff));
        assert_eq!(bits.next(1), None);
    }

    /// boxo `hamt_test.go` `TestDirBuilding`: 200 entries `DIRNAME<i>`, each the empty
    /// directory, in a 256-wide shard.
    #[test]
    fn shard_of_200_empty_dirs_matches_boxo() -> anyhow::Result<()> {
        let opts = ImportOptions::default();
        let empty_dir = opts.block(DAG_PB, Bytes::from(dag_pb::encode_node(std::iter::empty(), Some(DIRECTORY_DATA))));
        let entries = (0..200).map(|i| (format!("DIRNAME{i}"), empty_dir.cid, empty_dir.data.len() as u64));
        let mut blocks = Vec::new();
        let root = build(entries, &opts, &mut blocks)?;
        assert_eq!(root.cid.to_string(), "QmY89TkSEVHykWMHDmyejSWFj9CYNtvzw4UwnT9xbc4Zjc");
        Ok(())
    }
}
