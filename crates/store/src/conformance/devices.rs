//! Device login codes and orchestrator assignments.

use std::sync::Arc;

use super::{account_with, device_of};
use crate::ids::hash_secret;
use crate::{
    now_millis, DecideOutcome, DeviceDecision, NewDeviceCode, NewDeviceKey, PollOutcome, Service, Store, StoreError,
};

fn code(device: &str, user: &str, now: i64, ttl_ms: i64) -> NewDeviceCode {
    NewDeviceCode {
        device_code_hash: hash_secret(device),
        user_code_hash: hash_secret(user),
        device_name: format!("node {user}"),
        interval_secs: 1,
        created_at: now,
        expires_at: now + ttl_ms,
    }
}

fn key(id: &str) -> NewDeviceKey {
    NewDeviceKey {
        id: id.to_string(),
        access_key_hash: hash_secret(&format!("secret of {id}")),
    }
}

pub async fn device_codes(s: Arc<dyn Store>) {
    let s = &*s;
    let owner = account_with(s, "owner", 0).await;
    let now = now_millis();
    s.create_device_code(code("dc1", "UC1", now, 600_000))
        .await
        .expect("create");
    // User codes are unique among stored codes.
    assert!(matches!(
        s.create_device_code(code("dc-other", "UC1", now, 600_000)).await,
        Err(StoreError::Conflict(_))
    ));

    let info = s.device_code(&hash_secret("UC1")).await.expect("read").expect("exists");
    assert_eq!(info.device_name, "node UC1");
    assert!(info.pending);
    assert!(s.device_code(&hash_secret("nope")).await.expect("read").is_none());

    // Pending until approved; a poll within the interval is told to slow down,
    // and the interval grows by five seconds.
    assert_eq!(
        s.poll_device_code(&hash_secret("dc1"), now, key("dev_a"))
            .await
            .expect("poll"),
        PollOutcome::Pending
    );
    assert_eq!(
        s.poll_device_code(&hash_secret("dc1"), now + 500, key("dev_a"))
            .await
            .expect("poll"),
        PollOutcome::SlowDown { interval_secs: 6 }
    );
    assert_eq!(
        s.poll_device_code(&hash_secret("dc1"), now + 6_500, key("dev_a"))
            .await
            .expect("poll"),
        PollOutcome::Pending
    );
    assert!(
        s.device("dev_a").await.expect("read").is_none(),
        "no device before approval"
    );

    let approve = DeviceDecision::Approve { account_id: &owner.id };
    assert_eq!(
        s.decide_device_code(&hash_secret("UC1"), approve, now)
            .await
            .expect("decide"),
        DecideOutcome::Decided
    );
    assert_eq!(
        s.decide_device_code(&hash_secret("UC1"), DeviceDecision::Deny, now)
            .await
            .expect("decide"),
        DecideOutcome::AlreadyDecided
    );
    assert!(
        !s.device_code(&hash_secret("UC1"))
            .await
            .expect("read")
            .expect("exists")
            .pending
    );

    // The first poll after approval creates the device, once.
    let issued = s
        .poll_device_code(&hash_secret("dc1"), now + 20_000, key("dev_a"))
        .await
        .expect("poll");
    let device = match issued {
        PollOutcome::Issued(device) => device,
        other => panic!("expected a device, got {other:?}"),
    };
    assert_eq!(
        (device.id.as_str(), device.account_id.as_str()),
        ("dev_a", owner.id.as_str())
    );
    assert_eq!(device.name, "node UC1");
    assert_eq!(device.access_key_hash, hash_secret("secret of dev_a"));
    assert_eq!(s.device("dev_a").await.expect("read"), Some(device));
    assert_eq!(
        s.poll_device_code(&hash_secret("dc1"), now + 40_000, key("dev_b"))
            .await
            .expect("poll"),
        PollOutcome::Missing
    );
    assert!(s.device("dev_b").await.expect("read").is_none());
    assert_eq!(s.devices(&owner.id).await.expect("list").len(), 1);

    // Denied codes say so once, then are gone.
    s.create_device_code(code("dc2", "UC2", now, 600_000))
        .await
        .expect("create");
    assert_eq!(
        s.decide_device_code(&hash_secret("UC2"), DeviceDecision::Deny, now)
            .await
            .expect("decide"),
        DecideOutcome::Decided
    );
    assert_eq!(
        s.poll_device_code(&hash_secret("dc2"), now, key("dev_c"))
            .await
            .expect("poll"),
        PollOutcome::Denied
    );
    assert_eq!(
        s.poll_device_code(&hash_secret("dc2"), now, key("dev_c"))
            .await
            .expect("poll"),
        PollOutcome::Missing
    );

    // Expired codes can be neither approved nor redeemed.
    s.create_device_code(code("dc3", "UC3", now - 700_000, 600_000))
        .await
        .expect("create");
    assert_eq!(
        s.decide_device_code(&hash_secret("UC3"), approve, now)
            .await
            .expect("decide"),
        DecideOutcome::Expired
    );
    assert_eq!(
        s.decide_device_code(&hash_secret("UC-none"), approve, now)
            .await
            .expect("decide"),
        DecideOutcome::Missing
    );
    assert_eq!(
        s.poll_device_code(&hash_secret("dc3"), now, key("dev_d"))
            .await
            .expect("poll"),
        PollOutcome::Expired
    );
    assert!(s.device("dev_d").await.expect("read").is_none());

    // Purging removes only expired codes.
    s.create_device_code(code("dc4", "UC4", now - 700_000, 600_000))
        .await
        .expect("create");
    s.create_device_code(code("dc5", "UC5", now, 600_000))
        .await
        .expect("create");
    assert_eq!(s.purge_expired_device_codes(now).await.expect("purge"), 1);
    assert!(s.device_code(&hash_secret("UC4")).await.expect("read").is_none());
    assert!(s.device_code(&hash_secret("UC5")).await.expect("read").is_some());
}

/// Many polls of one approved code at once: exactly one gets a device.
pub async fn concurrent_device_polls(s: Arc<dyn Store>) {
    let owner = account_with(&*s, "owner", 0).await;
    let now = now_millis();
    s.create_device_code(code("dcx", "UCX", now, 600_000))
        .await
        .expect("create");
    s.decide_device_code(
        &hash_secret("UCX"),
        DeviceDecision::Approve { account_id: &owner.id },
        now,
    )
    .await
    .expect("approve");
    let polls: Vec<_> = (0..8)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                s.poll_device_code(&hash_secret("dcx"), now, key(&format!("dev_{i}")))
                    .await
                    .expect("poll")
            })
        })
        .collect();
    let mut issued = 0;
    for p in polls {
        match p.await.expect("join") {
            PollOutcome::Issued(_) => issued += 1,
            PollOutcome::Missing => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(issued, 1);
    assert_eq!(s.devices(&owner.id).await.expect("list").len(), 1);
}

pub async fn assignments(s: Arc<dyn Store>) {
    let s = &*s;
    let owner = account_with(s, "owner", 0).await;
    let dev = device_of(s, &owner, "dev_assign").await;
    assert!(s.assignment(&dev.id).await.expect("read").is_none());

    let first = vec![
        (Service::Chat, "gemma-3-270m".to_string()),
        (Service::Scrape, "web-scrape".to_string()),
    ];
    s.put_assignment(&dev.id, &first, "{\"tier\":0}", 1_000)
        .await
        .expect("put");
    let got = s.assignment(&dev.id).await.expect("read").expect("stored");
    assert_eq!(got.models, first);
    assert_eq!((got.hardware.as_str(), got.assigned_at), ("{\"tier\":0}", 1_000));

    // A new assignment replaces the old one entirely; an empty one is kept as empty.
    let second = vec![(Service::Embeddings, "all-minilm-l6-v2".to_string())];
    s.put_assignment(&dev.id, &second, "{\"tier\":2}", 2_000)
        .await
        .expect("put");
    assert_eq!(
        s.assignment(&dev.id).await.expect("read").expect("stored").models,
        second
    );
    s.put_assignment(&dev.id, &[], "{}", 3_000).await.expect("put");
    let empty = s.assignment(&dev.id).await.expect("read").expect("stored");
    assert!(empty.models.is_empty());
    assert_eq!(empty.assigned_at, 3_000);

    assert!(matches!(
        s.put_assignment("dev_missing", &second, "{}", 1).await,
        Err(StoreError::NotFound(_))
    ));
}

pub async fn device_revocation(s: Arc<dyn Store>) {
    let s = &*s;
    let owner = account_with(s, "owner", 0).await;
    let dev = device_of(s, &owner, "dev_revoke").await;
    let other = device_of(s, &owner, "dev_keep").await;
    assert!(s.revoke_device(&dev.id).await.expect("revoke"));
    assert!(!s.revoke_device(&dev.id).await.expect("again"), "only once");
    assert!(!s.revoke_device("dev_missing").await.expect("missing"));
    let revoked = s.device(&dev.id).await.expect("read").expect("kept");
    assert_eq!(revoked.access_key_hash, "", "the hash is gone");
    assert_eq!(
        (revoked.name.as_str(), revoked.account_id.as_str()),
        (dev.name.as_str(), owner.id.as_str())
    );
    assert_eq!(
        s.device(&other.id).await.expect("read"),
        Some(other),
        "other devices keep theirs"
    );
}
