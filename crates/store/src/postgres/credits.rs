//! Holds and settlement on PostgreSQL, where transactions of other requests
//! (and other gateways) run concurrently.
//!
//! Lock order, to rule out deadlocks: account rows in id order, then api key
//! rows. Row locks are `FOR NO KEY UPDATE`, the lock an `UPDATE` takes
//! anyway, so they do not collide with the key-share locks foreign-key checks
//! take on parents. A hold or ledger row is inserted only after its account
//! (and key) were updated in the same transaction: its foreign-key check then
//! locks a row version of this transaction's own. Inserted before, the check's
//! lock joined the lock of the transaction updating the account, as a
//! multixact, on every request of a busy account (decision 47).
//!
//! A hold and a settlement are functions in the database
//! (`migrations/postgres/0006_credit_functions.sql`), each called in one
//! statement: every request of an account updates its row, and the row stays
//! locked until the commit, so the time between the lock and the commit is
//! what bounds one account's requests per second across all gateways.

use sqlx::PgPool;

use super::{retrying, PgStore};
use crate::{day_of, now_millis, rules, HoldOutcome, HoldRequest, Result, SettleOutcome, StoreError, UsageRecord};

impl PgStore {
    /// Returns whether there was a hold to release. One statement: the hold's
    /// row, then its account, then its key.
    pub(super) async fn release_one(&self, request_id: &str) -> Result<bool> {
        // Each step reads the one before, which fixes the order the rows are
        // locked in; a data-modifying WITH runs to completion even unread.
        let released: i64 = sqlx::query_scalar(
            "WITH hold AS (DELETE FROM holds WHERE request_id = $1 RETURNING account_id, key_id, amount), \
             returned AS (UPDATE accounts a SET balance = a.balance + hold.amount FROM hold \
             WHERE a.id = hold.account_id RETURNING hold.key_id, hold.amount), \
             unreserved AS (UPDATE api_keys k SET reserved = k.reserved - returned.amount FROM returned \
             WHERE k.id = returned.key_id) \
             SELECT COUNT(*) FROM hold",
        )
        .bind(request_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(released > 0)
    }

    /// One transaction per hold keeps locks short and makes each release
    /// exactly what `release` does. A hold settled or released meanwhile by
    /// someone else is simply not counted.
    pub(super) async fn release_each(&self, request_ids: Vec<String>) -> Result<u64> {
        let mut released = 0;
        for id in request_ids {
            if retrying(|| self.release_one(&id)).await? {
                released += 1;
            }
        }
        Ok(released)
    }
}

/// One call of `cx_hold` (migration 0006): one round trip and one short
/// transaction. Used for a hold that is alone in its batch (`batch.rs`).
pub(super) async fn hold_once(pool: &PgPool, hold: &HoldRequest) -> Result<HoldOutcome> {
    let outcome: String = sqlx::query_scalar("SELECT cx_hold($1, $2, $3, $4, $5, $6)")
        .bind(&hold.request_id)
        .bind(&hold.account_id)
        .bind(&hold.key_id)
        .bind(hold.amount)
        .bind(now_millis())
        .bind(hold.expires_at)
        .fetch_one(pool)
        .await?;
    hold_answer(hold, &outcome)
}

/// One call of `cx_settle` (migration 0006): the usage record, the hold's
/// return, the charge, the key's spend, the reward, both ledger entries and
/// the roll-up in one round trip and one transaction. Used for a settlement
/// that is alone in its batch (`batch.rs`).
pub(super) async fn settle_once(pool: &PgPool, u: &UsageRecord) -> Result<SettleOutcome> {
    let outcome: String = sqlx::query_scalar(
        "SELECT cx_settle($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20)",
    )
    .bind(&u.request_id)
    .bind(&u.account_id)
    .bind(&u.key_id)
    .bind(&u.device_id)
    .bind(&u.provider_account_id)
    .bind(&u.provision_id)
    .bind(u.service.as_str())
    .bind(&u.model)
    .bind(u.input_tokens)
    .bind(u.output_tokens)
    .bind(u.characters)
    .bind(u.pages)
    .bind(u.latency_ms)
    .bind(u.ttfb_ms)
    .bind(u.status)
    .bind(u.cost)
    .bind(rules::payable_reward(u))
    .bind(u.created_at)
    .bind(day_of(u.created_at))
    .bind(rules::is_error(u.status))
    .fetch_one(pool)
    .await
    .map_err(not_found_raised)?;
    settle_answer(&outcome)
}

/// What a word of `cx_hold` means for `hold`.
pub(super) fn hold_answer(hold: &HoldRequest, word: &str) -> Result<HoldOutcome> {
    match word {
        "held" => Ok(HoldOutcome::Held),
        "insufficient_balance" => Ok(HoldOutcome::InsufficientBalance),
        "key_limit_reached" => Ok(HoldOutcome::KeyLimitReached),
        "refused" => Ok(HoldOutcome::Refused),
        "not_found" => Err(StoreError::NotFound(format!(
            "api key {} of account {}",
            hold.key_id, hold.account_id
        ))),
        "conflict" => Err(StoreError::Conflict(format!(
            "request {} already holds credits",
            hold.request_id
        ))),
        other => Err(unexpected("cx_hold", other)),
    }
}

/// What a word of `cx_settle` means.
pub(super) fn settle_answer(word: &str) -> Result<SettleOutcome> {
    match word {
        "settled" => Ok(SettleOutcome::Settled),
        "already_settled" => Ok(SettleOutcome::AlreadySettled),
        other => Err(unexpected("cx_settle", other)),
    }
}

/// `cx_settle` raises `no_data_found` (P0002) with the missing row as message.
pub(super) fn not_found_raised(err: sqlx::Error) -> StoreError {
    match err.as_database_error() {
        Some(db) if db.code().as_deref() == Some("P0002") => StoreError::NotFound(db.message().to_owned()),
        _ => err.into(),
    }
}

pub(super) fn unexpected(function: &str, answer: &str) -> StoreError {
    StoreError::Database(sqlx::Error::Protocol(format!(
        "{function} answered {answer:?}, which this gateway does not know"
    )))
}
