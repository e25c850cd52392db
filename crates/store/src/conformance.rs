//! The behaviour every [`Store`] backend must show, as async test functions.
//!
//! Each function takes a fresh, empty store and panics on a violation. The
//! backends' test files run all of them through [`conformance_tests!`](crate::conformance_tests),
//! so a new check added here runs against every backend automatically.
//!
//! Compiled into the library (not `cfg(test)`) so the integration tests of
//! each backend can share it; it is test code nonetheless, hence the panics.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod accounts;
mod admin;
mod concurrency;
mod credits;
mod devices;
mod referrals;
mod web;

pub use accounts::*;
pub use admin::*;
pub use concurrency::*;
pub use credits::*;
pub use devices::*;
pub use referrals::*;
pub use web::*;

use crate::{now_millis, Account, ApiKey, Device, HoldRequest, LedgerKind, NewApiKey, Service, Store, UsageRecord};

/// Expands into one `#[tokio::test]` per conformance function. `$runner` is an
/// async function `run(test)` that builds a fresh store, awaits
/// `test(store)` (a `fn(Arc<dyn Store>) -> impl Future<Output = ()>`) and cleans up.
#[macro_export]
macro_rules! conformance_tests {
    ($runner:path) => {
        $crate::conformance_tests!(@each $runner;
            accounts_and_deposits,
            suspension,
            api_keys_and_auth,
            devices_and_provisions,
            hold_and_release,
            hold_refusals,
            key_credit_limit,
            settle_with_hold,
            settle_is_idempotent,
            settle_without_hold,
            settle_to_own_account,
            settle_to_missing_account,
            usage_history_and_rollups,
            expired_holds,
            holds_count_in_every_balance_shown,
            invariant_after_mixed_operations,
            concurrent_holds_and_settles,
            crossed_settlements,
            concurrent_double_settle,
            failures_among_concurrent_settlements,
            login_codes,
            concurrent_code_checks,
            sessions,
            device_codes,
            concurrent_device_polls,
            assignments,
            device_revocation,
            api_key_edits,
            account_search_and_adjustments,
            pricing_versions_and_banners,
            usage_and_provider_aggregates,
            referral_codes_and_referrers,
            referral_payouts_are_idempotent,
        );
    };
    (@each $runner:path; $($name:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                $runner($crate::conformance::$name).await;
            }
        )*
    };
}

/// A new account holding `credits` (deposited, so the ledger explains them).
pub async fn account_with(s: &dyn Store, name: &str, credits: i64) -> Account {
    let account = s.create_account(name, None).await.expect("create account");
    if credits > 0 {
        s.deposit(&account.id, credits, Some("test funds"))
            .await
            .expect("deposit");
    }
    s.account(&account.id)
        .await
        .expect("read account")
        .expect("account exists")
}

pub async fn key_of(s: &dyn Store, account: &Account, id: &str, limit: Option<i64>) -> ApiKey {
    s.create_api_key(NewApiKey {
        id: id.to_string(),
        account_id: account.id.clone(),
        name: format!("key {id}"),
        prefix: format!("sk-cx-{id}"),
        secret_hash: crate::ids::hash_secret(id),
        credit_limit: limit,
        allowed_services: None,
        rpm_limit: None,
    })
    .await
    .expect("create api key")
}

pub async fn device_of(s: &dyn Store, owner: &Account, id: &str) -> Device {
    s.create_device(&owner.id, &format!("device {id}"), id, "hash")
        .await
        .expect("create device")
}

/// A hold that expires a minute from now.
pub fn hold_of(request_id: &str, key: &ApiKey, amount: i64) -> HoldRequest {
    HoldRequest {
        request_id: request_id.to_string(),
        account_id: key.account_id.clone(),
        key_id: key.id.clone(),
        amount,
        expires_at: now_millis() + 60_000,
    }
}

/// A successful chat request answered by `provider` (if any).
pub fn usage_of(request_id: &str, key: &ApiKey, cost: i64, reward: i64, provider: Option<&Device>) -> UsageRecord {
    UsageRecord {
        request_id: request_id.to_string(),
        account_id: key.account_id.clone(),
        key_id: key.id.clone(),
        device_id: provider.map(|d| d.id.clone()),
        provider_account_id: provider.map(|d| d.account_id.clone()),
        provision_id: None,
        service: Service::Chat,
        model: "test-model".to_string(),
        input_tokens: 10,
        output_tokens: 20,
        characters: 0,
        pages: 0,
        latency_ms: 100,
        ttfb_ms: 10,
        status: 200,
        cost,
        reward,
        created_at: now_millis(),
    }
}

pub async fn balance(s: &dyn Store, account_id: &str) -> i64 {
    s.account(account_id)
        .await
        .expect("read account")
        .expect("account exists")
        .balance
}

/// `balance == sum(ledger) - sum(holds)`: every credit is explained by the
/// ledger or parked in a hold.
pub async fn assert_invariant(s: &dyn Store, account_id: &str) {
    let mut ledger = 0;
    for kind in [
        LedgerKind::Deposit,
        LedgerKind::Charge,
        LedgerKind::Reward,
        LedgerKind::Adjust,
        LedgerKind::Referral,
    ] {
        ledger += s.ledger_sum(account_id, kind).await.expect("ledger sum");
    }
    let held = s.held_amount(account_id).await.expect("held amount");
    assert_eq!(
        balance(s, account_id).await,
        ledger - held,
        "balance of {account_id} is not ledger ({ledger}) minus holds ({held})"
    );
}
