//! What a node asks with its own device credential besides linking:
//! `GET /v1/provider/stats` (its dashboard's earnings) and
//! `POST /v1/provider/logout` (forget this device's credential).

use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use cxmpute_store::LedgerKind;
use serde_json::{json, Value};

use crate::auth;
use crate::error::ApiError;
use crate::state::AppState;

/// Today's reward and requests for this device (from the daily rollups, UTC),
/// and everything its account has earned as a provider (the reward ledger).
pub async fn stats(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    let token = auth::bearer(&headers).ok_or_else(ApiError::missing_key)?;
    let device = auth::authenticate_device(state.store.as_ref(), token).await?;
    let day = cxmpute_store::day_of(cxmpute_store::now_millis());
    let (today_reward, today_requests) = state
        .store
        .rollups(&day)
        .await?
        .iter()
        .filter(|r| r.device_id == device.id)
        .fold((0i64, 0i64), |(reward, n), r| (reward + r.reward, n + r.requests));
    let all_time_reward = state.store.ledger_sum(&device.account_id, LedgerKind::Reward).await?;
    Ok(Json(json!({
        "device_id": device.id,
        "day": day,
        "today_reward": today_reward,
        "today_requests": today_requests,
        "all_time_reward": all_time_reward,
    })))
}

/// Revokes the calling device's credential and closes its links; the device
/// and its history stay (shown as signed out). A suspended account's node
/// may still sign out.
pub async fn logout(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    let token = auth::bearer(&headers).ok_or_else(ApiError::missing_key)?;
    let device = auth::verify_device_secret(state.store.as_ref(), token).await?;
    let revoked = state.store.revoke_device(&device.id).await?;
    let (links, _) = crate::web::ops::disconnect_device(&state, &device.id).await?;
    tracing::info!(device = %device.id, links, "device signed out");
    Ok(Json(json!({ "device_id": device.id, "revoked": revoked })))
}
