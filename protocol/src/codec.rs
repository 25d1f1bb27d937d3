//! One request-response codec for every protocol of ours whose messages are protobufs: each
//! direction of a stream carries one unsigned-varint length-prefixed message, and a length
//! over the protocol's limit is refused before a byte of the body is read (a peer cannot make
//! us allocate what it merely declares).
//!
//! A new request-response protocol names its two message types and its two limits:
//!
//! ```
//! use kubelt_protocol::codec::ProstCodec;
//! use kubelt_proto::core::{SyncRequest, SyncResponse};
//! let codec: ProstCodec<SyncRequest, SyncResponse> = ProstCodec::new(8 << 20, 40 << 20);
//! ```

use std::io;
use std::marker::PhantomData;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::request_response;
use libp2p::StreamProtocol;

/// Length-prefixed protobuf request and response, each with its size limit.
pub struct ProstCodec<Req, Resp> {
    max_request: usize,
    max_response: usize,
    messages: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> ProstCodec<Req, Resp> {
    /// A codec refusing requests over `max_request` bytes and responses over `max_response`.
    pub const fn new(max_request: usize, max_response: usize) -> Self {
        ProstCodec { max_request, max_response, messages: PhantomData }
    }
}

impl<Req, Resp> Clone for ProstCodec<Req, Resp> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<Req, Resp> Copy for ProstCodec<Req, Resp> {}

impl<Req, Resp> std::fmt::Debug for ProstCodec<Req, Resp> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProstCodec").field("max_request", &self.max_request).field("max_response", &self.max_response).finish()
    }
}

/// Reads one length-prefixed frame of at most `max` bytes.
pub async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T, protocol: &StreamProtocol, max: usize) -> io::Result<Vec<u8>> {
    let len = unsigned_varint::aio::read_usize(&mut *io).await.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if len > max {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{protocol} message of {len} bytes exceeds the {max}-byte limit")));
    }
    let mut buf = vec![0; len];
    io.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Writes one length-prefixed frame and closes the direction.
pub async fn write_frame<T: AsyncWrite + Unpin + Send>(io: &mut T, bytes: &[u8]) -> io::Result<()> {
    let mut len = unsigned_varint::encode::usize_buffer();
    io.write_all(unsigned_varint::encode::usize(bytes.len(), &mut len)).await?;
    io.write_all(bytes).await?;
    io.close().await
}

fn decode<M: prost::Message + Default>(protocol: &StreamProtocol, bytes: &[u8]) -> io::Result<M> {
    M::decode(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("malformed {protocol} message: {e}")))
}

impl<Req, Resp> request_response::Codec for ProstCodec<Req, Resp>
where
    Req: prost::Message + Default + Send + 'static,
    Resp: prost::Message + Default + Send + 'static,
{
    type Protocol = StreamProtocol;
    type Request = Req;
    type Response = Resp;

    async fn read_request<T: AsyncRead + Unpin + Send>(&mut self, protocol: &StreamProtocol, io: &mut T) -> io::Result<Req> {
        decode(protocol, &read_frame(io, protocol, self.max_request).await?)
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(&mut self, protocol: &StreamProtocol, io: &mut T) -> io::Result<Resp> {
        decode(protocol, &read_frame(io, protocol, self.max_response).await?)
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(&mut self, _: &StreamProtocol, io: &mut T, req: Req) -> io::Result<()> {
        write_frame(io, &req.encode_to_vec()).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(&mut self, _: &StreamProtocol, io: &mut T, res: Resp) -> io::Result<()> {
        write_frame(io, &res.encode_to_vec()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;
    use kubelt_proto::core::{SyncRequest, SyncResponse};
    use request_response::Codec;

    const PROTOCOL: StreamProtocol = StreamProtocol::new("/test/1.0.0");

    #[test]
    fn messages_round_trip_and_garbage_or_oversized_frames_are_refused() {
        futures::executor::block_on(async {
            let mut codec = ProstCodec::<SyncRequest, SyncResponse>::new(64, 128);
            let request = SyncRequest { core: "0xabc".into(), sync_message: vec![1, 2, 3].into(), ..Default::default() };
            let mut buf = Cursor::new(Vec::new());
            codec.write_request(&PROTOCOL, &mut buf, request.clone()).await.unwrap();
            assert_eq!(codec.read_request(&PROTOCOL, &mut Cursor::new(buf.into_inner())).await.unwrap(), request);

            let response = SyncResponse { core: "0xabc".into(), error: "x".repeat(80), ..Default::default() };
            let mut buf = Cursor::new(Vec::new());
            codec.write_response(&PROTOCOL, &mut buf, response.clone()).await.unwrap();
            let bytes = buf.into_inner();
            assert_eq!(codec.read_response(&PROTOCOL, &mut Cursor::new(bytes.clone())).await.unwrap(), response);
            // The same response is over the request limit: each direction has its own.
            let err = codec.read_request(&PROTOCOL, &mut Cursor::new(bytes)).await.unwrap_err();
            assert!(err.to_string().contains("/test/1.0.0 message of") && err.to_string().contains("exceeds the 64-byte limit"), "{err}");

            let mut garbage = Cursor::new(vec![5, 0xff, 0xff, 0xff, 0xff, 0xff]);
            let err = codec.read_request(&PROTOCOL, &mut garbage).await.unwrap_err();
            assert!(err.to_string().contains("malformed /test/1.0.0 message"), "{err}");

            // A declared length of 2^60 is refused without allocating it.
            let mut len = unsigned_varint::encode::usize_buffer();
            let huge = unsigned_varint::encode::usize(1 << 60, &mut len).to_vec();
            assert!(codec.read_request(&PROTOCOL, &mut Cursor::new(huge)).await.is_err());
            // A frame cut short is an error, not a hang.
            let mut len = unsigned_varint::encode::usize_buffer();
            let mut short = unsigned_varint::encode::usize(10, &mut len).to_vec();
            short.extend_from_slice(&[0; 4]);
            assert!(codec.read_request(&PROTOCOL, &mut Cursor::new(short)).await.is_err());
        });
    }
}
