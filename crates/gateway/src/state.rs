//! The application state every handler shares: cheap to clone, built once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use cxmpute_store::Store;

use crate::auth::KeyCache;
use crate::config::{Config, Pricing};
use crate::link::links::Links;
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
    /// The price table in force and its version (0: the configuration's).
    pricing: RwLock<(i64, Arc<Pricing>)>,
    /// Live provider links, so an operator can close one.
    pub links: Links,
    next_session: AtomicU64,
    /// Random per process: with `next_session`, names a link uniquely across
    /// gateway replicas and restarts (the store's `provisions.link_id`).
    instance: String,
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
        let pricing = RwLock::new((0, Arc::new(config.pricing.clone())));
        AppState(Arc::new(Inner {
            config,
            store,
            pools: Pools::default(),
            keys: KeyCache::default(),
            limiter: RateLimiter::default(),
            metrics: Metrics::default(),
            direct: direct_client(),
            pricing,
            web: WebState::new(mailer),
            links: Links::default(),
            next_session: AtomicU64::new(1),
            instance: format!("{:016x}", rand::random::<u64>()),
            shutdown: tokio_util::sync::CancellationToken::new(),
        }))
    }

    pub fn new_session(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// The id the store keeps for the link (or direct registration) `session`.
    pub fn link_id(&self, session: u64) -> String {
        format!("{}:{session}", self.instance)
    }

    /// The prices in force: one read lock and a reference count per request.
    pub fn pricing(&self) -> Arc<Pricing> {
        self.pricing.read().unwrap_or_else(|p| p.into_inner()).1.clone()
    }

    pub fn pricing_version(&self) -> i64 {
        self.pricing.read().unwrap_or_else(|p| p.into_inner()).0
    }

    /// Puts a stored version in force unless a newer one already is.
    pub fn use_pricing(&self, version: i64, pricing: Pricing) -> bool {
        let mut current = self.pricing.write().unwrap_or_else(|p| p.into_inner());
        if version <= current.0 {
            return false;
        }
        *current = (version, Arc::new(pricing));
        true
    }

    pub fn first_byte_timeout(&self) -> Duration {
        Duration::from_secs(self.config.first_byte_timeout_secs)
    }
}
