//! `/web/api/…`: the dashboard's data as JSON, for the signed-in account only.
//! Unsafe methods also need the `X-CSRF-Token` header (from `GET /web/api/me`).

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use bytes::Bytes;
use cxmpute_protocol::parse::parse_json;
use serde_json::{json, Value};

use super::app::revoke_own_key;
use super::session::{require_json, require_json_csrf, Role};
use crate::auth::KeyOptions;
use crate::error::ApiError;
use crate::state::AppState;

const HISTORY: i64 = 100;

/// `GET /web/api/me`.
pub async fn me(State(s): State<AppState>, h: HeaderMap) -> Result<Json<Value>, ApiError> {
    let user = require_json(&s, &h).await?;
    Ok(Json(json!({
        "account": user.account,
        "role": user.role,
        "csrf_token": user.csrf,
        "session_expires_at": user.expires_at,
    })))
}

/// `GET /web/api/keys`: the account's keys, secrets never included.
pub async fn list_keys(State(s): State<AppState>, h: HeaderMap) -> Result<Json<Value>, ApiError> {
    let user = require_json(&s, &h).await?;
    Ok(Json(json!({ "data": s.store.api_keys(&user.account.id).await? })))
}

/// `POST /web/api/keys`: `{name?, credit_limit?, allowed_services?, rpm_limit?}`.
pub async fn create_key(State(s): State<AppState>, h: HeaderMap, body: Bytes) -> Result<impl IntoResponse, ApiError> {
    let user = require_json_csrf(&s, &h).await?;
    let opts: KeyOptions = if body.is_empty() {
        KeyOptions::default()
    } else {
        parse_json(&body).map_err(ApiError::invalid_body)?
    };
    let (key, secret) = crate::auth::create_key(s.store.as_ref(), &user.account.id, opts).await?;
    Ok((StatusCode::CREATED, Json(json!({ "key": secret, "info": key }))))
}

/// `DELETE /web/api/keys/{id}`.
pub async fn revoke_key(
    State(s): State<AppState>,
    h: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let user = require_json_csrf(&s, &h).await?;
    revoke_own_key(&s, &user, &id).await?;
    Ok(Json(json!({ "id": id, "revoked": true })))
}

/// `GET /web/api/ledger`: newest first.
pub async fn ledger(State(s): State<AppState>, h: HeaderMap) -> Result<Json<Value>, ApiError> {
    let user = require_json(&s, &h).await?;
    Ok(Json(json!({
        "balance": user.account.balance,
        "data": s.store.ledger(&user.account.id, HISTORY).await?,
    })))
}

/// `GET /web/api/usage`: the latest usage records, newest first.
pub async fn usage(State(s): State<AppState>, h: HeaderMap) -> Result<Json<Value>, ApiError> {
    let user = require_json(&s, &h).await?;
    Ok(Json(
        json!({ "data": s.store.usage_for_account(&user.account.id, HISTORY).await? }),
    ))
}

/// `GET /web/api/admin/accounts`: administrators only.
pub async fn admin_accounts(State(s): State<AppState>, h: HeaderMap) -> Result<Json<Value>, ApiError> {
    let user = require_json(&s, &h).await?;
    if user.role != Role::Admin {
        return Err(ApiError::forbidden("not_admin", "This route is for administrators."));
    }
    Ok(Json(json!({ "data": s.store.list_accounts().await? })))
}
