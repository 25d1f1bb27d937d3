//! Wire format of `/kubelt/core-sync/1.0.0`: one unsigned-varint length-prefixed protobuf
//! (`kubelt.core.v1.SyncRequest`, then `SyncResponse`) per stream direction.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use kubelt_proto::core::{SyncRequest, SyncResponse};
use kubelt_proto::Message;
use libp2p::request_response;
use libp2p::StreamProtocol;

/// Largest request: a sync message (heads, bloom filter) and a few envelopes.
pub const MAX_SYNC_REQUEST_SIZE: usize = 8 << 20;
/// Largest response: a round of catch-up changes (the core logic caps a round at 32 MiB).
pub const MAX_SYNC_RESPONSE_SIZE: usize = 40 << 20;

/// Encodes and decodes core-sync messages.
#[derive(Debug, Clone, Copy, Default)]
pub struct CoreSyncCodec;

async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T, max: usize) -> io::Result<Vec<u8>> {
    let len = unsigned_varint::aio::read_usize(&mut *io).await.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if len > max {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("core-sync message of {len} bytes exceeds the {max}-byte limit")));
    }
    let mut buf = vec![0; len];
    io.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(io: &mut T, bytes: &[u8]) -> io::Result<()> {
    let mut len = unsigned_varint::encode::usize_buffer();
    io.write_all(unsigned_varint::encode::usize(bytes.len(), &mut len)).await?;
    io.write_all(bytes).await?;
    io.close().await
}

fn invalid(e: prost::DecodeError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("malformed core-sync message: {e}"))
}

impl request_response::Codec for CoreSyncCodec {
    type Protocol = StreamProtocol;
    type Request = SyncRequest;
    type Response = SyncResponse;

    async fn read_request<T: AsyncRead + Unpin + Send>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<SyncRequest> {
        SyncRequest::decode(read_frame(io, MAX_SYNC_REQUEST_SIZE).await?.as_slice()).map_err(invalid)
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<SyncResponse> {
        SyncResponse::decode(read_frame(io, MAX_SYNC_RESPONSE_SIZE).await?.as_slice()).map_err(invalid)
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(&mut self, _: &StreamProtocol, io: &mut T, req: SyncRequest) -> io::Result<()> {
        write_frame(io, &req.encode_to_vec()).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(&mut self, _: &StreamProtocol, io: &mut T, res: SyncResponse) -> io::Result<()> {
        write_frame(io, &res.encode_to_vec()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;
    use request_response::Codec;

    #[test]
    fn requests_round_trip_and_garbage_or_oversized_frames_are_refused() {
        futures::executor::block_on(async {
            let mut codec = CoreSyncCodec;
            let protocol = super::super::CORE_SYNC_PROTOCOL;
            let request = SyncRequest { core: "0xabc".into(), sync_message: vec![1, 2, 3].into(), ..Default::default() };
            let mut buf = Cursor::new(Vec::new());
            codec.write_request(&protocol, &mut buf, request.clone()).await.unwrap();
            let mut read = Cursor::new(buf.into_inner());
            assert_eq!(codec.read_request(&protocol, &mut read).await.unwrap(), request);

            let mut garbage = Cursor::new(vec![5, 0xff, 0xff, 0xff, 0xff, 0xff]);
            assert!(codec.read_request(&protocol, &mut garbage).await.is_err());

            let mut len = unsigned_varint::encode::usize_buffer();
            let mut oversized = unsigned_varint::encode::usize(MAX_SYNC_REQUEST_SIZE + 1, &mut len).to_vec();
            oversized.extend_from_slice(&[0; 16]);
            let err = codec.read_request(&protocol, &mut Cursor::new(oversized)).await.unwrap_err();
            assert!(err.to_string().contains("exceeds"), "{err}");
        });
    }
}
