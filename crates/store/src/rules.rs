//! Business rules both backends apply identically, kept out of the SQL so the
//! two implementations cannot drift apart on them.

use crate::{HoldRequest, Result, StoreError, UsageRecord};

pub(crate) fn check_deposit(amount: i64) -> Result<()> {
    if amount <= 0 {
        return Err(StoreError::InvalidInput(format!(
            "deposit amount must be positive, got {amount}"
        )));
    }
    Ok(())
}

pub(crate) fn check_hold(hold: &HoldRequest) -> Result<()> {
    if hold.amount < 0 {
        return Err(StoreError::InvalidInput(format!(
            "hold amount must not be negative, got {}",
            hold.amount
        )));
    }
    Ok(())
}

pub(crate) fn check_usage(usage: &UsageRecord) -> Result<()> {
    if usage.cost < 0 || usage.reward < 0 {
        return Err(StoreError::InvalidInput(format!(
            "cost and reward must not be negative, got {} and {}",
            usage.cost, usage.reward
        )));
    }
    Ok(())
}

/// A reward without a provider account has nobody to be paid to; recording it
/// anyway would make usage and roll-ups claim payouts the ledger never made.
pub(crate) fn payable_reward(usage: &UsageRecord) -> i64 {
    if usage.provider_account_id.is_some() {
        usage.reward
    } else {
        0
    }
}

/// Counted as an error in the roll-ups (client errors included: the user saw one).
pub(crate) fn is_error(status: i32) -> i64 {
    i64::from(status >= 400)
}

/// The charge actually taken: the cost, but never more than the balance
/// (only possible when the hold is gone), since balances may not go negative.
/// PostgreSQL's `cx_settle` (migration 0006) applies the same rule in SQL, on
/// the balance it reads under the row lock.
pub(crate) fn clamp_charge(cost: i64, balance: i64) -> i64 {
    cost.min(balance.max(0))
}

/// Limits from callers are clamped instead of rejected: SQLite reads a
/// negative LIMIT as "no limit", PostgreSQL as an error.
pub(crate) fn limit(limit: i64) -> i64 {
    limit.max(0)
}
