//! `/web/api/…`: the dashboard's data as JSON, for the signed-in account only.
//! Unsafe methods also need the `X-CSRF-Token` header (from `GET /web/api/me`).

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use bytes::Bytes;
use cxmpute_protocol::parse::parse_json;
use serde_json::{json, Value};

use super::app::revoke_own_key;
use super::session::{require_json, require_json_csrf};
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

/// `PATCH /web/api/keys/{id}`: new name, credit limit, services and RPM
/// (absent limits are lifted; an absent name keeps the old one).
pub async fn update_key(
    State(s): State<AppState>,
    h: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let user = require_json_csrf(&s, &h).await?;
    let opts: KeyOptions = parse_json(&body).map_err(ApiError::invalid_body)?;
    let key = super::app::update_own_key(&s, &user, &id, opts).await?;
    Ok(Json(json!({ "info": key })))
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

/// `GET /web/api/ledger?before=ID&limit=N`: newest first, a page at a time;
/// `next_before` continues (absent on the last page).
pub async fn ledger(State(s): State<AppState>, h: HeaderMap, RawQuery(q): RawQuery) -> Result<Json<Value>, ApiError> {
    let user = require_json(&s, &h).await?;
    let before = query_i64(&q, "before", 1, i64::MAX)?;
    let limit = query_i64(&q, "limit", 1, 500)?.unwrap_or(HISTORY);
    let data = s.store.ledger_page(&user.account.id, before, limit).await?;
    let next = if data.len() as i64 == limit {
        data.last().map(|e| e.id)
    } else {
        None
    };
    Ok(Json(json!({
        "balance": user.account.balance,
        "data": data,
        "next_before": next,
    })))
}

/// `GET /web/api/usage`: the latest usage records, newest first.
pub async fn usage(State(s): State<AppState>, h: HeaderMap) -> Result<Json<Value>, ApiError> {
    let user = require_json(&s, &h).await?;
    Ok(Json(
        json!({ "data": s.store.usage_for_account(&user.account.id, HISTORY).await? }),
    ))
}

fn query_i64(raw: &Option<String>, name: &str, min: i64, max: i64) -> Result<Option<i64>, ApiError> {
    let Some(text) = raw.as_deref().and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }) else {
        return Ok(None);
    };
    text.parse::<i64>()
        .ok()
        .filter(|v| (min..=max).contains(v))
        .map(Some)
        .ok_or_else(|| {
            ApiError::bad_request(format!("'{name}' must be a whole number from {min} to {max}")).with_param(name)
        })
}

/// `GET /web/api/usage/daily?days=30`: usage per UTC day, service and model.
pub async fn usage_daily(
    State(s): State<AppState>,
    h: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let user = require_json(&s, &h).await?;
    let days = query_i64(&q, "days", 1, 366)?.unwrap_or(30);
    let since = cxmpute_store::day_of(cxmpute_store::now_millis() - (days - 1) * 86_400_000);
    Ok(Json(json!({
        "since": since,
        "data": s.store.usage_days(&user.account.id, &since).await?,
    })))
}

/// `GET /web/api/referrals`: the account's code, link, referrals and earnings.
pub async fn referrals(State(s): State<AppState>, h: HeaderMap) -> Result<Json<Value>, ApiError> {
    let user = require_json(&s, &h).await?;
    let id = &user.account.id;
    let code = s.store.referral_code(id).await?;
    Ok(Json(json!({
        "code": code,
        "link": format!("{}/login?ref={code}", super::app::base_url(&s)),
        "referrer_id": s.store.referrer_of(id).await?,
        "referred": s.store.referred_by(id).await?,
        "earned": s.store.ledger_sum(id, cxmpute_store::LedgerKind::Referral).await?,
        "plan": s.config.web.referrals,
    })))
}
