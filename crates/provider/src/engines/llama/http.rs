//! The OpenAI chat-completions answer for the built-in engine: one JSON object,
//! or server-sent events shaped like OpenAI's (and so like any upstream's), which
//! is what the gateway meters (crates/gateway/src/meter.rs):
//!
//! ```text
//! data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}],...}
//! data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Paris"},"finish_reason":null}],...}
//! data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],...}
//! data: {"object":"chat.completion.chunk","choices":[],"usage":{...}}      (only with stream_options.include_usage)
//! data: [DONE]
//! ```

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::{header, HeaderValue, Response, StatusCode};
use bytes::Bytes;
use cxmpute_protocol::openai::ChatRequest;
use cxmpute_protocol::ErrorBody;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use super::engine::{Event, FinishReason};
use super::params::ChatParams;
use super::{ChatError, LlamaChat};
use crate::engines::error_response;

pub(crate) fn error_with_param(
    status: StatusCode,
    message: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Response<Body> {
    let kind = if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    let mut res = Response::new(Body::from(ErrorBody::new(message, kind, param, code).to_json()));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub(crate) fn completion_id() -> String {
    let bytes: [u8; 12] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("chatcmpl-{hex}")
}

pub(crate) fn usage(prompt: u32, completion: u32) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": u64::from(prompt) + u64::from(completion),
    })
}

/// Answers one chat request with `engine`, which serves the model `model`.
pub async fn chat_completions(engine: Arc<LlamaChat>, req: ChatRequest) -> Response<Body> {
    let params = match ChatParams::from_request(&req) {
        Ok(p) => p,
        Err(e) => return error_with_param(StatusCode::BAD_REQUEST, &e.message, Some(e.param), None),
    };
    let model = req.model.clone();
    let messages = req.messages;
    let start_params = params.clone();
    // Templating and tokenizing a long prompt is CPU work: keep it off the runtime.
    let started = tokio::task::spawn_blocking(move || engine.start(&messages, &start_params)).await;
    let generation = match started {
        Ok(Ok(g)) => g,
        Ok(Err(ChatError::Prompt(e))) => {
            return error_with_param(StatusCode::BAD_REQUEST, &e.to_string(), Some("messages"), None)
        }
        Ok(Err(e @ ChatError::TooLong { .. })) => {
            return error_with_param(
                StatusCode::BAD_REQUEST,
                &e.to_string(),
                Some("messages"),
                Some("context_length_exceeded"),
            )
        }
        Ok(Err(ChatError::Stopped)) | Err(_) => {
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the chat engine is not running",
            )
        }
    };
    if params.stream {
        stream(model, params.include_usage, generation.prompt_tokens, generation.events)
    } else {
        whole(model, generation.prompt_tokens, generation.events).await
    }
}

/// Collects the answer, then sends it as one JSON object.
async fn whole(model: String, prompt_tokens: u32, mut events: UnboundedReceiver<Event>) -> Response<Body> {
    let mut text = String::new();
    while let Some(event) = events.recv().await {
        match event {
            Event::Text(t) => text.push_str(&t),
            Event::Done {
                reason,
                completion_tokens,
            } => {
                crate::status::global().add_tokens(u64::from(completion_tokens));
                let body = json!({
                    "id": completion_id(),
                    "object": "chat.completion",
                    "created": unix_now(),
                    "model": model,
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": reason.as_str(),
                    }],
                    "usage": usage(prompt_tokens, completion_tokens),
                });
                return axum::response::IntoResponse::into_response(axum::Json(body));
            }
            Event::Failed(e) => {
                tracing::warn!(error = %e, "chat generation failed");
                break;
            }
        }
    }
    error_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "the chat engine failed",
    )
}

/// Builds SSE frames for one streamed answer (shared with the Ollama engine).
pub(crate) struct Frames {
    id: String,
    created: u64,
    model: String,
}

impl Frames {
    pub(crate) fn new(model: String) -> Self {
        Self {
            id: completion_id(),
            created: unix_now(),
            model,
        }
    }

    pub(crate) fn chunk(&self, choices: Value, usage: Option<Value>) -> Bytes {
        let mut v = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let Some(u) = usage {
            v["usage"] = u;
        }
        Bytes::from(format!("data: {v}\n\n"))
    }

    fn delta(&self, delta: Value, finish: Option<FinishReason>) -> Bytes {
        self.delta_str(delta, finish.map(FinishReason::as_str))
    }

    pub(crate) fn delta_str(&self, delta: Value, finish: Option<&str>) -> Bytes {
        self.chunk(json!([{ "index": 0, "delta": delta, "finish_reason": finish }]), None)
    }
}

struct StreamState {
    frames: Frames,
    events: UnboundedReceiver<Event>,
    include_usage: bool,
    prompt_tokens: u32,
    /// Frames decided but not yet yielded (the end of the answer is several).
    queued: std::collections::VecDeque<Bytes>,
    ended: bool,
}

/// An error event ends a broken stream. There is no `[DONE]` after it, so the
/// reader can tell the answer was cut short.
pub(crate) fn error_frame(message: &str) -> Bytes {
    let json = ErrorBody::new(message, "server_error", None, None).to_json();
    let mut frame = Vec::with_capacity(json.len() + 8);
    frame.extend_from_slice(b"data: ");
    frame.extend_from_slice(&json);
    frame.extend_from_slice(b"\n\n");
    Bytes::from(frame)
}

/// Streams the answer as it is generated. Dropping the body (the client or the
/// gateway went away) drops `events`, which frees the engine's sequence.
fn stream(model: String, include_usage: bool, prompt_tokens: u32, events: UnboundedReceiver<Event>) -> Response<Body> {
    let frames = Frames::new(model);
    let mut queued = std::collections::VecDeque::new();
    queued.push_back(frames.delta(json!({"role": "assistant", "content": ""}), None));
    let state = StreamState {
        frames,
        events,
        include_usage,
        prompt_tokens,
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
            match st.events.recv().await {
                Some(Event::Text(t)) => st.queued.push_back(st.frames.delta(json!({ "content": t }), None)),
                Some(Event::Done {
                    reason,
                    completion_tokens,
                }) => {
                    crate::status::global().add_tokens(u64::from(completion_tokens));
                    st.queued.push_back(st.frames.delta(json!({}), Some(reason)));
                    if st.include_usage {
                        let u = usage(st.prompt_tokens, completion_tokens);
                        st.queued.push_back(st.frames.chunk(json!([]), Some(u)));
                    }
                    st.queued.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                    st.ended = true;
                }
                Some(Event::Failed(e)) => {
                    tracing::warn!(error = %e, "chat generation failed mid-stream");
                    st.queued.push_back(error_frame("the chat engine failed"));
                    st.ended = true;
                }
                None => {
                    st.queued.push_back(error_frame("the chat engine stopped mid-answer"));
                    st.ended = true;
                }
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
    use tokio::sync::mpsc::unbounded_channel;

    fn events(list: Vec<Event>) -> UnboundedReceiver<Event> {
        let (tx, rx) = unbounded_channel();
        for e in list {
            tx.send(e).unwrap();
        }
        rx
    }

    async fn text(res: Response<Body>) -> String {
        let bytes = axum::body::to_bytes(res.into_body(), usize::MAX).await.unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    fn data(sse: &str) -> Vec<String> {
        sse.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| e.strip_prefix("data: ").unwrap().to_string())
            .collect()
    }

    #[tokio::test]
    async fn a_stream_has_role_content_finish_usage_and_done() {
        let rx = events(vec![
            Event::Text("Hel".into()),
            Event::Text("lo".into()),
            Event::Done {
                reason: FinishReason::Stop,
                completion_tokens: 2,
            },
        ]);
        let sse = text(stream("m".into(), true, 3, rx)).await;
        let d = data(&sse);
        assert_eq!(d.len(), 6, "{sse}");
        let chunks: Vec<Value> = d[..5].iter().map(|c| serde_json::from_str(c).unwrap()).collect();
        assert_eq!(
            chunks[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        assert_eq!(chunks[1]["choices"][0]["delta"]["content"], "Hel");
        assert_eq!(chunks[2]["choices"][0]["delta"]["content"], "lo");
        assert_eq!(chunks[3]["choices"][0]["finish_reason"], "stop");
        assert_eq!(chunks[4]["choices"], json!([]));
        assert_eq!(
            chunks[4]["usage"],
            json!({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
        );
        assert!(chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
        assert_eq!(d[5], "[DONE]");

        let rx = events(vec![Event::Done {
            reason: FinishReason::Length,
            completion_tokens: 0,
        }]);
        let sse = text(stream("m".into(), false, 3, rx)).await;
        assert!(!sse.contains("usage"), "{sse}");
        assert!(sse.ends_with("data: [DONE]\n\n"));
    }

    #[tokio::test]
    async fn a_failed_stream_ends_with_an_error_and_no_done() {
        let rx = events(vec![Event::Text("a".into()), Event::Failed("boom".into())]);
        let sse = text(stream("m".into(), true, 1, rx)).await;
        let d = data(&sse);
        let last: Value = serde_json::from_str(d.last().unwrap()).unwrap();
        assert_eq!(last["error"]["type"], "server_error");
        assert!(!sse.contains("[DONE]") && !sse.contains("boom"), "{sse}");
    }

    #[tokio::test]
    async fn a_whole_answer_is_one_completion_object() {
        let rx = events(vec![
            Event::Text("Par".into()),
            Event::Text("is".into()),
            Event::Done {
                reason: FinishReason::Length,
                completion_tokens: 2,
            },
        ]);
        let res = whole("m".into(), 4, rx).await;
        assert_eq!(res.status(), StatusCode::OK);
        let v: Value = serde_json::from_str(&text(res).await).unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["content"], "Paris");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["usage"]["total_tokens"], 6);

        let res = whole("m".into(), 4, events(vec![Event::Failed("x".into())])).await;
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
