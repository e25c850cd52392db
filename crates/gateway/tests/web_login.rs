//! Login abuse and session handling, in-process: codes are captured instead
//! of mailed.

#![allow(clippy::unwrap_used)]

mod common;

use axum::http::{Method, StatusCode};
use common::{app, app_with, last_code, Browser};
use cxmpute_gateway::web::config::WebConfig;

#[tokio::test]
async fn a_first_login_creates_the_account_and_a_session() {
    let app = app().await;
    let mut b = Browser::default();
    b.login(&app, "New.User@Example.com").await;
    let me = b.get(&app, "/web/api/me").await;
    assert_eq!(me.status, StatusCode::OK);
    let me = me.json();
    assert_eq!(me["account"]["email"], "new.user@example.com");
    assert_eq!(me["role"], "user");
    assert_eq!(me["csrf_token"], b.session_csrf());
    let page = b.get(&app, "/app").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("new.user@example.com"));

    // Logging in again finds the same account.
    let mut again = Browser::default();
    again.login(&app, "new.user@example.com").await;
    let me2 = again.get(&app, "/web/api/me").await.json();
    assert_eq!(me2["account"]["id"], me["account"]["id"]);
    assert_eq!(app.store.list_accounts().await.unwrap().len(), 1);
}

#[tokio::test]
async fn session_cookies_are_httponly_lax_and_secure_behind_https() {
    let app = app_with(WebConfig {
        public_url: Some("https://cx.example".into()),
        ..WebConfig::default()
    })
    .await;
    let mut b = Browser::default();
    b.request_code(&app, "a@example.com").await;
    let code = last_code(&app, "a@example.com");
    let done = b.verify(&app, "a@example.com", &code).await;
    let set = done
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|v| v.starts_with("cx_session="))
        .unwrap();
    for part in ["HttpOnly", "SameSite=Lax", "Secure", "Path=/"] {
        assert!(set.contains(part), "{set}");
    }
    assert_eq!(done.headers.get("location").unwrap(), "/app");

    let plain = app_with(WebConfig::default()).await;
    let page = Browser::default().get(&plain, "/login").await;
    let set = page.headers.get("set-cookie").unwrap().to_str().unwrap();
    assert!(set.contains("HttpOnly") && !set.contains("Secure"), "{set}");
}

#[tokio::test]
async fn unknown_and_known_addresses_get_the_same_answer() {
    let app = app().await;
    app.store
        .create_account("known", Some("known@example.com"))
        .await
        .unwrap();
    let mut b = Browser::default();
    let known = b.request_code(&app, "known@example.com").await;
    let unknown = b.request_code(&app, "unknown@example.com").await;
    assert_eq!(known.status, StatusCode::OK);
    assert_eq!(unknown.status, known.status);
    assert_eq!(
        known.body.replace("known@example.com", "X"),
        unknown.body.replace("unknown@example.com", "X")
    );
    // Both got a code: the unknown address signs up by using it.
    last_code(&app, "known@example.com");
    last_code(&app, "unknown@example.com");
}

#[tokio::test]
async fn five_wrong_codes_lock_the_code_out() {
    let app = app().await;
    let mut b = Browser::default();
    b.request_code(&app, "a@example.com").await;
    let right = last_code(&app, "a@example.com");
    let wrong = if right == "000000" { "111111" } else { "000000" };
    for _ in 0..5 {
        let r = b.verify(&app, "a@example.com", wrong).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert!(b.get_cookie("cx_session").is_none());
    }
    let r = b.verify(&app, "a@example.com", &right).await;
    assert_eq!(
        r.status,
        StatusCode::UNAUTHORIZED,
        "the right code must fail once locked"
    );
    assert!(r.body.contains("Too many wrong tries"), "{}", r.body);
    assert!(b.get_cookie("cx_session").is_none());

    // Malformed codes are refused without spending an attempt.
    b.request_code(&app, "a@example.com").await;
    let fresh = last_code(&app, "a@example.com");
    for bad in ["12345", "abcdef", "1234567", ""] {
        assert_eq!(
            b.verify(&app, "a@example.com", bad).await.status,
            StatusCode::BAD_REQUEST
        );
    }
    assert_eq!(
        b.verify(&app, "a@example.com", &fresh).await.status,
        StatusCode::SEE_OTHER
    );
}

#[tokio::test]
async fn an_expired_code_is_rejected() {
    let app = app_with(WebConfig {
        code_ttl_secs: 1,
        ..WebConfig::default()
    })
    .await;
    let mut b = Browser::default();
    b.request_code(&app, "a@example.com").await;
    let code = last_code(&app, "a@example.com");
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let r = b.verify(&app, "a@example.com", &code).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.body.contains("expired"), "{}", r.body);
    assert!(b.get_cookie("cx_session").is_none());
}

#[tokio::test]
async fn a_code_works_once() {
    let app = app().await;
    let mut b = Browser::default();
    b.login(&app, "a@example.com").await;
    let code = last_code(&app, "a@example.com");
    let mut thief = Browser::default();
    thief.get(&app, "/login").await;
    assert_eq!(
        thief.verify(&app, "a@example.com", &code).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn a_session_is_dead_after_logout() {
    let app = app().await;
    let mut b = Browser::default();
    b.login(&app, "a@example.com").await;
    let stolen = b.clone();
    let csrf = b.session_csrf();
    let out = b.form(&app, "/logout", &[("csrf", &csrf)]).await;
    assert_eq!(out.status, StatusCode::SEE_OTHER);
    assert_eq!(out.cookie("cx_session").as_deref(), Some(""), "cookie cleared");

    // Replaying the old cookie: the server deleted the session.
    let mut replay = stolen;
    assert_eq!(replay.get(&app, "/web/api/me").await.status, StatusCode::UNAUTHORIZED);
    let page = replay.get(&app, "/app").await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    assert_eq!(page.headers.get("location").unwrap(), "/login");
    let r = replay.json(&app, Method::POST, "/web/api/keys", "{}").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn posts_without_csrf_tokens_are_rejected() {
    let app = app().await;
    let mut b = Browser::default();
    b.login(&app, "a@example.com").await;

    // JSON API: no header, wrong header.
    let r = b
        .send(&app, Method::POST, "/web/api/keys", &[], Some("application/json"), "{}")
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.json()["error"]["code"], "csrf_failed");
    let r = b
        .send(
            &app,
            Method::POST,
            "/web/api/keys",
            &[("x-csrf-token", "nope")],
            Some("application/json"),
            "{}",
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(app.store.api_keys(&me_id(&mut b, &app).await).await.unwrap().is_empty());

    // Dashboard forms.
    let r = b.form(&app, "/app/keys", &[("name", "x"), ("service", "chat")]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = b
        .form(
            &app,
            "/app/keys",
            &[("name", "x"), ("service", "chat"), ("csrf", "bad")],
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(app.store.api_keys(&me_id(&mut b, &app).await).await.unwrap().is_empty());

    // Logout without the token does not log out.
    assert_eq!(b.form(&app, "/logout", &[]).await.status, StatusCode::FORBIDDEN);
    assert_eq!(b.get(&app, "/web/api/me").await.status, StatusCode::OK);

    // Login forms need the login cookie's token.
    let mut fresh = Browser::default();
    let r = fresh.form(&app, "/login", &[("email", "b@example.com")]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    fresh.get(&app, "/login").await;
    let r = fresh
        .form(&app, "/login", &[("email", "b@example.com"), ("csrf", "0000")])
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = fresh
        .form(&app, "/login/verify", &[("email", "b@example.com"), ("code", "123456")])
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(app.mail.lock().unwrap().iter().all(|(to, _)| to != "b@example.com"));
}

async fn me_id(b: &mut Browser, app: &common::App) -> String {
    b.get(app, "/web/api/me").await.json()["account"]["id"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn code_requests_are_limited_per_address_and_per_ip() {
    let app = app_with(WebConfig {
        codes_per_address_per_hour: 2,
        logins_per_ip_per_hour: 5,
        ..WebConfig::default()
    })
    .await;
    let mut b = Browser::default();
    assert_eq!(b.request_code(&app, "a@example.com").await.status, StatusCode::OK);
    assert_eq!(b.request_code(&app, "a@example.com").await.status, StatusCode::OK);
    let r = b.request_code(&app, "A@example.com").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "same address in another case");
    assert!(r.headers.contains_key("retry-after"));
    // Other addresses from the same client, until the per-IP budget (5) is spent.
    assert_eq!(b.request_code(&app, "b@example.com").await.status, StatusCode::OK);
    assert_eq!(
        b.verify(&app, "b@example.com", "000000").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        b.request_code(&app, "c@example.com").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        b.verify(&app, "b@example.com", "000000").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test]
async fn suspended_accounts_cannot_log_in_and_their_sessions_stop() {
    let app = app().await;
    let mut b = Browser::default();
    b.login(&app, "a@example.com").await;
    let id = me_id(&mut b, &app).await;
    app.store.set_suspended(&id, Some("abuse")).await.unwrap();

    let r = b.get(&app, "/web/api/me").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.json()["error"]["code"], "account_suspended");
    assert_eq!(b.get(&app, "/app").await.status, StatusCode::FORBIDDEN);

    let mut again = Browser::default();
    again.request_code(&app, "a@example.com").await;
    let code = last_code(&app, "a@example.com");
    let r = again.verify(&app, "a@example.com", &code).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(again.get_cookie("cx_session").is_none());
}

#[tokio::test]
async fn keys_are_created_listed_and_revoked_by_their_owner() {
    let app = app().await;
    let mut b = Browser::default();
    b.login(&app, "a@example.com").await;
    let r = b
        .json(
            &app,
            Method::POST,
            "/web/api/keys",
            r#"{"name":"ci","credit_limit":5000,"allowed_services":["chat"],"rpm_limit":10}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let created = r.json();
    let secret = created["key"].as_str().unwrap().to_string();
    assert!(secret.starts_with("sk-cx-"));
    let id = created["info"]["id"].as_str().unwrap().to_string();

    let list = b.get(&app, "/web/api/keys").await;
    assert_eq!(list.status, StatusCode::OK);
    assert!(
        !list.body.contains(&secret[secret.len() - 20..]),
        "secrets are never listed"
    );
    let keys = list.json();
    assert_eq!(keys["data"][0]["name"], "ci");
    assert_eq!(keys["data"][0]["credit_limit"], 5000);
    assert_eq!(keys["data"][0]["rpm_limit"], 10);

    // Bad input is a 400, never a 500.
    for bad in [
        r#"{"allowed_services":["nope"]}"#,
        r#"{"credit_limit":-1}"#,
        r#"{"rpm_limit":0}"#,
        r#"{"what":1}"#,
        "not json",
    ] {
        let r = b.json(&app, Method::POST, "/web/api/keys", bad).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {}", r.body);
    }

    // Through the dashboard form too; the secret is shown once.
    let csrf = b.session_csrf();
    let page = b
        .form(
            &app,
            "/app/keys",
            &[
                ("csrf", &csrf),
                ("name", "<b>web</b>"),
                ("credit_limit_usd", "0.5"),
                ("service", "chat"),
                ("service", "embeddings"),
            ],
        )
        .await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("&lt;b&gt;web&lt;/b&gt;") && !page.body.contains("<b>web</b>"));
    assert!(page.body.contains("sk-cx-"));
    let bad = b
        .form(
            &app,
            "/app/keys",
            &[("csrf", &csrf), ("credit_limit_usd", "lots"), ("service", "chat")],
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let none = b.form(&app, "/app/keys", &[("csrf", &csrf)]).await;
    assert_eq!(none.status, StatusCode::BAD_REQUEST);
    let keys = b.get(&app, "/web/api/keys").await.json();
    let web_key = keys["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "<b>web</b>")
        .unwrap();
    assert_eq!(web_key["credit_limit"], 500_000_000);
    assert_eq!(web_key["allowed_services"], serde_json::json!(["chat", "embeddings"]));

    let r = b.json(&app, Method::DELETE, &format!("/web/api/keys/{id}"), "").await;
    assert_eq!(r.status, StatusCode::OK);
    let keys = b.get(&app, "/web/api/keys").await.json();
    assert!(keys["data"][0]["revoked_at"].is_i64());
    let web_id = web_key["id"].as_str().unwrap();
    let r = b
        .form(&app, &format!("/app/keys/{web_id}/revoke"), &[("csrf", &csrf)])
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);

    assert_eq!(b.get(&app, "/web/api/ledger").await.status, StatusCode::OK);
    assert_eq!(b.get(&app, "/web/api/usage").await.status, StatusCode::OK);
}

#[tokio::test]
async fn lifting_a_suspension_does_not_revive_old_sessions() {
    let app = app().await;
    let mut b = Browser::default();
    b.login(&app, "a@example.com").await;
    let id = me_id(&mut b, &app).await;
    let bearer = format!("Bearer {}", common::ADMIN_TOKEN);
    let admin = [("authorization", bearer.as_str())];
    let mut op = Browser::default();
    let r = op
        .send(
            &app,
            Method::POST,
            &format!("/admin/accounts/{id}/suspend"),
            &admin,
            Some("application/json"),
            r#"{"reason":"test"}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = op
        .send(
            &app,
            Method::POST,
            &format!("/admin/accounts/{id}/unsuspend"),
            &admin,
            None,
            "",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(b.get(&app, "/web/api/me").await.status, StatusCode::UNAUTHORIZED);
    // A fresh login works again.
    let mut again = Browser::default();
    again.login(&app, "a@example.com").await;
    assert_eq!(again.get(&app, "/web/api/me").await.status, StatusCode::OK);
}
