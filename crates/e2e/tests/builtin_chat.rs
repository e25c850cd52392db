//! The built-in chat engine end to end: client → gateway → link → node →
//! llama.cpp (Gemma 3 270M), metered and billed like any chat.
//!
//! Needs the model in the cache (scripts/fetch-model.sh). Without it the test
//! passes with a loud SKIP message, unless CXMPUTE_REQUIRE_MODELS is set.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{present_or_skip, settled_usage, sse_events, Db, Gateway, Node};
use serde_json::{json, Value};

const MODEL: &str = "gemma-3-270m";

/// The cached model file.
fn model_present() -> bool {
    let file = common::models_root().map(|r| r.join(MODEL).join("gemma-3-270m-q4_k_m.gguf"));
    present_or_skip(
        file.as_ref().is_some_and(|f| f.is_file()),
        &format!("{file:?}"),
        "Run scripts/fetch-model.sh to test the built-in chat engine.",
    )
}

#[tokio::test]
async fn builtin_chat_through_the_gateway() {
    if !model_present() {
        return;
    }
    let db = Db::sqlite().await;
    let gw = Gateway::start(&db.url).await;
    let (_, cred) = gw.device().await;
    let _node = Node::start(&gw, &cred, &["--chat", "--no-scrape", "--chat-slots", "2"]).await;
    gw.wait_providers(MODEL, 1, Duration::from_secs(60)).await;
    let (account, key) = gw.account(1_000_000_000_000, json!({"name": "t"})).await;

    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0,
        "max_tokens": 12,
    });
    let res = gw.post("/v1/chat/completions", &key).json(&body).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let whole: Value = res.json().await.unwrap();
    eprintln!("{whole}");
    let text = whole["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(!text.trim().is_empty());
    let completion_tokens = whole["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=12).contains(&completion_tokens));

    // Streamed, without asking for usage: the gateway asks the node for it and
    // strips it; the client sees content chunks and [DONE].
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let res = gw
        .post("/v1/chat/completions", &key)
        .json(&streamed)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let events = sse_events(&res.text().await.unwrap());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks.iter().all(|c| c.get("usage").is_none_or(Value::is_null)));
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, text, "greedy answers differ between JSON and SSE");

    // Both requests were billed.
    let store = db.store().await;
    let billed = settled_usage(store.as_ref(), &account, 2).await;
    assert_eq!(billed.1, 2, "usage rows");
    assert!(billed.0 > 0, "cost");
}
