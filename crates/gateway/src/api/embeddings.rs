//! `POST /v1/embeddings`.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Response};
use cxmpute_protocol::openai::EmbeddingsRequest;
use cxmpute_protocol::parse::parse_json;
use cxmpute_store::Service;

use crate::billing::Bounds;
use crate::error::ApiError;
use crate::relay::{relay, Forward, MeterKind};
use crate::state::AppState;

/// OpenAI's own limit on inputs per request.
const MAX_INPUTS: usize = 2048;

pub async fn create(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response<Body>, ApiError> {
    let (caller, bytes) = super::begin(&state, &headers, body, Service::Embeddings).await?;
    let req: EmbeddingsRequest = parse_json(&bytes).map_err(ApiError::invalid_body)?;
    if req.model.trim().is_empty() {
        return Err(ApiError::bad_request("'model' must not be empty").with_param("model"));
    }
    if req.input.is_empty() {
        return Err(ApiError::bad_request("'input' must not be empty").with_param("input"));
    }
    if req.input.count() > MAX_INPUTS {
        return Err(ApiError::bad_request(format!("'input' may hold at most {MAX_INPUTS} items")).with_param("input"));
    }
    let bounds = Bounds {
        input_max: req.input.max_tokens(),
        inputs: req.input.count() as u64,
        ..Bounds::default()
    };
    let fwd = Forward {
        service: Service::Embeddings,
        model: req.model,
        path: "/v1/embeddings",
        body: bytes,
        meter: MeterKind::Json,
        bounds,
    };
    relay(&state, caller, fwd).await
}
