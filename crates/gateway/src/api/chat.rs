//! `POST /v1/chat/completions`, JSON or SSE.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Response};
use cxmpute_protocol::openai::ChatRequest;
use cxmpute_protocol::parse::parse_json;
use cxmpute_store::Service;

use crate::billing::Bounds;
use crate::error::ApiError;
use crate::relay::{relay, Forward, MeterKind};
use crate::state::AppState;

pub async fn create(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response<Body>, ApiError> {
    let (caller, bytes) = super::begin(&state, &headers, body, Service::Chat).await?;
    let mut req: ChatRequest = parse_json(&bytes).map_err(ApiError::invalid_body)?;
    if req.model.trim().is_empty() {
        return Err(ApiError::bad_request("'model' must not be empty").with_param("model"));
    }
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("'messages' must hold at least one message").with_param("messages"));
    }
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request("only n = 1 is supported").with_param("n"));
    }
    if req.max_output() == Some(0) {
        return Err(ApiError::bad_request("'max_tokens' must be at least 1").with_param("max_tokens"));
    }
    let bounds = Bounds {
        input_max: req.prompt_bytes(),
        output_max: u64::from(req.max_output().unwrap_or(state.pricing().default_max_tokens)),
        ..Bounds::default()
    };
    let (body, meter) = if !req.is_stream() {
        (bytes, MeterKind::Json)
    } else if req.wants_usage_chunk() {
        (bytes, MeterKind::Sse { strip_usage: false })
    } else {
        // The gateway always asks for the usage chunk (to meter), and removes it
        // before the client sees it.
        req.stream_options.get_or_insert_with(Default::default).include_usage = Some(true);
        let rewritten = serde_json::to_vec(&req).map_err(|_| ApiError::internal())?;
        (rewritten.into(), MeterKind::Sse { strip_usage: true })
    };
    let fwd = Forward {
        service: Service::Chat,
        model: req.model,
        path: "/v1/chat/completions",
        body,
        meter,
        bounds,
    };
    relay(&state, caller, fwd).await
}
