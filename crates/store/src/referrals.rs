//! Referrals: every account's code, who referred whom, and the payouts.
//!
//! # Payouts
//! Referrers earn a share of what the accounts they brought in (and the
//! accounts those brought in, up to [`ReferralPlan`]'s depth) earned as
//! providers and spent as users, per UTC day. [`Store::pay_referrals`](crate::Store::pay_referrals)
//! computes one day from the usage records — never on the request path —
//! and writes one ledger entry per (referrer, referred, day, level, kind).
//! The entry's `request_id` is that key ([`payout_key`]) and the ledger's
//! referral entries are unique on (request_id, kind, account_id), so a day
//! paid twice pays once.
//! A one-off bonus for the first paid usage has a key without the day.

use std::collections::HashMap;

use serde::Serialize;

use crate::{Millis, Result, StoreError};

/// Shares in basis points (1/100 of a percent) per level, level 1 first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReferralPlan {
    /// Of the referred account's provider rewards.
    pub reward_bps: Vec<u32>,
    /// Of the referred account's usage spend.
    pub spend_bps: Vec<u32>,
    /// Paid once to the direct referrer when the referred account first pays for usage.
    pub first_usage_bonus: i64,
}

/// Deepest referral chain a plan may pay.
pub const MAX_LEVELS: usize = 10;

impl ReferralPlan {
    pub fn validate(&self) -> Result<()> {
        let ok = |v: &[u32]| v.len() <= MAX_LEVELS && v.iter().all(|b| *b <= 10_000);
        if !ok(&self.reward_bps) || !ok(&self.spend_bps) || self.first_usage_bonus < 0 {
            return Err(StoreError::InvalidInput(format!(
                "referral shares are at most {MAX_LEVELS} levels of 0-10000 basis points; the bonus is not negative"
            )));
        }
        Ok(())
    }

    fn levels(&self) -> usize {
        self.reward_bps.len().max(self.spend_bps.len()).max(1)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PayoutKind {
    /// Share of the referred account's provider rewards.
    Reward,
    /// Share of the referred account's usage spend.
    Spend,
    /// The one-off first-paid-usage bonus.
    Bonus,
}

impl PayoutKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PayoutKind::Reward => "reward",
            PayoutKind::Spend => "spend",
            PayoutKind::Bonus => "bonus",
        }
    }
}

/// One ledger entry a payout run wants to write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Payout {
    pub referrer_id: String,
    pub referred_id: String,
    pub level: u8,
    pub kind: PayoutKind,
    pub amount: i64,
    /// The ledger entry's `request_id`: unique per payout.
    pub key: String,
    pub note: String,
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PayoutRun {
    pub day: String,
    /// Entries written now.
    pub paid: u64,
    /// Entries found already paid (by an earlier run).
    pub already_paid: u64,
    /// Credits paid now.
    pub credits: i64,
}

/// An account someone referred, as the referrer sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Referred {
    pub account_id: String,
    pub name: String,
    pub referred_at: Millis,
}

/// `referral:<day>:<referred>:<level>:<kind>`; the bonus has no day.
pub fn payout_key(day: &str, referred_id: &str, level: u8, kind: PayoutKind) -> String {
    match kind {
        PayoutKind::Bonus => format!("referral:bonus:{referred_id}"),
        _ => format!("referral:{day}:{referred_id}:{level}:{}", kind.as_str()),
    }
}

/// The day's payouts from its per-account sums and the referral edges
/// (referred → referrer). Pure, so both backends pay exactly the same.
pub(crate) fn plan_payouts(
    day: &str,
    plan: &ReferralPlan,
    edges: &HashMap<String, String>,
    rewards: &[(String, i64)],
    spend: &[(String, i64)],
) -> Vec<Payout> {
    let mut out = Vec::new();
    let mut add = |referred: &str, total: i64, bps: &[u32], kind: PayoutKind| {
        let mut current = referred;
        for (i, share) in bps.iter().enumerate().take(plan.levels()) {
            let Some(referrer) = edges.get(current) else { break };
            // A chain that came back to the referred account (a cycle the
            // store refuses, but stop anyway) pays no one twice.
            if referrer == referred {
                break;
            }
            let level = u8::try_from(i + 1).unwrap_or(u8::MAX);
            let amount = i64::try_from(i128::from(total) * i128::from(*share) / 10_000).unwrap_or(0);
            if amount > 0 {
                out.push(Payout {
                    referrer_id: referrer.clone(),
                    referred_id: referred.to_string(),
                    level,
                    kind,
                    amount,
                    key: payout_key(day, referred, level, kind),
                    note: format!(
                        "level {level} referral share of {referred}'s {} on {day}",
                        match kind {
                            PayoutKind::Reward => "provider rewards",
                            _ => "usage spend",
                        }
                    ),
                });
            }
            current = referrer;
        }
    };
    for (account, total) in rewards {
        add(account, *total, &plan.reward_bps, PayoutKind::Reward);
    }
    for (account, total) in spend {
        add(account, *total, &plan.spend_bps, PayoutKind::Spend);
    }
    if plan.first_usage_bonus > 0 {
        for (account, total) in spend {
            if let (Some(referrer), true) = (edges.get(account), *total > 0) {
                out.push(Payout {
                    referrer_id: referrer.clone(),
                    referred_id: account.clone(),
                    level: 1,
                    kind: PayoutKind::Bonus,
                    amount: plan.first_usage_bonus,
                    key: payout_key(day, account, 1, PayoutKind::Bonus),
                    note: format!("referral bonus: {account} paid for usage for the first time"),
                });
            }
        }
    }
    // Referrers in id order: PostgreSQL locks their rows in this order.
    out.sort_by(|a, b| a.referrer_id.cmp(&b.referrer_id).then(a.key.cmp(&b.key)));
    out
}

/// `[start, end)` in milliseconds of a `YYYY-MM-DD` (UTC) day.
pub fn day_bounds(day: &str) -> Result<(Millis, Millis)> {
    let bad = || StoreError::InvalidInput(format!("{day:?} is not a YYYY-MM-DD date"));
    let mut parts = day.split('-');
    let (Some(y), Some(m), Some(d), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(bad());
    };
    if y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return Err(bad());
    }
    let (y, m, d): (i64, i64, i64) = (
        y.parse().map_err(|_| bad())?,
        m.parse().map_err(|_| bad())?,
        d.parse().map_err(|_| bad())?,
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err(bad());
    }
    // Days-from-civil (Howard Hinnant's public-domain algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let start = days * 86_400_000;
    // 2026-02-31 and the like: the day must read back the same.
    if crate::day_of(start) != day {
        return Err(bad());
    }
    Ok((start, start + 86_400_000))
}

/// Generates a referral code: 8 characters that read unambiguously.
pub(crate) fn new_code() -> String {
    use rand::Rng;
    const SYMBOLS: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::rngs::OsRng;
    (0..8)
        .map(|_| char::from(SYMBOLS[rng.gen_range(0..SYMBOLS.len())]))
        .collect()
}

/// A code as typed: trimmed, uppercased, and of the right alphabet.
pub fn normalize_code(raw: &str) -> Option<String> {
    let code = raw.trim().to_ascii_uppercase();
    (code.len() == 8 && code.bytes().all(|b| b.is_ascii_alphanumeric())).then_some(code)
}

pub(crate) const CODE_OF: &str = "SELECT code FROM referrals WHERE account_id = $1";
pub(crate) const INSERT_CODE: &str = "INSERT INTO referrals (account_id, code, created_at) VALUES ($1, $2, $3) \
     ON CONFLICT (account_id) DO NOTHING";
pub(crate) const ACCOUNT_OF_CODE: &str = "SELECT account_id FROM referrals WHERE code = $1";
pub(crate) const REFERRER_OF: &str = "SELECT referrer_id FROM referrals WHERE account_id = $1";
pub(crate) const SET_REFERRER: &str = "UPDATE referrals SET referrer_id = $2, referred_at = $3 \
     WHERE account_id = $1 AND referrer_id IS NULL";
pub(crate) const REFERRED_BY: &str = "SELECT r.account_id, a.name, r.referred_at FROM referrals r \
     JOIN accounts a ON a.id = r.account_id WHERE r.referrer_id = $1 ORDER BY r.referred_at, r.account_id";
pub(crate) const EDGES: &str = "SELECT account_id, referrer_id FROM referrals WHERE referrer_id IS NOT NULL";
pub(crate) const DAY_REWARDS: &str = "SELECT provider_account_id, CAST(SUM(reward) AS BIGINT) FROM usage_records \
     WHERE created_at >= $1 AND created_at < $2 AND provider_account_id IS NOT NULL AND reward > 0 \
     GROUP BY provider_account_id";
pub(crate) const DAY_SPEND: &str = "SELECT account_id, CAST(SUM(cost) AS BIGINT) FROM usage_records \
     WHERE created_at >= $1 AND created_at < $2 AND cost > 0 GROUP BY account_id";
pub(crate) const INSERT_PAYOUT: &str = "INSERT INTO ledger (account_id, kind, amount, request_id, note, created_at) \
     VALUES ($1, 'referral', $2, $3, $4, $5) ON CONFLICT (request_id, kind, account_id) WHERE kind = 'referral' DO NOTHING RETURNING id";
pub(crate) const CREDIT: &str = "UPDATE accounts SET balance = balance + $2 WHERE id = $1 AND balance <= $3 - $2";

/// Implements [`crate::ReferralStore`] for a backend (see `impl_admin_store`).
#[macro_export]
#[doc(hidden)]
macro_rules! impl_referral_store {
    ($store:ty, read = $r:ident, write = $w:ident, begin = $begin:ident) => {
        #[::async_trait::async_trait]
        impl $crate::ReferralStore for $store {
            async fn referral_code(&self, account_id: &str) -> $crate::Result<String> {
                use $crate::referrals::*;
                let found: Option<String> = ::sqlx::query_scalar(CODE_OF)
                    .bind(account_id)
                    .fetch_optional(self.$r().await)
                    .await?;
                if let Some(code) = found {
                    return Ok(code);
                }
                // A new code may collide with another account's: draw again.
                for _ in 0..8 {
                    let inserted = ::sqlx::query(INSERT_CODE)
                        .bind(account_id)
                        .bind(new_code())
                        .bind($crate::now_millis())
                        .execute(&self.$w)
                        .await;
                    match inserted {
                        Ok(_) => break,
                        Err(e) => match $crate::error::on_insert(e, String::new, || format!("account {account_id}")) {
                            $crate::StoreError::Conflict(_) => continue,
                            other => return Err(other),
                        },
                    }
                }
                ::sqlx::query_scalar(CODE_OF)
                    .bind(account_id)
                    .fetch_optional(&self.$w)
                    .await?
                    .ok_or_else(|| $crate::StoreError::Conflict("no free referral code was found".into()))
            }

            async fn account_of_referral_code(&self, code: &str) -> $crate::Result<Option<String>> {
                Ok(::sqlx::query_scalar($crate::referrals::ACCOUNT_OF_CODE)
                    .bind(code)
                    .fetch_optional(self.$r().await)
                    .await?)
            }

            async fn referrer_of(&self, account_id: &str) -> $crate::Result<Option<String>> {
                let found: Option<Option<String>> = ::sqlx::query_scalar($crate::referrals::REFERRER_OF)
                    .bind(account_id)
                    .fetch_optional(self.$r().await)
                    .await?;
                Ok(found.flatten())
            }

            async fn set_referrer(&self, account_id: &str, referrer_id: &str) -> $crate::Result<()> {
                use $crate::referrals::*;
                if account_id == referrer_id {
                    return Err($crate::StoreError::InvalidInput(
                        "an account cannot refer itself".into(),
                    ));
                }
                // Both need a row (and must exist: this fails with NotFound otherwise).
                <Self as $crate::ReferralStore>::referral_code(self, account_id).await?;
                <Self as $crate::ReferralStore>::referral_code(self, referrer_id).await?;
                let mut tx = self.$begin().await?;
                let set: Option<Option<String>> = ::sqlx::query_scalar(REFERRER_OF)
                    .bind(account_id)
                    .fetch_optional(&mut *tx)
                    .await?;
                if set.flatten().is_some() {
                    return Err($crate::StoreError::Conflict(
                        "the referrer of this account is set already".into(),
                    ));
                }
                // Walking up from the referrer must not reach the account. The
                // bound only guards against a chain the store never makes.
                let mut current = referrer_id.to_string();
                for _ in 0..10_000 {
                    let up: Option<Option<String>> = ::sqlx::query_scalar(REFERRER_OF)
                        .bind(&current)
                        .fetch_optional(&mut *tx)
                        .await?;
                    match up.flatten() {
                        Some(up) if up == account_id => {
                            return Err($crate::StoreError::InvalidInput(
                                "this referrer would make a referral cycle".into(),
                            ))
                        }
                        Some(up) if up == referrer_id => break, // an older cycle: stop walking
                        Some(up) => current = up,
                        None => break,
                    }
                }
                let done = ::sqlx::query(SET_REFERRER)
                    .bind(account_id)
                    .bind(referrer_id)
                    .bind($crate::now_millis())
                    .execute(&mut *tx)
                    .await?;
                if done.rows_affected() == 0 {
                    return Err($crate::StoreError::Conflict(
                        "the referrer of this account is set already".into(),
                    ));
                }
                tx.commit().await?;
                Ok(())
            }

            async fn referred_by(&self, referrer_id: &str) -> $crate::Result<Vec<$crate::Referred>> {
                Ok(::sqlx::query_as($crate::referrals::REFERRED_BY)
                    .bind(referrer_id)
                    .fetch_all(self.$r().await)
                    .await?)
            }

            async fn pay_referrals(&self, day: &str, plan: &$crate::ReferralPlan) -> $crate::Result<$crate::PayoutRun> {
                use $crate::referrals::*;
                plan.validate()?;
                let (start, end) = day_bounds(day)?;
                let edges: Vec<(String, String)> = ::sqlx::query_as(EDGES).fetch_all(self.$r().await).await?;
                let rewards: Vec<(String, i64)> = ::sqlx::query_as(DAY_REWARDS)
                    .bind(start)
                    .bind(end)
                    .fetch_all(self.$r().await)
                    .await?;
                let spend: Vec<(String, i64)> = ::sqlx::query_as(DAY_SPEND)
                    .bind(start)
                    .bind(end)
                    .fetch_all(self.$r().await)
                    .await?;
                let payouts = plan_payouts(day, plan, &edges.into_iter().collect(), &rewards, &spend);
                let mut run = $crate::PayoutRun {
                    day: day.to_string(),
                    ..Default::default()
                };
                if payouts.is_empty() {
                    return Ok(run);
                }
                let now = $crate::now_millis();
                let mut tx = self.$begin().await?;
                for p in &payouts {
                    let id: Option<i64> = ::sqlx::query_scalar(INSERT_PAYOUT)
                        .bind(&p.referrer_id)
                        .bind(p.amount)
                        .bind(&p.key)
                        .bind(&p.note)
                        .bind(now)
                        .fetch_optional(&mut *tx)
                        .await?;
                    if id.is_none() {
                        run.already_paid += 1;
                        continue;
                    }
                    let credited = ::sqlx::query(CREDIT)
                        .bind(&p.referrer_id)
                        .bind(p.amount)
                        .bind(i64::MAX)
                        .execute(&mut *tx)
                        .await?;
                    if credited.rows_affected() == 0 {
                        return Err($crate::StoreError::InvalidInput(format!(
                            "paying {} would overflow the balance of {}",
                            p.amount, p.referrer_id
                        )));
                    }
                    run.paid += 1;
                    run.credits = run.credits.saturating_add(p.amount);
                }
                tx.commit().await?;
                Ok(run)
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_have_bounds() {
        assert_eq!(day_bounds("1970-01-01").ok(), Some((0, 86_400_000)));
        let (start, end) = day_bounds("2026-11-28").unwrap();
        assert_eq!(crate::day_of(start), "2026-11-28");
        assert_eq!(crate::day_of(end), "2026-11-29");
        assert_eq!(day_bounds("2000-02-29").map(|(s, _)| s).ok(), Some(951_782_400_000));
        for bad in [
            "2026-02-30",
            "2026-13-01",
            "26-01-01",
            "2026-1-01",
            "x",
            "2026-01-01-01",
        ] {
            assert!(day_bounds(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn three_levels_are_paid_by_share() {
        let plan = ReferralPlan {
            reward_bps: vec![1000, 500, 250],
            spend_bps: vec![1500, 800, 400],
            first_usage_bonus: 0,
        };
        // d was referred by c, c by b, b by a, a by z: four levels up.
        let edges: HashMap<String, String> = [("d", "c"), ("c", "b"), ("b", "a"), ("a", "z")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let p = plan_payouts(
            "2026-01-01",
            &plan,
            &edges,
            &[("d".into(), 10_000)],
            &[("d".into(), 1_000)],
        );
        let got: Vec<(&str, u8, PayoutKind, i64)> = p
            .iter()
            .map(|p| (p.referrer_id.as_str(), p.level, p.kind, p.amount))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a", 3, PayoutKind::Reward, 250),
                ("a", 3, PayoutKind::Spend, 40),
                ("b", 2, PayoutKind::Reward, 500),
                ("b", 2, PayoutKind::Spend, 80),
                ("c", 1, PayoutKind::Reward, 1000),
                ("c", 1, PayoutKind::Spend, 150),
            ]
        );
        assert_eq!(p[4].key, "referral:2026-01-01:d:1:reward");
    }

    #[test]
    fn codes_read_back() {
        let c = new_code();
        assert_eq!(normalize_code(&format!(" {} ", c.to_lowercase())), Some(c));
        assert_eq!(normalize_code("short"), None);
        assert_eq!(normalize_code("ABCD-123"), None);
    }
}
