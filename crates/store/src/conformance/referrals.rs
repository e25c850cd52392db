//! Referral codes, referrers and idempotent payouts over three levels.

use std::sync::Arc;

use super::{account_with, assert_invariant, balance, device_of, key_of, usage_of};
use crate::referrals::normalize_code;
use crate::{day_of, now_millis, LedgerKind, ReferralPlan, Store, StoreError};

pub async fn referral_codes_and_referrers(s: Arc<dyn Store>) {
    let s = &*s;
    let a = account_with(s, "a", 0).await;
    let b = account_with(s, "b", 0).await;
    let c = account_with(s, "c", 0).await;
    let code = s.referral_code(&a.id).await.unwrap();
    assert_eq!(normalize_code(&code).as_deref(), Some(code.as_str()));
    assert_eq!(s.referral_code(&a.id).await.unwrap(), code, "a code is made once");
    assert_ne!(s.referral_code(&b.id).await.unwrap(), code);
    assert_eq!(s.account_of_referral_code(&code).await.unwrap(), Some(a.id.clone()));
    assert_eq!(s.account_of_referral_code("NOPE2345").await.unwrap(), None);
    assert!(matches!(
        s.referral_code("acc_missing").await,
        Err(StoreError::NotFound(_))
    ));

    assert!(matches!(
        s.set_referrer(&a.id, &a.id).await,
        Err(StoreError::InvalidInput(_))
    ));
    s.set_referrer(&b.id, &a.id).await.unwrap();
    s.set_referrer(&c.id, &b.id).await.unwrap();
    // Set once.
    assert!(matches!(
        s.set_referrer(&b.id, &c.id).await,
        Err(StoreError::Conflict(_))
    ));
    // a → b → c: c may not become a's referrer (a cycle), nor may b.
    assert!(matches!(
        s.set_referrer(&a.id, &c.id).await,
        Err(StoreError::InvalidInput(_))
    ));
    assert!(matches!(
        s.set_referrer(&a.id, &b.id).await,
        Err(StoreError::InvalidInput(_))
    ));
    assert_eq!(s.referrer_of(&a.id).await.unwrap(), None);
    assert_eq!(s.referrer_of(&c.id).await.unwrap(), Some(b.id.clone()));
    let referred = s.referred_by(&a.id).await.unwrap();
    assert_eq!(referred.len(), 1);
    assert_eq!(referred[0].account_id, b.id);
    assert_eq!(referred[0].name, "b");
}

pub async fn referral_payouts_are_idempotent(s: Arc<dyn Store>) {
    let s = &*s;
    // top ← l2 ← l1 ← worker: worker was referred by l1, l1 by l2, l2 by top.
    let top = account_with(s, "top", 0).await;
    let l2 = account_with(s, "l2", 0).await;
    let l1 = account_with(s, "l1", 0).await;
    let worker = account_with(s, "worker", 10_000_000).await;
    let stranger = account_with(s, "stranger", 10_000_000).await;
    s.set_referrer(&l2.id, &top.id).await.unwrap();
    s.set_referrer(&l1.id, &l2.id).await.unwrap();
    s.set_referrer(&worker.id, &l1.id).await.unwrap();

    // worker spends 100,000 and its device earns 40,000 serving the stranger.
    let key = key_of(s, &worker, "k-ref", None).await;
    let other_key = key_of(s, &stranger, "k-str", None).await;
    let device = device_of(s, &worker, "dev-ref").await;
    s.settle(usage_of("ref-spend", &key, 100_000, 0, None)).await.unwrap();
    s.settle(usage_of("ref-serve", &other_key, 80_000, 40_000, Some(&device)))
        .await
        .unwrap();

    let plan = ReferralPlan {
        reward_bps: vec![1000, 500, 250],
        spend_bps: vec![1500, 800, 400],
        first_usage_bonus: 7,
    };
    let today = day_of(now_millis());
    let run = s.pay_referrals(&today, &plan).await.unwrap();
    // 3 levels × 2 kinds + the bonus.
    assert_eq!((run.paid, run.already_paid), (7, 0));
    assert_eq!(balance(s, &l1.id).await, 4_000 + 15_000 + 7);
    assert_eq!(balance(s, &l2.id).await, 2_000 + 8_000);
    assert_eq!(balance(s, &top.id).await, 1_000 + 4_000);
    assert_eq!(run.credits, 19_007 + 10_000 + 5_000);
    // The stranger referred nobody and was referred by nobody: nothing.
    assert_eq!(s.ledger_sum(&stranger.id, LedgerKind::Referral).await.unwrap(), 0);

    // Running again (or concurrently) pays nothing more.
    let again = s.pay_referrals(&today, &plan).await.unwrap();
    assert_eq!((again.paid, again.already_paid, again.credits), (0, 7, 0));
    assert_eq!(balance(s, &l1.id).await, 19_007);
    for acc in [&top, &l2, &l1, &worker] {
        assert_invariant(s, &acc.id).await;
    }
    let entry = &s.ledger(&l1.id, 10).await.unwrap()[0];
    assert_eq!(entry.kind, LedgerKind::Referral);
    assert!(entry.request_id.as_deref().unwrap_or("").starts_with("referral:"));

    // A day without usage pays nothing; a bad day is refused.
    assert_eq!(s.pay_referrals("2001-01-01", &plan).await.unwrap().paid, 0);
    assert!(matches!(
        s.pay_referrals("2001-02-30", &plan).await,
        Err(StoreError::InvalidInput(_))
    ));
}
