//! `POST /v1/chat/completions`: echoes the words of the last user message.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    bad_request, json_response, model_not_found, openai_error, parse_body, AppState, InFlight, FAIL_TRIGGER,
    SLOW_PREFIX, SLOW_TOKEN_DELAY,
};

/// Word generated when the last user message has no words (or there is no
/// user message), so that `max_tokens` tokens can always be produced.
pub const FALLBACK_WORD: &str = "fake";

const DEFAULT_MAX_TOKENS: u64 = 16;

#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<Message>,
    max_tokens: Option<u64>,
    /// Newer OpenAI name for `max_tokens`; accepted so either client style works.
    max_completion_tokens: Option<u64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    /// A string, an array of `{type:"text", text}` parts, or null.
    content: Option<Value>,
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
}

/// The words the answer cycles through.
fn answer_words(last_user_message: &str) -> Vec<&str> {
    let words: Vec<&str> = last_user_message.split_whitespace().collect();
    if words.is_empty() {
        vec![FALLBACK_WORD]
    } else {
        words
    }
}

/// The exact assistant text for a conversation whose last user message is
/// `last_user_message`: its words repeated cyclically, `max_tokens` of them,
/// each followed by one space.
pub fn expected_completion(last_user_message: &str, max_tokens: usize) -> String {
    let words = answer_words(last_user_message);
    let mut out = String::new();
    for word in words.iter().cycle().take(max_tokens) {
        out.push_str(word);
        out.push(' ');
    }
    out
}

/// `prompt_tokens` for a request: whitespace-separated words across all
/// message contents.
pub fn count_prompt_tokens<'a>(contents: impl IntoIterator<Item = &'a str>) -> usize {
    contents.into_iter().map(|c| c.split_whitespace().count()).sum()
}

/// Flattens a message's content to text; text parts are joined by spaces.
fn content_text(content: Option<&Value>) -> Result<String, &'static str> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(text)) => Ok(text.clone()),
        Some(Value::Array(parts)) => {
            let texts: Vec<&str> = parts
                .iter()
                .filter_map(|part| part.get("text").and_then(Value::as_str))
                .collect();
            Ok(texts.join(" "))
        }
        Some(_) => Err("message content must be a string or an array of parts"),
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub(super) async fn completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let guard = InFlight::new(&state.stats);
    let req: ChatRequest = match parse_body(&body) {
        Ok(req) => req,
        Err(msg) => return bad_request(&msg),
    };
    if !state.models.contains(&req.model) {
        return model_not_found(&req.model);
    }
    let mut texts = Vec::with_capacity(req.messages.len());
    for message in &req.messages {
        match content_text(message.content.as_ref()) {
            Ok(text) => texts.push(text),
            Err(msg) => return bad_request(msg),
        }
    }
    let last_user = req
        .messages
        .iter()
        .zip(&texts)
        .rev()
        .find(|(m, _)| m.role == "user")
        .map_or("", |(_, text)| text.as_str());
    if last_user == FAIL_TRIGGER {
        let msg = "fake upstream failure (requested by __fail__)";
        return openai_error(StatusCode::INTERNAL_SERVER_ERROR, msg, "server_error", None, None);
    }
    let delay = if last_user.starts_with(SLOW_PREFIX) {
        SLOW_TOKEN_DELAY
    } else {
        state.token_delay
    };
    let max_tokens = req
        .max_completion_tokens
        .or(req.max_tokens)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    let prompt_tokens = count_prompt_tokens(texts.iter().map(String::as_str)) as u64;
    let usage = Usage {
        prompt_tokens,
        completion_tokens: max_tokens,
        total_tokens: prompt_tokens + max_tokens,
    };
    let id = format!("chatcmpl-fake-{}", guard.number());
    let words = answer_words(last_user);
    if req.stream.unwrap_or(false) {
        let include_usage = req.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
        let frames = StreamFrames::new(&id, &req.model, &words, max_tokens, include_usage.then_some(&usage));
        return stream_response(frames, delay, guard);
    }
    if !delay.is_zero() {
        // Imitate generation time; a client that gives up drops this future.
        let tokens = u32::try_from(max_tokens).unwrap_or(u32::MAX);
        tokio::time::sleep(delay.saturating_mul(tokens)).await;
    }
    let content = expected_completion(last_user, usize::try_from(max_tokens).unwrap_or(usize::MAX));
    let body = serde_json::json!({
        "id": id,
        "object": "chat.completion",
        "created": unix_now(),
        "model": req.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "length",
        }],
        "usage": usage,
    });
    json_response(StatusCode::OK, body.to_string())
}

/// Every SSE frame of one streamed answer, pre-serialised so that producing a
/// token is a refcount bump rather than a JSON serialisation.
struct StreamFrames {
    role: Bytes,
    /// One frame per distinct answer word; token `i` is `tokens[i % len]`.
    tokens: Vec<Bytes>,
    token_count: u64,
    /// Finish chunk, optional usage chunk, `[DONE]`.
    tail: Vec<Bytes>,
}

impl StreamFrames {
    fn new(id: &str, model: &str, words: &[&str], max_tokens: u64, usage: Option<&Usage>) -> Self {
        let header = serde_json::json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": unix_now(),
            "model": model,
        })
        .to_string();
        // `header` is `{...}`; drop the closing brace so fields can follow.
        let head = &header[..header.len() - 1];
        let choice = |delta: &str, finish: &str| {
            sse(&format!(
                r#"{head},"choices":[{{"index":0,"delta":{delta},"finish_reason":{finish}}}]}}"#
            ))
        };
        let distinct = words.len().min(usize::try_from(max_tokens).unwrap_or(usize::MAX));
        let tokens = words[..distinct]
            .iter()
            .map(|w| {
                let delta = serde_json::json!({"content": format!("{w} ")});
                choice(&delta.to_string(), "null")
            })
            .collect();
        let mut tail = vec![choice("{}", r#""length""#)];
        if let Some(usage) = usage {
            let usage = serde_json::to_string(usage).unwrap_or_default();
            tail.push(sse(&format!(r#"{head},"choices":[],"usage":{usage}}}"#)));
        }
        tail.push(Bytes::from_static(b"data: [DONE]\n\n"));
        Self {
            role: choice(r#"{"role":"assistant","content":""}"#, "null"),
            tokens,
            token_count: max_tokens,
            tail,
        }
    }
}

fn sse(json: &str) -> Bytes {
    Bytes::from(format!("data: {json}\n\n"))
}

/// Where a stream is; owns the in-flight guard so that dropping the body
/// (client gone) is what ends the request's accounting.
struct StreamState {
    frames: StreamFrames,
    /// 0 = role frame, 1..=token_count = tokens, then the tail frames.
    pos: u64,
    delay: Duration,
    finished: bool,
    guard: InFlight,
}

impl Drop for StreamState {
    fn drop(&mut self) {
        if !self.finished {
            self.guard.note_cancelled_stream();
        }
    }
}

impl StreamState {
    fn next_frame(&mut self) -> Option<(Bytes, bool)> {
        let pos = self.pos;
        self.pos += 1;
        let f = &self.frames;
        if pos == 0 {
            return Some((f.role.clone(), false));
        }
        if pos <= f.token_count {
            // `tokens` is non-empty whenever `token_count > 0`.
            let i = usize::try_from((pos - 1) % f.tokens.len() as u64).unwrap_or(0);
            return Some((f.tokens[i].clone(), true));
        }
        let tail_index = usize::try_from(pos - f.token_count - 1).ok()?;
        let frame = f.tail.get(tail_index)?.clone();
        if tail_index + 1 == f.tail.len() {
            // `[DONE]` is being handed to hyper: the answer is complete.
            self.finished = true;
        }
        Some((frame, false))
    }
}

fn stream_response(frames: StreamFrames, delay: Duration, guard: InFlight) -> Response {
    let state = StreamState {
        frames,
        pos: 0,
        delay,
        finished: false,
        guard,
    };
    let body = stream::unfold(state, |mut state| async move {
        let (frame, is_token) = state.next_frame()?;
        if is_token && !state.delay.is_zero() {
            tokio::time::sleep(state.delay).await;
        }
        Some((Ok::<_, Infallible>(frame), state))
    });
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}
