//! UnixFS: files and directories as content-addressed DAGs, byte-for-byte like Kubo.
//!
//! Specs: UnixFS v1 (<https://github.com/ipfs/specs/blob/main/UNIXFS.md>), dag-pb
//! (<https://ipld.io/specs/codecs/dag-pb/spec/>), CID (<https://github.com/multiformats/cid>),
//! and, for the exact DAG shapes, Kubo v0.22's importer (boxo v0.11: `ipld/unixfs/importer/
//! balanced`, `importer/helpers`, `ipld/unixfs/io/directory.go`, `ipld/unixfs/hamt`).
//!
//! - [`importer`]: bytes → blocks. The same CIDs as `ipfs add`: CIDv0 dag-pb sha2-256 by
//!   default, fixed 256 KiB chunks, balanced layout with at most 174 links per node; with
//!   CIDv1 (`ImportOptions::cid_v1`) leaves are raw blocks and nodes CIDv1 dag-pb.
//! - [`dir`]: directories (links sorted by name) and `add_path` for whole trees. Like
//!   `ipfs add -r`, hidden files (names starting with `.`) are skipped unless
//!   [`ImportOptions::include_hidden`] is set. A directory whose estimated size
//!   (Σ name length + CID length over its entries) reaches 256 KiB becomes a HAMT-sharded
//!   directory (fanout 256, murmur3-x64-64), exactly as Kubo v0.22 does ([`hamt`]). Kubo
//!   v0.22 switches at `>= 262144`; newer boxo releases switch at `> 262144` (IPIP-499),
//!   so a directory *exactly* at the threshold is sharded here and in Kubo v0.22, and not
//!   in Kubo ≥ v0.38.
//! - [`exporter`]: blocks → bytes. Path resolution through plain and sharded directories,
//!   `stat`, `cat` as an ordered stream with read-ahead, `get` to the file system. Reads go
//!   through the async [`BlockSource`], so blocks can come from the network; every block is
//!   checked against its CID before it is used.
//! - [`mod@gc`]: mark-and-sweep of blocks no pin reaches.
//! - [`dag_pb`]: the hand-written canonical dag-pb encoder (Links before Data).
//!
//! Blocking vs async: importing and GC are CPU and disk bound and run on the calling thread
//! (they spawn scoped helper threads); call them from `spawn_blocking` in async code.
//!
//! How the CIDs are checked: `protocol/tests/unixfs_kubo.rs` adds the same files (every chunk
//! and 174-link boundary), a tree (nested, empty, unsorted names, symlink) and directories
//! around the HAMT threshold to a real Kubo v0.22 and compares CIDs; CIDv1, raw leaves and the
//! HAMT layout are also pinned by vectors from Kubo's sharness tests and boxo's tests.
//!
//! Not implemented (Kubo options off by default): trickle layout, rabin/buzhash chunkers,
//! other hash functions, inline CIDs, `--preserve-mode/mtime` metadata, and byte-range reads.

pub mod dag_pb;
pub mod dir;
pub mod exporter;
pub mod gc;
pub mod hamt;
pub mod importer;
pub(crate) mod cbor;

pub use dir::{add_path, DirectoryBuilder};
pub use exporter::{cat, cat_with_read_ahead, get, links, ls, resolve, stat, EntryKind, GetReport, LsEntry, Stat};
pub use gc::{gc, GcReport};
pub use importer::{add_bytes, add_file, FileImporter, ImportOptions, Imported};

use std::path::PathBuf;

use bytes::Bytes;
use cid::Cid;
use futures::future::BoxFuture;

use crate::store::{BlockStore, Store, StoreError};

/// Errors of importing, exporting and collecting UnixFS DAGs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UnixfsError {
    /// The block is not in the store (or could not be fetched).
    #[error("block {0} not found")]
    BlockNotFound(Cid),
    /// A block's bytes do not hash to its CID: corrupt disk or a lying peer.
    #[error("hash mismatch for {0}: the block's bytes do not hash to its CID")]
    HashMismatch(Cid),
    /// The CID names something that is not a file (a directory, a symlink...).
    #[error("{cid} is not a UnixFS file (it is a {found})")]
    NotAFile {
        /// The CID.
        cid: Cid,
        /// What it is instead.
        found: &'static str,
    },
    /// The CID names something that is not a directory, so a path cannot go through it.
    #[error("{cid} is not a UnixFS directory (it is a {found})")]
    NotADirectory {
        /// The CID.
        cid: Cid,
        /// What it is instead.
        found: &'static str,
    },
    /// A path segment does not name an entry of the directory.
    #[error("path segment '{segment}' not found in directory {dir}")]
    PathNotFound {
        /// The missing name.
        segment: String,
        /// The directory searched.
        dir: Cid,
    },
    /// A path could not be parsed.
    #[error("invalid path '{path}': {reason}")]
    InvalidPath {
        /// The path.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A dag-pb block could not be decoded.
    #[error("invalid dag-pb block {cid}: {reason}")]
    InvalidDagPb {
        /// The block.
        cid: Cid,
        /// What failed to decode.
        reason: String,
    },
    /// A dag-pb block does not carry valid UnixFS data.
    #[error("{cid} is not a valid UnixFS node: {reason}")]
    NotUnixfs {
        /// The block.
        cid: Cid,
        /// What is wrong with its data.
        reason: String,
    },
    /// A block uses a codec the DAG code cannot read.
    #[error("unsupported codec 0x{codec:x} for {cid}")]
    UnsupportedCodec {
        /// The block.
        cid: Cid,
        /// Its multicodec.
        codec: u64,
    },
    /// A directory entry's name would escape the output directory or is not valid.
    #[error("unsafe entry name {name:?} in directory {dir}: a name must be one path component")]
    UnsafeName {
        /// The entry name.
        name: String,
        /// The directory holding it.
        dir: Cid,
    },
    /// A directory has two entries of the same name: `get` refuses it, because a hostile
    /// DAG uses a symlink and a directory of one name to write outside the output.
    #[error("directory {dir} has more than one entry named {name:?}; refusing to write it")]
    DuplicateName {
        /// The entry name.
        name: String,
        /// The directory holding it.
        dir: Cid,
    },
    /// `get` writes only to a new path, so that it never follows or overwrites what is there.
    #[error("{0} already exists; choose another output path or remove it first")]
    OutputExists(PathBuf),
    /// A file system name is not UTF-8 (dag-pb link names are strings).
    #[error("file name {0:?} is not valid UTF-8")]
    NonUtf8Name(PathBuf),
    /// A file the exporter assembled does not have the size its root announces.
    #[error("file {cid} has {actual} bytes but its root announces {expected}")]
    SizeMismatch {
        /// The file's root.
        cid: Cid,
        /// The size its root announces.
        expected: u64,
        /// The size its leaves add up to.
        actual: u64,
    },
    /// `add_path` met something that is neither file, directory nor symlink (like `ipfs add`).
    #[error("unsupported file type at {0}")]
    UnsupportedFileType(PathBuf),
    /// `add_path` was given a directory without `recursive`.
    #[error("{0} is a directory; add it recursively")]
    IsADirectory(PathBuf),
    /// Import options that cannot produce valid blocks.
    #[error("invalid import options: {0}")]
    InvalidOptions(&'static str),
    /// A HAMT directory is deeper than its hash allows, or malformed.
    #[error("invalid HAMT shard {cid}: {reason}")]
    InvalidHamt {
        /// The shard.
        cid: Cid,
        /// What is wrong with it.
        reason: String,
    },
    /// Two entries of one directory hash to the same 64 bits: the HAMT cannot hold them.
    #[error("HAMT hash collision: the directory is too deep for {0:?}")]
    HamtTooDeep(String),
    /// File system I/O failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
    /// Reading the input stream failed.
    #[error("read error: {0}")]
    Read(std::io::Error),
    /// The block store failed.
    #[error("store error: {0}")]
    Store(#[from] StoreError),
    /// A block source failed for another reason (network, shutdown).
    #[error("block source error: {0}")]
    Source(String),
}

impl UnixfsError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        UnixfsError::Io { path: path.into(), source }
    }
}

/// Where the exporter gets blocks: the local store, or the network through bitswap.
///
/// Implementations need not check hashes: the exporter verifies every block it receives,
/// unless the source says it only hands out blocks that were checked already
/// ([`BlockSource::checked`]).
pub trait BlockSource: Send + Sync + 'static {
    /// Fetches one block; a block the source cannot find is [`UnixfsError::BlockNotFound`].
    fn get(&self, cid: Cid) -> BoxFuture<'static, Result<Bytes, UnixfsError>>;

    /// Whether every block `get` returns was checked against its CID when it entered the
    /// source, so that hashing it again on the way out proves nothing new. True of the store:
    /// nothing enters it unchecked (the importer computes each CID from the bytes; bitswap and
    /// CAR import verify what peers and files send), and on disk RocksDB checks each blob
    /// record's CRC32C on every read. Kubo does the same (`Datastore.HashOnRead` is off by
    /// default). A source of anything else leaves this `false`.
    fn checked(&self) -> bool {
        false
    }
}

impl<T: BlockSource + ?Sized> BlockSource for std::sync::Arc<T> {
    fn get(&self, cid: Cid) -> BoxFuture<'static, Result<Bytes, UnixfsError>> {
        (**self).get(cid)
    }

    fn checked(&self) -> bool {
        (**self).checked()
    }
}

/// The local store as a block source: a block that is not stored is `BlockNotFound` (no
/// network). Reads run on tokio's blocking pool when there is a runtime, so read-ahead
/// overlaps them.
impl BlockSource for Store {
    fn get(&self, cid: Cid) -> BoxFuture<'static, Result<Bytes, UnixfsError>> {
        let store = self.clone();
        let read = move || -> Result<Bytes, UnixfsError> {
            store.get_block(&cid)?.ok_or(UnixfsError::BlockNotFound(cid))
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                let task = handle.spawn_blocking(read);
                Box::pin(async move {
                    task.await.map_err(|e| UnixfsError::Source(format!("block read task failed: {e}")))?
                })
            }
            Err(_) => Box::pin(std::future::ready(read())),
        }
    }

    fn checked(&self) -> bool {
        true
    }
}

/// Checks that `data` hashes to `cid` (through the store's own check, `Block::verified`).
pub(crate) fn verify_block(cid: &Cid, data: &Bytes) -> Result<(), UnixfsError> {
    match crate::store::Block::verified(*cid, data.clone()) {
        Ok(_) => Ok(()),
        Err(StoreError::HashMismatch { cid }) => Err(UnixfsError::HashMismatch(cid)),
        Err(other) => Err(UnixfsError::Store(other)),
    }
}
