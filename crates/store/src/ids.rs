//! Identifiers and secrets.

use rand::rngs::OsRng;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Lowercase RFC 4648 base32: 32 symbols, so `byte % 32` is unbiased.
const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// `prefix` followed by 20 random base32 characters (100 bits), e.g. `acc_…`.
pub fn new_id(prefix: &str) -> String {
    let mut bytes = [0u8; 20];
    OsRng.fill_bytes(&mut bytes);
    let mut id = String::with_capacity(prefix.len() + bytes.len());
    id.push_str(prefix);
    id.extend(bytes.iter().map(|b| char::from(ALPHABET[usize::from(b % 32)])));
    id
}

/// 32 random bytes as 64 hex characters: URL-safe and unguessable.
pub fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Hex SHA-256. Secrets are high-entropy random strings, so a slow password
/// hash would buy nothing.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_prefix_and_length() {
        let id = new_id("acc_");
        assert!(id.starts_with("acc_"));
        assert_eq!(id.len(), 24);
        assert!(id[4..].bytes().all(|b| ALPHABET.contains(&b)));
        assert_ne!(new_id("acc_"), new_id("acc_"));
    }

    #[test]
    fn secrets_are_hex_and_hash_is_sha256() {
        let s = random_secret();
        assert_eq!(s.len(), 64);
        assert!(s.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(
            hash_secret("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
