//! A small, fast, deterministic OpenAI-compatible server.
//!
//! Integration tests use it as a provider node's "upstream", and the
//! benchmark uses it as the baseline the gateway is measured against, so the
//! request path is kept lean: no logging, no per-request locks, only relaxed
//! atomic counters.
//!
//! Every answer is a pure function of the request (see [`expected_completion`],
//! [`fake_embedding`], [`fake_speech`]), so tests can compute exactly what a
//! client should receive after going through the gateway.

mod chat;
mod media;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use tokio::net::TcpListener;
use tokio::task::AbortHandle;

pub use chat::{count_prompt_tokens, expected_completion, FALLBACK_WORD};
pub use media::{fake_embedding, fake_speech, EMBEDDING_DIMS};

/// Model id served by `POST /v1/audio/speech`.
pub const FAKE_TTS_MODEL: &str = "fake-tts";
/// A last user message equal to this makes chat completions answer 500.
pub const FAIL_TRIGGER: &str = "__fail__";
/// A last user message starting with this streams at [`SLOW_TOKEN_DELAY`].
pub const SLOW_PREFIX: &str = "__slow__";
/// Per-token delay used for [`SLOW_PREFIX`] messages.
pub const SLOW_TOKEN_DELAY: Duration = Duration::from_millis(50);

/// Knobs for [`FakeUpstream::start_with`]. Build with struct-update syntax:
/// `FakeOptions { token_delay: ms(5), ..Default::default() }`.
#[derive(Debug, Clone)]
pub struct FakeOptions {
    /// Chat models; any other model gets a 404 `model_not_found`.
    pub models: Vec<String>,
    /// Embedding models accepted by `/v1/embeddings`.
    pub embedding_models: Vec<String>,
    /// Delay before each generated token (stream and non-stream alike), to
    /// imitate a model's decode speed. Zero means "as fast as possible".
    pub token_delay: Duration,
}

impl Default for FakeOptions {
    fn default() -> Self {
        Self {
            models: vec!["fake-chat".to_owned()],
            embedding_models: vec!["fake-embed".to_owned()],
            token_delay: Duration::ZERO,
        }
    }
}

/// Counters shared by all connections; read them from tests.
#[derive(Debug, Default)]
pub struct Stats {
    requests: AtomicU64,
    in_flight: AtomicU64,
    cancelled_streams: AtomicU64,
}

impl Stats {
    /// Requests received on any route (including ones answered with errors).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Requests still being handled; a streaming response counts until its
    /// body is finished or dropped.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Chat streams whose body was dropped before the final `[DONE]`, i.e.
    /// the client (or the gateway in between) went away mid-stream.
    pub fn cancelled_streams(&self) -> u64 {
        self.cancelled_streams.load(Ordering::Relaxed)
    }

    /// Polls `pred` every few milliseconds until it holds or `timeout` passes.
    /// Cancellation is observed asynchronously (when hyper notices the closed
    /// socket), so tests should wait for it rather than assert immediately.
    pub async fn wait_for(&self, timeout: Duration, pred: impl Fn(&Stats) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if pred(self) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Marks one request as in flight for as long as it lives. Handlers create it
/// first thing; streaming handlers move it into the body stream.
pub(crate) struct InFlight(Arc<Stats>);

impl InFlight {
    fn new(stats: &Arc<Stats>) -> Self {
        stats.requests.fetch_add(1, Ordering::Relaxed);
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(stats))
    }

    /// Request number (1-based), used to make response ids unique.
    fn number(&self) -> u64 {
        self.0.requests.load(Ordering::Relaxed)
    }

    fn note_cancelled_stream(&self) {
        self.0.cancelled_streams.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Shared, read-only server state.
pub(crate) struct AppState {
    models: Vec<String>,
    embedding_models: Vec<String>,
    token_delay: Duration,
    stats: Arc<Stats>,
    /// `/v1/models` never changes, so it is serialised once.
    models_body: Bytes,
}

/// A running fake upstream. Dropping it stops accepting new connections
/// (connections already open finish their current requests).
pub struct FakeUpstream {
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT/v1`, ready to use as an OpenAI base URL.
    pub base_url: String,
    stats: Arc<Stats>,
    server: AbortHandle,
}

impl FakeUpstream {
    /// Starts with [`FakeOptions::default`] on an ephemeral loopback port.
    pub async fn start() -> anyhow::Result<FakeUpstream> {
        Self::start_with(FakeOptions::default()).await
    }

    /// Starts with `opts` on an ephemeral loopback port.
    pub async fn start_with(opts: FakeOptions) -> anyhow::Result<FakeUpstream> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        Self::start_on(listener, opts).await
    }

    /// Serves on an already bound listener (the `fake-upstream` binary uses
    /// this to honour `--port`).
    pub async fn start_on(listener: TcpListener, opts: FakeOptions) -> anyhow::Result<FakeUpstream> {
        let addr = listener.local_addr()?;
        let stats = Arc::new(Stats::default());
        let state = Arc::new(AppState {
            models_body: models_body(&opts),
            models: opts.models,
            embedding_models: opts.embedding_models,
            token_delay: opts.token_delay,
            stats: Arc::clone(&stats),
        });
        let app = Router::new()
            .route("/v1/models", get(list_models))
            .route("/v1/chat/completions", post(chat::completions))
            .route("/v1/embeddings", post(media::embeddings))
            .route("/v1/audio/speech", post(media::speech))
            .fallback(not_found)
            .with_state(state);
        // Streaming latency is what we measure, so small writes must not wait
        // for Nagle's algorithm. A failure here only costs latency.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let server = tokio::spawn(async move {
            // `serve` only returns on a fatal accept error; nobody can act on
            // it, and the test will notice failing connections anyway.
            let _ = axum::serve(listener, app).await;
        })
        .abort_handle();
        Ok(FakeUpstream {
            addr,
            base_url: format!("http://{addr}/v1"),
            stats,
            server,
        })
    }

    /// The shared counters (clone the `Arc` to keep them past the server).
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Shorthand for `stats().requests()`.
    pub fn requests(&self) -> u64 {
        self.stats.requests()
    }

    /// Shorthand for `stats().cancelled_streams()`.
    pub fn cancelled_streams(&self) -> u64 {
        self.stats.cancelled_streams()
    }

    /// Shorthand for `stats().in_flight()`.
    pub fn in_flight(&self) -> u64 {
        self.stats.in_flight()
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn models_body(opts: &FakeOptions) -> Bytes {
    let data: Vec<serde_json::Value> = opts
        .models
        .iter()
        .chain(&opts.embedding_models)
        .map(String::as_str)
        .chain([FAKE_TTS_MODEL])
        .map(|id| serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "fake"}))
        .collect();
    Bytes::from(serde_json::json!({"object": "list", "data": data}).to_string())
}

async fn list_models(axum::extract::State(state): axum::extract::State<Arc<AppState>>) -> Response {
    let _guard = InFlight::new(&state.stats);
    json_response(StatusCode::OK, state.models_body.clone())
}

async fn not_found(axum::extract::State(state): axum::extract::State<Arc<AppState>>) -> Response {
    let _guard = InFlight::new(&state.stats);
    openai_error(
        StatusCode::NOT_FOUND,
        "unknown route",
        "invalid_request_error",
        None,
        None,
    )
}

pub(crate) fn json_response(status: StatusCode, body: impl Into<Body>) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body.into()).into_response()
}

/// Builds an OpenAI-style error: `{"error":{"message","type","param","code"}}`.
pub(crate) fn openai_error(
    status: StatusCode,
    message: &str,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Response {
    let body = serde_json::json!({
        "error": {"message": message, "type": kind, "param": param, "code": code}
    });
    json_response(status, body.to_string())
}

/// 400 for a body that is not valid JSON or not the expected shape.
pub(crate) fn bad_request(message: &str) -> Response {
    openai_error(StatusCode::BAD_REQUEST, message, "invalid_request_error", None, None)
}

/// 404 `model_not_found`, as OpenAI answers for an unknown model.
pub(crate) fn model_not_found(model: &str) -> Response {
    let message = format!("The model `{model}` does not exist or you do not have access to it.");
    openai_error(
        StatusCode::NOT_FOUND,
        &message,
        "invalid_request_error",
        Some("model"),
        Some("model_not_found"),
    )
}

/// Parses a JSON body; the error is the message for a 400 answer.
pub(crate) fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|err| format!("invalid request body: {err}"))
}
