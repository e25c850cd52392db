//! The public OpenAI-compatible API, served under `/v1` and (as the original
//! did) under `/api/v1`.

mod chat;
mod embeddings;
mod models;
mod scrape;
mod speech;

use axum::body::Body;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use cxmpute_store::Service;
use http_body_util::{BodyExt, LengthLimitError, Limited};

use crate::auth;
use crate::error::ApiError;
use crate::relay::Caller;
use crate::state::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/models", get(models::list))
        .route("/models/{*id}", get(models::one))
        .route("/chat/completions", post(chat::create))
        .route("/embeddings", post(embeddings::create))
        .route("/audio/speech", post(speech::create))
        .route("/tts", post(speech::legacy))
        .route("/scrape", post(scrape::create))
}

/// The steps every API call starts with: key, permissions, rate limit, body.
pub async fn begin(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    service: Service,
) -> Result<(Caller, Bytes), ApiError> {
    let token = auth::bearer(headers).ok_or_else(ApiError::missing_key)?;
    let auth = state.keys.authenticate(state.store.as_ref(), token).await?;
    if let Some(allowed) = &auth.key.allowed_services {
        if !allowed.contains(&service) {
            return Err(ApiError::forbidden(
                "service_not_allowed",
                format!("This API key may not use the {service} service."),
            ));
        }
    }
    if let Some(rpm) = auth.key.rpm_limit {
        if let Err(wait) = state.limiter.check(&auth.key.id, rpm) {
            return Err(ApiError::rate_limited(wait, rpm));
        }
    }
    let bytes = read_body(headers, body, state.config.max_body_bytes).await?;
    let request_id = cxmpute_store::ids::new_id("req_");
    Ok((Caller { request_id, auth }, bytes))
}

/// Reads a body up to `limit` bytes; larger bodies are refused without being
/// read to the end when they announce their length.
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let announced = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::payload_too_large(limit));
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(ApiError::payload_too_large(limit)),
        Err(_) => Err(ApiError::bad_request("the request body could not be read")),
    }
}
