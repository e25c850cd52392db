//! What the operator pages and their JSON routes do, once for both: credit
//! changes, suspensions, price table versions, disconnects, referral payouts.

use cxmpute_store::{now_millis, Account, Banner, PayoutRun, PricingVersion, StoreError};
use serde::Deserialize;

use crate::config::Pricing;
use crate::error::ApiError;
use crate::state::AppState;

/// Deposits add money from outside (a payment); adjustments correct a
/// balance either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CreditKind {
    Deposit,
    Adjust,
}

/// Most characters of a reason (suspension, credit change).
pub const REASON_MAX: usize = 500;

pub fn check_reason(reason: &str) -> Result<&str, ApiError> {
    let reason = reason.trim();
    if reason.is_empty() || reason.chars().count() > REASON_MAX {
        return Err(ApiError::bad_request(format!("'reason' must be 1-{REASON_MAX} characters")).with_param("reason"));
    }
    Ok(reason)
}

pub async fn account(state: &AppState, id: &str) -> Result<Account, ApiError> {
    state
        .store
        .account(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no account '{id}'")))
}

/// Records a deposit or an adjustment with the administrator's email and the
/// reason in the ledger note; returns the new balance. An adjustment may not
/// take the balance below zero.
pub async fn credit(
    state: &AppState,
    admin: &str,
    account_id: &str,
    kind: CreditKind,
    amount: i64,
    reason: &str,
) -> Result<i64, ApiError> {
    let reason = check_reason(reason)?;
    account(state, account_id).await?;
    let note = format!("{reason} (by {admin})");
    let result = match kind {
        CreditKind::Deposit if amount <= 0 => {
            return Err(ApiError::bad_request("a deposit is a positive amount").with_param("amount"))
        }
        CreditKind::Deposit => state.store.deposit(account_id, amount, Some(&note)).await,
        CreditKind::Adjust => state.store.adjust_balance(account_id, amount, &note).await,
    };
    let balance = result.map_err(|e| match e {
        StoreError::InvalidInput(m) => ApiError::bad_request(m).with_param("amount"),
        other => other.into(),
    })?;
    tracing::info!(account = %account_id, admin, ?kind, amount, "credits changed by an administrator");
    Ok(balance)
}

/// Suspends (with a reason) or lifts a suspension. A suspension takes effect
/// at once everywhere: cached keys are dropped (the next API call reads the
/// flag and gets 403), web sessions end, and the account's devices are
/// disconnected (their links refuse to come back while suspended).
pub async fn set_suspended(state: &AppState, account_id: &str, reason: Option<&str>) -> Result<(), ApiError> {
    account(state, account_id).await?;
    state.store.set_suspended(account_id, reason).await?;
    state.keys.clear();
    if reason.is_some() {
        state.store.delete_sessions_of(account_id).await?;
        for device in state.store.devices(account_id).await? {
            disconnect_device(state, &device.id).await?;
        }
    }
    Ok(())
}

/// Closes a device's links and takes its provisions out of the pools;
/// returns (links closed, provisions removed).
pub async fn disconnect_device(state: &AppState, device_id: &str) -> Result<(usize, usize), ApiError> {
    let links = state.links.close_device(device_id);
    let removed = state.pools.remove_device(device_id);
    state.store.set_device_offline(device_id, None).await?;
    if links + removed > 0 {
        tracing::info!(device = %device_id, links, removed, "device disconnected by an operator");
    }
    Ok((links, removed))
}

/// Validates a price table, stores it as the next version and puts it in
/// force on this gateway (others pick it up within `web.pricing_refresh_secs`).
pub async fn change_pricing(state: &AppState, admin: &str, pricing: Pricing) -> Result<PricingVersion, ApiError> {
    pricing
        .validate()
        .map_err(|e| ApiError::bad_request(e.to_string()).with_param("pricing"))?;
    let text = serde_json::to_string(&pricing).map_err(|_| ApiError::internal())?;
    let version = state
        .store
        .add_pricing_version(&text, admin)
        .await
        .map_err(|e| match e {
            StoreError::Conflict(m) => {
                let mut e = ApiError::bad_request(m);
                e.status = axum::http::StatusCode::CONFLICT;
                e
            }
            other => other.into(),
        })?;
    state.use_pricing(version.version, pricing);
    tracing::info!(version = version.version, admin, "price table changed");
    Ok(version)
}

/// Puts the newest stored price table in force if it is newer than the one
/// in use. A version that does not parse (written by a newer gateway) is
/// skipped with a warning: the prices in force stay.
pub async fn refresh_pricing(state: &AppState) -> Result<bool, StoreError> {
    let Some(latest) = state.store.latest_pricing_version().await? else {
        return Ok(false);
    };
    if latest.version <= state.pricing_version() {
        return Ok(false);
    }
    match serde_json::from_str::<Pricing>(&latest.pricing) {
        Ok(p) if p.validate().is_ok() => Ok(state.use_pricing(latest.version, p)),
        _ => {
            tracing::warn!(
                version = latest.version,
                "stored price table does not parse; keeping the current one"
            );
            Ok(false)
        }
    }
}

/// Banners showing now.
pub async fn live_banners(state: &AppState) -> Result<Vec<Banner>, StoreError> {
    let now = now_millis();
    Ok(state
        .store
        .banners_from(now)
        .await?
        .into_iter()
        .filter(|b| b.starts_at <= now)
        .collect())
}

/// Pays referral shares for `day`, or for the configured number of finished
/// days before today.
pub async fn pay_referrals(state: &AppState, day: Option<&str>) -> Result<Vec<PayoutRun>, ApiError> {
    let plan = state.config.web.referrals.plan().ok_or_else(ApiError::internal)?;
    let days: Vec<String> = match day {
        Some(day) => {
            cxmpute_store::referrals::day_bounds(day)
                .map_err(|e| ApiError::bad_request(e.to_string()).with_param("day"))?;
            vec![day.to_string()]
        }
        None => {
            let back = i64::from(state.config.web.referrals.payout_days_back);
            let today = now_millis();
            (1..=back)
                .rev()
                .map(|n| cxmpute_store::day_of(today - n * 86_400_000))
                .collect()
        }
    };
    let mut runs = Vec::new();
    for day in days {
        let run = state.store.pay_referrals(&day, &plan).await?;
        if run.paid > 0 {
            tracing::info!(day = %run.day, paid = run.paid, credits = run.credits, "referral payouts");
        }
        runs.push(run);
    }
    Ok(runs)
}
