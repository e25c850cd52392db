//! The browser side of the gateway: email login, sessions, the user
//! dashboard, and the session-authenticated JSON API behind it.
//!
//! # Layout
//! - [`config`]: the `[web]` configuration section.
//! - [`login`]: one-time codes by mail, the login and logout forms.
//! - [`session`]: session cookies, roles, CSRF tokens.
//! - [`app`]: the dashboard page and its forms.
//! - [`device`]: device login: codes for nodes, the `/link` approval page.
//! - [`app`]: the dashboard page and its forms; [`provider`]: the provider page.
//! - [`admin`]: the operator pages under `/admin` (and their JSON), doing
//!   what [`ops`] does; [`public`]: `/network`, `/models`, public JSON.
//! - [`api`]: `/web/api/…`, JSON for the same things.
//! - [`charts`]: inline SVG bar charts.
//! - [`mail`]: SMTP (or the log when no SMTP is configured).
//! - [`html`]: escaping and the page frame.
//!
//! # Who may do what
//! Pages and routes act only on the signed-in account's own data: a key id of
//! another account answers 404, the same as a key that does not exist.
//! Suspended accounts cannot sign in and their sessions stop working.
//! Administrators (emails in `web.admin_emails`) also get `/admin` and
//! `/web/api/admin/…`; everyone else gets 403 there (401 or the login page
//! without a session). `/network`, `/models` and `/web/api/public/…` need no login.

pub mod admin;
pub mod api;
pub mod app;
pub mod charts;
pub mod config;
pub mod device;
pub mod html;
pub mod login;
pub mod mail;
pub mod ops;
pub mod provider;
pub mod public;
pub mod session;

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use bytes::Bytes;

use crate::error::ApiError;
use crate::ratelimit::RateLimiter;
use crate::state::AppState;
use mail::Mailer;

/// Every (method, path) of the web side. `server::ROUTES` includes them, so
/// they are documented in `docs/openapi.json`; the authorization matrix test
/// (`tests/web_matrix.rs`) needs an entry for each.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/login"),
    ("POST", "/login"),
    ("POST", "/login/verify"),
    ("POST", "/logout"),
    ("GET", "/app"),
    ("POST", "/app/keys"),
    ("POST", "/app/keys/{id}/revoke"),
    ("POST", "/app/keys/{id}/edit"),
    ("GET", "/web/api/me"),
    ("GET", "/web/api/keys"),
    ("POST", "/web/api/keys"),
    ("DELETE", "/web/api/keys/{id}"),
    ("PATCH", "/web/api/keys/{id}"),
    ("GET", "/web/api/ledger"),
    ("GET", "/web/api/usage"),
    ("GET", "/web/api/admin/accounts"),
    ("POST", "/v1/device/code"),
    ("POST", "/v1/device/token"),
    ("GET", "/link"),
    ("POST", "/link"),
    ("GET", "/app/provider"),
    ("GET", "/web/api/provider"),
    ("GET", "/web/api/usage/daily"),
    ("GET", "/web/api/referrals"),
    ("GET", "/admin"),
    ("GET", "/admin/users/{id}"),
    ("POST", "/admin/users/{id}/credits"),
    ("POST", "/admin/users/{id}/suspend"),
    ("POST", "/admin/users/{id}/unsuspend"),
    ("POST", "/admin/pricing"),
    ("POST", "/admin/devices/{id}/disconnect"),
    ("POST", "/admin/banners"),
    ("POST", "/admin/banners/{id}/delete"),
    ("POST", "/admin/referrals/run"),
    ("GET", "/web/api/admin/accounts/{id}"),
    ("POST", "/web/api/admin/accounts/{id}/credits"),
    ("POST", "/web/api/admin/accounts/{id}/suspend"),
    ("POST", "/web/api/admin/accounts/{id}/unsuspend"),
    ("GET", "/web/api/admin/pricing"),
    ("POST", "/web/api/admin/pricing"),
    ("GET", "/web/api/admin/provisions"),
    ("POST", "/web/api/admin/devices/{id}/disconnect"),
    ("GET", "/web/api/admin/banners"),
    ("POST", "/web/api/admin/banners"),
    ("DELETE", "/web/api/admin/banners/{id}"),
    ("POST", "/web/api/admin/referrals/run"),
    ("GET", "/network"),
    ("GET", "/models"),
    ("GET", "/web/api/public/stats"),
    ("GET", "/web/api/public/models"),
    ("GET", "/web/api/public/banners"),
];

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/login", get(login::login_page).post(login::request_code))
        .route("/login/verify", post(login::verify_code))
        .route("/logout", post(login::logout))
        .route("/app", get(app::dashboard))
        .route("/app/keys", post(app::create_key))
        .route("/app/keys/{id}/revoke", post(app::revoke_key))
        .route("/app/keys/{id}/edit", post(app::edit_key))
        .route("/web/api/me", get(api::me))
        .route("/web/api/keys", get(api::list_keys).post(api::create_key))
        .route("/web/api/keys/{id}", delete(api::revoke_key).patch(api::update_key))
        .route("/web/api/ledger", get(api::ledger))
        .route("/web/api/usage", get(api::usage))
        .route("/v1/device/code", post(device::api::request_code))
        .route("/v1/device/token", post(device::api::poll_token))
        .route("/link", get(device::page::link_page).post(device::page::decide))
        .route("/web/api/admin/accounts", get(admin::api_accounts))
        .route("/app/provider", get(provider::page_handler))
        .route("/web/api/provider", get(provider::api))
        .route("/web/api/usage/daily", get(api::usage_daily))
        .route("/web/api/referrals", get(api::referrals))
        .route("/admin", get(admin::home))
        .route("/admin/users/{id}", get(admin::user_page))
        .route("/admin/users/{id}/credits", post(admin::credits_form))
        .route("/admin/users/{id}/suspend", post(admin::suspend_form))
        .route("/admin/users/{id}/unsuspend", post(admin::unsuspend_form))
        .route("/admin/pricing", post(admin::pricing_form))
        .route("/admin/devices/{id}/disconnect", post(admin::disconnect_form))
        .route("/admin/banners", post(admin::banner_form))
        .route("/admin/banners/{id}/delete", post(admin::banner_delete_form))
        .route("/admin/referrals/run", post(admin::referrals_form))
        .route("/web/api/admin/accounts/{id}", get(admin::api_account))
        .route("/web/api/admin/accounts/{id}/credits", post(admin::api_credits))
        .route("/web/api/admin/accounts/{id}/suspend", post(admin::api_suspend))
        .route("/web/api/admin/accounts/{id}/unsuspend", post(admin::api_unsuspend))
        .route(
            "/web/api/admin/pricing",
            get(admin::api_pricing).post(admin::api_set_pricing),
        )
        .route("/web/api/admin/provisions", get(admin::api_provisions))
        .route("/web/api/admin/devices/{id}/disconnect", post(admin::api_disconnect))
        .route(
            "/web/api/admin/banners",
            get(admin::api_banners).post(admin::api_add_banner),
        )
        .route("/web/api/admin/banners/{id}", delete(admin::api_delete_banner))
        .route("/web/api/admin/referrals/run", post(admin::api_run_referrals))
        .route("/network", get(public::network_page))
        .route("/models", get(public::models_page))
        .route("/web/api/public/stats", get(public::api_stats))
        .route("/web/api/public/models", get(public::api_models))
        .route("/web/api/public/banners", get(public::api_banners))
}

/// What the web side adds to the application state.
pub struct WebState {
    pub mailer: Mailer,
    /// Login throttles, keyed `ip:…` and `addr:…`.
    pub throttle: RateLimiter,
    /// Today's network usage for the public statistics, briefly cached.
    pub stats: public::StatsCache,
}

impl WebState {
    pub fn new(mailer: Mailer) -> WebState {
        WebState {
            mailer,
            throttle: RateLimiter::default(),
            stats: public::StatsCache::default(),
        }
    }
}

/// The client's address: the connection's peer, or the first address of
/// `X-Forwarded-For` when `web.trust_forwarded_for` is on. `None` when neither
/// is known (in-process tests); such requests share one throttle bucket.
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub Option<IpAddr>);

impl FromRequestParts<AppState> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        if state.config.web.trust_forwarded_for {
            let forwarded = parts
                .headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(',').next())
                .and_then(|v| v.trim().parse().ok());
            if forwarded.is_some() {
                return Ok(ClientIp(forwarded));
            }
        }
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip());
        Ok(ClientIp(peer))
    }
}

impl ClientIp {
    pub fn throttle_key(&self) -> String {
        match self.0 {
            Some(ip) => format!("ip:{ip}"),
            None => "ip:unknown".into(),
        }
    }
}

/// A URL-encoded form body as (name, value) pairs.
pub struct Form(Vec<(String, String)>);

impl Form {
    pub fn parse(body: &Bytes) -> Form {
        Form(form_urlencoded::parse(body).into_owned().collect())
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0.iter().filter(move |(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// An error on a page: rendered as HTML, with the same status an
/// [`ApiError`] would have and its (client-safe) message.
pub struct PageError(pub ApiError);

impl From<ApiError> for PageError {
    fn from(e: ApiError) -> Self {
        PageError(e)
    }
}

impl From<cxmpute_store::StoreError> for PageError {
    fn from(e: cxmpute_store::StoreError) -> Self {
        PageError(e.into())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        html::message_page(self.0.status, "Something went wrong", &self.0.message, ("/app", "Back"))
    }
}
