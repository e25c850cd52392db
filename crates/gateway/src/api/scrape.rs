//! `POST /v1/scrape`: web pages to markdown, on providers' machines.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Response};
use cxmpute_protocol::link::SCRAPE_MODEL;
use cxmpute_protocol::openai::ScrapeRequest;
use cxmpute_protocol::parse::parse_json;
use cxmpute_store::Service;

use crate::billing::Bounds;
use crate::error::ApiError;
use crate::relay::{relay, Forward, MeterKind};
use crate::state::AppState;

/// The original's limit, kept.
const MAX_URLS: usize = 50;

pub async fn create(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response<Body>, ApiError> {
    let (caller, bytes) = super::begin(&state, &headers, body, Service::Scrape).await?;
    let req: ScrapeRequest = parse_json(&bytes).map_err(ApiError::invalid_body)?;
    if req.urls.is_empty() {
        return Err(ApiError::bad_request("Provide at least one URL in 'urls'.").with_param("urls"));
    }
    if req.urls.len() > MAX_URLS {
        return Err(
            ApiError::bad_request(format!("Too many URLs: at most {MAX_URLS} per request.")).with_param("urls"),
        );
    }
    let bounds = Bounds {
        pages_max: req.urls.len() as u64,
        ..Bounds::default()
    };
    let model = req.model.unwrap_or_else(|| SCRAPE_MODEL.to_string());
    let fwd = Forward {
        service: Service::Scrape,
        model,
        path: "/v1/scrape",
        body: bytes,
        meter: MeterKind::Scrape,
        bounds,
    };
    relay(&state, caller, fwd).await
}
