//! Bytes on the wire: the bitswap protocol ids, the stream upgrade that reports which version
//! was negotiated, and the frame codec (an unsigned-varint length prefix, then one protobuf
//! `Message`), exactly as boxo's `msgio.NewVarintReaderSize` / `msgio.NewVarintWriter` do.

use std::io;

use bytes::{Bytes, BytesMut};
use futures::future::{ready, Ready};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::core::upgrade::{InboundUpgrade, OutboundUpgrade, UpgradeInfo};
use libp2p::swarm::{Stream, StreamProtocol};

/// `/ipfs/bitswap/1.2.0`: adds want-have, HAVE / DONT_HAVE and `sendDontHave`.
pub const PROTOCOL_1_2_0: StreamProtocol = StreamProtocol::new("/ipfs/bitswap/1.2.0");
/// `/ipfs/bitswap/1.1.0`: blocks carry their CID prefix (`payload`).
pub const PROTOCOL_1_1_0: StreamProtocol = StreamProtocol::new("/ipfs/bitswap/1.1.0");
/// `/ipfs/bitswap/1.0.0`: bare blocks (CIDv0 implied).
pub const PROTOCOL_1_0_0: StreamProtocol = StreamProtocol::new("/ipfs/bitswap/1.0.0");
/// `/ipfs/bitswap`: the unversioned id of the first go-ipfs releases, spoken like 1.0.0.
pub const PROTOCOL_LEGACY: StreamProtocol = StreamProtocol::new("/ipfs/bitswap");

/// Every protocol id we accept, newest first: the order in which we propose them outbound.
pub const PROTOCOLS: [StreamProtocol; 4] = [PROTOCOL_1_2_0, PROTOCOL_1_1_0, PROTOCOL_1_0_0, PROTOCOL_LEGACY];

/// The wire version of a stream; it decides how a message is encoded for that stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    /// 1.0.0 and the unversioned id: blocks in `blocks`, no presences, no want-have.
    V1_0_0,
    /// 1.1.0: blocks in `payload` with their CID prefix, no presences, no want-have.
    V1_1_0,
    /// 1.2.0: everything.
    V1_2_0,
}

impl Version {
    /// The version spoken on a negotiated protocol id.
    pub fn from_protocol(protocol: &StreamProtocol) -> Option<Version> {
        match protocol.as_ref() {
            "/ipfs/bitswap/1.2.0" => Some(Version::V1_2_0),
            "/ipfs/bitswap/1.1.0" => Some(Version::V1_1_0),
            "/ipfs/bitswap/1.0.0" | "/ipfs/bitswap" => Some(Version::V1_0_0),
            _ => None,
        }
    }

    /// Whether the remote understands want-have and answers with HAVE / DONT_HAVE.
    pub fn supports_have(self) -> bool {
        self >= Version::V1_2_0
    }
}

/// The stream upgrade for every bitswap protocol id; its output is the stream and the version
/// that multistream-select settled on.
#[derive(Debug, Clone, Default)]
pub struct BitswapProtocol;

impl UpgradeInfo for BitswapProtocol {
    type Info = StreamProtocol;
    type InfoIter = std::array::IntoIter<StreamProtocol, 4>;

    fn protocol_info(&self) -> Self::InfoIter {
        PROTOCOLS.into_iter()
    }
}

impl InboundUpgrade<Stream> for BitswapProtocol {
    type Output = (Stream, Version);
    type Error = std::convert::Infallible;
    type Future = Ready<Result<Self::Output, Self::Error>>;

    fn upgrade_inbound(self, stream: Stream, protocol: StreamProtocol) -> Self::Future {
        // `protocol_info` only offers ids that `from_protocol` knows.
        ready(Ok((stream, Version::from_protocol(&protocol).unwrap_or(Version::V1_0_0))))
    }
}

impl OutboundUpgrade<Stream> for BitswapProtocol {
    type Output = (Stream, Version);
    type Error = std::convert::Infallible;
    type Future = Ready<Result<Self::Output, Self::Error>>;

    fn upgrade_outbound(self, stream: Stream, protocol: StreamProtocol) -> Self::Future {
        ready(Ok((stream, Version::from_protocol(&protocol).unwrap_or(Version::V1_0_0))))
    }
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The peer announced a frame larger than we accept (Kubo's own limit is 4 MiB).
    #[error("bitswap frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The announced length.
        len: usize,
        /// Our limit.
        max: usize,
    },
    /// The length prefix is not a valid unsigned varint (too long).
    #[error("invalid varint length prefix")]
    InvalidLength,
    /// The stream ended in the middle of a frame.
    #[error("stream closed in the middle of a frame")]
    Truncated,
    /// The frame carries more wantlist entries, blocks and presences than we decode.
    #[error("bitswap message carries more than {max} wantlist entries, blocks and presences")]
    TooManyItems {
        /// Our limit.
        max: usize,
    },
    /// The frame is not a bitswap protobuf message.
    #[error("malformed bitswap message: {0}")]
    Decode(#[from] prost::DecodeError),
    /// Reading or writing the stream failed.
    #[error("stream error: {0}")]
    Io(#[from] io::Error),
    /// No frame arrived, or could be written, in time.
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
}

/// First buffer for a frame body; as bytes arrive it grows to [`GROWTH`] times what it holds,
/// up to the announced length.
const FIRST_READ: usize = 64 << 10;

/// How much a full frame buffer grows by: a peer makes us hold at most this many times the
/// bytes it sent (and at least [`FIRST_READ`]). With 8, a 256 KiB block in its envelope (Kubo's
/// chunks; just over 4 x 64 KiB) takes one reallocation instead of three (64 -> 128 -> 256 KiB
/// -> the rest: ~450 KiB copied per block).
const GROWTH: usize = 8;

/// Reads one frame's body. `Ok(None)` is a clean end of stream between frames.
///
/// The length is checked against `max` before anything is allocated, and the buffer grows
/// only as the bytes arrive: a peer that announces `max` bytes and sends a few makes us
/// allocate a few KiB, not `max`, per stream.
pub async fn read_frame<R: AsyncRead + Unpin>(io: &mut R, max: usize) -> Result<Option<Bytes>, FrameError> {
    let mut len: u64 = 0;
    let mut byte = [0u8; 1];
    for i in 0..10 {
        match io.read(&mut byte).await? {
            0 if i == 0 => return Ok(None),
            0 => return Err(FrameError::Truncated),
            _ => {}
        }
        let b = byte[0];
        if i == 9 && b > 1 {
            return Err(FrameError::InvalidLength);
        }
        len |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            // Unsigned-varint requires minimal encoding: a trailing zero byte is not allowed.
            if b == 0 && i > 0 {
                return Err(FrameError::InvalidLength);
            }
            let len = usize::try_from(len).map_err(|_| FrameError::InvalidLength)?;
            if len > max {
                return Err(FrameError::TooLarge { len, max });
            }
            return read_body(io, len).await.map(|body| Some(Bytes::from(body)));
        }
    }
    Err(FrameError::InvalidLength)
}

/// Reads exactly `len` bytes, growing the buffer (zeroed once, reserved exactly) as they come.
async fn read_body<R: AsyncRead + Unpin>(io: &mut R, len: usize) -> Result<Vec<u8>, FrameError> {
    let mut buf = Vec::new();
    let mut filled = 0;
    while filled < len {
        if filled == buf.len() {
            let size = next_buffer_len(filled, len);
            buf.reserve_exact(size - filled);
            buf.resize(size, 0);
        }
        match io.read(&mut buf[filled..]).await {
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    Ok(buf)
}

/// The size a full body buffer holding `filled` of `len` bytes grows to.
fn next_buffer_len(filled: usize, len: usize) -> usize {
    len.min(filled.saturating_mul(GROWTH).max(FIRST_READ))
}

/// Writes one already length-prefixed frame and flushes it.
pub(crate) async fn write_frame<W: AsyncWrite + Unpin>(io: &mut W, frame: &[u8]) -> Result<(), FrameError> {
    io.write_all(frame).await?;
    io.flush().await?;
    Ok(())
}

/// Prepends the unsigned-varint length of `body`'s `len` to a buffer.
pub(crate) fn put_length_prefix(buf: &mut BytesMut, len: usize) {
    let mut tmp = unsigned_varint::encode::usize_buffer();
    buf.extend_from_slice(unsigned_varint::encode::usize(len, &mut tmp));
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;
    use futures::io::Cursor;

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut buf = BytesMut::new();
        put_length_prefix(&mut buf, body.len());
        buf.extend_from_slice(body);
        buf.to_vec()
    }

    #[test]
    fn frames_round_trip_and_end_cleanly() {
        let mut bytes = frame(b"hello");
        bytes.extend(frame(&[7u8; 300]));
        let mut io = Cursor::new(bytes);
        assert_eq!(block_on(read_frame(&mut io, 1024)).unwrap().unwrap(), Bytes::from_static(b"hello"));
        assert_eq!(block_on(read_frame(&mut io, 1024)).unwrap().unwrap().len(), 300);
        assert!(block_on(read_frame(&mut io, 1024)).unwrap().is_none());
    }

    #[test]
    fn oversized_frame_is_refused_before_reading_its_body() {
        let mut io = Cursor::new(frame(&[0u8; 2000]));
        let err = block_on(read_frame(&mut io, 1000)).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len: 2000, max: 1000 }), "{err}");
        assert!(err.to_string().contains("exceeds the limit"));
        // Only the prefix was consumed.
        assert_eq!(io.position(), 2);
    }

    #[test]
    fn truncated_and_overlong_prefixes_are_errors() {
        let mut io = Cursor::new(vec![10u8, 1, 2, 3]);
        assert!(matches!(block_on(read_frame(&mut io, 100)), Err(FrameError::Truncated)));
        let mut io = Cursor::new(vec![0xffu8; 12]);
        assert!(matches!(block_on(read_frame(&mut io, usize::MAX)), Err(FrameError::InvalidLength)));
        let mut io = Cursor::new(vec![0x80u8]);
        assert!(matches!(block_on(read_frame(&mut io, 100)), Err(FrameError::Truncated)));
    }

    #[test]
    fn a_frame_buffer_grows_in_proportion_to_the_bytes_received() {
        for len in [1, 1000, FIRST_READ, FIRST_READ + 1, 262_158, 1 << 20, 4 << 20] {
            let (mut filled, mut sizes) = (0, vec![]);
            while filled < len {
                let next = next_buffer_len(filled, len);
                assert!(next > filled && next <= len, "{filled} of {len} -> {next}");
                assert!(next <= (filled * GROWTH).max(FIRST_READ), "{filled} of {len} -> {next}: more than {GROWTH}x");
                sizes.push(next);
                filled = next;
            }
            // A block of Kubo's (a 256 KiB chunk in its envelope) is read with one reallocation.
            if len == 262_158 {
                assert_eq!(sizes, [FIRST_READ, len]);
            }
        }
    }

    #[test]
    fn protocol_ids_map_to_versions() {
        assert_eq!(Version::from_protocol(&PROTOCOL_LEGACY), Some(Version::V1_0_0));
        assert_eq!(Version::from_protocol(&PROTOCOL_1_1_0), Some(Version::V1_1_0));
        assert!(Version::from_protocol(&PROTOCOL_1_2_0).unwrap().supports_have());
        assert!(!Version::V1_1_0.supports_have());
    }
}
