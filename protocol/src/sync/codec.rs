//! Wire format of `/kubelt/core-sync/1.0.0`: one unsigned-varint length-prefixed protobuf
//! (`kubelt.core.v1.SyncRequest`, then `SyncResponse`) per stream direction, through the
//! generic [`ProstCodec`](crate::codec::ProstCodec).

use kubelt_proto::core::{SyncRequest, SyncResponse};

use crate::codec::ProstCodec;

/// Largest request: a sync message (heads, bloom filter) and a few envelopes.
pub const MAX_SYNC_REQUEST_SIZE: usize = 8 << 20;
/// Largest response: a round of catch-up changes (the core logic caps a round at 32 MiB).
pub const MAX_SYNC_RESPONSE_SIZE: usize = 40 << 20;

/// Encodes and decodes core-sync messages.
pub type CoreSyncCodec = ProstCodec<SyncRequest, SyncResponse>;

/// The codec with the core-sync limits.
pub(crate) const fn codec() -> CoreSyncCodec {
    ProstCodec::new(MAX_SYNC_REQUEST_SIZE, MAX_SYNC_RESPONSE_SIZE)
}
