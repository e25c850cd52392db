//! A node started with `--ollama` (against the test kit's fake Ollama, which
//! follows Ollama's documented API): it pulls what it lacks, serves chat and
//! embeddings through a real gateway, and on SIGTERM removes only the models
//! it pulled.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{settled_usage, sse_events, Db, Gateway, Node};
use cxmpute_testkit::fake_embedding;
use cxmpute_testkit::fake_ollama::{FakeOllama, FakeOllamaModel};
use serde_json::{json, Value};

#[tokio::test]
async fn ollama_models_are_served_and_pulled_ones_removed_at_stop() {
    let fake = FakeOllama::start(
        vec![FakeOllamaModel::chat("llama3.2", 2_000_000_000)],
        vec![
            FakeOllamaModel::chat("qwen2.5:0.5b", 400_000_000),
            FakeOllamaModel::embedding("nomic-embed-text", 270_000_000),
        ],
    )
    .await
    .unwrap();
    let db = Db::sqlite().await;
    let gw = Gateway::start(&db.url).await;
    let (_, cred) = gw.device().await;
    let mut node = Node::start(
        &gw,
        &cred,
        &[
            "--no-scrape",
            "--ollama",
            &fake.url,
            "--ollama-pull",
            "llama3.2",
            "--ollama-pull",
            "qwen2.5:0.5b",
            "--ollama-pull",
            "nomic-embed-text",
        ],
    )
    .await;
    gw.wait_providers("qwen2.5:0.5b", 1, Duration::from_secs(30)).await;
    assert_eq!(fake.log().pulls, ["qwen2.5:0.5b", "nomic-embed-text"]);
    let (account, key) = gw.account(1_000_000_000_000, json!({"name": "t"})).await;

    // Chat, whole and streamed, through gateway → link → node → Ollama.
    let res = gw
        .post("/v1/chat/completions", &key)
        .json(&json!({"model": "llama3.2", "messages": [{"role": "user", "content": "hello tide"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "You said: hello tide");
    assert_eq!(v["usage"]["prompt_tokens"], 2);
    assert_eq!(v["usage"]["completion_tokens"], 4);

    let res = gw
        .post("/v1/chat/completions", &key)
        .json(&json!({"model": "qwen2.5:0.5b", "stream": true, "messages": [{"role": "user", "content": "one two"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let events = sse_events(&res.text().await.unwrap());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let text: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(text, "You said: one two");
    // The gateway asked for usage to meter the stream, then kept it from a
    // client that did not ask.
    assert_eq!(fake.log().chats.last().unwrap()["stream"], true);
    assert!(!events.iter().any(|e| e.contains("\"usage\"")), "{events:?}");

    let res = gw
        .post("/v1/embeddings", &key)
        .json(&json!({"model": "nomic-embed-text", "input": "deep water"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    let got: Vec<f32> = serde_json::from_value(v["data"][0]["embedding"].clone()).unwrap();
    assert_eq!(got, fake_embedding("deep water"));

    // All three were metered and charged.
    let store = db.store().await;
    let (cost, rows) = settled_usage(store.as_ref(), &account, 3).await;
    assert_eq!(rows, 3);
    assert!(cost > 0);

    // Stop: the two pulled models go, the one the user had stays.
    node.terminate();
    let status = tokio::time::timeout(Duration::from_secs(30), node.child.wait())
        .await
        .expect("the node stops")
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(fake.log().deletes, ["qwen2.5:0.5b", "nomic-embed-text"]);
    assert_eq!(fake.installed(), ["llama3.2:latest"]);
}
