//! The conformance suite on PostgreSQL, each test in a fresh schema so tests
//! can run in parallel against one database. Needs `CXMPUTE_TEST_POSTGRES_URL`
//! (e.g. `postgres://postgres@127.0.0.1:5432/test`); without it every test
//! passes after saying it was skipped.

use std::future::Future;
use std::sync::Arc;

use cxmpute_store::{conformance_tests, PgStore, Store, StoreError};
use sqlx::Connection;

const URL_VAR: &str = "CXMPUTE_TEST_POSTGRES_URL";

fn database_url() -> Option<String> {
    let url = std::env::var(URL_VAR).ok().filter(|u| !u.is_empty());
    if url.is_none() {
        eprintln!("skipped: set {URL_VAR} to run the PostgreSQL tests");
    }
    url
}

async fn in_fresh_schema<F, Fut>(test: F)
where
    F: FnOnce(Arc<dyn Store>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(url) = database_url() else { return };
    let schema = cxmpute_store::ids::new_id("test_");
    let store = PgStore::connect_with_schema(&url, &schema).await.expect("connect");
    // Run on a task so a failing test still gets its schema dropped.
    let outcome = tokio::spawn(test(Arc::new(store))).await;
    let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
    sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .execute(&mut conn)
        .await
        .expect("drop schema");
    if let Err(failure) = outcome {
        std::panic::resume_unwind(failure.into_panic());
    }
}

conformance_tests!(in_fresh_schema);

/// `connect` migrates the database it is given, so it gets a database of its
/// own: the shared one's public schema may hold another version's tables.
#[tokio::test]
async fn connect_picks_postgres_by_scheme() {
    let Some(url) = database_url() else { return };
    let name = cxmpute_store::ids::new_id("cxm_scheme_").to_lowercase();
    let mut admin = sqlx::PgConnection::connect(&url).await.expect("connect");
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut admin)
        .await
        .expect("create database");
    let base = url.rsplit_once('/').map_or(url.as_str(), |(base, _)| base);
    let outcome = tokio::spawn({
        let url = format!("{base}/{name}");
        async move {
            let store = cxmpute_store::connect(&url).await.expect("connect");
            assert_eq!(store.backend(), "postgres");
            store.ping().await.expect("ping");
        }
    })
    .await;
    sqlx::query(&format!("DROP DATABASE \"{name}\" WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .expect("drop database");
    if let Err(failure) = outcome {
        std::panic::resume_unwind(failure.into_panic());
    }
}

#[tokio::test]
async fn schema_names_are_checked() {
    let r = PgStore::connect_with_schema("postgres://u:pw@127.0.0.1:1/x", "Bad\"name").await;
    assert!(matches!(r, Err(StoreError::InvalidInput(_))));
}
