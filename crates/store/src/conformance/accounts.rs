//! Accounts, API keys, devices and provisions.

use std::sync::Arc;

use super::{account_with, device_of, key_of};
use crate::{KeySettings, LedgerKind, NewApiKey, Service, Store, StoreError};

pub async fn accounts_and_deposits(s: Arc<dyn Store>) {
    let s = &*s;
    let a = s
        .create_account("alice", Some("alice@example.com"))
        .await
        .expect("create");
    assert!(a.id.starts_with("acc_"));
    assert_eq!(a.balance, 0);
    assert!(!a.suspended);
    assert_eq!(a.email.as_deref(), Some("alice@example.com"));
    assert_eq!(s.account(&a.id).await.expect("read"), Some(a.clone()));
    assert_eq!(s.account("acc_nope").await.expect("read"), None);

    let dup = s.create_account("other", Some("alice@example.com")).await;
    assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
    // Several accounts without email are fine: NULLs are not duplicates.
    let b = s.create_account("bob", None).await.expect("create");
    s.create_account("carol", None).await.expect("create");
    let listed = s.list_accounts().await.expect("list");
    assert_eq!(listed.len(), 3);
    assert!(listed.iter().any(|x| x.id == b.id));

    assert_eq!(s.deposit(&a.id, 1_000, Some("first")).await.expect("deposit"), 1_000);
    assert_eq!(s.deposit(&a.id, 500, None).await.expect("deposit"), 1_500);
    for bad in [0, -5] {
        let r = s.deposit(&a.id, bad, None).await;
        assert!(matches!(r, Err(StoreError::InvalidInput(_))), "{r:?}");
    }
    let r = s.deposit("acc_nope", 10, None).await;
    assert!(matches!(r, Err(StoreError::NotFound(_))), "{r:?}");
    let r = s.deposit(&a.id, i64::MAX, None).await;
    assert!(matches!(r, Err(StoreError::InvalidInput(_))), "{r:?}");
    assert_eq!(super::balance(s, &a.id).await, 1_500);

    let ledger = s.ledger(&a.id, 10).await.expect("ledger");
    assert_eq!(ledger.len(), 2);
    assert!(ledger.iter().all(|e| e.kind == LedgerKind::Deposit));
    assert!(ledger.iter().all(|e| e.account_id == a.id));
    let first = ledger.iter().find(|e| e.amount == 1_000).expect("first deposit");
    assert_eq!(first.note.as_deref(), Some("first"));
    assert!(ledger[0].created_at >= ledger[1].created_at, "newest first");
    assert_eq!(s.ledger(&a.id, 1).await.expect("ledger").len(), 1);
    assert!(s.ledger(&a.id, -1).await.expect("ledger").is_empty());
    assert_eq!(s.ledger_sum(&a.id, LedgerKind::Deposit).await.expect("sum"), 1_500);
    assert_eq!(s.ledger_sum(&a.id, LedgerKind::Charge).await.expect("sum"), 0);
    assert_eq!(s.held_amount(&a.id).await.expect("held"), 0);
    super::assert_invariant(s, &a.id).await;
    s.ping().await.expect("ping");
}

pub async fn suspension(s: Arc<dyn Store>) {
    let s = &*s;
    let a = account_with(s, "a", 0).await;
    let key = key_of(s, &a, "k1", None).await;

    s.set_suspended(&a.id, Some("abuse")).await.expect("suspend");
    let read = s.account(&a.id).await.expect("read").expect("exists");
    assert!(read.suspended);
    assert_eq!(read.suspended_reason.as_deref(), Some("abuse"));
    let auth = s.key_auth(&key.id).await.expect("auth").expect("key");
    assert!(auth.account_suspended);

    s.set_suspended(&a.id, None).await.expect("unsuspend");
    let read = s.account(&a.id).await.expect("read").expect("exists");
    assert!(!read.suspended);
    assert_eq!(read.suspended_reason, None);
    let auth = s.key_auth(&key.id).await.expect("auth").expect("key");
    assert!(!auth.account_suspended);

    let r = s.set_suspended("acc_nope", Some("x")).await;
    assert!(matches!(r, Err(StoreError::NotFound(_))), "{r:?}");
}

pub async fn api_keys_and_auth(s: Arc<dyn Store>) {
    let s = &*s;
    let a = account_with(s, "a", 0).await;
    let new = NewApiKey {
        id: "key1".into(),
        account_id: a.id.clone(),
        name: "ci".into(),
        prefix: "sk-cx-key1".into(),
        secret_hash: crate::ids::hash_secret("secret"),
        credit_limit: Some(5_000),
        allowed_services: Some(vec![Service::Chat, Service::Embeddings]),
        rpm_limit: Some(60),
    };
    let key = s.create_api_key(new.clone()).await.expect("create key");
    assert_eq!(key.id, "key1");
    assert_eq!(key.account_id, a.id);
    assert_eq!(key.secret_hash, crate::ids::hash_secret("secret"));
    assert_eq!(key.credit_limit, Some(5_000));
    assert_eq!(key.spent, 0);
    assert_eq!(key.allowed_services, Some(vec![Service::Chat, Service::Embeddings]));
    assert_eq!(key.rpm_limit, Some(60));
    assert_eq!(key.revoked_at, None);
    assert_eq!(key.last_used_at, None);

    let open = NewApiKey {
        id: "key2".into(),
        credit_limit: None,
        allowed_services: None,
        rpm_limit: None,
        ..new.clone()
    };
    let open = s.create_api_key(open).await.expect("create key");
    assert_eq!(open.allowed_services, None);
    let none = NewApiKey {
        id: "key3".into(),
        allowed_services: Some(vec![]),
        ..new.clone()
    };
    let none = s.create_api_key(none).await.expect("create key");
    assert_eq!(none.allowed_services, Some(vec![]));

    let dup = s.create_api_key(new.clone()).await;
    assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
    let orphan = NewApiKey {
        id: "key4".into(),
        account_id: "acc_nope".into(),
        ..new
    };
    let r = s.create_api_key(orphan).await;
    assert!(matches!(r, Err(StoreError::NotFound(_))), "{r:?}");

    let keys = s.api_keys(&a.id).await.expect("keys");
    assert_eq!(keys.len(), 3);
    assert!(keys.contains(&key) && keys.contains(&open) && keys.contains(&none));
    assert!(s.api_keys("acc_nope").await.expect("keys").is_empty());

    let auth = s.key_auth("key1").await.expect("auth").expect("key");
    assert_eq!(auth.key, key);
    assert!(!auth.account_suspended);
    assert_eq!(s.key_auth("nope").await.expect("auth"), None);

    assert!(s.revoke_api_key("key1").await.expect("revoke"));
    let revoked = s.key_auth("key1").await.expect("auth").expect("key");
    let at = revoked.key.revoked_at.expect("revoked_at set");
    assert!(s.revoke_api_key("key1").await.expect("revoke again"));
    let again = s.key_auth("key1").await.expect("auth").expect("key");
    assert_eq!(again.key.revoked_at, Some(at), "first revocation time kept");
    assert!(!s.revoke_api_key("nope").await.expect("revoke"));
}

pub async fn devices_and_provisions(s: Arc<dyn Store>) {
    let s = &*s;
    let owner = account_with(s, "provider", 0).await;
    let d = device_of(s, &owner, "dev_1").await;
    assert_eq!(d.id, "dev_1");
    assert_eq!(d.account_id, owner.id);
    assert_eq!(d.last_seen_at, None);
    assert_eq!(s.device("dev_1").await.expect("device"), Some(d.clone()));
    assert_eq!(s.device("dev_nope").await.expect("device"), None);
    let dup = s.create_device(&owner.id, "again", "dev_1", "h").await;
    assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
    let r = s.create_device("acc_nope", "x", "dev_2", "h").await;
    assert!(matches!(r, Err(StoreError::NotFound(_))), "{r:?}");
    device_of(s, &owner, "dev_3").await;
    assert_eq!(s.devices(&owner.id).await.expect("devices").len(), 2);

    s.touch_device("dev_1", 1_234).await.expect("touch");
    let seen = s.device("dev_1").await.expect("device").expect("exists");
    assert_eq!(seen.last_seen_at, Some(1_234));
    let r = s.touch_device("dev_nope", 1).await;
    assert!(matches!(r, Err(StoreError::NotFound(_))), "{r:?}");

    let p1 = s
        .upsert_provision("dev_1", Service::Chat, "llama", "link", None, Some("gw1:1"))
        .await
        .expect("upsert");
    assert!(p1.starts_with("prv_"));
    let p2 = s
        .upsert_provision(
            "dev_1",
            Service::Embeddings,
            "bge",
            "direct",
            Some("http://x"),
            Some("gw1:1"),
        )
        .await
        .expect("upsert");
    s.upsert_provision("dev_3", Service::Chat, "llama", "link", None, Some("gw1:2"))
        .await
        .expect("upsert");
    assert_ne!(p1, p2);
    let r = s
        .upsert_provision("dev_nope", Service::Chat, "llama", "link", None, None)
        .await;
    assert!(matches!(r, Err(StoreError::NotFound(_))), "{r:?}");

    // A link that closed after the device linked again (here or on another
    // replica) leaves the newer link's provisions online.
    s.upsert_provision("dev_1", Service::Chat, "llama", "link", None, Some("gw2:7"))
        .await
        .expect("upsert");
    s.set_device_offline("dev_1", Some("gw1:1")).await.expect("offline");
    let online = |all: &[crate::ProvisionRecord], id: &str| all.iter().find(|p| p.id == id).expect("provision").online;
    let all = s.provisions().await.expect("provisions");
    assert!(online(&all, &p1), "announced again by gw2:7");
    assert!(!online(&all, &p2), "announced last by gw1:1");
    s.set_device_offline("dev_1", Some("gw2:7")).await.expect("offline");
    assert!(!online(&s.provisions().await.expect("provisions"), &p1));

    s.upsert_provision("dev_1", Service::Chat, "llama", "link", None, Some("gw2:8"))
        .await
        .expect("upsert");
    s.set_device_offline("dev_1", None).await.expect("offline");
    let all = s.provisions().await.expect("provisions");
    assert_eq!(all.len(), 3);
    assert!(all.iter().filter(|p| p.device_id == "dev_1").all(|p| !p.online));
    assert!(all.iter().filter(|p| p.device_id == "dev_3").all(|p| p.online));

    // Re-announcing updates in place: same id, back online, new details.
    let again = s
        .upsert_provision("dev_1", Service::Chat, "llama", "direct", Some("http://y"), None)
        .await
        .expect("upsert");
    assert_eq!(again, p1);
    let all = s.provisions().await.expect("provisions");
    let p = all.iter().find(|p| p.id == p1).expect("provision");
    assert_eq!(p.service, Service::Chat);
    assert_eq!(p.model, "llama");
    assert_eq!(p.mode, "direct");
    assert_eq!(p.endpoint.as_deref(), Some("http://y"));
    assert!(p.online);

    let mut models = s.known_models().await.expect("models");
    models.sort();
    assert_eq!(
        models,
        vec![
            (Service::Chat, "llama".to_string()),
            (Service::Embeddings, "bge".to_string()),
        ]
    );
}

pub async fn api_key_edits(s: Arc<dyn Store>) {
    let s = &*s;
    let a = account_with(s, "a", 0).await;
    let key = key_of(s, &a, "kedit", Some(1_000)).await;
    let settings = KeySettings {
        name: "renamed".into(),
        credit_limit: None,
        allowed_services: Some(vec![Service::Speech]),
        rpm_limit: Some(30),
    };
    assert!(s.update_api_key(&key.id, &settings).await.expect("update"));
    let got = s.key_auth(&key.id).await.expect("read").expect("exists").key;
    assert_eq!(
        (
            got.name.as_str(),
            got.credit_limit,
            got.allowed_services.clone(),
            got.rpm_limit
        ),
        ("renamed", None, Some(vec![Service::Speech]), Some(30))
    );
    assert_eq!(
        (got.secret_hash, got.spent),
        (key.secret_hash.clone(), key.spent),
        "secret and spend stay"
    );
    assert!(!s.update_api_key("knope", &settings).await.expect("missing"));
    s.revoke_api_key(&key.id).await.expect("revoke");
    let back = KeySettings {
        name: "again".into(),
        ..settings
    };
    assert!(
        !s.update_api_key(&key.id, &back).await.expect("revoked"),
        "revoked keys stay as they were"
    );
    assert_eq!(
        s.key_auth(&key.id).await.expect("read").expect("exists").key.name,
        "renamed"
    );
}
