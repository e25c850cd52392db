//! Types of device login (device codes, as in OAuth's device flow) and of the
//! orchestrator's assignments.
//!
//! A node asks for a code pair: a long *device code* only it knows, and a short
//! *user code* its owner types on the gateway's `/link` page. The store keeps
//! hashes of both. The owner approves (or denies) by user code; the node polls
//! by device code, and the first poll after approval creates the device, in the
//! same transaction that consumes the code, so credentials are issued once.

use serde::Serialize;

use crate::{Device, Millis, Service};

/// How much a too-early poll adds to the interval (RFC 8628 §3.5).
pub const SLOW_DOWN_STEP_SECS: u32 = 5;

/// A new device code, as hashes.
#[derive(Debug, Clone)]
pub struct NewDeviceCode {
    pub device_code_hash: String,
    pub user_code_hash: String,
    pub device_name: String,
    pub interval_secs: u32,
    pub created_at: Millis,
    pub expires_at: Millis,
}

/// What the `/link` page shows about a code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceCodeInfo {
    pub device_name: String,
    /// Neither approved nor denied yet.
    pub pending: bool,
    pub expires_at: Millis,
}

/// The owner's answer to a code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceDecision<'a> {
    Approve { account_id: &'a str },
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecideOutcome {
    Decided,
    /// No such code (or it was consumed already).
    Missing,
    Expired,
    /// Approved or denied before.
    AlreadyDecided,
}

/// The id and key hash a poll gives the device it creates when the code is
/// approved. Made up by the caller before the poll; unused otherwise.
#[derive(Debug, Clone)]
pub struct NewDeviceKey {
    pub id: String,
    pub access_key_hash: String,
}

/// What a node's poll finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollOutcome {
    Pending,
    /// Polled sooner than the interval allows; the interval is now this long.
    SlowDown {
        interval_secs: u32,
    },
    /// The code expired (and is now deleted).
    Expired,
    /// The owner said no (the code is now deleted).
    Denied,
    /// Approved: this device was created for the approving account, and the
    /// code is consumed.
    Issued(Device),
    /// No such code, or it was consumed already.
    Missing,
}

/// One step of a poll on a stored code, decided without the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PollStep {
    Expired,
    SlowDown { interval_secs: u32 },
    Pending,
    Denied,
    Approved { account_id: String },
}

/// A stored code row as a poll sees it.
pub(crate) struct CodeState<'a> {
    pub status: &'a str,
    pub account_id: Option<String>,
    pub interval_secs: i64,
    pub last_polled_at: Option<Millis>,
    pub expires_at: Millis,
}

pub(crate) fn judge_poll(row: CodeState<'_>, now: Millis) -> PollStep {
    if row.expires_at <= now {
        return PollStep::Expired;
    }
    let interval = u32::try_from(row.interval_secs).unwrap_or(u32::MAX);
    if row
        .last_polled_at
        .is_some_and(|at| now.saturating_sub(at) < i64::from(interval) * 1000)
    {
        return PollStep::SlowDown {
            interval_secs: interval.saturating_add(SLOW_DOWN_STEP_SECS),
        };
    }
    match (row.status, row.account_id) {
        ("approved", Some(account_id)) => PollStep::Approved { account_id },
        ("denied", _) => PollStep::Denied,
        _ => PollStep::Pending,
    }
}

/// What a device was last assigned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAssignment {
    pub models: Vec<(Service, String)>,
    /// The hardware report it was computed from (JSON, as the node sent it).
    pub hardware: String,
    pub assigned_at: Millis,
}

/// Clears a device's access-key hash: no secret hashes to the empty string,
/// so its credential never verifies again.
pub(crate) const REVOKE_DEVICE: &str =
    "UPDATE devices SET access_key_hash = '' WHERE id = $1 AND access_key_hash <> ''";

#[cfg(test)]
mod tests {
    use super::*;

    fn row(status: &str, last: Option<Millis>) -> CodeState<'_> {
        CodeState {
            status,
            account_id: (status == "approved").then(|| "acc".to_string()),
            interval_secs: 5,
            last_polled_at: last,
            expires_at: 100_000,
        }
    }

    #[test]
    fn polls_are_judged() {
        assert_eq!(judge_poll(row("pending", None), 1_000), PollStep::Pending);
        assert_eq!(judge_poll(row("pending", Some(0)), 5_000), PollStep::Pending);
        assert_eq!(
            judge_poll(row("pending", Some(0)), 4_999),
            PollStep::SlowDown { interval_secs: 10 }
        );
        assert_eq!(judge_poll(row("denied", None), 1), PollStep::Denied);
        assert_eq!(
            judge_poll(row("approved", None), 1),
            PollStep::Approved {
                account_id: "acc".into()
            }
        );
        assert_eq!(judge_poll(row("approved", None), 100_000), PollStep::Expired);
    }
}
