//! Operator tools: search, adjustments, versioned prices, banners, aggregates.

use std::sync::Arc;

use super::{account_with, assert_invariant, balance, device_of, key_of, usage_of};
use crate::{day_of, now_millis, BannerLevel, LedgerKind, NewBanner, Store, StoreError};

pub async fn account_search_and_adjustments(s: Arc<dyn Store>) {
    let s = &*s;
    let alice = s
        .create_account("Alice Liddell", Some("alice@example.com"))
        .await
        .unwrap();
    let bob = s.create_account("bob", Some("bob@wonder.land")).await.unwrap();
    let found = |q: &'static str| async move {
        let mut ids: Vec<String> = s
            .search_accounts(q, 50)
            .await
            .unwrap()
            .into_iter()
            .map(|a| a.id)
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(found("ALICE").await, vec![alice.id.clone()]);
    assert_eq!(found("wonder").await, vec![bob.id.clone()]);
    assert_eq!(found("liddell").await, vec![alice.id.clone()]);
    assert_eq!(s.search_accounts(&bob.id, 50).await.unwrap()[0].id, bob.id);
    // LIKE wildcards in the query are literal.
    assert!(found("%").await.is_empty());
    assert!(found("_").await.is_empty());

    assert_eq!(s.adjust_balance(&alice.id, 500, "by ops: goodwill").await.unwrap(), 500);
    assert_eq!(
        s.adjust_balance(&alice.id, -200, "by ops: refund reversed")
            .await
            .unwrap(),
        300
    );
    // Below zero: refused, nothing written.
    assert!(matches!(
        s.adjust_balance(&alice.id, -301, "too much").await,
        Err(StoreError::InvalidInput(_))
    ));
    assert!(matches!(
        s.adjust_balance(&alice.id, 0, "zero").await,
        Err(StoreError::InvalidInput(_))
    ));
    assert!(matches!(
        s.adjust_balance("acc_missing", 5, "x").await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(balance(s, &alice.id).await, 300);
    let ledger = s.ledger(&alice.id, 10).await.unwrap();
    assert_eq!(ledger.len(), 2);
    assert_eq!(ledger[0].kind, LedgerKind::Adjust);
    assert_eq!(ledger[0].amount, -200);
    assert_eq!(ledger[0].note.as_deref(), Some("by ops: refund reversed"));
    assert_invariant(s, &alice.id).await;

    // Pages of the ledger follow each other without gaps or repeats.
    for i in 0..5 {
        s.deposit(&bob.id, 10 + i, Some("page")).await.unwrap();
    }
    let first = s.ledger_page(&bob.id, None, 2).await.unwrap();
    let second = s.ledger_page(&bob.id, Some(first[1].id), 2).await.unwrap();
    let third = s.ledger_page(&bob.id, Some(second[1].id), 2).await.unwrap();
    let amounts: Vec<i64> = first.iter().chain(&second).chain(&third).map(|e| e.amount).collect();
    assert_eq!(amounts, vec![14, 13, 12, 11, 10]);
}

pub async fn pricing_versions_and_banners(s: Arc<dyn Store>) {
    let s = &*s;
    assert!(s.latest_pricing_version().await.unwrap().is_none());
    let v1 = s
        .add_pricing_version("{\"chat_input\":1}", "a@example.com")
        .await
        .unwrap();
    let v2 = s
        .add_pricing_version("{\"chat_input\":2}", "b@example.com")
        .await
        .unwrap();
    assert_eq!((v1.version, v2.version), (1, 2));
    let latest = s.latest_pricing_version().await.unwrap().unwrap();
    assert_eq!(latest.pricing, "{\"chat_input\":2}");
    assert_eq!(latest.created_by, "b@example.com");
    let history = s.pricing_versions(10).await.unwrap();
    assert_eq!(history.iter().map(|v| v.version).collect::<Vec<_>>(), vec![2, 1]);

    let now = now_millis();
    let new = |message: &str, starts_at: i64, ends_at: i64| NewBanner {
        message: message.into(),
        level: BannerLevel::Warning,
        starts_at,
        ends_at,
        created_by: "ops@example.com".into(),
    };
    let live = s
        .create_banner(new("maintenance tonight", now - 1000, now + 60_000))
        .await
        .unwrap();
    s.create_banner(new("over", now - 10_000, now - 5_000)).await.unwrap();
    s.create_banner(new("later", now + 30_000, now + 90_000)).await.unwrap();
    for bad in [
        new("", now, now + 1),
        new("x", now, now),
        new(&"x".repeat(501), now, now + 1),
    ] {
        assert!(matches!(s.create_banner(bad).await, Err(StoreError::InvalidInput(_))));
    }
    let shown: Vec<String> = s
        .banners_from(now)
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.message)
        .collect();
    assert_eq!(shown, vec!["maintenance tonight".to_string(), "later".to_string()]);
    assert!(s.delete_banner(&live.id).await.unwrap());
    assert!(!s.delete_banner(&live.id).await.unwrap());
    assert_eq!(s.banners_from(now).await.unwrap().len(), 1);
}

pub async fn usage_and_provider_aggregates(s: Arc<dyn Store>) {
    let s = &*s;
    let user = account_with(s, "user", 1_000_000).await;
    let provider = account_with(s, "provider", 0).await;
    let key = key_of(s, &user, "k-agg", None).await;
    let device = device_of(s, &provider, "dev-agg").await;
    let start = now_millis();
    for (i, cost) in [100, 200, 300].iter().enumerate() {
        let mut u = usage_of(&format!("agg-{i}"), &key, *cost, cost / 2, Some(&device));
        u.latency_ms = 1000;
        u.output_tokens = 50;
        s.settle(u).await.unwrap();
    }
    let today = day_of(now_millis());
    let days = s.usage_days(&user.id, &today).await.unwrap();
    assert_eq!(days.len(), 1);
    assert_eq!((days[0].requests, days[0].cost, days[0].output_tokens), (3, 600, 150));
    assert!(s.usage_days(&provider.id, &today).await.unwrap().is_empty());

    let served = s.provider_days(&provider.id, &today).await.unwrap();
    assert_eq!(served.len(), 1);
    assert_eq!((served[0].requests, served[0].reward), (3, 300));
    assert_eq!(s.provider_totals(&provider.id).await.unwrap(), (3, 300));
    assert_eq!(s.provider_totals(&user.id).await.unwrap(), (0, 0));

    let net = s.network_usage(start - 1).await.unwrap();
    assert_eq!(net.requests, 3);
    assert_eq!(net.latency_ms, 3000);
    assert_eq!(net.chat_output_tokens, 150);
    assert_eq!(s.network_usage(now_millis() + 60_000).await.unwrap().requests, 0);
}
