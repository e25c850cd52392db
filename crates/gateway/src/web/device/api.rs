//! The node's side of device login: ask for a code pair, then poll.
//!
//! Errors use the OpenAI error JSON like the rest of the API; `error.code`
//! carries the RFC 8628 name (`authorization_pending`, `slow_down`,
//! `expired_token`, `access_denied`, `invalid_grant`), all with status 400.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use bytes::Bytes;
use cxmpute_protocol::parse::parse_json;
use cxmpute_store::ids::{hash_secret, new_id, random_secret};
use cxmpute_store::{now_millis, NewDeviceCode, NewDeviceKey, PollOutcome, StoreError};
use serde::{Deserialize, Serialize};

use super::{device_code_well_formed, UserCode, HOUR};
use crate::error::ApiError;
use crate::state::AppState;
use crate::web::ClientIp;

/// The name a node gets when it sends none.
const DEFAULT_NAME: &str = "provider node";
const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:device_code";

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CodeRequest {
    #[serde(default)]
    name: Option<String>,
}

#[derive(Serialize)]
pub struct CodeAnswer {
    pub device_code: String,
    pub user_code: String,
    /// The page where the owner types the code.
    pub verification_uri: String,
    /// The same page with the code filled in.
    pub verification_uri_complete: String,
    pub expires_in: u64,
    pub interval: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    device_code: String,
    #[serde(default)]
    grant_type: Option<String>,
}

#[derive(Serialize)]
pub struct TokenAnswer {
    pub device_id: String,
    pub access_key: String,
    /// `<device id>.<access key>`, as `cxmpute-provider start` takes it.
    pub credential: String,
    pub account_id: String,
    pub name: String,
}

/// A device name: trimmed, 1-100 printable characters.
fn device_name(raw: Option<&str>) -> Result<String, ApiError> {
    let Some(name) = raw.map(str::trim).filter(|n| !n.is_empty()) else {
        return Ok(DEFAULT_NAME.into());
    };
    if name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(ApiError::bad_request("'name' must be at most 100 printable characters").with_param("name"));
    }
    Ok(name.to_string())
}

/// Where browsers reach this gateway: `web.public_url`, else the Host the
/// node used (it is only echoed back to the same client).
fn base_url(state: &AppState, headers: &HeaderMap) -> String {
    if let Some(url) = &state.config.web.public_url {
        return url.trim_end_matches('/').to_string();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic()))
        .unwrap_or("localhost");
    format!("http://{host}")
}

/// `POST /v1/device/code`.
pub async fn request_code(
    State(state): State<AppState>,
    ip: ClientIp,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<CodeAnswer>, ApiError> {
    let cfg = &state.config.device_login;
    let key = format!("device-code:{}", ip.throttle_key());
    if let Err(wait) = state.web.throttle.check_window(&key, cfg.codes_per_ip_per_hour, HOUR) {
        let mut e = ApiError::bad_request(format!(
            "Too many device codes asked for from this address. Retry after {wait} s."
        ));
        e.status = StatusCode::TOO_MANY_REQUESTS;
        e.kind = "rate_limit_error";
        e.code = Some("rate_limit_exceeded");
        e.retry_after_secs = Some(wait);
        return Err(e);
    }
    let req: CodeRequest = if body.iter().all(u8::is_ascii_whitespace) {
        CodeRequest::default()
    } else {
        parse_json(&body).map_err(ApiError::invalid_body)?
    };
    let name = device_name(req.name.as_deref())?;
    let now = now_millis();
    let ttl_ms = i64::try_from(cfg.code_ttl_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    let device_code = random_secret();
    // A user code collides with a live one about once in 10¹⁰ draws; a few
    // tries make a failure here practically impossible.
    for _ in 0..5 {
        let user_code = UserCode::generate();
        let stored = state
            .store
            .create_device_code(NewDeviceCode {
                device_code_hash: hash_secret(&device_code),
                user_code_hash: user_code.hash(),
                device_name: name.clone(),
                interval_secs: cfg.poll_interval_secs,
                created_at: now,
                expires_at: now.saturating_add(ttl_ms),
            })
            .await;
        match stored {
            Ok(()) => {
                let base = base_url(&state, &headers);
                tracing::info!(name = %name, "device code issued");
                return Ok(Json(CodeAnswer {
                    device_code,
                    verification_uri: format!("{base}/link"),
                    verification_uri_complete: format!("{base}/link?code={}", user_code.display()),
                    user_code: user_code.display(),
                    expires_in: cfg.code_ttl_secs,
                    interval: cfg.poll_interval_secs,
                }));
            }
            Err(StoreError::Conflict(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::internal())
}

fn grant_error(code: &'static str, message: impl Into<String>) -> ApiError {
    let mut e = ApiError::bad_request(message);
    e.code = Some(code);
    e
}

/// `POST /v1/device/token`.
pub async fn poll_token(State(state): State<AppState>, body: Bytes) -> Result<Json<TokenAnswer>, ApiError> {
    let req: TokenRequest = parse_json(&body).map_err(ApiError::invalid_body)?;
    if req.grant_type.as_deref().is_some_and(|g| g != GRANT_TYPE) {
        return Err(
            grant_error("unsupported_grant_type", format!("'grant_type' must be '{GRANT_TYPE}'"))
                .with_param("grant_type"),
        );
    }
    if !device_code_well_formed(&req.device_code) {
        return Err(grant_error("invalid_grant", "Unknown device code.").with_param("device_code"));
    }
    let secret = random_secret();
    let key = NewDeviceKey {
        id: new_id("dev_"),
        access_key_hash: hash_secret(&secret),
    };
    let outcome = state
        .store
        .poll_device_code(&hash_secret(&req.device_code), now_millis(), key)
        .await?;
    match outcome {
        PollOutcome::Issued(device) => {
            tracing::info!(device = %device.id, account = %device.account_id, "device created by device login");
            Ok(Json(TokenAnswer {
                credential: format!("{}.{secret}", device.id),
                device_id: device.id,
                access_key: secret,
                account_id: device.account_id,
                name: device.name,
            }))
        }
        PollOutcome::Pending => Err(grant_error(
            "authorization_pending",
            "The code has not been approved yet. Keep polling.",
        )),
        PollOutcome::SlowDown { interval_secs } => {
            let mut e = grant_error(
                "slow_down",
                format!("Polling too fast: wait {interval_secs} s between polls."),
            );
            e.retry_after_secs = Some(u64::from(interval_secs));
            Err(e)
        }
        PollOutcome::Expired => Err(grant_error(
            "expired_token",
            "The code expired before it was approved. Ask for a new one.",
        )),
        PollOutcome::Denied => Err(grant_error("access_denied", "The owner denied this device.")),
        PollOutcome::Missing => Err(grant_error(
            "invalid_grant",
            "Unknown device code (or its credentials were issued already).",
        )
        .with_param("device_code")),
    }
}
