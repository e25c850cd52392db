//! PostgreSQL backend: for several gateways sharing one database.
//!
//! Transactions run at READ COMMITTED. The money paths stay correct there
//! because every check that guards a balance is part of the `UPDATE` that
//! changes it (PostgreSQL re-evaluates the `WHERE` on the latest row version
//! after waiting for a concurrent writer), and rows of several accounts are
//! locked in id order so transactions cannot deadlock. Should a transaction
//! still fail with a serialization failure or deadlock, it is retried.

mod admin;
mod batch;
mod credits;
mod devices;
mod referrals;
mod web;

use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection};

use crate::error::on_insert;
use crate::rows::{
    convert_all, parse_models, services_to_text, AccountRow, ApiKeyRow, DeviceRow, KeyAuthRow, LedgerRow, ProvisionRow,
    RollupRow, UsageRow,
};
use crate::{
    ids::new_id, now_millis, redact_url, rules, Account, ApiKey, DailyRollup, Device, HoldOutcome, HoldRequest,
    KeyAuth, KeySettings, LedgerEntry, LedgerKind, Millis, NewApiKey, ProvisionRecord, Result, Service, SettleOutcome,
    Store, StoreError, UsageRecord,
};

const POOL_SIZE: u32 = 16;
/// Attempts of one transaction before a serialization failure is returned.
const ATTEMPTS: u32 = 5;

pub struct PgStore {
    pool: PgPool,
    /// Holds and settlements, sent to the server in batches (decision 50).
    credits: batch::Batcher,
}

impl PgStore {
    /// The pool reads go to (the admin and referral stores' `read`).
    pub(crate) async fn reads(&self) -> &PgPool {
        &self.pool
    }

    /// Holds are rows here, already taken off the balance: accounts show as read.
    pub(crate) fn shown(&self, account: Account) -> Account {
        account
    }

    /// Opens `postgres://…` and runs the migrations.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::open(parse_url(url)?).await
    }

    /// Like [`PgStore::connect`], but everything (tables and sqlx's migration
    /// bookkeeping) lives in `schema`, created when missing. Lets several
    /// stores, e.g. parallel tests, share one database without seeing each
    /// other.
    pub async fn connect_with_schema(url: &str, schema: &str) -> Result<Self> {
        check_schema_name(schema)?;
        let options = parse_url(url)?;
        let mut conn = options.connect().await?;
        sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
            .execute(&mut conn)
            .await?;
        conn.close().await?;
        Self::open(options.options([("search_path", schema)])).await
    }

    async fn open(options: PgConnectOptions) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        let credits = batch::Batcher::start(&pool);
        Ok(PgStore { pool, credits })
    }
}

fn parse_url(url: &str) -> Result<PgConnectOptions> {
    PgConnectOptions::from_str(url).map_err(|_| StoreError::InvalidUrl(redact_url(url)))
}

/// Lowercase because PostgreSQL folds the unquoted name in `search_path`;
/// restricted so it can be spliced into SQL without quoting concerns.
fn check_schema_name(schema: &str) -> Result<()> {
    let mut chars = schema.chars();
    let valid_start = chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let valid_rest = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !valid_start || !valid_rest || schema.len() > 63 {
        return Err(StoreError::InvalidInput(format!(
            "schema name {schema:?} must match [a-z_][a-z0-9_]{{0,62}}"
        )));
    }
    Ok(())
}

/// Runs `op` again when PostgreSQL aborted it for a serialization failure or a
/// deadlock; each attempt is a whole transaction, so a retry starts clean.
async fn retrying<T, F, Fut>(mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut attempt = 1;
    loop {
        match op().await {
            Err(StoreError::Database(e)) if is_transient(&e) && attempt < ATTEMPTS => {
                tracing::debug!(attempt, error = %e, "retrying transaction");
                tokio::time::sleep(Duration::from_millis(5 << attempt)).await;
                attempt += 1;
            }
            result => return result,
        }
    }
}

fn is_transient(err: &sqlx::Error) -> bool {
    let code = err.as_database_error().and_then(|db| db.code());
    matches!(code.as_deref(), Some("40001" | "40P01"))
}

#[async_trait]
impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn create_account(&self, name: &str, email: Option<&str>) -> Result<Account> {
        let row: AccountRow = sqlx::query_as(
            "INSERT INTO accounts (id, name, email, created_at) VALUES ($1, $2, $3, $4) \
             RETURNING *",
        )
        .bind(new_id("acc_"))
        .bind(name)
        .bind(email)
        .bind(now_millis())
        .fetch_one(&self.pool)
        .await
        .map_err(|e| on_insert(e, || "an account with this email exists".into(), String::new))?;
        Ok(row.into())
    }

    async fn account(&self, id: &str) -> Result<Option<Account>> {
        let row: Option<AccountRow> = sqlx::query_as("SELECT * FROM accounts WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(Account::from))
    }

    async fn list_accounts(&self) -> Result<Vec<Account>> {
        let rows: Vec<AccountRow> = sqlx::query_as("SELECT * FROM accounts ORDER BY created_at, id")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(Account::from).collect())
    }

    async fn set_suspended(&self, id: &str, reason: Option<&str>) -> Result<()> {
        let done = sqlx::query("UPDATE accounts SET suspended = $2, suspended_reason = $3 WHERE id = $1")
            .bind(id)
            .bind(reason.is_some())
            .bind(reason)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("account {id}")));
        }
        Ok(())
    }

    async fn deposit(&self, account_id: &str, amount: i64, note: Option<&str>) -> Result<i64> {
        rules::check_deposit(amount)?;
        let mut tx = self.pool.begin().await?;
        let balance: Option<i64> = sqlx::query_scalar(
            "UPDATE accounts SET balance = balance + $2 \
             WHERE id = $1 AND balance <= $3 - $2 RETURNING balance",
        )
        .bind(account_id)
        .bind(amount)
        .bind(i64::MAX)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(balance) = balance else {
            return Err(refused_or_missing(&mut tx, account_id, "deposit would overflow the balance").await);
        };
        sqlx::query(
            "INSERT INTO ledger (account_id, kind, amount, note, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(account_id)
        .bind(LedgerKind::Deposit.as_str())
        .bind(amount)
        .bind(note)
        .bind(now_millis())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(balance)
    }

    async fn ledger(&self, account_id: &str, limit: i64) -> Result<Vec<LedgerEntry>> {
        let rows: Vec<LedgerRow> = sqlx::query_as(
            "SELECT * FROM ledger WHERE account_id = $1 \
             ORDER BY created_at DESC, id DESC LIMIT $2",
        )
        .bind(account_id)
        .bind(rules::limit(limit))
        .fetch_all(&self.pool)
        .await?;
        convert_all(rows)
    }

    async fn create_api_key(&self, key: NewApiKey) -> Result<ApiKey> {
        let row: ApiKeyRow = sqlx::query_as(
            "INSERT INTO api_keys (id, account_id, name, prefix, secret_hash, credit_limit, \
             allowed_services, rpm_limit, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING *",
        )
        .bind(&key.id)
        .bind(&key.account_id)
        .bind(&key.name)
        .bind(&key.prefix)
        .bind(&key.secret_hash)
        .bind(key.credit_limit)
        .bind(services_to_text(key.allowed_services.as_deref()))
        .bind(key.rpm_limit.map(i64::from))
        .bind(now_millis())
        .fetch_one(&self.pool)
        .await
        .map_err(|e| {
            on_insert(
                e,
                || format!("api key {}", key.id),
                || format!("account {}", key.account_id),
            )
        })?;
        row.try_into()
    }

    async fn api_keys(&self, account_id: &str) -> Result<Vec<ApiKey>> {
        let rows: Vec<ApiKeyRow> =
            sqlx::query_as("SELECT * FROM api_keys WHERE account_id = $1 ORDER BY created_at, id")
                .bind(account_id)
                .fetch_all(&self.pool)
                .await?;
        convert_all(rows)
    }

    async fn key_auth(&self, key_id: &str) -> Result<Option<KeyAuth>> {
        let row: Option<KeyAuthRow> = sqlx::query_as(
            "SELECT k.*, a.suspended AS account_suspended \
             FROM api_keys k JOIN accounts a ON a.id = k.account_id WHERE k.id = $1",
        )
        .bind(key_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(KeyAuth::try_from).transpose()
    }

    async fn revoke_api_key(&self, key_id: &str) -> Result<bool> {
        // COALESCE keeps the first revocation time when revoked twice.
        let done = sqlx::query("UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $2) WHERE id = $1")
            .bind(key_id)
            .bind(now_millis())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn update_api_key(&self, key_id: &str, settings: &KeySettings) -> Result<bool> {
        let done = sqlx::query(crate::rows::UPDATE_API_KEY)
            .bind(key_id)
            .bind(&settings.name)
            .bind(settings.credit_limit)
            .bind(services_to_text(settings.allowed_services.as_deref()))
            .bind(settings.rpm_limit.map(i64::from))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn create_device(&self, account_id: &str, name: &str, id: &str, access_key_hash: &str) -> Result<Device> {
        let row: DeviceRow = sqlx::query_as(
            "INSERT INTO devices (id, account_id, name, access_key_hash, created_at) \
             VALUES ($1, $2, $3, $4, $5) RETURNING *",
        )
        .bind(id)
        .bind(account_id)
        .bind(name)
        .bind(access_key_hash)
        .bind(now_millis())
        .fetch_one(&self.pool)
        .await
        .map_err(|e| on_insert(e, || format!("device {id}"), || format!("account {account_id}")))?;
        Ok(row.into())
    }

    async fn device(&self, id: &str) -> Result<Option<Device>> {
        let row: Option<DeviceRow> = sqlx::query_as("SELECT * FROM devices WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(Device::from))
    }

    async fn devices(&self, account_id: &str) -> Result<Vec<Device>> {
        let rows: Vec<DeviceRow> =
            sqlx::query_as("SELECT * FROM devices WHERE account_id = $1 ORDER BY created_at, id")
                .bind(account_id)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.into_iter().map(Device::from).collect())
    }

    async fn touch_device(&self, id: &str, at: Millis) -> Result<()> {
        let done = sqlx::query("UPDATE devices SET last_seen_at = $2 WHERE id = $1")
            .bind(id)
            .bind(at)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("device {id}")));
        }
        Ok(())
    }

    async fn revoke_device(&self, id: &str) -> Result<bool> {
        let done = sqlx::query(crate::devices::REVOKE_DEVICE)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn upsert_provision(
        &self,
        device_id: &str,
        service: Service,
        model: &str,
        mode: &str,
        endpoint: Option<&str>,
        link_id: Option<&str>,
    ) -> Result<String> {
        // On conflict RETURNING yields the existing row, so the id is stable.
        let id: String = sqlx::query_scalar(
            "INSERT INTO provisions (id, device_id, service, model, mode, endpoint, online, \
             updated_at, link_id) VALUES ($1, $2, $3, $4, $5, $6, TRUE, $7, $8) \
             ON CONFLICT (device_id, service, model) DO UPDATE SET mode = excluded.mode, \
             endpoint = excluded.endpoint, online = TRUE, updated_at = excluded.updated_at, \
             link_id = excluded.link_id RETURNING id",
        )
        .bind(new_id("prv_"))
        .bind(device_id)
        .bind(service.as_str())
        .bind(model)
        .bind(mode)
        .bind(endpoint)
        .bind(now_millis())
        .bind(link_id)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| on_insert(e, String::new, || format!("device {device_id}")))?;
        Ok(id)
    }

    async fn set_device_offline(&self, device_id: &str, link_id: Option<&str>) -> Result<()> {
        sqlx::query(
            "UPDATE provisions SET online = FALSE, updated_at = $2 \
             WHERE device_id = $1 AND ($3 IS NULL OR link_id = $3)",
        )
        .bind(device_id)
        .bind(now_millis())
        .bind(link_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn provisions(&self) -> Result<Vec<ProvisionRecord>> {
        let rows: Vec<ProvisionRow> = sqlx::query_as("SELECT * FROM provisions ORDER BY device_id, service, model")
            .fetch_all(&self.pool)
            .await?;
        convert_all(rows)
    }

    async fn known_models(&self) -> Result<Vec<(Service, String)>> {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT DISTINCT service, model FROM provisions ORDER BY service, model")
                .fetch_all(&self.pool)
                .await?;
        parse_models(rows)
    }

    async fn hold(&self, hold: HoldRequest) -> Result<HoldOutcome> {
        self.credits.hold(hold).await
    }

    async fn release(&self, request_id: &str) -> Result<()> {
        retrying(|| self.release_one(request_id)).await.map(|_| ())
    }

    async fn settle(&self, usage: UsageRecord) -> Result<SettleOutcome> {
        self.credits.settle(usage).await
    }

    async fn release_expired_holds(&self, now: Millis) -> Result<u64> {
        let ids: Vec<String> = sqlx::query_scalar("SELECT request_id FROM holds WHERE expires_at < $1")
            .bind(now)
            .fetch_all(&self.pool)
            .await?;
        self.release_each(ids).await
    }

    async fn release_all_holds(&self) -> Result<u64> {
        let ids: Vec<String> = sqlx::query_scalar("SELECT request_id FROM holds")
            .fetch_all(&self.pool)
            .await?;
        self.release_each(ids).await
    }

    async fn usage(&self, request_id: &str) -> Result<Option<UsageRecord>> {
        let row: Option<UsageRow> = sqlx::query_as("SELECT * FROM usage_records WHERE request_id = $1")
            .bind(request_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(UsageRecord::try_from).transpose()
    }

    async fn usage_for_account(&self, account_id: &str, limit: i64) -> Result<Vec<UsageRecord>> {
        let rows: Vec<UsageRow> = sqlx::query_as(
            "SELECT * FROM usage_records WHERE account_id = $1 \
             ORDER BY created_at DESC, request_id DESC LIMIT $2",
        )
        .bind(account_id)
        .bind(rules::limit(limit))
        .fetch_all(&self.pool)
        .await?;
        convert_all(rows)
    }

    async fn rollups(&self, day: &str) -> Result<Vec<DailyRollup>> {
        let rows: Vec<RollupRow> = sqlx::query_as(
            "SELECT * FROM daily_rollups WHERE day = $1 \
             ORDER BY account_id, device_id, service, model",
        )
        .bind(day)
        .fetch_all(&self.pool)
        .await?;
        convert_all(rows)
    }

    async fn ledger_sum(&self, account_id: &str, kind: LedgerKind) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM ledger \
             WHERE account_id = $1 AND kind = $2",
        )
        .bind(account_id)
        .bind(kind.as_str())
        .fetch_one(&self.pool)
        .await?)
    }

    async fn held_amount(&self, account_id: &str) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM holds WHERE account_id = $1")
                .bind(account_id)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn account_by_email(&self, email: &str) -> Result<Option<Account>> {
        self.account_by_email_impl(email).await
    }

    async fn put_login_code(&self, email: &str, code_hash: &str, now: Millis, expires_at: Millis) -> Result<()> {
        self.put_login_code_impl(email, code_hash, now, expires_at).await
    }

    async fn check_login_code(
        &self,
        email: &str,
        code_hash: &str,
        now: Millis,
        max_attempts: u32,
    ) -> Result<crate::CodeCheck> {
        retrying(|| self.check_login_code_impl(email, code_hash, now, max_attempts)).await
    }

    async fn create_session(&self, token_hash: &str, account_id: &str, now: Millis, expires_at: Millis) -> Result<()> {
        self.create_session_impl(token_hash, account_id, now, expires_at).await
    }

    async fn session(&self, token_hash: &str, now: Millis) -> Result<Option<crate::Session>> {
        self.session_impl(token_hash, now).await
    }

    async fn delete_session(&self, token_hash: &str) -> Result<bool> {
        self.delete_session_impl(token_hash).await
    }

    async fn delete_sessions_of(&self, account_id: &str) -> Result<u64> {
        self.delete_sessions_of_impl(account_id).await
    }

    async fn purge_expired_logins(&self, now: Millis) -> Result<u64> {
        self.purge_expired_logins_impl(now).await
    }

    async fn create_device_code(&self, code: crate::NewDeviceCode) -> Result<()> {
        self.create_device_code_impl(code).await
    }

    async fn device_code(&self, user_code_hash: &str) -> Result<Option<crate::DeviceCodeInfo>> {
        self.device_code_impl(user_code_hash).await
    }

    async fn decide_device_code(
        &self,
        user_code_hash: &str,
        decision: crate::DeviceDecision<'_>,
        now: Millis,
    ) -> Result<crate::DecideOutcome> {
        retrying(|| self.decide_device_code_impl(user_code_hash, decision, now)).await
    }

    async fn poll_device_code(
        &self,
        device_code_hash: &str,
        now: Millis,
        key: crate::NewDeviceKey,
    ) -> Result<crate::PollOutcome> {
        retrying(|| self.poll_device_code_impl(device_code_hash, now, key.clone())).await
    }

    async fn purge_expired_device_codes(&self, now: Millis) -> Result<u64> {
        self.purge_expired_device_codes_impl(now).await
    }

    async fn put_assignment(
        &self,
        device_id: &str,
        models: &[(Service, String)],
        hardware: &str,
        now: Millis,
    ) -> Result<()> {
        retrying(|| self.put_assignment_impl(device_id, models, hardware, now)).await
    }

    async fn assignment(&self, device_id: &str) -> Result<Option<crate::StoredAssignment>> {
        self.assignment_impl(device_id).await
    }
}

/// Why a guarded balance update changed no row: the account does not exist,
/// or its guard refused the amount (`refused` says why).
pub(crate) async fn refused_or_missing(conn: &mut sqlx::PgConnection, account_id: &str, refused: &str) -> StoreError {
    match sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM accounts WHERE id = $1)")
        .bind(account_id)
        .fetch_one(conn)
        .await
    {
        Ok(true) => StoreError::InvalidInput(refused.into()),
        Ok(false) => StoreError::NotFound(format!("account {account_id}")),
        Err(e) => e.into(),
    }
}
