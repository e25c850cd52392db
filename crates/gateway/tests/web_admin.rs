//! The operator pages and their effects, in-process: credits, suspension,
//! versioned prices used by the next charge, disconnects, banners, referrals
//! and the public statistics. A small fake node on loopback (direct mode)
//! answers chat requests so that real charges happen.

#![allow(clippy::unwrap_used)]

mod common;

use axum::http::{Method, StatusCode};
use axum::routing::{get, post};
use axum::Json;
use common::{app_with_config, session_for, App, Browser, ADMIN_EMAIL};
use cxmpute_gateway::auth::{create_device, create_key, KeyOptions};
use cxmpute_store::{day_of, now_millis, Account, LedgerKind, Store};
use serde_json::json;

/// A node that offers chat model `m` and answers every request the same way.
async fn fake_node() -> String {
    let app = axum::Router::new()
        .route(
            cxmpute_protocol::link::HELLO_PATH,
            get(|| async {
                Json(json!({
                    "node_version": "test",
                    "offers": [{ "service": "chat", "model": "m", "upstream": true }],
                    "max_concurrency": 8,
                    "placement": { "tier": 2, "country": "nl", "region": "South Holland" },
                }))
            }),
        )
        .route(
            "/v1/chat/completions",
            post(|| async {
                Json(json!({
                    "id": "c1", "object": "chat.completion", "created": 0, "model": "m",
                    "choices": [{ "index": 0, "message": { "role": "assistant", "content": "hello there" }, "finish_reason": "stop" }],
                    "usage": { "prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12 },
                }))
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

async fn gateway() -> App {
    app_with_config(|c| c.link.allow_private_direct_urls = true).await
}

/// An account with a session in `b`, and its id.
async fn signed_in(app: &App, name: &str, email: &str) -> (Account, Browser) {
    let acc = app.store.create_account(name, Some(email)).await.unwrap();
    let b = Browser::with_session(&session_for(app.store.as_ref(), &acc.id).await);
    (acc, b)
}

async fn admin(app: &App) -> Browser {
    signed_in(app, "root", ADMIN_EMAIL).await.1
}

/// Registers a device of `owner` serving chat model `m` through the fake node.
async fn provider_device(app: &App, owner: &Account) -> String {
    let (device_id, credential) = create_device(app.store.as_ref(), &owner.id, "rig").await.unwrap();
    let node = fake_node().await;
    let body = json!({ "url": node, "token": "node-token-0123456789" }).to_string();
    let res = Browser::default()
        .send(
            app,
            Method::POST,
            "/v1/provider/register",
            &[("authorization", &format!("Bearer {credential}"))],
            Some("application/json"),
            &body,
        )
        .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
    device_id
}

async fn chat(app: &App, key: &str) -> common::Answer {
    let body = json!({ "model": "m", "messages": [{ "role": "user", "content": "say hello" }] }).to_string();
    Browser::default()
        .send(
            app,
            Method::POST,
            "/v1/chat/completions",
            &[("authorization", &format!("Bearer {key}"))],
            Some("application/json"),
            &body,
        )
        .await
}

/// The cost the store recorded for the latest request of `account`.
async fn last_cost(store: &dyn Store, account: &str) -> i64 {
    // Settlement runs in a task of its own: wait for it.
    for _ in 0..200 {
        if let Some(u) = store.usage_for_account(account, 1).await.unwrap().first() {
            return u.cost;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("no usage recorded");
}

async fn funded_key(app: &App, acc: &Account) -> String {
    app.store.deposit(&acc.id, 1_000_000_000, Some("test")).await.unwrap();
    create_key(app.store.as_ref(), &acc.id, KeyOptions::default())
        .await
        .unwrap()
        .1
}

#[tokio::test]
async fn an_admin_deposit_is_in_the_ledger_with_the_reason_and_users_are_refused() {
    let app = gateway().await;
    let (user, mut user_b) = signed_in(&app, "user", "user@example.com").await;
    let mut root = admin(&app).await;

    let uri = format!("/web/api/admin/accounts/{}/credits", user.id);
    let done = root
        .json(
            &app,
            Method::POST,
            &uri,
            r#"{"kind":"deposit","amount":5000,"reason":"invoice 42"}"#,
        )
        .await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);
    assert_eq!(done.json()["balance"], 5000);
    let ledger = app.store.ledger(&user.id, 10).await.unwrap();
    assert_eq!(ledger[0].kind, LedgerKind::Deposit);
    assert_eq!(
        ledger[0].note.as_deref(),
        Some(format!("invoice 42 (by {ADMIN_EMAIL})").as_str())
    );

    // The user sees it in their own ledger.
    let own = user_b.get(&app, "/web/api/ledger").await.json();
    assert_eq!(own["data"][0]["note"], format!("invoice 42 (by {ADMIN_EMAIL})"));

    // An adjustment through the page form, negative this time.
    let csrf = root.session_csrf();
    let page = root
        .form(
            &app,
            &format!("/admin/users/{}/credits", user.id),
            &[
                ("csrf", &csrf),
                ("kind", "adjust"),
                ("amount_usd", "-0.000001"),
                ("reason", "correction"),
            ],
        )
        .await;
    assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
    assert_eq!(app.store.account(&user.id).await.unwrap().unwrap().balance, 4000);

    // Refused, and nothing written: below zero, no reason, bad kind, a user.
    let before = app.store.ledger(&user.id, 100).await.unwrap().len();
    for body in [
        r#"{"kind":"adjust","amount":-4001,"reason":"too much"}"#,
        r#"{"kind":"deposit","amount":10,"reason":"  "}"#,
        r#"{"kind":"deposit","amount":-10,"reason":"negative deposit"}"#,
        r#"{"kind":"gift","amount":10,"reason":"x"}"#,
    ] {
        let r = root.json(&app, Method::POST, &uri, body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.body);
        assert_eq!(r.json()["error"]["type"], "invalid_request_error", "{}", r.body);
    }
    let r = user_b
        .json(
            &app,
            Method::POST,
            &uri,
            r#"{"kind":"deposit","amount":1000000,"reason":"me"}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = user_b
        .form(
            &app,
            &format!("/admin/users/{}/credits", user.id),
            &[
                ("csrf", &user_b.session_csrf()),
                ("kind", "deposit"),
                ("amount_usd", "1"),
                ("reason", "me"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(app.store.ledger(&user.id, 100).await.unwrap().len(), before);
    assert_eq!(app.store.account(&user.id).await.unwrap().unwrap().balance, 4000);

    // The admin pages show the account.
    let found = root.get(&app, "/admin?q=USER@example").await;
    assert_eq!(found.status, StatusCode::OK);
    assert!(
        found.body.contains(&format!("/admin/users/{}", user.id)),
        "{}",
        found.body
    );
    let detail = root.get(&app, &format!("/admin/users/{}", user.id)).await;
    assert!(detail.body.contains("invoice 42"));
}

#[tokio::test]
async fn a_price_change_is_a_new_version_and_the_next_request_pays_it() {
    let app = gateway().await;
    let provider = app
        .store
        .create_account("prov", Some("prov@example.com"))
        .await
        .unwrap();
    provider_device(&app, &provider).await;
    let user = app.store.create_account("user", None).await.unwrap();
    let key = funded_key(&app, &user).await;

    let first = chat(&app, &key).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    let cost1 = last_cost(app.store.as_ref(), &user.id).await;
    assert!(cost1 > 0);

    let mut root = admin(&app).await;
    let current = root.get(&app, "/web/api/admin/pricing").await.json();
    assert_eq!(current["version"], 0);
    let mut pricing = current["pricing"].clone();
    pricing["chat_input"] = json!(current["pricing"]["chat_input"].as_i64().unwrap() * 3);
    pricing["chat_output"] = json!(current["pricing"]["chat_output"].as_i64().unwrap() * 3);
    let saved = root
        .json(&app, Method::POST, "/web/api/admin/pricing", &pricing.to_string())
        .await;
    assert_eq!(saved.status, StatusCode::OK, "{}", saved.body);
    assert_eq!(saved.json()["version"], 1);
    let v = app.store.latest_pricing_version().await.unwrap().unwrap();
    assert_eq!((v.version, v.created_by.as_str()), (1, ADMIN_EMAIL));

    // A bad table is refused and changes nothing.
    let mut bad = pricing.clone();
    bad["reward_share_percent"] = json!(150);
    let r = root
        .json(&app, Method::POST, "/web/api/admin/pricing", &bad.to_string())
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    let r = root
        .json(&app, Method::POST, "/web/api/admin/pricing", r#"{"chat_inptu": 1}"#)
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert_eq!(app.store.pricing_versions(10).await.unwrap().len(), 1);

    let second = chat(&app, &key).await;
    assert_eq!(second.status, StatusCode::OK);
    let usage = app.store.usage_for_account(&user.id, 2).await.unwrap();
    let cost2 = if usage.len() == 2 {
        usage[0].cost
    } else {
        panic!("second request not recorded")
    };
    assert_eq!(cost2, 3 * cost1);

    // A gateway started later on the same database uses the stored version.
    let reopened = cxmpute_gateway::Gateway::with_store(app.state.config.clone(), app.store.clone())
        .await
        .unwrap();
    assert_eq!(reopened.state().pricing_version(), 1);
    assert_eq!(
        reopened.state().pricing().chat_input,
        pricing["chat_input"].as_i64().unwrap()
    );
}

#[tokio::test]
async fn suspension_blocks_keys_links_and_the_web_and_disconnects_devices() {
    let app = gateway().await;
    let (owner, mut owner_b) = signed_in(&app, "owner", "owner@example.com").await;
    let key = funded_key(&app, &owner).await;
    let device = provider_device(&app, &owner).await;
    assert!(app.state.pools.all().iter().any(|p| p.device_id == device));
    assert_eq!(chat(&app, &key).await.status, StatusCode::OK);

    let mut root = admin(&app).await;
    let r = root
        .json(
            &app,
            Method::POST,
            &format!("/web/api/admin/accounts/{}/suspend", owner.id),
            r#"{"reason":"fraud"}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);

    let refused = chat(&app, &key).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.body);
    assert_eq!(refused.json()["error"]["code"], "account_suspended");
    assert!(
        !app.state.pools.all().iter().any(|p| p.device_id == device),
        "provisions stay in the pools"
    );
    // The device cannot come back, by direct registration or by link.
    let (_, credential) = create_device(app.store.as_ref(), &owner.id, "second").await.unwrap();
    for path in ["/v1/provider/register", "/v1/provider/link"] {
        let method = if path.ends_with("link") {
            Method::GET
        } else {
            Method::POST
        };
        let r = Browser::default()
            .send(
                &app,
                method,
                path,
                &[("authorization", &format!("Bearer {credential}"))],
                Some("application/json"),
                "{}",
            )
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}: {}", r.body);
    }
    // Web sessions ended.
    assert_eq!(owner_b.get(&app, "/web/api/me").await.status, StatusCode::UNAUTHORIZED);
    let a = app.store.account(&owner.id).await.unwrap().unwrap();
    assert_eq!(
        a.suspended_reason.as_deref(),
        Some(format!("fraud (by {ADMIN_EMAIL})").as_str())
    );

    // Lifting it lets the key work again.
    let r = root
        .json(
            &app,
            Method::POST,
            &format!("/web/api/admin/accounts/{}/unsuspend", owner.id),
            r#"{"reason":"cleared"}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let again = chat(&app, &key).await;
    // No provider any more (the device was disconnected), but not refused.
    assert_eq!(again.status, StatusCode::SERVICE_UNAVAILABLE, "{}", again.body);
}

#[tokio::test]
async fn an_admin_disconnects_a_device_and_public_stats_count_what_is_live() {
    let app = gateway().await;
    let provider = app
        .store
        .create_account("prov", Some("prov@example.com"))
        .await
        .unwrap();
    let device = provider_device(&app, &provider).await;
    let user = app.store.create_account("user", None).await.unwrap();
    let key = funded_key(&app, &user).await;
    for _ in 0..3 {
        assert_eq!(chat(&app, &key).await.status, StatusCode::OK);
    }
    last_cost(app.store.as_ref(), &user.id).await;
    // Settlements are asynchronous: wait until all three are recorded.
    for _ in 0..200 {
        if app.store.usage_for_account(&user.id, 10).await.unwrap().len() == 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }

    let stats = Browser::default().get(&app, "/web/api/public/stats").await;
    assert_eq!(stats.status, StatusCode::OK);
    let stats = stats.json();
    assert_eq!(stats["providers_online"], 1);
    assert_eq!(stats["providers_by_tier"], json!({ "2": 1 }));
    assert_eq!(stats["providers_by_region"], json!({ "NL · South Holland": 1 }));
    assert_eq!(
        stats["providers_by_tier_and_region"],
        json!([{ "tier": "2", "region": "NL · South Holland", "providers": 1 }])
    );
    let network = Browser::default().get(&app, "/network").await;
    assert!(
        network
            .body
            .contains("<td>2 · Blue Surf</td><td>NL · South Holland</td><td>1</td>"),
        "{}",
        network.body
    );
    assert_eq!(
        stats["models"],
        json!([{ "service": "chat", "model": "m", "pool_size": 1 }])
    );
    assert_eq!(stats["requests_today"], 3);
    assert_eq!(stats["day"], day_of(now_millis()));
    assert!(stats["average_latency_ms"].is_number());
    let models = Browser::default().get(&app, "/web/api/public/models").await.json();
    assert_eq!(models["data"][0]["model"], "m");
    assert_eq!(models["data"][0]["input_price"], 2_400);
    let network = Browser::default().get(&app, "/network").await;
    assert!(
        network.body.contains("<dt>Providers online</dt><dd>1</dd>"),
        "{}",
        network.body
    );

    // The provider page shows the device online and what it earned.
    let mut prov_b = Browser::with_session(&session_for(app.store.as_ref(), &provider.id).await);
    let p = prov_b.get(&app, "/web/api/provider").await.json();
    assert_eq!(p["devices"][0]["online"], true);
    assert!(p["devices"][0]["uptime_secs"].as_i64().is_some_and(|s| s < 600), "{p}");
    assert_eq!(p["requests_served"]["today"], 3);
    assert!(p["earnings"]["all_time"].as_i64().unwrap() > 0);
    let page = prov_b.get(&app, "/app/provider").await;
    assert!(
        page.body.contains("<svg") && page.body.contains("<title id=\"earn-t\">"),
        "{}",
        page.body
    );

    let mut root = admin(&app).await;
    let live = root.get(&app, "/web/api/admin/provisions").await.json();
    assert_eq!(live["live"][0]["device_id"], device);
    let r = root
        .json(
            &app,
            Method::POST,
            &format!("/web/api/admin/devices/{device}/disconnect"),
            "",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.json()["provisions_removed"], 1);
    assert!(app.state.pools.all().is_empty());
    assert_eq!(chat(&app, &key).await.status, StatusCode::SERVICE_UNAVAILABLE);
    let p = prov_b.get(&app, "/web/api/provider").await.json();
    assert_eq!(p["devices"][0]["online"], false);
    assert_eq!(p["devices"][0]["uptime_secs"], serde_json::Value::Null);
    let r = root
        .json(&app, Method::POST, "/web/api/admin/devices/dev_nope/disconnect", "")
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn banners_show_on_pages_and_in_public_json_between_their_dates() {
    let app = gateway().await;
    let mut root = admin(&app).await;
    let now = now_millis();
    let body =
        json!({ "message": "Maintenance <tonight>", "level": "warning", "ends_at": now + 3_600_000 }).to_string();
    let made = root.json(&app, Method::POST, "/web/api/admin/banners", &body).await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.body);
    let later =
        json!({ "message": "Next week", "starts_at": now + 86_400_000, "ends_at": now + 2 * 86_400_000 }).to_string();
    assert_eq!(
        root.json(&app, Method::POST, "/web/api/admin/banners", &later)
            .await
            .status,
        StatusCode::CREATED
    );
    let bad = json!({ "message": "x", "level": "loud", "ends_at": now + 1000 }).to_string();
    assert_eq!(
        root.json(&app, Method::POST, "/web/api/admin/banners", &bad)
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    let backwards = json!({ "message": "x", "starts_at": now, "ends_at": now - 1 }).to_string();
    assert_eq!(
        root.json(&app, Method::POST, "/web/api/admin/banners", &backwards)
            .await
            .status,
        StatusCode::BAD_REQUEST
    );

    let public = Browser::default().get(&app, "/web/api/public/banners").await.json();
    let messages: Vec<&str> = public["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["message"].as_str().unwrap())
        .collect();
    assert_eq!(messages, vec!["Maintenance <tonight>"]);
    let page = root.get(&app, "/app").await;
    assert!(page.body.contains("Maintenance &lt;tonight&gt;"), "{}", page.body);
    let network = Browser::default().get(&app, "/network").await;
    assert!(network.body.contains("Maintenance &lt;tonight&gt;"));

    let id = made.json()["id"].as_str().unwrap().to_string();
    let gone = root
        .json(&app, Method::DELETE, &format!("/web/api/admin/banners/{id}"), "")
        .await;
    assert_eq!(gone.status, StatusCode::OK);
    let public = Browser::default().get(&app, "/web/api/public/banners").await.json();
    assert_eq!(public["data"], json!([]));
}

#[tokio::test]
async fn a_referred_sign_up_records_the_referrer_and_payouts_happen_once() {
    let app = gateway().await;
    let (referrer, mut referrer_b) = signed_in(&app, "ref", "ref@example.com").await;
    let mine = referrer_b.get(&app, "/web/api/referrals").await.json();
    let code = mine["code"].as_str().unwrap().to_string();
    assert!(mine["link"].as_str().unwrap().ends_with(&format!("/login?ref={code}")));

    // Sign up through the link: the code travels through both forms.
    let mut b = Browser::default();
    let form = b.get(&app, &format!("/login?ref={}", code.to_lowercase())).await;
    assert!(
        form.body.contains(&format!("name=\"ref\" value=\"{code}\"")),
        "{}",
        form.body
    );
    let csrf = b.login_csrf();
    let sent = b
        .form(
            &app,
            "/login",
            &[("email", "new@example.com"), ("csrf", &csrf), ("ref", &code)],
        )
        .await;
    assert!(sent.body.contains(&format!("name=\"ref\" value=\"{code}\"")));
    let c = common::last_code(&app, "new@example.com");
    let done = b
        .form(
            &app,
            "/login/verify",
            &[
                ("email", "new@example.com"),
                ("code", &c),
                ("csrf", &csrf),
                ("ref", &code),
            ],
        )
        .await;
    assert_eq!(done.status, StatusCode::SEE_OTHER, "{}", done.body);
    let new = app.store.account_by_email("new@example.com").await.unwrap().unwrap();
    assert_eq!(app.store.referrer_of(&new.id).await.unwrap(), Some(referrer.id.clone()));

    // An existing account logging in with a code gets no referrer.
    let mut again = Browser::default();
    again.get(&app, &format!("/login?ref={code}")).await;
    let csrf = again.login_csrf();
    again
        .form(
            &app,
            "/login",
            &[("email", "ref@example.com"), ("csrf", &csrf), ("ref", &code)],
        )
        .await;
    let c = common::last_code(&app, "ref@example.com");
    again
        .form(
            &app,
            "/login/verify",
            &[
                ("email", "ref@example.com"),
                ("code", &c),
                ("csrf", &csrf),
                ("ref", &code),
            ],
        )
        .await;
    assert_eq!(app.store.referrer_of(&referrer.id).await.unwrap(), None);

    // The referred account spends; the admin runs today's payouts twice.
    let key = funded_key(&app, &new).await;
    let provider = app.store.create_account("prov", None).await.unwrap();
    provider_device(&app, &provider).await;
    assert_eq!(chat(&app, &key).await.status, StatusCode::OK);
    let cost = last_cost(app.store.as_ref(), &new.id).await;
    let mut root = admin(&app).await;
    let today = day_of(now_millis());
    let run = json!({ "day": today }).to_string();
    let first = root
        .json(&app, Method::POST, "/web/api/admin/referrals/run", &run)
        .await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    assert_eq!(first.json()["data"][0]["paid"], 1);
    let second = root
        .json(&app, Method::POST, "/web/api/admin/referrals/run", &run)
        .await
        .json();
    assert_eq!(second["data"][0]["paid"], 0);
    assert_eq!(second["data"][0]["already_paid"], 1);
    let earned = app.store.ledger_sum(&referrer.id, LedgerKind::Referral).await.unwrap();
    assert_eq!(earned, cost * 1500 / 10_000);
    let mine = referrer_b.get(&app, "/web/api/referrals").await.json();
    assert_eq!(mine["earned"], earned);
    assert_eq!(mine["referred"][0]["account_id"], new.id);

    let bad = root
        .json(
            &app,
            Method::POST,
            "/web/api/admin/referrals/run",
            r#"{"day":"2026-02-30"}"#,
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    // Users may not trigger payouts.
    let r = referrer_b
        .json(&app, Method::POST, "/web/api/admin/referrals/run", &run)
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn the_dashboard_charts_usage_and_pages_the_ledger() {
    let app = gateway().await;
    let (user, mut b) = signed_in(&app, "user", "user@example.com").await;
    for i in 0..60 {
        app.store.deposit(&user.id, 100 + i, Some("top-up")).await.unwrap();
    }
    let first = b.get(&app, "/web/api/ledger?limit=25").await.json();
    assert_eq!(first["data"].as_array().unwrap().len(), 25);
    let next = first["next_before"].as_i64().unwrap();
    let second = b
        .get(&app, &format!("/web/api/ledger?limit=25&before={next}"))
        .await
        .json();
    assert_eq!(second["data"][0]["amount"], 100 + 34);
    let third = b
        .get(
            &app,
            &format!("/web/api/ledger?limit=25&before={}", second["next_before"]),
        )
        .await
        .json();
    assert_eq!(third["data"].as_array().unwrap().len(), 10);
    assert!(third["next_before"].is_null());
    assert_eq!(
        b.get(&app, "/web/api/ledger?limit=0").await.status,
        StatusCode::BAD_REQUEST
    );

    let provider = app.store.create_account("prov", None).await.unwrap();
    provider_device(&app, &provider).await;
    let key = funded_key(&app, &user).await;
    assert_eq!(chat(&app, &key).await.status, StatusCode::OK);
    last_cost(app.store.as_ref(), &user.id).await;
    let daily = b.get(&app, "/web/api/usage/daily?days=7").await.json();
    assert_eq!(daily["data"][0]["model"], "m");
    assert_eq!(daily["data"][0]["requests"], 1);
    assert_eq!(
        b.get(&app, "/web/api/usage/daily?days=0").await.status,
        StatusCode::BAD_REQUEST
    );
    let page = b.get(&app, "/app").await;
    for part in [
        "<svg",
        "<title id=\"spend-t\">",
        "Usage by day, service and model",
        "curl http://",
        "Older entries",
        "/login?ref=",
    ] {
        assert!(page.body.contains(part), "{part} missing");
    }
}

#[tokio::test]
async fn an_owner_edits_a_key_and_the_new_limits_apply_at_once() {
    let app = gateway().await;
    let provider = app.store.create_account("prov", None).await.unwrap();
    provider_device(&app, &provider).await;
    let (user, mut user_b) = signed_in(&app, "user", "user@example.com").await;
    let key = funded_key(&app, &user).await;
    assert_eq!(chat(&app, &key).await.status, StatusCode::OK);
    let key_id = app.store.api_keys(&user.id).await.unwrap()[0].id.clone();
    let uri = format!("/web/api/keys/{key_id}");

    // Embeddings only: the cached key is dropped, so chat is refused at once.
    let r = user_b
        .json(
            &app,
            Method::PATCH,
            &uri,
            r#"{"name":"emb only","allowed_services":["embeddings"],"rpm_limit":100}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.json()["info"]["name"], "emb only");
    assert_eq!(r.json()["info"]["rpm_limit"], 100);
    let refused = chat(&app, &key).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.body);
    assert_eq!(refused.json()["error"]["code"], "service_not_allowed");

    // Bad settings are refused and change nothing.
    for (body, param) in [
        (r#"{"rpm_limit":0}"#, "rpm_limit"),
        (r#"{"allowed_services":["telepathy"]}"#, "allowed_services"),
        (r#"{"allowed_services":[]}"#, "allowed_services"),
        (r#"{"credit_limit":-1}"#, "credit_limit"),
    ] {
        let r = user_b.json(&app, Method::PATCH, &uri, body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.body);
        assert_eq!(r.json()["error"]["param"], param, "{body}");
    }
    let (_, mut other_b) = signed_in(&app, "other", "other@example.com").await;
    let r = other_b.json(&app, Method::PATCH, &uri, r#"{"name":"mine now"}"#).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    let kept = &app.store.api_keys(&user.id).await.unwrap()[0];
    assert_eq!((kept.name.as_str(), kept.rpm_limit), ("emb only", Some(100)));

    // Absent limits are lifted and an absent name is kept: chat works again.
    let r = user_b.json(&app, Method::PATCH, &uri, "{}").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.json()["info"]["name"], "emb only");
    assert_eq!(r.json()["info"]["rpm_limit"], serde_json::Value::Null);
    assert_eq!(chat(&app, &key).await.status, StatusCode::OK);

    // The dashboard's form does the same, and a revoked key cannot be edited.
    let page = user_b.get(&app, "/app").await;
    assert!(page.body.contains("Edit key emb only"), "{}", page.body);
    let r = user_b.json(&app, Method::DELETE, &uri, "").await;
    assert_eq!(r.status, StatusCode::OK);
    let r = user_b.json(&app, Method::PATCH, &uri, r#"{"name":"back"}"#).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
}
