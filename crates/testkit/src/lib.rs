//! Helpers for cxmpute's integration tests and benchmarks.
//!
//! - [`FakeUpstream`]: a deterministic OpenAI-compatible server to put behind
//!   a provider node (and the benchmark's baseline).
//! - [`fake_hub::FakeHub`]: a server answering like the Hugging Face hub's
//!   file routes, for model downloads.
//! - [`fake_index::FakeIndex`]: a Python package index (simple API, JSON or
//!   HTML pages, wheel files), for the node's wheel downloads.
//! - [`fake_ollama::FakeOllama`]: a small server following Ollama's documented
//!   REST API, for the provider's Ollama backend.
//! - [`wait_for_http`]: wait until a spawned server process answers.
//!
//! Tests bind port 0 and read the chosen address back; there is deliberately
//! no "free port" helper, because picking a port and binding it later races
//! with other tests.

pub mod fake_hub;
pub mod fake_index;
pub mod fake_ollama;
pub mod fake_upstream;
mod ranged;

use std::time::Duration;

pub use fake_upstream::{
    count_prompt_tokens, expected_completion, fake_embedding, fake_speech, FakeOptions, FakeUpstream, Stats,
    EMBEDDING_DIMS, FAIL_TRIGGER, FAKE_TTS_MODEL, SLOW_PREFIX, SLOW_TOKEN_DELAY,
};

/// Polls `GET url` until the server answers with any HTTP response (a 401 or
/// 404 still proves it is up) and returns that status; fails after `timeout`.
///
/// Handy for process-based tests that spawn a binary and must wait for it to
/// bind. Proxies from the environment are ignored: targets are local.
pub async fn wait_for_http(url: &str, timeout: Duration) -> anyhow::Result<reqwest::StatusCode> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2).min(timeout.max(Duration::from_millis(100))))
        .build()?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let err = match client.get(url).send().await {
            Ok(resp) => return Ok(resp.status()),
            Err(err) => err,
        };
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("{url} did not answer within {timeout:?}: {err}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
