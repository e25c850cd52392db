//! Holds, settlement, metering and the ledger invariant.

use std::sync::Arc;

use super::{account_with, assert_invariant, balance, device_of, hold_of, key_of, usage_of};
use crate::{day_of, now_millis, HoldOutcome, LedgerKind, Service, SettleOutcome, Store, StoreError};

pub async fn hold_and_release(s: Arc<dyn Store>) {
    let s = &*s;
    let a = account_with(s, "a", 10_000).await;
    let key = key_of(s, &a, "k", Some(100_000)).await;

    assert_eq!(
        s.hold(hold_of("r1", &key, 3_000)).await.expect("hold"),
        HoldOutcome::Held
    );
    assert_eq!(balance(s, &a.id).await, 7_000);
    assert_eq!(s.held_amount(&a.id).await.expect("held"), 3_000);
    assert_invariant(s, &a.id).await;

    // A zero hold is a real hold (free requests still settle through one).
    assert_eq!(s.hold(hold_of("r0", &key, 0)).await.expect("hold"), HoldOutcome::Held);
    let dup = s.hold(hold_of("r1", &key, 1)).await;
    assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
    assert_eq!(balance(s, &a.id).await, 7_000, "a refused duplicate changes nothing");

    s.release("r1").await.expect("release");
    assert_eq!(balance(s, &a.id).await, 10_000);
    assert_eq!(s.held_amount(&a.id).await.expect("held"), 0);
    s.release("r1").await.expect("releasing twice is a no-op");
    s.release("never-held").await.expect("releasing nothing is a no-op");
    s.release("r0").await.expect("release");
    assert_eq!(balance(s, &a.id).await, 10_000);
    assert_invariant(s, &a.id).await;

    // The released reservation no longer counts against the key's limit.
    let limited = key_of(s, &a, "k2", Some(5_000)).await;
    assert_eq!(
        s.hold(hold_of("r2", &limited, 5_000)).await.expect("hold"),
        HoldOutcome::Held
    );
    s.release("r2").await.expect("release");
    assert_eq!(
        s.hold(hold_of("r3", &limited, 5_000)).await.expect("hold"),
        HoldOutcome::Held
    );
}

pub async fn hold_refusals(s: Arc<dyn Store>) {
    let s = &*s;
    let a = account_with(s, "a", 1_000).await;
    let key = key_of(s, &a, "k", None).await;

    let r = s.hold(hold_of("big", &key, 1_001)).await.expect("hold");
    assert_eq!(r, HoldOutcome::InsufficientBalance);
    assert_eq!(
        s.hold(hold_of("all", &key, 1_000)).await.expect("hold"),
        HoldOutcome::Held
    );
    let r = s.hold(hold_of("one-more", &key, 1)).await.expect("hold");
    assert_eq!(r, HoldOutcome::InsufficientBalance);
    s.release("all").await.expect("release");

    s.set_suspended(&a.id, Some("test")).await.expect("suspend");
    let r = s.hold(hold_of("suspended", &key, 1)).await.expect("hold");
    assert_eq!(r, HoldOutcome::Refused);
    s.set_suspended(&a.id, None).await.expect("unsuspend");

    let revoked = key_of(s, &a, "revoked", None).await;
    s.revoke_api_key(&revoked.id).await.expect("revoke");
    let r = s.hold(hold_of("revoked", &revoked, 1)).await.expect("hold");
    assert_eq!(r, HoldOutcome::Refused);

    let mut unknown = hold_of("unknown", &key, 1);
    unknown.key_id = "nope".into();
    let r = s.hold(unknown).await;
    assert!(matches!(r, Err(StoreError::NotFound(_))), "{r:?}");
    let negative = s.hold(hold_of("negative", &key, -1)).await;
    assert!(matches!(negative, Err(StoreError::InvalidInput(_))), "{negative:?}");

    // None of the refusals left a hold behind or moved credits.
    assert_eq!(s.held_amount(&a.id).await.expect("held"), 0);
    assert_eq!(balance(s, &a.id).await, 1_000);
    assert_invariant(s, &a.id).await;
}

pub async fn key_credit_limit(s: Arc<dyn Store>) {
    let s = &*s;
    let a = account_with(s, "a", 100_000).await;
    let key = key_of(s, &a, "k", Some(1_500)).await;

    assert_eq!(
        s.hold(hold_of("r1", &key, 1_000)).await.expect("hold"),
        HoldOutcome::Held
    );
    let r = s.hold(hold_of("r2", &key, 600)).await.expect("hold");
    assert_eq!(r, HoldOutcome::KeyLimitReached);
    assert_eq!(balance(s, &a.id).await, 99_000, "the refused hold was rolled back");
    assert_eq!(s.held_amount(&a.id).await.expect("held"), 1_000);

    // Settling turns the reservation into spending: 400 spent, 1 100 left.
    let usage = usage_of("r1", &key, 400, 0, None);
    assert_eq!(s.settle(usage).await.expect("settle"), SettleOutcome::Settled);
    let k = s.key_auth("k").await.expect("auth").expect("key").key;
    assert_eq!(k.spent, 400);
    assert_eq!(
        s.hold(hold_of("r3", &key, 1_100)).await.expect("hold"),
        HoldOutcome::Held
    );
    let r = s.hold(hold_of("r4", &key, 1)).await.expect("hold");
    assert_eq!(r, HoldOutcome::KeyLimitReached);
    assert_invariant(s, &a.id).await;
}

pub async fn settle_with_hold(s: Arc<dyn Store>) {
    let s = &*s;
    let user = account_with(s, "user", 10_000).await;
    let provider = account_with(s, "provider", 0).await;
    let key = key_of(s, &user, "k", None).await;
    let device = device_of(s, &provider, "dev_1").await;

    assert_eq!(
        s.hold(hold_of("r1", &key, 1_000)).await.expect("hold"),
        HoldOutcome::Held
    );
    let usage = usage_of("r1", &key, 600, 300, Some(&device));
    assert_eq!(s.settle(usage.clone()).await.expect("settle"), SettleOutcome::Settled);

    assert_eq!(balance(s, &user.id).await, 9_400);
    assert_eq!(balance(s, &provider.id).await, 300);
    assert_eq!(s.held_amount(&user.id).await.expect("held"), 0);
    assert_eq!(s.ledger_sum(&user.id, LedgerKind::Charge).await.expect("sum"), -600);
    assert_eq!(s.ledger_sum(&provider.id, LedgerKind::Reward).await.expect("sum"), 300);
    let ledger = s.ledger(&user.id, 10).await.expect("ledger");
    let charge = ledger.iter().find(|e| e.kind == LedgerKind::Charge).expect("charge");
    assert_eq!(charge.amount, -600);
    assert_eq!(charge.request_id.as_deref(), Some("r1"));
    let ledger = s.ledger(&provider.id, 10).await.expect("ledger");
    assert_eq!(ledger.len(), 1);
    assert_eq!(ledger[0].kind, LedgerKind::Reward);
    assert_eq!(ledger[0].request_id.as_deref(), Some("r1"));

    assert_eq!(s.usage("r1").await.expect("usage"), Some(usage.clone()));
    assert_eq!(s.usage("r2").await.expect("usage"), None);
    let k = s.key_auth("k").await.expect("auth").expect("key").key;
    assert_eq!(k.spent, 600);
    assert_eq!(k.last_used_at, Some(usage.created_at));
    assert_invariant(s, &user.id).await;
    assert_invariant(s, &provider.id).await;

    // A free request settles without a charge entry.
    assert_eq!(
        s.hold(hold_of("free", &key, 500)).await.expect("hold"),
        HoldOutcome::Held
    );
    let free = usage_of("free", &key, 0, 0, Some(&device));
    assert_eq!(s.settle(free).await.expect("settle"), SettleOutcome::Settled);
    assert_eq!(balance(s, &user.id).await, 9_400);
    assert_eq!(s.ledger(&user.id, 10).await.expect("ledger").len(), 2);

    let mut bad = usage_of("bad", &key, -1, 0, None);
    let r = s.settle(bad.clone()).await;
    assert!(matches!(r, Err(StoreError::InvalidInput(_))), "{r:?}");
    bad.cost = 0;
    bad.reward = -1;
    let r = s.settle(bad).await;
    assert!(matches!(r, Err(StoreError::InvalidInput(_))), "{r:?}");
}

pub async fn settle_is_idempotent(s: Arc<dyn Store>) {
    let s = &*s;
    let user = account_with(s, "user", 10_000).await;
    let provider = account_with(s, "provider", 0).await;
    let key = key_of(s, &user, "k", None).await;
    let device = device_of(s, &provider, "dev_1").await;

    s.hold(hold_of("r1", &key, 1_000)).await.expect("hold");
    let usage = usage_of("r1", &key, 600, 300, Some(&device));
    assert_eq!(s.settle(usage.clone()).await.expect("settle"), SettleOutcome::Settled);

    let mut again = usage.clone();
    again.cost = 900;
    again.reward = 800;
    assert_eq!(s.settle(again).await.expect("settle"), SettleOutcome::AlreadySettled);
    assert_eq!(balance(s, &user.id).await, 9_400);
    assert_eq!(balance(s, &provider.id).await, 300);
    assert_eq!(s.usage("r1").await.expect("usage"), Some(usage.clone()));
    assert_eq!(s.ledger(&user.id, 10).await.expect("ledger").len(), 2);
    let k = s.key_auth("k").await.expect("auth").expect("key").key;
    assert_eq!(k.spent, 600);
    let rollups = s.rollups(&day_of(usage.created_at)).await.expect("rollups");
    assert_eq!(rollups.len(), 1);
    assert_eq!(rollups[0].requests, 1);
    assert_invariant(s, &user.id).await;
    assert_invariant(s, &provider.id).await;
}

pub async fn settle_without_hold(s: Arc<dyn Store>) {
    let s = &*s;
    let user = account_with(s, "user", 1_000).await;
    let provider = account_with(s, "provider", 0).await;
    let key = key_of(s, &user, "k", None).await;
    let device = device_of(s, &provider, "dev_1").await;

    // The hold was released (say it expired) before the answer was settled:
    // the cost comes straight off the balance.
    s.hold(hold_of("r1", &key, 500)).await.expect("hold");
    s.release("r1").await.expect("release");
    let usage = usage_of("r1", &key, 400, 200, Some(&device));
    assert_eq!(s.settle(usage).await.expect("settle"), SettleOutcome::Settled);
    assert_eq!(balance(s, &user.id).await, 600);
    assert_eq!(s.usage("r1").await.expect("usage").expect("record").cost, 400);

    // More than is left: the charge is clamped to the balance, which stays at
    // zero, and the record shows what was actually charged.
    let usage = usage_of("r2", &key, 1_000, 200, Some(&device));
    assert_eq!(s.settle(usage).await.expect("settle"), SettleOutcome::Settled);
    assert_eq!(balance(s, &user.id).await, 0);
    assert_eq!(s.usage("r2").await.expect("usage").expect("record").cost, 600);
    assert_eq!(s.ledger_sum(&user.id, LedgerKind::Charge).await.expect("sum"), -1_000);
    let k = s.key_auth("k").await.expect("auth").expect("key").key;
    assert_eq!(k.spent, 1_000);

    // Nothing left at all: no charge entry, but the provider is still paid.
    let usage = usage_of("r3", &key, 50, 200, Some(&device));
    assert_eq!(s.settle(usage).await.expect("settle"), SettleOutcome::Settled);
    assert_eq!(s.usage("r3").await.expect("usage").expect("record").cost, 0);
    assert_eq!(s.ledger(&user.id, 10).await.expect("ledger").len(), 3);
    assert_eq!(balance(s, &provider.id).await, 600);
    let mut recorded = 0;
    for id in ["r1", "r2", "r3"] {
        recorded += s.usage(id).await.expect("usage").expect("record").cost;
    }
    assert_eq!(recorded, 1_000);
    assert_invariant(s, &user.id).await;
    assert_invariant(s, &provider.id).await;

    // A reward with no provider account has nobody to go to and is not recorded.
    let orphan = usage_of("r4", &key, 0, 70, None);
    assert_eq!(s.settle(orphan).await.expect("settle"), SettleOutcome::Settled);
    assert_eq!(s.usage("r4").await.expect("usage").expect("record").reward, 0);
}

pub async fn settle_to_own_account(s: Arc<dyn Store>) {
    let s = &*s;
    let both = account_with(s, "self-served", 5_000).await;
    let key = key_of(s, &both, "k", None).await;
    let device = device_of(s, &both, "dev_own").await;

    s.hold(hold_of("r1", &key, 2_000)).await.expect("hold");
    let usage = usage_of("r1", &key, 1_000, 700, Some(&device));
    assert_eq!(s.settle(usage).await.expect("settle"), SettleOutcome::Settled);
    assert_eq!(balance(s, &both.id).await, 5_000 - 1_000 + 700);
    assert_eq!(s.ledger_sum(&both.id, LedgerKind::Charge).await.expect("sum"), -1_000);
    assert_eq!(s.ledger_sum(&both.id, LedgerKind::Reward).await.expect("sum"), 700);
    assert_invariant(s, &both.id).await;
}

/// A settlement naming an account that does not exist fails and writes
/// nothing: no record, no charge, the hold still there.
pub async fn settle_to_missing_account(s: Arc<dyn Store>) {
    let s = &*s;
    let user = account_with(s, "user", 5_000).await;
    let key = key_of(s, &user, "k", None).await;
    let provider = account_with(s, "provider", 0).await;
    let device = device_of(s, &provider, "dev_gone").await;

    s.hold(hold_of("r1", &key, 2_000)).await.expect("hold");
    let mut unpaid = usage_of("r1", &key, 1_000, 700, Some(&device));
    unpaid.provider_account_id = Some("acct_nobody".to_string());
    assert!(
        s.settle(unpaid).await.is_err(),
        "a reward to a missing account must fail"
    );
    let mut uncharged = usage_of("r1", &key, 1_000, 700, Some(&device));
    uncharged.account_id = "acct_nobody".to_string();
    assert!(
        s.settle(uncharged).await.is_err(),
        "a charge to a missing account must fail"
    );

    assert!(s.usage("r1").await.expect("usage").is_none());
    assert_eq!(s.ledger_sum(&user.id, LedgerKind::Charge).await.expect("sum"), 0);
    assert_eq!(balance(s, &provider.id).await, 0);
    // The hold is untouched, so the real settlement still goes through.
    let usage = usage_of("r1", &key, 1_000, 700, Some(&device));
    assert_eq!(s.settle(usage).await.expect("settle"), SettleOutcome::Settled);
    assert_eq!(balance(s, &user.id).await, 4_000);
    assert_eq!(balance(s, &provider.id).await, 700);
    assert_invariant(s, &user.id).await;
}

pub async fn usage_history_and_rollups(s: Arc<dyn Store>) {
    let s = &*s;
    let user = account_with(s, "user", 100_000).await;
    let provider = account_with(s, "provider", 0).await;
    let key = key_of(s, &user, "k", None).await;
    let device = device_of(s, &provider, "dev_1").await;
    let day = 1_700_000_000_000; // 2023-11-14

    for (i, status) in [200, 200, 500, 499].into_iter().enumerate() {
        let id = format!("r{i}");
        s.hold(hold_of(&id, &key, 1_000)).await.expect("hold");
        let mut usage = usage_of(&id, &key, 100, 50, Some(&device));
        usage.status = status;
        usage.created_at = day + i as i64 * 1_000;
        s.settle(usage).await.expect("settle");
    }
    // Another model, and a request no device answered (e.g. 503).
    let mut other = usage_of("emb", &key, 10, 5, Some(&device));
    other.service = Service::Embeddings;
    other.model = "bge".into();
    other.created_at = day + 10_000;
    s.settle(other).await.expect("settle");
    let mut unanswered = usage_of("none", &key, 0, 0, None);
    unanswered.status = 503;
    unanswered.created_at = day + 20_000;
    s.settle(unanswered).await.expect("settle");
    // The next day gets its own row.
    let mut tomorrow = usage_of("late", &key, 100, 50, Some(&device));
    tomorrow.created_at = day + 86_400_000;
    s.settle(tomorrow).await.expect("settle");

    let history = s.usage_for_account(&user.id, 100).await.expect("usage");
    assert_eq!(history.len(), 7);
    assert_eq!(history[0].request_id, "late", "newest first");
    assert_eq!(history[1].request_id, "none");
    assert!(history.windows(2).all(|w| w[0].created_at >= w[1].created_at));
    assert_eq!(s.usage_for_account(&user.id, 2).await.expect("usage").len(), 2);
    assert!(s.usage_for_account(&provider.id, 10).await.expect("usage").is_empty());

    let rollups = s.rollups("2023-11-14").await.expect("rollups");
    assert_eq!(rollups.len(), 3);
    let chat = rollups
        .iter()
        .find(|r| r.service == Service::Chat && r.device_id == device.id)
        .expect("chat rollup");
    assert_eq!(chat.day, "2023-11-14");
    assert_eq!(chat.account_id, user.id);
    assert_eq!(chat.model, "test-model");
    assert_eq!(chat.requests, 4);
    assert_eq!(chat.errors, 2);
    assert_eq!(chat.input_tokens, 40);
    assert_eq!(chat.output_tokens, 80);
    assert_eq!(chat.cost, 400);
    assert_eq!(chat.reward, 200);
    let emb = rollups
        .iter()
        .find(|r| r.service == Service::Embeddings)
        .expect("embeddings rollup");
    assert_eq!((emb.model.as_str(), emb.requests, emb.cost), ("bge", 1, 10));
    let none = rollups
        .iter()
        .find(|r| r.device_id.is_empty())
        .expect("no-device rollup");
    assert_eq!((none.requests, none.errors, none.cost), (1, 1, 0));
    let next = s.rollups("2023-11-15").await.expect("rollups");
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].requests, 1);
    assert!(s.rollups("2001-01-01").await.expect("rollups").is_empty());
    assert_invariant(s, &user.id).await;
    assert_invariant(s, &provider.id).await;
}

pub async fn expired_holds(s: Arc<dyn Store>) {
    let s = &*s;
    let a = account_with(s, "a", 10_000).await;
    let key = key_of(s, &a, "k", Some(10_000)).await;
    let now = crate::now_millis();

    for (id, expires_at) in [("old1", now - 10), ("old2", now - 1), ("fresh", now + 60_000)] {
        let mut hold = hold_of(id, &key, 1_000);
        hold.expires_at = expires_at;
        assert_eq!(s.hold(hold).await.expect("hold"), HoldOutcome::Held);
    }
    assert_eq!(s.release_expired_holds(now).await.expect("expire"), 2);
    assert_eq!(s.held_amount(&a.id).await.expect("held"), 1_000);
    assert_eq!(balance(s, &a.id).await, 9_000);
    assert_eq!(s.release_expired_holds(now).await.expect("expire"), 0);
    // The key's reservation went back too: 9 000 more fit under its limit.
    assert_eq!(
        s.hold(hold_of("big", &key, 9_000)).await.expect("hold"),
        HoldOutcome::Held
    );

    assert_eq!(s.release_all_holds().await.expect("release all"), 2);
    assert_eq!(s.held_amount(&a.id).await.expect("held"), 0);
    assert_eq!(balance(s, &a.id).await, 10_000);
    assert_eq!(s.release_all_holds().await.expect("release all"), 0);
    assert_invariant(s, &a.id).await;
}

pub async fn invariant_after_mixed_operations(s: Arc<dyn Store>) {
    let s = &*s;
    let user = account_with(s, "user", 50_000).await;
    let provider = account_with(s, "provider", 1_000).await;
    let key = key_of(s, &user, "k", Some(40_000)).await;
    let pkey = key_of(s, &provider, "pk", None).await;
    let device = device_of(s, &provider, "dev_1").await;

    for i in 0..30i64 {
        let id = format!("r{i}");
        let amount = 500 + i * 37;
        let outcome = s.hold(hold_of(&id, &key, amount)).await.expect("hold");
        match i % 5 {
            0 => s.release(&id).await.expect("release"),
            1 | 2 => {
                let usage = usage_of(&id, &key, amount / 2, amount / 4, Some(&device));
                s.settle(usage).await.expect("settle");
            }
            3 => {
                s.release(&id).await.expect("release");
                let usage = usage_of(&id, &key, amount, 0, Some(&device));
                s.settle(usage).await.expect("settle");
            }
            _ => {} // left outstanding
        }
        if i % 7 == 0 {
            s.deposit(&user.id, 1_000 + i, None).await.expect("deposit");
        }
        if outcome != HoldOutcome::Held {
            s.release(&id).await.expect("release");
        }
        // The provider spends some of what it earned.
        if i % 6 == 0 {
            let pid = format!("p{i}");
            if s.hold(hold_of(&pid, &pkey, 300)).await.expect("hold") == HoldOutcome::Held {
                s.settle(usage_of(&pid, &pkey, 250, 0, None)).await.expect("settle");
            }
        }
        assert_invariant(s, &user.id).await;
        assert_invariant(s, &provider.id).await;
    }
    s.release_all_holds().await.expect("release all");
    assert_eq!(s.held_amount(&user.id).await.expect("held"), 0);
    assert_invariant(s, &user.id).await;
    assert_invariant(s, &provider.id).await;
}

/// Wherever a balance is shown, credits a running request holds are not in
/// it, and an operator's debit cannot take them.
pub async fn holds_count_in_every_balance_shown(s: Arc<dyn Store>) {
    let s = &*s;
    let a = account_with(s, "held-everywhere", 1_000).await;
    let key = key_of(s, &a, "k", None).await;
    assert_eq!(s.hold(hold_of("r1", &key, 600)).await.expect("hold"), HoldOutcome::Held);

    assert_eq!(balance(s, &a.id).await, 400);
    let listed = s.list_accounts().await.expect("list");
    assert_eq!(listed.iter().find(|x| x.id == a.id).expect("listed").balance, 400);
    let found = s.search_accounts("held-everywhere", 10).await.expect("search");
    assert_eq!(found.first().expect("found").balance, 400);
    let now = now_millis();
    s.create_session("token-hash", &a.id, now, now + 60_000)
        .await
        .expect("session");
    let session = s.session("token-hash", now).await.expect("read").expect("live");
    assert_eq!(session.account.balance, 400);
    assert_eq!(s.deposit(&a.id, 100, None).await.expect("deposit"), 500);

    let refused = s.adjust_balance(&a.id, -501, "too much").await;
    assert!(matches!(refused, Err(StoreError::InvalidInput(_))), "{refused:?}");
    assert_eq!(
        s.adjust_balance(&a.id, -500, "all that is free").await.expect("adjust"),
        0
    );
    assert_eq!(
        s.hold(hold_of("r2", &key, 1)).await.expect("hold"),
        HoldOutcome::InsufficientBalance
    );
    assert_invariant(s, &a.id).await;

    s.release("r1").await.expect("release");
    assert_eq!(balance(s, &a.id).await, 600);
    assert_invariant(s, &a.id).await;
}
