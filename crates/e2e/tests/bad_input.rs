//! Hostile and broken input: each gets the right status and OpenAI error
//! JSON, and the store is left exactly as it was.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Db, Gateway, Node};
use cxmpute_testkit::FakeUpstream;
use serde_json::{json, Value};

async fn expect_error(res: reqwest::Response, status: u16, code: Option<&str>, param: Option<&str>) -> Value {
    assert_eq!(res.status().as_u16(), status);
    let v: Value = res.json().await.expect("error bodies are JSON");
    let err = &v["error"];
    assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(err["type"].is_string(), "{v}");
    if let Some(c) = code {
        assert_eq!(err["code"], c, "{v}");
    }
    if let Some(p) = param {
        assert_eq!(err["param"], p, "{v}");
    }
    v
}

async fn bad_input(db: Db) {
    let upstream = FakeUpstream::start().await.unwrap();
    let gw = Gateway::start(&db.url).await;
    let (_, cred) = gw.device().await;
    let _node = Node::start(&gw, &cred, &["--upstream", &upstream.base_url, "--no-scrape"]).await;
    gw.wait_providers("fake-chat", 1, Duration::from_secs(30)).await;
    let (account, key) = gw.account(1_000_000_000, json!({})).await;
    let (_, revoked) = gw.account(1_000_000_000, json!({})).await;
    let store = db.store().await;
    let revoked_id = revoked.strip_prefix("sk-cx-").unwrap().split('-').next().unwrap();
    gw.admin(reqwest::Method::DELETE, &format!("/keys/{revoked_id}"), None)
        .await;
    let before = store.account(&account).await.unwrap().unwrap();

    let chat = format!("{}/v1/chat/completions", gw.url);
    let c = &gw.http;
    let send = |body: reqwest::Body, key: Option<&str>| {
        let mut r = c.post(&chat).header("content-type", "application/json").body(body);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send()
    };

    expect_error(send("{\"model\": ".into(), Some(&key)).await.unwrap(), 400, None, None).await;
    expect_error(
        send(r#"{"model": 5, "messages": []}"#.into(), Some(&key))
            .await
            .unwrap(),
        400,
        None,
        Some("model"),
    )
    .await;
    expect_error(
        send(r#"{"messages": [{"role":"user","content":"x"}]}"#.into(), Some(&key))
            .await
            .unwrap(),
        400,
        None,
        Some("model"),
    )
    .await;
    expect_error(
        send(
            r#"{"model":"fake-chat","messages":[{"role":"robot","content":"x"}]}"#.into(),
            Some(&key),
        )
        .await
        .unwrap(),
        400,
        None,
        Some("messages[0].role"),
    )
    .await;
    expect_error(
        send(r#"{"model":"fake-chat","messages":[]}"#.into(), Some(&key))
            .await
            .unwrap(),
        400,
        None,
        Some("messages"),
    )
    .await;
    expect_error(
        send(b"{\"model\":\"\xff\xfe\"}".to_vec().into(), Some(&key))
            .await
            .unwrap(),
        400,
        None,
        None,
    )
    .await;
    let big = vec![b'a'; 10 * 1024 * 1024];
    expect_error(
        send(big.into(), Some(&key)).await.unwrap(),
        413,
        Some("request_too_large"),
        None,
    )
    .await;
    expect_error(
        send(
            r#"{"model":"no-such-model","messages":[{"role":"user","content":"x"}]}"#.into(),
            Some(&key),
        )
        .await
        .unwrap(),
        404,
        Some("model_not_found"),
        Some("model"),
    )
    .await;
    let good = r#"{"model":"fake-chat","messages":[{"role":"user","content":"x"}]}"#;
    expect_error(
        send(good.into(), None).await.unwrap(),
        401,
        Some("missing_api_key"),
        None,
    )
    .await;
    expect_error(
        send(good.into(), Some("sk-cx-nosuchkey-0000")).await.unwrap(),
        401,
        Some("invalid_api_key"),
        None,
    )
    .await;
    expect_error(
        send(good.into(), Some("not-even-a-key")).await.unwrap(),
        401,
        Some("invalid_api_key"),
        None,
    )
    .await;
    expect_error(
        send(good.into(), Some(&revoked)).await.unwrap(),
        401,
        Some("invalid_api_key"),
        None,
    )
    .await;
    let wrong_secret = format!("{}x", &key[..key.len() - 1]);
    expect_error(
        send(good.into(), Some(&wrong_secret)).await.unwrap(),
        401,
        Some("invalid_api_key"),
        None,
    )
    .await;
    // Unknown routes and methods answer in the same shape.
    expect_error(
        c.get(format!("{}/v1/nope", gw.url)).send().await.unwrap(),
        404,
        None,
        None,
    )
    .await;
    // Embeddings and speech validate too.
    let emb = gw
        .post("/v1/embeddings", &key)
        .json(&json!({"model": "fake-embed", "input": []}))
        .send()
        .await
        .unwrap();
    expect_error(emb, 400, None, Some("input")).await;
    let tts = gw
        .post("/v1/audio/speech", &key)
        .json(&json!({"model": "fake-tts", "input": "x", "speed": 9}))
        .send()
        .await
        .unwrap();
    expect_error(tts, 400, None, Some("speed")).await;
    let scrape = gw
        .post("/v1/scrape", &key)
        .json(&json!({"urls": vec!["http://x"; 51]}))
        .send()
        .await
        .unwrap();
    expect_error(scrape, 400, None, Some("urls")).await;

    // Nothing was stored, held or charged.
    let after = store.account(&account).await.unwrap().unwrap();
    assert_eq!(before, after);
    assert!(store.usage_for_account(&account, 10).await.unwrap().is_empty());
    assert_eq!(store.held_amount(&account).await.unwrap(), 0);
    assert_eq!(store.ledger(&account, 10).await.unwrap().len(), 1, "only the deposit");

    // The gateway is still fine.
    let res = gw
        .post("/v1/chat/completions", &key)
        .body(good)
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_cleanly_on_sqlite() {
    bad_input(Db::sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_cleanly_on_postgres() {
    if let Some(db) = Db::postgres().await {
        bad_input(db).await;
    }
}
