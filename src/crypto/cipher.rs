//! AES-256-GCM with a random 96-bit nonce: the one construction both layers
//! use, data keys under a key-encryption key and payloads under a data key.
//!
//! Sealed bytes are `nonce || ciphertext || tag`. Random nonces are safe far
//! beyond the number of messages one key seals before it is rotated.

use ring::{
    aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    rand::{SecureRandom, SystemRandom},
};

use super::PayloadError;

pub(super) const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;
/// What sealing adds to the plaintext.
pub(super) const OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// An AES-256-GCM key; `None` unless `material` is 32 bytes.
pub(super) fn key(material: &[u8]) -> Option<LessSafeKey> {
    UnboundKey::new(&AES_256_GCM, material)
        .ok()
        .map(LessSafeKey::new)
}

/// 32 bytes from the operating system's random generator.
pub(super) fn random_key() -> Result<[u8; KEY_LEN], PayloadError> {
    let mut material = [0; KEY_LEN];
    SystemRandom::new()
        .fill(&mut material)
        .map_err(|_| PayloadError::Random)?;
    Ok(material)
}

/// Appends `nonce || ciphertext || tag` to `out`.
pub(super) fn seal_into(
    key: &LessSafeKey,
    aad: &[u8],
    plaintext: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), PayloadError> {
    let mut nonce = [0; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| PayloadError::Random)?;
    out.reserve(OVERHEAD + plaintext.len());
    out.extend_from_slice(&nonce);
    let start = out.len();
    out.extend_from_slice(plaintext);
    let nonce = Nonce::assume_unique_for_key(nonce);
    let tag = key
        .seal_in_place_separate_tag(nonce, Aad::from(aad), &mut out[start..])
        .map_err(|_| PayloadError::Cipher)?;
    out.extend_from_slice(tag.as_ref());
    Ok(())
}

/// The plaintext, or `None` when the bytes are too short, were altered, or
/// were sealed under another key or other associated data.
pub(super) fn open(key: &LessSafeKey, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < OVERHEAD {
        return None;
    }
    let (nonce, body) = sealed.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
    let mut body = body.to_vec();
    let plaintext_len = key
        .open_in_place(nonce, Aad::from(aad), &mut body)
        .ok()?
        .len();
    body.truncate(plaintext_len);
    Some(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_bytes_open_only_with_the_same_key_and_associated_data() {
        let key_a = key(&random_key().unwrap()).unwrap();
        let key_b = key(&random_key().unwrap()).unwrap();
        let mut sealed = Vec::new();
        seal_into(&key_a, b"row 1", b"secret bytes", &mut sealed).unwrap();

        assert_eq!(sealed.len(), OVERHEAD + 12);
        assert_eq!(open(&key_a, b"row 1", &sealed).unwrap(), b"secret bytes");
        assert!(open(&key_a, b"row 2", &sealed).is_none());
        assert!(open(&key_b, b"row 1", &sealed).is_none());
        let mut flipped = sealed.clone();
        flipped[NONCE_LEN] ^= 1;
        assert!(open(&key_a, b"row 1", &flipped).is_none());
        assert!(open(&key_a, b"row 1", &sealed[..OVERHEAD - 1]).is_none());
    }

    #[test]
    fn two_seals_of_the_same_bytes_differ() {
        let key = key(&random_key().unwrap()).unwrap();
        let (mut first, mut second) = (Vec::new(), Vec::new());
        seal_into(&key, b"", b"same", &mut first).unwrap();
        seal_into(&key, b"", b"same", &mut second).unwrap();
        assert_ne!(first, second);
    }

    #[test]
    fn only_32_byte_keys_are_accepted() {
        assert!(key(&[7; 32]).is_some());
        assert!(key(&[7; 16]).is_none());
    }
}
