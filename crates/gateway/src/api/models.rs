//! `GET /v1/models`: what the network serves right now.

use axum::extract::{Path, State};
use axum::Json;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::state::AppState;

fn entry(service: cxmpute_store::Service, model: &str, providers: usize) -> Value {
    json!({
        "id": model,
        "object": "model",
        "created": 0,
        "owned_by": "cxmpute",
        "service": service.as_str(),
        "providers": providers,
    })
}

/// Models are listed without authentication, as the list is public anyway.
pub async fn list(State(state): State<AppState>) -> Json<Value> {
    let data: Vec<Value> = state
        .pools
        .summary()
        .into_iter()
        .map(|(s, m, n)| entry(s, &m, n))
        .collect();
    Json(json!({ "object": "list", "data": data }))
}

pub async fn one(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    state
        .pools
        .summary()
        .into_iter()
        .find(|(_, m, _)| *m == id)
        .map(|(s, m, n)| Json(entry(s, &m, n)))
        .ok_or_else(|| ApiError::model_not_found(&id))
}
