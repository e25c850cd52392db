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

/// Base32 symbols in ASCII order, so that encoded numbers sort like the numbers.
const SORTED_ALPHABET: &[u8; 32] = b"234567abcdefghijklmnopqrstuvwxyz";

/// `prefix`, 10 characters of the time in milliseconds, then 14 random
/// characters (70 bits), e.g. `req_…`. Ids made later sort later, so rows keyed
/// by them are appended to the end of their index instead of landing on a
/// random page: a batch of inserts then dirties a handful of pages, not one
/// page per row. Not secret (the random part comes from a fast generator).
pub fn new_sorted_id(prefix: &str) -> String {
    use rand::Rng;
    let millis = u64::try_from(crate::now_millis()).unwrap_or(0);
    let mut id = String::with_capacity(prefix.len() + 24);
    id.push_str(prefix);
    for shift in (0..10).rev() {
        id.push(char::from(SORTED_ALPHABET[((millis >> (shift * 5)) & 31) as usize]));
    }
    let mut rng = rand::thread_rng();
    for _ in 0..14 {
        id.push(char::from(ALPHABET[rng.gen_range(0..32)]));
    }
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
    fn sorted_ids_sort_by_time() {
        let a = new_sorted_id("req_");
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = new_sorted_id("req_");
        assert_eq!(a.len(), 28);
        assert!(a.starts_with("req_"));
        assert!(a < b, "{a} should sort before {b}");
        assert_ne!(new_sorted_id("req_"), new_sorted_id("req_"));
        assert!(SORTED_ALPHABET.windows(2).all(|w| w[0] < w[1]));
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
