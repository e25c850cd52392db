//! Holds and settlement on PostgreSQL, where transactions of other requests
//! (and other gateways) run concurrently.
//!
//! Lock order, to rule out deadlocks: a request's own rows (hold, usage record)
//! first, then account rows in id order, then api key rows. Row locks are
//! `FOR NO KEY UPDATE`, the lock an `UPDATE` takes anyway, so they do not
//! collide with the key-share locks foreign-key checks take on parents.

use sqlx::{Postgres, Transaction};

use super::{retrying, PgStore};
use crate::{
    day_of, now_millis, rules, HoldOutcome, HoldRequest, LedgerKind, Result, SettleOutcome, StoreError, UsageRecord,
};

impl PgStore {
    pub(super) async fn hold_once(&self, hold: &HoldRequest) -> Result<HoldOutcome> {
        rules::check_hold(hold)?;
        let mut tx = self.pool.begin().await?;
        let state: Option<(bool, bool)> = sqlx::query_as(
            "SELECT a.suspended, k.revoked_at IS NOT NULL FROM accounts a \
             JOIN api_keys k ON k.account_id = a.id WHERE a.id = $1 AND k.id = $2",
        )
        .bind(&hold.account_id)
        .bind(&hold.key_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((suspended, revoked)) = state else {
            return Err(StoreError::NotFound(format!(
                "api key {} of account {}",
                hold.key_id, hold.account_id
            )));
        };
        if suspended || revoked {
            return Ok(HoldOutcome::Refused);
        }
        let inserted = sqlx::query(
            "INSERT INTO holds (request_id, account_id, key_id, amount, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (request_id) DO NOTHING",
        )
        .bind(&hold.request_id)
        .bind(&hold.account_id)
        .bind(&hold.key_id)
        .bind(hold.amount)
        .bind(now_millis())
        .bind(hold.expires_at)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(StoreError::Conflict(format!(
                "request {} already holds credits",
                hold.request_id
            )));
        }
        // The check and the debit are one statement: a concurrent hold waits for
        // this row and re-checks the balance it leaves.
        let debited = sqlx::query("UPDATE accounts SET balance = balance - $2 WHERE id = $1 AND balance >= $2")
            .bind(&hold.account_id)
            .bind(hold.amount)
            .execute(&mut *tx)
            .await?;
        if debited.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(HoldOutcome::InsufficientBalance);
        }
        let reserved = sqlx::query(
            "UPDATE api_keys SET reserved = reserved + $2 WHERE id = $1 \
             AND (credit_limit IS NULL OR spent + reserved + $2 <= credit_limit)",
        )
        .bind(&hold.key_id)
        .bind(hold.amount)
        .execute(&mut *tx)
        .await?;
        if reserved.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(HoldOutcome::KeyLimitReached);
        }
        tx.commit().await?;
        Ok(HoldOutcome::Held)
    }

    /// Returns whether there was a hold to release.
    pub(super) async fn release_one(&self, request_id: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let released = return_hold(&mut tx, request_id).await?;
        tx.commit().await?;
        Ok(released.is_some())
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

    pub(super) async fn settle_once(&self, usage: &UsageRecord) -> Result<SettleOutcome> {
        rules::check_usage(usage)?;
        let reward = rules::payable_reward(usage);
        let mut tx = self.pool.begin().await?;

        // Inserting the record first makes it the settlement's claim: a second
        // settle of the same request waits on this row's lock and then stops
        // here without touching balances.
        if !insert_usage(&mut tx, usage, reward).await? {
            tx.rollback().await?;
            return Ok(SettleOutcome::AlreadySettled);
        }
        let mut accounts = vec![usage.account_id.as_str()];
        if let (Some(provider), true) = (&usage.provider_account_id, reward > 0) {
            accounts.push(provider);
        }
        sqlx::query("SELECT id FROM accounts WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE")
            .bind(&accounts)
            .execute(&mut *tx)
            .await?;
        return_hold(&mut tx, &usage.request_id).await?;

        let balance: Option<i64> = sqlx::query_scalar("SELECT balance FROM accounts WHERE id = $1")
            .bind(&usage.account_id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(balance) = balance else {
            return Err(StoreError::NotFound(format!("account {}", usage.account_id)));
        };
        let charge = rules::clamp_charge(usage.cost, balance);
        if charge != usage.cost {
            sqlx::query("UPDATE usage_records SET cost = $2 WHERE request_id = $1")
                .bind(&usage.request_id)
                .bind(charge)
                .execute(&mut *tx)
                .await?;
        }
        if charge > 0 {
            move_credits(&mut tx, usage, &usage.account_id, LedgerKind::Charge, -charge).await?;
        }
        sqlx::query("UPDATE api_keys SET spent = spent + $2, last_used_at = $3 WHERE id = $1")
            .bind(&usage.key_id)
            .bind(charge)
            .bind(usage.created_at)
            .execute(&mut *tx)
            .await?;
        if let (Some(provider), true) = (&usage.provider_account_id, reward > 0) {
            move_credits(&mut tx, usage, provider, LedgerKind::Reward, reward).await?;
        }
        add_to_rollup(&mut tx, usage, charge, reward).await?;
        tx.commit().await?;
        Ok(SettleOutcome::Settled)
    }
}

/// Deletes a hold and gives its amount back to the balance and the key's
/// headroom. Returns the amount, or `None` when there was no hold.
async fn return_hold(tx: &mut Transaction<'static, Postgres>, request_id: &str) -> Result<Option<i64>> {
    let hold: Option<(String, String, i64)> =
        sqlx::query_as("DELETE FROM holds WHERE request_id = $1 RETURNING account_id, key_id, amount")
            .bind(request_id)
            .fetch_optional(&mut **tx)
            .await?;
    let Some((account_id, key_id, amount)) = hold else {
        return Ok(None);
    };
    sqlx::query("UPDATE accounts SET balance = balance + $2 WHERE id = $1")
        .bind(&account_id)
        .bind(amount)
        .execute(&mut **tx)
        .await?;
    sqlx::query("UPDATE api_keys SET reserved = reserved - $2 WHERE id = $1")
        .bind(&key_id)
        .bind(amount)
        .execute(&mut **tx)
        .await?;
    Ok(Some(amount))
}

/// Returns false when a record for the request exists already.
async fn insert_usage(tx: &mut Transaction<'static, Postgres>, u: &UsageRecord, reward: i64) -> Result<bool> {
    let done = sqlx::query(
        "INSERT INTO usage_records (request_id, account_id, key_id, device_id, \
         provider_account_id, provision_id, service, model, input_tokens, output_tokens, \
         characters, pages, latency_ms, ttfb_ms, status, cost, reward, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18) \
         ON CONFLICT (request_id) DO NOTHING",
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
    .bind(reward)
    .bind(u.created_at)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Changes a balance by `amount` and writes the matching ledger entry.
async fn move_credits(
    tx: &mut Transaction<'static, Postgres>,
    u: &UsageRecord,
    account_id: &str,
    kind: LedgerKind,
    amount: i64,
) -> Result<()> {
    let done = sqlx::query("UPDATE accounts SET balance = balance + $2 WHERE id = $1")
        .bind(account_id)
        .bind(amount)
        .execute(&mut **tx)
        .await?;
    if done.rows_affected() == 0 {
        return Err(StoreError::NotFound(format!("account {account_id}")));
    }
    sqlx::query(
        "INSERT INTO ledger (account_id, kind, amount, request_id, created_at) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(account_id)
    .bind(kind.as_str())
    .bind(amount)
    .bind(&u.request_id)
    .bind(u.created_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn add_to_rollup(tx: &mut Transaction<'static, Postgres>, u: &UsageRecord, cost: i64, reward: i64) -> Result<()> {
    sqlx::query(
        "INSERT INTO daily_rollups (day, account_id, device_id, service, model, requests, \
         errors, input_tokens, output_tokens, cost, reward) \
         VALUES ($1, $2, $3, $4, $5, 1, $6, $7, $8, $9, $10) \
         ON CONFLICT (day, account_id, device_id, service, model) DO UPDATE SET \
         requests = daily_rollups.requests + 1, \
         errors = daily_rollups.errors + excluded.errors, \
         input_tokens = daily_rollups.input_tokens + excluded.input_tokens, \
         output_tokens = daily_rollups.output_tokens + excluded.output_tokens, \
         cost = daily_rollups.cost + excluded.cost, \
         reward = daily_rollups.reward + excluded.reward",
    )
    .bind(day_of(u.created_at))
    .bind(&u.account_id)
    .bind(u.device_id.as_deref().unwrap_or(""))
    .bind(u.service.as_str())
    .bind(&u.model)
    .bind(rules::is_error(u.status))
    .bind(u.input_tokens)
    .bind(u.output_tokens)
    .bind(cost)
    .bind(reward)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
