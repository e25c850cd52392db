//! Operator tools and dashboard aggregates on PostgreSQL: the shared SQL of
//! `crate::admin`. The balance check of an adjustment is part of its
//! `UPDATE`, so concurrent charges cannot slip under it.

use super::PgStore;
use crate::admin::{ADJUST_BALANCE, INSERT_LEDGER};
use crate::{LedgerKind, Result};

impl PgStore {
    pub(super) async fn begin_tx(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        Ok(self.pool.begin().await?)
    }

    /// See [`crate::AdminStore::adjust_balance`]; holds are already off the
    /// balance here, so the `UPDATE`'s own check keeps them.
    pub(crate) async fn adjust(&self, account_id: &str, amount: i64, note: &str) -> Result<i64> {
        let mut tx = self.begin_tx().await?;
        let balance: Option<i64> = sqlx::query_scalar(ADJUST_BALANCE)
            .bind(account_id)
            .bind(amount)
            .bind(amount.saturating_neg())
            .bind(i64::MAX - amount.max(0))
            .fetch_optional(&mut *tx)
            .await?;
        let Some(balance) = balance else {
            return Err(super::refused_or_missing(&mut tx, account_id, crate::admin::ADJUST_REFUSED).await);
        };
        sqlx::query(INSERT_LEDGER)
            .bind(account_id)
            .bind(LedgerKind::Adjust.as_str())
            .bind(amount)
            .bind(note)
            .bind(crate::now_millis())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(balance)
    }
}

crate::impl_admin_store!(PgStore, read = reads, write = pool, begin = begin_tx);
