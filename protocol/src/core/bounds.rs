//! Bounds on raw Automerge bytes, checked before Automerge parses them.
//!
//! Automerge's decoders trust the counts a peer declares: run-length columns expand a few bytes
//! into millions of operations, a sync message's Bloom filter sets how many probes Automerge
//! allocates per lookup, and an operation counter past `u32::MAX` panics inside the library.
//! Everything a peer sends goes through these scanners first. They walk the same wire formats
//! ([Automerge binary format](https://automerge.org/automerge-binary-format-spec/), sync
//! messages of `automerge::sync`) without allocating anything proportional to a declared count,
//! and refuse what exceeds the limits below. What passes is small enough that decoding it costs
//! memory and time proportional to its size; a panic in Automerge on what passes is still caught
//! by the callers (`catch_unwind`), and costs one rejected message.

/// Most operations one change may carry. A 1 MiB change of honest text edits stays far below.
pub(crate) const MAX_OPS_PER_CHANGE: u64 = 1 << 18;
/// Most predecessor references (over all operations) one change may carry.
pub(crate) const MAX_PREDS_PER_CHANGE: u64 = 1 << 19;
/// Most dependencies, and most other actors, one change may name.
pub(crate) const MAX_CHANGE_REFS: u64 = 4096;
/// Most heads, or `last_sync` hashes, a sync message may name.
pub(crate) const MAX_SYNC_HEADS: u64 = 4096;
/// Most `need` hashes a sync message may carry.
pub(crate) const MAX_SYNC_NEED: u64 = 65_536;
/// Most Bloom filters (`have` entries) a sync message may carry.
pub(crate) const MAX_SYNC_HAVES: u64 = 16;
/// Most probes per Bloom filter lookup (Automerge writes 7).
pub(crate) const MAX_BLOOM_PROBES: u32 = 32;
/// Most bits per Bloom filter entry (Automerge writes 10).
pub(crate) const MAX_BLOOM_BITS_PER_ENTRY: u32 = 64;
/// Largest Bloom filter bit array (bytes).
pub(crate) const MAX_BLOOM_BYTES: usize = 4 << 20;

pub(super) const CHUNK_MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
pub(super) const CHUNK_TYPE_CHANGE: u8 = 1;
/// Column spec of the action column (id 4, type integer) and of the predecessor group (id 7,
/// type group); bit 3 marks a DEFLATE-compressed column.
const ACTION_COLUMN: u64 = (4 << 4) | 2;
const PRED_GROUP_COLUMN: u64 = 7 << 4;
const DEFLATE_BIT: u64 = 1 << 3;
const SYNC_V1: u8 = 0x42;
const SYNC_V2: u8 = 0x43;

/// What a scan of change bytes found, from the change's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChangeHeader {
    /// The actor id bytes.
    pub actor: Vec<u8>,
    /// Sequence number of the change in its actor.
    pub seq: u64,
    /// Counter of the change's first operation.
    pub start_op: u64,
    /// Number of operations.
    pub ops: u64,
}

/// A cursor over untrusted bytes that never reads past the end.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], String> {
        if n > self.remaining() as u64 {
            return Err(format!("{what}: {n} bytes declared, {} left", self.remaining()));
        }
        let n = n as usize;
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn byte(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }

    fn uleb(&mut self, what: &str) -> Result<u64, String> {
        let mut value: u64 = 0;
        for i in 0..10 {
            let b = self.byte(what)?;
            let part = u64::from(b & 0x7f);
            if i == 9 && part > 1 {
                return Err(format!("{what}: LEB128 value over 64 bits"));
            }
            value |= part << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(format!("{what}: LEB128 value over 64 bits"))
    }

    fn sleb(&mut self, what: &str) -> Result<i64, String> {
        let mut value: i64 = 0;
        let mut shift = 0u32;
        loop {
            let b = self.byte(what)?;
            if shift == 63 && b != 0x00 && b != 0x7f {
                return Err(format!("{what}: LEB128 value over 64 bits"));
            }
            value |= i64::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                if shift < 64 && b & 0x40 != 0 {
                    value |= -1i64 << shift;
                }
                return Ok(value);
            }
            if shift >= 64 {
                return Err(format!("{what}: LEB128 value over 64 bits"));
            }
        }
    }

    /// A count, refused above `max`.
    fn count(&mut self, max: u64, what: &str) -> Result<u64, String> {
        let n = self.uleb(what)?;
        if n > max {
            return Err(format!("{what}: {n} declared, at most {max} allowed"));
        }
        Ok(n)
    }

    fn length_prefixed(&mut self, what: &str) -> Result<&'a [u8], String> {
        let n = self.uleb(what)?;
        self.take(n, what)
    }
}

/// One run of an unsigned-integer RLE column, as Automerge encodes them.
#[derive(Clone, Copy)]
enum Run {
    /// `count` copies of `value`.
    Repeat { count: u64, value: u64 },
    /// One literal value.
    Literal(u64),
    /// `count` nulls.
    Nulls(u64),
}

/// Walks an unsigned-integer RLE column and adds up `weigh` of each run, refusing a total over
/// `max` as soon as it is reached: a few bytes that declare billions of entries cost no more
/// than the bytes themselves.
fn rle_total(column: &[u8], max: u64, what: &str, weigh: impl Fn(Run) -> u64) -> Result<u64, String> {
    let mut reader = Reader::new(column);
    let mut total: u64 = 0;
    let mut add = |run: Run| -> Result<(), String> {
        total = total.checked_add(weigh(run)).filter(|t| *t <= max).ok_or_else(|| format!("{what}: more than {max} entries"))?;
        Ok(())
    };
    while reader.remaining() > 0 {
        let run = reader.sleb(what)?;
        if run > 0 {
            add(Run::Repeat { count: run as u64, value: reader.uleb(what)? })?;
        } else if run < 0 {
            let n = run.unsigned_abs();
            if n > reader.remaining() as u64 {
                return Err(format!("{what}: literal run of {n} longer than the column"));
            }
            for _ in 0..n {
                add(Run::Literal(reader.uleb(what)?))?;
            }
        } else {
            add(Run::Nulls(reader.uleb(what)?))?;
        }
    }
    Ok(total)
}

/// How many entries an RLE column holds (what Automerge iterates), at most `max`.
fn rle_entries(column: &[u8], max: u64, what: &str) -> Result<u64, String> {
    rle_total(column, max, what, |run| match run {
        Run::Repeat { count, .. } | Run::Nulls(count) => count,
        Run::Literal(_) => 1,
    })
}

/// The sum of the values of an RLE column (a group column: how many entries each operation
/// has), at most `max`.
fn rle_sum(column: &[u8], max: u64, what: &str) -> Result<u64, String> {
    rle_total(column, max, what, |run| match run {
        Run::Repeat { count, value } => count.saturating_mul(value),
        Run::Literal(value) => value,
        Run::Nulls(_) => 0,
    })
}

/// Scans one uncompressed change chunk: its framing, header fields, column layout, number of
/// operations and predecessor references, and that every operation counter fits in 32 bits.
pub(crate) fn scan_change(bytes: &[u8]) -> Result<ChangeHeader, String> {
    let mut r = Reader::new(bytes);
    if r.take(4, "magic")? != CHUNK_MAGIC {
        return Err("not an Automerge chunk".into());
    }
    r.take(4, "checksum")?;
    match r.byte("chunk type")? {
        CHUNK_TYPE_CHANGE => {}
        2 => return Err("compressed change chunks are not accepted".into()),
        other => return Err(format!("chunk type {other} is not a change")),
    }
    let len = r.uleb("chunk length")?;
    if len != r.remaining() as u64 {
        return Err(format!("chunk length {len} does not match the {} bytes that follow", r.remaining()));
    }
    let deps = r.count(MAX_CHANGE_REFS, "dependencies")?;
    r.take(deps.saturating_mul(32), "dependencies")?;
    let actor = r.length_prefixed("actor")?.to_vec();
    let seq = r.uleb("seq")?;
    let start_op = r.uleb("start op")?;
    if start_op == 0 {
        return Err("start op is 0".into());
    }
    r.sleb("time")?;
    let message = r.length_prefixed("message")?;
    std::str::from_utf8(message).map_err(|_| "message is not UTF-8".to_string())?;
    let others = r.count(MAX_CHANGE_REFS, "other actors")?;
    for _ in 0..others {
        r.length_prefixed("other actor")?;
    }
    let columns = r.count(64, "columns")?;
    let mut layout = Vec::with_capacity(columns as usize);
    let mut total: u64 = 0;
    for _ in 0..columns {
        let spec = r.uleb("column spec")?;
        let len = r.uleb("column length")?;
        if spec & DEFLATE_BIT != 0 {
            return Err("compressed columns are not accepted".into());
        }
        total = total.checked_add(len).ok_or("column lengths overflow")?;
        layout.push((spec, len));
    }
    if total > r.remaining() as u64 {
        return Err(format!("columns declare {total} bytes, {} left", r.remaining()));
    }
    let mut ops = 0;
    for (spec, len) in layout {
        let data = r.take(len, "column")?;
        match spec {
            ACTION_COLUMN => ops = rle_entries(data, MAX_OPS_PER_CHANGE, "operations")?,
            PRED_GROUP_COLUMN => {
                rle_sum(data, MAX_PREDS_PER_CHANGE, "predecessors")?;
            }
            _ => {}
        }
    }
    let last = start_op.checked_add(ops).ok_or("operation counters overflow")?;
    if last > u64::from(u32::MAX) {
        return Err(format!("operation counters reach {last}, past the 32-bit limit"));
    }
    Ok(ChangeHeader { actor, seq, start_op, ops })
}

/// Scans an Automerge sync message: at most the declared numbers of hashes and Bloom filters
/// that fit the limits above, filters whose probe count and size are sane, and no embedded
/// changes (changes travel in signed envelopes next to the message).
pub(crate) fn scan_sync_message(bytes: &[u8]) -> Result<(), String> {
    let mut r = Reader::new(bytes);
    match r.byte("message type")? {
        SYNC_V1 | SYNC_V2 => {}
        other => return Err(format!("message type {other:#x} is not a sync message")),
    }
    let heads = r.count(MAX_SYNC_HEADS, "heads")?;
    r.take(heads.saturating_mul(32), "heads")?;
    let need = r.count(MAX_SYNC_NEED, "need")?;
    r.take(need.saturating_mul(32), "need")?;
    let haves = r.count(MAX_SYNC_HAVES, "have")?;
    for _ in 0..haves {
        let last_sync = r.count(MAX_SYNC_HEADS, "last sync")?;
        r.take(last_sync.saturating_mul(32), "last sync")?;
        scan_bloom(r.length_prefixed("bloom filter")?)?;
    }
    let changes = r.uleb("changes")?;
    if changes != 0 {
        return Err("a sync message must not embed changes (they travel in signed envelopes)".into());
    }
    if r.remaining() > 0 {
        let capabilities = r.count(16, "capabilities")?;
        r.take(capabilities, "capabilities")?;
    }
    if r.remaining() > 0 {
        return Err(format!("{} bytes after the sync message", r.remaining()));
    }
    Ok(())
}

fn scan_bloom(bytes: &[u8]) -> Result<(), String> {
    if bytes.is_empty() {
        return Ok(());
    }
    let mut r = Reader::new(bytes);
    let entries = r.uleb("bloom entries")?;
    let bits_per_entry = r.uleb("bloom bits per entry")?;
    let probes = r.uleb("bloom probes")?;
    if entries > u64::from(u32::MAX) {
        return Err("bloom filter entries over 32 bits".into());
    }
    if bits_per_entry == 0 || bits_per_entry > u64::from(MAX_BLOOM_BITS_PER_ENTRY) {
        return Err(format!("bloom filter with {bits_per_entry} bits per entry (1 to {MAX_BLOOM_BITS_PER_ENTRY})"));
    }
    if probes == 0 || probes > u64::from(MAX_BLOOM_PROBES) {
        return Err(format!("bloom filter with {probes} probes (1 to {MAX_BLOOM_PROBES})"));
    }
    let bits = (entries * bits_per_entry).div_ceil(8);
    if bits == 0 && entries > 0 {
        return Err("bloom filter with entries and no bits".into());
    }
    if bits > MAX_BLOOM_BYTES as u64 {
        return Err(format!("bloom filter of {bits} bytes (at most {MAX_BLOOM_BYTES})"));
    }
    if bits > r.remaining() as u64 {
        return Err(format!("bloom filter declares {bits} bytes, {} present", r.remaining()));
    }
    Ok(())
}
