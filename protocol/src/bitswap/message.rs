//! The bitswap message in Rust terms, and its conversion to and from the protobuf of
//! `proto/bitswap.proto` (boxo's `message/pb/message.proto`) for each wire [`Version`].
//!
//! Received blocks are hashed while decoding: in 1.1+ a block travels with its CID *prefix*
//! only (version, codec, hash function, digest length), so its CID is whatever its bytes hash
//! to. A block is therefore never "stored under a wrong CID" — a corrupted block simply has a
//! CID that nobody wanted, and the behaviour treats it as bad. Decoding is zero-copy: block
//! bytes are slices of the frame.
//!
//! Memory: an item (wantlist entry, block, presence) can take 2 bytes of a frame and ~200 once
//! decoded, so a frame may carry at most [`MAX_ITEMS_PER_MESSAGE`] of them, counted before
//! anything is decoded: a decoded frame then takes at most ~12 MiB beyond its own bytes.

use bytes::{Bytes, BytesMut};
use cid::Cid;
use kubelt_proto::bitswap as pb;
use multihash_codetable::{Code, MultihashDigest};
use prost::Message as _;

use super::protocol::{put_length_prefix, FrameError, Version};
use crate::store::Block;
use crate::unixfs::dag_pb::{exact_cid, wire};

/// dag-pb's multicodec, the only codec a CIDv0 can have.
const DAG_PB: u64 = 0x70;
/// sha2-256's multihash code.
const SHA2_256: u64 = 0x12;

/// What a wantlist entry asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WantType {
    /// Send the block.
    Block,
    /// Tell me whether you have the block (1.2.0).
    Have,
}

/// One line of a wantlist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantlistEntry {
    /// The block wanted (or cancelled).
    pub cid: Cid,
    /// Higher is served first (Kubo's engine orders its tasks by it).
    pub priority: i32,
    /// Removes `cid` from the receiver's view of our wantlist.
    pub cancel: bool,
    /// Whether the block itself or only a HAVE is asked for.
    pub want_type: WantType,
    /// Ask for an explicit DONT_HAVE when the receiver lacks the block (1.2.0).
    pub send_dont_have: bool,
}

impl WantlistEntry {
    /// A want for `cid`.
    pub fn want(cid: Cid, want_type: WantType, priority: i32, send_dont_have: bool) -> Self {
        WantlistEntry { cid, priority, cancel: false, want_type, send_dont_have }
    }

    /// A cancel of an earlier want for `cid`.
    pub fn cancel(cid: Cid) -> Self {
        WantlistEntry { cid, priority: 0, cancel: true, want_type: WantType::Block, send_dont_have: false }
    }
}

/// A block presence (1.2.0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Presence {
    /// The sender has the block.
    Have,
    /// The sender does not have the block.
    DontHave,
}

/// A message we send. Blocks are shared `Bytes`: building a message does not copy them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    /// The wantlist replaces the previous one instead of amending it.
    pub full: bool,
    /// Wants and cancels.
    pub wantlist: Vec<WantlistEntry>,
    /// Blocks for the receiver's wants.
    pub blocks: Vec<Block>,
    /// HAVE / DONT_HAVE answers to the receiver's wants.
    pub presences: Vec<(Cid, Presence)>,
}

/// Fixed overhead we reserve per block, presence and entry when estimating a message's size:
/// protobuf tags and lengths plus the CID or prefix (CIDs in the wild are at most ~70 bytes).
pub(crate) const BLOCK_OVERHEAD: usize = 16 + 16;
pub(crate) const CID_OVERHEAD: usize = 8 + 72;

impl Message {
    /// Whether there is nothing to send.
    pub fn is_empty(&self) -> bool {
        !self.full && self.wantlist.is_empty() && self.blocks.is_empty() && self.presences.is_empty()
    }

    /// An upper bound of the encoded size, cheap to keep up to date while batching.
    pub fn size_estimate(&self) -> usize {
        16 + self.wantlist.len() * (CID_OVERHEAD + 16)
            + self.presences.len() * CID_OVERHEAD
            + self.blocks.iter().map(|b| b.data.len() + BLOCK_OVERHEAD).sum::<usize>()
    }

    /// The protobuf for a stream of `version`: 1.0.0 sends bare blocks, 1.1.0 blocks with
    /// prefixes, and only 1.2.0 carries presences (older peers would not understand them).
    pub fn to_proto(&self, version: Version) -> pb::Message {
        let wantlist = if self.wantlist.is_empty() && !self.full {
            None
        } else {
            Some(pb::message::Wantlist {
                entries: self
                    .wantlist
                    .iter()
                    .map(|e| pb::message::wantlist::Entry {
                        block: Bytes::from(e.cid.to_bytes()),
                        priority: e.priority,
                        cancel: e.cancel,
                        want_type: match e.want_type {
                            WantType::Block => pb::message::wantlist::WantType::Block as i32,
                            WantType::Have => pb::message::wantlist::WantType::Have as i32,
                        },
                        send_dont_have: e.send_dont_have,
                    })
                    .collect(),
                full: self.full,
            })
        };
        let mut msg = pb::Message { wantlist, ..Default::default() };
        match version {
            Version::V1_0_0 => msg.blocks = self.blocks.iter().map(|b| b.data.clone()).collect(),
            Version::V1_1_0 | Version::V1_2_0 => {
                msg.payload = self
                    .blocks
                    .iter()
                    .map(|b| pb::message::Block { prefix: Bytes::from(cid_prefix(&b.cid)), data: b.data.clone() })
                    .collect()
            }
        }
        if version == Version::V1_2_0 {
            msg.block_presences = self
                .presences
                .iter()
                .map(|(cid, p)| pb::message::BlockPresence {
                    cid: Bytes::from(cid.to_bytes()),
                    r#type: match p {
                        Presence::Have => pb::message::BlockPresenceType::Have as i32,
                        Presence::DontHave => pb::message::BlockPresenceType::DontHave as i32,
                    },
                })
                .collect();
        }
        msg
    }

    /// The frame for a stream of `version`: varint length prefix, then the protobuf. Block
    /// bytes are copied exactly once, into this buffer.
    pub fn encode_frame(&self, version: Version) -> Bytes {
        let msg = self.to_proto(version);
        let len = msg.encoded_len();
        let mut buf = BytesMut::with_capacity(len + 10);
        put_length_prefix(&mut buf, len);
        // `BytesMut` grows as needed, so encoding cannot run out of room.
        let _ = msg.encode(&mut buf);
        buf.freeze()
    }
}

/// A block we could not turn into a CID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadBlock {
    pub reason: String,
    pub size: usize,
}

/// Most wantlist entries, blocks and presences, together, that a received message may carry.
/// Far above what any sender packs into a frame (our answers stop at ~1 MiB, ≥ 32 bytes per
/// item; our wantlists at 8192 entries; boxo's answers at 16 KiB), and low enough that a
/// frame of empty items cannot make us allocate hundreds of MiB.
pub const MAX_ITEMS_PER_MESSAGE: usize = 1 << 16;

/// A message as received: wantlist entries with valid CIDs, blocks already hashed.
#[derive(Debug, Clone, Default)]
pub struct ReceivedMessage {
    /// The wantlist replaces the sender's previous one.
    pub full: bool,
    /// The sender's wants and cancels.
    pub wantlist: Vec<WantlistEntry>,
    /// Blocks with the CID their bytes hash to.
    pub blocks: Vec<Block>,
    /// HAVE / DONT_HAVE answers to our wants.
    pub presences: Vec<(Cid, Presence)>,
    /// Blocks whose prefix was invalid or named a hash function we do not support.
    pub bad_blocks: Vec<BadBlock>,
    /// Wantlist entries and presences with unparseable CIDs (skipped).
    pub malformed_entries: usize,
    /// Size of the frame body.
    pub size: usize,
}

impl ReceivedMessage {
    /// Decodes a frame body and hashes every block. Both block fields are read whatever the
    /// negotiated version, as boxo does.
    pub fn decode(frame: Bytes) -> Result<ReceivedMessage, FrameError> {
        let size = frame.len();
        let items = count_items(&frame);
        if items > MAX_ITEMS_PER_MESSAGE {
            return Err(FrameError::TooManyItems { max: MAX_ITEMS_PER_MESSAGE });
        }
        let msg = pb::Message::decode(frame)?;
        let mut out = ReceivedMessage { size, ..Default::default() };
        if let Some(wl) = msg.wantlist {
            out.full = wl.full;
            for e in wl.entries {
                let Ok(cid) = exact_cid(&e.block) else {
                    out.malformed_entries += 1;
                    continue;
                };
                let want_type = match pb::message::wantlist::WantType::try_from(e.want_type) {
                    Ok(pb::message::wantlist::WantType::Have) => WantType::Have,
                    _ => WantType::Block,
                };
                out.wantlist.push(WantlistEntry {
                    cid,
                    priority: e.priority,
                    cancel: e.cancel,
                    want_type,
                    send_dont_have: e.send_dont_have,
                });
            }
        }
        for data in msg.blocks {
            // 1.0.0: the CID is implied: CIDv0 (dag-pb, sha2-256).
            match hash_block(&Prefix::V0, data) {
                Ok(b) => out.blocks.push(b),
                Err(bad) => out.bad_blocks.push(bad),
            }
        }
        for b in msg.payload {
            let result = Prefix::parse(&b.prefix)
                .map_err(|reason| BadBlock { reason, size: b.data.len() })
                .and_then(|p| hash_block(&p, b.data));
            match result {
                Ok(b) => out.blocks.push(b),
                Err(bad) => out.bad_blocks.push(bad),
            }
        }
        for p in msg.block_presences {
            let Ok(cid) = exact_cid(&p.cid) else {
                out.malformed_entries += 1;
                continue;
            };
            let presence = match pb::message::BlockPresenceType::try_from(p.r#type) {
                Ok(pb::message::BlockPresenceType::Have) => Presence::Have,
                Ok(pb::message::BlockPresenceType::DontHave) => Presence::DontHave,
                Err(_) => {
                    out.malformed_entries += 1;
                    continue;
                }
            };
            out.presences.push((cid, presence));
        }
        Ok(out)
    }
}

/// Counts the wantlist entries, blocks and presences of an encoded message without decoding
/// them, stopping past [`MAX_ITEMS_PER_MESSAGE`]. It reads as leniently as prost, so where it
/// stops at malformed bytes prost fails too, having decoded no more items than were counted.
fn count_items(mut frame: &[u8]) -> usize {
    let mut items = 0;
    while !frame.is_empty() && items <= MAX_ITEMS_PER_MESSAGE {
        let Some((field, wire_type, rest)) = wire::read_key(frame) else { break };
        let next = match (field, wire_type) {
            // wantlist: count its entries (field 1); a repeated wantlist field merges.
            (1, wire::LEN) => wire::read_len_delimited(rest).map(|(mut wantlist, rest)| {
                while !wantlist.is_empty() {
                    let Some((field, wire_type, r)) = wire::read_key(wantlist) else { break };
                    items += usize::from((field, wire_type) == (1, wire::LEN));
                    let Some(r) = wire::skip(r, field, wire_type) else { break };
                    wantlist = r;
                }
                rest
            }),
            // blocks, payload, blockPresences
            (2..=4, wire::LEN) => {
                items += 1;
                wire::skip(rest, field, wire_type)
            }
            _ => wire::skip(rest, field, wire_type),
        };
        let Some(next) = next else { break };
        frame = next;
    }
    items
}

/// A CID without its digest, as carried by a 1.1+ block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    /// CID version (0 or 1).
    pub version: u64,
    /// Multicodec of the content (dag-pb, raw...).
    pub codec: u64,
    /// Multihash function code.
    pub mh_code: u64,
    /// Digest length in bytes.
    pub mh_len: usize,
}

impl Prefix {
    const V0: Prefix = Prefix { version: 0, codec: DAG_PB, mh_code: SHA2_256, mh_len: 32 };

    /// Reads `varint(version) varint(codec) varint(mh code) varint(mh length)`.
    pub fn parse(bytes: &[u8]) -> Result<Prefix, String> {
        use unsigned_varint::decode::u64 as read;
        let (version, rest) = read(bytes).map_err(|e| format!("bad prefix version: {e}"))?;
        let (codec, rest) = read(rest).map_err(|e| format!("bad prefix codec: {e}"))?;
        let (mh_code, rest) = read(rest).map_err(|e| format!("bad prefix hash code: {e}"))?;
        let (mh_len, _) = read(rest).map_err(|e| format!("bad prefix hash length: {e}"))?;
        let mh_len = usize::try_from(mh_len).map_err(|_| "bad prefix hash length".to_string())?;
        match version {
            0 if codec == DAG_PB && mh_code == SHA2_256 && mh_len == 32 => {}
            0 => return Err("CIDv0 prefix must be dag-pb sha2-256".into()),
            1 => {}
            v => return Err(format!("unknown CID version {v}")),
        }
        Ok(Prefix { version, codec, mh_code, mh_len })
    }
}

/// The prefix bytes of `cid`.
pub fn cid_prefix(cid: &Cid) -> Vec<u8> {
    let mut out = Vec::with_capacity(8);
    let mut buf = unsigned_varint::encode::u64_buffer();
    let (version, codec) = match cid.version() {
        cid::Version::V0 => (0, DAG_PB),
        cid::Version::V1 => (1, cid.codec()),
    };
    out.extend_from_slice(unsigned_varint::encode::u64(version, &mut buf));
    out.extend_from_slice(unsigned_varint::encode::u64(codec, &mut buf));
    out.extend_from_slice(unsigned_varint::encode::u64(cid.hash().code(), &mut buf));
    out.extend_from_slice(unsigned_varint::encode::u64(u64::from(cid.hash().size()), &mut buf));
    out
}

/// Hashes `data` as `prefix` says and builds its CID.
fn hash_block(prefix: &Prefix, data: Bytes) -> Result<Block, BadBlock> {
    let bad = |reason: String| BadBlock { reason, size: data.len() };
    let code = Code::try_from(prefix.mh_code).map_err(|_| bad(format!("unsupported hash code 0x{:x}", prefix.mh_code)))?;
    let full = code.digest(&data);
    let mh = if prefix.mh_len == usize::from(full.size()) {
        full
    } else if prefix.mh_len < usize::from(full.size()) {
        // Truncated digests are legal in multihash; go-cid's Prefix.Sum supports them too.
        cid::multihash::Multihash::wrap(prefix.mh_code, &full.digest()[..prefix.mh_len])
            .map_err(|e| bad(format!("bad digest length: {e}")))?
    } else {
        return Err(bad(format!("digest length {} longer than the hash's {}", prefix.mh_len, full.size())));
    };
    let cid = if prefix.version == 0 {
        Cid::new_v0(mh).map_err(|e| bad(format!("bad CIDv0: {e}")))?
    } else {
        Cid::new_v1(prefix.codec, mh)
    };
    Ok(Block { cid, data })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unixfs::dag_pb::put_varint;

    fn v0_block(data: &'static [u8]) -> Block {
        let cid = Cid::new_v0(Code::Sha2_256.digest(data)).unwrap();
        Block { cid, data: Bytes::from_static(data) }
    }

    fn sample() -> Message {
        let raw = Block::new_v1(0x55, Bytes::from_static(b"raw leaf"));
        let v0 = v0_block(b"\x0a\x02\x08\x01");
        Message {
            full: true,
            wantlist: vec![
                WantlistEntry::want(raw.cid, WantType::Have, 7, true),
                WantlistEntry::want(v0.cid, WantType::Block, 3, false),
                WantlistEntry::cancel(raw.cid),
            ],
            blocks: vec![v0, raw.clone()],
            presences: vec![(raw.cid, Presence::Have), (raw.cid, Presence::DontHave)],
        }
    }

    fn body(frame: &Bytes) -> Bytes {
        let (len, rest) = unsigned_varint::decode::usize(frame).unwrap();
        assert_eq!(len, rest.len());
        frame.slice(frame.len() - len..)
    }

    #[test]
    fn message_round_trips_on_1_2_0() {
        let msg = sample();
        let got = ReceivedMessage::decode(body(&msg.encode_frame(Version::V1_2_0))).unwrap();
        assert!(got.full);
        assert_eq!(got.wantlist, msg.wantlist);
        assert_eq!(got.blocks, msg.blocks);
        assert_eq!(got.presences, msg.presences);
        assert!(got.bad_blocks.is_empty());
        assert!(msg.size_estimate() >= got.size);
    }

    #[test]
    fn message_round_trips_on_1_1_0_without_presences() {
        let msg = sample();
        let got = ReceivedMessage::decode(body(&msg.encode_frame(Version::V1_1_0))).unwrap();
        assert_eq!(got.wantlist, msg.wantlist);
        assert_eq!(got.blocks, msg.blocks);
        assert!(got.presences.is_empty());
    }

    #[test]
    fn message_on_1_0_0_carries_bare_blocks_read_back_as_cid_v0() {
        let msg = sample();
        let proto = msg.to_proto(Version::V1_0_0);
        assert_eq!(proto.blocks.len(), 2);
        assert!(proto.payload.is_empty() && proto.block_presences.is_empty());
        let got = ReceivedMessage::decode(body(&msg.encode_frame(Version::V1_0_0))).unwrap();
        assert_eq!(got.wantlist, msg.wantlist);
        // The dag-pb block keeps its CIDv0; the raw block comes back as CIDv0 of the same hash.
        assert_eq!(got.blocks[0], msg.blocks[0]);
        assert_eq!(got.blocks[1].cid.hash(), msg.blocks[1].cid.hash());
        assert_eq!(got.blocks[1].cid.version(), cid::Version::V0);
    }

    #[test]
    fn garbage_bytes_are_a_decode_error() {
        let err = ReceivedMessage::decode(Bytes::from_static(&[0xff, 0xff, 0xff, 0x01, 0x02])).unwrap_err();
        assert!(matches!(err, FrameError::Decode(_)), "{err}");
        // A valid field with a length running past the end.
        let err = ReceivedMessage::decode(Bytes::from_static(&[0x1a, 0x40, 0x01])).unwrap_err();
        assert!(matches!(err, FrameError::Decode(_)), "{err}");
    }

    #[test]
    fn bad_prefixes_and_cids_are_counted_not_fatal() {
        let msg = pb::Message {
            payload: vec![
                pb::message::Block { prefix: Bytes::from_static(&[0x01, 0x55, 0x99, 0x01, 0x20]), data: Bytes::from_static(b"x") },
                pb::message::Block { prefix: Bytes::from_static(&[0x07]), data: Bytes::from_static(b"y") },
            ],
            wantlist: Some(pb::message::Wantlist {
                entries: vec![pb::message::wantlist::Entry { block: Bytes::from_static(b"nope"), ..Default::default() }],
                full: false,
            }),
            ..Default::default()
        };
        let got = ReceivedMessage::decode(Bytes::from(msg.encode_to_vec())).unwrap();
        assert_eq!(got.bad_blocks.len(), 2);
        assert!(got.bad_blocks[0].reason.contains("unsupported hash"), "{:?}", got.bad_blocks);
        assert_eq!(got.malformed_entries, 1);
        assert!(got.blocks.is_empty() && got.wantlist.is_empty());
    }

    #[test]
    fn cids_with_trailing_bytes_are_malformed_entries() {
        // `Cid::try_from` ignores what follows a CID; go-cid's `Cast` refuses it, and so do we.
        let raw = Block::new_v1(0x55, Bytes::from_static(b"raw leaf"));
        let mut junk = raw.cid.to_bytes();
        junk.push(0x00);
        let msg = pb::Message {
            wantlist: Some(pb::message::Wantlist {
                entries: vec![pb::message::wantlist::Entry { block: Bytes::from(junk.clone()), ..Default::default() }],
                full: false,
            }),
            block_presences: vec![pb::message::BlockPresence { cid: Bytes::from(junk), r#type: 0 }],
            ..Default::default()
        };
        let got = ReceivedMessage::decode(Bytes::from(msg.encode_to_vec())).unwrap();
        assert_eq!(got.malformed_entries, 2);
        assert!(got.wantlist.is_empty() && got.presences.is_empty());
    }

    #[test]
    fn items_are_counted_across_repeated_wantlist_fields() {
        // Protobuf merges a repeated `wantlist` field: its entries add up.
        let entries = [0x0a, 0x00].repeat(MAX_ITEMS_PER_MESSAGE / 2 + 1);
        let mut frame = Vec::new();
        for _ in 0..2 {
            frame.push(0x0a);
            put_varint(&mut frame, entries.len() as u64);
            frame.extend_from_slice(&entries);
        }
        assert!(matches!(ReceivedMessage::decode(Bytes::from(frame)), Err(FrameError::TooManyItems { .. })));
        assert_eq!(count_items(&[0x12, 0x00].repeat(10)), 10);
        // A block running past the end counts and stops the count: prost fails there too.
        assert_eq!(count_items(&[0x12, 0x00, 0x12, 0x05, 0x00, 0x12, 0x00]), 2);
    }

    #[test]
    fn prefix_matches_go_cid_bytes() {
        let v0 = v0_block(b"abc").cid;
        assert_eq!(cid_prefix(&v0), vec![0x00, 0x70, 0x12, 0x20]);
        let raw = Block::new_v1(0x55, Bytes::from_static(b"abc")).cid;
        assert_eq!(cid_prefix(&raw), vec![0x01, 0x55, 0x12, 0x20]);
        assert_eq!(Prefix::parse(&cid_prefix(&raw)).unwrap(), Prefix { version: 1, codec: 0x55, mh_code: 0x12, mh_len: 32 });
    }

    #[test]
    fn corrupted_block_gets_a_different_cid() {
        let good = Block::new_v1(0x55, Bytes::from_static(b"payload"));
        let msg = pb::Message {
            payload: vec![pb::message::Block { prefix: Bytes::from(cid_prefix(&good.cid)), data: Bytes::from_static(b"pAyload") }],
            ..Default::default()
        };
        let got = ReceivedMessage::decode(Bytes::from(msg.encode_to_vec())).unwrap();
        assert_eq!(got.blocks.len(), 1);
        assert_ne!(got.blocks[0].cid, good.cid);
    }
}
