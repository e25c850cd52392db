//! SQLite backend: a single file (or memory) database for one gateway.
//!
//! SQLite allows one writer at a time. Instead of letting concurrent write
//! transactions race for the lock (and fail with `SQLITE_BUSY` when a reader
//! transaction tries to upgrade), writes queue in-process: the credit writes
//! made on every request (holds, settlements) go to one thread that commits
//! them in groups (`credits`), the rare others through a pool of exactly one
//! connection. Both take the lock with `BEGIN IMMEDIATE` and wait for each
//! other through the busy timeout. Reads use a separate pool and, thanks to
//! WAL, never wait for a writer.
//!
//! `sqlite::memory:` is a private file in the temporary folder, removed when
//! the store is dropped: it behaves like memory (gone with the store) while
//! the credit thread and the pools share it like any file.

mod admin;
mod credits;
mod devices;
mod holds;
mod journal;
mod pending;
mod referrals;
mod walbuf;
mod web;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, Transaction};

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

const READERS: u32 = 8;

pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    credits: credits::CreditWriter,
    /// The database file, for the serving claim's lock file beside it.
    path: PathBuf,
    /// Held while this store serves requests (see `claim_for_serving`).
    claim: std::sync::Mutex<Option<std::fs::File>>,
    _scratch: Option<ScratchFile>,
}

/// The file behind a `sqlite::memory:` store, removed with it.
struct ScratchFile(PathBuf);

impl Drop for ScratchFile {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm", ".serving", "-settling-0", "-settling-1"] {
            let mut path = self.0.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }
}

impl SqliteStore {
    /// Page size of a new database file (decision 52). Every commit writes
    /// each page it changed whole into the WAL, with a checksum over it; a
    /// settlement changes about a dozen pages, each for one small row, so
    /// smaller pages make each commit write and checksum less. A file that
    /// exists keeps the size it was made with (a WAL file cannot change it).
    pub const NEW_FILE_PAGE_SIZE: u32 = 2048;

    /// Opens `sqlite://path` (creating the file) or `sqlite::memory:` and runs
    /// the migrations.
    pub async fn connect(url: &str) -> Result<Self> {
        let scratch = is_memory(url).then(|| {
            ScratchFile(std::env::temp_dir().join(format!("cxmpute-memory-{}.db", crate::ids::random_secret())))
        });
        let options = match &scratch {
            Some(file) => SqliteConnectOptions::new().filename(&file.0),
            None => SqliteConnectOptions::from_str(url).map_err(|_| StoreError::InvalidUrl(redact_url(url)))?,
        }
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(5));
        let path: PathBuf = options.get_filename().to_path_buf();

        let (writer, reader) = open_migrated(&options).await?;
        let credits = credits::CreditWriter::start(&path)?;
        Ok(SqliteStore {
            writer,
            reader,
            credits,
            path,
            claim: std::sync::Mutex::new(None),
            _scratch: scratch,
        })
    }

    /// `IMMEDIATE` takes the write lock up front, so a transaction that reads
    /// before it writes cannot fail half-way when another process (say the
    /// CLI) holds the file; in-process writers already queue on the pool.
    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>> {
        Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
    }
}

/// Opens the writer and reader pools and runs the migrations, again when
/// another process was doing the same on the same new file (a starting
/// gateway and the admin commands): sqlx takes no lock on SQLite, so the
/// slower one fails on a table the other just created, or cannot switch the
/// file to WAL while the other writes; on the next try it finds the
/// migrations applied. A migration that is really broken fails every try.
async fn open_migrated(options: &SqliteConnectOptions) -> Result<(SqlitePool, SqlitePool)> {
    let mut tries = 0u64;
    loop {
        match open_once(options).await {
            Err(e) if tries < 6 && lost_a_race(&e) => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50 * tries)).await;
            }
            done => return done,
        }
    }
}

async fn open_once(options: &SqliteConnectOptions) -> Result<(SqlitePool, SqlitePool)> {
    let writer = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(
            options
                .clone()
                .create_if_missing(true)
                // Set before the journal mode, so it applies to a new file.
                .page_size(SqliteStore::NEW_FILE_PAGE_SIZE)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal),
        )
        .await?;
    // The journal mode is a property of the file, set by the writer
    // above; readers must not try to switch it (that needs a lock
    // busy_timeout cannot wait for).
    let reader = SqlitePoolOptions::new()
        .max_connections(READERS)
        .connect_with(options.clone())
        .await?;
    sqlx::migrate!("./migrations/sqlite").run(&writer).await?;
    Ok((writer, reader))
}

/// Whether opening failed because another process was opening the same file.
fn lost_a_race(e: &StoreError) -> bool {
    let code = |e: &sqlx::Error| {
        e.as_database_error()
            .and_then(|db| db.code())
            .and_then(|code| code.parse::<i32>().ok())
            .map(|code| code & 0xff)
    };
    // SQLITE_BUSY and its extended codes.
    let busy = |e: &sqlx::Error| code(e) == Some(5);
    // The other process recorded the same migration first: one whose SQL
    // can run twice (say, an UPDATE) then fails only on its version row.
    let recorded_twice = |e: &sqlx::Error| {
        code(e) == Some(19) // SQLITE_CONSTRAINT and its extended codes
            && e.as_database_error()
                .is_some_and(|db| db.message().contains("_sqlx_migrations"))
    };
    match e {
        StoreError::Migrate(sqlx::migrate::MigrateError::ExecuteMigration(..)) => true,
        StoreError::Migrate(sqlx::migrate::MigrateError::Execute(e)) => busy(e) || recorded_twice(e),
        StoreError::Database(e) => busy(e),
        _ => false,
    }
}

fn is_memory(url: &str) -> bool {
    url.contains(":memory:") || url.contains("mode=memory")
}

impl SqliteStore {
    /// An account as the store shows it: its balance less what its running
    /// requests hold (holds live in memory on SQLite, see `sqlite/holds.rs`).
    pub(crate) fn shown(&self, mut account: Account) -> Account {
        account.balance -= self.credits.held(&account.id);
        account
    }

    /// Takes the serving claim (see `claim_for_serving`); the database's
    /// canonical path when it was taken now, `None` when this store held it.
    fn claim(&self) -> Result<Option<PathBuf>> {
        let mut claim = self.claim.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if claim.is_some() {
            return Ok(None);
        }
        // One lock file per database, however its path was spelled.
        let database = std::fs::canonicalize(&self.path).unwrap_or_else(|_| self.path.clone());
        let mut lock_path = database.clone().into_os_string();
        lock_path.push(".serving");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| StoreError::InUse(format!("cannot open {}: {e}", Path::new(&lock_path).display())))?;
        match file.try_lock() {
            Ok(()) => {
                *claim = Some(file);
                Ok(Some(database))
            }
            Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::InUse(format!(
                "another gateway is serving {} (a SQLite database serves one gateway; use PostgreSQL for several)",
                self.path.display()
            ))),
            Err(std::fs::TryLockError::Error(e)) => Err(StoreError::InUse(format!(
                "cannot lock {}: {e}",
                Path::new(&lock_path).display()
            ))),
        }
    }

    /// The pool reads go to, once the settlements journaled so far are in
    /// the database (`sqlite/journal.rs`): a read sees every request that
    /// has ended.
    pub(crate) async fn reads(&self) -> &SqlitePool {
        self.credits.caught_up().await;
        &self.reader
    }

    /// What the running requests of an account hold; 0 on other backends,
    /// whose balances no longer contain their holds.
    pub(crate) fn held_now(&self, account_id: &str) -> i64 {
        self.credits.held(account_id)
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
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
        .fetch_one(&self.writer)
        .await
        .map_err(|e| on_insert(e, || "an account with this email exists".into(), String::new))?;
        Ok(row.into())
    }

    async fn account(&self, id: &str) -> Result<Option<Account>> {
        let row: Option<AccountRow> = sqlx::query_as("SELECT * FROM accounts WHERE id = $1")
            .bind(id)
            .fetch_optional(self.reads().await)
            .await?;
        Ok(row.map(|row| self.shown(row.into())))
    }

    async fn list_accounts(&self) -> Result<Vec<Account>> {
        let rows: Vec<AccountRow> = sqlx::query_as("SELECT * FROM accounts ORDER BY created_at, id")
            .fetch_all(self.reads().await)
            .await?;
        Ok(rows.into_iter().map(|row| self.shown(row.into())).collect())
    }

    async fn set_suspended(&self, id: &str, reason: Option<&str>) -> Result<()> {
        let done = sqlx::query("UPDATE accounts SET suspended = $2, suspended_reason = $3 WHERE id = $1")
            .bind(id)
            .bind(reason.is_some())
            .bind(reason)
            .execute(&self.writer)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("account {id}")));
        }
        Ok(())
    }

    async fn deposit(&self, account_id: &str, amount: i64, note: Option<&str>) -> Result<i64> {
        rules::check_deposit(amount)?;
        let mut tx = self.begin_write().await?;
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
            let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM accounts WHERE id = $1)")
                .bind(account_id)
                .fetch_one(&mut *tx)
                .await?;
            return Err(if exists {
                StoreError::InvalidInput("deposit would overflow the balance".into())
            } else {
                StoreError::NotFound(format!("account {account_id}"))
            });
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
        Ok(balance - self.held_now(account_id))
    }

    async fn ledger(&self, account_id: &str, limit: i64) -> Result<Vec<LedgerEntry>> {
        let rows: Vec<LedgerRow> = sqlx::query_as(
            "SELECT * FROM ledger WHERE account_id = $1 \
             ORDER BY created_at DESC, id DESC LIMIT $2",
        )
        .bind(account_id)
        .bind(rules::limit(limit))
        .fetch_all(self.reads().await)
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
        .fetch_one(&self.writer)
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
                .fetch_all(self.reads().await)
                .await?;
        convert_all(rows)
    }

    async fn key_auth(&self, key_id: &str) -> Result<Option<KeyAuth>> {
        let row: Option<KeyAuthRow> = sqlx::query_as(
            "SELECT k.*, a.suspended AS account_suspended \
             FROM api_keys k JOIN accounts a ON a.id = k.account_id WHERE k.id = $1",
        )
        .bind(key_id)
        .fetch_optional(self.reads().await)
        .await?;
        row.map(KeyAuth::try_from).transpose()
    }

    async fn revoke_api_key(&self, key_id: &str) -> Result<bool> {
        // COALESCE keeps the first revocation time when revoked twice.
        let done = sqlx::query("UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $2) WHERE id = $1")
            .bind(key_id)
            .bind(now_millis())
            .execute(&self.writer)
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
            .execute(&self.writer)
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
        .fetch_one(&self.writer)
        .await
        .map_err(|e| on_insert(e, || format!("device {id}"), || format!("account {account_id}")))?;
        Ok(row.into())
    }

    async fn device(&self, id: &str) -> Result<Option<Device>> {
        let row: Option<DeviceRow> = sqlx::query_as("SELECT * FROM devices WHERE id = $1")
            .bind(id)
            .fetch_optional(self.reads().await)
            .await?;
        Ok(row.map(Device::from))
    }

    async fn devices(&self, account_id: &str) -> Result<Vec<Device>> {
        let rows: Vec<DeviceRow> =
            sqlx::query_as("SELECT * FROM devices WHERE account_id = $1 ORDER BY created_at, id")
                .bind(account_id)
                .fetch_all(self.reads().await)
                .await?;
        Ok(rows.into_iter().map(Device::from).collect())
    }

    async fn touch_device(&self, id: &str, at: Millis) -> Result<()> {
        let done = sqlx::query("UPDATE devices SET last_seen_at = $2 WHERE id = $1")
            .bind(id)
            .bind(at)
            .execute(&self.writer)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("device {id}")));
        }
        Ok(())
    }

    async fn revoke_device(&self, id: &str) -> Result<bool> {
        let done = sqlx::query(crate::devices::REVOKE_DEVICE)
            .bind(id)
            .execute(&self.writer)
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
        .fetch_one(&self.writer)
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
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn provisions(&self) -> Result<Vec<ProvisionRecord>> {
        let rows: Vec<ProvisionRow> = sqlx::query_as("SELECT * FROM provisions ORDER BY device_id, service, model")
            .fetch_all(self.reads().await)
            .await?;
        convert_all(rows)
    }

    async fn known_models(&self) -> Result<Vec<(Service, String)>> {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT DISTINCT service, model FROM provisions ORDER BY service, model")
                .fetch_all(self.reads().await)
                .await?;
        parse_models(rows)
    }

    async fn hold(&self, hold: HoldRequest) -> Result<HoldOutcome> {
        self.credits.hold(hold).await
    }

    async fn release(&self, request_id: &str) -> Result<()> {
        self.credits.release([request_id]);
        Ok(())
    }

    async fn settle(&self, usage: UsageRecord) -> Result<SettleOutcome> {
        self.credits.settle(usage).await
    }

    async fn release_expired_holds(&self, now: Millis) -> Result<u64> {
        Ok(self.credits.release_expired(now))
    }

    async fn release_all_holds(&self) -> Result<u64> {
        Ok(self.credits.release_all())
    }

    async fn usage(&self, request_id: &str) -> Result<Option<UsageRecord>> {
        let row: Option<UsageRow> = sqlx::query_as("SELECT * FROM usage_records WHERE request_id = $1")
            .bind(request_id)
            .fetch_optional(self.reads().await)
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
        .fetch_all(self.reads().await)
        .await?;
        convert_all(rows)
    }

    async fn rollups(&self, day: &str) -> Result<Vec<DailyRollup>> {
        let rows: Vec<RollupRow> = sqlx::query_as(
            "SELECT * FROM daily_rollups WHERE day = $1 \
             ORDER BY account_id, device_id, service, model",
        )
        .bind(day)
        .fetch_all(self.reads().await)
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
        .fetch_one(self.reads().await)
        .await?)
    }

    async fn held_amount(&self, account_id: &str) -> Result<i64> {
        Ok(self.held_now(account_id))
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(self.reads().await).await?;
        Ok(())
    }

    /// An exclusive lock on `<database>.serving`, which the operating system
    /// drops with the process however it ends. Two gateways on one file would
    /// not see each other's holds; the admin commands take no claim.
    async fn claim_for_serving(&self) -> Result<()> {
        if let Some(database) = self.claim()? {
            // Only the claim's holder uses the settlement journal.
            self.credits.serve_journal(&database).await?;
        }
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
        self.check_login_code_impl(email, code_hash, now, max_attempts).await
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
        self.decide_device_code_impl(user_code_hash, decision, now).await
    }

    async fn poll_device_code(
        &self,
        device_code_hash: &str,
        now: Millis,
        key: crate::NewDeviceKey,
    ) -> Result<crate::PollOutcome> {
        self.poll_device_code_impl(device_code_hash, now, key).await
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
        self.put_assignment_impl(device_id, models, hardware, now).await
    }

    async fn assignment(&self, device_id: &str) -> Result<Option<crate::StoredAssignment>> {
        self.assignment_impl(device_id).await
    }
}
