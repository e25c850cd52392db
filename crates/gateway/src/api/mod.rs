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
use http_body_util::BodyExt;

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
    let request_id = cxmpute_store::ids::new_sorted_id("req_");
    Ok((Caller { request_id, auth }, bytes))
}

/// Bodies up to this size are read to their end even when refused, so the
/// client (still sending) reliably receives the 413 instead of a reset.
const DRAIN_LIMIT: u64 = 32 << 20;

/// Reads a body up to `limit` bytes; larger bodies get 413. A body beyond
/// [`DRAIN_LIMIT`] is refused without being read further.
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let announced = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > DRAIN_LIMIT) {
        return Err(ApiError::payload_too_large(limit));
    }
    let mut body = body;
    let mut buf = bytes::BytesMut::with_capacity(announced.map_or(8 * 1024, |n| n.min(limit as u64) as usize));
    let mut seen: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| ApiError::bad_request("the request body could not be read"))?;
        let Ok(data) = frame.into_data() else { continue };
        seen += data.len() as u64;
        if seen > DRAIN_LIMIT {
            break;
        }
        if seen <= limit as u64 {
            buf.extend_from_slice(&data);
        }
    }
    if seen > limit as u64 {
        return Err(ApiError::payload_too_large(limit));
    }
    Ok(buf.freeze())
}
