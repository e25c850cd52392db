//! The operator's HTTP API under `/admin`, guarded by the admin token from the
//! configuration. The `cxmpute-gateway admin …` commands do the same directly
//! on the database.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use bytes::Bytes;
use cxmpute_protocol::parse::parse_json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::{self, same_digest, KeyOptions};
use crate::error::ApiError;
use crate::state::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/accounts", post(create_account).get(list_accounts))
        .route("/accounts/{id}", get(show_account))
        .route("/accounts/{id}/deposit", post(deposit))
        .route("/accounts/{id}/suspend", post(suspend))
        .route("/accounts/{id}/unsuspend", post(unsuspend))
        .route("/accounts/{id}/keys", post(create_key).get(list_keys))
        .route("/accounts/{id}/devices", post(create_device).get(list_devices))
        .route("/accounts/{id}/usage", get(usage))
        .route("/keys/{id}", delete(revoke_key))
        .route("/provisions", get(provisions))
}

fn check(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let expected = state
        .config
        .admin_token
        .as_deref()
        .ok_or_else(ApiError::unauthorized_admin)?;
    let given = auth::bearer(headers).ok_or_else(ApiError::unauthorized_admin)?;
    // Compare digests so the comparison time says nothing about the token.
    let (a, b) = (
        cxmpute_store::ids::hash_secret(given),
        cxmpute_store::ids::hash_secret(expected),
    );
    same_digest(&a, &b)
        .then_some(())
        .ok_or_else(ApiError::unauthorized_admin)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAccount {
    name: String,
    #[serde(default)]
    email: Option<String>,
}

async fn create_account(State(s): State<AppState>, h: HeaderMap, body: Bytes) -> Result<impl IntoResponse, ApiError> {
    check(&s, &h)?;
    let req: NewAccount = parse_json(&body).map_err(ApiError::invalid_body)?;
    if req.name.trim().is_empty() || req.name.len() > 200 {
        return Err(ApiError::bad_request("'name' must be 1-200 characters").with_param("name"));
    }
    let account = s.store.create_account(req.name.trim(), req.email.as_deref()).await?;
    Ok((StatusCode::CREATED, Json(json!(account))))
}

async fn list_accounts(State(s): State<AppState>, h: HeaderMap) -> Result<Json<Value>, ApiError> {
    check(&s, &h)?;
    Ok(Json(json!({ "data": s.store.list_accounts().await? })))
}

async fn show_account(
    State(s): State<AppState>,
    h: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check(&s, &h)?;
    let account = s
        .store
        .account(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no account '{id}'")))?;
    let ledger = s.store.ledger(&id, 50).await?;
    Ok(Json(json!({ "account": account, "ledger": ledger })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Deposit {
    amount: i64,
    #[serde(default)]
    note: Option<String>,
}

async fn deposit(
    State(s): State<AppState>,
    h: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    check(&s, &h)?;
    let req: Deposit = parse_json(&body).map_err(ApiError::invalid_body)?;
    if req.amount <= 0 {
        return Err(ApiError::bad_request("'amount' must be a positive number of credits").with_param("amount"));
    }
    if s.store.account(&id).await?.is_none() {
        return Err(ApiError::not_found(format!("no account '{id}'")));
    }
    let balance = s.store.deposit(&id, req.amount, req.note.as_deref()).await?;
    Ok(Json(json!({ "account_id": id, "balance": balance })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Suspend {
    reason: String,
}

async fn suspend(
    State(s): State<AppState>,
    h: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    check(&s, &h)?;
    let req: Suspend = parse_json(&body).map_err(ApiError::invalid_body)?;
    set_suspension(&s, &id, Some(&req.reason)).await
}

async fn unsuspend(State(s): State<AppState>, h: HeaderMap, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    check(&s, &h)?;
    set_suspension(&s, &id, None).await
}

async fn set_suspension(s: &AppState, id: &str, reason: Option<&str>) -> Result<Json<Value>, ApiError> {
    // The same as the web admin's suspension: keys, sessions and links too.
    crate::web::ops::set_suspended(s, id, reason).await?;
    Ok(Json(json!({ "account_id": id, "suspended": reason.is_some() })))
}

async fn create_key(
    State(s): State<AppState>,
    h: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    check(&s, &h)?;
    let opts: KeyOptions = if body.is_empty() {
        KeyOptions::default()
    } else {
        parse_json(&body).map_err(ApiError::invalid_body)?
    };
    let (key, secret) = auth::create_key(s.store.as_ref(), &id, opts).await?;
    Ok((StatusCode::CREATED, Json(json!({ "key": secret, "info": key }))))
}

async fn list_keys(State(s): State<AppState>, h: HeaderMap, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    check(&s, &h)?;
    Ok(Json(json!({ "data": s.store.api_keys(&id).await? })))
}

async fn revoke_key(State(s): State<AppState>, h: HeaderMap, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    check(&s, &h)?;
    if !s.store.revoke_api_key(&id).await? {
        return Err(ApiError::not_found(format!("no key '{id}'")));
    }
    s.keys.evict(&id);
    Ok(Json(json!({ "id": id, "revoked": true })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NewDevice {
    #[serde(default)]
    name: Option<String>,
}

async fn create_device(
    State(s): State<AppState>,
    h: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    check(&s, &h)?;
    let req: NewDevice = if body.is_empty() {
        NewDevice::default()
    } else {
        parse_json(&body).map_err(ApiError::invalid_body)?
    };
    let (device_id, credential) =
        auth::create_device(s.store.as_ref(), &id, req.name.as_deref().unwrap_or("device")).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "device_id": device_id, "credential": credential })),
    ))
}

async fn list_devices(
    State(s): State<AppState>,
    h: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check(&s, &h)?;
    Ok(Json(json!({ "data": s.store.devices(&id).await? })))
}

async fn usage(State(s): State<AppState>, h: HeaderMap, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    check(&s, &h)?;
    Ok(Json(json!({ "data": s.store.usage_for_account(&id, 100).await? })))
}

async fn provisions(State(s): State<AppState>, h: HeaderMap) -> Result<Json<Value>, ApiError> {
    check(&s, &h)?;
    let live: Vec<Value> = s
        .pools
        .all()
        .iter()
        .map(|p| {
            json!({
                "id": p.id, "device_id": p.device_id, "service": p.service.as_str(), "model": p.model,
                "mode": p.transport.mode(), "in_flight": p.in_flight(),
            })
        })
        .collect();
    Ok(Json(json!({ "live": live, "all": s.store.provisions().await? })))
}
