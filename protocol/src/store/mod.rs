//! The node's persistent state: one RocksDB database per repo.
//!
//! Every kind of record lives in its own column family, named by [`Column`]. Blocks are keyed
//! by their multihash bytes, so a CIDv0 and a CIDv1 of the same bytes share one block. Writes
//! that must survive a crash (pins, core changes) are written with `sync = true` before they are
//! acknowledged.
//!
//! Large blocks' bytes skip RocksDB altogether: they are appended to pack files beside it (see
//! [`packs`]) and the `packed` column holds where each one is. RocksDB would write them twice
//! (memtable and log, then a blob file at flush). Until it is pinned a block is a cache entry
//! that a crash may lose (it can be fetched again); [`Store::pin`] syncs the pack files before
//! it writes the synced pin, whose log sync also covers the small blocks and the locations
//! logged before it, so a pinned DAG is always on disk.
//!
//! [`Store::in_memory`] keeps the same columns in ordered maps instead, for simulations of
//! many nodes in one process (`kubelt-sim`), where a RocksDB per node would cost more than
//! the node. It survives nothing: every sync is a no-op, and the group commit's counters
//! count as if each sync had reached a disk.

mod blocks;
pub mod direct_buf;
pub mod packs;
mod pins;

pub use blocks::{verify_hash, Block, BlockStore};
pub use pins::{PinKind, PinRecord};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use rocksdb::{ColumnFamilyDescriptor, Options, ReadOptions, ReadTier, WriteBatch, WriteOptions, DB};

/// The column families of the node database. The enum drives per-column options.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    /// Block bytes keyed by multihash: blocks under [`packs::PACK_MIN_BYTES`] (and larger
    /// ones written before pack files existed).
    Blocks,
    /// Where each larger block's bytes are in the pack files, keyed by multihash: a
    /// [`packs::Location`].
    Packed,
    /// Pins keyed by CID bytes; the value is the [`PinKind`].
    Pins,
    /// Core state: change envelopes, delegations, snapshots.
    Cores,
    /// Peers this node has seen: peer id bytes -> their last known addresses.
    Peers,
    /// Small node-wide records (schema version, counters).
    Meta,
    /// Messages between cores: inboxes, deletions, the outbox (see [`crate::msg`]).
    Messages,
}

impl Column {
    /// Every column, in a stable order.
    pub const ALL: [Column; 7] = [Column::Blocks, Column::Packed, Column::Pins, Column::Cores, Column::Peers, Column::Meta, Column::Messages];

    /// The column family's name in RocksDB.
    pub fn name(self) -> &'static str {
        match self {
            Column::Blocks => "blocks",
            Column::Packed => "packed",
            Column::Pins => "pins",
            Column::Cores => "cores",
            Column::Peers => "peers",
            Column::Meta => "meta",
            Column::Messages => "messages",
        }
    }

    fn options(self) -> Options {
        let mut opts = Options::default();
        match self {
            Column::Blocks => {
                // Blocks are incompressible most of the time and large: keep big values out of
                // the LSM tree's compactions with BlobDB and skip compression.
                opts.set_enable_blob_files(true);
                opts.set_min_blob_size(4096);
                opts.set_write_buffer_size(32 << 20);
                opts.set_compression_type(rocksdb::DBCompressionType::None);
            }
            _ => {
                opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
            }
        }
        opts
    }
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// RocksDB refused an operation (I/O error, corruption, full disk, lock held).
    #[error("database error: {0}")]
    Db(#[from] rocksdb::Error),
    /// The database is used by another process (a node is already running on this repo).
    #[error("the database at {0} is in use by another process (is a kubelt node already running on this repo?)")]
    Locked(PathBuf),
    /// A stored record could not be decoded.
    #[error("corrupt record in column {column}: {reason}")]
    Corrupt {
        /// The column family.
        column: &'static str,
        /// What failed to decode.
        reason: String,
    },
    /// A block's bytes do not hash to its CID.
    #[error("block {cid} does not match its hash")]
    HashMismatch {
        /// The block.
        cid: cid::Cid,
    },
    /// A pack file could not be created, written or synced.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, and to which path.
        what: String,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// The CID uses a hash function the node does not support.
    #[error("unsupported multihash code 0x{0:x}")]
    UnsupportedHash(u64),
}

/// Current on-disk schema; bumped when a record layout changes.
const SCHEMA_VERSION: u32 = 1;
const SCHEMA_KEY: &[u8] = b"schema_version";

/// A handle to the node database. Cheap to clone; every clone shares one RocksDB instance
/// (or one in-memory database, see [`Store::in_memory`]).
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    path: PathBuf,
    wal: Arc<WalCounters>,
    /// Large blocks' bytes (on disk only; in memory every block is in the `blocks` column).
    packs: Option<Arc<packs::Packs>>,
}

/// Where the records live.
#[derive(Clone)]
enum Backend {
    /// RocksDB on disk: what nodes run on.
    Rocks(Arc<DB>),
    /// Ordered maps in memory, one per column: for simulations.
    Memory(Arc<MemoryDb>),
}

/// The in-memory backend: one ordered map per [`Column`], behind one lock so that a batch
/// over several columns is applied at once, as RocksDB applies it.
#[derive(Default)]
struct MemoryDb {
    columns: RwLock<MemoryColumns>,
}

/// The ordered maps of the in-memory backend, indexed by `Column as usize`.
type MemoryColumns = [BTreeMap<Box<[u8]>, Box<[u8]>>; Column::ALL.len()];

impl MemoryDb {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, MemoryColumns> {
        // A writer that panicked left whole writes only (each is applied under the lock).
        self.columns.read().unwrap_or_else(|e| e.into_inner())
    }

    fn apply(&self, ops: Vec<MemoryOp>) {
        let mut columns = self.columns.write().unwrap_or_else(|e| e.into_inner());
        for (column, key, value) in ops {
            let map = &mut columns[column as usize];
            match value {
                Some(value) => {
                    map.insert(key, value);
                }
                None => {
                    map.remove(&key);
                }
            }
        }
    }

    /// Copies of the entries of a column from `start` on while `keep` holds (the iterators
    /// of the store do not hold the lock).
    fn entries(&self, column: Column, start: &[u8], keep: impl Fn(&[u8]) -> bool) -> Vec<KeyValue> {
        let columns = self.read();
        columns[column as usize]
            .range::<[u8], _>((std::ops::Bound::Included(start), std::ops::Bound::Unbounded))
            .take_while(|(k, _)| keep(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// One write of a batch to the in-memory backend: a put, or a delete (`None`).
type MemoryOp = (Column, Box<[u8]>, Option<Box<[u8]>>);

/// A value read with [`Store::get_pinned`]: in RocksDB's block cache, or a copy.
pub enum PinnedValue<'a> {
    /// Pinned in RocksDB.
    Rocks(rocksdb::DBPinnableSlice<'a>),
    /// Copied out of the in-memory backend.
    Owned(Vec<u8>),
}

impl std::ops::Deref for PinnedValue<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            PinnedValue::Rocks(slice) => slice,
            PinnedValue::Owned(bytes) => bytes,
        }
    }
}

impl AsRef<[u8]> for PinnedValue<'_> {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

/// Logged writes that were not synced, counted so that a group commit knows what one sync of
/// the write-ahead log covers (see [`Store::sync_wal`]).
#[derive(Default)]
struct WalCounters {
    /// Writes that went to the write-ahead log without waiting for fsync, so far.
    logged: AtomicU64,
    /// How many of those are known to be on disk: a sync (of the log, or a synced write)
    /// that began after them finished.
    synced: AtomicU64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// A key and its value, as iteration over a column yields them.
pub type KeyValue = (Box<[u8]>, Box<[u8]>);

impl Store {
    /// Opens (creating if needed) the database at `path` with every column family.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with_pack_target(path, packs::PACK_TARGET_BYTES)
    }

    /// [`Store::open`] with pack files of `pack_target` bytes (tests make small ones).
    pub(crate) fn open_with_pack_target(path: impl AsRef<Path>, pack_target: u64) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.increase_parallelism(2);
        opts.set_max_open_files(256);
        // RocksDB opens each column family's table files on this many threads at start (16 by
        // default: 15 threads made and joined per column family, ~110 for every `kubelt`
        // command, tables or not). On the calling thread alone: a thread costs 0.3-3 ms to
        // make on this kind of VM, more than opening a few tables (with 2, an empty `add`
        // made 7 threads to open 7 column families).
        opts.set_max_file_opening_threads(1);
        // RocksDB's info log wrote ~125 KiB at every open (every option of every column family)
        // and kept the last 1,000 logs: 125 MB in a repo used by the CLI. Warnings and errors
        // are what an operator reads; the three last logs are kept.
        opts.set_log_level(rocksdb::LogLevel::Warn);
        opts.set_keep_log_file_num(3);
        let cfs = Column::ALL.iter().map(|c| ColumnFamilyDescriptor::new(c.name(), c.options()));
        let db = DB::open_cf_descriptors(&opts, &path, cfs).map_err(|e| {
            if e.to_string().contains("lock") {
                StoreError::Locked(path.clone())
            } else {
                StoreError::Db(e)
            }
        })?;
        let packs = packs::Packs::open_with_target(&path.join("packs"), pack_target)?;
        let store = Store { backend: Backend::Rocks(Arc::new(db)), path, wal: Arc::default(), packs: Some(Arc::new(packs)) };
        store.check_schema()?;
        Ok(store)
    }

    /// A store that lives in memory only (see the module doc): for simulations of many
    /// nodes in one process. Its [`path`](Self::path) is `:memory:`.
    pub fn in_memory() -> Self {
        let store = Store { backend: Backend::Memory(Arc::default()), path: PathBuf::from(":memory:"), wal: Arc::default(), packs: None };
        // A fresh map has no schema record to be wrong about: this write cannot fail.
        let _ = store.check_schema();
        store
    }

    /// Whether this store lives in memory only ([`Store::in_memory`]).
    pub fn is_in_memory(&self) -> bool {
        matches!(self.backend, Backend::Memory(_))
    }

    fn check_schema(&self) -> Result<(), StoreError> {
        match self.get(Column::Meta, SCHEMA_KEY)? {
            None => self.put_sync(Column::Meta, SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes()),
            Some(v) if v.as_slice() == SCHEMA_VERSION.to_be_bytes() => Ok(()),
            Some(v) => Err(StoreError::Corrupt {
                column: Column::Meta.name(),
                reason: format!("unknown schema version {v:?}, expected {SCHEMA_VERSION}"),
            }),
        }
    }

    /// Where the database lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads one value.
    pub fn get(&self, column: Column, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match &self.backend {
            Backend::Rocks(db) => Ok(db.get_cf(cf(db, column), key)?),
            Backend::Memory(db) => Ok(db.read()[column as usize].get(key).map(|v| v.to_vec())),
        }
    }

    /// Reads one value without copying it out of RocksDB's block cache more than once.
    pub fn get_pinned(&self, column: Column, key: &[u8]) -> Result<Option<PinnedValue<'_>>, StoreError> {
        match &self.backend {
            Backend::Rocks(db) => Ok(db.get_pinned_cf(cf(db, column), key)?.map(PinnedValue::Rocks)),
            Backend::Memory(_) => Ok(self.get(column, key)?.map(PinnedValue::Owned)),
        }
    }

    /// [`Store::get_pinned`] without waiting for the disk: `Ok(None)` when the value is not in
    /// memory (RocksDB's memtables and block cache) and reading it would wait.
    pub(crate) fn get_pinned_in_memory(&self, column: Column, key: &[u8]) -> Result<Option<Option<PinnedValue<'_>>>, StoreError> {
        match &self.backend {
            Backend::Rocks(db) => {
                let mut options = ReadOptions::default();
                options.set_read_tier(ReadTier::BlockCache);
                match db.get_pinned_cf_opt(cf(db, column), key, &options) {
                    Ok(value) => Ok(Some(value.map(PinnedValue::Rocks))),
                    Err(e) if e.kind() == rocksdb::ErrorKind::Incomplete => Ok(None),
                    Err(e) => Err(e.into()),
                }
            }
            Backend::Memory(_) => Ok(Some(self.get_pinned(column, key)?)),
        }
    }

    /// Reads many values of one column at once, in the order of `keys`, which must be sorted
    /// (RocksDB then reads them in one pass: catch-up answers read thousands of changes).
    pub fn get_sorted<K: AsRef<[u8]>>(&self, column: Column, keys: &[K]) -> Result<Vec<Option<PinnedValue<'_>>>, StoreError> {
        debug_assert!(keys.windows(2).all(|w| w[0].as_ref() <= w[1].as_ref()), "keys must be sorted");
        match &self.backend {
            Backend::Rocks(db) => db
                .batched_multi_get_cf(cf(db, column), keys.iter().map(AsRef::as_ref), true)
                .into_iter()
                .map(|v| Ok(v?.map(PinnedValue::Rocks)))
                .collect(),
            Backend::Memory(db) => {
                let columns = db.read();
                Ok(keys.iter().map(|k| columns[column as usize].get(k.as_ref()).map(|v| PinnedValue::Owned(v.to_vec()))).collect())
            }
        }
    }

    /// Whether a key exists.
    pub fn contains(&self, column: Column, key: &[u8]) -> Result<bool, StoreError> {
        match &self.backend {
            Backend::Rocks(db) => Ok(db.get_pinned_cf(cf(db, column), key)?.is_some()),
            Backend::Memory(db) => Ok(db.read()[column as usize].contains_key(key)),
        }
    }

    /// Writes one value; not synced (a crash may lose it).
    pub fn put(&self, column: Column, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Rocks(db) => db.put_cf(cf(db, column), key, value)?,
            Backend::Memory(db) => db.apply(vec![(column, key.into(), Some(value.into()))]),
        }
        self.wal.logged.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Logged writes so far that did not wait for fsync (a counter, see [`Store::sync_wal`]).
    pub fn logged(&self) -> u64 {
        self.wal.logged.load(Ordering::SeqCst)
    }

    /// How many of the [`Store::logged`] writes are known to be on disk.
    pub fn synced(&self) -> u64 {
        self.wal.synced.load(Ordering::SeqCst)
    }

    /// Syncs the write-ahead log: every write logged before this call is on disk when it
    /// returns. Returns the [`Store::logged`] count it covers. This is the group commit's one
    /// fsync for many writes: writers log without waiting, then wait for one of these that
    /// began after their write. Safe to call from any thread while others write.
    pub fn sync_wal(&self) -> Result<u64, StoreError> {
        let covered = self.logged();
        if let Backend::Rocks(db) = &self.backend {
            db.flush_wal(true)?;
        }
        self.wal.synced.fetch_max(covered, Ordering::SeqCst);
        Ok(covered)
    }

    /// Writes one value and waits until it is on disk.
    pub fn put_sync(&self, column: Column, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let mut batch = self.batch();
        batch.put(column, key, value);
        batch.commit(true)
    }

    /// Deletes one key, synced.
    pub fn delete_sync(&self, column: Column, key: &[u8]) -> Result<(), StoreError> {
        let mut batch = self.batch();
        batch.delete(column, key);
        batch.commit(true)
    }

    /// Starts a batch of writes over any columns.
    pub fn batch(&self) -> StoreBatch<'_> {
        self.batch_with_capacity(0)
    }

    /// A batch with room for `bytes` of keys, values and RocksDB's per-record framing: a large
    /// batch built without it grows by doubling, copying everything it holds each time (measured:
    /// a tenth of `add`'s CPU went to those copies and the page faults of the new buffers).
    pub fn batch_with_capacity(&self, bytes: usize) -> StoreBatch<'_> {
        let batch = match &self.backend {
            Backend::Rocks(_) => Batch::Rocks(WriteBatch::with_capacity_bytes(bytes)),
            Backend::Memory(_) => Batch::Memory(Vec::new()),
        };
        StoreBatch { store: self, batch }
    }

    fn write(&self, batch: Batch, sync: bool) -> Result<(), StoreError> {
        // A synced write syncs the log up to itself: it covers every write logged before it.
        let before = self.logged();
        match (&self.backend, batch) {
            (Backend::Rocks(db), Batch::Rocks(batch)) => {
                let mut opts = WriteOptions::default();
                opts.set_sync(sync);
                db.write_opt(batch, &opts)?;
            }
            (Backend::Memory(db), Batch::Memory(ops)) => db.apply(ops),
            // A batch is made by `batch()` of the same store.
            _ => unreachable!("a batch of one backend written to the other"),
        }
        if sync {
            self.wal.synced.fetch_max(before, Ordering::SeqCst);
        } else {
            self.wal.logged.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Makes every block written so far durable: syncs the pack files (the log sync of the
    /// write that needs them, a pin, covers the rest).
    pub fn sync_blocks(&self) -> Result<(), StoreError> {
        match &self.packs {
            Some(packs) => packs.sync(),
            None => Ok(()),
        }
    }

    /// Iterates over every key and value of a column, in key order. (In memory: over a copy
    /// of the column taken when called.)
    pub fn iter(&self, column: Column) -> Box<dyn Iterator<Item = Result<KeyValue, StoreError>> + '_> {
        match &self.backend {
            Backend::Rocks(db) => Box::new(db.iterator_cf(cf(db, column), rocksdb::IteratorMode::Start).map(|r| r.map_err(StoreError::from))),
            Backend::Memory(db) => Box::new(db.entries(column, &[], |_| true).into_iter().map(Ok)),
        }
    }

    /// Iterates over the keys and values of a column that start with `prefix`.
    pub fn iter_prefix<'a>(
        &'a self,
        column: Column,
        prefix: &'a [u8],
    ) -> Box<dyn Iterator<Item = Result<KeyValue, StoreError>> + 'a> {
        match &self.backend {
            Backend::Rocks(db) => Box::new(
                db.iterator_cf(cf(db, column), rocksdb::IteratorMode::From(prefix, rocksdb::Direction::Forward))
                    .map(|r| r.map_err(StoreError::from))
                    .take_while(move |r| match r {
                        Ok((k, _)) => k.starts_with(prefix),
                        Err(_) => true,
                    }),
            ),
            Backend::Memory(db) => Box::new(db.entries(column, prefix, |k| k.starts_with(prefix)).into_iter().map(Ok)),
        }
    }

    /// Flushes pack files, memtables and the WAL to disk; called on shutdown.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.sync_blocks()?;
        if let Backend::Rocks(db) = &self.backend {
            db.flush_wal(true)?;
            for column in Column::ALL {
                db.flush_cf(cf(db, column))?;
            }
        }
        Ok(())
    }

    /// Approximate size in bytes of a column on disk (SST and blob files, and for blocks the
    /// pack files); in memory, the bytes of its keys and values.
    pub fn approximate_size(&self, column: Column) -> u64 {
        match &self.backend {
            Backend::Rocks(db) => {
                let cf = cf(db, column);
                let sst = db.property_int_value_cf(cf, "rocksdb.total-sst-files-size").ok().flatten().unwrap_or(0);
                let blob = db.property_int_value_cf(cf, "rocksdb.total-blob-file-size").ok().flatten().unwrap_or(0);
                let packed = match (column, &self.packs) {
                    (Column::Blocks, Some(packs)) => packs.size(),
                    _ => 0,
                };
                sst + blob + packed
            }
            Backend::Memory(db) => db.read()[column as usize].iter().map(|(k, v)| (k.len() + v.len()) as u64).sum(),
        }
    }
}

fn cf(db: &DB, column: Column) -> &rocksdb::ColumnFamily {
    // Every column family is created in `open`, so it is always there.
    db.cf_handle(column.name()).expect("column family created at open")
}

/// The writes of a batch, in the form its store's backend takes them.
enum Batch {
    Rocks(WriteBatch),
    Memory(Vec<MemoryOp>),
}

/// A set of writes applied atomically by [`StoreBatch::commit`].
pub struct StoreBatch<'a> {
    store: &'a Store,
    batch: Batch,
}

impl StoreBatch<'_> {
    /// Adds a write.
    pub fn put(&mut self, column: Column, key: &[u8], value: &[u8]) {
        match (&mut self.batch, &self.store.backend) {
            (Batch::Rocks(batch), Backend::Rocks(db)) => batch.put_cf(cf(db, column), key, value),
            (Batch::Memory(ops), _) => ops.push((column, key.into(), Some(value.into()))),
            _ => unreachable!("a batch is made by its own store"),
        }
    }

    /// Adds a delete.
    pub fn delete(&mut self, column: Column, key: &[u8]) {
        match (&mut self.batch, &self.store.backend) {
            (Batch::Rocks(batch), Backend::Rocks(db)) => batch.delete_cf(cf(db, column), key),
            (Batch::Memory(ops), _) => ops.push((column, key.into(), None)),
            _ => unreachable!("a batch is made by its own store"),
        }
    }

    /// Number of writes in the batch.
    pub fn len(&self) -> usize {
        match &self.batch {
            Batch::Rocks(batch) => batch.len(),
            Batch::Memory(ops) => ops.len(),
        }
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies every write at once; with `sync` waits until they are on disk.
    pub fn commit(self, sync: bool) -> Result<(), StoreError> {
        self.store.write(self.batch, sync)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_often_keeps_a_few_short_info_logs() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("db");
        for i in 0..8u8 {
            let store = Store::open(&path)?;
            store.put_sync(Column::Meta, b"opened", &[i])?;
        }
        let logs: Vec<(String, u64)> = std::fs::read_dir(&path)?
            .map(|entry| -> anyhow::Result<(String, u64)> {
                let entry = entry?;
                Ok((entry.file_name().to_string_lossy().into_owned(), entry.metadata()?.len()))
            })
            .filter(|log| log.as_ref().map_or(true, |(name, _)| name.starts_with("LOG")))
            .collect::<anyhow::Result<_>>()?;
        // The current log and the three kept; each open wrote ~125 KiB of options at the
        // default (info) level.
        assert!(logs.len() <= 4, "the info logs of every open are kept: {logs:?}");
        assert!(logs.iter().all(|(_, len)| *len < 16 << 10), "an open writes a long info log: {logs:?}");
        Ok(())
    }

    #[test]
    fn values_survive_reopen_and_second_open_is_refused() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("db");
        {
            let store = Store::open(&path)?;
            store.put_sync(Column::Peers, b"k", b"v")?;
            assert!(matches!(Store::open(&path), Err(StoreError::Locked(_))));
            store.flush()?;
        }
        let store = Store::open(&path)?;
        assert_eq!(store.get(Column::Peers, b"k")?.as_deref(), Some(&b"v"[..]));
        assert_eq!(store.get(Column::Blocks, b"k")?, None);
        Ok(())
    }

    #[test]
    fn one_wal_sync_covers_every_write_logged_before_it() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let base = store.synced();
        for i in 0..3u8 {
            let mut batch = store.batch();
            batch.put(Column::Cores, &[i], b"x");
            batch.commit(false)?;
        }
        assert_eq!(store.logged(), 3);
        assert!(store.synced() < store.logged());
        assert_eq!(store.sync_wal()?, 3);
        assert_eq!(store.synced(), 3);
        // A synced write covers what was logged before it.
        store.put(Column::Meta, b"k", b"v")?;
        store.put_sync(Column::Meta, b"k2", b"v")?;
        assert_eq!(store.synced(), 4.max(base));
        Ok(())
    }

    #[test]
    fn the_memory_backend_reads_writes_batches_and_iterates_as_rocksdb_does() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        for store in [Store::open(dir.path())?, Store::in_memory()] {
            let mut batch = store.batch();
            for key in [&b"b1"[..], b"a2", b"a1", b"c"] {
                batch.put(Column::Cores, key, key);
            }
            batch.delete(Column::Cores, b"c");
            assert_eq!(batch.len(), 5);
            batch.commit(false)?;
            store.put(Column::Meta, b"k", b"v")?;
            assert_eq!(store.get(Column::Meta, b"k")?.as_deref(), Some(&b"v"[..]));
            assert_eq!(store.get_pinned(Column::Cores, b"a1")?.as_deref(), Some(&b"a1"[..]));
            assert!(!store.contains(Column::Cores, b"c")?);
            assert!(!store.contains(Column::Blocks, b"a1")?, "columns are apart");
            let all: Vec<_> = store.iter(Column::Cores).map(|r| r.map(|(k, _)| k)).collect::<Result<_, _>>()?;
            assert_eq!(all, vec![b"a1"[..].into(), b"a2"[..].into(), b"b1"[..].into()], "{:?}", store.path());
            let a: Vec<_> = store.iter_prefix(Column::Cores, b"a").map(|r| r.map(|(k, _)| k)).collect::<Result<_, _>>()?;
            assert_eq!(a.len(), 2);
            store.delete_sync(Column::Cores, b"a1")?;
            assert_eq!(store.get(Column::Cores, b"a1")?, None);
            // The group commit's counters: one sync covers what was logged before it.
            let logged = store.logged();
            assert_eq!(store.sync_wal()?, logged);
            assert_eq!(store.synced(), logged);
        }
        assert!(Store::in_memory().is_in_memory());
        Ok(())
    }

    #[test]
    fn prefix_iteration_stops_at_the_prefix_end() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let mut batch = store.batch();
        for key in [&b"a1"[..], b"a2", b"b1"] {
            batch.put(Column::Cores, key, b"x");
        }
        batch.commit(false)?;
        let keys: Vec<_> = store.iter_prefix(Column::Cores, b"a").map(|r| r.map(|(k, _)| k)).collect::<Result<_, _>>()?;
        assert_eq!(keys.len(), 2);
        Ok(())
    }

    #[test]
    fn sorted_reads_return_each_value_or_none_in_key_order_on_both_backends() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        for store in [Store::open(dir.path())?, Store::in_memory()] {
            let mut batch = store.batch();
            batch.put(Column::Cores, b"k1", b"one");
            batch.put(Column::Cores, b"k3", b"three");
            batch.put(Column::Meta, b"k2", b"other column");
            batch.commit(false)?;
            let values = store.get_sorted(Column::Cores, &[&b"k1"[..], b"k2", b"k3", b"k4"])?;
            let values: Vec<Option<&[u8]>> = values.iter().map(|v| v.as_deref()).collect();
            assert_eq!(values, [Some(&b"one"[..]), None, Some(b"three"), None]);
        }
        Ok(())
    }
}
