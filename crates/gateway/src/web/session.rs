//! Browser sessions: the cookie, who is signed in, and CSRF tokens.
//!
//! A session token is 32 random bytes (64 hex characters) in an HttpOnly
//! cookie; the store keeps only its SHA-256. The CSRF token of a session is
//! derived from the session token (a hash with a fixed label), so it needs no
//! storage, differs per session, and cannot be computed by a page that cannot
//! read the HttpOnly cookie. Before login, forms carry a random token that
//! must match a short-lived login cookie (double submit).

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use cxmpute_store::ids::{hash_secret, random_secret};
use cxmpute_store::{now_millis, Account};
use serde::Serialize;

use crate::auth::same_digest;
use crate::error::ApiError;
use crate::state::AppState;

pub const SESSION_COOKIE: &str = "cx_session";
pub const LOGIN_COOKIE: &str = "cx_login";
pub const CSRF_FIELD: &str = "csrf";
pub const CSRF_HEADER: &str = "x-csrf-token";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Any account: uses the API and may run provider devices.
    User,
    /// Also an operator: listed in `web.admin_emails`.
    Admin,
}

/// The signed-in account of a request.
#[derive(Debug, Clone)]
pub struct WebUser {
    pub account: Account,
    pub role: Role,
    pub csrf: String,
    pub token_hash: String,
    pub expires_at: i64,
}

/// Why a request has no usable session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    NoSession,
    Suspended,
}

/// Reads one cookie from the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A token we issued is 64 lowercase hex characters; anything else is not
/// worth a database read.
pub fn well_formed(token: &str) -> bool {
    token.len() == 64 && token.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub fn csrf_of(session_token: &str) -> String {
    hash_secret(&format!("cxmpute-csrf\0{session_token}"))
}

/// Compares a presented CSRF token with the expected one.
pub fn csrf_ok(expected: &str, given: Option<&str>) -> bool {
    given.is_some_and(|g| same_digest(expected, g))
}

/// The session of this request, if any, with its account's current state.
pub async fn current(state: &AppState, headers: &HeaderMap) -> Result<Result<WebUser, Denied>, ApiError> {
    let Some(token) = cookie(headers, SESSION_COOKIE).filter(|t| well_formed(t)) else {
        return Ok(Err(Denied::NoSession));
    };
    let token_hash = hash_secret(token);
    let Some(session) = state.store.session(&token_hash, now_millis()).await? else {
        return Ok(Err(Denied::NoSession));
    };
    if session.account.suspended {
        return Ok(Err(Denied::Suspended));
    }
    let role = if state.config.web.is_admin(session.account.email.as_deref()) {
        Role::Admin
    } else {
        Role::User
    };
    Ok(Ok(WebUser {
        account: session.account,
        role,
        csrf: csrf_of(token),
        token_hash,
        expires_at: session.expires_at,
    }))
}

/// For the JSON API: 401 without a session, 403 when suspended.
pub async fn require_json(state: &AppState, headers: &HeaderMap) -> Result<WebUser, ApiError> {
    match current(state, headers).await? {
        Ok(user) => Ok(user),
        Err(Denied::NoSession) => Err(ApiError::no_session()),
        Err(Denied::Suspended) => Err(ApiError::forbidden("account_suspended", "This account is suspended.")),
    }
}

/// For unsafe JSON methods: also the `X-CSRF-Token` header.
pub async fn require_json_csrf(state: &AppState, headers: &HeaderMap) -> Result<WebUser, ApiError> {
    let user = require_json(state, headers).await?;
    let given = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
    if !csrf_ok(&user.csrf, given) {
        return Err(ApiError::forbidden(
            "csrf_failed",
            "Missing or wrong X-CSRF-Token header (GET /web/api/me returns the token).",
        ));
    }
    Ok(user)
}

/// A new session for `account_id`; returns the `Set-Cookie` value.
pub async fn start(state: &AppState, account_id: &str) -> Result<HeaderValue, ApiError> {
    let token = random_secret();
    let now = now_millis();
    let ttl_secs = state.config.web.session_ttl_hours.saturating_mul(3600);
    let expires_at = now.saturating_add(i64::try_from(ttl_secs.saturating_mul(1000)).unwrap_or(i64::MAX));
    state
        .store
        .create_session(&hash_secret(&token), account_id, now, expires_at)
        .await?;
    set_cookie(state, SESSION_COOKIE, &token, "/", ttl_secs)
}

/// `Set-Cookie` for `name`; a `max_age` of 0 deletes the cookie.
pub fn set_cookie(
    state: &AppState,
    name: &str,
    value: &str,
    path: &str,
    max_age: u64,
) -> Result<HeaderValue, ApiError> {
    let secure = if state.config.web.secure_cookies() {
        "; Secure"
    } else {
        ""
    };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path={path}; Max-Age={max_age}; HttpOnly; SameSite=Lax{secure}"
    ))
    .map_err(|_| ApiError::internal())
}

/// Where a page sends a visitor without a session.
pub fn to_login() -> Response {
    redirect("/login")
}

pub fn redirect(to: &'static str) -> Response {
    (
        StatusCode::SEE_OTHER,
        [(header::LOCATION, HeaderValue::from_static(to))],
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, "a=1; cx_session=abc".parse().unwrap());
        h.append(header::COOKIE, "b=2".parse().unwrap());
        assert_eq!(cookie(&h, "cx_session"), Some("abc"));
        assert_eq!(cookie(&h, "b"), Some("2"));
        assert_eq!(cookie(&h, "cx"), None);
    }

    #[test]
    fn tokens_and_csrf() {
        let t = random_secret();
        assert!(well_formed(&t));
        assert!(!well_formed("abc"));
        assert!(!well_formed(&t.to_uppercase()));
        assert_ne!(csrf_of(&t), csrf_of(&random_secret()));
        assert!(csrf_ok(&csrf_of(&t), Some(&csrf_of(&t))));
        assert!(!csrf_ok(&csrf_of(&t), None));
        assert!(!csrf_ok(&csrf_of(&t), Some("x")));
    }
}
