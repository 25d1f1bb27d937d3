//! Garbage collection: remove every block that no pin keeps.
//!
//! Mark and sweep, like `ipfs repo gc`: every block reachable from a recursive pin (following
//! dag-pb and dag-cbor links; raw blocks are leaves) is kept, and so is every directly pinned
//! block; every other block is deleted. Blocks are keyed by multihash, so a block reached
//! through a CIDv0 and a CIDv1 is one block.
//!
//! A block a recursive pin needs but that is missing (an interrupted fetch) is skipped and
//! counted; GC never fails because of it. GC must not run while an import is between writing
//! its blocks and pinning its root (the blocks would look unpinned): callers serialize the
//! two (the node holds a GC lock).

use std::collections::HashSet;

use cid::Cid;

use super::exporter::links;
use super::UnixfsError;
use crate::store::{BlockStore, PinKind, Store};

/// What a GC run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Blocks deleted.
    pub removed: u64,
    /// Blocks kept (reachable from a pin and present).
    pub kept: u64,
    /// Blocks a recursive pin reaches that are not in the store.
    pub missing: u64,
}

/// Deletes every block no pin reaches. Blocking.
pub fn gc(store: &Store) -> Result<GcReport, UnixfsError> {
    let mut report = GcReport::default();
    let marked = mark(store, &mut report)?;

    let mut batch = store.batch();
    for mh in store.block_multihashes() {
        let key = mh?.to_bytes();
        if marked.contains(&key) {
            report.kept += 1;
        } else {
            store.delete_block_in(&mut batch, &key);
            report.removed += 1;
            if batch.len() >= 10_000 {
                std::mem::replace(&mut batch, store.batch()).commit(false)?;
            }
        }
    }
    // The last batch is synced, which also makes the earlier ones durable.
    batch.commit(true)?;
    let packs = store.remove_unused_packs()?;
    tracing::info!(removed = report.removed, kept = report.kept, missing = report.missing, packs, "garbage collection done");
    Ok(report)
}

/// The multihashes (as bytes, the store's keys) of every block a pin keeps.
fn mark(store: &Store, report: &mut GcReport) -> Result<HashSet<Vec<u8>>, UnixfsError> {
    let mut direct = Vec::new();
    let mut stack: Vec<Cid> = Vec::new();
    for pin in store.pins()? {
        match pin.kind {
            PinKind::Direct => direct.push(pin.cid.hash().to_bytes()),
            PinKind::Recursive => stack.push(pin.cid),
        }
    }
    // Blocks reached from recursive pins, each walked once.
    let mut walked = HashSet::new();
    while let Some(cid) = stack.pop() {
        if !walked.insert(cid.hash().to_bytes()) {
            continue;
        }
        let Some(block) = store.get_block(&cid)? else {
            report.missing += 1;
            tracing::warn!(%cid, "pinned DAG is missing a block");
            continue;
        };
        match links(&cid, &block) {
            Ok(children) => stack.extend(children),
            // An unknown codec is kept but not walked; a corrupt block likewise.
            Err(e) => tracing::warn!(%cid, error = %e, "cannot walk the links of a pinned block"),
        }
    }
    walked.extend(direct);
    Ok(walked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unixfs::importer::{add_bytes, tests::pseudo_random, ImportOptions};

    #[test]
    fn gc_keeps_pinned_dags_and_removes_the_rest() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let opts = ImportOptions::default();
        let (kept, kept_blocks) = add_bytes(&pseudo_random(600_000, 1), &opts)?;
        let (_, gone_blocks) = add_bytes(&pseudo_random(600_000, 2), &opts)?;
        let (direct, direct_blocks) = add_bytes(&pseudo_random(600_000, 3), &ImportOptions::cid_v1())?;
        store.put_blocks(kept_blocks.iter().chain(&gone_blocks).chain(&direct_blocks))?;
        store.pin(&kept.cid, PinKind::Recursive)?;
        store.pin(&direct.cid, PinKind::Direct)?;

        let report = gc(&store)?;
        assert_eq!(report, GcReport { removed: gone_blocks.len() as u64 + 3, kept: kept_blocks.len() as u64 + 1, missing: 0 });
        for block in &kept_blocks {
            assert!(store.has_block(&block.cid)?);
        }
        for block in &gone_blocks {
            assert!(!store.has_block(&block.cid)?);
        }
        assert!(store.has_block(&direct.cid)?);
        assert!(!store.has_block(&direct_blocks[0].cid)?, "a direct pin keeps only its block");

        store.unpin(&kept.cid)?;
        let report = gc(&store)?;
        assert_eq!(report.removed, kept_blocks.len() as u64);
        assert_eq!(report.kept, 1);
        Ok(())
    }

    #[test]
    fn gc_frees_a_pack_file_once_nothing_in_it_is_kept() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (root, blocks) = add_bytes(&pseudo_random(600_000, 5), &ImportOptions::default())?;
        // Files of 64 KiB: the one that holds the DAG is full, so complete.
        let store = Store::open_with_pack_target(dir.path(), 65_536)?;
        store.put_blocks(&blocks)?;
        store.pin(&root.cid, PinKind::Recursive)?;
        let packed = store.approximate_size(crate::store::Column::Blocks);
        assert!(packed >= 600_000, "the chunks are in a pack file ({packed} bytes)");
        gc(&store)?;
        assert_eq!(store.approximate_size(crate::store::Column::Blocks), packed, "a pinned DAG's file stays");
        store.unpin(&root.cid)?;
        assert_eq!(gc(&store)?.removed, blocks.len() as u64);
        let left = store.approximate_size(crate::store::Column::Blocks);
        assert!(left < 10_000, "the pack file is deleted ({left} bytes left)");
        Ok(())
    }

    #[test]
    fn a_missing_block_under_a_pin_is_counted_not_fatal() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let (root, blocks) = add_bytes(&pseudo_random(600_000, 4), &ImportOptions::default())?;
        store.put_blocks(&blocks[1..])?;
        store.pin(&root.cid, PinKind::Recursive)?;
        let report = gc(&store)?;
        assert_eq!(report, GcReport { removed: 0, kept: blocks.len() as u64 - 1, missing: 1 });
        Ok(())
    }
}
