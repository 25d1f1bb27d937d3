//! A minimal CBOR reader for the two places that need one: the CAR v1 header and finding the
//! links (tag 42) of dag-cbor blocks during DAG walks.
//!
//! Specs: RFC 8949 (CBOR) and dag-cbor (<https://ipld.io/specs/codecs/dag-cbor/spec/>): a link
//! is tag 42 around a byte string holding 0x00 (the identity multibase prefix) + CID bytes;
//! indefinite-length items are not allowed.

use cid::Cid;

/// Nesting deeper than this is refused rather than risking the stack.
const MAX_DEPTH: usize = 256;

/// Reads CBOR items from a byte slice.
#[derive(Debug)]
pub(crate) struct Decoder<'a> {
    data: &'a [u8],
}

/// CBOR major types.
pub(crate) const MAJOR_UINT: u8 = 0;
pub(crate) const MAJOR_BYTES: u8 = 2;
pub(crate) const MAJOR_TEXT: u8 = 3;
pub(crate) const MAJOR_ARRAY: u8 = 4;
pub(crate) const MAJOR_MAP: u8 = 5;
pub(crate) const MAJOR_TAG: u8 = 6;
/// The dag-cbor tag of a CID.
pub(crate) const TAG_CID: u64 = 42;

impl<'a> Decoder<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Decoder { data }
    }

    /// Bytes not read yet.
    pub(crate) fn remaining(&self) -> &'a [u8] {
        self.data
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.data.len() < n {
            return Err("unexpected end of CBOR data".into());
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(head)
    }

    /// The next item's major type and argument (a length, a value or a tag number).
    pub(crate) fn head(&mut self) -> Result<(u8, u64), String> {
        let first = self.take(1)?[0];
        let major = first >> 5;
        let info = first & 0x1f;
        let arg = match info {
            0..=23 => u64::from(info),
            24 => u64::from(self.take(1)?[0]),
            25 => u64::from(u16::from_be_bytes(self.take(2)?.try_into().map_err(|_| "short")?)),
            26 => u64::from(u32::from_be_bytes(self.take(4)?.try_into().map_err(|_| "short")?)),
            27 => u64::from_be_bytes(self.take(8)?.try_into().map_err(|_| "short")?),
            31 => return Err("indefinite-length items are not allowed in dag-cbor".into()),
            _ => return Err(format!("reserved CBOR additional info {info}")),
        };
        Ok((major, arg))
    }

    /// The next item, which must be of `major` type; returns its argument.
    pub(crate) fn expect(&mut self, major: u8, what: &str) -> Result<u64, String> {
        let (found, arg) = self.head()?;
        if found != major {
            return Err(format!("expected {what}, found CBOR major type {found}"));
        }
        Ok(arg)
    }

    /// A text string.
    pub(crate) fn text(&mut self) -> Result<&'a str, String> {
        let len = self.expect(MAJOR_TEXT, "a text string")?;
        let bytes = self.take(usize::try_from(len).map_err(|_| "string too long")?)?;
        std::str::from_utf8(bytes).map_err(|_| "text string is not UTF-8".to_string())
    }

    /// A tag-42 CID.
    pub(crate) fn cid(&mut self) -> Result<Cid, String> {
        let tag = self.expect(MAJOR_TAG, "a CID (tag 42)")?;
        if tag != TAG_CID {
            return Err(format!("expected tag 42 (CID), found tag {tag}"));
        }
        self.cid_body()
    }

    /// The byte string of a CID whose tag 42 was already read.
    fn cid_body(&mut self) -> Result<Cid, String> {
        let len = self.expect(MAJOR_BYTES, "the bytes of a CID")?;
        let bytes = self.take(usize::try_from(len).map_err(|_| "CID too long")?)?;
        match bytes.split_first() {
            Some((0, cid)) => Cid::try_from(cid).map_err(|e| format!("invalid CID: {e}")),
            _ => Err("a CID in dag-cbor must start with the 0x00 multibase prefix".into()),
        }
    }

    /// Skips one item, collecting every CID inside it into `links`.
    pub(crate) fn skip(&mut self, links: &mut Vec<Cid>, depth: usize) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err("CBOR nesting too deep".into());
        }
        let (major, arg) = self.head()?;
        match major {
            MAJOR_UINT | 1 | 7 => Ok(()),
            MAJOR_BYTES | MAJOR_TEXT => self.take(usize::try_from(arg).map_err(|_| "item too long")?).map(|_| ()),
            MAJOR_ARRAY => (0..arg).try_for_each(|_| self.skip(links, depth + 1)),
            MAJOR_MAP => (0..arg).try_for_each(|_| {
                self.skip(links, depth + 1)?;
                self.skip(links, depth + 1)
            }),
            MAJOR_TAG if arg == TAG_CID => {
                links.push(self.cid_body()?);
                Ok(())
            }
            MAJOR_TAG => self.skip(links, depth + 1),
            _ => unreachable!("a major type has three bits"),
        }
    }
}

/// Every CID a dag-cbor block links to, in document order.
pub(crate) fn links(block: &[u8]) -> Result<Vec<Cid>, String> {
    let mut decoder = Decoder::new(block);
    let mut links = Vec::new();
    decoder.skip(&mut links, 0)?;
    if !decoder.remaining().is_empty() {
        return Err("trailing bytes after the dag-cbor item".into());
    }
    Ok(links)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_found_anywhere_in_a_document() {
        let cid = Cid::try_from("bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku").unwrap();
        let cid_bytes = cid.to_bytes();
        // {"a": [1, 42(h'00' + cid)], "b": "x"}
        let mut doc = vec![0xa2, 0x61, b'a', 0x82, 0x01, 0xd8, 0x2a, 0x58, (cid_bytes.len() + 1) as u8, 0x00];
        doc.extend_from_slice(&cid_bytes);
        doc.extend_from_slice(&[0x61, b'b', 0x61, b'x']);
        assert_eq!(links(&doc).unwrap(), vec![cid]);
        assert!(links(&doc[..doc.len() - 1]).is_err());
        assert!(links(&[0x9f, 0xff]).is_err(), "indefinite length refused");
    }
}
