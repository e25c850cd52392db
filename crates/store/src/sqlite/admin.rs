//! Operator tools and dashboard aggregates on SQLite: the shared SQL of
//! `crate::admin`, writes through the single writer connection.

crate::impl_admin_store!(super::SqliteStore, read = reads, write = writer, begin = begin_write);

impl super::SqliteStore {
    /// Through the credit writer, which checks a debit against the holds in
    /// memory (see `sqlite/holds.rs`).
    pub(crate) async fn adjust(&self, account_id: &str, amount: i64, note: &str) -> crate::Result<i64> {
        self.credits.adjust(account_id, amount, note).await
    }
}
