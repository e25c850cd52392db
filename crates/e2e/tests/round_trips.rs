//! Every service through gateway → link → node → engine and back, with two
//! real nodes, on SQLite and (when configured) PostgreSQL.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use base64::Engine;
use common::{cosine, embedding_vectors, page_server, settled_usage, sse_events, Db, Gateway, Node};
use cxmpute_testkit::{expected_completion, fake_speech, FakeUpstream};
use serde_json::{json, Value};

async fn round_trips(db: Db) {
    let upstream = FakeUpstream::start().await.unwrap();
    let gw = Gateway::start(&db.url).await;
    let (provider_acc, cred_a) = gw.device().await;
    let (_, cred_b) = gw.device().await;
    let _a = Node::start(
        &gw,
        &cred_a,
        &[
            "--upstream",
            &upstream.base_url,
            "--embeddings",
            "--scrape-allow-loopback",
        ],
    )
    .await;
    let _b = Node::start(
        &gw,
        &cred_b,
        &["--upstream", &upstream.base_url, "--scrape-allow-loopback"],
    )
    .await;
    gw.wait_providers("fake-chat", 2, Duration::from_secs(30)).await;
    gw.wait_providers("all-minilm-l6-v2", 1, Duration::from_secs(90)).await;
    let (account, key) = gw.account(1_000_000_000_000, json!({"name": "t"})).await;

    // Models, under both prefixes.
    for prefix in ["/v1", "/api/v1"] {
        let v: Value = gw
            .http
            .get(format!("{}{prefix}/models", gw.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let ids: Vec<&str> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap())
            .collect();
        for want in ["fake-chat", "fake-embed", "fake-tts", "all-minilm-l6-v2", "web-scrape"] {
            assert!(ids.contains(&want), "{want} missing from {ids:?}");
        }
    }

    // Chat, not streamed: the answer is the upstream's.
    let msg = "the quick brown fox";
    let res = gw
        .post("/v1/chat/completions", &key)
        .json(&json!({"model": "fake-chat", "messages": [{"role": "user", "content": msg}], "max_tokens": 6}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers().get("x-request-id").is_some());
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], expected_completion(msg, 6));
    assert_eq!(v["usage"]["completion_tokens"], 6);

    // Chat, streamed, without and with the usage chunk; also under /api/v1.
    for (prefix, include_usage) in [("/v1", false), ("/api/v1", true)] {
        let mut body = json!({"model": "fake-chat", "messages": [{"role": "user", "content": msg}], "max_tokens": 5, "stream": true});
        if include_usage {
            body["stream_options"] = json!({"include_usage": true});
        }
        let res = gw
            .post(&format!("{prefix}/chat/completions"), &key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert!(res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let events = sse_events(&res.text().await.unwrap());
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, expected_completion(msg, 5));
        let usage_chunks: Vec<&Value> = chunks
            .iter()
            .filter(|c| c.get("usage").is_some_and(|u| !u.is_null()))
            .collect();
        if include_usage {
            assert_eq!(usage_chunks.len(), 1);
            assert_eq!(usage_chunks[0]["choices"], json!([]));
            assert_eq!(usage_chunks[0]["usage"]["completion_tokens"], 5);
        } else {
            assert!(usage_chunks.is_empty(), "usage chunk leaked: {usage_chunks:?}");
        }
    }

    // Embeddings: the real MiniLM vectors reproduce sentence-transformers.
    let sentences = [
        "The weather is lovely today.",
        "It's so sunny outside!",
        "He drove to the stadium.",
    ];
    let v: Value = gw
        .post("/v1/embeddings", &key)
        .json(&json!({"model": "all-minilm-l6-v2", "input": sentences}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let vecs = embedding_vectors(&v);
    assert_eq!(vecs[0].len(), 384);
    assert_eq!((cosine(&vecs[0], &vecs[1]) * 1000.0).round(), 666.0);
    assert_eq!((cosine(&vecs[0], &vecs[2]) * 1000.0).round(), 105.0);
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 3);

    // base64 encoding carries the same floats.
    let v: Value = gw
        .post("/v1/embeddings", &key)
        .json(&json!({"model": "all-minilm-l6-v2", "input": sentences[0], "encoding_format": "base64"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(v["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let floats: Vec<f64> = raw
        .chunks(4)
        .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
        .collect();
    assert!((cosine(&floats, &vecs[0]) - 1.0).abs() < 1e-6);

    // Embeddings through the upstream too.
    let res = gw
        .post("/v1/embeddings", &key)
        .json(&json!({"model": "fake-embed", "input": ["a b", "c"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);

    // Speech: the upstream's bytes, unchanged.
    let res = gw
        .post("/v1/audio/speech", &key)
        .json(&json!({"model": "fake-tts", "input": "hello there", "voice": "alloy"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.bytes().await.unwrap().to_vec(), fake_speech("hello there"));

    // Scrape: a real page, fetched by a node, as markdown.
    let site = page_server().await;
    let res = gw
        .post("/v1/scrape", &key)
        .json(&json!({"urls": [format!("{site}/article")], "formats": ["markdown"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    let md = v["results"][0]["markdown"].as_str().unwrap_or_default();
    assert!(md.contains("Tides of the North") && md.contains("twice a day"), "{v}");
    assert!(!md.contains("alert("), "scripts must not leak into markdown: {md}");

    // Every request was charged and recorded; the provider was rewarded.
    let store = db.store().await;
    let (charged, rows) = settled_usage(store.as_ref(), &account, 8).await;
    assert_eq!(rows, 8, "one usage record per request");
    assert!(charged > 0);
    assert_eq!(
        store
            .ledger_sum(&account, cxmpute_store::LedgerKind::Charge)
            .await
            .unwrap(),
        -charged
    );
    let provider_balance = store.account(&provider_acc).await.unwrap().unwrap().balance;
    let acc = store.account(&account).await.unwrap().unwrap();
    assert_eq!(acc.balance, 1_000_000_000_000 - charged);
    assert!(provider_balance >= 0);
    let rewards: i64 = store
        .usage_for_account(&account, 100)
        .await
        .unwrap()
        .iter()
        .map(|u| u.reward)
        .sum();
    assert!(rewards > 0 && rewards < charged);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_round_trips_on_sqlite() {
    round_trips(Db::sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_round_trips_on_postgres() {
    if let Some(db) = Db::postgres().await {
        round_trips(db).await;
    }
}

/// A scrape answer far larger than any buffer on the way (4 pages of 4 MiB,
/// each in two formats: over 32 MiB) arrives whole and is billed per page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_scrape_answer_is_billed_per_page() {
    let db = Db::sqlite().await;
    let gw = Gateway::start(&db.url).await;
    let (_, cred) = gw.device().await;
    let _node = Node::start(&gw, &cred, &["--scrape-allow-loopback"]).await;
    gw.wait_providers("web-scrape", 1, Duration::from_secs(30)).await;
    let (account, key) = gw.account(1_000_000_000_000, json!({})).await;
    let site = page_server().await;
    let urls: Vec<String> = (0..4).map(|i| format!("{site}/big?n={i}")).collect();
    let res = gw
        .post("/v1/scrape", &key)
        .json(&json!({"urls": urls, "formats": ["markdown", "text"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body = res.bytes().await.unwrap();
    assert!(body.len() > 32 << 20, "answer of {} bytes", body.len());
    let v: Value = serde_json::from_slice(&body).unwrap();
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 4);
    for r in results {
        assert!(r["error"].is_null(), "{}", r["error"]);
        assert!(r["markdown"].as_str().unwrap().len() >= 4_000_000);
    }

    let store = db.store().await;
    settled_usage(store.as_ref(), &account, 1).await;
    let usage = store.usage_for_account(&account, 10).await.unwrap();
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0].pages, 4, "every page is billed, however large the answer");
    assert_eq!(usage[0].cost, 4 * 13_000_000);
}
