//! Operator tools and dashboard aggregates on PostgreSQL: the shared SQL of
//! `crate::admin`. The balance check of an adjustment is part of its
//! `UPDATE`, so concurrent charges cannot slip under it.

use super::PgStore;
use crate::Result;

impl PgStore {
    pub(super) async fn begin_tx(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        Ok(self.pool.begin().await?)
    }
}

crate::impl_admin_store!(PgStore, read = pool, write = pool, begin = begin_tx);
