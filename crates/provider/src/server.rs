//! The node's local router: what the gateway calls over the link (or over
//! HTTP in direct mode). The routes mirror the OpenAI API so an upstream's
//! answers pass through unchanged.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, Response, StatusCode};
use axum::middleware::{self, Next};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use cxmpute_protocol::link::{Hello, HELLO_PATH};
use cxmpute_protocol::openai::{ChatRequest, EmbeddingInput, EmbeddingsRequest, SpeechRequest};
use cxmpute_protocol::parse::parse_json;
use serde::Deserialize;
use serde_json::json;

use crate::engines::scrape::ScrapeRequest;
use crate::engines::{error_response, Engines};
use crate::models::canonical_speech_model;

/// What the node serves at the moment: its engines and the hello that
/// announces them. Replaced whole when a model fetched in the background is
/// ready; a request keeps the offering it started with.
pub struct Offering {
    pub engines: Engines,
    pub hello: Hello,
}

#[derive(Clone)]
pub struct NodeState {
    offering: Arc<RwLock<Arc<Offering>>>,
    /// Direct mode: the bearer token the gateway must send.
    pub direct_token: Option<Arc<str>>,
    pub in_flight: Arc<AtomicUsize>,
    /// Counts replacements of the offering, so links announce it again.
    replaced: Arc<tokio::sync::watch::Sender<u64>>,
    /// Counts hellos answered, so a link being replaced knows when its
    /// successor has introduced itself.
    hellos: Arc<tokio::sync::watch::Sender<u64>>,
}

impl NodeState {
    pub fn new(engines: Engines, hello: Hello, direct_token: Option<Arc<str>>) -> NodeState {
        NodeState {
            offering: Arc::new(RwLock::new(Arc::new(Offering { engines, hello }))),
            direct_token,
            in_flight: Arc::new(AtomicUsize::new(0)),
            replaced: Arc::new(tokio::sync::watch::Sender::new(0)),
            hellos: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }

    /// The engines and hello of this moment.
    pub fn offering(&self) -> Arc<Offering> {
        self.offering.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Serves `engines` from now on (requests already running finish on the
    /// old ones) and tells the links to announce `hello`.
    pub fn replace(&self, engines: Engines, hello: Hello) {
        *self.offering.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(Offering { engines, hello });
        self.replaced.send_modify(|n| *n += 1);
    }

    /// Changes when the offering is replaced.
    pub fn replacements(&self) -> tokio::sync::watch::Receiver<u64> {
        self.replaced.subscribe()
    }

    /// Changes when a hello is answered.
    pub fn hellos(&self) -> tokio::sync::watch::Receiver<u64> {
        self.hellos.subscribe()
    }
}

pub fn router(state: NodeState) -> Router {
    Router::new()
        .route(HELLO_PATH, get(hello))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/audio/speech", post(speech))
        .route("/v1/scrape", post(scrape))
        .fallback(|| async {
            error_response(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "no such route on this node",
            )
        })
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Checks the direct-mode token and counts requests until their answer ends.
async fn guard(State(state): State<NodeState>, req: Request, next: Next) -> Response<Body> {
    if let Some(token) = &state.direct_token {
        let ok = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| t.as_bytes() == token.as_bytes());
        if !ok {
            return error_response(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "this node answers only its gateway",
            );
        }
    }
    state.in_flight.fetch_add(1, Ordering::SeqCst);
    // The gateway's hello is bookkeeping, not a request served.
    let path = req.uri().path().to_string();
    let counted = path != HELLO_PATH;
    if counted {
        crate::status::global().request_started();
    }
    let mut counter = InFlight {
        count: state.in_flight.clone(),
        counted,
        ok: false,
    };
    let res = next.run(req).await;
    counter.ok = !res.status().is_server_error();
    if counted && !counter.ok {
        crate::status::global().error(format!("{path} answered {}", res.status()));
    }
    res.map(|body| {
        Body::new(Counted {
            inner: body,
            _counter: counter,
        })
    })
}

/// Counts a request as in flight until its answer is dropped; then as served
/// (or failed, for 5xx answers and requests dropped before answering).
struct InFlight {
    count: Arc<AtomicUsize>,
    /// Counted on the dashboard (everything but the gateway's hello).
    counted: bool,
    ok: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::SeqCst);
        if self.counted {
            crate::status::global().request_finished(self.ok);
        }
    }
}

/// A body that keeps its request counted as in flight until it is dropped.
struct Counted {
    inner: Body,
    _counter: InFlight,
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        http_body::Body::is_end_stream(&self.inner)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::Body::size_hint(&self.inner)
    }
}

async fn hello(State(state): State<NodeState>) -> Json<Hello> {
    let hello = state.offering().hello.clone();
    state.hellos.send_modify(|n| *n += 1);
    Json(hello)
}

async fn models(State(state): State<NodeState>) -> Json<serde_json::Value> {
    let data: Vec<_> = state
        .offering()
        .hello
        .offers
        .iter()
        .map(|o| json!({ "id": o.model, "object": "model", "created": 0, "owned_by": "cxmpute-node", "service": o.service }))
        .collect();
    Json(json!({ "object": "list", "data": data }))
}

#[derive(Deserialize)]
struct ModelOnly {
    model: String,
}

fn bad_request(message: &str) -> Response<Body> {
    error_response(StatusCode::BAD_REQUEST, "invalid_request_error", message)
}

fn unknown_model(model: &str) -> Response<Body> {
    error_response(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        &format!("this node does not serve '{model}'"),
    )
}

async fn via_upstream(engines: &Engines, service: &str, path: &str, body: Bytes) -> Response<Body> {
    let model = match parse_json::<ModelOnly>(&body) {
        Ok(m) => m.model,
        Err(e) => return bad_request(&e.message),
    };
    match &engines.upstream {
        Some(up) if up.serves(service, &model) => up.forward(path, body).await,
        _ => unknown_model(&model),
    }
}

async fn chat(State(state): State<NodeState>, body: Bytes) -> Response<Body> {
    let offering = state.offering();
    let engines = &offering.engines;
    if let Some(chat) = &engines.chat {
        let ours = parse_json::<ModelOnly>(&body).is_ok_and(|m| chat.serves(&m.model));
        if ours {
            return match parse_json::<ChatRequest>(&body) {
                Ok(req) => crate::engines::llama::http::chat_completions(chat.engine.clone(), req).await,
                Err(e) => bad_request(&e.message),
            };
        }
    }
    if let Some(ollama) = &engines.ollama {
        // The upstream wins a model both offer, as it did before Ollama existed.
        let model = parse_json::<ModelOnly>(&body).map(|m| m.model).unwrap_or_default();
        let upstream_has = engines.upstream.as_ref().is_some_and(|u| u.serves("chat", &model));
        if ollama.serves("chat", &model) && !upstream_has {
            return match parse_json::<ChatRequest>(&body) {
                Ok(req) => ollama.chat(req).await,
                Err(e) => bad_request(&e.message),
            };
        }
    }
    via_upstream(engines, "chat", "/chat/completions", body).await
}

async fn speech(State(state): State<NodeState>, body: Bytes) -> Response<Body> {
    let offering = state.offering();
    let engines = &offering.engines;
    if let Some(voice) = &engines.speech {
        let ours = parse_json::<ModelOnly>(&body).is_ok_and(|m| {
            m.model.trim() == voice.model || canonical_speech_model(&m.model).is_some_and(|id| id == voice.model)
        });
        if ours {
            return match parse_json::<SpeechRequest>(&body) {
                Ok(req) => crate::engines::piper::http::speech(voice.clone(), engines.cpu_slots.clone(), req).await,
                Err(e) => bad_request(&e.message),
            };
        }
    }
    via_upstream(engines, "speech", "/audio/speech", body).await
}

async fn embeddings(State(state): State<NodeState>, body: Bytes) -> Response<Body> {
    let offering = state.offering();
    let engines = &offering.engines;
    let req: EmbeddingsRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(e) => return bad_request(&e.message),
    };
    let builtin = engines
        .minilm
        .as_ref()
        .filter(|e| e.serves(&req.model))
        .map(|e| e.engine.clone());
    let Some(engine) = builtin else {
        return match (&engines.upstream, &engines.ollama) {
            (Some(up), _) if up.serves("embeddings", &req.model) => up.forward("/embeddings", body).await,
            (_, Some(ollama)) if ollama.serves("embeddings", &req.model) => ollama.embeddings(req).await,
            _ => unknown_model(&req.model),
        };
    };
    let texts = match req.input {
        EmbeddingInput::One(s) => vec![s],
        EmbeddingInput::Many(v) => v,
        EmbeddingInput::Tokens(_) | EmbeddingInput::ManyTokens(_) => {
            return bad_request("this engine takes text input, not token ids")
        }
    };
    if let Some(d) = req.dimensions {
        if d as usize != engine.dimensions() {
            return bad_request(&format!(
                "this model has {} dimensions and cannot change them",
                engine.dimensions()
            ));
        }
    }
    let Ok(_slot) = engines.cpu_slots.clone().acquire_owned().await else {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the node is shutting down",
        );
    };
    let result = tokio::task::spawn_blocking(move || engine.embed(&texts)).await;
    let embedded = match result {
        Ok(Ok(e)) => e,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "embedding failed");
            return error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "the embedding engine failed",
            );
        }
        Err(_) => {
            return error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "the embedding engine failed",
            )
        }
    };
    crate::engines::embeddings_response(
        &embedded.vectors,
        req.encoding_format,
        &req.model,
        embedded.prompt_tokens as u64,
    )
}

async fn scrape(State(state): State<NodeState>, body: Bytes) -> Response<Body> {
    let offering = state.offering();
    let engines = &offering.engines;
    let Some(engine) = engines.scrape.clone() else {
        return unknown_model("web-scrape");
    };
    let req: ScrapeRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(e) => return bad_request(&e.message),
    };
    match engine.scrape(req).await {
        Ok(res) => axum::response::IntoResponse::into_response(Json(res)),
        Err(e) => bad_request(&e.to_string()),
    }
}
