//! Shared by the Kubo interop tests of this crate: see [`kubelt_protocol::testing::kubo`].
#![allow(dead_code)]

pub(crate) use kubelt_protocol::testing::kubo::kubo_missing;

/// A missing Kubo: an error saying how to install it, or, opted out, a recorded skip (`Ok`).
pub(crate) fn skip_or_fail(test: &str, reason: &str) -> anyhow::Result<()> {
    kubelt_protocol::testing::kubo::skip_or_fail(test, reason).map_err(anyhow::Error::msg)
}
