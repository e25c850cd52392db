//! Device codes and assignments on SQLite. Every write goes through the one
//! writer connection with `BEGIN IMMEDIATE`, so two polls of one code cannot
//! both see it approved: the second waits and then finds it consumed.

use super::SqliteStore;
use crate::devices::{judge_poll, CodeState, PollStep};
use crate::error::on_insert;
use crate::rows::{parse_models, DeviceRow};
use crate::{
    DecideOutcome, Device, DeviceCodeInfo, DeviceDecision, Millis, NewDeviceCode, NewDeviceKey, PollOutcome, Result,
    Service, StoredAssignment,
};

type CodeRow = (String, Option<String>, i64, Option<i64>, i64, String);

impl SqliteStore {
    pub(super) async fn create_device_code_impl(&self, c: NewDeviceCode) -> Result<()> {
        sqlx::query(
            "INSERT INTO device_codes (device_code_hash, user_code_hash, device_name, status, interval_secs, \
             created_at, expires_at) VALUES ($1, $2, $3, 'pending', $4, $5, $6)",
        )
        .bind(&c.device_code_hash)
        .bind(&c.user_code_hash)
        .bind(&c.device_name)
        .bind(i64::from(c.interval_secs))
        .bind(c.created_at)
        .bind(c.expires_at)
        .execute(&self.writer)
        .await
        .map_err(|e| on_insert(e, || "device code exists".into(), String::new))?;
        Ok(())
    }

    pub(super) async fn device_code_impl(&self, user_code_hash: &str) -> Result<Option<DeviceCodeInfo>> {
        let row: Option<(String, String, i64)> =
            sqlx::query_as("SELECT device_name, status, expires_at FROM device_codes WHERE user_code_hash = $1")
                .bind(user_code_hash)
                .fetch_optional(self.reads().await)
                .await?;
        Ok(row.map(|(device_name, status, expires_at)| DeviceCodeInfo {
            device_name,
            pending: status == "pending",
            expires_at,
        }))
    }

    pub(super) async fn decide_device_code_impl(
        &self,
        user_code_hash: &str,
        decision: DeviceDecision<'_>,
        now: Millis,
    ) -> Result<DecideOutcome> {
        let (status, account_id) = match decision {
            DeviceDecision::Approve { account_id } => ("approved", Some(account_id)),
            DeviceDecision::Deny => ("denied", None),
        };
        let mut tx = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE device_codes SET status = $2, account_id = $3 \
             WHERE user_code_hash = $1 AND status = 'pending' AND expires_at > $4",
        )
        .bind(user_code_hash)
        .bind(status)
        .bind(account_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let outcome = if done.rows_affected() > 0 {
            DecideOutcome::Decided
        } else {
            let row: Option<(String, i64)> =
                sqlx::query_as("SELECT status, expires_at FROM device_codes WHERE user_code_hash = $1")
                    .bind(user_code_hash)
                    .fetch_optional(&mut *tx)
                    .await?;
            match row {
                None => DecideOutcome::Missing,
                Some((_, expires_at)) if expires_at <= now => DecideOutcome::Expired,
                Some(_) => DecideOutcome::AlreadyDecided,
            }
        };
        tx.commit().await?;
        Ok(outcome)
    }

    pub(super) async fn poll_device_code_impl(
        &self,
        device_code_hash: &str,
        now: Millis,
        key: NewDeviceKey,
    ) -> Result<PollOutcome> {
        let mut tx = self.begin_write().await?;
        let row: Option<CodeRow> = sqlx::query_as(
            "SELECT status, account_id, interval_secs, last_polled_at, expires_at, device_name \
             FROM device_codes WHERE device_code_hash = $1",
        )
        .bind(device_code_hash)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((status, account_id, interval_secs, last_polled_at, expires_at, device_name)) = row else {
            return Ok(PollOutcome::Missing);
        };
        let step = judge_poll(
            CodeState {
                status: &status,
                account_id,
                interval_secs,
                last_polled_at,
                expires_at,
            },
            now,
        );
        let outcome = match step {
            PollStep::SlowDown { interval_secs } => {
                sqlx::query(
                    "UPDATE device_codes SET interval_secs = $2, last_polled_at = $3 WHERE device_code_hash = $1",
                )
                .bind(device_code_hash)
                .bind(i64::from(interval_secs))
                .bind(now)
                .execute(&mut *tx)
                .await?;
                PollOutcome::SlowDown { interval_secs }
            }
            PollStep::Pending => {
                sqlx::query("UPDATE device_codes SET last_polled_at = $2 WHERE device_code_hash = $1")
                    .bind(device_code_hash)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                PollOutcome::Pending
            }
            PollStep::Expired | PollStep::Denied | PollStep::Approved { .. } => {
                sqlx::query("DELETE FROM device_codes WHERE device_code_hash = $1")
                    .bind(device_code_hash)
                    .execute(&mut *tx)
                    .await?;
                match step {
                    PollStep::Approved { account_id } => {
                        let row: DeviceRow = sqlx::query_as(
                            "INSERT INTO devices (id, account_id, name, access_key_hash, created_at) \
                             VALUES ($1, $2, $3, $4, $5) RETURNING *",
                        )
                        .bind(&key.id)
                        .bind(&account_id)
                        .bind(&device_name)
                        .bind(&key.access_key_hash)
                        .bind(now)
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(|e| {
                            on_insert(e, || format!("device {}", key.id), || format!("account {account_id}"))
                        })?;
                        PollOutcome::Issued(Device::from(row))
                    }
                    PollStep::Denied => PollOutcome::Denied,
                    _ => PollOutcome::Expired,
                }
            }
        };
        tx.commit().await?;
        Ok(outcome)
    }

    pub(super) async fn purge_expired_device_codes_impl(&self, now: Millis) -> Result<u64> {
        let done = sqlx::query("DELETE FROM device_codes WHERE expires_at <= $1")
            .bind(now)
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected())
    }

    pub(super) async fn put_assignment_impl(
        &self,
        device_id: &str,
        models: &[(Service, String)],
        hardware: &str,
        now: Millis,
    ) -> Result<()> {
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO device_reports (device_id, hardware, assigned_at) VALUES ($1, $2, $3) \
             ON CONFLICT (device_id) DO UPDATE SET hardware = excluded.hardware, assigned_at = excluded.assigned_at",
        )
        .bind(device_id)
        .bind(hardware)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| on_insert(e, String::new, || format!("device {device_id}")))?;
        sqlx::query("DELETE FROM device_assignments WHERE device_id = $1")
            .bind(device_id)
            .execute(&mut *tx)
            .await?;
        for (service, model) in models {
            sqlx::query(
                "INSERT INTO device_assignments (device_id, service, model) VALUES ($1, $2, $3) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(device_id)
            .bind(service.as_str())
            .bind(model)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn assignment_impl(&self, device_id: &str) -> Result<Option<StoredAssignment>> {
        let report: Option<(String, i64)> =
            sqlx::query_as("SELECT hardware, assigned_at FROM device_reports WHERE device_id = $1")
                .bind(device_id)
                .fetch_optional(self.reads().await)
                .await?;
        let Some((hardware, assigned_at)) = report else {
            return Ok(None);
        };
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT service, model FROM device_assignments WHERE device_id = $1 ORDER BY service, model",
        )
        .bind(device_id)
        .fetch_all(self.reads().await)
        .await?;
        Ok(Some(StoredAssignment {
            models: parse_models(rows)?,
            hardware,
            assigned_at,
        }))
    }
}
