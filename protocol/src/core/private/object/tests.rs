//! The `kbobj1` format: round trips at every size that matters (empty, one byte, a chunk
//! boundary either side, several chunks, pieces of any size), and every way of damaging an
//! object (truncated, extended, reordered, spliced, a flipped bit anywhere, the wrong key)
//! gives its error, never a panic nor wrong plaintext. `PROPTEST_CASES` sets the number of
//! property cases (256 by default: each encrypts up to 300 KiB).

use proptest::prelude::*;

use super::*;

fn key(byte: u8) -> ObjectKey {
    ObjectKey::new([byte; 8], [byte; KEY_LEN])
}

fn plain(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8).collect()
}

/// Decrypts with `key` whatever key id the header names.
fn open_with(sealed: &[u8], key: &ObjectKey) -> Result<Vec<u8>, ObjectError> {
    open(sealed, |_| Ok::<_, ObjectError>(key.clone()))
}

/// Encrypts and decrypts, pushing pieces of `piece` bytes.
fn round_trip_in_pieces(data: &[u8], piece: usize) -> Result<Vec<u8>, ObjectError> {
    let k = key(1);
    let mut encryptor = Encryptor::new(&k);
    let mut sealed = Vec::new();
    for part in data.chunks(piece.max(1)) {
        encryptor.update(part, &mut sealed)?;
    }
    encryptor.finish(&mut sealed)?;
    assert_eq!(sealed.len() as u64, sealed_len(data.len() as u64), "sealed_len");
    let header = Header::parse(&sealed)?;
    assert_eq!(header.key_id, k.id);
    let mut decryptor = Decryptor::new(&header, &k);
    let mut out = Vec::new();
    for part in sealed[HEADER_LEN..].chunks(piece.max(1)) {
        decryptor.update(part, &mut out)?;
    }
    decryptor.finish(&mut out)?;
    Ok(out)
}

#[test]
fn objects_of_every_boundary_size_round_trip() -> Result<(), ObjectError> {
    for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK + 17, 300 * 1024] {
        let data = plain(len, 7);
        let sealed = seal(&key(1), &data)?;
        assert_eq!(sealed.len() as u64, sealed_len(len as u64), "length of {len}");
        assert!(is_private_object(&sealed));
        assert_eq!(open_with(&sealed, &key(1))?, data, "whole, {len} bytes");
        for piece in [1, 1000, CHUNK, CHUNK + TAG_LEN + 1] {
            if len <= 3 * CHUNK || piece > 1 {
                assert_eq!(round_trip_in_pieces(&data, piece)?, data, "{len} bytes in pieces of {piece}");
            }
        }
    }
    Ok(())
}

#[test]
fn the_reader_gives_the_same_object_as_the_encryptor_would() -> std::io::Result<()> {
    for len in [0, 1, CHUNK, CHUNK + 1, 5 * CHUNK] {
        let data = plain(len, 3);
        let mut sealed = Vec::new();
        EncryptingReader::new(&data[..], &key(2)).read_to_end(&mut sealed)?;
        assert_eq!(sealed.len() as u64, sealed_len(len as u64), "{len}");
        assert_eq!(open_with(&sealed, &key(2)).map_err(std::io::Error::other)?, data, "{len}");
    }
    Ok(())
}

#[test]
fn encrypting_in_chunks_gives_an_object_that_opens() -> std::io::Result<()> {
    for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK] {
        let data = plain(len, 5);
        let mut sealed = Vec::new();
        encrypt_chunks(&data[..], &key(3), |piece| {
            sealed.extend_from_slice(&piece);
            true
        })?;
        assert_eq!(sealed.len() as u64, sealed_len(len as u64), "{len}");
        assert_eq!(open_with(&sealed, &key(3)).map_err(std::io::Error::other)?, data, "{len}");
    }
    Ok(())
}

#[test]
fn the_same_file_encrypts_differently_each_time() -> Result<(), ObjectError> {
    let data = plain(1000, 0);
    assert_ne!(seal(&key(1), &data)?, seal(&key(1), &data)?, "a fresh nonce prefix per object");
    Ok(())
}

#[test]
fn the_wrong_key_is_refused_at_the_first_chunk() -> Result<(), ObjectError> {
    let sealed = seal(&key(1), &plain(3 * CHUNK, 1))?;
    assert_eq!(open_with(&sealed, &key(9)), Err(ObjectError::Tampered { chunk: 0 }));
    Ok(())
}

#[test]
fn truncated_and_extended_objects_are_refused() -> Result<(), ObjectError> {
    let data = plain(3 * CHUNK + 100, 2);
    let sealed = seal(&key(1), &data)?;
    let chunk = |i: usize| HEADER_LEN + i * (CHUNK + TAG_LEN);
    // Cut at a chunk boundary: the chunk before is not flagged last.
    assert_eq!(open_with(&sealed[..chunk(3)], &key(1)), Err(ObjectError::Tampered { chunk: 2 }));
    assert_eq!(open_with(&sealed[..chunk(1)], &key(1)), Err(ObjectError::Tampered { chunk: 0 }));
    // Cut inside a chunk, inside the last tag, right after the header, inside the header.
    assert!(matches!(open_with(&sealed[..chunk(1) + 500], &key(1)), Err(ObjectError::Tampered { chunk: 1 })));
    assert!(matches!(open_with(&sealed[..sealed.len() - 1], &key(1)), Err(ObjectError::Tampered { chunk: 3 })));
    assert_eq!(open_with(&sealed[..HEADER_LEN], &key(1)), Err(ObjectError::Truncated));
    assert_eq!(open_with(&sealed[..HEADER_LEN + TAG_LEN - 1], &key(1)), Err(ObjectError::Truncated));
    assert_eq!(open_with(&sealed[..10], &key(1)), Err(ObjectError::Truncated));
    assert_eq!(open_with(&sealed[..3], &key(1)), Err(ObjectError::Truncated));
    // Bytes appended after the last chunk: the last chunk is then read as a middle one.
    let mut extended = sealed.clone();
    extended.extend_from_slice(&[0u8; TAG_LEN]);
    assert_eq!(open_with(&extended, &key(1)), Err(ObjectError::Tampered { chunk: 3 }));
    // An empty object cut to its header.
    let empty = seal(&key(1), &[])?;
    assert_eq!(empty.len(), HEADER_LEN + TAG_LEN);
    assert_eq!(open_with(&empty[..HEADER_LEN], &key(1)), Err(ObjectError::Truncated));
    Ok(())
}

#[test]
fn reordered_duplicated_and_spliced_chunks_are_refused() -> Result<(), ObjectError> {
    let sealed = seal(&key(1), &plain(3 * CHUNK + 100, 4))?;
    let other = seal(&key(1), &plain(3 * CHUNK + 100, 5))?;
    let span = |i: usize| HEADER_LEN + i * (CHUNK + TAG_LEN)..HEADER_LEN + (i + 1) * (CHUNK + TAG_LEN);
    let mut swapped = sealed.clone();
    swapped[span(0)].copy_from_slice(&sealed[span(1)]);
    swapped[span(1)].copy_from_slice(&sealed[span(0)]);
    assert_eq!(open_with(&swapped, &key(1)), Err(ObjectError::Tampered { chunk: 0 }));
    let mut duplicated = sealed.clone();
    duplicated[span(1)].copy_from_slice(&sealed[span(0)]);
    assert_eq!(open_with(&duplicated, &key(1)), Err(ObjectError::Tampered { chunk: 1 }));
    // A chunk of another object under the same key (another nonce prefix).
    let mut spliced = sealed.clone();
    spliced[span(2)].copy_from_slice(&other[span(2)]);
    assert_eq!(open_with(&spliced, &key(1)), Err(ObjectError::Tampered { chunk: 2 }));
    // Another object's header on these chunks.
    let mut reheaded = sealed.clone();
    reheaded[..HEADER_LEN].copy_from_slice(&other[..HEADER_LEN]);
    assert_eq!(open_with(&reheaded, &key(1)), Err(ObjectError::Tampered { chunk: 0 }));
    Ok(())
}

#[test]
fn headers_that_are_not_kbobj1_are_told_apart() {
    assert_eq!(Header::parse(b""), Err(ObjectError::NotPrivate));
    assert_eq!(Header::parse(b"hello, world: a plain file of some length"), Err(ObjectError::NotPrivate));
    let mut other_chunk = Header::new([1; 8], [2; PREFIX_LEN]).raw;
    other_chunk[6] = 20;
    assert_eq!(Header::parse(&other_chunk), Err(ObjectError::Unsupported(20)));
}

#[test]
fn the_key_never_shows_in_debug_output() {
    let text = format!("{:?}", ObjectKey::new([0xab; 8], [0x5c; KEY_LEN]));
    assert!(text.contains("abababab") && !text.contains("5c5c"), "{text}");
}

/// The object sealed chunk by chunk with `chacha20poly1305`'s XChaCha20-Poly1305 and the
/// format's 24-byte nonces: what `ChunkCipher` must give byte for byte.
fn sealed_by_the_reference(key: &ObjectKey, header: &Header, data: &[u8]) -> Vec<u8> {
    use chacha20poly1305::aead::{AeadInPlace, KeyInit};
    use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
    let cipher = XChaCha20Poly1305::new(Key::from_slice(&key.key));
    let mut out = header.raw.to_vec();
    let chunks: Vec<&[u8]> = if data.is_empty() { vec![&[]] } else { data.chunks(CHUNK).collect() };
    for (i, chunk) in chunks.iter().enumerate() {
        let mut body = chunk.to_vec();
        let nonce = header.nonce(i as u32, i + 1 == chunks.len());
        let tag = cipher.encrypt_in_place_detached(XNonce::from_slice(&nonce), &header.raw, &mut body).expect("a chunk fits");
        out.extend_from_slice(&body);
        out.extend_from_slice(&tag);
    }
    out
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn objects_are_exactly_xchacha20_poly1305(len in 0usize..(3 * CHUNK), key_byte in any::<u8>(), prefix in any::<[u8; PREFIX_LEN]>()) {
        let k = key(key_byte);
        let data = plain(len, key_byte);
        let mut encryptor = Encryptor::with_prefix(&k, prefix);
        let mut sealed = Vec::new();
        encryptor.update(&data, &mut sealed).unwrap();
        encryptor.finish(&mut sealed).unwrap();
        let reference = sealed_by_the_reference(&k, &Header::parse(&sealed).unwrap(), &data);
        prop_assert!(sealed == reference, "differs from chacha20poly1305's XChaCha20-Poly1305 at {len} bytes");
        prop_assert_eq!(open_with(&reference, &k).unwrap(), data);
    }

    #[test]
    fn any_file_in_any_pieces_round_trips(len in 0usize..300 * 1024, piece in 1usize..200_000, seed in any::<u8>()) {
        let data = plain(len, seed);
        prop_assert_eq!(round_trip_in_pieces(&data, piece), Ok(data));
    }

    #[test]
    fn any_flipped_bit_is_refused(len in 0usize..(3 * CHUNK), at in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut sealed = seal(&key(1), &plain(len, 9)).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let i = at.index(sealed.len());
        sealed[i] ^= 1 << bit;
        let result = open_with(&sealed, &key(1));
        prop_assert!(result.is_err(), "bit {} of byte {} flipped and the object still opened", bit, i);
        if i >= HEADER_LEN {
            prop_assert!(matches!(result, Err(ObjectError::Tampered { .. })), "{:?}", result);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_never_open(bytes in proptest::collection::vec(any::<u8>(), 0..(CHUNK + 200)), with_header in any::<bool>()) {
        let mut bytes = bytes;
        if with_header && bytes.len() >= HEADER_LEN {
            bytes[..HEADER_LEN].copy_from_slice(&Header::new([1; 8], [3; PREFIX_LEN]).raw);
        }
        prop_assert!(open_with(&bytes, &key(1)).is_err());
    }

    #[test]
    fn cutting_an_object_anywhere_is_refused(len in 0usize..(3 * CHUNK), at in any::<prop::sample::Index>()) {
        let sealed = seal(&key(1), &plain(len, 11)).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let cut = at.index(sealed.len());
        prop_assert!(open_with(&sealed[..cut], &key(1)).is_err(), "cut at {} of {}", cut, sealed.len());
    }
}
