//! The gateway's trustless formats: `?format=raw` is the one block the CID names and
//! `?format=car` the DAG as a CAR v1 stream, both checked byte for byte with code that is not
//! the node's (a CBOR reader here, `sha256sum` for the hashes).
#![allow(clippy::type_complexity)]

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use cid::Cid;
use common::{kubelt_ok, pseudo_random, wait_until, TestNode};

/// Multicodecs and multihash code of the CIDs involved.
const DAG_PB: u64 = 0x70;
const RAW: u64 = 0x55;
const SHA2_256: u64 = 0x12;

/// The gateway's base URL, ending in `/`, as the node reports it.
fn gateway(node: &TestNode) -> String {
    node.gateway_url().to_string()
}

/// `GET <gateway>ipfs/<path>`: the content type and the body.
fn get(node: &TestNode, path: &str, accept: Option<&str>) -> anyhow::Result<(String, Vec<u8>)> {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(60)).build();
    let mut request = agent.get(&format!("{}ipfs/{path}", gateway(node)));
    if let Some(accept) = accept {
        request = request.set("Accept", accept);
    }
    let response = request.call().with_context(|| format!("GET /ipfs/{path}"))?;
    let content_type = response.header("content-type").unwrap_or_default().to_string();
    let mut body = Vec::new();
    response.into_reader().read_to_end(&mut body)?;
    Ok((content_type, body))
}

/// SHA-256 of `bytes`, by coreutils' `sha256sum`.
fn sha256sum(bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut child = Command::new("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().context("sha256sum")?;
    child.stdin.take().context("stdin")?.write_all(bytes)?;
    let out = child.wait_with_output()?;
    let text = String::from_utf8(out.stdout)?;
    Ok(hex::decode(text.split_whitespace().next().unwrap_or_default())?)
}

/// Checks that `data` is the block `cid` names: its SHA-256 is the CID's digest.
fn assert_names(cid: &Cid, data: &[u8]) -> anyhow::Result<()> {
    assert_eq!(cid.hash().code(), SHA2_256, "{cid}");
    assert_eq!(sha256sum(data)?, cid.hash().digest(), "the bytes served for {cid} do not hash to it");
    Ok(())
}

/// The little of CBOR a CAR v1 header uses (RFC 8949 major types 0, 2, 3, 4, 5, 6).
#[derive(Debug, PartialEq)]
enum Cbor {
    Uint(u64),
    Bytes(Vec<u8>),
    Text(String),
    Array(Vec<Cbor>),
    Map(Vec<(Cbor, Cbor)>),
    Tag(u64, Box<Cbor>),
}

fn cbor(input: &mut &[u8]) -> anyhow::Result<Cbor> {
    let (&first, rest) = input.split_first().context("CBOR: unexpected end")?;
    *input = rest;
    let (major, info) = (first >> 5, first & 0x1f);
    let mut take = |n: usize| -> anyhow::Result<&[u8]> {
        if input.len() < n {
            bail!("CBOR: unexpected end");
        }
        let (head, rest) = input.split_at(n);
        *input = rest;
        Ok(head)
    };
    let arg = match info {
        0..=23 => u64::from(info),
        24 => u64::from(take(1)?[0]),
        25 => u64::from(u16::from_be_bytes(take(2)?.try_into()?)),
        26 => u64::from(u32::from_be_bytes(take(4)?.try_into()?)),
        27 => u64::from_be_bytes(take(8)?.try_into()?),
        _ => bail!("CBOR: indefinite lengths are not DAG-CBOR"),
    };
    Ok(match major {
        0 => Cbor::Uint(arg),
        2 => Cbor::Bytes(take(arg as usize)?.to_vec()),
        3 => Cbor::Text(String::from_utf8(take(arg as usize)?.to_vec())?),
        4 => Cbor::Array((0..arg).map(|_| cbor(input)).collect::<anyhow::Result<_>>()?),
        5 => Cbor::Map((0..arg).map(|_| Ok((cbor(input)?, cbor(input)?))).collect::<anyhow::Result<_>>()?),
        6 => Cbor::Tag(arg, Box::new(cbor(input)?)),
        _ => bail!("CBOR: major type {major} is not in a CAR header"),
    })
}

fn uvarint(input: &mut &[u8]) -> anyhow::Result<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = input.split_first().context("varint: unexpected end")?;
        *input = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    bail!("varint too long")
}

/// A CAR v1 file: the header's roots, then every block in order.
fn parse_car(mut car: &[u8]) -> anyhow::Result<(Vec<Cid>, Vec<(Cid, Vec<u8>)>)> {
    let header_len = uvarint(&mut car)? as usize;
    let (mut header, mut rest) = car.split_at(header_len.min(car.len()));
    let Cbor::Map(entries) = cbor(&mut header)? else { bail!("the CAR header is not a map") };
    assert!(header.is_empty(), "bytes after the CAR header's map");
    let field = |name: &str| entries.iter().find(|(k, _)| *k == Cbor::Text(name.into())).map(|(_, v)| v);
    assert_eq!(field("version"), Some(&Cbor::Uint(1)));
    let Some(Cbor::Array(root_links)) = field("roots") else { bail!("the CAR header has no roots array") };
    let mut roots = Vec::new();
    for link in root_links {
        // A DAG-CBOR link: tag 42 around the CID's bytes behind a 0x00 (identity multibase).
        let Cbor::Tag(42, bytes) = link else { bail!("a root is not a CID link: {link:?}") };
        let Cbor::Bytes(bytes) = bytes.as_ref() else { bail!("a root link is not bytes") };
        let (&0, cid) = bytes.split_first().context("empty root link")? else { bail!("a root link lacks its 0x00 prefix") };
        roots.push(Cid::try_from(cid)?);
    }
    let mut blocks = Vec::new();
    while !rest.is_empty() {
        let len = uvarint(&mut rest)? as usize;
        if rest.len() < len {
            bail!("truncated CAR block");
        }
        let (section, after) = rest.split_at(len);
        rest = after;
        let mut reader = section;
        let cid = Cid::read_bytes(&mut reader)?;
        blocks.push((cid, reader.to_vec()));
    }
    Ok((roots, blocks))
}

#[test]
fn raw_and_car_formats_serve_the_blocks_the_cid_names() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let holder = TestNode::start(dir.path(), "holder", &[])?;
    // The gateway of a node that holds nothing yet: it fetches what it serves.
    let node = TestNode::start(dir.path(), "gateway", &["--peer", &holder.tcp_addr()])?;
    wait_until("the nodes to connect", Duration::from_secs(10), || Ok(node.connected_peers()?.contains(&holder.peer_id)))?;
    let small_path = dir.path().join("small.bin");
    let big_path = dir.path().join("big.bin");
    let small = pseudo_random(100_000, 31);
    let big = pseudo_random(3 * 1024 * 1024 + 17, 32);
    std::fs::write(&small_path, &small)?;
    std::fs::write(&big_path, &big)?;
    // CIDv1 with raw leaves: a small file is one raw block, a big one a dag-pb root over raw
    // leaves whose bytes, in order, are the file.
    let add = |path: &std::path::Path| kubelt_ok(&holder.repo, &["add", "-q", "--cid-version", "1", path.to_str().unwrap_or_default()]);
    let small_cid: Cid = add(&small_path)?.parse()?;
    let big_cid: Cid = add(&big_path)?.parse()?;
    assert_eq!((small_cid.codec(), big_cid.codec()), (RAW, DAG_PB));

    let (content_type, body) = get(&node, &format!("{small_cid}?format=raw"), None)?;
    assert_eq!(content_type, "application/vnd.ipld.raw");
    assert!(body == small, "a one-block file's raw block is the file");
    assert_names(&small_cid, &body)?;

    let (content_type, root_block) = get(&node, &format!("{big_cid}?format=raw"), None)?;
    assert_eq!(content_type, "application/vnd.ipld.raw");
    assert_names(&big_cid, &root_block)?;
    assert!(root_block.len() < 4096, "the root block only, not the file: {} bytes", root_block.len());

    let (content_type, car) = get(&node, &format!("{big_cid}?format=car"), None)?;
    assert_eq!(content_type, "application/vnd.ipld.car");
    let (roots, blocks) = parse_car(&car)?;
    assert_eq!(roots, vec![big_cid]);
    assert_eq!(blocks.len(), 1 + 13, "a root and thirteen 256 KiB leaves");
    assert_eq!(blocks[0], (big_cid, root_block), "the CAR starts with the root block");
    for (cid, data) in &blocks {
        assert_names(cid, data)?;
    }
    let leaves: Vec<u8> = blocks.iter().filter(|(cid, _)| cid.codec() == RAW).flat_map(|(_, data)| data.iter().copied()).collect();
    assert!(leaves == big, "the leaves, in the CAR's order, are the file");

    // The Accept header asks for the same thing.
    let (content_type, by_accept) = get(&node, &big_cid.to_string(), Some("application/vnd.ipld.car"))?;
    assert_eq!(content_type, "application/vnd.ipld.car");
    assert!(by_accept == car);
    Ok(())
}
