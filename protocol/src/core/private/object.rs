//! Private objects: the `kbobj1` format, a file's bytes encrypted under a core's data key
//! before they become blocks.
//!
//! A private object is stored as ordinary UnixFS content, so its CID is the CID of the
//! ciphertext; every replica, the gateway and bitswap see only ciphertext. The format:
//!
//! ```text
//! header (34 bytes): "kbobj1" ‖ log2 of the chunk size (16) ‖ data key id (8) ‖ nonce prefix (19, random)
//! chunk 0 ‖ chunk 1 ‖ … ‖ last chunk
//! chunk i = XChaCha20-Poly1305(key, nonce = prefix ‖ i as u32 big-endian ‖ last flag, aad = header) of
//!           64 KiB of the file (the last chunk: 0 to 64 KiB), followed by its 16-byte tag
//! ```
//!
//! This is the STREAM construction (Hoang, Reyhanitabar, Rogaway and Vizár, "Online
//! Authenticated-Encryption and its Nonce-Reuse Misuse-Resistance", 2015) with the nonce layout
//! of the `aead` crate's `StreamBE32`: the chunk's position and whether it is the last one are
//! part of its nonce, so reordering, dropping, duplicating or splicing chunks (from this object
//! or another one), cutting the object short at a chunk boundary or appending to it all make a
//! chunk fail its tag. The header is every chunk's associated data, so the key id and the
//! nonce prefix cannot be changed either. The nonce is built here rather than through
//! `aead::stream` because enabling that feature of `aead` rebuilds libp2p's noise (which shares
//! the crate) for a dozen lines.
//!
//! The AEAD is XChaCha20-Poly1305 built from its parts (draft-irtf-cfrg-xchacha-03, §2.3):
//! every nonce of an object begins with the same 16 bytes (the prefix's first 16), so the
//! HChaCha20 subkey is derived once per object (`ChunkCipher`), and each chunk is the IETF
//! ChaCha20-Poly1305 of `ring` (assembly: 2.1 GB/s here, against 1.3 GB/s for
//! `chacha20poly1305`'s XChaCha20-Poly1305, which the tests check it against byte for byte).
//!
//! An empty file is one empty last chunk (its tag only), so an object is never just a header.
//! Every object has a fresh random nonce prefix (152 bits: no collision in practice), so one
//! data key encrypts any number of objects.
//!
//! [`Encryptor`] and [`Decryptor`] are push-based and do no I/O: they hold at most one chunk,
//! so a file of any size is encrypted or decrypted in constant memory. [`EncryptingReader`]
//! wraps a [`std::io::Read`] for the UnixFS importer; [`encrypt_chunks`] hands out sealed
//! chunks encrypted where they were read, for a pipeline (the node encrypts a private add on a
//! thread of its own while the importer hashes).
//!
//! What is *not* hidden: the object's size (the ciphertext is 34 + 16 per 64 KiB bytes longer),
//! when it was added, and the id of the data key (so whoever holds the core's document can tell
//! which core a private object belongs to).

use std::io::Read;

use rand::RngCore;
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, CHACHA20_POLY1305};

use super::KeyId;
use crate::msg::crypto::KEY_LEN;

/// The first bytes of every private object.
pub const MAGIC: &[u8; 6] = b"kbobj1";
/// log2 of the chunk size this version writes and reads.
pub const CHUNK_LOG2: u8 = 16;
/// Bytes of the file in each chunk (the last one may hold fewer).
pub const CHUNK: usize = 1 << CHUNK_LOG2;
/// The tag that follows each chunk.
pub const TAG_LEN: usize = 16;
const PREFIX_LEN: usize = 19;
/// Length of the header.
pub const HEADER_LEN: usize = MAGIC.len() + 1 + 8 + PREFIX_LEN;
/// A full chunk of ciphertext.
const SEALED_CHUNK: usize = CHUNK + TAG_LEN;

/// Why a private object does not decrypt. No case means "wrong data": each says which part of
/// the object failed, so a tampered object is told apart from a missing key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ObjectError {
    /// The bytes do not start with a `kbobj1` header: not a private object.
    #[error("not a private object (it does not start with the kbobj1 header)")]
    NotPrivate,
    /// A `kbobj1` header with a chunk size this version does not read.
    #[error("unsupported private object: chunks of 2^{0} bytes (this version reads 2^{CHUNK_LOG2})")]
    Unsupported(u8),
    /// The object ends before its last chunk's tag (or inside its header).
    #[error("private object truncated: it ends inside its header or before its last chunk's tag")]
    Truncated,
    /// A chunk fails its tag: tampered with, reordered, cut short, extended, or encrypted under
    /// another key than its header names.
    #[error("private object does not decrypt at chunk {chunk}: tampered with, reordered, truncated or extended (or not made with this key)")]
    Tampered {
        /// The position of the chunk that failed.
        chunk: u64,
    },
    /// More chunks than the nonce counts (2^32 chunks, 256 TiB).
    #[error("private object larger than 256 TiB")]
    TooLarge,
}

/// A core's data key with its id, as private objects use it. `Debug` never shows the key.
#[derive(Clone)]
pub struct ObjectKey {
    /// The id written in the object's header (and in its record in the core).
    pub id: KeyId,
    key: [u8; KEY_LEN],
}

impl ObjectKey {
    /// The key `key` whose id is `id`.
    pub fn new(id: KeyId, key: [u8; KEY_LEN]) -> Self {
        ObjectKey { id, key }
    }

    fn cipher(&self, header: &Header) -> ChunkCipher {
        ChunkCipher::new(&self.key, header)
    }
}

/// XChaCha20-Poly1305 for the chunks of one object (see the [module docs](self)).
struct ChunkCipher {
    /// ChaCha20-Poly1305 under the HChaCha20 subkey of the key and the prefix's first 16 bytes.
    subkey: LessSafeKey,
    /// The prefix's last 3 bytes: the start of every chunk's 8-byte nonce tail.
    tail: [u8; PREFIX_LEN - 16],
    /// Every chunk's associated data.
    aad: [u8; HEADER_LEN],
}

impl ChunkCipher {
    fn new(key: &[u8; KEY_LEN], header: &Header) -> Self {
        let subkey = chacha20::hchacha::<chacha20::cipher::consts::U10>(
            chacha20::Key::from_slice(key),
            chacha20::cipher::generic_array::GenericArray::from_slice(&header.prefix[..16]),
        );
        let subkey = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &subkey).expect("a 32-byte ChaCha20 key"));
        let mut tail = [0u8; PREFIX_LEN - 16];
        tail.copy_from_slice(&header.prefix[16..]);
        ChunkCipher { subkey, tail, aad: header.raw }
    }

    /// The IETF nonce of chunk `position`: 4 zero bytes, then the XChaCha nonce's last 8
    /// (the prefix's last 3, the position, the last flag).
    fn nonce(&self, position: u32, last: bool) -> Nonce {
        let mut nonce = [0u8; 12];
        nonce[4..7].copy_from_slice(&self.tail);
        nonce[7..11].copy_from_slice(&position.to_be_bytes());
        nonce[11] = u8::from(last);
        Nonce::assume_unique_for_key(nonce)
    }

    /// Encrypts `chunk` in place; returns its tag.
    fn seal(&self, position: u32, last: bool, chunk: &mut [u8]) -> Result<[u8; TAG_LEN], ObjectError> {
        let tag = self.subkey.seal_in_place_separate_tag(self.nonce(position, last), Aad::from(&self.aad), chunk).map_err(|_| ObjectError::TooLarge)?;
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Decrypts `chunk` in place; `false` if it fails its tag.
    fn open(&self, position: u32, last: bool, chunk: &mut [u8], tag: [u8; TAG_LEN]) -> bool {
        self.subkey.open_in_place_separate_tag(self.nonce(position, last), Aad::from(&self.aad), Tag::from(tag), chunk, 0..).is_ok()
    }
}

impl std::fmt::Debug for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectKey").field("id", &hex::encode(self.id)).finish_non_exhaustive()
    }
}

/// A parsed `kbobj1` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The data key the object was encrypted with.
    pub key_id: KeyId,
    prefix: [u8; PREFIX_LEN],
    raw: [u8; HEADER_LEN],
}

impl Header {
    fn new(key_id: KeyId, prefix: [u8; PREFIX_LEN]) -> Self {
        let mut raw = [0u8; HEADER_LEN];
        raw[..6].copy_from_slice(MAGIC);
        raw[6] = CHUNK_LOG2;
        raw[7..15].copy_from_slice(&key_id);
        raw[15..].copy_from_slice(&prefix);
        Header { key_id, prefix, raw }
    }

    /// Parses the header at the start of `bytes` (which may hold more). Fewer than
    /// [`HEADER_LEN`] bytes that start like a header are [`ObjectError::Truncated`].
    pub fn parse(bytes: &[u8]) -> Result<Header, ObjectError> {
        let magic_len = bytes.len().min(MAGIC.len());
        if bytes.is_empty() || bytes[..magic_len] != MAGIC[..magic_len] {
            return Err(ObjectError::NotPrivate);
        }
        if bytes.len() < HEADER_LEN {
            return Err(ObjectError::Truncated);
        }
        if bytes[6] != CHUNK_LOG2 {
            return Err(ObjectError::Unsupported(bytes[6]));
        }
        let mut key_id = [0u8; 8];
        key_id.copy_from_slice(&bytes[7..15]);
        let mut prefix = [0u8; PREFIX_LEN];
        prefix.copy_from_slice(&bytes[15..HEADER_LEN]);
        Ok(Header::new(key_id, prefix))
    }

    /// Chunk `position`'s 24-byte XChaCha20 nonce: the prefix, the position, the last flag.
    #[cfg(test)]
    fn nonce(&self, position: u32, last: bool) -> [u8; 24] {
        let mut nonce = [0u8; 24];
        nonce[..PREFIX_LEN].copy_from_slice(&self.prefix);
        nonce[PREFIX_LEN..PREFIX_LEN + 4].copy_from_slice(&position.to_be_bytes());
        nonce[PREFIX_LEN + 4] = u8::from(last);
        nonce
    }
}

/// Whether `bytes` start like a private object (the magic only; [`Header::parse`] checks the
/// rest).
pub fn is_private_object(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

/// The length of the object that encrypts `plain` bytes.
pub fn sealed_len(plain: u64) -> u64 {
    let chunks = plain.div_ceil(CHUNK as u64).max(1);
    HEADER_LEN as u64 + plain + chunks * TAG_LEN as u64
}

/// Encrypts a file pushed in pieces of any size into a `kbobj1` object.
pub struct Encryptor {
    cipher: ChunkCipher,
    header: Header,
    header_written: bool,
    position: u32,
    /// The chunk being filled: written out once more bytes show it is not the last.
    pending: Vec<u8>,
}

impl Encryptor {
    /// An object under `key`, with a fresh random nonce prefix.
    pub fn new(key: &ObjectKey) -> Self {
        let mut prefix = [0u8; PREFIX_LEN];
        rand::rngs::OsRng.fill_bytes(&mut prefix);
        Self::with_prefix(key, prefix)
    }

    fn with_prefix(key: &ObjectKey, prefix: [u8; PREFIX_LEN]) -> Self {
        let header = Header::new(key.id, prefix);
        Encryptor { cipher: key.cipher(&header), header, header_written: false, position: 0, pending: Vec::with_capacity(SEALED_CHUNK) }
    }

    /// Encrypts `plain`, appending to `out` the ciphertext that is ready (the header first).
    pub fn update(&mut self, mut plain: &[u8], out: &mut Vec<u8>) -> Result<(), ObjectError> {
        self.write_header(out);
        while !plain.is_empty() {
            if self.pending.len() == CHUNK {
                self.seal(false, out)?;
            }
            let take = (CHUNK - self.pending.len()).min(plain.len());
            self.pending.extend_from_slice(&plain[..take]);
            plain = &plain[take..];
        }
        Ok(())
    }

    /// Encrypts what is left as the last chunk and appends it to `out`.
    pub fn finish(mut self, out: &mut Vec<u8>) -> Result<(), ObjectError> {
        self.write_header(out);
        self.seal(true, out)
    }

    fn write_header(&mut self, out: &mut Vec<u8>) {
        if !self.header_written {
            out.extend_from_slice(&self.header.raw);
            self.header_written = true;
        }
    }

    fn seal(&mut self, last: bool, out: &mut Vec<u8>) -> Result<(), ObjectError> {
        let start = out.len();
        out.extend_from_slice(&self.pending);
        self.pending.clear();
        self.seal_at(out, start, last)
    }

    /// Encrypts `buf[start..]` in place as the next chunk and appends its tag.
    fn seal_at(&mut self, buf: &mut Vec<u8>, start: usize, last: bool) -> Result<(), ObjectError> {
        let tag = self.cipher.seal(self.position, last, &mut buf[start..])?;
        buf.extend_from_slice(&tag);
        self.position = self.position.checked_add(1).ok_or(ObjectError::TooLarge)?;
        Ok(())
    }
}

/// Encrypts what `reader` reads under `key` and hands the object to `emit` piece by piece:
/// the header, then each sealed chunk, encrypted where it was read (no copy). `emit` returns
/// `false` to stop early. For a pipeline that encrypts on one thread while another consumes.
pub fn encrypt_chunks(mut reader: impl Read, key: &ObjectKey, mut emit: impl FnMut(Vec<u8>) -> bool) -> std::io::Result<()> {
    let invalid = |e: ObjectError| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let mut encryptor = Encryptor::new(key);
    encryptor.header_written = true;
    if !emit(encryptor.header.raw.to_vec()) {
        return Ok(());
    }
    let mut read_chunk = || -> std::io::Result<Vec<u8>> {
        let mut chunk = Vec::with_capacity(SEALED_CHUNK);
        reader.by_ref().take(CHUNK as u64).read_to_end(&mut chunk)?;
        Ok(chunk)
    };
    let mut chunk = read_chunk()?;
    loop {
        // A full chunk is the last one only if nothing follows it.
        let next = if chunk.len() == CHUNK { read_chunk()? } else { Vec::new() };
        let last = next.is_empty();
        encryptor.seal_at(&mut chunk, 0, last).map_err(invalid)?;
        if !emit(chunk) || last {
            return Ok(());
        }
        chunk = next;
    }
}

/// Decrypts a `kbobj1` object pushed in pieces of any size, after its header.
pub struct Decryptor {
    cipher: ChunkCipher,
    position: u32,
    /// The sealed chunk being filled: opened once more bytes show it is not the last.
    pending: Vec<u8>,
}

impl Decryptor {
    /// Decrypts the object with `header` under `key`. A key whose id is not the header's is
    /// not refused here: its first chunk fails ([`ObjectError::Tampered`]).
    pub fn new(header: &Header, key: &ObjectKey) -> Self {
        Decryptor { cipher: key.cipher(header), position: 0, pending: Vec::with_capacity(SEALED_CHUNK) }
    }

    /// Decrypts the bytes that follow the header, appending to `out` the plaintext of every
    /// chunk that is complete and known not to be the last.
    pub fn update(&mut self, mut sealed: &[u8], out: &mut Vec<u8>) -> Result<(), ObjectError> {
        while !sealed.is_empty() {
            if self.pending.len() == SEALED_CHUNK {
                self.open(false, out)?;
            }
            let take = (SEALED_CHUNK - self.pending.len()).min(sealed.len());
            self.pending.extend_from_slice(&sealed[..take]);
            sealed = &sealed[take..];
        }
        Ok(())
    }

    /// Decrypts the last chunk: the object must end here.
    pub fn finish(mut self, out: &mut Vec<u8>) -> Result<(), ObjectError> {
        if self.pending.len() < TAG_LEN {
            return Err(ObjectError::Truncated);
        }
        self.open(true, out)
    }

    fn open(&mut self, last: bool, out: &mut Vec<u8>) -> Result<(), ObjectError> {
        let body = self.pending.len() - TAG_LEN;
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&self.pending[body..]);
        let start = out.len();
        out.extend_from_slice(&self.pending[..body]);
        self.pending.clear();
        if !self.cipher.open(self.position, last, &mut out[start..], tag) {
            out.truncate(start);
            return Err(ObjectError::Tampered { chunk: u64::from(self.position) });
        }
        self.position = self.position.checked_add(1).ok_or(ObjectError::TooLarge)?;
        Ok(())
    }
}

/// Encrypts a whole object in memory (small objects: `kb_putObject`).
pub fn seal(key: &ObjectKey, plain: &[u8]) -> Result<Vec<u8>, ObjectError> {
    let mut out = Vec::with_capacity(usize::try_from(sealed_len(plain.len() as u64)).unwrap_or(0));
    let mut encryptor = Encryptor::new(key);
    encryptor.update(plain, &mut out)?;
    encryptor.finish(&mut out)?;
    Ok(out)
}

/// Decrypts a whole object in memory, given a way to find the key its header names. The key
/// lookup's error is returned as is.
pub fn open<E: From<ObjectError>>(sealed: &[u8], key_of: impl FnOnce(&KeyId) -> Result<ObjectKey, E>) -> Result<Vec<u8>, E> {
    let header = Header::parse(sealed)?;
    let key = key_of(&header.key_id)?;
    let mut out = Vec::with_capacity(sealed.len().saturating_sub(HEADER_LEN));
    let mut decryptor = Decryptor::new(&header, &key);
    decryptor.update(&sealed[HEADER_LEN..], &mut out)?;
    decryptor.finish(&mut out)?;
    Ok(out)
}

/// A [`Read`] of the encrypted object of the file `inner` reads: what the UnixFS importer
/// takes to add a private file, in constant memory.
pub struct EncryptingReader<R> {
    inner: R,
    encryptor: Option<Encryptor>,
    plain: Vec<u8>,
    out: Vec<u8>,
    /// How much of `out` was read already.
    at: usize,
}

impl<R: Read> EncryptingReader<R> {
    /// Encrypts what `inner` reads under `key`.
    pub fn new(inner: R, key: &ObjectKey) -> Self {
        EncryptingReader { inner, encryptor: Some(Encryptor::new(key)), plain: vec![0; CHUNK], out: Vec::with_capacity(SEALED_CHUNK + HEADER_LEN), at: 0 }
    }

    /// Refills `out` with the next chunk's ciphertext (nothing at the end).
    fn refill(&mut self) -> std::io::Result<()> {
        self.out.clear();
        self.at = 0;
        let Some(encryptor) = self.encryptor.as_mut() else { return Ok(()) };
        let mut filled = 0;
        while filled < CHUNK {
            match self.inner.read(&mut self.plain[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let invalid = |e: ObjectError| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        encryptor.update(&self.plain[..filled], &mut self.out).map_err(invalid)?;
        if filled < CHUNK {
            if let Some(encryptor) = self.encryptor.take() {
                encryptor.finish(&mut self.out).map_err(invalid)?;
            }
        }
        Ok(())
    }
}

impl<R: Read> Read for EncryptingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // A refill may produce nothing (a full chunk waits to learn whether it is the last).
        while self.at == self.out.len() && self.encryptor.is_some() {
            self.refill()?;
        }
        let n = buf.len().min(self.out.len() - self.at);
        buf[..n].copy_from_slice(&self.out[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests;
