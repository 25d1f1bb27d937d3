//! dag-pb and UnixFS `Data` encoding, written by hand, plus decoding through prost.
//!
//! Specs: dag-pb (<https://ipld.io/specs/codecs/dag-pb/spec/>) and UnixFS v1
//! (<https://github.com/ipfs/specs/blob/main/UNIXFS.md>).
//!
//! Why by hand: dag-pb's canonical form writes a node's `Links` (field 2) *before* its `Data`
//! (field 1), while protobuf encoders (prost included) write fields in tag order; a CID of a
//! prost-encoded node would differ from Kubo's. The UnixFS `Data` message is also written here
//! so that the bytes are exactly what go-unixfs (boxo) writes: fields in tag order,
//! `blocksizes` *unpacked* (proto2), `Data` omitted when there is none, `filesize` always
//! present on files. Each link is `Hash` (1), `Name` (2, written even when empty, as
//! go-merkledag does) and `Tsize` (3).

use bytes::{BufMut, Bytes};
use cid::Cid;
use kubelt_proto::dag_pb::{PbLink, PbNode};
use kubelt_proto::unixfs::{data::DataType, Data};
use prost::Message;

use super::UnixfsError;

/// Multicodec of dag-pb blocks.
pub const DAG_PB: u64 = 0x70;
/// Multicodec of raw blocks (bytes with no structure: UnixFS raw leaves).
pub const RAW: u64 = 0x55;
/// Multicodec of dag-cbor blocks (not produced here; their links are still walked).
pub const DAG_CBOR: u64 = 0x71;

/// Number of bytes `value` takes as a protobuf varint.
pub(crate) const fn varint_len(value: u64) -> usize {
    // ceil(bits / 7), with 0 taking one byte.
    let bits = 64 - (value | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Appends `value` as a protobuf (LEB128) varint.
pub(crate) fn put_varint(out: &mut impl BufMut, mut value: u64) {
    while value >= 0x80 {
        out.put_u8((value as u8) | 0x80);
        value >>= 7;
    }
    out.put_u8(value as u8);
}

/// Writes `value` as a varint ending exactly at `buf[end]` (exclusive); returns where it starts.
/// Used to put a header right before data that is already in place.
pub(crate) fn put_varint_before(buf: &mut [u8], end: usize, value: u64) -> usize {
    let len = varint_len(value);
    let start = end - len;
    let mut v = value;
    for (i, byte) in buf[start..end].iter_mut().enumerate() {
        *byte = if i + 1 == len { v as u8 } else { (v as u8) | 0x80 };
        v >>= 7;
    }
    start
}

/// Length of a length-delimited field (key byte + varint length + payload).
const fn field_len(payload: usize) -> usize {
    1 + varint_len(payload as u64) + payload
}

/// One link to encode: the child's CID, the entry name (empty inside files) and `Tsize`, the
/// cumulative size of the encoded blocks of the child's DAG.
#[derive(Debug, Clone, Copy)]
pub struct LinkRef<'a> {
    /// The child.
    pub cid: &'a Cid,
    /// The entry name (empty inside files).
    pub name: &'a str,
    /// Cumulative encoded size of the child's DAG.
    pub tsize: u64,
}

impl LinkRef<'_> {
    fn body_len(&self) -> usize {
        field_len(self.cid.encoded_len()) + field_len(self.name.len()) + 1 + varint_len(self.tsize)
    }
}

/// Encodes a dag-pb node in canonical form: every link, then `Data` if there is one.
pub fn encode_node<'a>(links: impl Iterator<Item = LinkRef<'a>> + Clone, data: Option<&[u8]>) -> Vec<u8> {
    let links_len: usize = links.clone().map(|l| field_len(l.body_len())).sum();
    let data_len = data.map_or(0, |d| field_len(d.len()));
    let mut out = Vec::with_capacity(links_len + data_len);
    for link in links {
        out.put_u8(0x12);
        put_varint(&mut out, link.body_len() as u64);
        out.put_u8(0x0a);
        put_varint(&mut out, link.cid.encoded_len() as u64);
        // Writing into a Vec cannot fail.
        let _ = link.cid.write_bytes(&mut out);
        out.put_u8(0x12);
        put_varint(&mut out, link.name.len() as u64);
        out.put_slice(link.name.as_bytes());
        out.put_u8(0x18);
        put_varint(&mut out, link.tsize);
    }
    if let Some(data) = data {
        out.put_u8(0x0a);
        put_varint(&mut out, data.len() as u64);
        out.put_slice(data);
    }
    debug_assert_eq!(out.len(), links_len + data_len);
    out
}

/// The UnixFS `Data` of an internal file node: `Type=File`, no data, `filesize` and one
/// `blocksizes` entry per child (the file bytes under that child).
pub fn file_node_data(blocksizes: impl Iterator<Item = u64> + Clone) -> Vec<u8> {
    let filesize: u64 = blocksizes.clone().sum();
    let mut out = Vec::with_capacity(16 + blocksizes.clone().count() * 4);
    out.put_slice(&[0x08, DataType::File as u8]);
    out.put_u8(0x18);
    put_varint(&mut out, filesize);
    for size in blocksizes {
        out.put_u8(0x20);
        put_varint(&mut out, size);
    }
    out
}

/// The UnixFS `Data` of a directory: just `Type=Directory` (go-unixfs `FolderPBData`).
pub const DIRECTORY_DATA: &[u8] = &[0x08, DataType::Directory as u8];

/// The UnixFS `Data` of a symlink: `Type=Symlink` and the target path (go-unixfs `SymlinkData`).
pub fn symlink_data(target: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(target.len() + 8);
    out.put_slice(&[0x08, DataType::Symlink as u8, 0x12]);
    put_varint(&mut out, target.len() as u64);
    out.put_slice(target);
    out
}

/// The UnixFS `Data` of a HAMT shard (go-unixfs `HAMTShardData`): `Type=HAMTShard`, the
/// occupancy bitfield, `hashType` and `fanout`.
pub fn hamt_shard_data(bitfield: &[u8], hash_type: u64, fanout: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(bitfield.len() + 16);
    out.put_slice(&[0x08, DataType::HamtShard as u8]);
    if !bitfield.is_empty() {
        out.put_u8(0x12);
        put_varint(&mut out, bitfield.len() as u64);
        out.put_slice(bitfield);
    }
    out.put_u8(0x28);
    put_varint(&mut out, hash_type);
    out.put_u8(0x30);
    put_varint(&mut out, fanout);
    out
}

/// Room reserved in front of a leaf's data for its dag-pb + UnixFS header (at most 13 bytes).
pub(crate) const LEAF_HEADER_ROOM: usize = 16;
/// Room reserved after a leaf's data for its `filesize` field (at most 11 bytes).
pub(crate) const LEAF_TRAILER_ROOM: usize = 16;

/// Turns file bytes already placed at `buf[LEAF_HEADER_ROOM..]` into a dag-pb UnixFS `File`
/// leaf without copying them: writes the header in the reserved room right before the data and
/// `filesize` right after. Returns the encoded block.
///
/// The bytes are those of go-unixfs `NewLeafNode`: `PbNode { Data: unixfs.Data { Type: File,
/// Data: chunk, filesize: len } }`; with an empty chunk (the empty file), `Data` is omitted.
#[cfg(test)]
pub(crate) fn finish_file_leaf(mut buf: bytes::BytesMut) -> Bytes {
    let n = buf.len() - LEAF_HEADER_ROOM;
    buf.resize(LEAF_HEADER_ROOM + n + LEAF_TRAILER_ROOM, 0);
    let leaf = finish_file_leaf_in(&mut buf, n);
    buf.freeze().slice(leaf)
}

/// [`finish_file_leaf`] inside a slot of a larger buffer: `slot` holds [`LEAF_HEADER_ROOM`]
/// spare bytes, the `n` file bytes, then at least [`LEAF_TRAILER_ROOM`] spare bytes. Returns
/// where in `slot` the encoded leaf is.
pub(crate) fn finish_file_leaf_in(slot: &mut [u8], n: usize) -> std::ops::Range<usize> {
    // Trailer: filesize (field 3).
    let mut end = LEAF_HEADER_ROOM + n;
    slot[end] = 0x18;
    end += 1;
    let len = varint_len(n as u64);
    put_varint_before(slot, end + len, n as u64);
    end += len;
    let unixfs_len = if n == 0 { 4 } else { 2 + field_len(n) + 1 + varint_len(n as u64) };
    // Header, written backwards from the data: [0x0a len] [0x08 0x02] [0x12 n].
    let mut start = LEAF_HEADER_ROOM;
    if n > 0 {
        start = put_varint_before(slot, start, n as u64);
        start -= 1;
        slot[start] = 0x12;
    }
    start -= 2;
    slot[start] = 0x08;
    slot[start + 1] = DataType::File as u8;
    start = put_varint_before(slot, start, unixfs_len as u64);
    start -= 1;
    slot[start] = 0x0a;
    start..end
}

/// A decoded dag-pb node, with its UnixFS data when it has some.
#[derive(Debug, Clone)]
pub struct DecodedNode {
    /// The links, in stored order.
    pub links: Vec<DecodedLink>,
    /// The raw `Data` field.
    pub data: Option<Bytes>,
}

/// One decoded link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedLink {
    /// The child.
    pub cid: Cid,
    /// The entry name (empty inside files).
    pub name: String,
    /// Cumulative encoded size of the child's DAG, when the link has one.
    pub tsize: Option<u64>,
}

impl DecodedNode {
    /// Decodes a dag-pb block (zero-copy for `Data`).
    ///
    /// As lenient as protobuf (either field order, unknown fields skipped; the spec asks
    /// decoders to accept both orders) except for link hashes, which must be exactly one CID
    /// (go-cid's `Cast`). Memory: decoding takes up to ~50 times the block's size (a link can
    /// be 2 bytes on the wire and 72 decoded by prost, more once converted), so callers bound
    /// the block size, as every block source does.
    pub fn decode(cid: &Cid, block: Bytes) -> Result<Self, UnixfsError> {
        let node = PbNode::decode(block).map_err(|e| UnixfsError::InvalidDagPb { cid: *cid, reason: e.to_string() })?;
        let links = node
            .links
            .into_iter()
            .map(|link| decode_link(cid, link))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(DecodedNode { links, data: node.data })
    }

    /// Decodes the UnixFS `Data` message carried by this node.
    pub fn unixfs(&self, cid: &Cid) -> Result<Data, UnixfsError> {
        let data = self.data.clone().ok_or_else(|| UnixfsError::NotUnixfs { cid: *cid, reason: "no Data field".into() })?;
        Data::decode(data).map_err(|e| UnixfsError::NotUnixfs { cid: *cid, reason: e.to_string() })
    }
}

fn decode_link(parent: &Cid, link: PbLink) -> Result<DecodedLink, UnixfsError> {
    let hash = link.hash.ok_or_else(|| UnixfsError::InvalidDagPb { cid: *parent, reason: "link without Hash".into() })?;
    let cid = exact_cid(&hash).map_err(|reason| UnixfsError::InvalidDagPb { cid: *parent, reason: format!("bad link CID: {reason}") })?;
    Ok(DecodedLink { cid, name: link.name.unwrap_or_default(), tsize: link.tsize })
}

/// The CID encoded by exactly `bytes`. `Cid::try_from(&[u8])` ignores trailing bytes, so two
/// different byte strings would name one CID; go-cid's `Cast` refuses them, and so do we.
pub(crate) fn exact_cid(bytes: &[u8]) -> Result<Cid, String> {
    let mut rest = bytes;
    let cid = Cid::read_bytes(&mut rest).map_err(|e| e.to_string())?;
    if !rest.is_empty() {
        return Err(format!("{} trailing bytes after the CID", rest.len()));
    }
    Ok(cid)
}

/// The CIDs a dag-pb block links to, without decoding anything else (fast path for DAG walks:
/// GC marking, CAR export, fetching a DAG).
///
/// Whenever [`DecodedNode::decode`] accepts a block, this returns exactly its links' CIDs:
/// GC keeps what the exporter will ask for. So it reads the protobuf as leniently as prost
/// does (unknown fields of any wire type skipped, the last `Hash` of a link wins).
pub fn link_cids(cid: &Cid, block: &[u8]) -> Result<Vec<Cid>, UnixfsError> {
    let bad = |reason: &str| UnixfsError::InvalidDagPb { cid: *cid, reason: reason.to_string() };
    let mut out = Vec::new();
    let mut rest = block;
    while !rest.is_empty() {
        let (field, wire_type, r) = wire::read_key(rest).ok_or_else(|| bad("invalid field key"))?;
        rest = if (field, wire_type) == (2, wire::LEN) {
            let (link, r) = wire::read_len_delimited(r).ok_or_else(|| bad("link past the end of the block"))?;
            out.push(link_hash(cid, link)?);
            r
        } else {
            wire::skip(r, field, wire_type).ok_or_else(|| bad("malformed field"))?
        };
    }
    Ok(out)
}

/// The `Hash` of one encoded PbLink (the last one, as protobuf merges repeated scalars).
fn link_hash(cid: &Cid, mut link: &[u8]) -> Result<Cid, UnixfsError> {
    let bad = |reason: String| UnixfsError::InvalidDagPb { cid: *cid, reason };
    let mut hash = None;
    while !link.is_empty() {
        let (field, wire_type, r) = wire::read_key(link).ok_or_else(|| bad("invalid link field key".into()))?;
        link = if (field, wire_type) == (1, wire::LEN) {
            let (bytes, r) = wire::read_len_delimited(r).ok_or_else(|| bad("link field past the end".into()))?;
            hash = Some(bytes);
            r
        } else {
            wire::skip(r, field, wire_type).ok_or_else(|| bad("malformed link field".into()))?
        };
    }
    let hash = hash.ok_or_else(|| bad("link without Hash".into()))?;
    exact_cid(hash).map_err(|reason| bad(format!("bad link CID: {reason}")))
}

/// Protobuf wire reading for the scans that must never refuse what prost's full decode accepts
/// ([`link_cids`], the bitswap item count): every rule here is prost's or more lenient.
pub(crate) mod wire {
    /// Wire type of length-delimited fields (bytes, strings, messages).
    pub(crate) const LEN: u8 = 2;
    /// Group nesting we follow; prost stops at 100, so we never refuse what it accepts.
    const MAX_GROUP_DEPTH: usize = 128;

    /// Reads a varint: at most 10 bytes, the tenth 0 or 1 (as prost: more would overflow u64).
    pub(crate) fn read_varint(buf: &[u8]) -> Option<(u64, &[u8])> {
        let mut value = 0u64;
        for (i, &byte) in buf.iter().enumerate().take(10) {
            if i == 9 && byte > 1 {
                return None;
            }
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Some((value, &buf[i + 1..]));
            }
        }
        None
    }

    /// Reads a field key: field number, wire type, rest.
    pub(crate) fn read_key(buf: &[u8]) -> Option<(u32, u8, &[u8])> {
        let (key, rest) = read_varint(buf)?;
        let key = u32::try_from(key).ok()?;
        let (field, wire_type) = (key >> 3, (key & 7) as u8);
        (field != 0 && wire_type <= 5).then_some((field, wire_type, rest))
    }

    /// Reads a length-delimited value: its bytes and the rest.
    pub(crate) fn read_len_delimited(buf: &[u8]) -> Option<(&[u8], &[u8])> {
        let (len, rest) = read_varint(buf)?;
        let len = usize::try_from(len).ok().filter(|&len| len <= rest.len())?;
        Some(rest.split_at(len))
    }

    /// Skips the value of a field whose key was just read; returns the rest.
    pub(crate) fn skip(buf: &[u8], field: u32, wire_type: u8) -> Option<&[u8]> {
        skip_nested(buf, field, wire_type, 0)
    }

    fn skip_nested(buf: &[u8], field: u32, wire_type: u8, depth: usize) -> Option<&[u8]> {
        match wire_type {
            0 => read_varint(buf).map(|(_, rest)| rest),
            1 => buf.get(8..),
            LEN => read_len_delimited(buf).map(|(_, rest)| rest),
            3 if depth < MAX_GROUP_DEPTH => {
                let mut rest = buf;
                loop {
                    let (inner, inner_type, r) = read_key(rest)?;
                    if inner_type == 4 {
                        return (inner == field).then_some(r);
                    }
                    rest = skip_nested(r, inner, inner_type, depth + 1)?;
                }
            }
            5 => buf.get(4..),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use multihash_codetable::{Code, MultihashDigest};

    #[test]
    fn varint_lengths_match_encoding() {
        for v in [0u64, 1, 127, 128, 16383, 16384, 262144, u32::MAX as u64, u64::MAX] {
            let mut buf = Vec::new();
            put_varint(&mut buf, v);
            assert_eq!(buf.len(), varint_len(v), "{v}");
            assert_eq!(wire::read_varint(&buf), Some((v, &[][..])));
            let mut back = vec![0u8; 12];
            let start = put_varint_before(&mut back, 12, v);
            assert_eq!(&back[start..], &buf[..]);
        }
    }

    #[test]
    fn links_are_written_before_data_and_decode_back() {
        let child = Cid::new_v0(Code::Sha2_256.digest(b"child")).unwrap();
        let link = LinkRef { cid: &child, name: "", tsize: 42 };
        let bytes = encode_node([link].into_iter(), Some(b"\x08\x02"));
        assert_eq!(bytes[0], 0x12, "links first");
        // Empty Name is still written (0x12 0x00), as go-merkledag does.
        assert_eq!(&bytes[2..4], &[0x0a, 0x22]);
        assert_eq!(&bytes[2 + 2 + 34..2 + 2 + 34 + 2], &[0x12, 0x00]);
        let node = DecodedNode::decode(&child, Bytes::from(bytes.clone())).unwrap();
        assert_eq!(node.links, vec![DecodedLink { cid: child, name: String::new(), tsize: Some(42) }]);
        assert_eq!(node.data.as_deref(), Some(&b"\x08\x02"[..]));
        assert_eq!(link_cids(&child, &bytes).unwrap(), vec![child]);
    }

    /// A PbNode of raw `links` (each an encoded PbLink) and no Data.
    fn node_of(links: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for link in links {
            out.push(0x12);
            put_varint(&mut out, link.len() as u64);
            out.extend_from_slice(link);
        }
        out
    }

    fn hash_field(cid: &Cid) -> Vec<u8> {
        let mut out = vec![0x0a];
        put_varint(&mut out, cid.encoded_len() as u64);
        out.extend(cid.to_bytes());
        out
    }

    /// The fast path and the decoder must name the same links.
    fn both(block: &[u8]) -> (Result<Vec<Cid>, UnixfsError>, Result<Vec<Cid>, UnixfsError>) {
        let parent = Cid::new_v0(Code::Sha2_256.digest(block)).unwrap();
        let decoded = DecodedNode::decode(&parent, Bytes::copy_from_slice(block)).map(|n| n.links.into_iter().map(|l| l.cid).collect());
        (link_cids(&parent, block), decoded)
    }

    #[test]
    fn link_with_two_hashes_names_the_same_child_for_gc_and_the_exporter() {
        // Protobuf keeps the last value of a repeated scalar field; the fast path used to take
        // the first, so GC kept one child and the exporter read the other.
        let first = Cid::new_v0(Code::Sha2_256.digest(b"first")).unwrap();
        let last = Cid::new_v0(Code::Sha2_256.digest(b"last")).unwrap();
        let block = node_of(&[[hash_field(&first), hash_field(&last)].concat()]);
        let (fast, decoded) = both(&block);
        assert_eq!(decoded.unwrap(), vec![last]);
        assert_eq!(fast.unwrap(), vec![last]);
    }

    #[test]
    fn unknown_fields_are_skipped_by_the_fast_path_as_by_the_decoder() {
        let child = Cid::new_v0(Code::Sha2_256.digest(b"child")).unwrap();
        // PbLink with a fixed64 field 7 and a group 9; PbNode with a varint field 5 and a
        // fixed32 field 6. The decoder skips them; the fast path used to refuse the block.
        let mut link = hash_field(&child);
        link.extend([0x39, 1, 2, 3, 4, 5, 6, 7, 8, 0x4b, 0x08, 0x01, 0x4c]);
        let mut block = node_of(&[link]);
        block.extend([0x28, 0x96, 0x01, 0x35, 1, 2, 3, 4]);
        let (fast, decoded) = both(&block);
        assert_eq!(decoded.unwrap(), vec![child]);
        assert_eq!(fast.unwrap(), vec![child]);
    }

    #[test]
    fn link_hash_with_trailing_bytes_is_refused() {
        // `Cid::try_from` stops after the CID: `<cid> 00` named the same child as `<cid>`.
        let child = Cid::new_v0(Code::Sha2_256.digest(b"child")).unwrap();
        let mut hash = child.to_bytes();
        hash.push(0);
        let mut link = vec![0x0a, hash.len() as u8];
        link.extend(hash);
        let (fast, decoded) = both(&node_of(&[link]));
        assert!(matches!(decoded, Err(UnixfsError::InvalidDagPb { ref reason, .. }) if reason.contains("trailing")), "{decoded:?}");
        assert!(fast.is_err());
    }

    #[test]
    fn varint_overflowing_u64_is_refused_like_prost_does() {
        assert_eq!(wire::read_varint(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]), Some((u64::MAX, &[][..])));
        assert_eq!(wire::read_varint(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]), None);
        assert_eq!(wire::read_varint(&[0x80; 10]), None);
    }

    #[test]
    fn file_leaf_matches_go_unixfs_bytes() {
        for data in [&b""[..], b"hello\n", &[7u8; 300][..]] {
            let mut buf = BytesMut::zeroed(LEAF_HEADER_ROOM);
            buf.extend_from_slice(data);
            let leaf = finish_file_leaf(buf);
            // Reference: the same message through prost (tag order equals canonical order here,
            // as a leaf has no links).
            let unixfs = Data {
                r#type: DataType::File as i32,
                data: (!data.is_empty()).then(|| Bytes::copy_from_slice(data)),
                filesize: Some(data.len() as u64),
                ..Default::default()
            };
            let node = PbNode { links: vec![], data: Some(unixfs.encode_to_vec().into()) };
            assert_eq!(leaf, Bytes::from(node.encode_to_vec()), "{} bytes", data.len());
        }
    }

    #[test]
    fn hello_leaf_has_kubos_cid() {
        let mut buf = BytesMut::zeroed(LEAF_HEADER_ROOM);
        buf.extend_from_slice(b"hello\n");
        let leaf = finish_file_leaf(buf);
        let cid = Cid::new_v0(Code::Sha2_256.digest(&leaf)).unwrap();
        assert_eq!(cid.to_string(), "QmZULkCELmmk5XNfCgTnCyFgAVxBRBXyDHGGMVoLFLiXEN");
    }

    #[test]
    fn empty_directory_has_kubos_cid() {
        let bytes = encode_node(std::iter::empty(), Some(DIRECTORY_DATA));
        let cid = Cid::new_v0(Code::Sha2_256.digest(&bytes)).unwrap();
        assert_eq!(cid.to_string(), "QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn");
    }
}
