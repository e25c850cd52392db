//! The orchestrator end to end: the gateway admits only the offers a node was
//! assigned (plus its own upstream's models), and a real node loads only
//! what the gateway's catalog assigns it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use axum::routing::get;
use axum::{Json, Router};
use common::{Db, Gateway, Node};
use cxmpute_testkit::FakeUpstream;
use serde_json::{json, Value};

/// A direct-mode "node" whose hello offers whatever the test says: it
/// stands in for a modified node that announces models it was not given.
async fn fake_node(offers: Value) -> String {
    let hello = json!({ "node_version": "test", "offers": offers, "max_concurrency": 4 });
    let app = Router::new().route("/_cxmpute/hello", get(move || async move { Json(hello.clone()) }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

async fn models(gw: &Gateway) -> Vec<String> {
    let v: Value = gw
        .http
        .get(format!("{}/v1/models", gw.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn offers_outside_the_assignment_stay_out_of_the_pools() {
    let db = Db::sqlite().await;
    let gw = Gateway::start(&db.url).await;
    let (_, cred) = gw.device().await;
    let offers = json!([
        { "service": "scrape", "model": "web-scrape" },
        { "service": "chat", "model": "rogue-model" },
        { "service": "chat", "model": "own-model", "upstream": true },
    ]);

    // A node that never asked for an assignment gets only its upstream model in.
    let url = fake_node(offers.clone()).await;
    let reg = gw
        .post("/v1/provider/register", &cred)
        .json(&json!({ "url": url, "token": "0123456789abcdef0123" }))
        .send()
        .await
        .unwrap();
    assert_eq!(reg.status(), 200);
    assert_eq!(reg.json::<Value>().await.unwrap()["provisions"], 1);
    assert_eq!(models(&gw).await, ["own-model"]);

    // Assigned the scraper (its RAM and disk fit; it cannot load a chat model).
    let assignment: Value = gw
        .post("/v1/provider/assignment", &cred)
        .json(&json!({
            "hardware": { "tier": 0, "ram_mb": 4096, "free_disk_mb": 1000 },
            "opt_in": { "services": ["scrape", "chat"], "max_concurrency": 4 },
            "engines": ["scrape", "llama"],
            "models": ["web-scrape"],
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = assignment["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["web-scrape"], "{assignment}");
    let declined = assignment["declined"].as_array().unwrap();
    assert!(declined
        .iter()
        .any(|d| d["id"] == "gemma-3-270m" && d["reason"] == "the node cannot load this model"));

    let url = fake_node(offers).await;
    let reg = gw
        .post("/v1/provider/register", &cred)
        .json(&json!({ "url": url, "token": "0123456789abcdef0123" }))
        .send()
        .await
        .unwrap();
    assert_eq!(reg.json::<Value>().await.unwrap()["provisions"], 2);
    let mut listed = models(&gw).await;
    listed.sort();
    assert_eq!(listed, ["own-model", "web-scrape"]);
    // The refused model is unknown to clients, not merely unavailable.
    let (_, key) = gw.account(1_000_000_000, json!({})).await;
    let chat = gw
        .post("/v1/chat/completions", &key)
        .json(&json!({ "model": "rogue-model", "messages": [{ "role": "user", "content": "hi" }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(chat.status(), 404);

    // Bad reports are refused precisely and change nothing.
    let bad = gw
        .post("/v1/provider/assignment", &cred)
        .json(&json!({ "opt_in": { "services": ["mining"] } }))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let bad: Value = bad.json().await.unwrap();
    assert_eq!(bad["error"]["param"], "opt_in.services", "{bad}");
    let store = db.store().await;
    let device_id = cred.split('.').next().unwrap();
    let stored = store.assignment(device_id).await.unwrap().unwrap();
    assert_eq!(stored.models.len(), 1);
}

#[tokio::test]
async fn a_real_node_loads_only_what_the_catalog_assigns() {
    let upstream = FakeUpstream::start().await.unwrap();
    let conf_dir = tempfile::tempdir().unwrap();
    let conf = conf_dir.path().join("gateway.toml");
    // A catalog without the scraper.
    std::fs::write(
        &conf,
        "[[catalog]]\nid = \"all-minilm-l6-v2\"\nservice = \"embeddings\"\nengine = \"minilm\"\nmin_ram_mb = 256\n",
    )
    .unwrap();
    let db = Db::sqlite().await;
    let gw = Gateway::start_with(&db.url, 0, &["--config", conf.to_str().unwrap()]).await;
    let (_, cred) = gw.device().await;
    // Scraping is enabled on the node, but not assigned: only the upstream's models show.
    let _node = Node::start(&gw, &cred, &["--upstream", &upstream.base_url]).await;
    gw.wait_providers("fake-tts", 1, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(gw.providers("web-scrape").await, 0);
    let store = db.store().await;
    let stored = store
        .assignment(cred.split('.').next().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(stored.models.is_empty(), "{stored:?}");
    assert!(stored.hardware.contains("ram_mb"), "{}", stored.hardware);
}
