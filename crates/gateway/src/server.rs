//! Putting the gateway together: open the store, build the router, serve.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use cxmpute_protocol::assign::ASSIGNMENT_PATH;
use cxmpute_protocol::link::{DRAIN_PATH, LINK_PATH, LOGOUT_PATH, REGISTER_PATH, STATS_PATH};
use cxmpute_store::Store;
use serde_json::json;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::error::ApiError;
use crate::link::{accept, direct};
use crate::state::AppState;
use crate::web::mail::Mailer;

/// A gateway with its store open, ready to serve.
pub struct Gateway {
    state: AppState,
}

impl Gateway {
    /// Connects to the database (running migrations), claims it where the
    /// backend serves only one gateway (SQLite), returns holds a crash may
    /// have left, and loads the models known from earlier runs.
    pub async fn open(config: Config) -> anyhow::Result<Gateway> {
        let store = cxmpute_store::connect(&config.database_url).await?;
        store.claim_for_serving().await?;
        Gateway::with_store(config, store).await
    }

    pub async fn with_store(config: Config, store: Arc<dyn Store>) -> anyhow::Result<Gateway> {
        let mailer = Mailer::from_config(config.web.smtp.as_ref())?;
        Gateway::with_mailer(config, store, mailer).await
    }

    /// Like [`Gateway::with_store`] with a given mailer (tests capture codes).
    pub async fn with_mailer(config: Config, store: Arc<dyn Store>, mailer: Mailer) -> anyhow::Result<Gateway> {
        if config.release_holds_at_start {
            let released = store.release_all_holds().await?;
            if released > 0 {
                tracing::info!(released, "returned holds left by an earlier run");
            }
        }
        let known = store.known_models().await?;
        let state = AppState::new(config, store, mailer);
        state.pools.mark_known(known);
        // A price table saved by an administrator outranks the file's.
        if crate::web::ops::refresh_pricing(&state).await? {
            tracing::info!(version = state.pricing_version(), "prices from the store");
        }
        Ok(Gateway { state })
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    pub fn store(&self) -> Arc<dyn Store> {
        self.state.store.clone()
    }

    pub fn router(&self) -> Router {
        router(self.state.clone())
    }

    /// Serves until `shutdown` resolves, then closes provider links.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        use axum::serve::ListenerExt;
        let state = self.state.clone();
        tokio::spawn(sweep_holds(state.clone()));
        tokio::spawn(sweep_logins(state.clone()));
        tokio::spawn(refresh_pricing(state.clone()));
        tokio::spawn(pay_referrals(state.clone()));
        let listener = listener.tap_io(|tcp| {
            // Small streamed chunks must not wait for Nagle's algorithm.
            let _ = tcp.set_nodelay(true);
        });
        let token = state.shutdown.clone();
        // The peer address feeds the per-IP login throttle.
        let app = self
            .router()
            .into_make_service_with_connect_info::<std::net::SocketAddr>();
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                shutdown.await;
                token.cancel();
            })
            .await;
        state.shutdown.cancel();
        result.map_err(Into::into)
    }
}

/// Runs a gateway on `listener` until `shutdown` resolves.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    Gateway::open(config).await?.serve(listener, shutdown).await
}

/// Every (method, path) the router serves; `tests/openapi.rs` checks this list
/// against `docs/openapi.json` and against the router itself.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{id}"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/audio/speech"),
    ("POST", "/v1/tts"),
    ("POST", "/v1/scrape"),
    ("GET", "/api/v1/models"),
    ("GET", "/api/v1/models/{id}"),
    ("POST", "/api/v1/chat/completions"),
    ("POST", "/api/v1/embeddings"),
    ("POST", "/api/v1/audio/speech"),
    ("POST", "/api/v1/tts"),
    ("POST", "/api/v1/scrape"),
    ("GET", "/v1/provider/link"),
    ("POST", "/v1/provider/register"),
    ("POST", "/v1/provider/drain"),
    ("GET", "/v1/provider/stats"),
    ("POST", "/v1/provider/logout"),
    ("POST", "/v1/provider/assignment"),
    ("POST", "/admin/accounts"),
    ("GET", "/admin/accounts"),
    ("GET", "/admin/accounts/{id}"),
    ("POST", "/admin/accounts/{id}/deposit"),
    ("POST", "/admin/accounts/{id}/suspend"),
    ("POST", "/admin/accounts/{id}/unsuspend"),
    ("POST", "/admin/accounts/{id}/keys"),
    ("GET", "/admin/accounts/{id}/keys"),
    ("POST", "/admin/accounts/{id}/devices"),
    ("GET", "/admin/accounts/{id}/devices"),
    ("GET", "/admin/accounts/{id}/usage"),
    ("DELETE", "/admin/keys/{id}"),
    ("GET", "/admin/provisions"),
    ("GET", "/healthz"),
    ("GET", "/metrics"),
];

/// [`ROUTES`] and the web side's [`crate::web::ROUTES`] together.
pub fn all_routes() -> impl Iterator<Item = (&'static str, &'static str)> {
    ROUTES.iter().chain(crate::web::ROUTES).copied()
}

pub fn router(state: AppState) -> Router {
    let api = crate::api::routes();
    Router::new()
        .nest("/v1", api.clone())
        .nest("/api/v1", api)
        .route(LINK_PATH, get(accept::link))
        .route(REGISTER_PATH, post(direct::register_direct))
        .route(DRAIN_PATH, post(direct::drain))
        .route(STATS_PATH, get(crate::link::stats::stats))
        .route(LOGOUT_PATH, post(crate::link::stats::logout))
        .route(ASSIGNMENT_PATH, post(crate::orchestrator::handler::request_assignment))
        .nest("/admin", crate::admin::routes())
        .merge(crate::web::routes())
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    match state.store.ping().await {
        Ok(()) => (
            StatusCode::OK,
            Json(json!({ "status": "ok", "store": state.store.backend() })),
        ),
        Err(e) => {
            tracing::error!(error = %e, "health check: store unreachable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "status": "unavailable" })),
            )
        }
    }
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(&state.pools),
    )
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("Unknown route: {}", uri.path()))
}

async fn method_not_allowed() -> ApiError {
    let mut e = ApiError::bad_request("This route does not accept that method.");
    e.status = StatusCode::METHOD_NOT_ALLOWED;
    e
}

/// Returns expired holds (requests whose gateway died) every 30 s.
async fn sweep_holds(state: AppState) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
            _ = state.shutdown.cancelled() => return,
        }
        match state.store.release_expired_holds(cxmpute_store::now_millis()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(released = n, "returned expired holds"),
            Err(e) => tracing::warn!(error = %e, "could not release expired holds"),
        }
    }
}

/// Deletes expired login codes, sessions and device codes every ten minutes.
async fn sweep_logins(state: AppState) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(600)) => {}
            _ = state.shutdown.cancelled() => return,
        }
        match state.store.purge_expired_logins(cxmpute_store::now_millis()).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(deleted = n, "purged expired login codes and sessions"),
            Err(e) => tracing::warn!(error = %e, "could not purge expired logins"),
        }
        match state
            .store
            .purge_expired_device_codes(cxmpute_store::now_millis())
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::debug!(deleted = n, "purged expired device codes"),
            Err(e) => tracing::warn!(error = %e, "could not purge expired device codes"),
        }
    }
}

/// Picks up price table versions saved through another replica.
async fn refresh_pricing(state: AppState) {
    let every = Duration::from_secs(state.config.web.pricing_refresh_secs);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = state.shutdown.cancelled() => return,
        }
        match crate::web::ops::refresh_pricing(&state).await {
            Ok(true) => tracing::info!(version = state.pricing_version(), "new prices in force"),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "could not read the price table"),
        }
    }
}

/// Pays referral shares of the last finished days, off the request path.
/// Runs are idempotent, so several replicas doing the same day pay once.
async fn pay_referrals(state: AppState) {
    let secs = state.config.web.referrals.payout_interval_secs;
    if secs == 0 {
        return;
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(secs)) => {}
            _ = state.shutdown.cancelled() => return,
        }
        if let Err(e) = crate::web::ops::pay_referrals(&state, None).await {
            tracing::warn!(error = %e.message, "referral payouts failed");
        }
    }
}
