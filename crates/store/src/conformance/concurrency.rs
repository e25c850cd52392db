//! Many requests at once: no credit may be spent twice, no request settled
//! twice, and crossing payments must not deadlock.

use std::sync::Arc;

use super::{account_with, assert_invariant, balance, device_of, hold_of, key_of, usage_of};
use crate::{HoldOutcome, LedgerKind, Result, SettleOutcome, Store};

/// Awaits every task, failing on a panic or an error.
async fn join_all<T>(tasks: Vec<tokio::task::JoinHandle<Result<T>>>) -> Vec<T> {
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        out.push(task.await.expect("task panicked").expect("store error"));
    }
    out
}

pub async fn concurrent_holds_and_settles(s: Arc<dyn Store>) {
    let user = account_with(&*s, "user", 50 * 1_000).await;
    let provider = account_with(&*s, "provider", 0).await;
    let key = key_of(&*s, &user, "k", None).await;
    let device = device_of(&*s, &provider, "dev_1").await;

    let holds = (0..200)
        .map(|i| {
            let s = s.clone();
            let hold = hold_of(&format!("r{i}"), &key, 1_000);
            tokio::spawn(async move { s.hold(hold).await })
        })
        .collect();
    let outcomes = join_all(holds).await;
    let held: Vec<usize> = (0..outcomes.len())
        .filter(|&i| outcomes[i] == HoldOutcome::Held)
        .collect();
    assert_eq!(held.len(), 50, "exactly the balance was held");
    assert!(outcomes
        .iter()
        .all(|o| matches!(o, HoldOutcome::Held | HoldOutcome::InsufficientBalance)));
    assert_eq!(balance(&*s, &user.id).await, 0);
    assert_eq!(s.held_amount(&user.id).await.expect("held"), 50_000);
    assert_invariant(&*s, &user.id).await;

    let settles = held
        .iter()
        .map(|i| {
            let s = s.clone();
            let usage = usage_of(&format!("r{i}"), &key, 600, 300, Some(&device));
            tokio::spawn(async move { s.settle(usage).await })
        })
        .collect();
    let outcomes = join_all(settles).await;
    assert!(outcomes.iter().all(|o| *o == SettleOutcome::Settled));

    assert_eq!(balance(&*s, &user.id).await, 50 * 400);
    assert_eq!(balance(&*s, &provider.id).await, 50 * 300);
    assert_eq!(s.held_amount(&user.id).await.expect("held"), 0);
    assert_eq!(s.ledger_sum(&user.id, LedgerKind::Charge).await.expect("sum"), -30_000);
    assert_eq!(
        s.ledger_sum(&provider.id, LedgerKind::Reward).await.expect("sum"),
        15_000
    );
    let k = s.key_auth("k").await.expect("auth").expect("key").key;
    assert_eq!(k.spent, 30_000);
    let day = crate::day_of(crate::now_millis());
    let requests: i64 = s.rollups(&day).await.expect("rollups").iter().map(|r| r.requests).sum();
    // Tolerates the test straddling midnight, when some land on the next day.
    assert!((1..=50).contains(&requests), "{requests} requests rolled up");
    assert_invariant(&*s, &user.id).await;
    assert_invariant(&*s, &provider.id).await;
}

/// Two accounts each paying the other, settled concurrently: the backends
/// must order their locks (or retry) so that this neither deadlocks nor fails.
pub async fn crossed_settlements(s: Arc<dyn Store>) {
    let a = account_with(&*s, "a", 100_000).await;
    let b = account_with(&*s, "b", 100_000).await;
    let key_a = key_of(&*s, &a, "ka", None).await;
    let key_b = key_of(&*s, &b, "kb", None).await;
    let dev_a = device_of(&*s, &a, "dev_a").await;
    let dev_b = device_of(&*s, &b, "dev_b").await;

    let mut tasks = Vec::new();
    for i in 0..40 {
        let (key, provider) = if i % 2 == 0 {
            (key_a.clone(), dev_b.clone())
        } else {
            (key_b.clone(), dev_a.clone())
        };
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("x{i}");
            let held = s.hold(hold_of(&id, &key, 1_000)).await?;
            assert_eq!(held, HoldOutcome::Held);
            s.settle(usage_of(&id, &key, 500, 400, Some(&provider))).await
        }));
    }
    let outcomes = join_all(tasks).await;
    assert!(outcomes.iter().all(|o| *o == SettleOutcome::Settled));
    // Each paid 20 × 500 and earned 20 × 400.
    assert_eq!(balance(&*s, &a.id).await, 100_000 - 20 * 100);
    assert_eq!(balance(&*s, &b.id).await, 100_000 - 20 * 100);
    assert_invariant(&*s, &a.id).await;
    assert_invariant(&*s, &b.id).await;
}

/// The same request settled by many callers at once is settled exactly once.
pub async fn concurrent_double_settle(s: Arc<dyn Store>) {
    let user = account_with(&*s, "user", 10_000).await;
    let provider = account_with(&*s, "provider", 0).await;
    let key = key_of(&*s, &user, "k", None).await;
    let device = device_of(&*s, &provider, "dev_1").await;
    s.hold(hold_of("r1", &key, 1_000)).await.expect("hold");

    let tasks = (0..10)
        .map(|_| {
            let s = s.clone();
            let usage = usage_of("r1", &key, 600, 300, Some(&device));
            tokio::spawn(async move { s.settle(usage).await })
        })
        .collect();
    let outcomes = join_all(tasks).await;
    let settled = outcomes.iter().filter(|o| **o == SettleOutcome::Settled).count();
    assert_eq!(settled, 1);
    assert_eq!(balance(&*s, &user.id).await, 9_400);
    assert_eq!(balance(&*s, &provider.id).await, 300);
    assert_invariant(&*s, &user.id).await;
    assert_invariant(&*s, &provider.id).await;
}

/// Settlements that fail (a reward to a missing account) arrive among many
/// good ones at once: each bad one fails alone, every good one is settled,
/// and nothing of the bad ones is written. A backend that commits jobs in
/// groups must not let one job's failure spoil or duplicate the others.
pub async fn failures_among_concurrent_settlements(s: Arc<dyn Store>) {
    let user = account_with(&*s, "user", 100_000).await;
    let provider = account_with(&*s, "provider", 0).await;
    let key = key_of(&*s, &user, "k", None).await;
    let device = device_of(&*s, &provider, "dev_1").await;
    for i in 0..60 {
        let held = s.hold(hold_of(&format!("r{i}"), &key, 1_000)).await.expect("hold");
        assert_eq!(held, HoldOutcome::Held);
    }

    let tasks = (0..60)
        .map(|i| {
            let s = s.clone();
            let mut usage = usage_of(&format!("r{i}"), &key, 600, 300, Some(&device));
            if i % 20 == 7 {
                usage.provider_account_id = Some("acct_nobody".to_string());
            }
            tokio::spawn(async move { (i, s.settle(usage).await) })
        })
        .collect::<Vec<_>>();
    for task in tasks {
        let (i, outcome) = task.await.expect("task panicked");
        if i % 20 == 7 {
            assert!(outcome.is_err(), "r{i}: a reward to a missing account must fail");
            assert!(s.usage(&format!("r{i}")).await.expect("usage").is_none());
        } else {
            assert_eq!(outcome.expect("settle"), SettleOutcome::Settled, "r{i}");
        }
    }

    // 57 settled at 600 each; the 3 failed holds are still held.
    assert_eq!(s.held_amount(&user.id).await.expect("held"), 3 * 1_000);
    assert_eq!(balance(&*s, &user.id).await, 100_000 - 57 * 600 - 3 * 1_000);
    assert_eq!(balance(&*s, &provider.id).await, 57 * 300);
    assert_eq!(
        s.ledger_sum(&user.id, LedgerKind::Charge).await.expect("sum"),
        -57 * 600
    );
    assert_invariant(&*s, &user.id).await;
    assert_invariant(&*s, &provider.id).await;
}
