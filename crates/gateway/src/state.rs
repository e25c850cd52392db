//! The application state every handler shares: cheap to clone, built once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cxmpute_store::Store;

use crate::auth::KeyCache;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::pools::Pools;
use crate::ratelimit::RateLimiter;
use crate::transport::{direct_client, DirectClient};
use crate::web::mail::Mailer;
use crate::web::WebState;

#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub pools: Pools,
    pub keys: KeyCache,
    pub limiter: RateLimiter,
    pub metrics: Metrics,
    pub direct: DirectClient,
    pub web: WebState,
    next_session: AtomicU64,
    /// Tells background tasks (links, sweepers) to stop.
    pub shutdown: tokio_util::sync::CancellationToken,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    pub fn new(config: Config, store: Arc<dyn Store>, mailer: Mailer) -> AppState {
        AppState(Arc::new(Inner {
            config,
            store,
            pools: Pools::default(),
            keys: KeyCache::default(),
            limiter: RateLimiter::default(),
            metrics: Metrics::default(),
            direct: direct_client(),
            web: WebState::new(mailer),
            next_session: AtomicU64::new(1),
            shutdown: tokio_util::sync::CancellationToken::new(),
        }))
    }

    pub fn new_session(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    pub fn first_byte_timeout(&self) -> Duration {
        Duration::from_secs(self.config.first_byte_timeout_secs)
    }
}
