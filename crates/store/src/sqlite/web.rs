//! Login codes and sessions on SQLite. Writes go through the single writer
//! connection, so a code check (count the attempt, then judge) cannot
//! interleave with another check of the same code.

use super::SqliteStore;
use crate::rows::{AccountRow, SessionRow};
use crate::web::{judge_code, judge_exhausted};
use crate::{Account, CodeCheck, Millis, Result, Session};

impl SqliteStore {
    pub(super) async fn account_by_email_impl(&self, email: &str) -> Result<Option<Account>> {
        let row: Option<AccountRow> = sqlx::query_as("SELECT * FROM accounts WHERE lower(email) = lower($1)")
            .bind(email)
            .fetch_optional(self.reads().await)
            .await?;
        Ok(row.map(|row| self.shown(row.into())))
    }

    pub(super) async fn put_login_code_impl(
        &self,
        email: &str,
        code_hash: &str,
        now: Millis,
        expires_at: Millis,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO login_codes (email, code_hash, attempts, created_at, expires_at) \
             VALUES ($1, $2, 0, $3, $4) ON CONFLICT (email) DO UPDATE SET \
             code_hash = excluded.code_hash, attempts = 0, created_at = excluded.created_at, \
             expires_at = excluded.expires_at",
        )
        .bind(email)
        .bind(code_hash)
        .bind(now)
        .bind(expires_at)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    pub(super) async fn check_login_code_impl(
        &self,
        email: &str,
        code_hash: &str,
        now: Millis,
        max_attempts: u32,
    ) -> Result<CodeCheck> {
        let mut tx = self.begin_write().await?;
        let counted: Option<(String, i32, i64)> = sqlx::query_as(
            "UPDATE login_codes SET attempts = attempts + 1 WHERE email = $1 AND attempts < $2 \
             RETURNING code_hash, attempts, expires_at",
        )
        .bind(email)
        .bind(i64::from(max_attempts))
        .fetch_optional(&mut *tx)
        .await?;
        let verdict = match counted {
            Some((stored, attempts, expires_at)) => {
                judge_code(&stored, code_hash, attempts, max_attempts, expires_at, now)
            }
            None => {
                let expires_at: Option<i64> = sqlx::query_scalar("SELECT expires_at FROM login_codes WHERE email = $1")
                    .bind(email)
                    .fetch_optional(&mut *tx)
                    .await?;
                judge_exhausted(expires_at, now)
            }
        };
        // A used or expired code is deleted; a locked one stays (until it
        // expires or a new code replaces it) so it keeps refusing.
        if matches!(verdict, CodeCheck::Valid | CodeCheck::Expired) {
            sqlx::query("DELETE FROM login_codes WHERE email = $1")
                .bind(email)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(verdict)
    }

    pub(super) async fn create_session_impl(
        &self,
        token_hash: &str,
        account_id: &str,
        now: Millis,
        expires_at: Millis,
    ) -> Result<()> {
        sqlx::query("INSERT INTO sessions (token_hash, account_id, created_at, expires_at) VALUES ($1, $2, $3, $4)")
            .bind(token_hash)
            .bind(account_id)
            .bind(now)
            .bind(expires_at)
            .execute(&self.writer)
            .await
            .map_err(|e| crate::error::on_insert(e, || "session exists".into(), || format!("account {account_id}")))?;
        Ok(())
    }

    pub(super) async fn session_impl(&self, token_hash: &str, now: Millis) -> Result<Option<Session>> {
        let row: Option<SessionRow> = sqlx::query_as(
            "SELECT a.*, s.created_at AS session_created_at, s.expires_at AS session_expires_at \
             FROM sessions s JOIN accounts a ON a.id = s.account_id \
             WHERE s.token_hash = $1 AND s.expires_at > $2",
        )
        .bind(token_hash)
        .bind(now)
        .fetch_optional(self.reads().await)
        .await?;
        Ok(row.map(|row| {
            let mut session = Session::from(row);
            session.account = self.shown(session.account);
            session
        }))
    }

    pub(super) async fn delete_session_impl(&self, token_hash: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM sessions WHERE token_hash = $1")
            .bind(token_hash)
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    pub(super) async fn delete_sessions_of_impl(&self, account_id: &str) -> Result<u64> {
        let done = sqlx::query("DELETE FROM sessions WHERE account_id = $1")
            .bind(account_id)
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected())
    }

    pub(super) async fn purge_expired_logins_impl(&self, now: Millis) -> Result<u64> {
        let mut tx = self.begin_write().await?;
        let codes = sqlx::query("DELETE FROM login_codes WHERE expires_at <= $1")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let sessions = sqlx::query("DELETE FROM sessions WHERE expires_at <= $1")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(codes.rows_affected() + sessions.rows_affected())
    }
}
