//! API keys and device credentials: format, verification and a short cache.
//!
//! A user key reads `sk-cx-<public id>-<secret>`: the id finds the row, the
//! secret's SHA-256 must match the stored hash. Device credentials read
//! `<device id>.<secret>` and work the same way.
//!
//! The cache keeps a key's row for [`KEY_CACHE_TTL`] so the hot path does not
//! read the database on every request. A revocation through this gateway evicts
//! at once; through another replica it takes effect within the TTL.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use cxmpute_store::ids::{hash_secret, new_id, random_secret};
use cxmpute_store::{ApiKey, KeyAuth, KeySettings, NewApiKey, Service, Store};
use sha2::{Digest, Sha256};

use crate::error::ApiError;

pub const KEY_PREFIX: &str = "sk-cx-";
pub const KEY_CACHE_TTL: Duration = Duration::from_secs(2);

/// A key split into its public id and secret; says nothing about validity yet.
#[derive(Debug, PartialEq, Eq)]
pub struct PresentedKey<'a> {
    pub id: &'a str,
    pub secret: &'a str,
}

pub fn parse_key(raw: &str) -> Option<PresentedKey<'_>> {
    let rest = raw.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('-')?;
    let ok_id = !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric());
    let ok_secret = !secret.is_empty() && secret.len() <= 128;
    (ok_id && ok_secret).then_some(PresentedKey { id, secret })
}

/// Reads `Authorization: Bearer <token>`.
pub fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Compares two hex digests without an early exit.
pub fn same_digest(a: &str, b: &str) -> bool {
    same_bytes(a.as_bytes(), b.as_bytes())
}

fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `secret`'s SHA-256, in lower-case hex (as
/// [`cxmpute_store::ids::hash_secret`] stores it), is `stored`. Runs on every
/// request, so the hex digest is written on the stack, not allocated.
fn secret_matches(secret: &str, stored: &str) -> bool {
    let mut hex_digest = [0u8; 64];
    hex::encode_to_slice(Sha256::digest(secret.as_bytes()), &mut hex_digest).is_ok()
        && same_bytes(&hex_digest, stored.as_bytes())
}

/// A cached lookup: the key's row (shared, so a hit copies nothing), or
/// `None` for an id that does not exist.
type Cached = Option<Arc<KeyAuth>>;

#[derive(Default)]
pub struct KeyCache {
    entries: RwLock<HashMap<String, (Instant, Cached)>>,
}

impl KeyCache {
    /// Finds and verifies a presented key. Errors are the client-facing ones.
    pub async fn authenticate(&self, store: &dyn Store, raw: &str) -> Result<Arc<KeyAuth>, ApiError> {
        let presented = parse_key(raw).ok_or_else(ApiError::invalid_key)?;
        let auth = match self.cached(presented.id) {
            Some(hit) => hit,
            None => {
                let fresh = store.key_auth(presented.id).await?.map(Arc::new);
                self.put(presented.id, fresh.clone());
                fresh
            }
        };
        let auth = auth.ok_or_else(ApiError::invalid_key)?;
        if !secret_matches(presented.secret, &auth.key.secret_hash) {
            return Err(ApiError::invalid_key());
        }
        if auth.key.revoked_at.is_some() {
            return Err(ApiError::revoked_key());
        }
        if auth.account_suspended {
            return Err(ApiError::forbidden("account_suspended", "This account is suspended."));
        }
        Ok(auth)
    }

    fn cached(&self, id: &str) -> Option<Cached> {
        let map = self.entries.read().unwrap_or_else(|p| p.into_inner());
        map.get(id)
            .filter(|(at, _)| at.elapsed() < KEY_CACHE_TTL)
            .map(|(_, a)| a.clone())
    }

    fn put(&self, id: &str, auth: Cached) {
        let mut map = self.entries.write().unwrap_or_else(|p| p.into_inner());
        // Unknown ids are cached too (as None) so a flood of made-up keys
        // cannot turn into a flood of queries; the map is bounded for that reason.
        if map.len() > 100_000 {
            map.retain(|_, (at, _)| at.elapsed() < KEY_CACHE_TTL);
        }
        map.insert(id.to_string(), (Instant::now(), auth));
    }

    pub fn evict(&self, id: &str) {
        self.entries.write().unwrap_or_else(|p| p.into_inner()).remove(id);
    }

    pub fn clear(&self) {
        self.entries.write().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// Options for a new key.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyOptions {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub credit_limit: Option<i64>,
    #[serde(default)]
    pub allowed_services: Option<Vec<String>>,
    #[serde(default)]
    pub rpm_limit: Option<u32>,
}

/// Checks a key's options; a missing name becomes `default_name`.
pub fn key_settings(opts: KeyOptions, default_name: &str) -> Result<KeySettings, ApiError> {
    let allowed_services = match opts.allowed_services {
        None => None,
        Some(list) => Some(
            list.iter()
                .map(|s| {
                    Service::parse(s).ok_or_else(|| {
                        ApiError::bad_request(format!("unknown service '{s}': use chat, embeddings, speech or scrape"))
                            .with_param("allowed_services")
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    if allowed_services.as_ref().is_some_and(Vec::is_empty) {
        return Err(
            ApiError::bad_request("allowed_services must name at least one service").with_param("allowed_services")
        );
    }
    if opts.credit_limit.is_some_and(|l| l < 0) {
        return Err(ApiError::bad_request("credit_limit must not be negative").with_param("credit_limit"));
    }
    if opts.rpm_limit == Some(0) {
        return Err(ApiError::bad_request("rpm_limit must be at least 1").with_param("rpm_limit"));
    }
    let name = opts.name.unwrap_or_else(|| default_name.into());
    if name.chars().count() > 100 {
        return Err(ApiError::bad_request("name is longer than 100 characters").with_param("name"));
    }
    Ok(KeySettings {
        name,
        credit_limit: opts.credit_limit,
        allowed_services,
        rpm_limit: opts.rpm_limit,
    })
}

/// Creates a key; the returned string is the only time the secret exists in clear.
pub async fn create_key(store: &dyn Store, account_id: &str, opts: KeyOptions) -> Result<(ApiKey, String), ApiError> {
    if store.account(account_id).await?.is_none() {
        return Err(ApiError::not_found(format!("no account '{account_id}'")));
    }
    let KeySettings {
        name,
        credit_limit,
        allowed_services,
        rpm_limit,
    } = key_settings(opts, "default")?;
    let id = new_id("");
    let secret = random_secret();
    let full = format!("{KEY_PREFIX}{id}-{secret}");
    let key = store
        .create_api_key(NewApiKey {
            prefix: format!("{KEY_PREFIX}{}…", &id[..8.min(id.len())]),
            id,
            account_id: account_id.to_string(),
            name,
            secret_hash: hash_secret(&secret),
            credit_limit,
            allowed_services,
            rpm_limit,
        })
        .await?;
    Ok((key, full))
}

/// Registers a provider device; returns its id and the access key (shown once),
/// joined as the node expects them: `<device id>.<secret>`.
pub async fn create_device(store: &dyn Store, account_id: &str, name: &str) -> Result<(String, String), ApiError> {
    if store.account(account_id).await?.is_none() {
        return Err(ApiError::not_found(format!("no account '{account_id}'")));
    }
    let id = new_id("dev_");
    let secret = random_secret();
    store
        .create_device(account_id, name, &id, &hash_secret(&secret))
        .await?;
    Ok((id.clone(), format!("{id}.{secret}")))
}

/// Checks `<device id>.<secret>` only (not the account); returns the device.
/// A revoked device has an empty hash, which no secret matches.
pub async fn verify_device_secret(store: &dyn Store, token: &str) -> Result<cxmpute_store::Device, ApiError> {
    let (id, secret) = token.split_once('.').ok_or_else(ApiError::invalid_key)?;
    let device = store.device(id).await?.ok_or_else(ApiError::invalid_key)?;
    if !secret_matches(secret, &device.access_key_hash) {
        return Err(ApiError::invalid_key());
    }
    Ok(device)
}

/// Checks `<device id>.<secret>` and that its account may serve; returns the device.
pub async fn authenticate_device(store: &dyn Store, token: &str) -> Result<cxmpute_store::Device, ApiError> {
    let device = verify_device_secret(store, token).await?;
    match store.account(&device.account_id).await? {
        Some(acc) if acc.suspended => Err(ApiError::forbidden("account_suspended", "This account is suspended.")),
        Some(_) => Ok(device),
        None => Err(ApiError::invalid_key()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse() {
        assert_eq!(
            parse_key("sk-cx-abc123-deadbeef"),
            Some(PresentedKey {
                id: "abc123",
                secret: "deadbeef"
            })
        );
        assert_eq!(
            parse_key("sk-cx-abc-de-ad"),
            Some(PresentedKey {
                id: "abc",
                secret: "de-ad"
            })
        );
        assert_eq!(parse_key("sk-other-abc-def"), None);
        assert_eq!(parse_key("sk-cx--def"), None);
        assert_eq!(parse_key("sk-cx-a_b-def"), None);
        assert_eq!(parse_key("sk-cx-abc-"), None);
    }

    #[test]
    fn bearer_is_read_case_insensitively() {
        let mut h = http::HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, "bearer  tok ".parse().unwrap());
        assert_eq!(bearer(&h), Some("tok"));
        h.insert(http::header::AUTHORIZATION, "Basic tok".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn digests_compare() {
        assert!(same_digest("abcd", "abcd"));
        assert!(!same_digest("abcd", "abce"));
        assert!(!same_digest("abcd", "abc"));
    }

    /// The check on the request path agrees with the hash the store keeps.
    #[test]
    fn a_secret_matches_only_its_own_stored_hash() {
        let stored = cxmpute_store::ids::hash_secret("s3cret");
        assert!(secret_matches("s3cret", &stored));
        assert!(!secret_matches("s3cres", &stored));
        assert!(!secret_matches("s3cret", &stored[..63]));
        assert!(!secret_matches("s3cret", &stored.to_uppercase()));
    }
}
