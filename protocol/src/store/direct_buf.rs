//! Memory that a direct (`O_DIRECT`) write takes as it is.
//!
//! The importer reads a file's chunks into these buffers and hashes them there; the pack files
//! then write the same memory to disk (see [`super::packs`]), so an imported block is copied
//! once on its way to disk: by the `read` that brought it in. A [`DirectPool`] hands the
//! buffers of one import round, so their pages are touched once, not once per batch.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

use crate::lock;

/// Direct writes start, end and sit in memory at multiples of this (a page: a multiple of every
/// disk's logical block size).
pub const DIRECT_ALIGN: usize = 4096;

/// A buffer at a [`DIRECT_ALIGN`] address whose length is a multiple of it.
pub struct DirectBuf {
    /// The allocation: `DIRECT_ALIGN` bytes more than the buffer, which starts at `skip`.
    mem: Vec<u8>,
    skip: usize,
    len: usize,
    /// Where the allocation goes back when the buffer is dropped.
    pool: Option<Arc<DirectPool>>,
}

impl DirectBuf {
    /// A zeroed buffer of at least `len` bytes (rounded up to [`DIRECT_ALIGN`]).
    pub fn new(len: usize) -> Self {
        let len = len.max(1).next_multiple_of(DIRECT_ALIGN);
        // Zeroed memory comes from the system untouched: only the pages written are faulted in.
        Self::from_mem(vec![0; len + DIRECT_ALIGN], len, None)
    }

    fn from_mem(mem: Vec<u8>, len: usize, pool: Option<Arc<DirectPool>>) -> Self {
        let address = mem.as_ptr() as usize;
        let skip = address.next_multiple_of(DIRECT_ALIGN) - address;
        debug_assert!(skip + len <= mem.len());
        DirectBuf { mem, skip, len, pool }
    }
}

impl Deref for DirectBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.mem[self.skip..self.skip + self.len]
    }
}

impl DerefMut for DirectBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.mem[self.skip..self.skip + self.len]
    }
}

impl Drop for DirectBuf {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.put_back(std::mem::take(&mut self.mem));
        }
    }
}

impl std::fmt::Debug for DirectBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectBuf").field("len", &self.len).finish()
    }
}

/// A shared, frozen [`DirectBuf`], as the owner of the `Bytes` sliced out of it.
#[derive(Debug, Clone)]
pub struct SharedDirectBuf(pub Arc<DirectBuf>);

impl AsRef<[u8]> for SharedDirectBuf {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Buffers of one size, handed out and taken back, keeping at most `keep` spare ones.
#[derive(Debug)]
pub struct DirectPool {
    len: usize,
    keep: usize,
    spare: Mutex<Vec<Vec<u8>>>,
}

impl DirectPool {
    /// A pool of buffers of `len` bytes (rounded up to [`DIRECT_ALIGN`]) that keeps up to `keep`
    /// spare ones; the memory goes back to the system when the pool and its buffers are gone.
    pub fn new(len: usize, keep: usize) -> Arc<Self> {
        Arc::new(DirectPool { len: len.max(1).next_multiple_of(DIRECT_ALIGN), keep, spare: Mutex::default() })
    }

    /// The length of every buffer.
    pub fn buf_len(&self) -> usize {
        self.len
    }

    /// A spare buffer (holding whatever it held before), or a new zeroed one.
    pub fn take(self: &Arc<Self>) -> DirectBuf {
        let spare = lock(&self.spare).pop();
        let mem = spare.unwrap_or_else(|| vec![0; self.len + DIRECT_ALIGN]);
        DirectBuf::from_mem(mem, self.len, Some(self.clone()))
    }

    fn put_back(&self, mem: Vec<u8>) {
        let mut spare = lock(&self.spare);
        if spare.len() < self.keep && mem.len() == self.len + DIRECT_ALIGN {
            spare.push(mem);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_pooled() {
        let unpooled = DirectBuf::new(5000);
        assert_eq!(unpooled.len(), 2 * DIRECT_ALIGN);
        assert_eq!(unpooled.as_ptr() as usize % DIRECT_ALIGN, 0);

        let pool = DirectPool::new(3 * DIRECT_ALIGN, 1);
        let mut a = pool.take();
        let b = pool.take();
        assert_eq!((a.len(), b.len()), (3 * DIRECT_ALIGN, 3 * DIRECT_ALIGN));
        assert_eq!(a.as_ptr() as usize % DIRECT_ALIGN, 0);
        a[0] = 7;
        let address = a.as_ptr();
        drop(a);
        drop(b);
        // One spare kept: the first one back, with its bytes.
        let again = pool.take();
        assert_eq!(again.as_ptr(), address);
        assert_eq!(again[0], 7);
        let fresh = pool.take();
        assert_ne!(fresh.as_ptr(), address);
        assert_eq!(fresh[0], 0);
    }
}
