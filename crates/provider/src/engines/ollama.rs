//! A local [Ollama](https://ollama.com) as an engine, through its own REST API
//! (not its OpenAI-compatible one, which has no pulls, deletes or listing):
//!
//! - `GET /api/tags`: the models it holds, announced as `chat` or `embeddings`.
//! - `POST /api/pull`: models named in `ollama_pull` that it lacks, fetched at
//!   start with progress in the log; `DELETE /api/delete` removes exactly
//!   those at stop, never a model that was there before.
//! - `POST /api/chat`: an OpenAI chat completion translated to Ollama's
//!   request, and its answer (one object, or NDJSON lines) back to OpenAI's
//!   JSON or SSE chunks, usage from `prompt_eval_count` / `eval_count`.
//! - `POST /api/embed`: OpenAI embeddings.

use std::collections::HashSet;
use std::convert::Infallible;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use axum::body::Body;
use axum::http::{header, HeaderValue, Response, StatusCode};
use bytes::{Bytes, BytesMut};
use cxmpute_protocol::link::Offer;
use cxmpute_protocol::openai::{ChatMessage, ChatRequest, EmbeddingInput, EmbeddingsRequest, MessageContent, Role};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::error_response;
use super::llama::http::{completion_id, error_frame, error_with_param, unix_now, usage, Frames};
use super::upstream::guess_service;

/// An NDJSON line longer than this ends the answer with an error.
const MAX_LINE_BYTES: usize = 16 << 20;

#[derive(Clone)]
pub struct Ollama {
    /// e.g. `http://127.0.0.1:11434`, without a trailing slash.
    base: String,
    client: reqwest::Client,
    pub offers: Vec<Offer>,
    /// Models this node pulled at start because Ollama lacked them; the only
    /// ones [`Ollama::remove_pulled`] deletes.
    pulled: Vec<String>,
}

/// One entry of `GET /api/tags`.
#[derive(Debug, Clone, Deserialize)]
pub struct TagModel {
    pub name: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub details: TagDetails,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct TagDetails {
    #[serde(default)]
    pub family: Option<String>,
    #[serde(default)]
    pub families: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct Tags {
    #[serde(default)]
    models: Vec<TagModel>,
}

/// One line of `POST /api/pull`'s progress stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct PullProgress {
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub digest: Option<String>,
    #[serde(default)]
    pub total: Option<u64>,
    #[serde(default)]
    pub completed: Option<u64>,
    #[serde(default)]
    pub error: Option<String>,
}

/// `name` with Ollama's default tag (`latest`) when it has none, as
/// `/api/tags` lists it.
pub fn full_name(name: &str) -> String {
    let name = name.trim();
    let last = name.rsplit('/').next().unwrap_or(name);
    if last.contains(':') {
        name.to_owned()
    } else {
        format!("{name}:latest")
    }
}

/// Embedding models report an encoder family (nomic-embed-text: `nomic-bert`,
/// all-minilm and mxbai: `bert`); names are the fallback.
fn is_embedding(m: &TagModel) -> bool {
    let families = m.details.family.iter().chain(m.details.families.iter().flatten());
    families.map(|f| f.to_ascii_lowercase()).any(|f| f.contains("bert")) || guess_service(&m.name) == "embeddings"
}

/// What a node announces for the models Ollama holds: each under its listed
/// name, and `name:latest` also under the bare name clients usually send.
pub fn offers_for(models: &[TagModel]) -> Vec<Offer> {
    let mut offers = Vec::new();
    for m in models {
        let service = if is_embedding(m) { "embeddings" } else { "chat" };
        let mut names = vec![m.name.clone()];
        if let Some(bare) = m.name.strip_suffix(":latest") {
            names.push(bare.to_owned());
        }
        for model in names {
            let offer = Offer {
                service: service.into(),
                model,
                upstream: true,
            };
            if !offers.contains(&offer) {
                offers.push(offer);
            }
        }
    }
    offers
}

/// A human line for one progress update, e.g.
/// `llama3.2: pulling 8934d96d3f08 45% (1.7 GB of 3.8 GB)`.
pub fn progress_line(model: &str, p: &PullProgress) -> String {
    match (p.completed, p.total) {
        (Some(done), Some(total)) if total > 0 => format!(
            "{model}: {} {}% ({} of {})",
            p.status,
            done.saturating_mul(100) / total,
            human_bytes(done),
            human_bytes(total)
        ),
        (None, Some(total)) => format!("{model}: {} ({})", p.status, human_bytes(total)),
        _ => format!("{model}: {}", p.status),
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KB", "MB", "GB", "TB"];
    if n < 1000 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1000.0;
    let mut unit = 0;
    while v >= 1000.0 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Logs pull progress without flooding: a line when the status changes, and
/// at most one every two seconds while bytes arrive.
pub fn log_progress(model: &str) -> impl FnMut(&PullProgress) {
    let model = model.to_owned();
    let mut last_status = String::new();
    let mut last_at: Option<Instant> = None;
    move |p: &PullProgress| {
        let due = last_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(2));
        let finished = matches!((p.completed, p.total), (Some(c), Some(t)) if c >= t);
        if p.status != last_status || due || finished {
            tracing::info!("{}", progress_line(&model, p));
            last_status.clone_from(&p.status);
            last_at = Some(Instant::now());
        }
    }
}

fn normalise_base(url: &str) -> anyhow::Result<String> {
    let base = url.trim().trim_end_matches('/');
    let base = base.strip_suffix("/api").unwrap_or(base);
    anyhow::ensure!(
        base.starts_with("http://") || base.starts_with("https://"),
        "the Ollama URL must start with http:// or https://, got '{url}'"
    );
    Ok(base.to_owned())
}

/// The `error` of an Ollama error body, or the body itself.
fn ollama_message(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().chars().take(500).collect())
}

impl Ollama {
    /// Connects, pulls the models in `pull` that Ollama lacks (reporting
    /// progress to `progress` with the model's name), and lists what it
    /// holds. If a pull fails, models pulled before it are removed again.
    pub async fn connect(
        url: &str,
        pull: &[String],
        mut progress: impl FnMut(&str, &PullProgress),
    ) -> anyhow::Result<Ollama> {
        let base = normalise_base(url)?;
        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()?;
        let mut ollama = Ollama {
            base,
            client,
            offers: Vec::new(),
            pulled: Vec::new(),
        };
        let before: HashSet<String> = ollama.list().await?.into_iter().map(|m| full_name(&m.name)).collect();
        for model in pull {
            if before.contains(&full_name(model)) {
                tracing::info!(model = %model, "Ollama already has this model; it stays after the node stops");
                continue;
            }
            let pulled = ollama.pull(model, |p| progress(model, p)).await;
            if let Err(e) = pulled {
                ollama.remove_pulled().await;
                return Err(e);
            }
            ollama.pulled.push(model.clone());
        }
        let models = ollama.list().await?;
        ollama.offers = offers_for(&models);
        Ok(ollama)
    }

    /// Models this node pulled (and will remove at stop).
    pub fn pulled(&self) -> &[String] {
        &self.pulled
    }

    pub fn serves(&self, service: &str, model: &str) -> bool {
        self.offers.iter().any(|o| o.service == service && o.model == model)
    }

    /// `GET /api/tags`.
    pub async fn list(&self) -> anyhow::Result<Vec<TagModel>> {
        let url = format!("{}/api/tags", self.base);
        let res = self
            .client
            .get(&url)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .with_context(|| format!("cannot reach Ollama at {}", self.base))?;
        let status = res.status();
        let body = res.bytes().await.with_context(|| format!("reading {url}"))?;
        if !status.is_success() {
            bail!(
                "Ollama at {} refused GET /api/tags ({status}): {}",
                self.base,
                ollama_message(&body)
            );
        }
        let tags: Tags = serde_json::from_slice(&body)
            .with_context(|| format!("{url} answered with something that is not Ollama's model list"))?;
        Ok(tags.models)
    }

    /// `POST /api/pull`, streaming: every progress line goes to `progress`.
    pub async fn pull(&self, model: &str, mut progress: impl FnMut(&PullProgress)) -> anyhow::Result<()> {
        let res = self
            .client
            .post(format!("{}/api/pull", self.base))
            .json(&json!({ "model": model, "stream": true }))
            .send()
            .await
            .with_context(|| format!("cannot reach Ollama at {} to pull {model}", self.base))?;
        let status = res.status();
        if !status.is_success() {
            let body = res.bytes().await.unwrap_or_default();
            bail!("Ollama could not pull {model} ({status}): {}", ollama_message(&body));
        }
        let mut lines = NdJson::new(Box::pin(res.bytes_stream()));
        let mut succeeded = false;
        while let Some(line) = lines.next_line().await {
            let line = line.with_context(|| format!("pulling {model}"))?;
            let p: PullProgress = serde_json::from_slice(&line)
                .with_context(|| format!("Ollama sent a progress line that is not JSON while pulling {model}"))?;
            if let Some(e) = &p.error {
                bail!("Ollama could not pull {model}: {e}");
            }
            progress(&p);
            succeeded |= p.status == "success";
        }
        anyhow::ensure!(succeeded, "the pull of {model} ended before Ollama reported success");
        Ok(())
    }

    /// `DELETE /api/delete`.
    pub async fn delete(&self, model: &str) -> anyhow::Result<()> {
        let res = self
            .client
            .delete(format!("{}/api/delete", self.base))
            .json(&json!({ "model": model }))
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .with_context(|| format!("cannot reach Ollama at {} to delete {model}", self.base))?;
        let status = res.status();
        if !status.is_success() {
            let body = res.bytes().await.unwrap_or_default();
            bail!("Ollama did not delete {model} ({status}): {}", ollama_message(&body));
        }
        Ok(())
    }

    /// Deletes the models this node pulled; failures are logged, not fatal.
    pub async fn remove_pulled(&self) {
        for model in &self.pulled {
            match self.delete(model).await {
                Ok(()) => tracing::info!(model = %model, "removed the model this node pulled into Ollama"),
                Err(e) => tracing::warn!(model = %model, error = %format!("{e:#}"), "could not remove a pulled model"),
            }
        }
    }

    /// Sends `body` to `path`; on failure, the OpenAI error to answer with.
    async fn post(&self, path: &str, body: &Value) -> Result<reqwest::Response, Box<Response<Body>>> {
        let res = self
            .client
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "Ollama unreachable");
                Box::new(error_response(
                    StatusCode::BAD_GATEWAY,
                    "server_error",
                    "the node's Ollama could not be reached",
                ))
            })?;
        let status = res.status();
        if status.is_success() {
            return Ok(res);
        }
        let body = res.bytes().await.unwrap_or_default();
        let message = ollama_message(&body);
        Err(Box::new(match status.as_u16() {
            404 => error_with_param(
                StatusCode::NOT_FOUND,
                &format!("Ollama: {message}"),
                Some("model"),
                Some("model_not_found"),
            ),
            400..=499 => error_response(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                &format!("Ollama refused the request: {message}"),
            ),
            _ => {
                tracing::warn!(%status, error = %message, "Ollama failed");
                error_response(
                    StatusCode::BAD_GATEWAY,
                    "server_error",
                    &format!("Ollama failed: {message}"),
                )
            }
        }))
    }

    /// Answers an OpenAI chat completion request.
    pub async fn chat(&self, req: ChatRequest) -> Response<Body> {
        let body = match chat_body(&req) {
            Ok(b) => b,
            Err(e) => return error_with_param(StatusCode::BAD_REQUEST, &e.message, Some(e.param), None),
        };
        let res = match self.post("/api/chat", &body).await {
            Ok(r) => r,
            Err(answer) => return *answer,
        };
        if req.is_stream() {
            let include_usage = req.wants_usage_chunk();
            return stream_answer(req.model, include_usage, res);
        }
        let whole: Result<ChatLine, String> = match res.bytes().await {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match whole {
            Ok(line) if line.error.is_none() => {
                axum::response::IntoResponse::into_response(axum::Json(completion(&req.model, line)))
            }
            Ok(line) => error_response(
                StatusCode::BAD_GATEWAY,
                "server_error",
                &format!("Ollama failed: {}", line.error.unwrap_or_default()),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "Ollama's chat answer was not readable");
                error_response(
                    StatusCode::BAD_GATEWAY,
                    "server_error",
                    "Ollama's answer could not be read",
                )
            }
        }
    }

    /// Answers an OpenAI embeddings request.
    pub async fn embeddings(&self, req: EmbeddingsRequest) -> Response<Body> {
        let input = match &req.input {
            EmbeddingInput::One(s) => json!(s),
            EmbeddingInput::Many(v) if v.is_empty() => {
                return error_with_param(
                    StatusCode::BAD_REQUEST,
                    "input must not be an empty list",
                    Some("input"),
                    None,
                )
            }
            EmbeddingInput::Many(v) => json!(v),
            EmbeddingInput::Tokens(_) | EmbeddingInput::ManyTokens(_) => {
                return error_with_param(
                    StatusCode::BAD_REQUEST,
                    "this engine takes text input, not token ids",
                    Some("input"),
                    None,
                )
            }
        };
        let mut body = json!({ "model": req.model, "input": input });
        if let Some(d) = req.dimensions {
            body["dimensions"] = json!(d);
        }
        let res = match self.post("/api/embed", &body).await {
            Ok(r) => r,
            Err(answer) => return *answer,
        };
        #[derive(Deserialize)]
        struct Embedded {
            embeddings: Vec<Vec<f32>>,
            #[serde(default)]
            prompt_eval_count: u64,
        }
        let embedded: Embedded = match res.bytes().await.map(|b| serde_json::from_slice(&b)) {
            Ok(Ok(e)) => e,
            _ => {
                return error_response(
                    StatusCode::BAD_GATEWAY,
                    "server_error",
                    "Ollama's embeddings could not be read",
                )
            }
        };
        super::embeddings_response(
            &embedded.embeddings,
            req.encoding_format,
            &req.model,
            embedded.prompt_eval_count,
        )
    }
}

/// A request field this engine cannot translate.
#[derive(Debug, PartialEq)]
pub struct BadField {
    pub param: &'static str,
    pub message: String,
}

fn bad(param: &'static str, message: impl Into<String>) -> BadField {
    BadField {
        param,
        message: message.into(),
    }
}

fn number(extra: &Map<String, Value>, key: &'static str) -> Result<Option<Value>, BadField> {
    match extra.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v @ Value::Number(_)) => Ok(Some(v.clone())),
        Some(_) => Err(bad(key, format!("{key} must be a number"))),
    }
}

/// Ollama's `/api/chat` body for an OpenAI chat completion request.
pub fn chat_body(req: &ChatRequest) -> Result<Value, BadField> {
    if req.n.is_some_and(|n| n != 1) {
        return Err(bad("n", "this engine returns one choice: n must be 1"));
    }
    if req.messages.is_empty() {
        return Err(bad("messages", "messages must not be empty"));
    }
    let messages = req.messages.iter().map(message).collect::<Result<Vec<_>, _>>()?;
    let mut options = Map::new();
    for (from, to) in [
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("seed", "seed"),
        ("presence_penalty", "presence_penalty"),
        ("frequency_penalty", "frequency_penalty"),
    ] {
        if let Some(v) = number(&req.extra, from)? {
            options.insert(to.into(), v);
        }
    }
    if let Some(n) = req.max_output() {
        options.insert("num_predict".into(), json!(n));
    }
    match req.extra.get("stop") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => {
            options.insert("stop".into(), json!([s]));
        }
        Some(Value::Array(items)) if items.iter().all(Value::is_string) && items.len() <= 4 => {
            options.insert("stop".into(), json!(items));
        }
        Some(_) => return Err(bad("stop", "stop must be a string or a list of up to 4 strings")),
    }
    let mut body = json!({
        "model": req.model,
        "messages": messages,
        "stream": req.is_stream(),
    });
    if !options.is_empty() {
        body["options"] = Value::Object(options);
    }
    match req.extra.get("response_format") {
        None | Some(Value::Null) => {}
        Some(f) => match f.get("type").and_then(Value::as_str) {
            Some("text") => {}
            Some("json_object") => body["format"] = json!("json"),
            Some("json_schema") => match f.pointer("/json_schema/schema") {
                Some(schema @ Value::Object(_)) => body["format"] = schema.clone(),
                _ => return Err(bad("response_format", "json_schema needs a json_schema.schema object")),
            },
            _ => {
                return Err(bad(
                    "response_format",
                    "response_format.type must be text, json_object or json_schema",
                ))
            }
        },
    }
    match req.extra.get("tools") {
        None | Some(Value::Null) => {}
        Some(tools @ Value::Array(_)) => body["tools"] = tools.clone(),
        Some(_) => return Err(bad("tools", "tools must be a list")),
    }
    Ok(body)
}

fn message(m: &ChatMessage) -> Result<Value, BadField> {
    let role = match m.role {
        Role::System | Role::Developer => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool | Role::Function => "tool",
    };
    let mut images = Vec::new();
    let content =
        match &m.content {
            None => String::new(),
            Some(MessageContent::Text(t)) => t.clone(),
            Some(MessageContent::Parts(parts)) => {
                let mut texts = Vec::new();
                for part in parts {
                    match part.get("type").and_then(Value::as_str) {
                        Some("text") => texts.push(part.get("text").and_then(Value::as_str).unwrap_or_default()),
                        Some("image_url") => {
                            let url = part
                                .pointer("/image_url/url")
                                .and_then(Value::as_str)
                                .unwrap_or_default();
                            // Ollama takes base64 images; fetching URLs for strangers is not this node's job.
                            let data = url
                                .strip_prefix("data:")
                                .and_then(|rest| rest.split_once(";base64,"))
                                .map(|(_, data)| data);
                            match data {
                                Some(d) => images.push(d.to_owned()),
                                None => return Err(bad(
                                    "messages",
                                    "images must be sent as data: URLs (base64); this node does not fetch image URLs",
                                )),
                            }
                        }
                        _ => return Err(bad("messages", "content parts must be text or image_url")),
                    }
                }
                texts.join("\n")
            }
        };
    let mut out = json!({ "role": role, "content": content });
    if !images.is_empty() {
        out["images"] = json!(images);
    }
    if let Some(calls) = m.extra.get("tool_calls").and_then(Value::as_array) {
        let mut translated = Vec::new();
        for call in calls {
            let name = call
                .pointer("/function/name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let arguments = match call.pointer("/function/arguments") {
                Some(Value::String(s)) => serde_json::from_str::<Value>(s)
                    .map_err(|_| bad("messages", "tool call arguments must be a JSON object"))?,
                Some(v @ Value::Object(_)) => v.clone(),
                _ => json!({}),
            };
            translated.push(json!({ "function": { "name": name, "arguments": arguments } }));
        }
        out["tool_calls"] = json!(translated);
    }
    if let Some(name) = m.extra.get("name").and_then(Value::as_str) {
        if role == "tool" {
            out["tool_name"] = json!(name);
        }
    }
    Ok(out)
}

/// One object of Ollama's chat answer (a streamed line, or the whole answer).
#[derive(Debug, Default, Deserialize)]
struct ChatLine {
    #[serde(default)]
    message: Option<ChatLineMessage>,
    #[serde(default)]
    done: bool,
    #[serde(default)]
    done_reason: Option<String>,
    #[serde(default)]
    prompt_eval_count: Option<u32>,
    #[serde(default)]
    eval_count: Option<u32>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct ChatLineMessage {
    #[serde(default)]
    content: String,
    #[serde(default)]
    tool_calls: Vec<Value>,
}

fn openai_tool_calls(calls: &[Value], streamed: bool) -> Vec<Value> {
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let name = c.pointer("/function/name").cloned().unwrap_or(json!(""));
            let args = c.pointer("/function/arguments").cloned().unwrap_or(json!({}));
            let id = format!("call_{}", completion_id().trim_start_matches("chatcmpl-"));
            let mut call = json!({
                "id": id,
                "type": "function",
                "function": { "name": name, "arguments": args.to_string() },
            });
            if streamed {
                call["index"] = json!(i);
            }
            call
        })
        .collect()
}

fn finish_reason(line: &ChatLine, saw_tool_calls: bool) -> &'static str {
    if saw_tool_calls {
        "tool_calls"
    } else if line.done_reason.as_deref() == Some("length") {
        "length"
    } else {
        "stop"
    }
}

fn completion(model: &str, line: ChatLine) -> Value {
    let msg = line.message.as_ref();
    let calls = msg.map(|m| openai_tool_calls(&m.tool_calls, false)).unwrap_or_default();
    let mut message = json!({
        "role": "assistant",
        "content": msg.map(|m| m.content.as_str()).unwrap_or_default(),
    });
    if !calls.is_empty() {
        message["tool_calls"] = json!(calls);
    }
    json!({
        "id": completion_id(),
        "object": "chat.completion",
        "created": unix_now(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": message,
            "finish_reason": finish_reason(&line, !calls.is_empty()),
        }],
        "usage": usage(line.prompt_eval_count.unwrap_or(0), line.eval_count.unwrap_or(0)),
    })
}

/// Splits a byte stream into lines (without the newline).
struct NdJson<S> {
    inner: S,
    buf: BytesMut,
    ended: bool,
}

impl<S, E> NdJson<S>
where
    S: futures_util::Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    fn new(inner: S) -> Self {
        Self {
            inner,
            buf: BytesMut::new(),
            ended: false,
        }
    }

    /// The next non-empty line; `None` at the end of the stream.
    async fn next_line(&mut self) -> Option<anyhow::Result<Bytes>> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line = self.buf.split_to(pos + 1).freeze();
                let line = line.slice(..pos);
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Some(Ok(line));
            }
            if self.ended {
                if self.buf.iter().all(u8::is_ascii_whitespace) {
                    return None;
                }
                return Some(Ok(self.buf.split().freeze()));
            }
            if self.buf.len() > MAX_LINE_BYTES {
                self.ended = true;
                self.buf.clear();
                return Some(Err(anyhow::anyhow!("Ollama sent a line over {MAX_LINE_BYTES} bytes")));
            }
            match self.inner.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                Some(Err(e)) => {
                    self.ended = true;
                    self.buf.clear();
                    return Some(Err(anyhow::anyhow!("the connection to Ollama failed: {e}")));
                }
                None => self.ended = true,
            }
        }
    }
}

struct StreamState<S> {
    lines: NdJson<S>,
    frames: Frames,
    include_usage: bool,
    saw_tool_calls: bool,
    queued: std::collections::VecDeque<Bytes>,
    ended: bool,
}

/// Ollama's NDJSON lines → OpenAI `chat.completion.chunk` events. A broken
/// answer ends with an error event and no `[DONE]`.
fn stream_answer(model: String, include_usage: bool, res: reqwest::Response) -> Response<Body> {
    let frames = Frames::new(model);
    let mut queued = std::collections::VecDeque::new();
    queued.push_back(frames.delta_str(json!({"role": "assistant", "content": ""}), None));
    let state = StreamState {
        lines: NdJson::new(Box::pin(res.bytes_stream())),
        frames,
        include_usage,
        saw_tool_calls: false,
        queued,
        ended: false,
    };
    let body = futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(frame) = st.queued.pop_front() {
                return Some((Ok::<Bytes, Infallible>(frame), st));
            }
            if st.ended {
                return None;
            }
            let line = match st.lines.next_line().await {
                Some(Ok(line)) => serde_json::from_slice::<ChatLine>(&line)
                    .map_err(|e| format!("Ollama sent a line that is not a chat answer: {e}")),
                Some(Err(e)) => Err(e.to_string()),
                None => Err("Ollama ended the answer early".to_owned()),
            };
            let line = match line {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "Ollama stream broke");
                    st.queued.push_back(error_frame(&e));
                    st.ended = true;
                    continue;
                }
            };
            if let Some(e) = &line.error {
                tracing::warn!(error = %e, "Ollama failed mid-answer");
                st.queued.push_back(error_frame(&format!("Ollama failed: {e}")));
                st.ended = true;
                continue;
            }
            if let Some(msg) = &line.message {
                if !msg.content.is_empty() {
                    let frame = st.frames.delta_str(json!({ "content": msg.content }), None);
                    st.queued.push_back(frame);
                }
                if !msg.tool_calls.is_empty() {
                    st.saw_tool_calls = true;
                    let calls = openai_tool_calls(&msg.tool_calls, true);
                    st.queued
                        .push_back(st.frames.delta_str(json!({ "tool_calls": calls }), None));
                }
            }
            if line.done {
                let reason = finish_reason(&line, st.saw_tool_calls);
                st.queued.push_back(st.frames.delta_str(json!({}), Some(reason)));
                if st.include_usage {
                    let u = usage(line.prompt_eval_count.unwrap_or(0), line.eval_count.unwrap_or(0));
                    st.queued.push_back(st.frames.chunk(json!([]), Some(u)));
                }
                st.queued.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                st.ended = true;
            }
        }
    });
    let mut res = Response::new(Body::from_stream(body));
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use cxmpute_protocol::parse::parse_json;

    fn req(json: &str) -> ChatRequest {
        parse_json(json.as_bytes()).unwrap()
    }

    #[test]
    fn names_get_the_default_tag() {
        assert_eq!(full_name("llama3.2"), "llama3.2:latest");
        assert_eq!(full_name("llama3.2:1b"), "llama3.2:1b");
        assert_eq!(full_name("hf.co/org/model"), "hf.co/org/model:latest");
        assert_eq!(full_name("localhost:5000/m"), "localhost:5000/m:latest");
    }

    #[test]
    fn chat_requests_are_translated() {
        let body = chat_body(&req(
            r#"{"model":"llama3.2","stream":true,"max_tokens":7,"temperature":0.5,"seed":3,"stop":"END",
                "response_format":{"type":"json_object"},
                "messages":[{"role":"developer","content":"be brief"},
                  {"role":"user","content":[{"type":"text","text":"look"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]},
                  {"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{\"x\":1}"}}]},
                  {"role":"tool","name":"f","content":"42"}]}"#,
        ))
        .unwrap();
        assert_eq!(
            body,
            json!({
                "model": "llama3.2",
                "stream": true,
                "format": "json",
                "options": {"temperature": 0.5, "seed": 3, "num_predict": 7, "stop": ["END"]},
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "look", "images": ["AAAA"]},
                    {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}]},
                    {"role": "tool", "content": "42", "tool_name": "f"},
                ],
            })
        );
    }

    #[test]
    fn untranslatable_requests_name_the_field() {
        let cases = [
            (r#"{"model":"m","n":2,"messages":[{"role":"user","content":"x"}]}"#, "n"),
            (
                r#"{"model":"m","temperature":"hot","messages":[{"role":"user","content":"x"}]}"#,
                "temperature",
            ),
            (
                r#"{"model":"m","stop":[1],"messages":[{"role":"user","content":"x"}]}"#,
                "stop",
            ),
            (
                r#"{"model":"m","response_format":{"type":"yaml"},"messages":[{"role":"user","content":"x"}]}"#,
                "response_format",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"http://169.254.169.254/x.png"}}]}]}"#,
                "messages",
            ),
            (r#"{"model":"m","messages":[]}"#, "messages"),
        ];
        for (json, param) in cases {
            assert_eq!(chat_body(&req(json)).unwrap_err().param, param, "{json}");
        }
    }

    #[test]
    fn embedding_models_are_told_apart() {
        let tag = |name: &str, family: &str| TagModel {
            name: name.into(),
            size: 1,
            details: TagDetails {
                family: Some(family.into()),
                families: None,
            },
        };
        let offers = offers_for(&[
            tag("llama3.2:latest", "llama"),
            tag("nomic-embed-text:v1.5", "nomic-bert"),
        ]);
        let pairs: Vec<(&str, &str)> = offers.iter().map(|o| (o.service.as_str(), o.model.as_str())).collect();
        assert_eq!(
            pairs,
            [
                ("chat", "llama3.2:latest"),
                ("chat", "llama3.2"),
                ("embeddings", "nomic-embed-text:v1.5")
            ]
        );
    }

    #[test]
    fn progress_lines_read_well() {
        let p = PullProgress {
            status: "pulling 8934d96d3f08".into(),
            total: Some(3_800_000_000),
            completed: Some(1_710_000_000),
            ..PullProgress::default()
        };
        assert_eq!(
            progress_line("llama3.2", &p),
            "llama3.2: pulling 8934d96d3f08 45% (1.7 GB of 3.8 GB)"
        );
        let done = PullProgress {
            status: "success".into(),
            ..PullProgress::default()
        };
        assert_eq!(progress_line("m", &done), "m: success");
    }
}
