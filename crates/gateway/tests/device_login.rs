//! Device login in-process: a node asks for a code, its owner approves it on
//! `/link` (through the real login when signed out), the node's poll gets
//! credentials exactly once, and those credentials get an assignment.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use axum::http::{Method, StatusCode};
use common::{app, app_configured, session_for, Answer, App, Browser};
use cxmpute_gateway::web::device::UserCode;
use cxmpute_store::ids::{hash_secret, random_secret};
use cxmpute_store::{now_millis, NewDeviceCode};
use serde_json::{json, Value};

async fn new_code(app: &App, name: &str) -> Value {
    let res = Browser::default()
        .json(
            app,
            Method::POST,
            "/v1/device/code",
            &json!({ "name": name }).to_string(),
        )
        .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
    res.json()
}

async fn poll(app: &App, device_code: &str) -> Answer {
    Browser::default()
        .json(
            app,
            Method::POST,
            "/v1/device/token",
            &json!({ "device_code": device_code }).to_string(),
        )
        .await
}

fn error_code(answer: &Answer) -> String {
    answer.json()["error"]["code"].as_str().unwrap_or_default().to_string()
}

fn csrf_field(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").expect("a csrf field") + "name=\"csrf\" value=\"".len();
    page[at..].chars().take_while(|c| *c != '"').collect()
}

#[tokio::test]
async fn a_node_gets_credentials_once_after_its_owner_approves_on_the_web() {
    let app = app().await;
    let code = new_code(&app, "basement rig").await;
    let user_code = code["user_code"].as_str().unwrap().to_string();
    let device_code = code["device_code"].as_str().unwrap().to_string();
    assert!(UserCode::parse(&user_code).is_some(), "{user_code}");
    assert_eq!(user_code.len(), 9);
    assert_eq!(device_code.len(), 64);
    assert_eq!(code["verification_uri"], "http://localhost/link");
    assert_eq!(
        code["verification_uri_complete"],
        format!("http://localhost/link?code={user_code}")
    );
    assert_eq!(
        (code["expires_in"].as_u64(), code["interval"].as_u64()),
        (Some(600), Some(5))
    );

    // Signed out: to the login, with the code remembered for afterwards.
    let mut browser = Browser::default();
    let link = format!("/link?code={}", user_code.to_lowercase());
    let res = browser.get(&app, &link).await;
    assert_eq!(res.status, StatusCode::SEE_OTHER);
    assert_eq!(res.headers["location"], "/login");
    assert!(browser.get_cookie("cx_link").is_some());
    let email = "owner@example.com";
    browser.request_code(&app, email).await;
    let done = browser.verify(&app, email, &common::last_code(&app, email)).await;
    assert_eq!(done.status, StatusCode::SEE_OTHER, "{}", done.body);
    assert_eq!(done.headers["location"], format!("/link?code={user_code}").as_str());
    assert!(browser.get_cookie("cx_link").is_none(), "the return cookie is spent");

    let page = browser.get(&app, &format!("/link?code={user_code}")).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert!(page.body.contains("basement rig") && page.body.contains(&user_code));
    let csrf = csrf_field(&page.body);

    // Not approved yet: the node keeps waiting.
    let early = poll(&app, &device_code).await;
    assert_eq!(
        (early.status, error_code(&early).as_str()),
        (StatusCode::BAD_REQUEST, "authorization_pending")
    );

    // A form without the session's CSRF token changes nothing.
    let forged = browser
        .form(
            &app,
            "/link",
            &[("code", &user_code), ("action", "approve"), ("csrf", "x")],
        )
        .await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    let approved = browser
        .form(
            &app,
            "/link",
            &[("code", &user_code), ("action", "approve"), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(approved.status, StatusCode::OK, "{}", approved.body);
    assert!(approved.body.contains("Node approved"));
    let again = browser
        .form(
            &app,
            "/link",
            &[("code", &user_code), ("action", "deny"), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(again.status, StatusCode::CONFLICT);

    // The poll right after the first is too early: slow down, five seconds more.
    let fast = poll(&app, &device_code).await;
    assert_eq!(error_code(&fast), "slow_down");
    assert_eq!(fast.headers["retry-after"], "10");

    // A code approved before its first poll is redeemed by that poll.
    let code2 = new_code(&app, "second rig").await;
    let user2 = code2["user_code"].as_str().unwrap();
    let ok = browser
        .form(
            &app,
            "/link",
            &[("code", user2), ("action", "approve"), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK);
    let issued = poll(&app, code2["device_code"].as_str().unwrap()).await;
    assert_eq!(issued.status, StatusCode::OK, "{}", issued.body);
    let creds = issued.json();
    let owner = app.store.account_by_email(email).await.unwrap().unwrap();
    assert_eq!(creds["account_id"], owner.id.as_str());
    assert_eq!(creds["name"], "second rig");
    let (id, key) = (
        creds["device_id"].as_str().unwrap(),
        creds["access_key"].as_str().unwrap(),
    );
    assert_eq!(creds["credential"], format!("{id}.{key}").as_str());
    let device = app.store.device(id).await.unwrap().unwrap();
    assert_eq!(device.account_id, owner.id);
    assert_eq!(device.access_key_hash, hash_secret(key), "only the hash is stored");

    // Exactly once.
    let twice = poll(&app, code2["device_code"].as_str().unwrap()).await;
    assert_eq!(error_code(&twice), "invalid_grant");
    assert_eq!(app.store.devices(&owner.id).await.unwrap().len(), 1);
    let consumed = browser.get(&app, &format!("/link?code={user2}")).await;
    assert_eq!(consumed.status, StatusCode::NOT_FOUND);

    // The credentials work: the node can ask for its assignment.
    let assigned = Browser::default()
        .send(
            &app,
            Method::POST,
            "/v1/provider/assignment",
            &[("authorization", &format!("Bearer {id}.{key}"))],
            Some("application/json"),
            &json!({
                "hardware": { "ram_mb": 8000, "free_disk_mb": 10000 },
                "engines": ["llama", "minilm", "scrape"],
                "models": ["gemma-3-270m", "all-minilm-l6-v2", "web-scrape"],
            })
            .to_string(),
        )
        .await;
    assert_eq!(assigned.status, StatusCode::OK, "{}", assigned.body);
    let ids: Vec<String> = assigned.json()["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["gemma-3-270m", "all-minilm-l6-v2", "web-scrape"]);
    let stored = app.store.assignment(id).await.unwrap().unwrap();
    assert_eq!(stored.models.len(), 3);
}

#[tokio::test]
async fn denied_expired_and_unknown_codes_are_told_apart() {
    let app = app().await;
    let s = app.store.as_ref();
    let owner = s.create_account("o", Some("o@example.com")).await.unwrap();
    let mut browser = Browser::with_session(&session_for(s, &owner.id).await);
    let csrf = browser.session_csrf();

    let code = new_code(&app, "").await;
    let user_code = code["user_code"].as_str().unwrap();
    let page = browser.get(&app, &format!("/link?code={user_code}")).await;
    assert!(page.body.contains("provider node"), "a default name: {}", page.body);
    let denied = browser
        .form(
            &app,
            "/link",
            &[("code", user_code), ("action", "deny"), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(denied.status, StatusCode::OK);
    assert!(denied.body.contains("Node denied"));
    let told = poll(&app, code["device_code"].as_str().unwrap()).await;
    assert_eq!(error_code(&told), "access_denied");
    assert!(s.devices(&owner.id).await.unwrap().is_empty());

    // An expired code.
    let now = now_millis();
    let expired_user = UserCode::parse("BCDF-GHJK").unwrap();
    let expired_device = random_secret();
    s.create_device_code(NewDeviceCode {
        device_code_hash: hash_secret(&expired_device),
        user_code_hash: expired_user.hash(),
        device_name: "old".into(),
        interval_secs: 5,
        created_at: now - 700_000,
        expires_at: now - 100_000,
    })
    .await
    .unwrap();
    let page = browser.get(&app, "/link?code=BCDF-GHJK").await;
    assert_eq!(page.status, StatusCode::GONE);
    assert!(page.body.contains("expired"));
    let approve = browser
        .form(
            &app,
            "/link",
            &[("code", "BCDF-GHJK"), ("action", "approve"), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(approve.status, StatusCode::GONE);
    assert_eq!(error_code(&poll(&app, &expired_device).await), "expired_token");

    // Malformed and unknown codes.
    let bad = browser.get(&app, "/link?code=12345678").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(bad.body.contains("eight letters"));
    assert_eq!(
        browser.get(&app, "/link?code=ZZZZ-ZZZZ").await.status,
        StatusCode::NOT_FOUND
    );
    let no_action = browser
        .form(&app, "/link", &[("code", "ZZZZ-ZZZZ"), ("csrf", &csrf)])
        .await;
    assert_eq!(no_action.status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&poll(&app, "not-a-code").await), "invalid_grant");
    assert_eq!(error_code(&poll(&app, &random_secret()).await), "invalid_grant");
}

#[tokio::test]
async fn guessing_is_limited_and_suspended_accounts_cannot_approve() {
    let app = app_configured(|c| c.device_login.link_attempts_per_hour = 3).await;
    let s = app.store.as_ref();
    let guesser = s.create_account("g", Some("g@example.com")).await.unwrap();
    let mut browser = Browser::with_session(&session_for(s, &guesser.id).await);
    let code = new_code(&app, "victim").await;
    let user_code = code["user_code"].as_str().unwrap();
    for guess in ["BBBB-BBBB", "CCCC-CCCC", "DDDD-DDDD"] {
        assert_eq!(
            browser.get(&app, &format!("/link?code={guess}")).await.status,
            StatusCode::NOT_FOUND
        );
    }
    // Out of tries: even the right code is refused for now.
    let limited = browser.get(&app, &format!("/link?code={user_code}")).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(limited.headers.contains_key("retry-after"));

    let suspended = s.create_account("s", Some("s@example.com")).await.unwrap();
    s.set_suspended(&suspended.id, Some("test")).await.unwrap();
    let mut b = Browser::with_session(&session_for(s, &suspended.id).await);
    let csrf = b.session_csrf();
    let refused = b
        .form(
            &app,
            "/link",
            &[("code", user_code), ("action", "approve"), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    let info = s
        .device_code(&UserCode::parse(user_code).unwrap().hash())
        .await
        .unwrap()
        .unwrap();
    assert!(info.pending, "a suspended account's approval changes nothing");
}

#[tokio::test]
async fn bad_requests_get_precise_errors_and_codes_are_rate_limited() {
    let app = app_configured(|c| c.device_login.codes_per_ip_per_hour = 3).await;
    let mut b = Browser::default();
    for (body, param) in [
        (r#"{"name": 123}"#, "name"),
        (r#"{"nmae": "x"}"#, ""),
        (&*format!(r#"{{"name": "{}"}}"#, "x".repeat(101)), "name"),
    ] {
        let res = b.json(&app, Method::POST, "/v1/device/code", body).await;
        assert_eq!(res.status, StatusCode::BAD_REQUEST, "{body}: {}", res.body);
        if !param.is_empty() {
            assert_eq!(res.json()["error"]["param"], param, "{}", res.body);
        }
    }
    let limited = b.json(&app, Method::POST, "/v1/device/code", "").await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS, "{}", limited.body);
    assert_eq!(limited.json()["error"]["code"], "rate_limit_exceeded");

    let wrong_grant = b
        .json(
            &app,
            Method::POST,
            "/v1/device/token",
            &json!({"device_code": random_secret(), "grant_type": "password"}).to_string(),
        )
        .await;
    assert_eq!(error_code(&wrong_grant), "unsupported_grant_type");
    let empty = b.json(&app, Method::POST, "/v1/device/token", "").await;
    assert_eq!(empty.status, StatusCode::BAD_REQUEST);

    // The assignment route wants a device credential and a well-formed report.
    let anon = b.json(&app, Method::POST, "/v1/provider/assignment", "{}").await;
    assert_eq!(anon.status, StatusCode::UNAUTHORIZED);
}
