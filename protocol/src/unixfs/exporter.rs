//! The exporter: UnixFS DAGs back to bytes, directories and paths.
//!
//! Spec: UnixFS v1 (<https://github.com/ipfs/specs/blob/main/UNIXFS.md>), path resolution as
//! in `ipfs cat /ipfs/<cid>/a/b`.
//!
//! Every block comes from a [`BlockSource`] (the local store, or later the network) and is
//! checked against its CID before it is decoded, so an untrusted source cannot feed us bytes
//! that are not the content. A file is read as an ordered stream of chunks: the DAG is walked
//! depth-first while up to `read_ahead` blocks ahead of the reader are fetched concurrently,
//! so memory stays at about `read_ahead` blocks whatever the file size.
//!
//! File nodes are read generally (a node's own `Data` bytes come before its children's), so
//! trickle DAGs and files from other importers read correctly too; directories may be plain
//! or HAMT-sharded.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use cid::Cid;
use futures::future::BoxFuture;
use futures::{Stream, StreamExt, TryStreamExt};
use kubelt_proto::unixfs::data::DataType;
use kubelt_proto::unixfs::Data;
use tokio::io::AsyncWriteExt;

use super::dag_pb::{self, DecodedLink, DecodedNode, DAG_CBOR, DAG_PB, RAW};
use super::hamt::{self, HashBits};
use super::{cbor, verify_block, BlockSource, UnixfsError};

/// Blocks fetched ahead of the reader by [`cat`]: 32 leaves of 256 KiB = 8 MiB in flight.
pub const DEFAULT_READ_AHEAD: usize = 32;

/// Blocks at least this big are verified on tokio's blocking pool.
const PARALLEL_VERIFY_MIN: usize = 64 * 1024;

/// Multicodec of identity multihashes (inline CIDs: the bytes are in the CID).
const IDENTITY: u64 = 0x00;

/// What a CID names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EntryKind {
    /// A UnixFS file (dag-pb), or a raw block, which is a file of its bytes.
    File,
    /// A plain UnixFS directory.
    Directory,
    /// A HAMT-sharded UnixFS directory.
    HamtDirectory,
    /// A UnixFS symlink.
    Symlink,
    /// Some other UnixFS node (`Metadata`).
    Other,
}

impl EntryKind {
    /// A short name for messages ("file", "directory"...).
    pub fn name(self) -> &'static str {
        match self {
            EntryKind::File => "file",
            EntryKind::Directory => "directory",
            EntryKind::HamtDirectory => "sharded directory",
            EntryKind::Symlink => "symlink",
            EntryKind::Other => "UnixFS metadata node",
        }
    }

    /// Whether paths can go through it.
    pub fn is_dir(self) -> bool {
        matches!(self, EntryKind::Directory | EntryKind::HamtDirectory)
    }
}

/// What `stat` reports about a CID (like `ipfs files stat`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    /// The CID asked about.
    pub cid: Cid,
    /// File, directory, symlink or raw block.
    pub kind: EntryKind,
    /// File size in bytes; the target length for a symlink; 0 for directories.
    pub size: u64,
    /// The root block's size plus its links' `Tsize`: the DAG's encoded size.
    pub cumulative_size: u64,
    /// Number of links of the root block.
    pub blocks: usize,
}

/// One directory entry as `ls` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LsEntry {
    /// The entry's name.
    pub name: String,
    /// The entry's CID.
    pub cid: Cid,
    /// The entry's `Tsize`, when the link has one.
    pub tsize: Option<u64>,
}

/// What `get` wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GetReport {
    /// Files written.
    pub files: u64,
    /// Directories created.
    pub directories: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// File bytes written.
    pub bytes: u64,
}

/// A verified block, decoded just enough to know what it is.
#[derive(Debug)]
enum Node {
    /// A raw block: a file of exactly these bytes.
    Raw(Bytes),
    /// A dag-pb UnixFS node.
    Unixfs { node: DecodedNode, data: Data },
}

impl Node {
    fn decode(cid: &Cid, block: Bytes) -> Result<Self, UnixfsError> {
        match cid.codec() {
            RAW => Ok(Node::Raw(block)),
            DAG_PB => {
                let node = DecodedNode::decode(cid, block)?;
                let data = node.unixfs(cid)?;
                Ok(Node::Unixfs { node, data })
            }
            codec => Err(UnixfsError::UnsupportedCodec { cid: *cid, codec }),
        }
    }

    fn kind(&self, cid: &Cid) -> Result<EntryKind, UnixfsError> {
        match self {
            Node::Raw(_) => Ok(EntryKind::File),
            Node::Unixfs { data, .. } => match DataType::try_from(data.r#type) {
                Ok(DataType::File | DataType::Raw) => Ok(EntryKind::File),
                Ok(DataType::Directory) => Ok(EntryKind::Directory),
                Ok(DataType::HamtShard) => Ok(EntryKind::HamtDirectory),
                Ok(DataType::Symlink) => Ok(EntryKind::Symlink),
                Ok(DataType::Metadata) => Ok(EntryKind::Other),
                Err(_) => Err(UnixfsError::NotUnixfs { cid: *cid, reason: format!("unknown type {}", data.r#type) }),
            },
        }
    }
}

/// Fetches a block and checks it against its CID (unless the source only holds checked blocks,
/// [`BlockSource::checked`]).
fn fetch<S: BlockSource + ?Sized>(source: &S, cid: Cid) -> BoxFuture<'static, Result<Bytes, UnixfsError>> {
    if cid.hash().code() == IDENTITY {
        // The content is the CID's digest itself.
        return Box::pin(std::future::ready(Ok(Bytes::copy_from_slice(cid.hash().digest()))));
    }
    let get = source.get(cid);
    if source.checked() {
        return get;
    }
    Box::pin(async move {
        let block = get.await?;
        match tokio::runtime::Handle::try_current() {
            // Hash big blocks on the blocking pool: the blocks in flight are then checked in
            // parallel instead of one after the other on the reader's task.
            Ok(runtime) if block.len() >= PARALLEL_VERIFY_MIN => runtime
                .spawn_blocking(move || verify_block(&cid, &block).map(|()| block))
                .await
                .map_err(|e| UnixfsError::Source(format!("verification task failed: {e}")))?,
            _ => verify_block(&cid, &block).map(|()| block),
        }
    })
}

async fn fetch_node<S: BlockSource + ?Sized>(source: &S, cid: Cid) -> Result<(Node, EntryKind), UnixfsError> {
    let block = fetch(source, cid).await?;
    let node = Node::decode(&cid, block)?;
    let kind = node.kind(&cid)?;
    Ok((node, kind))
}

/// The CIDs a block links to, for DAG walks (GC, CAR export, bitswap sessions): dag-pb links,
/// dag-cbor tag-42 links; raw blocks (and inline identity CIDs) link to nothing.
pub fn links(cid: &Cid, data: &[u8]) -> Result<Vec<Cid>, UnixfsError> {
    match cid.codec() {
        DAG_PB => dag_pb::link_cids(cid, data),
        RAW => Ok(Vec::new()),
        DAG_CBOR => cbor::links(data).map_err(|reason| UnixfsError::InvalidDagPb { cid: *cid, reason }),
        _ if cid.hash().code() == IDENTITY => Ok(Vec::new()),
        codec => Err(UnixfsError::UnsupportedCodec { cid: *cid, codec }),
    }
}

/// Splits `cid[/a/b]` or `/ipfs/cid[/a/b]` into the root CID and the path segments.
fn parse_path(path: &str) -> Result<(Cid, Vec<&str>), UnixfsError> {
    let invalid = |reason| UnixfsError::InvalidPath { path: path.to_string(), reason };
    let trimmed = path.strip_prefix("/ipfs/").unwrap_or(path).trim_start_matches('/');
    let mut segments = trimmed.split('/').filter(|s| !s.is_empty());
    let root = segments.next().ok_or_else(|| invalid("no CID"))?;
    let cid = Cid::try_from(root).map_err(|_| invalid("the first segment is not a CID"))?;
    let segments: Vec<&str> = segments.collect();
    if segments.iter().any(|s| *s == "." || *s == "..") {
        return Err(invalid("'.' and '..' segments are not allowed"));
    }
    Ok((cid, segments))
}

/// Resolves `cid[/segment/...]` (optionally prefixed with `/ipfs/`) through plain and sharded
/// directories to the CID it names.
pub async fn resolve<S: BlockSource + ?Sized>(source: &S, path: &str) -> Result<Cid, UnixfsError> {
    let (mut cid, segments) = parse_path(path)?;
    for segment in segments {
        let (node, kind) = fetch_node(source, cid).await?;
        cid = match (node, kind) {
            (Node::Unixfs { node, .. }, EntryKind::Directory) => node
                .links
                .into_iter()
                .find(|link| link.name == segment)
                .map(|link| link.cid)
                .ok_or_else(|| UnixfsError::PathNotFound { segment: segment.to_string(), dir: cid })?,
            (Node::Unixfs { node, data }, EntryKind::HamtDirectory) => {
                hamt_find(source, cid, node, &data, segment).await?
            }
            (_, kind) => return Err(UnixfsError::NotADirectory { cid, found: kind.name() }),
        };
    }
    Ok(cid)
}

/// Looks `name` up in a HAMT directory by following its hash down the shards.
async fn hamt_find<S: BlockSource + ?Sized>(
    source: &S,
    root: Cid,
    mut node: DecodedNode,
    data: &Data,
    name: &str,
) -> Result<Cid, UnixfsError> {
    let (bits, pad) = hamt_params(root, data)?;
    let mut hash = HashBits::new(name);
    loop {
        let index = hash.next(bits).ok_or_else(|| UnixfsError::PathNotFound { segment: name.to_string(), dir: root })?;
        let prefix = format!("{index:0pad$X}");
        let link = node
            .links
            .iter()
            .find(|link| link.name.starts_with(&prefix))
            .ok_or_else(|| UnixfsError::PathNotFound { segment: name.to_string(), dir: root })?;
        if link.name.len() > pad {
            return if link.name.get(pad..) == Some(name) {
                Ok(link.cid)
            } else {
                Err(UnixfsError::PathNotFound { segment: name.to_string(), dir: root })
            };
        }
        let shard = link.cid;
        let (child, _) = fetch_node(source, shard).await?;
        node = match child {
            Node::Unixfs { node, data } if data.r#type == DataType::HamtShard as i32 => {
                hamt_params(shard, &data)?;
                node
            }
            _ => return Err(UnixfsError::InvalidHamt { cid: shard, reason: "a shard link points to a non-shard".into() }),
        };
    }
}

/// The index width (bits) and link-name prefix length of a shard; only murmur3 is known.
fn hamt_params(cid: Cid, data: &Data) -> Result<(usize, usize), UnixfsError> {
    if data.hash_type != Some(hamt::HASH_MURMUR3) {
        return Err(UnixfsError::InvalidHamt { cid, reason: format!("unsupported hash type {:?}", data.hash_type) });
    }
    let fanout = data.fanout.unwrap_or(0);
    let bits = hamt::fanout_bits(fanout)
        .ok_or_else(|| UnixfsError::InvalidHamt { cid, reason: format!("invalid fanout {fanout}") })?;
    Ok((bits, hamt::prefix_len(fanout)))
}

/// Describes what a CID names (type, size).
pub async fn stat<S: BlockSource + ?Sized>(source: &S, cid: Cid) -> Result<Stat, UnixfsError> {
    let block = fetch(source, cid).await?;
    let block_len = block.len() as u64;
    let node = Node::decode(&cid, block)?;
    let kind = node.kind(&cid)?;
    Ok(match node {
        Node::Raw(bytes) => Stat { cid, kind, size: bytes.len() as u64, cumulative_size: block_len, blocks: 0 },
        Node::Unixfs { node, data } => {
            let size = match kind {
                EntryKind::File => data.filesize.unwrap_or_else(|| data.data.as_ref().map_or(0, |d| d.len() as u64)),
                EntryKind::Symlink => data.data.as_ref().map_or(0, |d| d.len() as u64),
                _ => 0,
            };
            let cumulative_size = block_len + node.links.iter().filter_map(|l| l.tsize).sum::<u64>();
            Stat { cid, kind, size, cumulative_size, blocks: node.links.len() }
        }
    })
}

/// Lists a directory (plain or sharded), entries in name order.
pub async fn ls<S: BlockSource + ?Sized>(source: &S, cid: Cid) -> Result<Vec<LsEntry>, UnixfsError> {
    let (node, kind) = fetch_node(source, cid).await?;
    dir_entries(source, cid, node, kind).await
}

async fn dir_entries<S: BlockSource + ?Sized>(
    source: &S,
    cid: Cid,
    node: Node,
    kind: EntryKind,
) -> Result<Vec<LsEntry>, UnixfsError> {
    let entry = |link: DecodedLink, name: String| LsEntry { name, cid: link.cid, tsize: link.tsize };
    let plain = |link: DecodedLink| LsEntry { name: link.name, cid: link.cid, tsize: link.tsize };
    match (node, kind) {
        (Node::Unixfs { node, .. }, EntryKind::Directory) => {
            Ok(node.links.into_iter().map(plain).collect())
        }
        (Node::Unixfs { node, data }, EntryKind::HamtDirectory) => {
            let (_, pad) = hamt_params(cid, &data)?;
            let mut entries = Vec::new();
            let mut shards = vec![(cid, node)];
            while !shards.is_empty() {
                let mut next = Vec::new();
                for (shard, node) in shards {
                    for link in node.links {
                        if link.name.len() < pad {
                            return Err(UnixfsError::InvalidHamt { cid: shard, reason: format!("bad link name {:?}", link.name) });
                        } else if link.name.len() == pad {
                            next.push(link.cid);
                        } else {
                            let name = link.name.get(pad..).ok_or_else(|| UnixfsError::InvalidHamt {
                                cid: shard,
                                reason: format!("bad link name {:?}", link.name),
                            })?;
                            let name = name.to_string();
                            entries.push(entry(link, name));
                        }
                    }
                }
                // Fetch the next level of shards concurrently.
                shards = futures::stream::iter(next)
                    .map(|shard| async move {
                        match fetch_node(source, shard).await? {
                            (Node::Unixfs { node, data }, EntryKind::HamtDirectory) => {
                                hamt_params(shard, &data)?;
                                Ok((shard, node))
                            }
                            _ => Err(UnixfsError::InvalidHamt { cid: shard, reason: "a shard link points to a non-shard".into() }),
                        }
                    })
                    .buffered(16)
                    .try_collect()
                    .await?;
            }
            entries.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(entries)
        }
        (_, kind) => Err(UnixfsError::NotADirectory { cid, found: kind.name() }),
    }
}

/// Reads a file as an ordered stream of byte chunks, with [`DEFAULT_READ_AHEAD`] blocks
/// fetched ahead. The stream ends with an error if a block is missing, corrupt, or the file
/// does not have the size its root announces.
pub fn cat<S: BlockSource>(source: S, cid: Cid) -> impl Stream<Item = Result<Bytes, UnixfsError>> + Send + 'static {
    cat_with_read_ahead(source, cid, DEFAULT_READ_AHEAD)
}

/// [`cat`] with a chosen number of blocks in flight (at least 1).
pub fn cat_with_read_ahead<S: BlockSource>(
    source: S,
    cid: Cid,
    read_ahead: usize,
) -> impl Stream<Item = Result<Bytes, UnixfsError>> + Send + 'static {
    FileStream::new(source, cid, None, read_ahead)
}

/// One piece of the file, in file order.
enum Slot {
    /// A block to fetch, not requested yet.
    Wanted(Cid),
    /// A block being fetched.
    Fetching(Cid, BoxFuture<'static, Result<Bytes, UnixfsError>>),
    /// A fetched, verified block, not yet decoded.
    Fetched(Cid, Bytes),
    /// File bytes ready to hand out.
    Data(Bytes),
    /// A fetch that failed; reported when the reader gets there.
    Failed(UnixfsError),
}

/// The stream behind [`cat`]: a queue of slots in file order; the first `read_ahead` are
/// being fetched; the head is decoded into data and child slots as soon as it arrives.
struct FileStream<S> {
    source: S,
    root: Cid,
    queue: VecDeque<Slot>,
    read_ahead: usize,
    /// The size the root announces, checked at the end.
    expected: Option<u64>,
    /// Whether the root block was decoded (and `expected` set from it).
    root_expanded: bool,
    emitted: u64,
    done: bool,
}

impl<S: BlockSource> FileStream<S> {
    fn new(source: S, root: Cid, root_block: Option<Bytes>, read_ahead: usize) -> Self {
        let first = match root_block {
            Some(block) => Slot::Fetched(root, block),
            None => Slot::Wanted(root),
        };
        FileStream {
            source,
            root,
            queue: VecDeque::from([first]),
            read_ahead: read_ahead.max(1),
            expected: None,
            root_expanded: false,
            emitted: 0,
            done: false,
        }
    }

    /// Replaces the fetched head block by its data and its children, in order.
    fn expand(&mut self, cid: Cid, block: Bytes) -> Result<(), UnixfsError> {
        let is_root = !self.root_expanded;
        self.root_expanded = true;
        let node = Node::decode(&cid, block)?;
        let kind = node.kind(&cid)?;
        if kind != EntryKind::File {
            return Err(if is_root {
                UnixfsError::NotAFile { cid, found: kind.name() }
            } else {
                UnixfsError::NotUnixfs { cid, reason: format!("a {} inside a file", kind.name()) }
            });
        }
        match node {
            Node::Raw(bytes) => {
                if is_root {
                    self.expected = Some(bytes.len() as u64);
                }
                if !bytes.is_empty() {
                    self.queue.push_front(Slot::Data(bytes));
                }
            }
            Node::Unixfs { node, data } => {
                if is_root {
                    self.expected = data.filesize;
                }
                for link in node.links.into_iter().rev() {
                    self.queue.push_front(Slot::Wanted(link.cid));
                }
                if let Some(bytes) = data.data.filter(|b| !b.is_empty()) {
                    self.queue.push_front(Slot::Data(bytes));
                }
            }
        }
        Ok(())
    }

    /// Starts fetches in the read-ahead window and polls every fetch in flight.
    fn drive_fetches(&mut self, cx: &mut Context<'_>) {
        for slot in self.queue.iter_mut().take(self.read_ahead) {
            if let Slot::Wanted(cid) = *slot {
                *slot = Slot::Fetching(cid, fetch(&self.source, cid));
            }
        }
        for slot in self.queue.iter_mut() {
            if let Slot::Fetching(cid, fut) = slot {
                if let Poll::Ready(result) = fut.as_mut().poll(cx) {
                    *slot = match result {
                        Ok(bytes) => Slot::Fetched(*cid, bytes),
                        Err(e) => Slot::Failed(e),
                    };
                }
            }
        }
    }
}

// Nothing in a `FileStream` is pinned in place: the fetch futures are boxed.
impl<S> Unpin for FileStream<S> {}

impl<S: BlockSource> Stream for FileStream<S> {
    type Item = Result<Bytes, UnixfsError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = Pin::into_inner(self);
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            this.drive_fetches(cx);
            match this.queue.pop_front() {
                None => {
                    this.done = true;
                    return match this.expected {
                        Some(expected) if expected != this.emitted => Poll::Ready(Some(Err(UnixfsError::SizeMismatch {
                            cid: this.root,
                            expected,
                            actual: this.emitted,
                        }))),
                        _ => Poll::Ready(None),
                    };
                }
                Some(Slot::Data(bytes)) => {
                    this.emitted += bytes.len() as u64;
                    return Poll::Ready(Some(Ok(bytes)));
                }
                Some(Slot::Fetched(cid, block)) => {
                    if let Err(e) = this.expand(cid, block) {
                        this.done = true;
                        return Poll::Ready(Some(Err(e)));
                    }
                }
                Some(Slot::Failed(e)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Some(slot @ (Slot::Fetching(..) | Slot::Wanted(_))) => {
                    // Still on its way; every fetch in flight has our waker.
                    this.queue.push_front(slot);
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Longest symlink target `get` writes: Linux's `PATH_MAX`. Longer targets cannot be created
/// anyway, and the bound keeps the deferred symlinks of a hostile DAG small in memory.
const MAX_SYMLINK_TARGET: usize = 4096;

/// Checks that a directory entry name is one normal path component, safe to create inside
/// the output directory: not empty, not `.` or `..`, no `/`, `\` or NUL.
fn safe_name(dir: Cid, name: &str) -> Result<&str, UnixfsError> {
    let bad_chars = name.contains(['/', '\\', '\0']);
    let mut components = Path::new(name).components();
    let one_normal = matches!((components.next(), components.next()), (Some(std::path::Component::Normal(_)), None));
    if bad_chars || !one_normal || name == "." || name == ".." {
        return Err(UnixfsError::UnsafeName { name: name.to_string(), dir });
    }
    Ok(name)
}

/// Refuses a directory with two entries of the same name. dag-pb does not forbid it, but a
/// hostile DAG uses it to write through its own symlink: `evil` → `/somewhere`, then a
/// directory `evil` holding a file.
fn check_unique_names(dir: Cid, entries: &[LsEntry]) -> Result<(), UnixfsError> {
    let mut seen = std::collections::HashSet::with_capacity(entries.len());
    match entries.iter().find(|entry| !seen.insert(entry.name.as_str())) {
        Some(duplicate) => Err(UnixfsError::DuplicateName { name: duplicate.name.clone(), dir }),
        None => Ok(()),
    }
}

/// The output path must be new: `get` creates everything it writes, so that nothing already
/// there (a file it would overwrite, a symlink it would follow) is touched.
async fn check_output_is_new(out: &Path) -> Result<(), UnixfsError> {
    match tokio::fs::symlink_metadata(out).await {
        Ok(_) => Err(UnixfsError::OutputExists(out.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(UnixfsError::io(out, e)),
    }
}

/// Writes what `cid` names to `out`: a file, a symlink, or a directory tree.
///
/// The DAG may come from a hostile peer, so `get` never writes outside `out`:
/// - `out` must not exist yet (its parent directories are created, as the caller asked);
/// - entry names must be single normal path components, unique within their directory;
/// - every directory is created with `mkdir` (never `create_dir_all`) and every file with
///   `O_CREAT | O_EXCL | O_NOFOLLOW`, so an existing path — a symlink above all, or a name
///   that a case-insensitive file system folds onto another entry — is an error, never
///   followed or overwritten;
/// - symlinks are written verbatim (like `ipfs get`, absolute and `..` targets included) but
///   only after every file and directory, so nothing is ever written through one.
///
/// On an error, what was written so far stays inside `out`.
pub async fn get<S: BlockSource + Clone>(source: &S, cid: Cid, out: &Path) -> Result<GetReport, UnixfsError> {
    check_output_is_new(out).await?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        tokio::fs::create_dir_all(parent).await.map_err(|e| UnixfsError::io(parent, e))?;
    }
    let mut report = GetReport::default();
    let mut symlinks: Vec<(PathBuf, Bytes)> = Vec::new();
    let mut stack: Vec<(Cid, PathBuf)> = vec![(cid, out.to_path_buf())];
    while let Some((cid, path)) = stack.pop() {
        let block = fetch(source, cid).await?;
        let node = Node::decode(&cid, block.clone())?;
        let kind = node.kind(&cid)?;
        match kind {
            EntryKind::File => {
                drop(node);
                report.bytes += write_file(FileStream::new(source.clone(), cid, Some(block), DEFAULT_READ_AHEAD), &path).await?;
                report.files += 1;
            }
            EntryKind::Directory | EntryKind::HamtDirectory => {
                tokio::fs::create_dir(&path).await.map_err(|e| UnixfsError::io(&path, e))?;
                report.directories += 1;
                let entries = dir_entries(source, cid, node, kind).await?;
                check_unique_names(cid, &entries)?;
                for entry in entries.into_iter().rev() {
                    let name = safe_name(cid, &entry.name)?;
                    stack.push((entry.cid, path.join(name)));
                }
            }
            EntryKind::Symlink => symlinks.push((path, symlink_target(cid, node)?)),
            EntryKind::Other => return Err(UnixfsError::NotAFile { cid, found: kind.name() }),
        }
    }
    // Last, once every file and directory is written: no later write can go through these.
    for (path, target) in symlinks {
        write_symlink(&target, &path).await?;
        report.symlinks += 1;
    }
    Ok(report)
}

/// The target of a UnixFS symlink node, bounded by [`MAX_SYMLINK_TARGET`].
fn symlink_target(cid: Cid, node: Node) -> Result<Bytes, UnixfsError> {
    let target = match node {
        Node::Unixfs { data, .. } => data.data.unwrap_or_default(),
        Node::Raw(_) => Bytes::new(),
    };
    if target.len() > MAX_SYMLINK_TARGET {
        return Err(UnixfsError::NotUnixfs {
            cid,
            reason: format!("symlink target of {} bytes (at most {MAX_SYMLINK_TARGET})", target.len()),
        });
    }
    Ok(target)
}

/// Creates a new file at `path` (never an existing one, never through a symlink).
async fn create_new_file(path: &Path) -> Result<tokio::fs::File, UnixfsError> {
    let mut options = tokio::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.custom_flags(libc::O_NOFOLLOW);
    options.open(path).await.map_err(|e| UnixfsError::io(path, e))
}

async fn write_file<S: BlockSource>(mut stream: FileStream<S>, path: &Path) -> Result<u64, UnixfsError> {
    let mut file = create_new_file(path).await?;
    let mut written = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        file.write_all(&chunk).await.map_err(|e| UnixfsError::io(path, e))?;
        written += chunk.len() as u64;
    }
    file.flush().await.map_err(|e| UnixfsError::io(path, e))?;
    Ok(written)
}

/// `symlink(2)` never follows `path` and fails if it exists.
#[cfg(unix)]
async fn write_symlink(target: &[u8], path: &Path) -> Result<(), UnixfsError> {
    use std::os::unix::ffi::OsStrExt;
    let target = std::ffi::OsStr::from_bytes(target).to_os_string();
    tokio::fs::symlink(&target, path).await.map_err(|e| UnixfsError::io(path, e))
}

#[cfg(not(unix))]
async fn write_symlink(target: &[u8], path: &Path) -> Result<(), UnixfsError> {
    // No portable symlinks: write the target as the file's content.
    let mut file = create_new_file(path).await?;
    file.write_all(target).await.map_err(|e| UnixfsError::io(path, e))?;
    file.flush().await.map_err(|e| UnixfsError::io(path, e))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use super::*;
    use crate::store::{Block, Store};
    use crate::unixfs::dir::{add_path, DirectoryBuilder};
    use crate::unixfs::importer::{add_bytes, add_file, tests::pseudo_random, ImportOptions, DEFAULT_CHUNK_SIZE};

    /// Blocks in memory, keyed by multihash like the store; can be told to lie about one.
    #[derive(Clone, Default)]
    struct MemSource {
        blocks: Arc<HashMap<Vec<u8>, Bytes>>,
    }

    impl MemSource {
        fn new(blocks: &[Block]) -> Self {
            MemSource { blocks: Arc::new(blocks.iter().map(|b| (b.cid.hash().to_bytes(), b.data.clone())).collect()) }
        }
    }

    impl BlockSource for MemSource {
        fn get(&self, cid: Cid) -> BoxFuture<'static, Result<Bytes, UnixfsError>> {
            let found = self.blocks.get(&cid.hash().to_bytes()).cloned();
            Box::pin(async move { found.ok_or(UnixfsError::BlockNotFound(cid)) })
        }
    }

    async fn cat_all<S: BlockSource>(source: S, cid: Cid) -> Result<Vec<u8>, UnixfsError> {
        let mut out = Vec::new();
        let mut stream = std::pin::pin!(cat(source, cid));
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cat_returns_the_imported_bytes_at_chunk_and_fanout_boundaries() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let c = DEFAULT_CHUNK_SIZE;
        let sizes = [0, 1, c - 1, c, c + 1, 174 * c, 174 * c + 1, 5 * (1 << 20) + 12345];
        for (i, size) in sizes.into_iter().enumerate() {
            let data = pseudo_random(size, i as u64 + 100);
            for opts in [ImportOptions::default(), ImportOptions::cid_v1()] {
                let imported = {
                    let (store, data, opts) = (store.clone(), data.clone(), opts.clone());
                    tokio::task::spawn_blocking(move || add_file(&store, &data[..], &opts, &mut |_| {})).await??
                };
                assert_eq!(imported.size, size as u64);
                let back = cat_all(store.clone(), imported.cid).await?;
                assert!(back == data, "{size} bytes with {opts:?} came back different");
                let stat = stat(&store, imported.cid).await?;
                assert_eq!((stat.kind, stat.size, stat.cumulative_size), (EntryKind::File, size as u64, imported.tsize));
            }
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_block_that_does_not_match_its_cid_is_refused() -> anyhow::Result<()> {
        let data = pseudo_random(3 * DEFAULT_CHUNK_SIZE, 1);
        let (root, mut blocks) = add_bytes(&data, &ImportOptions::default())?;
        let mut corrupt = blocks[1].data.to_vec();
        corrupt[100] ^= 1;
        let lied_about = blocks[1].cid;
        blocks[1].data = Bytes::from(corrupt);
        let err = cat_all(MemSource::new(&blocks), root.cid).await.unwrap_err();
        assert!(matches!(err, UnixfsError::HashMismatch(cid) if cid == lied_about), "{err}");

        blocks.remove(1);
        let err = cat_all(MemSource::new(&blocks), root.cid).await.unwrap_err();
        assert!(matches!(err, UnixfsError::BlockNotFound(cid) if cid == lied_about), "{err}");
        assert_eq!(err.to_string(), format!("block {lied_about} not found"));
        Ok(())
    }

    #[tokio::test]
    async fn cat_of_a_directory_says_it_is_not_a_file() -> anyhow::Result<()> {
        let mut blocks = Vec::new();
        let root = DirectoryBuilder::new(ImportOptions::default()).finish(&mut blocks)?;
        let err = cat_all(MemSource::new(&blocks), root.cid).await.unwrap_err();
        assert!(matches!(err, UnixfsError::NotAFile { .. }), "{err}");
        assert!(err.to_string().contains("not a UnixFS file"), "{err}");
        Ok(())
    }

    /// (name, content) of the files of a test tree.
    type Files = Vec<(String, Vec<u8>)>;

    /// A tree with a sub-directory inside a sharded directory.
    fn sharded_tree(opts: &ImportOptions) -> anyhow::Result<(Cid, Vec<Block>, Files)> {
        let mut blocks = Vec::new();
        let mut inner = DirectoryBuilder::new(opts.clone());
        let (deep, file_blocks) = add_bytes(b"deep file\n", opts)?;
        blocks.extend(file_blocks);
        inner.add("deep.txt", deep)?;
        let inner = inner.finish(&mut blocks)?;
        let mut top = DirectoryBuilder::new(opts.clone());
        let mut files = Vec::new();
        for i in 0..300 {
            let name = format!("file-{i:03}");
            let content = pseudo_random(i * 10, i as u64);
            let (file, file_blocks) = add_bytes(&content, opts)?;
            blocks.extend(file_blocks);
            top.add(&name, file)?;
            files.push((name, content));
        }
        top.add("inner", inner)?;
        assert!(top.will_shard());
        let root = top.finish(&mut blocks)?;
        Ok((root.cid, blocks, files))
    }

    #[tokio::test]
    async fn paths_resolve_through_plain_and_sharded_directories() -> anyhow::Result<()> {
        for opts in [ImportOptions::default(), ImportOptions::cid_v1()] {
            let opts = ImportOptions { hamt_threshold: 4096, ..opts };
            let (root, blocks, files) = sharded_tree(&opts)?;
            let source = MemSource::new(&blocks);
            assert_eq!(stat(&source, root).await?.kind, EntryKind::HamtDirectory);
            let deep = resolve(&source, &format!("/ipfs/{root}/inner/deep.txt")).await?;
            assert_eq!(cat_all(source.clone(), deep).await?, b"deep file\n");
            for (name, content) in files.iter().step_by(37) {
                let cid = resolve(&source, &format!("{root}/{name}")).await?;
                assert_eq!(&cat_all(source.clone(), cid).await?, content);
            }
            let err = resolve(&source, &format!("{root}/inner/nope")).await.unwrap_err();
            assert!(err.to_string().starts_with("path segment 'nope' not found in directory"), "{err}");
            assert!(matches!(resolve(&source, &format!("{root}/nope")).await, Err(UnixfsError::PathNotFound { .. })));
            let err = resolve(&source, &format!("{root}/file-001/x")).await.unwrap_err();
            assert!(matches!(err, UnixfsError::NotADirectory { .. }), "{err}");
            let listing = ls(&source, root).await?;
            assert_eq!(listing.len(), 301);
            assert!(listing.windows(2).all(|w| w[0].name < w[1].name));
        }
        Ok(())
    }

    #[tokio::test]
    async fn get_writes_files_directories_and_symlinks_back() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("a/b/c"))?;
        std::fs::create_dir_all(src.join("empty"))?;
        std::fs::write(src.join("top.bin"), pseudo_random(3 * DEFAULT_CHUNK_SIZE + 5, 1))?;
        std::fs::write(src.join("a/b/c/leaf.txt"), b"leaf\n")?;
        std::fs::write(src.join("a/Z"), b"capital sorts first\n")?;
        std::fs::write(src.join(".hidden"), b"skipped by default\n")?;
        #[cfg(unix)]
        std::os::unix::fs::symlink("a/b/c/leaf.txt", src.join("link"))?;
        let store = Store::open(tmp.path().join("db"))?;

        let opts = ImportOptions::default();
        let hidden_too = ImportOptions { include_hidden: true, ..opts.clone() };
        let (s, p) = (store.clone(), src.clone());
        let (root, with_hidden) = tokio::task::spawn_blocking(move || -> Result<_, UnixfsError> {
            Ok((add_path(&s, &p, true, &opts, &mut |_| {})?, add_path(&s, &p, true, &hidden_too, &mut |_| {})?))
        })
        .await??;
        assert_ne!(root.cid, with_hidden.cid);

        let out = tmp.path().join("out");
        let report = get(&store, root.cid, &out).await?;
        assert_eq!((report.files, report.directories), (3, 5));
        assert_eq!(std::fs::read(out.join("top.bin"))?, std::fs::read(src.join("top.bin"))?);
        assert_eq!(std::fs::read(out.join("a/b/c/leaf.txt"))?, b"leaf\n");
        assert!(out.join("empty").is_dir());
        assert!(!out.join(".hidden").exists());
        #[cfg(unix)]
        assert_eq!(std::fs::read_link(out.join("link"))?, Path::new("a/b/c/leaf.txt"));

        let out2 = tmp.path().join("out2");
        get(&store, with_hidden.cid, &out2).await?;
        assert_eq!(std::fs::read(out2.join(".hidden"))?, b"skipped by default\n");
        Ok(())
    }

    #[tokio::test]
    async fn get_refuses_entry_names_that_escape_the_output() -> anyhow::Result<()> {
        // Hand-made directory with a ".." entry, as a hostile peer could serve.
        let opts = ImportOptions::default();
        let (file, mut blocks) = add_bytes(b"x", &opts)?;
        let bytes = dag_pb::encode_node(
            [dag_pb::LinkRef { cid: &file.cid, name: "..", tsize: file.tsize }].into_iter(),
            Some(dag_pb::DIRECTORY_DATA),
        );
        let dir = opts.block(DAG_PB, Bytes::from(bytes));
        let root = dir.cid;
        blocks.push(dir);
        let tmp = tempfile::tempdir()?;
        let err = get(&MemSource::new(&blocks), root, &tmp.path().join("out")).await.unwrap_err();
        assert!(matches!(err, UnixfsError::UnsafeName { .. }), "{err}");
        Ok(())
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn get_refuses_a_symlink_and_a_directory_of_one_name_and_writes_nothing_outside() -> anyhow::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        let tmp = tempfile::tempdir()?;
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside)?;
        let (root, blocks) = crate::testing::symlink_and_directory_of_one_name(outside.as_os_str().as_bytes())?;
        let out = tmp.path().join("out");
        let err = get(&MemSource::new(&blocks), root, &out).await.unwrap_err();
        assert!(matches!(&err, UnixfsError::DuplicateName { name, .. } if name == "evil"), "{err}");
        assert!(err.to_string().contains("more than one entry named \"evil\""), "{err}");
        assert_eq!(std::fs::read_dir(&outside)?.count(), 0, "something was written outside the output");
        Ok(())
    }

    #[tokio::test]
    async fn get_refuses_an_output_path_that_exists_even_as_a_symlink() -> anyhow::Result<()> {
        let (file, blocks) = add_bytes(b"content\n", &ImportOptions::default())?;
        let tmp = tempfile::tempdir()?;
        let existing = tmp.path().join("existing.txt");
        std::fs::write(&existing, b"keep me\n")?;
        let err = get(&MemSource::new(&blocks), file.cid, &existing).await.unwrap_err();
        assert!(matches!(err, UnixfsError::OutputExists(_)), "{err}");
        assert_eq!(std::fs::read(&existing)?, b"keep me\n", "an existing file was overwritten");
        #[cfg(unix)]
        {
            let link = tmp.path().join("link");
            std::os::unix::fs::symlink(&existing, &link)?;
            let err = get(&MemSource::new(&blocks), file.cid, &link).await.unwrap_err();
            assert!(err.to_string().contains("already exists"), "{err}");
            assert_eq!(std::fs::read(&existing)?, b"keep me\n", "get wrote through a symlink");
        }
        Ok(())
    }

    #[test]
    fn entry_names_must_be_one_normal_component() -> anyhow::Result<()> {
        // The empty directory.
        let dir = Cid::try_from("QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn")?;
        for bad in ["", ".", "..", "a/b", "/", "a\\b", "nul\0", "../x"] {
            assert!(matches!(safe_name(dir, bad), Err(UnixfsError::UnsafeName { .. })), "{bad:?} was accepted");
        }
        for good in ["a", ".hidden", "...", "with space", "ü"] {
            assert_eq!(safe_name(dir, good).ok(), Some(good));
        }
        Ok(())
    }

    #[test]
    fn links_of_raw_and_dag_pb_blocks() -> anyhow::Result<()> {
        let data = pseudo_random(2 * DEFAULT_CHUNK_SIZE, 3);
        let (root, blocks) = add_bytes(&data, &ImportOptions::cid_v1())?;
        let root_block = blocks.last().map(|b| b.data.clone()).unwrap_or_default();
        assert_eq!(links(&root.cid, &root_block)?, vec![blocks[0].cid, blocks[1].cid]);
        assert!(links(&blocks[0].cid, &blocks[0].data)?.is_empty());
        Ok(())
    }
}
