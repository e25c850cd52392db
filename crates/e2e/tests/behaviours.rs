//! Smaller behaviours a user notices: direct mode, key limits, rate limits,
//! suspension, no provider, cancellation reaching the engine, graceful drain.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Db, Gateway, Node};
use cxmpute_testkit::{expected_completion, FakeUpstream};
use futures_util::StreamExt;
use serde_json::{json, Value};

fn chat(msg: &str) -> Value {
    json!({"model": "fake-chat", "max_tokens": 3, "messages": [{"role": "user", "content": msg}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_mode_serves_like_a_link() {
    let db = Db::sqlite().await;
    let upstream = FakeUpstream::start().await.unwrap();
    let gw = Gateway::start(&db.url).await;
    let (_, cred) = gw.device().await;
    // Find a free port for the node's public URL by binding and releasing it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let url = format!("http://127.0.0.1:{port}");
    let _node = Node::start(
        &gw,
        &cred,
        &[
            "--upstream",
            &upstream.base_url,
            "--no-scrape",
            "--listen",
            &listen,
            "--direct-url",
            &url,
        ],
    )
    .await;
    gw.wait_providers("fake-chat", 1, Duration::from_secs(30)).await;
    let (_, key) = gw.account(1_000_000_000, json!({})).await;
    let v: Value = gw
        .post("/v1/chat/completions", &key)
        .json(&chat("direct path"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        expected_completion("direct path", 3)
    );
    // The node's public URL refuses callers other than the gateway.
    let res = gw
        .http
        .post(format!("{url}/v1/chat/completions"))
        .json(&chat("sneaky"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_limited_and_suspension_is_enforced() {
    let db = Db::sqlite().await;
    let upstream = FakeUpstream::start().await.unwrap();
    let gw = Gateway::start(&db.url).await;
    let (_, cred) = gw.device().await;
    let _node = Node::start(&gw, &cred, &["--upstream", &upstream.base_url, "--no-scrape"]).await;
    gw.wait_providers("fake-chat", 1, Duration::from_secs(30)).await;

    // Requests per minute.
    let (_, key) = gw.account(1_000_000_000, json!({"rpm_limit": 2})).await;
    for _ in 0..2 {
        assert_eq!(
            gw.post("/v1/chat/completions", &key)
                .json(&chat("a"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    let res = gw
        .post("/v1/chat/completions", &key)
        .json(&chat("a"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    assert!(res.headers()["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);

    // Allowed services.
    let (_, key) = gw
        .account(1_000_000_000, json!({"allowed_services": ["embeddings"]}))
        .await;
    let res = gw
        .post("/v1/chat/completions", &key)
        .json(&chat("a"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["error"]["code"], "service_not_allowed");

    // A key's credit limit: the hold of a 3-token answer fits once a bit of limit is left, not at zero.
    let (_, key) = gw.account(1_000_000_000, json!({"credit_limit": 1000})).await;
    let res = gw
        .post("/v1/chat/completions", &key)
        .json(&chat("a"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 402);

    // Suspension: the key stops working at once.
    let (account, key) = gw.account(1_000_000_000, json!({})).await;
    assert_eq!(
        gw.post("/v1/chat/completions", &key)
            .json(&chat("a"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    gw.admin(
        reqwest::Method::POST,
        &format!("/accounts/{account}/suspend"),
        Some(json!({"reason": "abuse"})),
    )
    .await;
    let res = gw
        .post("/v1/chat/completions", &key)
        .json(&chat("a"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    gw.admin(reqwest::Method::POST, &format!("/accounts/{account}/unsuspend"), None)
        .await;
    assert_eq!(
        gw.post("/v1/chat/completions", &key)
            .json(&chat("a"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // No credits at all.
    let (_, broke) = gw.account(0, json!({})).await;
    let res = gw
        .post("/v1/chat/completions", &broke)
        .json(&chat("a"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 402);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_reaches_the_engine_and_drain_finishes_streams() {
    let db = Db::sqlite().await;
    let upstream = FakeUpstream::start().await.unwrap();
    let gw = Gateway::start(&db.url).await;
    let (_, cred) = gw.device().await;
    let node = Node::start(&gw, &cred, &["--upstream", &upstream.base_url, "--no-scrape"]).await;
    gw.wait_providers("fake-chat", 1, Duration::from_secs(30)).await;
    let (_, key) = gw.account(1_000_000_000_000, json!({})).await;
    let slow = json!({"model": "fake-chat", "stream": true, "max_tokens": 200, "messages": [{"role": "user", "content": "__slow__ tell me"}]});

    // A client that walks away mid-stream cancels the upstream request.
    let res = gw.post("/v1/chat/completions", &key).json(&slow).send().await.unwrap();
    let mut body = res.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    let dropped = Instant::now();
    drop(body);
    let cancelled = upstream
        .stats()
        .wait_for(Duration::from_secs(5), |s| s.cancelled_streams() >= 1)
        .await;
    assert!(cancelled, "the upstream never saw the cancellation");
    eprintln!("client disconnect reached the upstream in {:?}", dropped.elapsed());

    // SIGTERM mid-stream: the running stream finishes, then the node leaves.
    let short = json!({"model": "fake-chat", "stream": true, "max_tokens": 20, "messages": [{"role": "user", "content": "__slow__ finish me"}]});
    let res = gw.post("/v1/chat/completions", &key).json(&short).send().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    node.terminate();
    let text = tokio::time::timeout(Duration::from_secs(20), res.text())
        .await
        .unwrap()
        .unwrap();
    assert!(text.contains("[DONE]"), "the stream was cut by the drain: {text}");
    gw.wait_providers("fake-chat", 0, Duration::from_secs(10)).await;

    // With no provider left, a known model answers 503 with Retry-After.
    let res = gw
        .post("/v1/chat/completions", &key)
        .json(&chat("anyone?"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert!(res.headers().get("retry-after").is_some());
}
