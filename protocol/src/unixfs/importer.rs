//! The file importer: bytes → UnixFS blocks with exactly the CIDs of Kubo's `ipfs add`.
//!
//! Layout (go-unixfs / boxo `importer/balanced`, Kubo v0.22 defaults):
//! - the input is cut into fixed chunks of [`ImportOptions::chunk_size`] bytes (256 KiB);
//!   only the last chunk is shorter;
//! - each chunk is a leaf: a dag-pb node `{Data: UnixFS{Type: File, Data: chunk, filesize}}`,
//!   or with raw leaves (the default for CIDv1) the chunk itself as a raw block (codec 0x55);
//! - leaves are grouped under internal nodes of at most 174 links, those again under nodes of
//!   174, and so on: a balanced tree whose leaves are all at the same depth. The last node of
//!   every level may be partial (even with one child). A file of a single chunk is just its
//!   leaf; the empty file is one leaf without data (`UnixFS{Type: File, filesize: 0}`, or the
//!   empty raw block with raw leaves);
//! - internal nodes are `UnixFS{Type: File, filesize, blocksizes[i] = file bytes under
//!   child i}`, links with an empty name and `Tsize` = the total encoded size of the child's
//!   DAG.
//!
//! The tree is built bottom-up as the bytes stream in: a node is emitted as soon as its 174
//! children are known, so memory stays at one chunk plus 174 links per level.
//!
//! Speed: a leaf's bytes are read straight into an aligned buffer of [`HASH_BATCH_BYTES`]
//! ([`DirectBuf`]), each chunk in a slot with room for the dag-pb header in front and the
//! trailer behind; leaves are hashed there with `sha2` (SHA-NI when the CPU has it) on every
//! core (this thread and helpers made once per process), a buffer at a time, and a second thread writes the buffer to a pack file as it is
//! (`O_DIRECT`). A chunk is copied once on its way to disk: by the `read` that brings it in.

use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use bytes::Bytes;
use cid::{Cid, Version};
use sha2::{Digest, Sha256};

use super::dag_pb::{self, LinkRef, DAG_PB, LEAF_HEADER_ROOM, LEAF_TRAILER_ROOM, RAW};
use super::UnixfsError;
use crate::store::direct_buf::{DirectBuf, DirectPool, SharedDirectBuf};
use crate::lock;
use crate::store::{Block, Store};

/// Kubo's default chunk size: `size-262144`.
pub const DEFAULT_CHUNK_SIZE: usize = 262_144;
/// Kubo's largest block (`BlockSizeLimit`): bigger chunks could not travel over bitswap.
pub const MAX_CHUNK_SIZE: usize = 1 << 20;
/// Links per internal file node in Kubo (`helpers.DefaultLinksPerBlock` = 8192 / 47).
pub const DEFAULT_MAX_LINKS: usize = 174;
/// Kubo v0.22's `HAMTShardingSize`: directories whose estimated size reaches it are sharded.
pub const DEFAULT_HAMT_THRESHOLD: usize = 256 * 1024;

/// Multihash code of sha2-256.
const SHA2_256: u64 = 0x12;

/// How to import. `Default` is `ipfs add` with no flags; [`ImportOptions::cid_v1`] is
/// `ipfs add --cid-version 1` (which implies `--raw-leaves`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportOptions {
    /// CIDv0 (`Qm...`) or CIDv1 (`bafy...`) for dag-pb nodes. Raw leaves are always CIDv1.
    pub cid_version: Version,
    /// Leaves as raw blocks instead of dag-pb UnixFS nodes (`--raw-leaves`).
    pub raw_leaves: bool,
    /// Bytes per leaf (`--chunker size-N`), at most [`MAX_CHUNK_SIZE`].
    pub chunk_size: usize,
    /// Links per internal file node.
    pub max_links: usize,
    /// Add files and directories whose name starts with `.` (`--hidden`); off by default, as
    /// in `ipfs add -r`.
    pub include_hidden: bool,
    /// Estimated directory size at which a directory becomes a HAMT shard; 0 never shards.
    pub hamt_threshold: usize,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            cid_version: Version::V0,
            raw_leaves: false,
            chunk_size: DEFAULT_CHUNK_SIZE,
            max_links: DEFAULT_MAX_LINKS,
            include_hidden: false,
            hamt_threshold: DEFAULT_HAMT_THRESHOLD,
        }
    }
}

impl ImportOptions {
    /// `ipfs add --cid-version 1`: CIDv1 everywhere and raw leaves.
    pub fn cid_v1() -> Self {
        ImportOptions { cid_version: Version::V1, raw_leaves: true, ..Default::default() }
    }

    /// Checks that the options can produce valid blocks.
    pub fn validate(&self) -> Result<(), UnixfsError> {
        if self.chunk_size == 0 || self.chunk_size > MAX_CHUNK_SIZE {
            return Err(UnixfsError::InvalidOptions("chunk size must be between 1 byte and 1 MiB"));
        }
        if self.max_links < 2 {
            return Err(UnixfsError::InvalidOptions("a file node needs room for at least 2 links"));
        }
        Ok(())
    }

    /// The CID of a block of `codec` with this sha2-256 digest.
    pub(crate) fn cid(&self, codec: u64, digest: &[u8; 32]) -> Cid {
        // A 32-byte digest always fits a Multihash<64>.
        let mh = cid::multihash::Multihash::<64>::wrap(SHA2_256, digest).expect("32-byte digest fits");
        if self.cid_version == Version::V0 && codec == DAG_PB {
            Cid::new_v0(mh).expect("sha2-256 multihash is a valid CIDv0")
        } else {
            Cid::new_v1(codec, mh)
        }
    }

    /// Hashes `data` and makes a block of `codec`.
    pub(crate) fn block(&self, codec: u64, data: Bytes) -> Block {
        let digest: [u8; 32] = Sha256::digest(&data).into();
        Block { cid: self.cid(codec, &digest), data }
    }
}

/// The result of importing a file (or a directory tree).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Imported {
    /// The root CID, as `ipfs add` prints it.
    pub cid: Cid,
    /// Content bytes: the file size, or the sum of the file sizes of a tree.
    pub size: u64,
    /// Total encoded size of every block of the DAG (the `Tsize` a parent link carries).
    pub tsize: u64,
}

/// A link inside a file DAG, with what a parent needs to know about the child.
#[derive(Debug, Clone, Copy)]
struct FileLink {
    cid: Cid,
    /// Encoded bytes of the child's whole DAG.
    tsize: u64,
    /// File bytes under the child.
    filesize: u64,
}

/// The balanced layout, built bottom-up: `levels[h]` holds the finished nodes of height `h`
/// (0 = leaves) that have no parent yet; never more than `max_links - 1` of them.
#[derive(Debug)]
struct BalancedTree {
    levels: Vec<Vec<FileLink>>,
}

impl BalancedTree {
    fn new() -> Self {
        BalancedTree { levels: vec![Vec::new()] }
    }

    fn is_empty(&self) -> bool {
        self.levels.iter().all(Vec::is_empty)
    }

    fn push(&mut self, opts: &ImportOptions, height: usize, link: FileLink, out: &mut impl Extend<Block>) {
        if self.levels.len() == height {
            self.levels.push(Vec::with_capacity(opts.max_links));
        }
        self.levels[height].push(link);
        if self.levels[height].len() == opts.max_links {
            let parent = self.close(opts, height, out);
            self.push(opts, height + 1, parent, out);
        }
    }

    /// Emits the node over the pending links of `height` and returns the link to it.
    fn close(&mut self, opts: &ImportOptions, height: usize, out: &mut impl Extend<Block>) -> FileLink {
        let children = std::mem::take(&mut self.levels[height]);
        let data = dag_pb::file_node_data(children.iter().map(|c| c.filesize));
        let bytes = dag_pb::encode_node(
            children.iter().map(|c| LinkRef { cid: &c.cid, name: "", tsize: c.tsize }),
            Some(&data),
        );
        let tsize = bytes.len() as u64 + children.iter().map(|c| c.tsize).sum::<u64>();
        let filesize = children.iter().map(|c| c.filesize).sum();
        let block = opts.block(DAG_PB, Bytes::from(bytes));
        let link = FileLink { cid: block.cid, tsize, filesize };
        out.extend(std::iter::once(block));
        self.levels[height] = children;
        self.levels[height].clear();
        link
    }

    /// Closes every partial node, lowest level first, and returns the root. `None` if no
    /// leaf was ever pushed.
    fn finish(mut self, opts: &ImportOptions, out: &mut impl Extend<Block>) -> Option<FileLink> {
        let top = self.levels.iter().rposition(|level| !level.is_empty())?;
        for height in 0..top {
            if !self.levels[height].is_empty() {
                let parent = self.close(opts, height, out);
                self.levels[height + 1].push(parent);
            }
        }
        if self.levels[top].len() == 1 {
            // A single node at the top (one leaf, or exactly 174^k leaves) is the root.
            return self.levels[top].pop();
        }
        Some(self.close(opts, top, out))
    }
}

/// Streaming file importer: feed bytes, get blocks, finish with the root.
///
/// I/O-free; memory is a buffer of up to [`HASH_BATCH_BYTES`] of chunks being filled, the
/// buffers of the blocks not dropped yet, and at most `max_links` links per tree level. Blocks
/// come out in an order where every child precedes its parent.
///
/// ```
/// use kubelt_protocol::unixfs::{FileImporter, ImportOptions};
/// let mut blocks = Vec::new();
/// let mut importer = FileImporter::new(ImportOptions::default()).unwrap();
/// importer.push(b"hello\n", &mut blocks);
/// let file = importer.finish(&mut blocks);
/// assert_eq!(file.cid.to_string(), "QmZULkCELmmk5XNfCgTnCyFgAVxBRBXyDHGGMVoLFLiXEN");
/// ```
#[derive(Debug)]
pub struct FileImporter {
    opts: ImportOptions,
    /// Where the buffers come from: a file's first buffer holds a single slot (a small file
    /// takes no more), the next ones about [`HASH_BATCH_BYTES`] each, from this pool.
    pool: Arc<DirectPool>,
    /// The buffer being filled: slots of [`slot_len`] bytes, one per leaf, each
    /// `LEAF_HEADER_ROOM` spare bytes, the chunk, then `LEAF_TRAILER_ROOM` spare bytes.
    buf: Option<DirectBuf>,
    /// Where the slot being filled starts in `buf`, and its data bytes so far.
    slot: usize,
    filled: usize,
    /// Full slots of `buf` not hashed yet, in file order: start and data bytes. Hashed
    /// together, on every core, once `buf` has no room for another slot (and at `finish`).
    pending: Vec<(usize, usize)>,
    /// Buffers whose leaves went out, for the store to write them as they are.
    frozen: Vec<Arc<DirectBuf>>,
    tree: BalancedTree,
    size: u64,
}

impl FileImporter {
    /// A new importer; fails on invalid options.
    pub fn new(opts: ImportOptions) -> Result<Self, UnixfsError> {
        opts.validate()?;
        let slot = slot_len(&opts);
        // Slots per buffer: about HASH_BATCH_BYTES of chunks; tiny chunks (a test's) count as
        // bigger, so that the spare room does not swell the buffer.
        let slots = (HASH_BATCH_BYTES / opts.chunk_size.max(8 * (LEAF_HEADER_ROOM + LEAF_TRAILER_ROOM))).max(1);
        // Spare buffers worth keeping: the one filled, those queued for the writer, the one
        // it writes.
        let pool = DirectPool::new(slots * slot, QUEUED_BATCHES + 2);
        Ok(FileImporter {
            opts,
            pool,
            buf: None,
            slot: 0,
            filled: 0,
            pending: Vec::new(),
            frozen: Vec::new(),
            tree: BalancedTree::new(),
            size: 0,
        })
    }

    /// The buffer being filled; a new one if there is none.
    fn buf(&mut self) -> &mut DirectBuf {
        let first = self.size == 0 && self.tree.is_empty();
        let slot_len = slot_len(&self.opts);
        self.buf.get_or_insert_with(|| if first { DirectBuf::new(slot_len) } else { self.pool.take() })
    }

    /// The part of the chunk being filled that is still empty.
    fn room(&mut self) -> &mut [u8] {
        let data = self.slot + LEAF_HEADER_ROOM;
        let (filled, chunk) = (self.filled, self.opts.chunk_size);
        &mut self.buf()[data + filled..data + chunk]
    }

    /// File bytes imported so far.
    pub fn bytes_imported(&self) -> u64 {
        self.size
    }

    /// The options this importer was made with.
    pub fn options(&self) -> &ImportOptions {
        &self.opts
    }

    /// Imports `data`; blocks that are complete go to `out`.
    pub fn push(&mut self, mut data: &[u8], out: &mut impl Extend<Block>) {
        while !data.is_empty() {
            let room = self.room();
            let take = room.len().min(data.len());
            room[..take].copy_from_slice(&data[..take]);
            data = &data[take..];
            self.advance(take, out);
        }
    }

    /// Imports everything `reader` yields until end of file, reading straight into leaf
    /// buffers (no copy). Returns the bytes read.
    pub fn push_reader(&mut self, reader: &mut impl Read, out: &mut impl Extend<Block>) -> std::io::Result<u64> {
        let mut total = 0u64;
        loop {
            let read = match reader.read(self.room()) {
                Ok(0) => return Ok(total),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            total += read as u64;
            self.advance(read, out);
        }
    }

    /// Accounts for `n` new bytes in the chunk; emits the leaf when the chunk is full.
    fn advance(&mut self, n: usize, out: &mut impl Extend<Block>) {
        self.filled += n;
        self.size += n as u64;
        if self.filled == self.opts.chunk_size {
            self.emit_leaf(out);
        }
    }

    /// Queues the filled slot as a leaf; hashes the buffer's leaves once it has no room for
    /// another slot.
    fn emit_leaf(&mut self, out: &mut impl Extend<Block>) {
        let slot_len = slot_len(&self.opts);
        let end = self.slot + 2 * slot_len;
        let full = self.buf().len() < end;
        self.pending.push((self.slot, self.filled));
        self.filled = 0;
        self.slot += slot_len;
        if full {
            self.hash_pending(out);
        }
    }

    /// Hashes the buffer's leaves (on every core) and emits them, in file order.
    fn hash_pending(&mut self, out: &mut impl Extend<Block>) {
        let Some(mut buf) = self.buf.take() else { return };
        let slot_len = slot_len(&self.opts);
        let raw = self.opts.raw_leaves;
        // Each leaf's codec, place in the buffer and file bytes; dag-pb leaves get their
        // header and trailer around the chunk, in place.
        let leaves: Vec<(u64, std::ops::Range<usize>, u64)> = std::mem::take(&mut self.pending)
            .into_iter()
            .map(|(start, n)| {
                let (codec, leaf) = if raw {
                    (RAW, LEAF_HEADER_ROOM..LEAF_HEADER_ROOM + n)
                } else {
                    (DAG_PB, dag_pb::finish_file_leaf_in(&mut buf[start..start + slot_len], n))
                };
                (codec, start + leaf.start..start + leaf.end, n as u64)
            })
            .collect();
        self.slot = 0;
        let bytes: usize = leaves.iter().map(|(_, range, _)| range.len()).sum();
        let leaves = if 2 * bytes >= buf.len() {
            let buf = Arc::new(buf);
            let whole = Bytes::from_owner(SharedDirectBuf(buf.clone()));
            self.frozen.push(buf);
            leaves.into_iter().map(|(codec, range, filesize)| (codec, whole.slice(range), filesize)).collect()
        } else {
            // Mostly empty (a small file, a file's last bytes): the leaves get memory of their
            // own, so that blocks waiting to be written never hold more than twice their bytes.
            leaves.into_iter().map(|(codec, range, filesize)| (codec, Bytes::copy_from_slice(&buf[range]), filesize)).collect()
        };
        for (block, filesize) in make_leaves(&self.opts, leaves) {
            let link = FileLink { cid: block.cid, tsize: block.data.len() as u64, filesize };
            out.extend(std::iter::once(block));
            self.tree.push(&self.opts, 0, link, out);
        }
    }

    /// The buffers whose leaves went out since the last call: the leaves' bytes are theirs,
    /// so the store can write them as they are.
    pub(crate) fn take_buffers(&mut self) -> Vec<Arc<DirectBuf>> {
        std::mem::take(&mut self.frozen)
    }

    /// Emits the last blocks and returns the file's root.
    pub fn finish(self, out: &mut impl Extend<Block>) -> Imported {
        self.finish_with_buffers(out).0
    }

    /// [`FileImporter::finish`], and the buffers of the last leaves (see
    /// [`FileImporter::take_buffers`]).
    pub(crate) fn finish_with_buffers(mut self, out: &mut impl Extend<Block>) -> (Imported, Vec<Arc<DirectBuf>>) {
        // The last, short chunk; or the empty file's single empty leaf.
        if self.filled > 0 || self.size == 0 {
            self.emit_leaf(out);
        }
        self.hash_pending(out);
        let root = self.tree.finish(&self.opts, out).expect("at least one leaf was emitted");
        (Imported { cid: root.cid, size: root.filesize, tsize: root.tsize }, self.frozen)
    }
}

/// Chunk bytes hashed together, split over the cores, and a buffer's size: large enough that
/// waking the helpers costs nothing next to the hashing (~0.7 ms of SHA-256 per core), small
/// enough that the writer starts early and that few fresh pages are touched (~2 us each on
/// this kind of VM). A 100 MiB `add` against 4 MiB: 0.888 (20 alternating pairs); 1 MiB
/// measured the same as 2, 512 KiB 1.03-1.06x slower.
pub const HASH_BATCH_BYTES: usize = 2 << 20;

/// Threads that hash leaves: one per core, at most 8.
fn hash_threads() -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()).min(8))
}

/// A batch of leaves that the importing thread and the [`hash_helpers`] hash together: each
/// takes the next leaf no other has taken, so that one the scheduler holds back (another
/// process; a private add's encryption) leaves its share to the others instead of keeping
/// them waiting, and a helper that never gets to it costs nothing.
struct HashJob {
    leaves: Vec<Bytes>,
    next: AtomicUsize,
    digests: Vec<OnceLock<[u8; 32]>>,
    /// Leaves taken by a helper and not yet given back (hashed, or dropped by a panic).
    taken: Mutex<usize>,
    given_back: Condvar,
}

impl HashJob {
    fn new(leaves: Vec<Bytes>) -> Self {
        let digests = leaves.iter().map(|_| OnceLock::new()).collect();
        HashJob { leaves, next: AtomicUsize::new(0), digests, taken: Mutex::new(0), given_back: Condvar::new() }
    }

    /// The next leaf no other thread has taken.
    fn take(&self) -> Option<usize> {
        // AcqRel: a thread that finds none left sees every helper's count of what it took.
        let i = self.next.fetch_add(1, Ordering::AcqRel);
        (i < self.leaves.len()).then_some(i)
    }

    /// Leaf `i`'s digest, hashed here unless another thread already has.
    fn hash(&self, i: usize) -> [u8; 32] {
        *self.digests[i].get_or_init(|| Sha256::digest(&self.leaves[i]).into())
    }

    /// A helper's share: each leaf is counted before it is taken and given back once hashed,
    /// or when hashing it panicked (the importing thread then hashes it).
    fn help(&self) {
        struct GiveBack<'a>(&'a HashJob, usize);
        impl Drop for GiveBack<'_> {
            fn drop(&mut self) {
                let mut taken = lock(&self.0.taken);
                *taken -= self.1;
                if *taken == 0 {
                    self.0.given_back.notify_all();
                }
            }
        }
        let mut share = GiveBack(self, 0);
        loop {
            *lock(&self.taken) += 1;
            share.1 += 1;
            let Some(i) = self.take() else { return };
            self.hash(i);
        }
    }

    /// The importing thread's share, then the helpers' leaves: the digests in order.
    fn run(&self) -> Vec<[u8; 32]> {
        while let Some(i) = self.take() {
            self.hash(i);
        }
        let mut taken = lock(&self.taken);
        while *taken > 0 {
            taken = self.given_back.wait(taken).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        drop(taken);
        // A leaf a helper gave back unhashed is hashed now.
        (0..self.leaves.len()).map(|i| self.hash(i)).collect()
    }
}

/// The threads that hash beside the importing one ([`hash_threads`] - 1), made at the first
/// import of the process and kept, waiting for [`HashJob`]s. Threads made for every batch
/// (25 for a 100 MiB `add` of 4 MiB batches) cost ~0.3-3 ms each on this kind of VM. Empty
/// where none could be made: then the importing thread hashes alone.
fn hash_helpers() -> &'static [SyncSender<Arc<HashJob>>] {
    static HELPERS: OnceLock<Vec<SyncSender<Arc<HashJob>>>> = OnceLock::new();
    HELPERS.get_or_init(|| {
        (1..hash_threads())
            .filter_map(|_| {
                let (jobs, incoming) = std::sync::mpsc::sync_channel::<Arc<HashJob>>(1);
                let helper = move || {
                    for job in incoming {
                        job.help();
                    }
                };
                match std::thread::Builder::new().name("unixfs-hash".into()).spawn(helper) {
                    Ok(_) => Some(jobs),
                    Err(e) => {
                        tracing::warn!("one hashing thread fewer: it could not be made: {e}");
                        None
                    }
                }
            })
            .collect()
    })
}

/// Bytes of one slot of a [`FileImporter`]'s buffer: room for a leaf's header, its chunk and
/// its trailer.
fn slot_len(opts: &ImportOptions) -> usize {
    LEAF_HEADER_ROOM + opts.chunk_size + LEAF_TRAILER_ROOM
}

/// Hashes encoded leaves (codec, bytes, file bytes) into blocks, in order, on this thread
/// and the [`hash_helpers`] (see [`HashJob`]).
fn make_leaves(opts: &ImportOptions, leaves: Vec<(u64, Bytes, u64)>) -> Vec<(Block, u64)> {
    let helpers = hash_helpers();
    if helpers.is_empty() || leaves.len() <= 1 {
        return leaves.into_iter().map(|(codec, data, filesize)| (opts.block(codec, data), filesize)).collect();
    }
    let job = Arc::new(HashJob::new(leaves.iter().map(|(_, data, _)| data.clone()).collect()));
    for helper in helpers {
        // A helper still busy with another import's batch (its queue holds one) is skipped.
        let _ = helper.try_send(job.clone());
    }
    let digests = job.run();
    leaves
        .into_iter()
        .zip(digests)
        .map(|((codec, data, filesize), digest)| (Block { cid: opts.cid(codec, &digest), data }, filesize))
        .collect()
}

/// Imports bytes held in memory; returns the root and every block (children first).
pub fn add_bytes(data: &[u8], opts: &ImportOptions) -> Result<(Imported, Vec<Block>), UnixfsError> {
    let mut blocks = Vec::new();
    let mut importer = FileImporter::new(opts.clone())?;
    importer.push(data, &mut blocks);
    let root = importer.finish(&mut blocks);
    Ok((root, blocks))
}

/// Imports everything `reader` yields into `store` and returns the root. Blocking: run it on
/// a blocking thread in async code.
///
/// Blocks are written in batches of [`BATCH_BYTES`] by a second thread while this one reads
/// and hashes. `progress` is called with the bytes imported so far after every chunk. The
/// root is not pinned: pin it (and hold off GC until then).
pub fn add_file(
    store: &Store,
    mut reader: impl Read,
    opts: &ImportOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<Imported, UnixfsError> {
    let mut importer = FileImporter::new(opts.clone())?;
    with_store_writer(store, |sink| {
        import_reader(&mut importer, &mut reader, sink, 0, progress)?;
        Ok(sink.finish_file(importer))
    })
}

/// Feeds `reader` to `importer` chunk by chunk, reporting progress as `base + bytes`.
pub(crate) fn import_reader(
    importer: &mut FileImporter,
    reader: &mut impl Read,
    sink: &mut BlockSink,
    base: u64,
    progress: &mut dyn FnMut(u64),
) -> Result<(), UnixfsError> {
    // Read one chunk at a time so that progress is reported as we go.
    let chunk = importer.opts.chunk_size as u64;
    loop {
        let mut limited = reader.by_ref().take(chunk);
        let read = importer.push_reader(&mut limited, sink).map_err(UnixfsError::Read)?;
        sink.chunk_done(importer);
        sink.check()?;
        progress(base + importer.bytes_imported());
        if read == 0 {
            return Ok(());
        }
    }
}

/// Bytes of blocks handed to the store in one `put_blocks` batch (one write to a pack file): a
/// [`HASH_BATCH_BYTES`] buffer each. Direct writes of 1-8 MiB reach the same 1.8-2 GB/s here.
/// (When blocks went to RocksDB, 4 MiB batches wrote ~25% faster than 16 MiB ones.)
pub const BATCH_BYTES: usize = 2 << 20;
/// Batches queued for the writer thread; bounds memory to about 6 × [`BATCH_BYTES`].
const QUEUED_BATCHES: usize = 4;

/// A batch for the writer thread: blocks, and the buffers that hold some of them.
type Batch = (Vec<Block>, Vec<Arc<DirectBuf>>);

/// Collects blocks into large batches and hands them to a writer thread.
///
/// [`import_reader`] hands a batch over once it holds [`BATCH_BYTES`], with the importer's
/// buffers, so that they are written as they are; blocks that come otherwise (directories)
/// go at twice that.
pub(crate) struct BlockSink {
    batch: Vec<Block>,
    bytes: usize,
    buffers: Vec<Arc<DirectBuf>>,
    tx: Option<std::sync::mpsc::SyncSender<Batch>>,
    /// Set when the writer thread is gone (it failed); the error comes from its join.
    writer_gone: bool,
}

impl Extend<Block> for BlockSink {
    fn extend<I: IntoIterator<Item = Block>>(&mut self, blocks: I) {
        for block in blocks {
            self.bytes += block.data.len();
            self.batch.push(block);
        }
        if self.bytes >= 2 * BATCH_BYTES {
            self.flush();
        }
    }
}

impl BlockSink {
    fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let batch = (std::mem::take(&mut self.batch), std::mem::take(&mut self.buffers));
        self.bytes = 0;
        if let Some(tx) = &self.tx {
            if tx.send(batch).is_err() {
                self.writer_gone = true;
            }
        }
    }

    /// Takes the importer's buffers whose leaves came out, and hands the batch to the writer
    /// once it holds [`BATCH_BYTES`]: with its buffers, so that they are written as they are.
    fn chunk_done(&mut self, importer: &mut FileImporter) {
        self.buffers.extend(importer.take_buffers());
        if self.bytes >= BATCH_BYTES {
            self.flush();
        }
    }

    /// Emits a file's last blocks and returns its root.
    pub(crate) fn finish_file(&mut self, importer: FileImporter) -> Imported {
        let (root, buffers) = importer.finish_with_buffers(self);
        self.buffers.extend(buffers);
        root
    }

    /// Fails fast when the writer thread has stopped.
    pub(crate) fn check(&self) -> Result<(), UnixfsError> {
        if self.writer_gone {
            return Err(UnixfsError::Source("block writer stopped".into()));
        }
        Ok(())
    }
}

/// Runs `work` with a sink whose blocks a scoped thread writes to `store`; returns `work`'s
/// result once every block is written. A store error wins over `work`'s result.
pub(crate) fn with_store_writer<T>(
    store: &Store,
    work: impl FnOnce(&mut BlockSink) -> Result<T, UnixfsError>,
) -> Result<T, UnixfsError> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Batch>(QUEUED_BATCHES);
    std::thread::scope(|scope| {
        let writer = std::thread::Builder::new()
            .name("unixfs-writer".into())
            .spawn_scoped(scope, move || -> Result<(), UnixfsError> {
                for (blocks, buffers) in rx {
                    store.put_blocks_to_pin(&blocks, &buffers.iter().map(|b| &**b).collect::<Vec<_>>())?;
                }
                Ok(())
            })
            .map_err(|e| UnixfsError::Source(format!("cannot start the block writer: {e}")))?;
        let mut sink = BlockSink { batch: Vec::new(), bytes: 0, buffers: Vec::new(), tx: Some(tx), writer_gone: false };
        let result = work(&mut sink);
        if result.is_ok() {
            sink.flush();
        }
        // Closing the channel ends the writer's loop.
        sink.tx = None;
        let written = writer.join().map_err(|_| UnixfsError::Source("block writer panicked".into()))?;
        written?;
        result
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::BlockStore;

    pub(crate) use crate::testing::pseudo_random;

    fn leaf_count(len: usize) -> usize {
        len.div_ceil(DEFAULT_CHUNK_SIZE).max(1)
    }

    fn some_leaves(count: usize, seed: u64) -> Vec<Bytes> {
        (0..count).map(|i| Bytes::from(pseudo_random(1000 + i * 7, seed + i as u64))).collect()
    }

    fn digests_alone(leaves: &[Bytes]) -> Vec<[u8; 32]> {
        leaves.iter().map(|data| Sha256::digest(data).into()).collect()
    }

    #[test]
    fn helpers_racing_for_a_batchs_leaves_hash_each_once_in_order() {
        for (count, helpers) in [(1, 3), (2, 1), (16, 1), (17, 4), (64, 7)] {
            let leaves = some_leaves(count, count as u64);
            let job = Arc::new(HashJob::new(leaves.clone()));
            let threads: Vec<_> = (0..helpers)
                .map(|_| {
                    let job = job.clone();
                    std::thread::spawn(move || job.help())
                })
                .collect();
            assert_eq!(job.run(), digests_alone(&leaves), "{count} leaves, {helpers} helpers");
            for thread in threads {
                thread.join().expect("a helper panicked");
            }
        }
    }

    #[test]
    fn a_leaf_a_helper_gave_back_unhashed_is_hashed_by_the_importing_thread() {
        let leaves = some_leaves(5, 9);
        let job = HashJob::new(leaves.clone());
        // What `help` does when hashing its leaf panics: count it, take it, give it back.
        *lock(&job.taken) += 1;
        assert_eq!(job.take(), Some(0));
        *lock(&job.taken) -= 1;
        assert!(job.digests[0].get().is_none());
        assert_eq!(job.run(), digests_alone(&leaves));
    }

    #[test]
    fn imports_at_once_share_the_helpers_and_get_their_own_cids() -> anyhow::Result<()> {
        let datas: Vec<Vec<u8>> = (0..4).map(|i| pseudo_random(3 * HASH_BATCH_BYTES + 12_345 * i, 40 + i as u64)).collect();
        let one_at_a_time: Vec<Cid> = datas.iter().map(|data| add_bytes(data, &ImportOptions::default()).map(|(root, _)| root.cid)).collect::<Result<_, _>>()?;
        let got: Vec<Cid> = std::thread::scope(|scope| {
            let imports: Vec<_> = datas.iter().map(|data| scope.spawn(move || add_bytes(data, &ImportOptions::default()).map(|(root, _)| root.cid))).collect();
            imports.into_iter().map(|import| import.join().expect("an import panicked")).collect::<Result<_, _>>()
        })?;
        assert_eq!(got, one_at_a_time);
        Ok(())
    }

    #[test]
    fn well_known_small_files_get_kubos_cids() -> anyhow::Result<()> {
        let (hello, _) = add_bytes(b"hello\n", &ImportOptions::default())?;
        assert_eq!(hello.cid.to_string(), "QmZULkCELmmk5XNfCgTnCyFgAVxBRBXyDHGGMVoLFLiXEN");
        let (empty, blocks) = add_bytes(b"", &ImportOptions::default())?;
        assert_eq!(empty.cid.to_string(), "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH");
        assert_eq!(blocks.len(), 1);
        let (empty_raw, _) = add_bytes(b"", &ImportOptions::cid_v1())?;
        assert_eq!(empty_raw.cid.to_string(), "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku");
        Ok(())
    }

    #[test]
    fn balanced_tree_has_the_expected_shape_at_boundaries() -> anyhow::Result<()> {
        let opts = ImportOptions { chunk_size: 4, max_links: 3, ..Default::default() };
        // (leaves, internal nodes) for a 3-ary balanced tree.
        for (leaves, internal) in [(1, 0), (2, 1), (3, 1), (4, 3), (9, 4), (10, 7)] {
            let data = pseudo_random(leaves * 4, leaves as u64);
            let (root, blocks) = add_bytes(&data, &opts)?;
            assert_eq!(blocks.len(), leaves + internal, "{leaves} leaves");
            assert_eq!(blocks.last().map(|b| b.cid), Some(root.cid));
            assert_eq!(root.size, data.len() as u64);
            assert_eq!(root.tsize, blocks.iter().map(|b| b.data.len() as u64).sum::<u64>());
        }
        Ok(())
    }

    #[test]
    fn pushing_in_odd_pieces_gives_the_same_cid_as_one_push() -> anyhow::Result<()> {
        let data = pseudo_random(3 * DEFAULT_CHUNK_SIZE + 17, 5);
        for opts in [ImportOptions::default(), ImportOptions::cid_v1()] {
            let (whole, _) = add_bytes(&data, &opts)?;
            let mut importer = FileImporter::new(opts.clone())?;
            let mut blocks = Vec::new();
            for piece in data.chunks(100_003) {
                importer.push(piece, &mut blocks);
            }
            assert_eq!(importer.finish(&mut blocks), whole);
            let mut importer = FileImporter::new(opts)?;
            let mut blocks2 = Vec::new();
            importer.push_reader(&mut &data[..], &mut blocks2)?;
            assert_eq!(importer.finish(&mut blocks2), whole);
            assert_eq!(blocks, blocks2);
        }
        Ok(())
    }

    #[test]
    fn cid_v1_uses_raw_leaves_and_v1_dag_pb_nodes() -> anyhow::Result<()> {
        let data = pseudo_random(2 * DEFAULT_CHUNK_SIZE + 1, 9);
        let (root, blocks) = add_bytes(&data, &ImportOptions::cid_v1())?;
        assert_eq!(blocks.len(), 4);
        for leaf in &blocks[..3] {
            assert_eq!(leaf.cid.codec(), RAW);
            assert_eq!(leaf.cid.version(), Version::V1);
        }
        assert_eq!(root.cid.codec(), DAG_PB);
        assert_eq!(root.cid.version(), Version::V1);
        assert_eq!(&blocks[0].data[..], &data[..DEFAULT_CHUNK_SIZE]);
        // One chunk: the raw leaf is the file.
        let (single, _) = add_bytes(&data[..10], &ImportOptions::cid_v1())?;
        assert_eq!(single.cid, ImportOptions::cid_v1().block(RAW, Bytes::copy_from_slice(&data[..10])).cid);
        Ok(())
    }

    /// An imported file's leaves go to disk from the buffer they were read into: in the pack
    /// file they sit a slot apart (chunk and header room), not back to back as copies would.
    /// The file's last chunk, alone in a mostly empty buffer, is copied; everything reads back.
    #[test]
    fn leaves_are_written_from_the_buffers_they_were_read_into() -> anyhow::Result<()> {
        use crate::store::packs::Location;
        use crate::store::Column;
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        // One leaf in the first buffer, a whole buffer's in the next, 2 in the last.
        let per_buffer = HASH_BATCH_BYTES / DEFAULT_CHUNK_SIZE;
        let count = 1 + per_buffer + 2;
        let data = pseudo_random(count * DEFAULT_CHUNK_SIZE - 5, 11);
        let opts = ImportOptions::cid_v1();
        let root = add_file(&store, &data[..], &opts, &mut |_| {})?;
        let (expected, blocks) = add_bytes(&data, &opts)?;
        assert_eq!(root, expected);
        let location = |block: &Block| -> anyhow::Result<Location> {
            let bytes = store.get(Column::Packed, &block.cid.hash().to_bytes())?.ok_or_else(|| anyhow::anyhow!("not packed"))?;
            Ok(Location::decode(&bytes)?)
        };
        let leaves: Vec<Location> = blocks.iter().filter(|b| b.cid.codec() == RAW).map(location).collect::<Result<_, _>>()?;
        assert_eq!(leaves.len(), count);
        // A slot apart, or back to back through the page cache (where the filesystem refuses
        // O_DIRECT), from the same memory.
        let room = if crate::store::packs::takes_direct(dir.path())? { LEAF_HEADER_ROOM + LEAF_TRAILER_ROOM } else { 0 };
        for pair in leaves[1..1 + per_buffer].windows(2) {
            assert_eq!(pair[1].offset - pair[0].offset, (DEFAULT_CHUNK_SIZE + room) as u64, "{pair:?}");
        }
        for block in &blocks {
            assert_eq!(store.get_block(&block.cid)?.as_ref(), Some(&block.data));
        }
        Ok(())
    }

    #[test]
    fn add_file_stores_every_block() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let data = pseudo_random(5 * DEFAULT_CHUNK_SIZE / 2, 3);
        let mut last = 0;
        let root = add_file(&store, &data[..], &ImportOptions::default(), &mut |n| last = n)?;
        assert_eq!(last, data.len() as u64);
        let (expected, blocks) = add_bytes(&data, &ImportOptions::default())?;
        assert_eq!(root, expected);
        assert_eq!(blocks.len(), leaf_count(data.len()) + 1);
        for block in blocks {
            assert_eq!(store.get_block(&block.cid)?, Some(block.data));
        }
        Ok(())
    }
}

/// Throughput measurements; run with
/// `cargo test --release -p kubelt-protocol unixfs::importer::bench -- --ignored --nocapture`
/// on an otherwise idle machine.
#[cfg(test)]
mod bench {
    use std::time::Instant;

    use super::tests::pseudo_random;
    use super::*;

    const SIZE: usize = 100 << 20;

    fn mb_per_s(bytes: usize, since: Instant) -> f64 {
        bytes as f64 / 1e6 / since.elapsed().as_secs_f64()
    }

    #[test]
    #[ignore = "benchmark"]
    fn import_100_mib_throughput() -> anyhow::Result<()> {
        let data = pseudo_random(SIZE, 42);
        for (label, opts) in [("cidv0", ImportOptions::default()), ("cidv1", ImportOptions::cid_v1())] {
            // Hashing and encoding only.
            let start = Instant::now();
            let mut importer = FileImporter::new(opts.clone())?;
            let mut count = 0usize;
            let mut sink = CountingSink(&mut count);
            importer.push_reader(&mut &data[..], &mut sink)?;
            let root = importer.finish(&mut sink);
            println!("{label}: hash+encode {:.0} MB/s ({count} blocks, root {})", mb_per_s(SIZE, start), root.cid);

            // Into a fresh RocksDB store, from a file in the page cache.
            let dir = tempfile::tempdir()?;
            let path = dir.path().join("input");
            std::fs::write(&path, &data)?;
            let store = Store::open(dir.path().join("db"))?;
            let start = Instant::now();
            let stored = add_file(&store, std::fs::File::open(&path)?, &opts, &mut |_| {})?;
            println!("{label}: add_file into RocksDB {:.0} MB/s", mb_per_s(SIZE, start));
            assert_eq!(stored, root);

            // Back out through the exporter (verifying every block).
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            let start = Instant::now();
            let read = runtime.block_on(async {
                use futures::TryStreamExt;
                crate::unixfs::cat(store.clone(), root.cid)
                    .try_fold(0usize, |n, chunk| async move { Ok(n + chunk.len()) })
                    .await
            })?;
            assert_eq!(read, SIZE);
            println!("{label}: cat from RocksDB {:.0} MB/s", mb_per_s(SIZE, start));
        }
        Ok(())
    }

    struct CountingSink<'a>(&'a mut usize);

    impl Extend<Block> for CountingSink<'_> {
        fn extend<I: IntoIterator<Item = Block>>(&mut self, blocks: I) {
            *self.0 += blocks.into_iter().count();
        }
    }
}
