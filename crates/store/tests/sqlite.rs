//! The conformance suite on SQLite: a fresh file per test, and once more on
//! an in-memory database.

use std::future::Future;
use std::sync::Arc;

use cxmpute_store::{conformance_tests, SqliteStore, Store, StoreError};

/// A store on a fresh file; `serve` also takes the file's serving claim.
async fn on_file<F, Fut>(serve: bool, test: F)
where
    F: FnOnce(Arc<dyn Store>) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    let store = SqliteStore::connect(&url).await.expect("connect");
    if serve {
        store.claim_for_serving().await.expect("claim");
    }
    test(Arc::new(store)).await;
}

async fn on_temp_file<F, Fut>(test: F)
where
    F: FnOnce(Arc<dyn Store>) -> Fut,
    Fut: Future<Output = ()>,
{
    on_file(false, test).await;
}

async fn in_memory<F, Fut>(test: F)
where
    F: FnOnce(Arc<dyn Store>) -> Fut,
    Fut: Future<Output = ()>,
{
    let store = SqliteStore::connect("sqlite::memory:").await.expect("connect");
    test(Arc::new(store)).await;
}

/// A file that the store serves, as a gateway's does: settlements then go
/// through the settlement journal and reach the database on the credit
/// writer's thread, after `settle` has returned.
async fn serving<F, Fut>(test: F)
where
    F: FnOnce(Arc<dyn Store>) -> Fut,
    Fut: Future<Output = ()>,
{
    on_file(true, test).await;
}

conformance_tests!(on_temp_file);

mod memory {
    use super::in_memory;
    cxmpute_store::conformance_tests!(in_memory);
}

mod journaled {
    use super::serving;
    cxmpute_store::conformance_tests!(serving);
}

#[tokio::test]
async fn data_survives_reconnecting() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("nested.db").display());
    let store = cxmpute_store::connect(&url).await.expect("connect");
    assert_eq!(store.backend(), "sqlite");
    let account = store.create_account("a", None).await.expect("create");
    store.deposit(&account.id, 42, None).await.expect("deposit");
    drop(store);

    // Migrations already applied: reopening must not fail or lose data.
    let store = cxmpute_store::connect(&url).await.expect("reconnect");
    let read = store.account(&account.id).await.expect("read").expect("exists");
    assert_eq!(read.balance, 42);
}

#[tokio::test]
async fn unknown_schemes_are_refused_without_leaking_passwords() {
    let Err(err) = cxmpute_store::connect("mysql://user:hunter2@db/x").await else {
        panic!("mysql is not a supported backend");
    };
    assert!(matches!(err, StoreError::InvalidUrl(_)), "{err:?}");
    assert!(!err.to_string().contains("hunter2"), "{err}");
}

#[tokio::test]
async fn one_gateway_at_a_time_serves_a_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("served.db").display());
    let first = cxmpute_store::connect(&url).await.expect("connect");
    first.claim_for_serving().await.expect("the first claim");
    first.claim_for_serving().await.expect("claiming again is a no-op");

    let second = cxmpute_store::connect(&url).await.expect("connect");
    let err = second.claim_for_serving().await.expect_err("a second gateway");
    assert!(matches!(err, StoreError::InUse(_)), "{err:?}");
    assert!(err.to_string().contains("another gateway is serving"), "{err}");
    // The admin commands open the file without a claim and still write.
    let account = second.create_account("admin", None).await.expect("create");
    assert_eq!(second.deposit(&account.id, 5, None).await.expect("deposit"), 5);

    drop(first);
    second.claim_for_serving().await.expect("free once the first is gone");
}

/// Holds used to be rows; the migration that moved them into memory gives
/// back what a gateway of the older version left behind.
#[tokio::test]
async fn holds_an_older_gateway_left_are_returned_by_the_migration() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("old.db").display());
    let store = cxmpute_store::connect(&url).await.expect("connect");
    let account = store.create_account("a", None).await.expect("create");
    store.deposit(&account.id, 1_000, None).await.expect("deposit");
    let key = store
        .create_api_key(cxmpute_store::NewApiKey {
            id: "k".into(),
            account_id: account.id.clone(),
            name: "k".into(),
            prefix: "sk-cx-k".into(),
            secret_hash: "h".into(),
            credit_limit: None,
            allowed_services: None,
            rpm_limit: None,
        })
        .await
        .expect("key");
    drop(store);

    // The state an older gateway leaves: a hold row taken off the balance
    // and reserved on the key, before the last migration.
    let pool = sqlx::SqlitePool::connect(&url).await.expect("raw connect");
    for sql in [
        "CREATE TABLE holds (request_id TEXT PRIMARY KEY NOT NULL, account_id TEXT NOT NULL, \
         key_id TEXT NOT NULL, amount INTEGER NOT NULL, created_at INTEGER NOT NULL, \
         expires_at INTEGER NOT NULL) STRICT, WITHOUT ROWID",
        "UPDATE accounts SET balance = balance - 300",
        "UPDATE api_keys SET reserved = 300",
        "DELETE FROM _sqlx_migrations WHERE version = 7",
    ] {
        sqlx::query(sql).execute(&pool).await.expect(sql);
    }
    sqlx::query("INSERT INTO holds VALUES ('r1', $1, $2, 300, 0, 0)")
        .bind(&account.id)
        .bind(&key.id)
        .execute(&pool)
        .await
        .expect("hold row");
    pool.close().await;

    let store = cxmpute_store::connect(&url).await.expect("migrate");
    let read = store.account(&account.id).await.expect("read").expect("exists");
    assert_eq!(read.balance, 1_000, "the hold went back to the balance");
    assert_eq!(store.held_amount(&account.id).await.expect("held"), 0);
}

/// The ledger lost AUTOINCREMENT (migration 8) and its unique constraint on
/// settlement entries (migration 9): a file of the oldest version keeps every
/// entry with its id through both table rebuilds, and new entries go on
/// after the largest.
#[tokio::test]
async fn the_ledger_keeps_its_entries_and_ids_through_its_rebuilds() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let store = cxmpute_store::connect(&url).await.expect("connect");
    let account = store.create_account("a", None).await.expect("create");
    drop(store);

    // The ledger as migration 1 made it, with entries whose ids have a gap
    // (AUTOINCREMENT never reuses 3, whose entry is gone).
    let pool = sqlx::SqlitePool::connect(&url).await.expect("raw connect");
    for sql in [
        "DROP TABLE ledger",
        "CREATE TABLE ledger (id INTEGER PRIMARY KEY AUTOINCREMENT, account_id TEXT NOT NULL \
         REFERENCES accounts (id), kind TEXT NOT NULL, amount INTEGER NOT NULL, request_id TEXT, \
         note TEXT, created_at INTEGER NOT NULL, UNIQUE (request_id, kind, account_id)) STRICT",
        "CREATE INDEX ledger_account ON ledger (account_id, created_at)",
        "DELETE FROM _sqlx_migrations WHERE version >= 8",
    ] {
        sqlx::query(sql).execute(&pool).await.expect(sql);
    }
    for (id, amount) in [(1, 500), (2, -20), (4, 7)] {
        sqlx::query("INSERT INTO ledger VALUES ($1, $2, 'deposit', $3, NULL, 'old', $1)")
            .bind(id)
            .bind(&account.id)
            .bind(amount)
            .execute(&pool)
            .await
            .expect("old entry");
    }
    let seq: i64 = sqlx::query_scalar("SELECT seq FROM sqlite_sequence WHERE name = 'ledger'")
        .fetch_one(&pool)
        .await
        .expect("sequence");
    assert_eq!(seq, 4, "the older table counts in sqlite_sequence");
    pool.close().await;

    let store = cxmpute_store::connect(&url).await.expect("migrate");
    let entries = store.ledger(&account.id, 10).await.expect("ledger");
    let mut old: Vec<(i64, i64)> = entries.iter().map(|e| (e.id, e.amount)).collect();
    old.sort_unstable();
    assert_eq!(old, [(1, 500), (2, -20), (4, 7)]);
    store.deposit(&account.id, 3, None).await.expect("deposit");
    let newest = store.ledger(&account.id, 10).await.expect("ledger");
    assert_eq!(
        newest.iter().map(|e| e.id).max(),
        Some(5),
        "new ids go on after the largest"
    );
    drop(store);

    let pool = sqlx::SqlitePool::connect(&url).await.expect("raw connect");
    let sql: String = sqlx::query_scalar("SELECT sql FROM sqlite_master WHERE name = 'ledger'")
        .fetch_one(&pool)
        .await
        .expect("schema");
    assert!(!sql.contains("AUTOINCREMENT"), "{sql}");
    assert!(
        !sql.contains("UNIQUE"),
        "only referral entries are unique (an index): {sql}"
    );
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name IN ('ledger', 'usage_records') \
         AND sql IS NOT NULL ORDER BY name",
    )
    .fetch_all(&pool)
    .await
    .expect("indexes");
    assert_eq!(
        indexes,
        [
            "ledger_account",
            "ledger_referral_once",
            "usage_account_time",
            "usage_time"
        ],
        "what settlements write besides the tables (migration 9)"
    );
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sqlite_sequence WHERE name = 'ledger'")
        .fetch_one(&pool)
        .await
        .expect("sequence");
    assert_eq!(left, 0, "the ledger no longer counts in sqlite_sequence");
}

/// The admin commands and a starting gateway may open a new file at the same
/// moment: both run the migrations, and both must end up with a usable store.
#[tokio::test]
async fn two_processes_migrating_one_new_file_both_succeed() {
    for round in 0..5 {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join(format!("race{round}.db")).display());
        let (a, b) = tokio::join!(cxmpute_store::connect(&url), cxmpute_store::connect(&url));
        let (a, b) = (a.expect("first"), b.expect("second"));
        let account = a.create_account("a", None).await.expect("create");
        assert!(b.account(&account.id).await.expect("read").is_some());
    }
}

async fn page_size(url: &str) -> i64 {
    let pool = sqlx::SqlitePool::connect(url).await.expect("raw connect");
    let size: i64 = sqlx::query_scalar("PRAGMA page_size")
        .fetch_one(&pool)
        .await
        .expect("page size");
    pool.close().await;
    size
}

/// A new file gets the store's small pages (decision 52); a file made
/// earlier with SQLite's default pages keeps them and works as before.
#[tokio::test]
async fn new_files_get_small_pages_and_older_files_keep_theirs() {
    let dir = tempfile::tempdir().expect("temp dir");
    let new = format!("sqlite://{}", dir.path().join("new.db").display());
    let store = cxmpute_store::connect(&new).await.expect("connect");
    let account = store.create_account("a", None).await.expect("create");
    store.deposit(&account.id, 5, None).await.expect("deposit");
    drop(store);
    assert_eq!(page_size(&new).await, i64::from(SqliteStore::NEW_FILE_PAGE_SIZE));

    // An older gateway's file: SQLite's default 4 KiB pages, in WAL mode.
    let old = format!("sqlite://{}?mode=rwc", dir.path().join("old.db").display());
    let pool = sqlx::SqlitePool::connect(&old).await.expect("raw connect");
    for sql in [
        "PRAGMA page_size = 4096",
        "PRAGMA journal_mode = WAL",
        "CREATE TABLE earlier (x INTEGER)",
    ] {
        sqlx::query(sql).execute(&pool).await.expect(sql);
    }
    pool.close().await;
    let store = cxmpute_store::connect(&old).await.expect("migrate the older file");
    let account = store.create_account("b", None).await.expect("create");
    store.deposit(&account.id, 7, None).await.expect("deposit");
    let read = store.account(&account.id).await.expect("read").expect("exists");
    assert_eq!(read.balance, 7);
    drop(store);
    assert_eq!(page_size(&old).await, 4096);
}
