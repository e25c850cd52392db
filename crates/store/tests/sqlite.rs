//! The conformance suite on SQLite: a fresh file per test, and once more on
//! an in-memory database.

use std::future::Future;
use std::sync::Arc;

use cxmpute_store::{conformance_tests, SqliteStore, Store, StoreError};

async fn on_temp_file<F, Fut>(test: F)
where
    F: FnOnce(Arc<dyn Store>) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    let store = SqliteStore::connect(&url).await.expect("connect");
    test(Arc::new(store)).await;
}

async fn in_memory<F, Fut>(test: F)
where
    F: FnOnce(Arc<dyn Store>) -> Fut,
    Fut: Future<Output = ()>,
{
    let store = SqliteStore::connect("sqlite::memory:").await.expect("connect");
    test(Arc::new(store)).await;
}

conformance_tests!(on_temp_file);

mod memory {
    use super::in_memory;
    cxmpute_store::conformance_tests!(in_memory);
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
