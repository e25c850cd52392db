//! A small Ollama server for tests, written from Ollama's documented REST API
//! (`docs/api.md` in the Ollama repository): `GET /api/tags`, `POST /api/pull`
//! (streamed progress), `POST /api/chat` (NDJSON stream or one object),
//! `POST /api/embed` and `DELETE /api/delete`.
//!
//! It is not Ollama: answers are a pure function of the request so tests can
//! compute what a client must receive. A chat answer is the words of
//! [`fake_ollama_answer`], one word per streamed line; `options.num_predict`
//! caps the words (then `done_reason` is `length`), and a request with tools
//! whose last user message mentions "weather" answers with a tool call.
//! Embeddings are [`fake_embedding`](crate::fake_embedding) vectors.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::AbortHandle;

use crate::fake_embedding;

/// A model the fake can hold: its name as `/api/tags` lists it (`name:tag`),
/// its size in bytes, and its family (`bert` marks an embedding model, as
/// Ollama reports for nomic-embed-text and all-minilm).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeOllamaModel {
    pub name: String,
    pub size: u64,
    pub family: String,
}

impl FakeOllamaModel {
    pub fn chat(name: &str, size: u64) -> Self {
        Self {
            name: full_name(name),
            size,
            family: "llama".into(),
        }
    }

    pub fn embedding(name: &str, size: u64) -> Self {
        Self {
            name: full_name(name),
            size,
            family: "bert".into(),
        }
    }
}

/// `name` with Ollama's default tag added when it has none.
pub fn full_name(name: &str) -> String {
    let after_namespace = name.rsplit('/').next().unwrap_or(name);
    if after_namespace.contains(':') {
        name.to_owned()
    } else {
        format!("{name}:latest")
    }
}

/// What happened on the fake, for assertions.
#[derive(Debug, Default, Clone)]
pub struct FakeOllamaLog {
    /// Models asked for with `/api/pull`, in order.
    pub pulls: Vec<String>,
    /// Models asked for with `/api/delete`, in order.
    pub deletes: Vec<String>,
    /// The body of every `/api/chat` request, in order.
    pub chats: Vec<Value>,
    /// The body of every `/api/embed` request, in order.
    pub embeds: Vec<Value>,
}

struct FakeState {
    installed: Mutex<BTreeMap<String, FakeOllamaModel>>,
    /// What `/api/pull` can fetch, by full name.
    library: BTreeMap<String, FakeOllamaModel>,
    log: Mutex<FakeOllamaLog>,
    /// Delay between streamed lines (pull progress and chat words).
    line_delay: Duration,
}

impl FakeState {
    fn installed(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, FakeOllamaModel>> {
        self.installed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn log(&self) -> std::sync::MutexGuard<'_, FakeOllamaLog> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running fake Ollama on a loopback port; dropping it stops the server.
pub struct FakeOllama {
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT`, what `--ollama` takes.
    pub url: String,
    state: Arc<FakeState>,
    server: AbortHandle,
}

impl Drop for FakeOllama {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeOllama {
    /// Starts with `installed` models present and `library` models pullable
    /// (installed ones are pullable too).
    pub async fn start(installed: Vec<FakeOllamaModel>, library: Vec<FakeOllamaModel>) -> anyhow::Result<Self> {
        Self::start_with_delay(installed, library, Duration::ZERO).await
    }

    pub async fn start_with_delay(
        installed: Vec<FakeOllamaModel>,
        library: Vec<FakeOllamaModel>,
        line_delay: Duration,
    ) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let library = library
            .into_iter()
            .chain(installed.iter().cloned())
            .map(|m| (m.name.clone(), m))
            .collect();
        let state = Arc::new(FakeState {
            installed: Mutex::new(installed.into_iter().map(|m| (m.name.clone(), m)).collect()),
            library,
            log: Mutex::default(),
            line_delay,
        });
        let app = Router::new()
            .route("/", get(|| async { "Ollama is running" }))
            .route("/api/tags", get(tags))
            .route("/api/pull", post(pull))
            .route("/api/chat", post(chat))
            .route("/api/embed", post(embed))
            .route("/api/delete", delete(remove))
            .fallback(|| async { (StatusCode::NOT_FOUND, "404 page not found") })
            .with_state(state.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        })
        .abort_handle();
        Ok(Self {
            addr,
            url: format!("http://{addr}"),
            state,
            server,
        })
    }

    /// Full names of the installed models, sorted.
    pub fn installed(&self) -> Vec<String> {
        self.state.installed().keys().cloned().collect()
    }

    pub fn log(&self) -> FakeOllamaLog {
        self.state.log().clone()
    }

    /// Removes a model behind the node's back (as `ollama rm` would).
    pub fn uninstall(&self, name: &str) {
        self.state.installed().remove(&full_name(name));
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({ "error": message }))).into_response()
}

fn parse(body: &Bytes) -> Result<Value, Box<Response>> {
    serde_json::from_slice::<Value>(body)
        .ok()
        .filter(Value::is_object)
        .ok_or_else(|| Box::new(error(StatusCode::BAD_REQUEST, "invalid JSON body")))
}

/// The model a request names (`model`, or the older `name`).
fn model_of(v: &Value) -> Option<String> {
    v.get("model")
        .or_else(|| v.get("name"))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

fn wants_stream(v: &Value) -> bool {
    v.get("stream").and_then(Value::as_bool).unwrap_or(true)
}

const CREATED_AT: &str = "2026-01-01T00:00:00.000000Z";

fn digest_of(name: &str) -> String {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    format!("{h:016x}{h:016x}{h:016x}{h:016x}")
}

async fn tags(State(state): State<Arc<FakeState>>) -> Response {
    let models: Vec<Value> = state
        .installed()
        .values()
        .map(|m| {
            json!({
                "name": m.name,
                "model": m.name,
                "modified_at": CREATED_AT,
                "size": m.size,
                "digest": digest_of(&m.name),
                "details": {
                    "parent_model": "",
                    "format": "gguf",
                    "family": m.family,
                    "families": [m.family],
                    "parameter_size": "1B",
                    "quantization_level": "Q4_K_M",
                },
            })
        })
        .collect();
    axum::Json(json!({ "models": models })).into_response()
}

fn ndjson(lines: Vec<Value>, delay: Duration) -> Response {
    let body = futures_util::stream::unfold(lines.into_iter(), move |mut it| async move {
        let line = it.next()?;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Some((Ok::<Bytes, Infallible>(Bytes::from(format!("{line}\n"))), it))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(body))
        .unwrap_or_default()
}

async fn pull(State(state): State<Arc<FakeState>>, body: Bytes) -> Response {
    let req = match parse(&body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let Some(model) = model_of(&req) else {
        return error(StatusCode::BAD_REQUEST, "model is required");
    };
    state.log().pulls.push(model.clone());
    let name = full_name(&model);
    let Some(found) = state.library.get(&name).cloned() else {
        let message = "pull model manifest: file does not exist";
        return if wants_stream(&req) {
            ndjson(
                vec![json!({"status": "pulling manifest"}), json!({ "error": message })],
                state.line_delay,
            )
        } else {
            error(StatusCode::INTERNAL_SERVER_ERROR, message)
        };
    };
    state.installed().insert(name.clone(), found.clone());
    if !wants_stream(&req) {
        return axum::Json(json!({"status": "success"})).into_response();
    }
    let digest = format!("sha256:{}", digest_of(&name));
    let total = found.size;
    let mut lines = vec![json!({"status": "pulling manifest"})];
    lines.push(json!({"status": format!("pulling {}", &digest[7..19]), "digest": digest, "total": total}));
    for quarter in 1..=4u64 {
        lines.push(json!({
            "status": format!("pulling {}", &digest[7..19]),
            "digest": digest,
            "total": total,
            "completed": total * quarter / 4,
        }));
    }
    for status in ["verifying sha256 digest", "writing manifest", "success"] {
        lines.push(json!({ "status": status }));
    }
    ndjson(lines, state.line_delay)
}

async fn remove(State(state): State<Arc<FakeState>>, body: Bytes) -> Response {
    let req = match parse(&body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let Some(model) = model_of(&req) else {
        return error(StatusCode::BAD_REQUEST, "model is required");
    };
    state.log().deletes.push(model.clone());
    if state.installed().remove(&full_name(&model)).is_some() {
        StatusCode::OK.into_response()
    } else {
        error(StatusCode::NOT_FOUND, &format!("model '{model}' not found"))
    }
}

fn not_installed(state: &FakeState, model: &str) -> Option<Response> {
    (!state.installed().contains_key(&full_name(model))).then(|| {
        error(
            StatusCode::NOT_FOUND,
            &format!("model \"{model}\" not found, try pulling it first"),
        )
    })
}

/// The words the fake chat answers `last_user_message` with.
pub fn fake_ollama_answer(last_user_message: &str) -> Vec<String> {
    let mut words = vec!["You".to_owned(), "said:".to_owned()];
    words.extend(last_user_message.split_whitespace().map(str::to_owned));
    words
}

/// Whitespace-separated words across all message contents: the fake's
/// `prompt_eval_count`.
fn prompt_words(messages: &[Value]) -> u64 {
    messages
        .iter()
        .filter_map(|m| m.get("content").and_then(Value::as_str))
        .map(|c| c.split_whitespace().count() as u64)
        .sum()
}

async fn chat(State(state): State<Arc<FakeState>>, body: Bytes) -> Response {
    let req = match parse(&body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    state.log().chats.push(req.clone());
    let Some(model) = model_of(&req) else {
        return error(StatusCode::BAD_REQUEST, "model is required");
    };
    if let Some(r) = not_installed(&state, &model) {
        return r;
    }
    let Some(messages) = req.get("messages").and_then(Value::as_array) else {
        return error(StatusCode::BAD_REQUEST, "messages is required");
    };
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .and_then(|m| m.get("content").and_then(Value::as_str))
        .unwrap_or_default();
    let prompt_eval_count = prompt_words(messages);
    let final_line = |done_reason: &str, eval_count: u64, message: Value| {
        json!({
            "model": model,
            "created_at": CREATED_AT,
            "message": message,
            "done": true,
            "done_reason": done_reason,
            "total_duration": 5_000_000,
            "load_duration": 1_000_000,
            "prompt_eval_count": prompt_eval_count,
            "prompt_eval_duration": 1_000_000,
            "eval_count": eval_count,
            "eval_duration": 3_000_000,
        })
    };
    let has_tools = req
        .get("tools")
        .and_then(Value::as_array)
        .is_some_and(|t| !t.is_empty());
    if has_tools && last_user.to_ascii_lowercase().contains("weather") {
        let message = json!({
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        });
        let line = final_line("stop", 7, message);
        return if wants_stream(&req) {
            ndjson(vec![line], state.line_delay)
        } else {
            axum::Json(line).into_response()
        };
    }
    let mut words = fake_ollama_answer(last_user);
    let limit = req
        .pointer("/options/num_predict")
        .and_then(Value::as_u64)
        .map(|n| n as usize);
    let mut reason = "stop";
    if let Some(n) = limit.filter(|&n| n < words.len()) {
        words.truncate(n);
        reason = "length";
    }
    let eval_count = words.len() as u64;
    let json_mode = req.get("format").is_some_and(|f| !f.is_null());
    let pieces: Vec<String> = if json_mode {
        vec![json!({ "answer": words.join(" ") }).to_string()]
    } else {
        words
            .iter()
            .enumerate()
            .map(|(i, w)| if i == 0 { w.clone() } else { format!(" {w}") })
            .collect()
    };
    if !wants_stream(&req) {
        let message = json!({"role": "assistant", "content": pieces.concat()});
        return axum::Json(final_line(reason, eval_count, message)).into_response();
    }
    let mut lines: Vec<Value> = pieces
        .iter()
        .map(|p| {
            json!({
                "model": model,
                "created_at": CREATED_AT,
                "message": {"role": "assistant", "content": p},
                "done": false,
            })
        })
        .collect();
    lines.push(final_line(
        reason,
        eval_count,
        json!({"role": "assistant", "content": ""}),
    ));
    ndjson(lines, state.line_delay)
}

async fn embed(State(state): State<Arc<FakeState>>, body: Bytes) -> Response {
    let req = match parse(&body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    state.log().embeds.push(req.clone());
    let Some(model) = model_of(&req) else {
        return error(StatusCode::BAD_REQUEST, "model is required");
    };
    if let Some(r) = not_installed(&state, &model) {
        return r;
    }
    let inputs: Vec<String> = match req.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => match items.iter().map(|i| i.as_str().map(str::to_owned)).collect() {
            Some(v) => v,
            None => return error(StatusCode::BAD_REQUEST, "input must be a string or a list of strings"),
        },
        _ => return error(StatusCode::BAD_REQUEST, "input is required"),
    };
    let embeddings: Vec<Vec<f32>> = inputs.iter().map(|t| fake_embedding(t)).collect();
    let words: u64 = inputs.iter().map(|t| t.split_whitespace().count() as u64).sum();
    axum::Json(json!({
        "model": model,
        "embeddings": embeddings,
        "total_duration": 2_000_000,
        "load_duration": 1_000_000,
        "prompt_eval_count": words,
    }))
    .into_response()
}
