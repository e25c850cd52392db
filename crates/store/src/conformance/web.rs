//! Web login: one-time codes and sessions.

use std::sync::Arc;

use super::account_with;
use crate::{now_millis, CodeCheck, Store, StoreError};

const MAX: u32 = 5;

pub async fn login_codes(s: Arc<dyn Store>) {
    let s = &*s;
    let now = now_millis();
    let later = now + 600_000;
    let email = "alice@example.com";
    assert_eq!(
        s.check_login_code(email, "h1", now, MAX).await.expect("check"),
        CodeCheck::Missing
    );

    s.put_login_code(email, "h1", now, later).await.expect("put");
    assert_eq!(
        s.check_login_code(email, "nope", now, MAX).await.expect("check"),
        CodeCheck::Wrong { attempts_left: 4 }
    );
    // Another address's code is separate.
    assert_eq!(
        s.check_login_code("bob@example.com", "h1", now, MAX)
            .await
            .expect("check"),
        CodeCheck::Missing
    );
    assert_eq!(
        s.check_login_code(email, "h1", now, MAX).await.expect("check"),
        CodeCheck::Valid
    );
    // Used once: gone.
    assert_eq!(
        s.check_login_code(email, "h1", now, MAX).await.expect("check"),
        CodeCheck::Missing
    );

    // Five wrong tries lock the code: the right one fails afterwards.
    s.put_login_code(email, "h2", now, later).await.expect("put");
    for left in (0..MAX).rev() {
        assert_eq!(
            s.check_login_code(email, "wrong", now, MAX).await.expect("check"),
            CodeCheck::Wrong { attempts_left: left }
        );
    }
    assert_eq!(
        s.check_login_code(email, "h2", now, MAX).await.expect("check"),
        CodeCheck::Locked
    );
    assert_eq!(
        s.check_login_code(email, "h2", now, MAX).await.expect("check"),
        CodeCheck::Locked
    );

    // A new code replaces the locked one, with fresh attempts.
    s.put_login_code(email, "h3", now, later).await.expect("put");
    assert_eq!(
        s.check_login_code(email, "h2", now, MAX).await.expect("check"),
        CodeCheck::Wrong { attempts_left: 4 }
    );
    assert_eq!(
        s.check_login_code(email, "h3", now, MAX).await.expect("check"),
        CodeCheck::Valid
    );

    // Expired codes are refused even when right, and then forgotten.
    s.put_login_code(email, "h4", now - 700_000, now - 100_000)
        .await
        .expect("put");
    assert_eq!(
        s.check_login_code(email, "h4", now, MAX).await.expect("check"),
        CodeCheck::Expired
    );
    assert_eq!(
        s.check_login_code(email, "h4", now, MAX).await.expect("check"),
        CodeCheck::Missing
    );
    // An expired, locked code reads as expired.
    s.put_login_code(email, "h5", now - 1_000, now + 1_000)
        .await
        .expect("put");
    for _ in 0..MAX {
        s.check_login_code(email, "wrong", now, MAX).await.expect("check");
    }
    assert_eq!(
        s.check_login_code(email, "h5", now + 2_000, MAX).await.expect("check"),
        CodeCheck::Expired
    );

    // Purging takes expired codes only.
    s.put_login_code("old@example.com", "x", now - 10, now - 1)
        .await
        .expect("put");
    s.put_login_code("new@example.com", "y", now, later).await.expect("put");
    assert_eq!(s.purge_expired_logins(now).await.expect("purge"), 1);
    assert_eq!(
        s.check_login_code("new@example.com", "y", now, MAX)
            .await
            .expect("check"),
        CodeCheck::Valid
    );
}

pub async fn concurrent_code_checks(s: Arc<dyn Store>) {
    let now = now_millis();
    let later = now + 600_000;
    s.put_login_code("c@example.com", "right", now, later)
        .await
        .expect("put");
    // Twenty wrong guesses at once: exactly MAX of them are counted.
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.check_login_code("c@example.com", "wrong", now, MAX)
                .await
                .expect("check")
        }));
    }
    let mut wrong = 0;
    for t in tasks {
        match t.await.expect("task") {
            CodeCheck::Wrong { .. } => wrong += 1,
            CodeCheck::Locked => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(wrong, MAX);

    // The right code sent ten times at once logs in exactly once.
    s.put_login_code("d@example.com", "right", now, later)
        .await
        .expect("put");
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.check_login_code("d@example.com", "right", now, 20)
                .await
                .expect("check")
        }));
    }
    let mut valid = 0;
    for t in tasks {
        if t.await.expect("task") == CodeCheck::Valid {
            valid += 1;
        }
    }
    assert_eq!(valid, 1);
}

pub async fn sessions(s: Arc<dyn Store>) {
    let s = &*s;
    let now = now_millis();
    let a = s
        .create_account("alice", Some("Alice@Example.com"))
        .await
        .expect("create");
    let b = account_with(s, "bob", 0).await;
    let by_email = s.account_by_email("alice@example.COM").await.expect("by email");
    assert_eq!(by_email.map(|x| x.id), Some(a.id.clone()));
    assert_eq!(s.account_by_email("nobody@example.com").await.expect("by email"), None);

    s.create_session("t1", &a.id, now, now + 60_000).await.expect("session");
    s.create_session("t2", &a.id, now, now + 60_000).await.expect("session");
    s.create_session("t3", &b.id, now, now + 60_000).await.expect("session");
    s.create_session("old", &b.id, now - 10, now - 1)
        .await
        .expect("session");
    let r = s.create_session("t1", &b.id, now, now + 60_000).await;
    assert!(matches!(r, Err(StoreError::Conflict(_))), "{r:?}");
    let r = s.create_session("t9", "acc_nope", now, now + 60_000).await;
    assert!(matches!(r, Err(StoreError::NotFound(_))), "{r:?}");

    let read = s.session("t1", now).await.expect("read").expect("live");
    assert_eq!(read.account.id, a.id);
    assert_eq!(read.account.email.as_deref(), Some("Alice@Example.com"));
    assert_eq!(read.created_at, now);
    assert_eq!(read.expires_at, now + 60_000);
    assert_eq!(s.session("nope", now).await.expect("read"), None);
    assert_eq!(s.session("old", now).await.expect("read"), None, "expired");
    assert_eq!(s.session("t1", now + 60_000).await.expect("read"), None, "expired");

    // The session carries the account's current state, suspension included.
    s.set_suspended(&a.id, Some("abuse")).await.expect("suspend");
    assert!(
        s.session("t1", now)
            .await
            .expect("read")
            .expect("live")
            .account
            .suspended
    );

    assert!(s.delete_session("t1").await.expect("delete"));
    assert!(!s.delete_session("t1").await.expect("delete"));
    assert_eq!(s.session("t1", now).await.expect("read"), None);
    assert_eq!(s.delete_sessions_of(&a.id).await.expect("delete all"), 1);
    assert_eq!(s.session("t2", now).await.expect("read"), None);
    assert!(s.session("t3", now).await.expect("read").is_some());

    assert_eq!(s.purge_expired_logins(now).await.expect("purge"), 1);
    assert!(!s.delete_session("old").await.expect("delete"));
    assert!(s.session("t3", now).await.expect("read").is_some());
}
