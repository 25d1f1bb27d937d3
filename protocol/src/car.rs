//! CAR v1 archives: a DAG's blocks in one file, for moving content without the network.
//!
//! Spec: <https://ipld.io/specs/transport/car/carv1/>. A CAR is a header then sections:
//!
//! ```text
//! varint(len) dag-cbor{ "roots": [CID, ...], "version": 1 }
//! varint(len) CID-bytes block-bytes      (repeated)
//! ```
//!
//! Export walks a DAG depth-first from its root (pre-order, each block once, like
//! `ipfs dag export`). Import checks every block against its CID before storing it and
//! returns the roots; a bad hash, a malformed section or a truncated file is an error. Blocks
//! verified before the error may stay in the store (they are valid content, and unpinned, so
//! GC removes them); the roots are only returned, and so only pinned by the caller, when the
//! whole file was read. The header is hand-written / hand-read dag-cbor (a map of `roots` and
//! `version`, nothing else); CARv2 is refused with a clear error.

use std::collections::HashSet;
use std::io::{Read, Write};

use bytes::Bytes;
use cid::Cid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::store::{Block, BlockStore, Store, StoreError};
use crate::unixfs::cbor::{self, Decoder};
use crate::unixfs::dag_pb::put_varint;
use crate::unixfs::{links, BlockSource, UnixfsError};

/// Largest header accepted: a header is a few CIDs.
const MAX_HEADER_LEN: u64 = 1 << 20;
/// Largest section accepted (CID + block); blocks are at most 2 MiB on the IPFS network.
const MAX_SECTION_LEN: u64 = 8 << 20;
/// Verified blocks stored per batch during import.
const IMPORT_BATCH_BYTES: usize = 16 << 20;

/// Errors of reading or writing CAR files.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CarError {
    /// Reading or writing the stream failed.
    #[error("CAR I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The file ended in the middle of the header or of a section.
    #[error("CAR file is truncated: {0}")]
    Truncated(&'static str),
    /// The header is not a CARv1 header.
    #[error("invalid CAR header: {0}")]
    InvalidHeader(String),
    /// The header announces a version other than 1.
    #[error("unsupported CAR version {0}: only CARv1 is supported")]
    UnsupportedVersion(u64),
    /// A section could not be parsed.
    #[error("invalid CAR section at byte {offset}: {reason}")]
    InvalidSection {
        /// Where the section starts in the CAR.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// A block's bytes do not hash to its CID.
    #[error("hash mismatch for {0}: the CAR block's bytes do not hash to its CID")]
    HashMismatch(Cid),
    /// A block uses a hash function the node cannot check.
    #[error("cannot verify {cid}: {reason}")]
    Unverifiable {
        /// The block.
        cid: Cid,
        /// Why its hash cannot be checked.
        reason: String,
    },
    /// Exporting needed a block that could not be read or walked.
    #[error(transparent)]
    Dag(Box<UnixfsError>),
    /// The store failed.
    #[error("store error: {0}")]
    Store(#[from] StoreError),
}

impl From<UnixfsError> for CarError {
    fn from(e: UnixfsError) -> Self {
        CarError::Dag(Box::new(e))
    }
}

/// What an import or export moved.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CarSummary {
    /// The header's roots.
    pub roots: Vec<Cid>,
    /// Blocks read or written.
    pub blocks: u64,
    /// Block bytes read or written (without framing).
    pub bytes: u64,
}

/// The header: dag-cbor `{"roots": [..], "version": 1}`, keys in dag-cbor order (length
/// first), each root as tag 42 around 0x00 + CID bytes.
pub fn encode_header(roots: &[Cid]) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + roots.len() * 40);
    out.push(0xa2); // map of 2
    out.push(0x65); // text(5)
    out.extend_from_slice(b"roots");
    put_cbor_head(&mut out, cbor::MAJOR_ARRAY, roots.len() as u64);
    for root in roots {
        out.extend_from_slice(&[0xd8, 0x2a]); // tag(42)
        let bytes = root.to_bytes();
        put_cbor_head(&mut out, cbor::MAJOR_BYTES, bytes.len() as u64 + 1);
        out.push(0x00);
        out.extend_from_slice(&bytes);
    }
    out.push(0x67); // text(7)
    out.extend_from_slice(b"version");
    out.push(0x01);
    out
}

fn put_cbor_head(out: &mut Vec<u8>, major: u8, arg: u64) {
    let m = major << 5;
    match arg {
        0..=23 => out.push(m | arg as u8),
        24..=0xff => out.extend_from_slice(&[m | 24, arg as u8]),
        0x100..=0xffff => {
            out.push(m | 25);
            out.extend_from_slice(&(arg as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(m | 26);
            out.extend_from_slice(&(arg as u32).to_be_bytes());
        }
        _ => {
            out.push(m | 27);
            out.extend_from_slice(&arg.to_be_bytes());
        }
    }
}

/// Reads a header: a map with exactly `roots` (an array of CIDs, at least one) and
/// `version` (1).
pub fn decode_header(bytes: &[u8]) -> Result<Vec<Cid>, CarError> {
    let invalid = CarError::InvalidHeader;
    let mut decoder = Decoder::new(bytes);
    let entries = decoder.expect(cbor::MAJOR_MAP, "a map").map_err(invalid)?;
    let mut roots = None;
    let mut version = None;
    for _ in 0..entries {
        match decoder.text().map_err(invalid)? {
            "roots" if roots.is_none() => {
                let count = decoder.expect(cbor::MAJOR_ARRAY, "an array of roots").map_err(invalid)?;
                let mut list = Vec::new();
                for _ in 0..count {
                    list.push(decoder.cid().map_err(invalid)?);
                }
                roots = Some(list);
            }
            "version" if version.is_none() => {
                version = Some(decoder.expect(cbor::MAJOR_UINT, "an unsigned version").map_err(invalid)?);
            }
            other => return Err(invalid(format!("unexpected or repeated key {other:?}"))),
        }
    }
    if !decoder.remaining().is_empty() {
        return Err(invalid("trailing bytes after the header map".into()));
    }
    match version {
        Some(1) => {}
        Some(v) => return Err(CarError::UnsupportedVersion(v)),
        None => return Err(invalid("no version".into())),
    }
    let roots = roots.ok_or_else(|| invalid("no roots".into()))?;
    if roots.is_empty() {
        return Err(invalid("no roots".into()));
    }
    Ok(roots)
}

/// Splits a section into its CID and block, and checks the block's hash.
fn parse_section(section: Vec<u8>, offset: u64) -> Result<Block, CarError> {
    let mut rest = &section[..];
    let cid = Cid::read_bytes(&mut rest)
        .map_err(|e| CarError::InvalidSection { offset, reason: format!("bad CID: {e}") })?;
    let start = section.len() - rest.len();
    let data = Bytes::from(section).slice(start..);
    match Block::verified(cid, data) {
        Ok(block) => Ok(block),
        Err(StoreError::HashMismatch { cid }) => Err(CarError::HashMismatch(cid)),
        Err(e) => Err(CarError::Unverifiable { cid, reason: e.to_string() }),
    }
}

/// Reads one byte, `None` at end of stream.
fn read_byte<R: Read>(reader: &mut R) -> std::io::Result<Option<u8>> {
    let mut byte = [0u8];
    loop {
        match reader.read(&mut byte) {
            Ok(0) => return Ok(None),
            Ok(_) => return Ok(Some(byte[0])),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// First buffer for a header or section; it doubles as bytes arrive, up to the announced length.
const FIRST_READ: usize = 64 << 10;

/// Adds byte `i` of an unsigned varint to `value`; `Some(value)` once it is complete. The
/// encoding must be minimal and fit in 63 bits (the multiformats rule, as go-varint): a
/// length may not wrap around to a small value, nor be written in two ways.
fn varint_step(value: &mut u64, i: usize, byte: u8, what: &'static str) -> Result<Option<u64>, String> {
    if i == 8 && byte & 0x80 != 0 {
        return Err(format!("{what} is longer than 9 bytes"));
    }
    *value |= u64::from(byte & 0x7f) << (7 * i);
    if byte & 0x80 != 0 {
        return Ok(None);
    }
    if byte == 0 && i > 0 {
        return Err(format!("{what} is not minimally encoded"));
    }
    Ok(Some(*value))
}

/// The error for a bad varint: the header's, or the section's at `offset`.
fn bad_varint(reason: String, offset: Option<u64>) -> CarError {
    match offset {
        None => CarError::InvalidHeader(reason),
        Some(offset) => CarError::InvalidSection { offset, reason },
    }
}

/// Reads a varint length; `Ok(None)` at a clean end of stream (before its first byte).
/// `offset` is the section's, `None` for the header.
fn read_len<R: Read>(reader: &mut R, what: &'static str, offset: Option<u64>) -> Result<Option<u64>, CarError> {
    let mut value = 0u64;
    // `varint_step` ends every varint by its ninth byte.
    for i in 0.. {
        let Some(byte) = read_byte(reader)? else {
            return if i == 0 { Ok(None) } else { Err(CarError::Truncated(what)) };
        };
        if let Some(len) = varint_step(&mut value, i, byte, what).map_err(|e| bad_varint(e, offset))? {
            return Ok(Some(len));
        }
    }
    Ok(None)
}

/// Reads the `len` bytes a length prefix announced. The buffer grows as they arrive (zeroed
/// once, reserved exactly), so a short file announcing a big section costs no more memory
/// than the file itself.
fn read_exact_or_truncated<R: Read>(reader: &mut R, len: u64, what: &'static str) -> Result<Vec<u8>, CarError> {
    let len = usize::try_from(len).map_err(|_| CarError::Truncated(what))?;
    let mut buf = Vec::new();
    let mut filled = 0;
    while filled < len {
        grow(&mut buf, filled, len);
        match reader.read(&mut buf[filled..]) {
            Ok(0) => return Err(CarError::Truncated(what)),
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(CarError::Io(e)),
        }
    }
    Ok(buf)
}

/// Doubles `buf` (up to `len`) once its `filled` bytes reach its end.
fn grow(buf: &mut Vec<u8>, filled: usize, len: usize) {
    if filled == buf.len() {
        let more = (len - filled).min(filled.max(FIRST_READ));
        buf.reserve_exact(more);
        buf.resize(filled + more, 0);
    }
}

/// Reads the blocks of a CAR stream one at a time, verifying each. Give it a buffered reader.
#[derive(Debug)]
pub struct CarReader<R> {
    reader: R,
    roots: Vec<Cid>,
    offset: u64,
}

impl<R: Read> CarReader<R> {
    /// Reads and checks the header.
    pub fn new(mut reader: R) -> Result<Self, CarError> {
        let len = read_len(&mut reader, "header length", None)?.ok_or(CarError::Truncated("empty file"))?;
        if len == 0 || len > MAX_HEADER_LEN {
            return Err(CarError::InvalidHeader(format!("header length {len} out of range")));
        }
        let header = read_exact_or_truncated(&mut reader, len, "header")?;
        let roots = decode_header(&header)?;
        let offset = dag_len(len);
        Ok(CarReader { reader, roots, offset })
    }

    /// The header's roots.
    pub fn roots(&self) -> &[Cid] {
        &self.roots
    }

    /// The next verified block, `None` at the end of the file.
    pub fn next_block(&mut self) -> Result<Option<Block>, CarError> {
        let offset = self.offset;
        let Some(len) = read_len(&mut self.reader, "section length", Some(offset))? else {
            return Ok(None);
        };
        check_section_len(len, offset)?;
        let section = read_exact_or_truncated(&mut self.reader, len, "section")?;
        self.offset += dag_len(len);
        parse_section(section, offset).map(Some)
    }
}

/// Bytes a length-prefixed item takes.
fn dag_len(len: u64) -> u64 {
    crate::unixfs::dag_pb::varint_len(len) as u64 + len
}

fn check_section_len(len: u64, offset: u64) -> Result<(), CarError> {
    if len == 0 || len > MAX_SECTION_LEN {
        return Err(CarError::InvalidSection { offset, reason: format!("section length {len} out of range") });
    }
    Ok(())
}

/// Imports a CAR stream into `store`: every block verified, stored in large batches.
/// Returns the roots (unpinned; the caller pins them) once the whole file was read. Blocking.
pub fn import_car<R: Read>(store: &Store, reader: R) -> Result<CarSummary, CarError> {
    let mut car = CarReader::new(std::io::BufReader::with_capacity(1 << 20, reader))?;
    let mut summary = CarSummary { roots: car.roots.clone(), ..Default::default() };
    let mut batch = Vec::new();
    let mut batch_bytes = 0;
    while let Some(block) = car.next_block()? {
        summary.blocks += 1;
        summary.bytes += block.data.len() as u64;
        batch_bytes += block.data.len();
        batch.push(block);
        if batch_bytes >= IMPORT_BATCH_BYTES {
            store.put_blocks_to_pin(&batch, &[])?;
            batch.clear();
            batch_bytes = 0;
        }
    }
    store.put_blocks_to_pin(&batch, &[])?;
    Ok(summary)
}

/// [`import_car`] for an async stream (an HTTP body, a socket). Stores batches on tokio's
/// blocking pool.
pub async fn import_car_async<R: AsyncRead + Unpin>(store: &Store, reader: R) -> Result<CarSummary, CarError> {
    let mut reader = tokio::io::BufReader::with_capacity(1 << 20, reader);
    let len = read_len_async(&mut reader, "header length", None).await?.ok_or(CarError::Truncated("empty file"))?;
    if len == 0 || len > MAX_HEADER_LEN {
        return Err(CarError::InvalidHeader(format!("header length {len} out of range")));
    }
    let header = read_exact_async(&mut reader, len, "header").await?;
    let roots = decode_header(&header)?;
    let mut summary = CarSummary { roots, ..Default::default() };
    let mut offset = dag_len(len);
    let mut batch = Vec::new();
    let mut batch_bytes = 0;
    while let Some(len) = read_len_async(&mut reader, "section length", Some(offset)).await? {
        check_section_len(len, offset)?;
        let section = read_exact_async(&mut reader, len, "section").await?;
        let block = parse_section(section, offset)?;
        offset += dag_len(len);
        summary.blocks += 1;
        summary.bytes += block.data.len() as u64;
        batch_bytes += block.data.len();
        batch.push(block);
        if batch_bytes >= IMPORT_BATCH_BYTES {
            store_batch(store, std::mem::take(&mut batch)).await?;
            batch_bytes = 0;
        }
    }
    store_batch(store, batch).await?;
    Ok(summary)
}

async fn store_batch(store: &Store, batch: Vec<Block>) -> Result<(), CarError> {
    if batch.is_empty() {
        return Ok(());
    }
    let store = store.clone();
    tokio::task::spawn_blocking(move || store.put_blocks_to_pin(&batch, &[]))
        .await
        .map_err(|e| CarError::Io(std::io::Error::other(e)))??;
    Ok(())
}

async fn read_len_async<R: AsyncRead + Unpin>(
    reader: &mut R,
    what: &'static str,
    offset: Option<u64>,
) -> Result<Option<u64>, CarError> {
    let mut value = 0u64;
    // `varint_step` ends every varint by its ninth byte.
    for i in 0.. {
        let mut byte = [0u8];
        if reader.read(&mut byte).await? == 0 {
            return if i == 0 { Ok(None) } else { Err(CarError::Truncated(what)) };
        }
        if let Some(len) = varint_step(&mut value, i, byte[0], what).map_err(|e| bad_varint(e, offset))? {
            return Ok(Some(len));
        }
    }
    Ok(None)
}

async fn read_exact_async<R: AsyncRead + Unpin>(reader: &mut R, len: u64, what: &'static str) -> Result<Vec<u8>, CarError> {
    let len = usize::try_from(len).map_err(|_| CarError::Truncated(what))?;
    let mut buf = Vec::new();
    let mut filled = 0;
    while filled < len {
        grow(&mut buf, filled, len);
        match reader.read(&mut buf[filled..]).await {
            Ok(0) => return Err(CarError::Truncated(what)),
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(CarError::Io(e)),
        }
    }
    Ok(buf)
}

/// Writes one section: varint(len) CID block.
fn section_prefix(cid: &Cid, data_len: usize) -> Vec<u8> {
    let cid_bytes = cid.to_bytes();
    let mut prefix = Vec::with_capacity(cid_bytes.len() + 10);
    put_varint(&mut prefix, (cid_bytes.len() + data_len) as u64);
    prefix.extend_from_slice(&cid_bytes);
    prefix
}

fn header_frame(roots: &[Cid]) -> Vec<u8> {
    let header = encode_header(roots);
    let mut frame = Vec::with_capacity(header.len() + 4);
    put_varint(&mut frame, header.len() as u64);
    frame.extend_from_slice(&header);
    frame
}

/// Exports the DAG under `root` from a local block store to `writer` (blocking). Every block
/// must be present; links are followed through dag-pb and dag-cbor.
pub fn export_car<B: BlockStore + ?Sized, W: Write>(blocks: &B, root: Cid, mut writer: W) -> Result<CarSummary, CarError> {
    writer.write_all(&header_frame(&[root]))?;
    let mut summary = CarSummary { roots: vec![root], ..Default::default() };
    let mut seen = HashSet::new();
    let mut stack = vec![root];
    while let Some(cid) = stack.pop() {
        if !seen.insert(cid) {
            continue;
        }
        let data = blocks.get_block(&cid)?.ok_or(UnixfsError::BlockNotFound(cid))?;
        writer.write_all(&section_prefix(&cid, data.len()))?;
        writer.write_all(&data)?;
        summary.blocks += 1;
        summary.bytes += data.len() as u64;
        stack.extend(links(&cid, &data)?.into_iter().rev());
    }
    writer.flush()?;
    Ok(summary)
}

/// Exports the DAG under `root` from any [`BlockSource`] (verifying each block, unless the
/// source holds only checked ones) to an async writer.
pub async fn export_car_async<S: BlockSource + ?Sized, W: AsyncWrite + Unpin>(
    source: &S,
    root: Cid,
    mut writer: W,
) -> Result<CarSummary, CarError> {
    writer.write_all(&header_frame(&[root])).await?;
    let mut summary = CarSummary { roots: vec![root], ..Default::default() };
    let mut seen = HashSet::new();
    let mut stack = vec![root];
    while let Some(cid) = stack.pop() {
        if !seen.insert(cid) {
            continue;
        }
        let data = source.get(cid).await?;
        if !source.checked() {
            crate::unixfs::verify_block(&cid, &data)?;
        }
        writer.write_all(&section_prefix(&cid, data.len())).await?;
        writer.write_all(&data).await?;
        summary.blocks += 1;
        summary.bytes += data.len() as u64;
        stack.extend(links(&cid, &data)?.into_iter().rev());
    }
    writer.flush().await?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unixfs::importer::{add_bytes, tests::pseudo_random, ImportOptions};

    fn store() -> anyhow::Result<(tempfile::TempDir, Store)> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        Ok((dir, store))
    }

    fn exported(opts: &ImportOptions) -> anyhow::Result<(Cid, Vec<Block>, Vec<u8>)> {
        let (_dir, src) = store()?;
        let (root, blocks) = add_bytes(&pseudo_random(1_000_000, 7), opts)?;
        src.put_blocks(&blocks)?;
        let mut car = Vec::new();
        let summary = export_car(&src, root.cid, &mut car)?;
        assert_eq!(summary.blocks, blocks.len() as u64);
        Ok((root.cid, blocks, car))
    }

    #[test]
    fn car_round_trip_keeps_every_block_and_the_root() -> anyhow::Result<()> {
        for opts in [ImportOptions::default(), ImportOptions::cid_v1()] {
            let (root, blocks, car) = exported(&opts)?;
            let (_dir, dst) = store()?;
            let summary = import_car(&dst, &car[..])?;
            assert_eq!(summary.roots, vec![root]);
            assert_eq!(summary.blocks, blocks.len() as u64);
            for block in &blocks {
                assert_eq!(dst.get_block(&block.cid)?.as_ref(), Some(&block.data));
            }
            // Export is deterministic: the imported DAG exports to the same bytes.
            let mut again = Vec::new();
            export_car(&dst, root, &mut again)?;
            assert_eq!(again, car);
        }
        Ok(())
    }

    #[tokio::test]
    async fn async_import_and_export_match_the_blocking_ones() -> anyhow::Result<()> {
        let (root, _, car) = exported(&ImportOptions::default())?;
        let (_dir, dst) = store()?;
        let summary = import_car_async(&dst, &car[..]).await?;
        assert_eq!(summary.roots, vec![root]);
        let mut out = Vec::new();
        export_car_async(&dst, root, &mut out).await?;
        assert_eq!(out, car);
        Ok(())
    }

    #[test]
    fn truncated_car_is_rejected() -> anyhow::Result<()> {
        let (_, _, car) = exported(&ImportOptions::default())?;
        for cut in [1, 10, car.len() / 2, car.len() - 1] {
            let (_dir, dst) = store()?;
            let err = import_car(&dst, &car[..cut]).unwrap_err();
            assert!(matches!(err, CarError::Truncated(_)), "cut at {cut}: {err}");
        }
        Ok(())
    }

    #[test]
    fn car_with_a_corrupted_block_is_rejected() -> anyhow::Result<()> {
        let (_, blocks, mut car) = exported(&ImportOptions::default())?;
        // Flip a byte in the middle of the last section's data.
        let last = car.len() - blocks.iter().map(|b| b.data.len()).min().unwrap_or(1) / 2;
        car[last] ^= 0xff;
        let (_dir, dst) = store()?;
        let err = import_car(&dst, &car[..]).unwrap_err();
        assert!(matches!(err, CarError::HashMismatch(_)), "{err}");
        Ok(())
    }

    /// A CAR of one raw block whose section length is written with `length(len)`.
    fn car_with_section_length(length: impl Fn(u64) -> Vec<u8>) -> (Block, Vec<u8>) {
        let block = Block::new_v1(crate::unixfs::dag_pb::RAW, Bytes::from_static(b"hello"));
        let mut car = header_frame(&[block.cid]);
        let cid = block.cid.to_bytes();
        car.extend(length((cid.len() + block.data.len()) as u64));
        car.extend_from_slice(&cid);
        car.extend_from_slice(&block.data);
        (block, car)
    }

    fn read_all(car: &[u8]) -> Result<Vec<Block>, CarError> {
        let mut reader = CarReader::new(car)?;
        let mut blocks = Vec::new();
        while let Some(block) = reader.next_block()? {
            blocks.push(block);
        }
        Ok(blocks)
    }

    #[test]
    fn section_length_that_overflows_u64_is_refused() {
        // Ten bytes whose high bits fall off u64: this used to wrap around to the true length
        // and be accepted (and the header length the same way).
        let (block, car) = car_with_section_length(|len| {
            let mut v = vec![0x80 | (len as u8 & 0x7f), 0x80 | (len >> 7) as u8];
            v.extend([0x80; 7]);
            v.push(0x02);
            v
        });
        let err = read_all(&car).unwrap_err();
        assert!(matches!(&err, CarError::InvalidSection { reason, .. } if reason.contains("longer than 9 bytes")), "{err}");
        let (_, good) = car_with_section_length(|len| {
            let mut v = Vec::new();
            put_varint(&mut v, len);
            v
        });
        assert_eq!(read_all(&good).unwrap(), vec![block]);
    }

    #[test]
    fn non_minimal_section_length_is_refused() {
        // `len` then a zero continuation byte: the same number written in two ways.
        let (_, car) = car_with_section_length(|len| vec![0x80 | len as u8, 0x00]);
        let err = read_all(&car).unwrap_err();
        assert!(matches!(&err, CarError::InvalidSection { reason, .. } if reason.contains("minimally")), "{err}");
        let mut header = vec![0x80 | 0x05, 0x00];
        header.extend_from_slice(&[0; 5]);
        assert!(matches!(read_all(&header), Err(CarError::InvalidHeader(_))));
    }

    #[tokio::test]
    async fn async_reader_refuses_the_same_lengths() {
        let (_, car) = car_with_section_length(|len| vec![0x80 | len as u8, 0x00]);
        let (_dir, dst) = store().unwrap();
        let err = import_car_async(&dst, &car[..]).await.unwrap_err();
        assert!(matches!(&err, CarError::InvalidSection { reason, .. } if reason.contains("minimally")), "{err}");
    }

    #[test]
    fn headers_other_than_carv1_are_refused() {
        let root = Cid::try_from("QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn").unwrap();
        assert_eq!(decode_header(&encode_header(&[root])).unwrap(), vec![root]);
        let mut v2 = encode_header(&[root]);
        *v2.last_mut().unwrap() = 0x02;
        assert!(matches!(decode_header(&v2), Err(CarError::UnsupportedVersion(2))));
        // CARv2 pragma: {"version": 2}
        let pragma = [0xa1, 0x67, b'v', b'e', b'r', b's', b'i', b'o', b'n', 0x02];
        assert!(matches!(decode_header(&pragma), Err(CarError::UnsupportedVersion(2)) | Err(CarError::InvalidHeader(_))));
        assert!(matches!(decode_header(&encode_header(&[])), Err(CarError::InvalidHeader(_))));
        assert!(matches!(decode_header(b"\x01"), Err(CarError::InvalidHeader(_))));
    }
}
