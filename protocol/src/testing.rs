//! Helpers shared by the tests of this crate and of the `kubelt` binary. Not part of the API.

/// Deterministic pseudo-random bytes (xorshift64*), so a failing test reproduces. Every seed
/// gives different bytes (the seed is spread before the low bit is forced on).
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}
