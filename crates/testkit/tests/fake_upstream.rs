//! Checks that the fake upstream answers exactly as documented, since other
//! crates' integration tests compute their expectations from the same rules.

use std::time::Duration;

use base64::Engine as _;
use cxmpute_testkit::{
    count_prompt_tokens, expected_completion, fake_embedding, fake_speech, wait_for_http, FakeOptions, FakeUpstream,
};
use serde_json::{json, Value};

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().expect("client")
}

async fn post(up: &FakeUpstream, path: &str, body: Value) -> reqwest::Response {
    client()
        .post(format!("{}{path}", up.base_url))
        .json(&body)
        .send()
        .await
        .expect("request")
}

/// Splits an SSE body into its `data:` payloads.
fn sse_data(body: &str) -> Vec<&str> {
    assert!(body.ends_with("\n\n"), "SSE body must end with a blank line");
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").expect("every event is a data line"))
        .collect()
}

#[test]
fn helpers_are_deterministic() {
    assert_eq!(expected_completion("hello big world", 5), "hello big world hello big ");
    assert_eq!(expected_completion("   ", 2), "fake fake ");
    assert_eq!(expected_completion("x", 0), "");
    assert_eq!(count_prompt_tokens(["be brief", " hello  big world "]), 5);
    let v = fake_embedding("abc");
    assert_eq!(v.len(), 8);
    assert_eq!(v, fake_embedding("abc"));
    assert_ne!(v, fake_embedding("abd"));
    let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "unit length, got {norm}");
    assert_eq!(fake_speech("ab"), b"FAKEAUDIOba");
}

#[tokio::test]
async fn models_lists_everything() {
    let up = FakeUpstream::start().await.expect("start");
    let status = wait_for_http(&format!("{}/models", up.base_url), Duration::from_secs(5)).await;
    assert_eq!(status.expect("up"), 200);
    let body: Value = client()
        .get(format!("{}/models", up.base_url))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    let ids: Vec<&str> = body["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|m| m["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, ["fake-chat", "fake-embed", "fake-tts"]);
    assert_eq!(
        body["data"][0],
        json!({"id": "fake-chat", "object": "model", "created": 0, "owned_by": "fake"})
    );
    assert_eq!(up.requests(), 2);
    assert_eq!(up.in_flight(), 0);
}

#[tokio::test]
async fn chat_non_stream() {
    let up = FakeUpstream::start().await.expect("start");
    let messages = json!([
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello big world"},
    ]);
    let resp = post(
        &up,
        "/chat/completions",
        json!({"model": "fake-chat", "messages": messages, "max_tokens": 5}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "fake-chat");
    assert!(body["id"].as_str().expect("id").starts_with("chatcmpl-"));
    assert!(body["created"].is_u64());
    assert_eq!(
        body["choices"],
        json!([{"index": 0, "message": {"role": "assistant", "content": "hello big world hello big "}, "finish_reason": "length"}])
    );
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10})
    );

    // Default max_tokens is 16.
    let resp = post(
        &up,
        "/chat/completions",
        json!({"model": "fake-chat", "messages": [{"role": "user", "content": "a"}]}),
    )
    .await;
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["choices"][0]["message"]["content"], expected_completion("a", 16));
}

#[tokio::test]
async fn chat_stream_with_usage() {
    let up = FakeUpstream::start().await.expect("start");
    let req = json!({
        "model": "fake-chat",
        "messages": [{"role": "user", "content": "one two"}],
        "max_tokens": 3,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let resp = post(&up, "/chat/completions", req).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let body = resp.text().await.expect("body");
    let events = sse_data(&body);
    assert_eq!(events.len(), 1 + 3 + 1 + 1 + 1, "{body}");
    assert_eq!(*events.last().expect("events"), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk json"))
        .collect();
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], "fake-chat");
        assert_eq!(chunk["id"], chunks[0]["id"]);
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let text: String = chunks[1..4]
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().expect("content"))
        .collect();
    assert_eq!(text, expected_completion("one two", 3));
    assert!(chunks[1]["choices"][0]["finish_reason"].is_null());
    assert_eq!(chunks[4]["choices"][0]["delta"], json!({}));
    assert_eq!(chunks[4]["choices"][0]["finish_reason"], "length");
    assert_eq!(chunks[5]["choices"], json!([]));
    assert_eq!(
        chunks[5]["usage"],
        json!({"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5})
    );
    assert!(
        up.stats()
            .wait_for(Duration::from_secs(2), |s| s.in_flight() == 0)
            .await
    );
    assert_eq!(up.cancelled_streams(), 0);
}

#[tokio::test]
async fn chat_stream_without_usage_and_token_delay() {
    let opts = FakeOptions {
        token_delay: Duration::from_millis(20),
        ..Default::default()
    };
    let up = FakeUpstream::start_with(opts).await.expect("start");
    let started = std::time::Instant::now();
    let req =
        json!({"model": "fake-chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5, "stream": true});
    let body = post(&up, "/chat/completions", req).await.text().await.expect("body");
    assert!(started.elapsed() >= Duration::from_millis(100), "5 tokens x 20 ms");
    let events = sse_data(&body);
    assert_eq!(events.len(), 1 + 5 + 1 + 1);
    assert!(!body.contains("usage"));
}

#[tokio::test]
async fn dropped_stream_is_counted_as_cancelled() {
    let up = FakeUpstream::start().await.expect("start");
    let req = json!({"model": "fake-chat", "messages": [{"role": "user", "content": "__slow__ go"}], "max_tokens": 100, "stream": true});
    let mut resp = post(&up, "/chat/completions", req).await;
    let first = resp.chunk().await.expect("read").expect("first chunk");
    assert!(first.starts_with(b"data: "));
    assert_eq!(up.in_flight(), 1);
    drop(resp);
    assert!(
        up.stats()
            .wait_for(Duration::from_secs(5), |s| s.cancelled_streams() == 1
                && s.in_flight() == 0)
            .await
    );
}

#[tokio::test]
async fn chat_errors() {
    let up = FakeUpstream::start().await.expect("start");
    let resp = post(&up, "/chat/completions", json!({"model": "nope", "messages": []})).await;
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["param"], "model");
    assert_eq!(body["error"]["code"], "model_not_found");
    assert!(body["error"]["message"].as_str().expect("message").contains("nope"));

    let resp = post(
        &up,
        "/chat/completions",
        json!({"model": "fake-chat", "messages": [{"role": "user", "content": "__fail__"}]}),
    )
    .await;
    assert_eq!(resp.status(), 500);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["type"], "server_error");

    for (path, raw) in [
        ("/chat/completions", "{not json"),
        ("/chat/completions", r#"{"model":"fake-chat"}"#),
        ("/embeddings", r#"{"model":"fake-embed","input":5}"#),
        ("/audio/speech", "[]"),
    ] {
        let resp = client()
            .post(format!("{}{path}", up.base_url))
            .body(raw)
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 400, "{path} {raw}");
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
}

#[tokio::test]
async fn embeddings_float_and_base64_agree() {
    let up = FakeUpstream::start().await.expect("start");
    let inputs = json!(["hello world", "second one here"]);
    let float: Value = post(&up, "/embeddings", json!({"model": "fake-embed", "input": inputs}))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(float["object"], "list");
    assert_eq!(float["model"], "fake-embed");
    assert_eq!(float["usage"], json!({"prompt_tokens": 5, "total_tokens": 5}));
    let b64: Value = post(
        &up,
        "/embeddings",
        json!({"model": "fake-embed", "input": inputs, "encoding_format": "base64"}),
    )
    .await
    .json()
    .await
    .expect("json");
    for (i, text) in ["hello world", "second one here"].into_iter().enumerate() {
        assert_eq!(float["data"][i]["index"], i);
        assert_eq!(float["data"][i]["object"], "embedding");
        let floats: Vec<f32> = float["data"][i]["embedding"]
            .as_array()
            .expect("array")
            .iter()
            .map(|x| x.as_f64().expect("number") as f32)
            .collect();
        assert_eq!(floats, fake_embedding(text));
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64["data"][i]["embedding"].as_str().expect("base64 string"))
            .expect("valid base64");
        let decoded: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(decoded, floats);
    }
    let single: Value = post(&up, "/embeddings", json!({"model": "fake-embed", "input": "solo"}))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(single["data"].as_array().expect("data").len(), 1);
    let resp = post(&up, "/embeddings", json!({"model": "fake-chat", "input": "x"})).await;
    assert_eq!(resp.status(), 404);
}

#[tokio::test]
async fn speech_is_deterministic() {
    let up = FakeUpstream::start().await.expect("start");
    let resp = post(
        &up,
        "/audio/speech",
        json!({"model": "fake-tts", "input": "say this", "voice": "alloy"}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "audio/mpeg");
    assert_eq!(resp.bytes().await.expect("body"), fake_speech("say this"));
    let resp = post(
        &up,
        "/audio/speech",
        json!({"model": "fake-tts", "input": "w", "voice": "alloy", "response_format": "wav"}),
    )
    .await;
    assert_eq!(resp.headers()["content-type"], "audio/wav");
    let resp = post(
        &up,
        "/audio/speech",
        json!({"model": "tts-9", "input": "w", "voice": "alloy"}),
    )
    .await;
    assert_eq!(resp.status(), 404);
}

#[tokio::test]
async fn wait_for_http_times_out_on_closed_port() {
    // Bind then drop to get a port that (almost certainly) refuses connections.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let err = wait_for_http(&format!("http://127.0.0.1:{port}/"), Duration::from_millis(200)).await;
    assert!(err.is_err());
}
