//! The Ollama backend against the test kit's fake Ollama (a loopback server
//! written from Ollama's documented REST API), through the node's real router.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use cxmpute_protocol::link::Hello;
use cxmpute_provider::engines::ollama::{Ollama, PullProgress};
use cxmpute_provider::engines::Engines;
use cxmpute_provider::server::{router, NodeState};
use cxmpute_testkit::fake_embedding;
use cxmpute_testkit::fake_ollama::{FakeOllama, FakeOllamaModel};
use serde_json::{json, Value};

fn chat_model() -> FakeOllamaModel {
    FakeOllamaModel::chat("llama3.2", 2_019_393_189)
}

fn embed_model() -> FakeOllamaModel {
    FakeOllamaModel::embedding("nomic-embed-text", 274_302_450)
}

async fn connect(fake: &FakeOllama, pull: &[&str]) -> anyhow::Result<(Ollama, Vec<(String, PullProgress)>)> {
    let mut seen = Vec::new();
    let pull: Vec<String> = pull.iter().map(|s| s.to_string()).collect();
    let ollama = Ollama::connect(&fake.url, &pull, |m, p| seen.push((m.to_owned(), p.clone()))).await?;
    Ok((ollama, seen))
}

/// Serves the node's router with only the Ollama engine; returns its base URL.
async fn serve(ollama: Ollama) -> String {
    let engines = Engines {
        speech: None,
        chat: None,
        minilm: None,
        cpu_slots: Arc::new(tokio::sync::Semaphore::new(2)),
        scrape: None,
        upstream: None,
        ollama: Some(ollama),
    };
    let hello = Hello {
        node_version: "test".into(),
        offers: engines.offers(),
        max_concurrency: 8,
        placement: Default::default(),
    };
    let state = NodeState::new(engines, hello, None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router(state)).await });
    format!("http://{addr}")
}

fn offers(ollama: &Ollama) -> Vec<(String, String)> {
    ollama
        .offers
        .iter()
        .map(|o| (o.service.clone(), o.model.clone()))
        .collect()
}

fn pair(service: &str, model: &str) -> (String, String) {
    (service.to_owned(), model.to_owned())
}

#[tokio::test]
async fn lists_models_and_announces_chat_and_embeddings() {
    let fake = FakeOllama::start(vec![chat_model(), embed_model()], vec![])
        .await
        .unwrap();
    let (ollama, progress) = connect(&fake, &[]).await.unwrap();
    assert!(progress.is_empty());
    assert!(ollama.pulled().is_empty());
    assert_eq!(
        offers(&ollama),
        [
            pair("chat", "llama3.2:latest"),
            pair("chat", "llama3.2"),
            pair("embeddings", "nomic-embed-text:latest"),
            pair("embeddings", "nomic-embed-text"),
        ]
    );
    let listed = ollama.list().await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].size, 2_019_393_189);

    // The node's /v1/models shows them with their service.
    let base = serve(ollama).await;
    let models: Value = reqwest::get(format!("{base}/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "llama3.2:latest",
            "llama3.2",
            "nomic-embed-text:latest",
            "nomic-embed-text"
        ]
    );
}

#[tokio::test]
async fn missing_models_are_pulled_with_progress_and_only_they_are_removed() {
    let qwen = FakeOllamaModel::chat("qwen2.5:0.5b", 397_821_319);
    let fake = FakeOllama::start(vec![chat_model()], vec![qwen, embed_model()])
        .await
        .unwrap();
    let (ollama, progress) = connect(&fake, &["llama3.2", "qwen2.5:0.5b", "nomic-embed-text"])
        .await
        .unwrap();

    // llama3.2 was there already: asked for, but not pulled.
    assert_eq!(fake.log().pulls, ["qwen2.5:0.5b", "nomic-embed-text"]);
    assert_eq!(ollama.pulled(), ["qwen2.5:0.5b", "nomic-embed-text"]);
    assert!(offers(&ollama).contains(&pair("chat", "qwen2.5:0.5b")));
    assert!(offers(&ollama).contains(&pair("embeddings", "nomic-embed-text")));

    // Progress: per model, byte counts that only grow up to the total, then success.
    for model in ["qwen2.5:0.5b", "nomic-embed-text"] {
        let lines: Vec<&PullProgress> = progress.iter().filter(|(m, _)| m == model).map(|(_, p)| p).collect();
        let counts: Vec<u64> = lines.iter().filter_map(|p| p.completed).collect();
        assert!(counts.len() >= 3, "{model}: {lines:?}");
        assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
        assert_eq!(counts.last(), lines.iter().find_map(|p| p.total).as_ref());
        assert_eq!(lines.last().unwrap().status, "success");
    }

    ollama.remove_pulled().await;
    assert_eq!(fake.log().deletes, ["qwen2.5:0.5b", "nomic-embed-text"]);
    assert_eq!(fake.installed(), ["llama3.2:latest"]);
}

#[tokio::test]
async fn a_failed_pull_is_an_error_and_undoes_earlier_pulls() {
    let qwen = FakeOllamaModel::chat("qwen2.5:0.5b", 1_000);
    let fake = FakeOllama::start(vec![], vec![qwen]).await.unwrap();
    let err = connect(&fake, &["qwen2.5:0.5b", "no-such-model"]).await.err().unwrap();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("no-such-model") && msg.contains("file does not exist"),
        "{msg}"
    );
    assert_eq!(fake.log().deletes, ["qwen2.5:0.5b"]);
    assert!(fake.installed().is_empty());
}

#[tokio::test]
async fn an_unreachable_ollama_is_a_clear_error() {
    let fake = FakeOllama::start(vec![], vec![]).await.unwrap();
    let url = fake.url.clone();
    drop(fake);
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let err = Ollama::connect(&url, &[], |_, _| {}).await.err().unwrap();
    assert!(format!("{err:#}").contains("cannot reach Ollama"), "{err:#}");
    let err = Ollama::connect("localhost:11434", &[], |_, _| {}).await.err().unwrap();
    assert!(err.to_string().contains("http://"), "{err}");
}

#[tokio::test]
async fn chat_is_translated_to_an_openai_completion() {
    let fake = FakeOllama::start(vec![chat_model()], vec![]).await.unwrap();
    let (ollama, _) = connect(&fake, &[]).await.unwrap();
    let base = serve(ollama).await;
    let http = reqwest::Client::new();
    let res = http
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({
            "model": "llama3.2",
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}],
            "temperature": 0, "seed": 7, "max_tokens": 50, "stop": ["\n\n"],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "llama3.2");
    assert_eq!(
        body["choices"][0]["message"],
        json!({"role": "assistant", "content": "You said: hello there"})
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    // prompt_eval_count (4 words) and eval_count (4 words).
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8})
    );

    // What Ollama received: its own request shape, settings under options.
    let sent = fake.log().chats.pop().unwrap();
    assert_eq!(sent["stream"], false);
    assert_eq!(
        sent["options"],
        json!({"temperature": 0, "seed": 7, "num_predict": 50, "stop": ["\n\n"]})
    );

    // max_tokens cuts the answer: finish_reason length.
    let cut: Value = http
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({"model": "llama3.2:latest", "max_tokens": 2, "messages": [{"role": "user", "content": "a b c"}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cut["choices"][0]["message"]["content"], "You said:");
    assert_eq!(cut["choices"][0]["finish_reason"], "length");
    assert_eq!(cut["usage"]["completion_tokens"], 2);

    // Tool calls come back in OpenAI's shape, arguments as a JSON string.
    let tools: Value = http
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({
            "model": "llama3.2",
            "messages": [{"role": "user", "content": "what is the weather in Paris?"}],
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let call = &tools["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    assert_eq!(
        serde_json::from_str::<Value>(call["function"]["arguments"].as_str().unwrap()).unwrap(),
        json!({"city": "Paris"})
    );
    assert!(call["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(tools["choices"][0]["finish_reason"], "tool_calls");
}

fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn streamed_chat_becomes_openai_chunks_with_usage() {
    let fake = FakeOllama::start(vec![chat_model()], vec![]).await.unwrap();
    let (ollama, _) = connect(&fake, &[]).await.unwrap();
    let base = serve(ollama).await;
    let res = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({
            "model": "llama3.2",
            "stream": true,
            "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "stream me three words"}],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let events = sse_data(&res.text().await.unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "You said: stream me three words");
    // One chunk per Ollama line: 6 words.
    assert_eq!(chunks.len(), 1 + 6 + 2);
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(
        usage["usage"],
        json!({"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10})
    );
    assert_eq!(fake.log().chats[0]["stream"], true);

    // Without include_usage there is no usage chunk.
    let plain = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({"model": "llama3.2", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!plain.contains("\"usage\""), "{plain}");
    assert!(plain.ends_with("data: [DONE]\n\n"), "{plain}");
}

#[tokio::test]
async fn embeddings_are_translated() {
    let fake = FakeOllama::start(vec![embed_model()], vec![]).await.unwrap();
    let (ollama, _) = connect(&fake, &[]).await.unwrap();
    let base = serve(ollama).await;
    let http = reqwest::Client::new();
    let body: Value = http
        .post(format!("{base}/v1/embeddings"))
        .json(&json!({"model": "nomic-embed-text", "input": ["first text", "second one here"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "nomic-embed-text");
    for (i, text) in ["first text", "second one here"].iter().enumerate() {
        let got: Vec<f32> = serde_json::from_value(body["data"][i]["embedding"].clone()).unwrap();
        assert_eq!(got, fake_embedding(text));
        assert_eq!(body["data"][i]["index"], i);
    }
    assert_eq!(body["usage"], json!({"prompt_tokens": 5, "total_tokens": 5}));
    assert_eq!(fake.log().embeds[0]["input"], json!(["first text", "second one here"]));

    let b64: Value = http
        .post(format!("{base}/v1/embeddings"))
        .json(&json!({"model": "nomic-embed-text", "input": "one", "encoding_format": "base64"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let floats: Vec<f32> = bytes
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(floats, fake_embedding("one"));

    let tokens = http
        .post(format!("{base}/v1/embeddings"))
        .json(&json!({"model": "nomic-embed-text", "input": [1, 2, 3]}))
        .send()
        .await
        .unwrap();
    assert_eq!(tokens.status(), 400);
}

#[tokio::test]
async fn errors_are_openai_errors() {
    let fake = FakeOllama::start(vec![chat_model(), embed_model()], vec![])
        .await
        .unwrap();
    let (ollama, _) = connect(&fake, &[]).await.unwrap();
    let base = serve(ollama).await;
    let http = reqwest::Client::new();
    let post = |body: Value| {
        let http = http.clone();
        let url = format!("{base}/v1/chat/completions");
        async move {
            let res = http.post(url).json(&body).send().await.unwrap();
            let status = res.status().as_u16();
            (status, res.json::<Value>().await.unwrap())
        }
    };

    // A model Ollama does not have is never sent to it.
    let (status, body) = post(json!({"model": "mistral", "messages": [{"role": "user", "content": "x"}]})).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["type"], "invalid_request_error");
    // An embedding model does not chat.
    let (status, _) = post(json!({"model": "nomic-embed-text", "messages": [{"role": "user", "content": "x"}]})).await;
    assert_eq!(status, 404);
    // Remote image URLs are refused before reaching Ollama.
    let (status, body) = post(json!({"model": "llama3.2", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/cat.png"}}]}]}))
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["param"], "messages");
    assert_eq!(fake.log().chats.len(), 0);

    // Removed behind the node's back: Ollama's 404 becomes model_not_found.
    fake.uninstall("llama3.2");
    let (status, body) = post(json!({"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]})).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "model_not_found");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("not found"),
        "{body}"
    );
}
