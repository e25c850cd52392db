//! The one error type of the store.
//!
//! Messages may end up in logs and HTTP error bodies, so none of them carries a
//! database password: URLs are passed through [`crate::redact_url`] first.

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid database URL: {0}")]
    InvalidUrl(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A stored value the code cannot interpret (e.g. an unknown service name
    /// written by a newer version).
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// From the SQLite credit writer, which talks to SQLite without sqlx.
    #[error("database error: {0}")]
    Sqlite(String),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Another process serves requests from this database.
    #[error("{0}")]
    InUse(String),
}

/// Turns constraint violations of an insert into the errors callers can act on:
/// a duplicate becomes [`StoreError::Conflict`], a missing parent row (foreign
/// key) [`StoreError::NotFound`]. Anything else stays a database error.
pub(crate) fn on_insert(
    err: sqlx::Error,
    duplicate: impl FnOnce() -> String,
    missing_parent: impl FnOnce() -> String,
) -> StoreError {
    match err.as_database_error() {
        Some(db) if db.is_unique_violation() => StoreError::Conflict(duplicate()),
        Some(db) if db.is_foreign_key_violation() => StoreError::NotFound(missing_parent()),
        _ => StoreError::Database(err),
    }
}
