//! Types of the web login: one-time email codes and browser sessions.
//!
//! The store keeps only hashes (of the code, of the session token) and the
//! counters that make the limits hold across gateway replicas. The rule that
//! turns a stored code into a verdict lives here once, so both backends judge
//! a code the same way.

use serde::Serialize;

use crate::{Account, Millis};

/// What checking a code against the stored one found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CodeCheck {
    /// Right and in time. The code is gone now: it works once.
    Valid,
    /// Wrong; `attempts_left` more tries before the code is locked.
    Wrong { attempts_left: u32 },
    /// Every allowed attempt has been used; even the right code fails now.
    Locked,
    /// Past its expiry (and now deleted).
    Expired,
    /// No code was requested for this address (or it was used already).
    Missing,
}

/// A live browser session and the account it belongs to, read in one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub account: Account,
    pub created_at: Millis,
    pub expires_at: Millis,
}

/// The verdict on a code row that an attempt was just counted on.
/// `attempts` already includes this attempt.
pub(crate) fn judge_code(
    stored_hash: &str,
    given_hash: &str,
    attempts: i32,
    max_attempts: u32,
    expires_at: Millis,
    now: Millis,
) -> CodeCheck {
    if expires_at <= now {
        CodeCheck::Expired
    } else if same_text(stored_hash, given_hash) {
        CodeCheck::Valid
    } else {
        let used = u32::try_from(attempts).unwrap_or(u32::MAX);
        CodeCheck::Wrong {
            attempts_left: max_attempts.saturating_sub(used),
        }
    }
}

/// The verdict when no attempt could be counted: the row is missing, expired,
/// or out of attempts.
pub(crate) fn judge_exhausted(row: Option<Millis>, now: Millis) -> CodeCheck {
    match row {
        None => CodeCheck::Missing,
        Some(expires_at) if expires_at <= now => CodeCheck::Expired,
        Some(_) => CodeCheck::Locked,
    }
}

/// Compares two digests without an early exit.
fn same_text(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_judged() {
        assert_eq!(judge_code("a", "a", 1, 5, 10, 5), CodeCheck::Valid);
        assert_eq!(judge_code("a", "b", 1, 5, 10, 5), CodeCheck::Wrong { attempts_left: 4 });
        assert_eq!(judge_code("a", "b", 5, 5, 10, 5), CodeCheck::Wrong { attempts_left: 0 });
        assert_eq!(judge_code("a", "a", 1, 5, 10, 10), CodeCheck::Expired);
        assert_eq!(judge_exhausted(None, 5), CodeCheck::Missing);
        assert_eq!(judge_exhausted(Some(4), 5), CodeCheck::Expired);
        assert_eq!(judge_exhausted(Some(6), 5), CodeCheck::Locked);
    }
}
