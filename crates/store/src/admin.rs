//! Types of the operator tools and the dashboards: versioned prices,
//! notification banners, balance adjustments and usage aggregates.
//!
//! The SQL both backends run is kept here once (it is the same text for
//! SQLite and PostgreSQL), so the two cannot drift apart.

use serde::Serialize;

use crate::{Millis, Result, Service, StoreError};

/// One version of the price table. The gateway owns the shape (it is the
/// `[pricing]` section as JSON); the store keeps it as text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct PricingVersion {
    pub version: i64,
    pub pricing: String,
    /// Who made the change (an administrator's email).
    pub created_by: String,
    pub created_at: Millis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BannerLevel {
    Info,
    Warning,
    Critical,
}

impl BannerLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            BannerLevel::Info => "info",
            BannerLevel::Warning => "warning",
            BannerLevel::Critical => "critical",
        }
    }

    pub fn parse(s: &str) -> Option<BannerLevel> {
        match s {
            "info" => Some(BannerLevel::Info),
            "warning" => Some(BannerLevel::Warning),
            "critical" => Some(BannerLevel::Critical),
            _ => None,
        }
    }
}

/// A notice shown on every page between `starts_at` and `ends_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Banner {
    pub id: String,
    pub message: String,
    pub level: BannerLevel,
    pub starts_at: Millis,
    pub ends_at: Millis,
    pub created_by: String,
    pub created_at: Millis,
}

#[derive(Debug, Clone)]
pub struct NewBanner {
    pub message: String,
    pub level: BannerLevel,
    pub starts_at: Millis,
    pub ends_at: Millis,
    pub created_by: String,
}

/// One account's usage on one day for one (service, model), from the roll-ups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageDay {
    pub day: String,
    pub service: Service,
    pub model: String,
    pub requests: i64,
    pub errors: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cost: i64,
}

/// What one provider account's devices served on one day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct ProviderDay {
    pub day: String,
    pub requests: i64,
    pub reward: i64,
}

/// Network-wide usage since some time (the public statistics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct NetworkUsage {
    pub requests: i64,
    pub errors: i64,
    /// Sum of request latencies, for the average.
    pub latency_ms: i64,
    /// Successful chat requests: completion tokens and the time they took.
    pub chat_output_tokens: i64,
    pub chat_latency_ms: i64,
}

/// Most characters a banner message may have.
pub const BANNER_MAX: usize = 500;
/// Largest single adjustment, in credits (one million dollars).
pub const ADJUST_MAX: i64 = 1_000_000_000_000_000;

pub(crate) fn check_banner(b: &NewBanner) -> Result<()> {
    let len = b.message.trim().chars().count();
    if len == 0 || len > BANNER_MAX {
        return Err(StoreError::InvalidInput(format!(
            "a banner message is 1-{BANNER_MAX} characters"
        )));
    }
    if b.ends_at <= b.starts_at {
        return Err(StoreError::InvalidInput("a banner must end after it starts".into()));
    }
    Ok(())
}

pub(crate) fn check_adjustment(amount: i64) -> Result<()> {
    if amount == 0 || !(-ADJUST_MAX..=ADJUST_MAX).contains(&amount) {
        return Err(StoreError::InvalidInput(format!(
            "an adjustment is a non-zero amount of at most {ADJUST_MAX} credits either way"
        )));
    }
    Ok(())
}

/// `%…%` for a LIKE search on a lowercased column, with LIKE's wildcards
/// in the query taken literally (escaped with `\`).
pub(crate) fn like_pattern(query: &str) -> String {
    let mut p = String::with_capacity(query.len() + 2);
    p.push('%');
    for c in query.trim().to_lowercase().chars() {
        if matches!(c, '%' | '_' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('%');
    p
}

pub(crate) const SEARCH_ACCOUNTS: &str = "SELECT * FROM accounts WHERE id = $1 \
     OR lower(COALESCE(email, '')) LIKE $2 ESCAPE '\\' OR lower(name) LIKE $2 ESCAPE '\\' \
     ORDER BY created_at, id LIMIT $3";

/// Checks the amount against the balance in the same statement that changes
/// it: `$3` is the least balance the change leaves at zero or more, `$4` the
/// most that does not overflow (no arithmetic on parameters, which
/// PostgreSQL could evaluate into an overflow error).
pub(crate) const ADJUST_BALANCE: &str = "UPDATE accounts SET balance = balance + $2 \
     WHERE id = $1 AND balance >= $3 AND balance <= $4 RETURNING balance";

pub(crate) const ADJUST_REFUSED: &str = "the adjustment would make the balance negative (or overflow it)";

pub(crate) const INSERT_LEDGER: &str = "INSERT INTO ledger (account_id, kind, amount, note, created_at) \
     VALUES ($1, $2, $3, $4, $5)";

pub(crate) const ADD_PRICING: &str = "INSERT INTO pricing_versions (version, pricing, created_by, created_at) \
     SELECT COALESCE(MAX(version), 0) + 1, $1, $2, $3 FROM pricing_versions RETURNING *";

pub(crate) const LATEST_PRICING: &str = "SELECT * FROM pricing_versions ORDER BY version DESC LIMIT 1";

pub(crate) const PRICING_HISTORY: &str = "SELECT * FROM pricing_versions ORDER BY version DESC LIMIT $1";

pub(crate) const INSERT_BANNER: &str = "INSERT INTO banners \
     (id, message, level, starts_at, ends_at, created_by, created_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *";

/// Banners not yet over at `$1` (current and scheduled).
pub(crate) const BANNERS_FROM: &str = "SELECT * FROM banners WHERE ends_at > $1 ORDER BY starts_at, id";

pub(crate) const DELETE_BANNER: &str = "DELETE FROM banners WHERE id = $1";

pub(crate) const USAGE_DAYS: &str = "SELECT day, service, model, \
     CAST(SUM(requests) AS BIGINT) AS requests, CAST(SUM(errors) AS BIGINT) AS errors, \
     CAST(SUM(input_tokens) AS BIGINT) AS input_tokens, CAST(SUM(output_tokens) AS BIGINT) AS output_tokens, \
     CAST(SUM(cost) AS BIGINT) AS cost \
     FROM daily_rollups WHERE account_id = $1 AND day >= $2 \
     GROUP BY day, service, model ORDER BY day, service, model";

/// Roll-ups are keyed by the paying account; the device says whose hardware served.
pub(crate) const PROVIDER_DAYS: &str = "SELECT r.day, CAST(SUM(r.requests) AS BIGINT) AS requests, \
     CAST(SUM(r.reward) AS BIGINT) AS reward \
     FROM daily_rollups r JOIN devices d ON d.id = r.device_id \
     WHERE d.account_id = $1 AND r.day >= $2 GROUP BY r.day ORDER BY r.day";

pub(crate) const PROVIDER_TOTAL: &str = "SELECT CAST(COALESCE(SUM(r.requests), 0) AS BIGINT), \
     CAST(COALESCE(SUM(r.reward), 0) AS BIGINT) \
     FROM daily_rollups r JOIN devices d ON d.id = r.device_id WHERE d.account_id = $1";

pub(crate) const NETWORK_USAGE: &str = "SELECT CAST(COUNT(*) AS BIGINT), \
     CAST(COALESCE(SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END), 0) AS BIGINT), \
     CAST(COALESCE(SUM(latency_ms), 0) AS BIGINT), \
     CAST(COALESCE(SUM(CASE WHEN service = 'chat' AND status < 400 THEN output_tokens ELSE 0 END), 0) AS BIGINT), \
     CAST(COALESCE(SUM(CASE WHEN service = 'chat' AND status < 400 THEN latency_ms ELSE 0 END), 0) AS BIGINT) \
     FROM usage_records WHERE created_at >= $1";

/// A page of the ledger: entries older than the cursor (an entry id).
pub(crate) const LEDGER_PAGE: &str = "SELECT * FROM ledger WHERE account_id = $1 AND id < $2 \
     ORDER BY id DESC LIMIT $3";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_patterns_take_wildcards_literally() {
        assert_eq!(like_pattern(" Al%i_ce\\ "), "%al\\%i\\_ce\\\\%");
    }
}

/// Rows whose columns need parsing.
#[derive(sqlx::FromRow)]
pub(crate) struct BannerRow {
    id: String,
    message: String,
    level: String,
    starts_at: i64,
    ends_at: i64,
    created_by: String,
    created_at: i64,
}

impl TryFrom<BannerRow> for Banner {
    type Error = StoreError;

    fn try_from(r: BannerRow) -> Result<Self> {
        Ok(Banner {
            level: BannerLevel::parse(&r.level)
                .ok_or_else(|| StoreError::Corrupt(format!("unknown banner level {:?}", r.level)))?,
            id: r.id,
            message: r.message,
            starts_at: r.starts_at,
            ends_at: r.ends_at,
            created_by: r.created_by,
            created_at: r.created_at,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct UsageDayRow {
    day: String,
    service: String,
    model: String,
    requests: i64,
    errors: i64,
    input_tokens: i64,
    output_tokens: i64,
    cost: i64,
}

impl TryFrom<UsageDayRow> for UsageDay {
    type Error = StoreError;

    fn try_from(r: UsageDayRow) -> Result<Self> {
        Ok(UsageDay {
            service: Service::parse(&r.service)
                .ok_or_else(|| StoreError::Corrupt(format!("unknown service {:?}", r.service)))?,
            day: r.day,
            model: r.model,
            requests: r.requests,
            errors: r.errors,
            input_tokens: r.input_tokens,
            output_tokens: r.output_tokens,
            cost: r.cost,
        })
    }
}

/// Implements [`crate::AdminStore`] for a backend. The SQL is shared; the
/// backend names its read and write pools and how it begins a write
/// transaction.
#[macro_export]
#[doc(hidden)]
macro_rules! impl_admin_store {
    ($store:ty, read = $r:ident, write = $w:ident, begin = $begin:ident) => {
        #[::async_trait::async_trait]
        impl $crate::AdminStore for $store {
            async fn search_accounts(&self, query: &str, limit: i64) -> $crate::Result<Vec<$crate::Account>> {
                use $crate::admin::*;
                let rows: Vec<$crate::rows::AccountRow> = ::sqlx::query_as(SEARCH_ACCOUNTS)
                    .bind(query.trim())
                    .bind(like_pattern(query))
                    .bind(limit.max(0))
                    .fetch_all(self.$r().await)
                    .await?;
                Ok(rows.into_iter().map(|row| self.shown(row.into())).collect())
            }

            async fn adjust_balance(&self, account_id: &str, amount: i64, note: &str) -> $crate::Result<i64> {
                $crate::admin::check_adjustment(amount)?;
                self.adjust(account_id, amount, note).await
            }

            async fn ledger_page(
                &self,
                account_id: &str,
                before_id: Option<i64>,
                limit: i64,
            ) -> $crate::Result<Vec<$crate::LedgerEntry>> {
                let rows: Vec<$crate::rows::LedgerRow> = ::sqlx::query_as($crate::admin::LEDGER_PAGE)
                    .bind(account_id)
                    .bind(before_id.unwrap_or(i64::MAX))
                    .bind(limit.max(0))
                    .fetch_all(self.$r().await)
                    .await?;
                $crate::rows::convert_all(rows)
            }

            async fn add_pricing_version(
                &self,
                pricing: &str,
                created_by: &str,
            ) -> $crate::Result<$crate::PricingVersion> {
                ::sqlx::query_as($crate::admin::ADD_PRICING)
                    .bind(pricing)
                    .bind(created_by)
                    .bind($crate::now_millis())
                    .fetch_one(&self.$w)
                    .await
                    .map_err(|e| {
                        $crate::error::on_insert(
                            e,
                            || "the prices were changed at the same time; try again".into(),
                            String::new,
                        )
                    })
            }

            async fn latest_pricing_version(&self) -> $crate::Result<Option<$crate::PricingVersion>> {
                Ok(::sqlx::query_as($crate::admin::LATEST_PRICING)
                    .fetch_optional(self.$r().await)
                    .await?)
            }

            async fn pricing_versions(&self, limit: i64) -> $crate::Result<Vec<$crate::PricingVersion>> {
                Ok(::sqlx::query_as($crate::admin::PRICING_HISTORY)
                    .bind(limit.max(0))
                    .fetch_all(self.$r().await)
                    .await?)
            }

            async fn create_banner(&self, banner: $crate::NewBanner) -> $crate::Result<$crate::Banner> {
                $crate::admin::check_banner(&banner)?;
                let row: $crate::admin::BannerRow = ::sqlx::query_as($crate::admin::INSERT_BANNER)
                    .bind($crate::ids::new_id("ban_"))
                    .bind(banner.message.trim())
                    .bind(banner.level.as_str())
                    .bind(banner.starts_at)
                    .bind(banner.ends_at)
                    .bind(&banner.created_by)
                    .bind($crate::now_millis())
                    .fetch_one(&self.$w)
                    .await?;
                row.try_into()
            }

            async fn banners_from(&self, now: $crate::Millis) -> $crate::Result<Vec<$crate::Banner>> {
                let rows: Vec<$crate::admin::BannerRow> = ::sqlx::query_as($crate::admin::BANNERS_FROM)
                    .bind(now)
                    .fetch_all(self.$r().await)
                    .await?;
                $crate::rows::convert_all(rows)
            }

            async fn delete_banner(&self, id: &str) -> $crate::Result<bool> {
                let done = ::sqlx::query($crate::admin::DELETE_BANNER)
                    .bind(id)
                    .execute(&self.$w)
                    .await?;
                Ok(done.rows_affected() > 0)
            }

            async fn usage_days(&self, account_id: &str, since_day: &str) -> $crate::Result<Vec<$crate::UsageDay>> {
                let rows: Vec<$crate::admin::UsageDayRow> = ::sqlx::query_as($crate::admin::USAGE_DAYS)
                    .bind(account_id)
                    .bind(since_day)
                    .fetch_all(self.$r().await)
                    .await?;
                $crate::rows::convert_all(rows)
            }

            async fn provider_days(
                &self,
                account_id: &str,
                since_day: &str,
            ) -> $crate::Result<Vec<$crate::ProviderDay>> {
                Ok(::sqlx::query_as($crate::admin::PROVIDER_DAYS)
                    .bind(account_id)
                    .bind(since_day)
                    .fetch_all(self.$r().await)
                    .await?)
            }

            async fn provider_totals(&self, account_id: &str) -> $crate::Result<(i64, i64)> {
                Ok(::sqlx::query_as($crate::admin::PROVIDER_TOTAL)
                    .bind(account_id)
                    .fetch_one(self.$r().await)
                    .await?)
            }

            async fn network_usage(&self, since: $crate::Millis) -> $crate::Result<$crate::NetworkUsage> {
                let (requests, errors, latency_ms, chat_output_tokens, chat_latency_ms): (i64, i64, i64, i64, i64) =
                    ::sqlx::query_as($crate::admin::NETWORK_USAGE)
                        .bind(since)
                        .fetch_one(self.$r().await)
                        .await?;
                Ok($crate::NetworkUsage {
                    requests,
                    errors,
                    latency_ms,
                    chat_output_tokens,
                    chat_latency_ms,
                })
            }
        }
    };
}
