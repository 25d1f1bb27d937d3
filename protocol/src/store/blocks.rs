//! Content-addressed blocks in the `blocks` column, keyed by multihash bytes.

use bytes::Bytes;
use cid::Cid;
use multihash_codetable::{Code, MultihashDigest};

use super::direct_buf::DirectBuf;
use super::packs::{Location, WriteMode, PACK_MIN_BYTES};
use super::{Column, Store, StoreError};

/// A block: bytes and the CID they hash to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// The block's CID.
    pub cid: Cid,
    /// The block's bytes.
    pub data: Bytes,
}

impl Block {
    /// Makes a block whose CID is computed from `data` (sha2-256, the given codec, CIDv1).
    pub fn new_v1(codec: u64, data: Bytes) -> Self {
        let cid = Cid::new_v1(codec, Code::Sha2_256.digest(&data));
        Block { cid, data }
    }

    /// Makes a block from a CID and bytes after checking that the bytes hash to the CID.
    pub fn verified(cid: Cid, data: Bytes) -> Result<Self, StoreError> {
        verify_hash(&cid, &data)?;
        Ok(Block { cid, data })
    }
}

/// Checks that `data` hashes to `cid`'s multihash.
pub fn verify_hash(cid: &Cid, data: &[u8]) -> Result<(), StoreError> {
    let mh = cid.hash();
    let code = Code::try_from(mh.code()).map_err(|_| StoreError::UnsupportedHash(mh.code()))?;
    let computed = code.digest(data);
    if computed.digest() == mh.digest() {
        Ok(())
    } else {
        Err(StoreError::HashMismatch { cid: *cid })
    }
}

/// Read access to blocks; implemented by [`Store`] and by test doubles of the DAG code.
pub trait BlockStore: Send + Sync {
    /// The block's bytes, if stored.
    fn get_block(&self, cid: &Cid) -> Result<Option<Bytes>, StoreError>;
    /// Whether the block is stored.
    fn has_block(&self, cid: &Cid) -> Result<bool, StoreError>;
    /// The block's length, if stored; [`Store`] answers from its index, without reading the
    /// bytes.
    fn block_size(&self, cid: &Cid) -> Result<Option<usize>, StoreError> {
        Ok(self.get_block(cid)?.map(|data| data.len()))
    }
}

impl BlockStore for Store {
    fn get_block(&self, cid: &Cid) -> Result<Option<Bytes>, StoreError> {
        let key = cid.hash().to_bytes();
        if let Some(inline) = self.get_pinned(Column::Blocks, &key)? {
            return Ok(Some(Bytes::copy_from_slice(&inline)));
        }
        let (Some(packs), Some(location)) = (&self.packs, self.get(Column::Packed, &key)?) else { return Ok(None) };
        match packs.read(&Location::decode(&location)?)? {
            Ok(bytes) => Ok(Some(bytes)),
            Err(damage) => {
                // An unpinned block whose bytes a crash lost, or a damaged disk: the block is
                // dropped, so that it reads as missing and can be fetched again.
                tracing::warn!(%cid, %damage, "a stored block is damaged: dropped, to be fetched again");
                if self.get(Column::Packed, &key)?.as_deref() == Some(&location[..]) {
                    let mut batch = self.batch();
                    batch.delete(Column::Packed, &key);
                    batch.commit(false)?;
                }
                Ok(None)
            }
        }
    }

    fn has_block(&self, cid: &Cid) -> Result<bool, StoreError> {
        let key = cid.hash().to_bytes();
        Ok(self.contains(Column::Blocks, &key)? || self.contains(Column::Packed, &key)?)
    }

    fn block_size(&self, cid: &Cid) -> Result<Option<usize>, StoreError> {
        let key = cid.hash().to_bytes();
        if let Some(inline) = self.get_pinned(Column::Blocks, &key)? {
            return Ok(Some(inline.len()));
        }
        match self.get_pinned(Column::Packed, &key)? {
            Some(location) => Ok(Some(Location::decode(&location)?.len as usize)),
            None => Ok(None),
        }
    }
}

impl Store {
    /// Stores blocks whose hashes the caller has already computed (the importer made them),
    /// in one atomic batch, logged but not synced: pinning the root makes them durable.
    ///
    /// Blocks of [`PACK_MIN_BYTES`] or more are appended to the pack files (unless already
    /// there) and the batch records where; smaller ones go into the batch themselves.
    pub fn put_blocks<'a>(&self, blocks: impl IntoIterator<Item = &'a Block>) -> Result<(), StoreError> {
        self.write_blocks(blocks.into_iter().collect(), WriteMode::Cached, &[])
    }

    /// [`Store::put_blocks`] for blocks that a pin follows at once (an import): large ones go
    /// straight to disk, bypassing the page cache ([`WriteMode::ToPin`]), so the pin's sync waits
    /// for nothing but the file's size. Blocks whose bytes lie in one of `buffers` are written
    /// from there, without a copy (see [`super::packs::Packs::append_from`]).
    pub fn put_blocks_to_pin<'a>(&self, blocks: impl IntoIterator<Item = &'a Block>, buffers: &[&DirectBuf]) -> Result<(), StoreError> {
        self.write_blocks(blocks.into_iter().collect(), WriteMode::ToPin, buffers)
    }

    fn write_blocks(&self, blocks: Vec<&Block>, write: WriteMode, buffers: &[&DirectBuf]) -> Result<(), StoreError> {
        let keys: Vec<Vec<u8>> = blocks.iter().map(|b| b.cid.hash().to_bytes()).collect();
        // In memory (no pack files) every block goes into the batch itself.
        let packed = |block: &Block| self.packs.is_some() && block.data.len() >= PACK_MIN_BYTES;
        let mut to_pack = Vec::new();
        let mut in_batch = std::collections::HashSet::new();
        for (i, block) in blocks.iter().enumerate() {
            // A block stored already (in either column), or earlier in this batch (a file of
            // repeated chunks), is not written again.
            if packed(block)
                && in_batch.insert(&keys[i])
                && !self.contains(Column::Packed, &keys[i])?
                && !self.contains(Column::Blocks, &keys[i])?
            {
                to_pack.push(i);
            }
        }
        let locations = match &self.packs {
            Some(packs) if !to_pack.is_empty() => packs.append_from(&to_pack.iter().map(|&i| &blocks[i].data[..]).collect::<Vec<_>>(), write, buffers)?,
            _ => Vec::new(),
        };
        // Per record: the value (or its location), a multihash key (≤ 66 bytes) and up to 16
        // bytes of framing.
        let bytes = blocks.iter().map(|b| if packed(b) { Location::LEN } else { b.data.len() } + 82);
        let mut batch = self.batch_with_capacity(12 + bytes.sum::<usize>());
        for (&i, location) in to_pack.iter().zip(&locations) {
            batch.put(Column::Packed, &keys[i], &location.encode());
        }
        for (block, key) in blocks.iter().zip(&keys) {
            if !packed(block) {
                batch.put(Column::Blocks, key, &block.data);
            }
        }
        batch.commit(false)
    }

    /// Verifies a block that came from outside (network, CAR file) and stores it, like
    /// [`Store::put_blocks`].
    pub fn put_verified_block(&self, cid: &Cid, data: &[u8]) -> Result<(), StoreError> {
        let block = Block::verified(*cid, Bytes::copy_from_slice(data))?;
        self.put_blocks([&block])
    }

    /// A block's bytes if they can be had without waiting for the disk (from RocksDB's memory
    /// and the page cache): `Ok(None)` when reading them would wait, or when they need
    /// [`BlockStore::get_block`]'s care (a damaged block). `Ok(Some(None))`: not stored.
    pub fn get_block_in_memory(&self, cid: &Cid) -> Result<Option<Option<Bytes>>, StoreError> {
        let key = cid.hash().to_bytes();
        match self.get_pinned_in_memory(Column::Blocks, &key)? {
            None => return Ok(None),
            Some(Some(inline)) => return Ok(Some(Some(Bytes::copy_from_slice(&inline)))),
            Some(None) => {}
        }
        let location = match self.get_pinned_in_memory(Column::Packed, &key)? {
            None => return Ok(None),
            Some(None) => return Ok(Some(None)),
            Some(Some(location)) => Location::decode(&location)?,
        };
        let Some(packs) = &self.packs else { return Ok(None) };
        Ok(packs.read_in_memory(&location).map(Some))
    }

    /// Whether a block is stored, if that can be told without waiting for the disk.
    pub fn has_block_in_memory(&self, cid: &Cid) -> Result<Option<bool>, StoreError> {
        let key = cid.hash().to_bytes();
        match self.get_pinned_in_memory(Column::Blocks, &key)? {
            Some(None) => Ok(self.get_pinned_in_memory(Column::Packed, &key)?.map(|l| l.is_some())),
            other => Ok(other.map(|_| true)),
        }
    }

    /// Makes every read of a pack file wait until the returned guard is dropped (`None` in
    /// memory): a disk that stalls, for tests of what must not wait for it. Not part of the API.
    #[doc(hidden)]
    pub fn stall_pack_reads(&self) -> Option<super::packs::ReadStall<'_>> {
        self.packs.as_ref().map(|packs| packs.stall_reads())
    }

    /// Removes a block (its bytes in a pack file stay until [`Store::remove_unused_packs`]).
    pub fn delete_block(&self, cid: &Cid) -> Result<(), StoreError> {
        let mut batch = self.batch();
        self.delete_block_in(&mut batch, &cid.hash().to_bytes());
        batch.commit(true)
    }

    /// Adds the deletion of the block with this multihash (as bytes) to a batch.
    pub fn delete_block_in(&self, batch: &mut super::StoreBatch<'_>, key: &[u8]) {
        batch.delete(Column::Blocks, key);
        batch.delete(Column::Packed, key);
    }

    /// Deletes the pack files no stored block points into any more; returns how many. Call
    /// after deleting blocks (garbage collection).
    pub fn remove_unused_packs(&self) -> Result<usize, StoreError> {
        let Some(packs) = &self.packs else { return Ok(0) };
        // Files below this one take no more appends; read it before the index.
        let below = packs.complete_below();
        let mut used = std::collections::HashSet::new();
        for entry in self.iter(Column::Packed) {
            let (_, location) = entry?;
            used.insert(Location::decode(&location)?.pack);
        }
        packs.remove_unused(below, &used)
    }

    /// Every stored block's multihash, as a raw-codec CIDv1 (the codec is not stored).
    pub fn block_multihashes(&self) -> impl Iterator<Item = Result<cid::multihash::Multihash<64>, StoreError>> + '_ {
        self.iter(Column::Blocks).chain(self.iter(Column::Packed)).map(|r| {
            let (key, _) = r?;
            cid::multihash::Multihash::<64>::from_bytes(&key).map_err(|e| StoreError::Corrupt {
                column: Column::Blocks.name(),
                reason: format!("bad multihash key: {e}"),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_with_wrong_bytes_is_refused_and_not_stored() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let block = Block::new_v1(0x55, Bytes::from_static(b"hello"));
        let err = store.put_verified_block(&block.cid, b"hellO").unwrap_err();
        assert!(matches!(err, StoreError::HashMismatch { .. }), "{err}");
        assert!(!store.has_block(&block.cid)?);
        store.put_verified_block(&block.cid, &block.data)?;
        assert_eq!(store.get_block(&block.cid)?, Some(block.data.clone()));
        Ok(())
    }

    fn pack_files(dir: &std::path::Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
        let mut files: Vec<_> = std::fs::read_dir(dir.join("packs"))?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
        files.sort();
        Ok(files)
    }

    #[test]
    fn large_blocks_go_to_pack_files_small_ones_to_the_database_and_both_survive_reopen() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let small = Block::new_v1(0x55, Bytes::from(vec![1u8; PACK_MIN_BYTES - 1]));
        let large = Block::new_v1(0x55, Bytes::from(vec![2u8; PACK_MIN_BYTES]));
        {
            let store = Store::open(dir.path())?;
            store.put_blocks([&small, &large])?;
            assert!(store.has_block(&small.cid)? && store.has_block(&large.cid)?);
            assert!(store.get(Column::Blocks, &small.cid.hash().to_bytes())?.is_some());
            assert!(store.get(Column::Blocks, &large.cid.hash().to_bytes())?.is_none(), "the large block's bytes are not in the database");
            assert_eq!(store.get(Column::Packed, &large.cid.hash().to_bytes())?.map(|v| v.len()), Some(Location::LEN));
            store.sync_blocks()?;
        }
        let files = pack_files(dir.path())?;
        assert_eq!(files.len(), 1);
        assert_eq!(std::fs::read(&files[0])?, large.data, "the pack file holds exactly the large block");
        let store = Store::open(dir.path())?;
        assert_eq!(store.get_block(&small.cid)?, Some(small.data.clone()));
        assert_eq!(store.get_block(&large.cid)?, Some(large.data.clone()));
        let mut stored: Vec<_> = store.block_multihashes().collect::<Result<_, _>>()?;
        stored.sort_by_key(|m| m.to_bytes());
        let mut expected = vec![*small.cid.hash(), *large.cid.hash()];
        expected.sort_by_key(|m| m.to_bytes());
        assert_eq!(stored, expected);
        Ok(())
    }

    #[test]
    fn a_block_stored_twice_or_twice_in_one_batch_is_written_to_a_pack_file_once() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let block = Block::new_v1(0x55, Bytes::from(vec![3u8; 10_000]));
        store.put_blocks([&block, &block])?;
        store.put_blocks([&block])?;
        store.put_verified_block(&block.cid, &block.data)?;
        assert_eq!(std::fs::metadata(&pack_files(dir.path())?[0])?.len(), 10_000);
        Ok(())
    }

    #[test]
    fn a_block_whose_packed_bytes_are_damaged_reads_as_missing_and_can_be_stored_again() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let block = Block::new_v1(0x55, Bytes::from(vec![4u8; 8192]));
        let other = Block::new_v1(0x55, Bytes::from(vec![5u8; 8192]));
        store.put_blocks([&block, &other])?;
        // A crash that kept the location but lost the bytes leaves a short file.
        let file = &pack_files(dir.path())?[0];
        std::fs::OpenOptions::new().write(true).open(file)?.set_len(12_000)?;
        assert_eq!(store.get_block(&block.cid)?, Some(block.data.clone()), "the block before the cut is whole");
        assert_eq!(store.get_block(&other.cid)?, None);
        assert!(!store.has_block(&other.cid)?, "the damaged block is dropped, so a fetch asks for it again");
        store.put_blocks([&other])?;
        assert_eq!(store.get_block(&other.cid)?, Some(other.data.clone()));
        Ok(())
    }

    #[test]
    fn a_pack_file_goes_once_every_block_in_it_is_deleted() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        // Two blocks fill a file.
        let store = Store::open_with_pack_target(dir.path(), 8192)?;
        let blocks: Vec<Block> = (0..3u8).map(|i| Block::new_v1(0x55, Bytes::from(vec![i; 5000]))).collect();
        store.put_blocks(&blocks[..2])?;
        store.put_blocks(&blocks[2..])?;
        assert_eq!(pack_files(dir.path())?.len(), 2);
        store.delete_block(&blocks[0].cid)?;
        assert_eq!(store.remove_unused_packs()?, 0, "the first file still holds a live block");
        store.delete_block(&blocks[1].cid)?;
        assert_eq!(store.remove_unused_packs()?, 1);
        store.delete_block(&blocks[2].cid)?;
        assert_eq!(store.remove_unused_packs()?, 0, "the active file stays");
        assert_eq!(pack_files(dir.path())?.len(), 1);
        assert!(store.block_multihashes().next().is_none());
        Ok(())
    }

    #[test]
    fn cid_v0_and_v1_share_one_block() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let block = Block::new_v1(0x70, Bytes::from_static(b"\x0a\x02\x08\x01"));
        store.put_blocks([&block])?;
        let v0 = Cid::new_v0(*block.cid.hash())?;
        assert!(store.has_block(&v0)?);
        Ok(())
    }
}
