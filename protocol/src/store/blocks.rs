//! Content-addressed blocks in the `blocks` column, keyed by multihash bytes.

use bytes::Bytes;
use cid::Cid;
use multihash_codetable::{Code, MultihashDigest};

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
}

impl BlockStore for Store {
    fn get_block(&self, cid: &Cid) -> Result<Option<Bytes>, StoreError> {
        Ok(self.get_pinned(Column::Blocks, &cid.hash().to_bytes())?.map(|v| Bytes::copy_from_slice(&v)))
    }

    fn has_block(&self, cid: &Cid) -> Result<bool, StoreError> {
        self.contains(Column::Blocks, &cid.hash().to_bytes())
    }
}

impl Store {
    /// Stores blocks whose hashes the caller has already computed (the importer made them),
    /// in one atomic batch, without the write-ahead log: pinning the root flushes them.
    pub fn put_blocks<'a>(&self, blocks: impl IntoIterator<Item = &'a Block>) -> Result<(), StoreError> {
        let blocks: Vec<&Block> = blocks.into_iter().collect();
        // Per record: the value, a multihash key (≤ 66 bytes) and up to 16 bytes of framing.
        let bytes = 12 + blocks.iter().map(|b| b.data.len() + 82).sum::<usize>();
        let mut batch = self.batch_with_capacity(bytes);
        for block in blocks {
            batch.put(Column::Blocks, &block.cid.hash().to_bytes(), &block.data);
        }
        batch.commit_unlogged()
    }

    /// Verifies a block that came from outside (network, CAR file) and stores it (without the
    /// write-ahead log, like [`Store::put_blocks`]).
    pub fn put_verified_block(&self, cid: &Cid, data: &[u8]) -> Result<(), StoreError> {
        verify_hash(cid, data)?;
        let mut batch = self.batch();
        batch.put(Column::Blocks, &cid.hash().to_bytes(), data);
        batch.commit_unlogged()
    }

    /// Removes a block.
    pub fn delete_block(&self, cid: &Cid) -> Result<(), StoreError> {
        self.delete_sync(Column::Blocks, &cid.hash().to_bytes())
    }

    /// Every stored block's multihash, as a raw-codec CIDv1 (the codec is not stored).
    pub fn block_multihashes(&self) -> impl Iterator<Item = Result<cid::multihash::Multihash<64>, StoreError>> + '_ {
        self.iter(Column::Blocks).map(|r| {
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
