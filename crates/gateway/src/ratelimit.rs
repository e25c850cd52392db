//! Requests-per-minute limits per API key, as a token bucket per key.
//!
//! Kept in memory per gateway replica: with N replicas behind a balancer a key
//! gets at most N× its limit, which we document rather than pay a database
//! round trip per request for.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Past this many buckets, idle ones are dropped (see [`LONGEST_WINDOW`]), so
/// a flood of made-up keys or addresses cannot grow the map without bound.
const MAX_BUCKETS: usize = 100_000;
/// No caller uses a longer window; a bucket idle this long is full again, so
/// dropping it changes no answer.
const LONGEST_WINDOW: std::time::Duration = std::time::Duration::from_secs(3600);

#[derive(Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    /// Takes one request from `key`'s bucket; `Err(seconds)` says when to retry.
    pub fn check(&self, key: &str, rpm: u32) -> Result<(), u64> {
        self.check_at(key, rpm, Instant::now())
    }

    /// Like [`RateLimiter::check`] with a window other than a minute:
    /// `capacity` requests per `window` (at most an hour), refilled evenly.
    pub fn check_window(&self, key: &str, capacity: u32, window: std::time::Duration) -> Result<(), u64> {
        self.check_in(key, capacity, window.as_secs_f64(), Instant::now())
    }

    fn check_at(&self, key: &str, rpm: u32, now: Instant) -> Result<(), u64> {
        self.check_in(key, rpm, 60.0, now)
    }

    fn check_in(&self, key: &str, capacity: u32, window_secs: f64, now: Instant) -> Result<(), u64> {
        let capacity = f64::from(capacity.max(1));
        let per_sec = capacity / window_secs.max(0.001);
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_BUCKETS && !map.contains_key(key) {
            map.retain(|_, b| now.saturating_duration_since(b.last) < LONGEST_WINDOW);
        }
        let bucket = map.entry(key.to_string()).or_insert(Bucket {
            tokens: capacity,
            last: now,
        });
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * per_sec).min(capacity);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - bucket.tokens) / per_sec;
            Err(wait.ceil().max(1.0) as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn allows_a_burst_of_rpm_then_refuses_then_refills() {
        let rl = RateLimiter::default();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(rl.check_at("k", 3, t0).is_ok());
        }
        let wait = rl.check_at("k", 3, t0).unwrap_err();
        assert_eq!(wait, 20);
        assert!(rl.check_at("k", 3, t0 + Duration::from_secs(20)).is_ok());
        assert!(rl.check_at("other", 3, t0).is_ok());
    }
}
