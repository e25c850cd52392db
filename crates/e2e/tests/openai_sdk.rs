//! The official OpenAI Python client (`pip install openai`) against the real
//! gateway and a node with every built-in engine: chat (Gemma), embeddings
//! (MiniLM), speech (Piper) and scrape. The checks themselves are in
//! `tests/sdk/openai_client.py`; this starts the platform and runs it.
//!
//! Needs the models, espeak-ng and the `openai` package; without them the test
//! passes with a loud SKIP message, unless CXMPUTE_REQUIRE_MODELS is set.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{page_server, present_or_skip, Db, Gateway, Node};
use serde_json::json;

fn python() -> String {
    std::env::var("CXMPUTE_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn ready() -> bool {
    let root = common::models_root();
    let has = |rel: &str| root.as_ref().is_some_and(|r| r.join(rel).exists());
    let models = has("gemma-3-270m/gemma-3-270m-q4_k_m.gguf")
        && has("all-minilm-l6-v2/model.safetensors")
        && has("piper-en-us-joe-medium/en_US-joe-medium.onnx")
        && has("onnxruntime-1.32.0");
    let espeak = std::process::Command::new("espeak-ng")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let sdk = std::process::Command::new(python())
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    present_or_skip(
        models && espeak && sdk,
        &format!("the models ({models}), espeak-ng ({espeak}) or the openai package ({sdk})"),
        "Run scripts/fetch-model.sh, install espeak-ng and `pip install openai`.",
    )
}

#[tokio::test]
async fn official_openai_python_client_works_for_every_service() {
    if !ready() {
        return;
    }
    let db = Db::sqlite().await;
    let gw = Gateway::start(&db.url).await;
    let (_, cred) = gw.device().await;
    let _node = Node::start(
        &gw,
        &cred,
        &["--chat", "--embeddings", "--speech", "--scrape-allow-loopback"],
    )
    .await;
    for model in [
        "gemma-3-270m",
        "all-minilm-l6-v2",
        "piper-en-us-joe-medium",
        "web-scrape",
    ] {
        gw.wait_providers(model, 1, Duration::from_secs(90)).await;
    }
    let (_, key) = gw.account(1_000_000_000_000, json!({"name": "sdk"})).await;
    let site = page_server().await;

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/openai_client.py");
    let out = tokio::process::Command::new(python())
        .arg(&script)
        .env("CXMPUTE_BASE_URL", format!("{}/v1", gw.url))
        .env("CXMPUTE_API_KEY", &key)
        .env("CXMPUTE_PAGE_URL", format!("{site}/article"))
        .output();
    let out = tokio::time::timeout(Duration::from_secs(240), out)
        .await
        .expect("the client script finished within 240 s")
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "openai client failed:\n{stdout}\n{stderr}");
    let seen: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    eprintln!("openai client saw: {seen}");
    assert_eq!(seen["embeddings"], json!([0.666, 0.105]));
}
