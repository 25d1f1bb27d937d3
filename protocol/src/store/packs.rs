//! The bytes of large blocks, in append-only pack files beside the database.
//!
//! A block of [`PACK_MIN_BYTES`] or more is written once, straight from the caller's buffer
//! into the active pack file (one `writev` per batch), and the database keeps only its
//! [`Location`] in the `packed` column. RocksDB would copy it into a memtable first and write
//! it out again at flush; that copy, the fresh memtable pages and the flush thread were a
//! third of `add`'s time (see docs/design-notes.md, "Storage").
//!
//! - **Files.** `<db>/packs/00000001.pack`, … One file is active at a time and takes every
//!   append until it holds [`PACK_TARGET_BYTES`]; then the next one starts. A reopened store
//!   goes on appending to its last file while that one has room (so that many short runs, an
//!   offline `kubelt add` each, do not make a file each): each append goes at the file's
//!   length as the system reports it, so bytes a crash left at the tail are skipped, never
//!   pointed at.
//! - **Imports skip the page cache.** Blocks a pin follows at once ([`WriteMode::ToPin`]) are
//!   written with `O_DIRECT` at the next 4 KiB boundary of the file (the bytes before it and the
//!   padding after the batch are never pointed at): copying them into fresh page-cache pages was
//!   most of `add`'s CPU. Blocks that lie in an aligned buffer the caller names (the importer
//!   reads chunks into [`DirectBuf`]s) are written from there, the buffer as it is, gaps and
//!   all; the others are copied into one aligned buffer first. The region is reserved under the
//!   lock and written outside it, so cached appends need not wait. A filesystem that refuses
//!   `O_DIRECT` (tmpfs) gets them through the page cache, written back as they come.
//! - **Durability.** Appends are not synced. [`Packs::sync`] fdatasyncs every file appended to
//!   since the last sync, and the directory when files were created, before it returns;
//!   `Store::pin` calls it before writing the synced pin, so a pinned DAG is on disk.
//! - **Integrity.** Each location carries the CRC-32 of the bytes, checked on every read, so a
//!   flipped bit or a tail lost in a crash (an unpinned block whose location reached the log
//!   but whose bytes did not reach the disk) is an error, never wrong bytes.
//! - **Space.** A file is deleted once no location points into it ([`Packs::remove_unused`],
//!   after garbage collection). A file that keeps one live block keeps its dead bytes too, as
//!   RocksDB's blob files without blob GC did.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{IoSlice, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use super::direct_buf::{DirectBuf, DIRECT_ALIGN};
use super::StoreError;
use crate::lock;

/// Blocks this size and larger go to pack files; smaller ones stay in the database.
pub const PACK_MIN_BYTES: usize = 4096;
/// A pack file takes appends until it holds this many bytes.
pub const PACK_TARGET_BYTES: u64 = 64 << 20;
/// Read handles kept open (every one is reopened on demand).
const OPEN_READERS: usize = 64;
/// Appends of an import that go through the page cache (where the filesystem refuses direct
/// writes) start the kernel's write-back of every this many bytes, so that the
/// pin's sync waits for the last few megabytes only, not for everything the page cache held
/// back: the kernel on its own starts only once a tenth of memory is dirty. Measured, 100 MiB,
/// 12 alternating runs: `add` 0.180 → 0.142 s. Blocks fetched from peers are cache entries
/// that no sync may follow; writing them back as they come made a 1 GiB fetch 15 % slower
/// (231 → 199 MB/s, 3 alternating runs), so they are left to the kernel.
const WRITEBACK_BYTES: u64 = 8 << 20;
/// The aligned buffer of direct writes: one write per import batch (2 MiB, see
/// `unixfs::importer::BATCH_BYTES`; a CAR import's are larger and take several); allocated
/// for an import, freed at its sync.
const STAGING_BYTES: usize = 8 << 20;
/// `writev` takes at most this many buffers (Linux's `IOV_MAX`).
const MAX_IOVECS: usize = 1024;

/// How an append's bytes go to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// Through the page cache, left to the kernel: blocks fetched from peers, which no sync
    /// follows and which are often read again at once.
    Cached,
    /// Blocks a pin (and its sync) follows at once, an import's: straight to the disk
    /// (`O_DIRECT`) where the filesystem allows it, else through the page cache with the
    /// kernel's write-back started every [`WRITEBACK_BYTES`].
    ToPin,
}

/// Where a packed block's bytes are: the value of its key in the `packed` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// The pack file's number.
    pub pack: u32,
    /// The first byte in the file.
    pub offset: u64,
    /// The block's length.
    pub len: u32,
    /// CRC-32 (IEEE) of the block's bytes.
    pub crc: u32,
}

impl Location {
    /// Encoded length.
    pub const LEN: usize = 20;

    /// The 20-byte record: pack, offset, length, CRC, all big-endian.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[0..4].copy_from_slice(&self.pack.to_be_bytes());
        out[4..12].copy_from_slice(&self.offset.to_be_bytes());
        out[12..16].copy_from_slice(&self.len.to_be_bytes());
        out[16..20].copy_from_slice(&self.crc.to_be_bytes());
        out
    }

    /// Decodes a record written by [`Location::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let bytes: &[u8; Self::LEN] = bytes.try_into().map_err(|_| StoreError::Corrupt {
            column: "packed",
            reason: format!("a block location of {} bytes, expected {}", bytes.len(), Self::LEN),
        })?;
        let u32_at = |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let mut offset = [0u8; 8];
        offset.copy_from_slice(&bytes[4..12]);
        Ok(Location { pack: u32_at(0), offset: u64::from_be_bytes(offset), len: u32_at(12), crc: u32_at(16) })
    }
}

/// The pack files of one store.
pub struct Packs {
    dir: PathBuf,
    /// A file takes appends until it holds this many bytes ([`PACK_TARGET_BYTES`]).
    target: u64,
    active: Mutex<Active>,
    /// Held for the whole of a [`Packs::sync`], so that a sync that finds nothing left to do
    /// returns only after the one that took the files has synced them.
    syncing: Mutex<()>,
    readers: Mutex<HashMap<u32, Arc<File>>>,
    /// The aligned buffer of direct writes, while an import runs; apart from `active`, so that
    /// cached appends (bitswap's, on the swarm task) do not wait for an import's disk writes.
    staging: Mutex<Option<DirectBuf>>,
}

/// Reads of pack files wait while this lives: a disk that stalls, for tests.
#[doc(hidden)]
pub struct ReadStall<'a>(#[allow(dead_code)] MutexGuard<'a, HashMap<u32, Arc<File>>>);

/// The file that takes appends, and what the next sync owes the disk.
struct Active {
    /// The number of the last file made (or found at open): the next file is one more.
    last: u32,
    /// The open file and its number; `None` until the first append, and after a failed write
    /// (the next append starts a new file rather than write after a torn tail).
    file: Option<(u32, Arc<File>)>,
    /// Files written since the last sync.
    unsynced: Vec<Arc<File>>,
    /// How far into the active file write-back has been started (see [`WRITEBACK_BYTES`]).
    written_back: u64,
    /// Whether files were created since the directory was last synced.
    dir_unsynced: bool,
    /// The active file opened again with `O_DIRECT`, once an import wrote to it.
    direct: Option<(u32, Arc<File>)>,
    /// The filesystem refused `O_DIRECT`: imports go through the page cache.
    direct_refused: bool,
}

impl Packs {
    /// Opens (creating) `dir`; appends go to its last file while that one has room.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with_target(dir, PACK_TARGET_BYTES)
    }

    /// [`Packs::open`] with files of `target` bytes (tests make small ones).
    pub(crate) fn open_with_target(dir: &Path, target: u64) -> Result<Self, StoreError> {
        let created = !dir.exists();
        std::fs::create_dir_all(dir).map_err(|e| io_error(dir, "cannot create", e))?;
        if created {
            // The new directory's own name must survive a crash too.
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
        }
        let last = list(dir)?.iter().map(|(pack, _)| *pack).max().unwrap_or(0);
        // The last file takes appends again while it has room (an earlier run's write-back is
        // the kernel's business now: count it as started).
        let mut file = None;
        let mut written_back = 0;
        if last > 0 {
            let path = dir.join(pack_name(last));
            let len = std::fs::metadata(&path).map_err(|e| io_error(&path, "cannot stat", e))?.len();
            if len < target {
                let handle = OpenOptions::new().append(true).open(&path).map_err(|e| io_error(&path, "cannot open", e))?;
                file = Some((last, Arc::new(handle)));
                written_back = len;
            }
        }
        Ok(Packs {
            dir: dir.to_path_buf(),
            target,
            active: Mutex::new(Active {
                last,
                file,
                unsynced: Vec::new(),
                written_back,
                dir_unsynced: false,
                direct: None,
                direct_refused: false,
            }),
            syncing: Mutex::new(()),
            readers: Mutex::default(),
            staging: Mutex::default(),
        })
    }

    /// Appends `blocks` to the active file, in order, and returns where each one went; `write`
    /// says how their bytes go to disk.
    pub fn append(&self, blocks: &[&[u8]], write: WriteMode) -> Result<Vec<Location>, StoreError> {
        self.append_from(blocks, write, &[])
    }

    /// [`Packs::append`] of blocks that may lie in `buffers`: a direct write takes a buffer's
    /// memory as it is where its blocks fill at least half of it (see `DirectPlan`).
    pub fn append_from(&self, blocks: &[&[u8]], write: WriteMode, buffers: &[&DirectBuf]) -> Result<Vec<Location>, StoreError> {
        let crcs: Vec<u32> = blocks.iter().map(|b| crc32fast::hash(b)).collect();
        let total: u64 = blocks.iter().map(|b| b.len() as u64).sum();
        let mut active = lock(&self.active);
        let (pack, file, len) = self.current(&mut active)?;
        if write == WriteMode::ToPin {
            if let Some(direct) = self.direct_handle(&mut active, pack)? {
                let plan = DirectPlan::new(blocks, buffers);
                // Reserve the region by growing the file over it, so that appends made while
                // it is written (cached ones go at the file's length) go after it; then write
                // it without holding the lock.
                let at = len.next_multiple_of(DIRECT_ALIGN as u64);
                let end = at + plan.len();
                if let Err(e) = file.set_len(end) {
                    active.file = None;
                    return Err(io_error(&self.path(pack), "cannot grow", e));
                }
                drop(active);
                let written = plan.write(&direct, at, &self.staging);
                let mut active = lock(&self.active);
                match written {
                    Ok(()) => {
                        // Owed to the next sync only now that it is written: a sync that ran
                        // meanwhile must not count it as synced.
                        owe_sync(&mut active, &file);
                        return Ok(plan.locations(pack, at, blocks, crcs));
                    }
                    // Opened but refused at the write (an alignment the filesystem wants
                    // bigger): the reserved region stays unused; the page cache from now on.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        tracing::warn!(pack, "direct writes to pack files refused ({e}); writing through the page cache");
                        active.direct_refused = true;
                        active.direct = None;
                        drop(active);
                        *lock(&self.staging) = None;
                        return self.append(blocks, write);
                    }
                    Err(e) => {
                        // The region is never pointed at; the next append starts a new file.
                        if active.file.as_ref().is_some_and(|(p, _)| *p == pack) {
                            active.file = None;
                        }
                        active.direct = None;
                        return Err(io_error(&self.path(pack), "cannot write to", e));
                    }
                }
            }
        }
        if let Err(e) = write_all_vectored(&file, blocks) {
            // Whatever part of the batch reached the file is never pointed at.
            active.file = None;
            return Err(io_error(&self.path(pack), "cannot write to", e));
        }
        owe_sync(&mut active, &file);
        let end = len + total;
        if write == WriteMode::ToPin && end.saturating_sub(active.written_back) >= WRITEBACK_BYTES {
            start_writeback(&file, active.written_back.min(len), end);
            active.written_back = end;
        }
        // Back to back from the file's length.
        let offsets = blocks.iter().scan(len, |next, block| {
            let at = *next;
            *next += block.len() as u64;
            Some(at)
        });
        Ok(locations(pack, offsets, blocks, crcs))
    }

    /// The file that takes the next append, its number and its length (where an append to it
    /// goes): the active file while it has room, else a new one.
    fn current(&self, active: &mut Active) -> Result<(u32, Arc<File>, u64), StoreError> {
        if let Some((pack, file)) = active.file.clone() {
            let len = file.metadata().map_err(|e| io_error(&self.path(pack), "cannot stat", e))?.len();
            if len < self.target {
                return Ok((pack, file, len));
            }
        }
        let (pack, file) = self.start_file(active)?;
        Ok((pack, file, 0))
    }

    /// The active file (number `pack`) opened with `O_DIRECT`, or `None` where the filesystem
    /// refuses it.
    fn direct_handle(&self, active: &mut Active, pack: u32) -> Result<Option<Arc<File>>, StoreError> {
        if active.direct_refused {
            return Ok(None);
        }
        if let Some((open, file)) = &active.direct {
            if *open == pack {
                return Ok(Some(file.clone()));
            }
        }
        let path = self.path(pack);
        match open_direct(&path) {
            Ok(Some(file)) => {
                let file = Arc::new(file);
                active.direct = Some((pack, file.clone()));
                Ok(Some(file))
            }
            Ok(None) => {
                active.direct_refused = true;
                active.direct = None;
                Ok(None)
            }
            Err(e) => Err(io_error(&path, "cannot open", e)),
        }
    }

    /// Makes the next file the active one.
    fn start_file(&self, active: &mut Active) -> Result<(u32, Arc<File>), StoreError> {
        let pack = active.last.checked_add(1).ok_or_else(|| StoreError::Corrupt {
            column: "packed",
            reason: "pack file numbers are exhausted".into(),
        })?;
        let path = self.path(pack);
        let file = OpenOptions::new().append(true).create_new(true).open(&path).map_err(|e| io_error(&path, "cannot create", e))?;
        active.last = pack;
        active.dir_unsynced = true;
        active.written_back = 0;
        let file = Arc::new(file);
        active.file = Some((pack, file.clone()));
        Ok((pack, file))
    }

    /// Puts every byte appended before this call on disk, with the names of new files.
    pub fn sync(&self) -> Result<(), StoreError> {
        let _syncing = lock(&self.syncing);
        let (files, dir) = {
            // The import this sync ends is done with its buffer.
            *lock(&self.staging) = None;
            let mut active = lock(&self.active);
            (std::mem::take(&mut active.unsynced), std::mem::take(&mut active.dir_unsynced))
        };
        let result = files.iter().try_for_each(|f| f.sync_data().map_err(|e| io_error(&self.dir, "cannot sync a pack file in", e)));
        let result = result.and_then(|()| if dir { sync_dir(&self.dir) } else { Ok(()) });
        if result.is_err() {
            // Owed again: the next sync tries them again.
            let mut active = lock(&self.active);
            active.unsynced.extend(files);
            active.dir_unsynced |= dir;
        }
        result
    }

    /// Reads a block's bytes and checks them against the location's CRC. `Ok(Err(damage))`
    /// says the bytes are not there as written (a missing file, a short file, a failed
    /// checksum); an I/O error of the system itself is an `Err`.
    pub fn read(&self, location: &Location) -> Result<Result<Bytes, String>, StoreError> {
        let file = match self.reader(location.pack) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Err(format!("pack {} is gone", location.pack))),
            Err(e) => return Err(io_error(&self.path(location.pack), "cannot open", e)),
        };
        let data = match read_at(&file, location.len as usize, location.offset, ReadWait::Yes) {
            Ok(data) => data,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Ok(Err(format!("pack {} ends before the {} bytes at {}", location.pack, location.len, location.offset)))
            }
            Err(e) => return Err(io_error(&self.path(location.pack), "cannot read", e)),
        };
        if crc32fast::hash(&data) != location.crc {
            return Ok(Err(format!("the {} bytes at {} of pack {} fail their checksum", location.len, location.offset, location.pack)));
        }
        Ok(Ok(Bytes::from(data)))
    }

    /// [`Packs::read`] from the page cache only: `None` when reading would wait for the disk
    /// (bytes not all in the page cache, a file not opened yet, the readers busy), or when the
    /// bytes fail their checksum (damage is [`Packs::read`]'s to report).
    pub fn read_in_memory(&self, location: &Location) -> Option<Bytes> {
        let file = self.readers.try_lock().ok()?.get(&location.pack)?.clone();
        let data = read_at(&file, location.len as usize, location.offset, ReadWait::No).ok()?;
        (crc32fast::hash(&data) == location.crc).then(|| Bytes::from(data))
    }

    /// Makes every read wait until the returned guard is dropped (see
    /// [`super::Store::stall_pack_reads`]).
    pub(crate) fn stall_reads(&self) -> ReadStall<'_> {
        ReadStall(lock(&self.readers))
    }

    /// A read handle on a pack file.
    fn reader(&self, pack: u32) -> std::io::Result<Arc<File>> {
        if let Some(file) = lock(&self.readers).get(&pack) {
            return Ok(file.clone());
        }
        let file = Arc::new(File::open(self.path(pack))?);
        let mut readers = lock(&self.readers);
        if readers.len() >= OPEN_READERS {
            readers.clear();
        }
        readers.insert(pack, file.clone());
        Ok(file)
    }

    /// A number below which every file is complete: none takes appends any more (see
    /// [`Packs::remove_unused`]). The active file counts as complete once it is full.
    pub fn complete_below(&self) -> u32 {
        let active = lock(&self.active);
        match &active.file {
            Some((pack, file)) if !file.metadata().is_ok_and(|m| m.len() >= self.target) => *pack,
            _ => active.last + 1,
        }
    }

    /// Deletes every file numbered below `below` that `used` does not name; returns how many.
    /// `below` must come from [`Packs::complete_below`] before `used` was read from the index,
    /// so no append can have gone to a file this deletes.
    pub fn remove_unused(&self, below: u32, used: &HashSet<u32>) -> Result<usize, StoreError> {
        let mut removed = 0;
        for (pack, path) in list(&self.dir)? {
            if pack < below && !used.contains(&pack) {
                lock(&self.readers).remove(&pack);
                std::fs::remove_file(&path).map_err(|e| io_error(&path, "cannot remove", e))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Bytes in pack files.
    pub fn size(&self) -> u64 {
        let Ok(files) = list(&self.dir) else { return 0 };
        files.iter().filter_map(|(_, path)| std::fs::metadata(path).ok()).map(|m| m.len()).sum()
    }

    fn path(&self, pack: u32) -> PathBuf {
        self.dir.join(pack_name(pack))
    }
}

/// The name of pack file number `pack`.
fn pack_name(pack: u32) -> String {
    format!("{pack:08}.pack")
}

/// The pack files in `dir`, by number and path (other names are skipped).
fn list(dir: &Path) -> Result<Vec<(u32, PathBuf)>, StoreError> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io_error(dir, "cannot list", e))? {
        let entry = entry.map_err(|e| io_error(dir, "cannot list", e))?;
        if let Some(pack) = pack_number(&entry.file_name().to_string_lossy()) {
            files.push((pack, entry.path()));
        }
    }
    Ok(files)
}

/// The number of a pack file's name (`00000012.pack`), or `None` for any other name.
fn pack_number(name: &str) -> Option<u32> {
    let digits = name.strip_suffix(".pack")?;
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Writes every buffer, in order, with as few `writev` calls as the kernel allows.
fn write_all_vectored(mut file: &File, blocks: &[&[u8]]) -> std::io::Result<()> {
    for group in blocks.chunks(MAX_IOVECS) {
        let mut slices: Vec<IoSlice<'_>> = group.iter().map(|b| IoSlice::new(b)).collect();
        let mut slices = &mut slices[..];
        // Skip empty buffers up front: `advance_slices` expects progress.
        IoSlice::advance_slices(&mut slices, 0);
        while !slices.is_empty() {
            match file.write_vectored(slices) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut slices, n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Whether a read may wait for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadWait {
    Yes,
    /// Only what the page cache holds (`RWF_NOWAIT`); else `ErrorKind::WouldBlock`.
    No,
}

/// Reads exactly `len` bytes at `offset` into a new buffer, which is not zeroed first (a memset
/// of every served block was 7 % of a serving node's CPU).
fn read_at(file: &File, len: usize, offset: u64, wait: ReadWait) -> std::io::Result<Vec<u8>> {
    let mut data: Vec<u8> = Vec::with_capacity(len);
    while data.len() < len {
        let filled = data.len();
        let at = libc::off_t::try_from(offset + filled as u64).map_err(|_| std::io::ErrorKind::InvalidInput)?;
        let spare = &mut data.spare_capacity_mut()[..len - filled];
        let read = pread(file, spare, at, wait)?;
        if read == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        // SAFETY: `pread` wrote the first `read` bytes of the spare capacity.
        unsafe { data.set_len(filled + read) };
    }
    Ok(data)
}

/// One `pread` (or `preadv2` with `RWF_NOWAIT`) into `buf`; retried when interrupted. Returns the
/// bytes written at the start of `buf`.
fn pread(file: &File, buf: &mut [std::mem::MaybeUninit<u8>], at: libc::off_t, wait: ReadWait) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    loop {
        let read = match wait {
            // SAFETY: pread writes at most `buf.len()` bytes into `buf`, memory valid for writes.
            ReadWait::Yes => unsafe { libc::pread(file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), at) },
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            ReadWait::No => {
                let iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
                // SAFETY: as above, through one iovec over `buf`.
                unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, at, libc::RWF_NOWAIT) }
            }
            #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
            ReadWait::No => return Err(std::io::ErrorKind::WouldBlock.into()),
        };
        if read >= 0 {
            return Ok(read as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Counts `file` among those the next sync must sync.
fn owe_sync(active: &mut Active, file: &Arc<File>) {
    if !active.unsynced.iter().any(|f| Arc::ptr_eq(f, file)) {
        active.unsynced.push(file.clone());
    }
}

/// Where `blocks` went in file `pack`: at `offsets`, in order, with their `crcs`.
fn locations(pack: u32, offsets: impl Iterator<Item = u64>, blocks: &[&[u8]], crcs: Vec<u32>) -> Vec<Location> {
    offsets.zip(blocks).zip(crcs).map(|((offset, block), crc)| Location { pack, offset, len: block.len() as u32, crc }).collect()
}

/// How a direct write lays out a batch from its start (an aligned offset of the file): first
/// the buffers taken as they are, each up to the aligned end of its last block; then the other
/// blocks, back to back, copied through the staging buffer and padded to the alignment.
///
/// A buffer is taken as it is when the batch's blocks in it fill at least half of what would
/// be written of it: otherwise (a file of one repeated chunk, whose copies are stored once) its
/// blocks are copied, so that a batch never writes more than twice its bytes.
struct DirectPlan<'a> {
    /// The buffers' parts written as they are, in file order.
    spans: Vec<&'a [u8]>,
    /// The blocks copied after them, in order.
    copied: Vec<&'a [u8]>,
    /// Where the copied blocks start.
    copied_at: u64,
    /// Each block's offset from the start.
    offsets: Vec<u64>,
}

impl<'a> DirectPlan<'a> {
    fn new(blocks: &[&'a [u8]], buffers: &[&'a DirectBuf]) -> Self {
        // The buffer each block lies in (wholly), and where in it.
        let within = |block: &[u8]| {
            let range = block.as_ptr_range();
            buffers.iter().enumerate().find_map(|(i, buf)| {
                let outer = buf.as_ptr_range();
                (range.start >= outer.start && range.end <= outer.end).then(|| (i, range.start as usize - outer.start as usize))
            })
        };
        let placed: Vec<Option<(usize, usize)>> = blocks.iter().map(|b| within(b)).collect();
        // Per buffer: the aligned end of its last block, and its blocks' bytes.
        let mut used = vec![(0usize, 0usize); buffers.len()];
        for (block, place) in blocks.iter().zip(&placed) {
            if let Some((i, offset)) = place {
                used[*i].0 = used[*i].0.max((offset + block.len()).next_multiple_of(DIRECT_ALIGN));
                used[*i].1 += block.len();
            }
        }
        let mut start = vec![None; buffers.len()];
        let mut spans = Vec::new();
        let mut next = 0u64;
        for (i, &(end, bytes)) in used.iter().enumerate() {
            if end > 0 && 2 * bytes >= end {
                start[i] = Some(next);
                let buf: &'a DirectBuf = buffers[i];
                spans.push(&buf[..end]);
                next += end as u64;
            }
        }
        let copied_at = next;
        let mut copied = Vec::new();
        let mut offsets = Vec::with_capacity(blocks.len());
        for (block, place) in blocks.iter().zip(&placed) {
            match place.and_then(|(i, offset)| Some(start[i]? + offset as u64)) {
                Some(offset) => offsets.push(offset),
                None => {
                    offsets.push(next);
                    next += block.len() as u64;
                    copied.push(*block);
                }
            }
        }
        DirectPlan { spans, copied, copied_at, offsets }
    }

    /// The bytes the write takes in the file, a multiple of the alignment.
    fn len(&self) -> u64 {
        let copied: u64 = self.copied.iter().map(|b| b.len() as u64).sum();
        (self.copied_at + copied).next_multiple_of(DIRECT_ALIGN as u64)
    }

    /// Writes the batch from the aligned offset `at` of a file opened with `O_DIRECT`.
    fn write(&self, file: &File, at: u64, staging: &Mutex<Option<DirectBuf>>) -> std::io::Result<()> {
        let mut offset = at;
        for span in &self.spans {
            file.write_all_at(span, offset)?;
            offset += span.len() as u64;
        }
        if !self.copied.is_empty() {
            let mut staging = lock(staging);
            write_copied(file, staging.get_or_insert_with(|| DirectBuf::new(STAGING_BYTES)), at + self.copied_at, &self.copied)?;
        }
        Ok(())
    }

    /// Where each block went, the write having started at `at` of file `pack`.
    fn locations(&self, pack: u32, at: u64, blocks: &[&[u8]], crcs: Vec<u32>) -> Vec<Location> {
        locations(pack, self.offsets.iter().map(|offset| at + offset), blocks, crcs)
    }
}

/// Opens `path` for direct writes; `Ok(None)` if its filesystem refuses `O_DIRECT`.
fn open_direct(path: &Path) -> std::io::Result<Option<File>> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        match OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path) {
            Ok(file) => Ok(Some(file)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
            Err(e) => Err(e),
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = path;
        Ok(None)
    }
}

/// Writes `blocks` back to back from the aligned offset `at` of a file opened with
/// `O_DIRECT`, through `staging` (whose length is a multiple of [`DIRECT_ALIGN`]); the last
/// write is padded with zeros to the alignment.
fn write_copied(file: &File, staging: &mut [u8], mut at: u64, blocks: &[&[u8]]) -> std::io::Result<()> {
    let mut filled = 0;
    for block in blocks {
        let mut rest: &[u8] = block;
        while !rest.is_empty() {
            let n = rest.len().min(staging.len() - filled);
            staging[filled..filled + n].copy_from_slice(&rest[..n]);
            filled += n;
            rest = &rest[n..];
            if filled == staging.len() {
                file.write_all_at(staging, at)?;
                at += filled as u64;
                filled = 0;
            }
        }
    }
    if filled > 0 {
        let padded = filled.next_multiple_of(DIRECT_ALIGN);
        staging[filled..padded].fill(0);
        file.write_all_at(&staging[..padded], at)?;
    }
    Ok(())
}

/// Whether the filesystem of `dir` takes `O_DIRECT` (tests expect other places where it does).
#[cfg(test)]
pub(crate) fn takes_direct(dir: &Path) -> std::io::Result<bool> {
    let probe = dir.join("probe");
    std::fs::write(&probe, b"")?;
    let direct = open_direct(&probe)?.is_some();
    std::fs::remove_file(&probe)?;
    Ok(direct)
}

/// Starts writing bytes `from..to` of `file` to disk, without waiting (`sync_file_range`, as
/// RocksDB's `bytes_per_sync` does). Only a hint: a failure shows at the next sync.
fn start_writeback(file: &File, from: u64, to: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let (Ok(from), Ok(len)) = (i64::try_from(from), i64::try_from(to - from)) else { return };
        // SAFETY: sync_file_range reads no memory of ours; the fd is open for the call.
        unsafe { libc::sync_file_range(file.as_raw_fd(), from, len, libc::SYNC_FILE_RANGE_WRITE) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, from, to);
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_error(dir, "cannot sync the directory", e))
}

fn io_error(path: &Path, what: &str, e: std::io::Error) -> StoreError {
    StoreError::Io { what: format!("{what} {}", path.display()), source: e }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks of every kind of append, with where they went: imports (direct, or through the
    /// cache when `refuse_direct`) between cached appends of odd lengths, one import larger
    /// than the staging buffer; every block reads back, also after a reopen.
    fn mixed_appends(dir: &Path, refuse_direct: bool) -> anyhow::Result<Vec<(Vec<u8>, Location, WriteMode)>> {
        let packs = Packs::open(dir)?;
        lock(&packs.active).direct_refused = refuse_direct;
        let mut written = Vec::new();
        let mut append = |blocks: Vec<Vec<u8>>, write: WriteMode| -> anyhow::Result<()> {
            let locations = packs.append(&blocks.iter().map(|b| &b[..]).collect::<Vec<_>>(), write)?;
            written.extend(blocks.into_iter().zip(locations).map(|(b, l)| (b, l, write)));
            Ok(())
        };
        append(vec![vec![1; 5000]], WriteMode::Cached)?;
        // 40 chunk-sized blocks (10.5 MB): more than one buffer of direct writes.
        append((0..40u8).map(|i| vec![i; 262_158]).collect(), WriteMode::ToPin)?;
        append(vec![vec![2; 4097], vec![3; 70_001]], WriteMode::Cached)?;
        append(vec![vec![4; 4097]], WriteMode::ToPin)?;
        packs.sync()?;
        drop(packs);
        let packs = Packs::open(dir)?;
        let last = packs.append(&[&[5u8; 6000]], WriteMode::Cached)?[0];
        written.push((vec![5; 6000], last, WriteMode::Cached));
        for (bytes, location, _) in &written {
            assert_eq!(packs.read(location)?.as_deref().map_err(|e| anyhow::anyhow!("{e}"))?, &bytes[..], "{location:?}");
        }
        Ok(written)
    }

    /// Imports are written at 4 KiB boundaries (direct I/O: this test's directory is on a
    /// filesystem that takes it) and every block reads back, between cached appends that leave
    /// odd lengths.
    #[test]
    fn imports_go_to_aligned_offsets_between_cached_appends() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let direct = takes_direct(dir.path())?;
        let written = mixed_appends(dir.path(), false)?;
        let imports: Vec<&Location> = written.iter().filter(|(_, _, w)| *w == WriteMode::ToPin).map(|(_, l, _)| l).collect();
        assert_eq!(imports.len(), 41);
        if direct {
            // After the 5,000-byte block: the next boundary.
            assert_eq!(imports[0].offset, 8192);
            assert_eq!(imports[40].offset % DIRECT_ALIGN as u64, 0, "{:?}", imports[40]);
        } else {
            eprintln!("the test directory refuses O_DIRECT: only the imports' page-cache path ran");
        }
        Ok(())
    }

    /// Cached appends made while an import's direct writes run (the import reserves its
    /// region, then writes it without the lock) land after the reservation, and a sync owes
    /// every written file: all blocks of both read back, after a reopen too.
    #[test]
    fn cached_appends_during_an_import_land_beside_it() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let packs = Arc::new(Packs::open_with_target(dir.path(), 24 << 20)?);
        let importer = {
            let packs = packs.clone();
            std::thread::spawn(move || -> anyhow::Result<Vec<(Vec<u8>, Location)>> {
                let mut written = Vec::new();
                for round in 0..12u8 {
                    let blocks: Vec<Vec<u8>> = (0..8u8).map(|i| vec![round.wrapping_mul(31) ^ i; 262_158 + usize::from(i)]).collect();
                    let locations = packs.append(&blocks.iter().map(|b| &b[..]).collect::<Vec<_>>(), WriteMode::ToPin)?;
                    written.extend(blocks.into_iter().zip(locations));
                }
                Ok(written)
            })
        };
        let mut written = Vec::new();
        for i in 0..300u32 {
            let block = vec![(i % 251) as u8; 4096 + (i as usize * 37) % 9000];
            let location = packs.append(&[&block], WriteMode::Cached)?[0];
            written.push((block, location));
        }
        written.extend(importer.join().map_err(|_| anyhow::anyhow!("the importing thread panicked"))??);
        packs.sync()?;
        assert!(lock(&packs.active).unsynced.is_empty());
        drop(packs);
        let packs = Packs::open_with_target(dir.path(), 24 << 20)?;
        let mut regions: Vec<(u32, u64, u64)> = written.iter().map(|(_, l)| (l.pack, l.offset, l.offset + u64::from(l.len))).collect();
        regions.sort_unstable();
        for pair in regions.windows(2) {
            assert!(pair[0].0 != pair[1].0 || pair[0].2 <= pair[1].1, "overlapping blocks: {pair:?}");
        }
        for (bytes, location) in &written {
            assert_eq!(packs.read(location)?.as_deref().map_err(|e| anyhow::anyhow!("{e}"))?, &bytes[..], "{location:?}");
        }
        Ok(())
    }

    /// Where direct I/O is refused, imports go through the page cache, right after the bytes
    /// before them.
    #[test]
    fn imports_go_through_the_cache_where_direct_writes_are_refused() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let written = mixed_appends(dir.path(), true)?;
        assert_eq!(written[1].1.offset, 5000, "the first import follows the first block at once");
        Ok(())
    }

    /// Blocks that lie in a well-filled buffer are written from it as they are (their places
    /// in the file keep their places in the buffer); the others, and those of a mostly empty
    /// buffer, are copied after it. All read back after a reopen, direct I/O or not.
    #[test]
    fn blocks_in_a_buffer_are_written_as_they_are() -> anyhow::Result<()> {
        const SLOT: usize = 262_176;
        let mut full = DirectBuf::new(3 * SLOT);
        for (i, byte) in full.iter_mut().enumerate() {
            *byte = (i % 253) as u8;
        }
        // One small block far into its buffer: writing the buffer up to it would write 150
        // times its bytes.
        let mut sparse = DirectBuf::new(4 * SLOT);
        let far = 3 * SLOT..3 * SLOT + 5000;
        sparse[far.clone()].fill(9);
        let outside = vec![7u8; 6000];
        let in_full = |i: usize| 16 + i * SLOT..16 + i * SLOT + 262_144;
        let blocks: Vec<&[u8]> = vec![&full[in_full(0)], &outside, &full[in_full(1)], &sparse[far], &full[in_full(2)]];

        let plan = DirectPlan::new(&blocks, &[&sparse, &full]);
        let span = (16 + 2 * SLOT + 262_144).next_multiple_of(DIRECT_ALIGN) as u64;
        assert_eq!(plan.spans.len(), 1, "the sparse buffer is copied");
        assert_eq!(plan.offsets, vec![16, span, 16 + SLOT as u64, span + 6000, 16 + 2 * SLOT as u64]);
        assert_eq!(plan.len(), (span + 11_000).next_multiple_of(DIRECT_ALIGN as u64));

        for refuse_direct in [false, true] {
            let dir = tempfile::tempdir()?;
            let direct = !refuse_direct && takes_direct(dir.path())?;
            let packs = Packs::open(dir.path())?;
            lock(&packs.active).direct_refused = refuse_direct;
            let first = packs.append(&[&[1u8; 5000]], WriteMode::Cached)?[0];
            let locations = packs.append_from(&blocks, WriteMode::ToPin, &[&sparse, &full])?;
            packs.sync()?;
            drop(packs);
            let packs = Packs::open(dir.path())?;
            for (block, location) in blocks.iter().zip(&locations).chain([(&&[1u8; 5000][..], &first)]) {
                assert_eq!(packs.read(location)?.as_deref().map_err(|e| anyhow::anyhow!("{e}"))?, *block, "{location:?}");
            }
            let offsets: Vec<u64> = locations.iter().map(|l| l.offset).collect();
            if !direct {
                assert_eq!(offsets[1], 5000 + 262_144, "through the cache: back to back");
            } else {
                assert_eq!(offsets, plan.offsets.iter().map(|o| 8192 + o).collect::<Vec<_>>(), "after the first block's page");
            }
        }
        Ok(())
    }

    /// Reads from memory only answer what the page cache holds: a block of a file no read has
    /// opened yet, of pages the kernel dropped, or behind busy readers, is left to
    /// [`Packs::read`], as is a damaged one.
    #[test]
    fn reads_from_memory_never_wait_for_the_disk() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let packs = Packs::open(dir.path())?;
        let block = crate::testing::pseudo_random(300_000, 5);
        let location = packs.append(&[&block], WriteMode::Cached)?[0];
        packs.sync()?;
        assert_eq!(packs.read_in_memory(&location), None, "no read has opened the file");
        assert_eq!(packs.read(&location)?.as_deref(), Ok(&block[..]));
        assert_eq!(packs.read_in_memory(&location).as_deref(), Some(&block[..]), "in the page cache now");
        {
            let _stall = packs.stall_reads();
            assert_eq!(packs.read_in_memory(&location), None, "readers busy");
        }
        // The kernel drops the file's clean pages: reading them would wait for the disk.
        let file = File::open(packs.path(location.pack))?;
        // SAFETY: fadvise reads no memory of ours; the fd is open for the call.
        let dropped = unsafe { libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(&file), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(dropped, 0);
        assert_eq!(packs.read_in_memory(&location), None, "not in the page cache");
        assert_eq!(packs.read(&location)?.as_deref(), Ok(&block[..]));
        assert!(packs.read_in_memory(&location).is_some());
        let damaged = Location { crc: location.crc ^ 1, ..location };
        assert_eq!(packs.read_in_memory(&damaged), None);
        assert!(packs.read(&damaged)?.is_err());
        Ok(())
    }

    #[test]
    fn locations_round_trip_and_other_lengths_are_refused() {
        let location = Location { pack: 7, offset: (5 << 32) + 3, len: 262_144, crc: 0xdead_beef };
        assert_eq!(Location::decode(&location.encode()).ok(), Some(location));
        for len in [0, 19, 21] {
            assert!(matches!(Location::decode(&vec![0; len]), Err(StoreError::Corrupt { .. })), "{len} bytes");
        }
    }

    #[test]
    fn appended_blocks_read_back_and_a_flipped_bit_is_an_error() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let packs = Packs::open(&dir.path().join("packs"))?;
        let a = vec![1u8; 5000];
        let b = vec![2u8; 7000];
        let locations = packs.append(&[&a, &b], WriteMode::Cached)?;
        assert_eq!(locations[1].offset, 5000);
        assert_eq!(packs.read(&locations[0])?, Ok(Bytes::from(a.clone())));
        assert_eq!(packs.read(&locations[1])?, Ok(Bytes::from(b)));
        packs.sync()?;

        let path = packs.path(locations[1].pack);
        let mut bytes = std::fs::read(&path)?;
        bytes[6000] ^= 1;
        std::fs::write(&path, bytes)?;
        let damage = packs.read(&locations[1])?.unwrap_err();
        assert!(damage.contains("checksum"), "{damage}");
        assert_eq!(packs.read(&locations[0])?, Ok(Bytes::from(a)), "the other block is untouched");
        Ok(())
    }

    #[test]
    fn a_location_past_the_end_of_its_file_is_an_error() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let packs = Packs::open(dir.path())?;
        let location = packs.append(&[&[9u8; 4096]], WriteMode::Cached)?[0];
        let beyond = Location { offset: location.offset + 1, ..location };
        let damage = packs.read(&beyond)?.unwrap_err();
        assert!(damage.contains("ends before"), "{damage}");
        let missing = Location { pack: location.pack + 1, ..location };
        let damage = packs.read(&missing)?.unwrap_err();
        assert!(damage.contains("is gone"), "{damage}");
        Ok(())
    }

    #[test]
    fn a_reopened_store_appends_to_its_last_file_until_it_is_full() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let target = 16_384;
        let first = Packs::open_with_target(dir.path(), target)?.append(&[&[1u8; 4096]], WriteMode::Cached)?[0];
        let packs = Packs::open_with_target(dir.path(), target)?;
        let second = packs.append(&[&[2u8; 4096]], WriteMode::Cached)?[0];
        assert_eq!((second.pack, second.offset), (first.pack, 4096));
        // The batch that crosses the target still goes to the active file; the next starts one.
        let filled = packs.append(&[&[3u8; 12_000]], WriteMode::Cached)?[0];
        assert_eq!(filled.pack, first.pack);
        let next = packs.append(&[&[4u8; 4096]], WriteMode::Cached)?[0];
        assert_eq!((next.pack, next.offset), (first.pack + 1, 0));
        // Bytes a crash left at the tail (an append whose location was never stored) are skipped.
        std::fs::OpenOptions::new().append(true).open(packs.path(next.pack))?.write_all(&[0xee; 100])?;
        let packs = Packs::open_with_target(dir.path(), target)?;
        let after_crash = packs.append(&[&[5u8; 4096]], WriteMode::Cached)?[0];
        assert_eq!((after_crash.pack, after_crash.offset), (next.pack, 4196));
        assert_eq!(packs.read(&after_crash)?, Ok(Bytes::from(vec![5u8; 4096])));
        assert_eq!(packs.read(&first)?, Ok(Bytes::from(vec![1u8; 4096])), "an older file stays readable");
        Ok(())
    }

    #[test]
    fn only_complete_unused_files_are_removed() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        // Every block fills a file.
        let packs = Packs::open_with_target(dir.path(), 4096)?;
        let old = packs.append(&[&[1u8; 4096]], WriteMode::Cached)?[0];
        let kept = packs.append(&[&[2u8; 4096]], WriteMode::Cached)?[0];
        let below = packs.complete_below();
        assert_eq!(below, kept.pack + 1, "a full active file is complete");
        let active = packs.append(&[&[3u8; 2048]], WriteMode::Cached)?[0];
        assert_eq!(packs.complete_below(), active.pack, "one with room is not");
        // Neither the old file nor the active one is in use: only the old one goes.
        assert_eq!(packs.remove_unused(packs.complete_below(), &HashSet::from([kept.pack]))?, 1);
        assert!(packs.read(&old)?.is_err());
        assert_eq!(packs.read(&kept)?, Ok(Bytes::from(vec![2u8; 4096])));
        assert_eq!(packs.read(&active)?, Ok(Bytes::from(vec![3u8; 2048])));
        assert_eq!(packs.size(), 4096 + 2048);
        Ok(())
    }

    /// Where a generated block lies: in buffer `buffer % buffers` at `start`, or (for
    /// `buffer == None`) in memory of its own.
    #[derive(Debug, Clone)]
    struct PlacedBlock {
        buffer: Option<usize>,
        start: usize,
        len: usize,
    }

    /// A test case's failure, from any error.
    fn fail(e: impl std::fmt::Display) -> proptest::test_runner::TestCaseError {
        proptest::test_runner::TestCaseError::fail(e.to_string())
    }

    fn placed_block() -> impl proptest::strategy::Strategy<Value = PlacedBlock> {
        use proptest::prelude::*;
        (proptest::option::of(0usize..3), 0usize..40_000, 1usize..30_000).prop_map(|(buffer, start, len)| PlacedBlock { buffer, start, len })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 48, failure_persistence: None, ..Default::default() })]

        /// Whatever the blocks' places (in a buffer, overlapping each other, reaching past a
        /// buffer's end, in memory of their own) and the order they come in, every block reads
        /// back as it was, and a direct write takes no more than its plan says.
        #[test]
        fn blocks_from_anywhere_read_back_after_a_direct_write(
            placed in proptest::collection::vec(placed_block(), 1..12),
            refuse_direct in proptest::bool::ANY,
        ) {
            let mut buffers: Vec<DirectBuf> = (0..3).map(|i| DirectBuf::new(32_768 * (i + 1))).collect();
            for (i, buf) in buffers.iter_mut().enumerate() {
                for (j, byte) in buf.iter_mut().enumerate() {
                    *byte = (j % 251) as u8 ^ (i as u8 * 85);
                }
            }
            let own: Vec<Vec<u8>> = placed.iter().map(|p| vec![p.len as u8 | 1; p.len]).collect();
            let blocks: Vec<&[u8]> = placed
                .iter()
                .zip(&own)
                .map(|(p, own)| match p.buffer {
                    // Clamped into the buffer: a block never reaches outside its memory.
                    Some(b) => {
                        let buf = &buffers[b];
                        let start = p.start % buf.len();
                        &buf[start..(start + p.len).min(buf.len())]
                    }
                    None => &own[..],
                })
                .collect();
            let dir = tempfile::tempdir().map_err(fail)?;
            let packs = Packs::open(dir.path()).map_err(fail)?;
            lock(&packs.active).direct_refused = refuse_direct;
            packs.append(&[&[9u8; 5000]], WriteMode::Cached).map_err(fail)?;
            let refs: Vec<&DirectBuf> = buffers.iter().collect();
            let locations = packs.append_from(&blocks, WriteMode::ToPin, &refs).map_err(fail)?;
            let plan = DirectPlan::new(&blocks, &refs);
            let written: u64 = blocks.iter().map(|b| b.len() as u64).sum();
            proptest::prop_assert!(plan.len() <= 2 * written + 2 * (refs.len() as u64 + 1) * DIRECT_ALIGN as u64, "plan {} for {written} bytes", plan.len());
            packs.sync().map_err(fail)?;
            for (block, location) in blocks.iter().zip(&locations) {
                let read = packs.read(location).map_err(fail)?;
                proptest::prop_assert_eq!(read.as_deref(), Ok(*block), "{:?}", location);
            }
        }

        #[test]
        fn any_bytes_decode_to_a_location_or_an_error(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..40)) {
            match Location::decode(&bytes) {
                Ok(location) => proptest::prop_assert_eq!(&location.encode()[..], &bytes[..]),
                Err(_) => proptest::prop_assert_ne!(bytes.len(), Location::LEN),
            }
        }
    }

    #[test]
    fn names_other_than_pack_files_are_ignored() {
        assert_eq!(pack_number("00000012.pack"), Some(12));
        for name in ["12.pack", "0000001a.pack", "00000012.pack.tmp", "LOCK", "+0000012.pack"] {
            assert_eq!(pack_number(name), None, "{name}");
        }
    }
}
