//! Live provisions, grouped in pools per (service, model), and the choice of one
//! for each request.
//!
//! The choice is "power of two choices": draw two provisions at random and take
//! the one with the lower load score (in-flight requests weighted by recent
//! latency). It spreads load nearly as well as scanning the whole pool at O(1)
//! cost and without a herd all picking the same "best" node. A provision that
//! fails is ejected for an exponentially growing time; success resets that.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use cxmpute_store::Service;
use rand::Rng;

use crate::transport::Transport;

pub type PoolKey = (Service, String);

pub struct Provision {
    /// Store id of (device, service, model).
    pub id: String,
    pub device_id: String,
    /// The provider account rewards go to.
    pub account_id: String,
    pub service: Service,
    pub model: String,
    pub transport: Transport,
    /// Identifies the link (or direct registration) this provision came with,
    /// so one disconnect removes exactly its provisions.
    pub session: u64,
    /// The node's tier and region as it announced them (public figures only).
    pub placement: Arc<NodePlacement>,
    /// When it joined the pools (ms since the epoch): the device's uptime.
    pub linked_at: i64,
    in_flight: AtomicU32,
    /// Exponentially weighted latency to the response head, in microseconds.
    ewma_us: AtomicU64,
    failures: AtomicU32,
    ejected_until_ms: AtomicU64,
}

/// A node's announced tier and region, cleaned for publishing: anything
/// malformed becomes unknown rather than refusing the node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodePlacement {
    /// 0-4.
    pub tier: Option<u8>,
    /// `NL`, or `NL · South Holland`.
    pub region: Option<String>,
}

impl NodePlacement {
    pub fn from_announced(p: &cxmpute_protocol::link::Placement) -> NodePlacement {
        let country = p
            .country
            .as_deref()
            .map(str::trim)
            .filter(|c| (2..=3).contains(&c.len()) && c.bytes().all(|b| b.is_ascii_alphabetic()))
            .map(str::to_ascii_uppercase);
        let region = p
            .region
            .as_deref()
            .map(str::trim)
            .filter(|r| !r.is_empty() && r.chars().count() <= 60 && !r.chars().any(char::is_control));
        NodePlacement {
            tier: p.tier.filter(|t| *t <= 4),
            region: match (country, region) {
                (Some(c), Some(r)) => Some(format!("{c} · {r}")),
                (Some(c), None) => Some(c),
                (None, _) => None,
            },
        }
    }
}

fn now_ms(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

impl Provision {
    pub fn new(
        id: String,
        device_id: String,
        account_id: String,
        service: Service,
        model: String,
        transport: Transport,
        session: u64,
    ) -> Self {
        Provision {
            id,
            device_id,
            account_id,
            service,
            model,
            transport,
            session,
            placement: Arc::default(),
            linked_at: cxmpute_store::now_millis(),
            in_flight: AtomicU32::new(0),
            ewma_us: AtomicU64::new(1_000),
            failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
        }
    }

    /// Sets where the node says it runs (shared by all its provisions).
    pub fn with_placement(mut self, placement: Arc<NodePlacement>) -> Self {
        self.placement = placement;
        self
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn score(&self) -> u64 {
        (u64::from(self.in_flight()) + 1) * self.ewma_us.load(Ordering::Relaxed).max(1)
    }

    /// Counts a request as running until the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    pub fn record_success(&self, head_latency: Duration) {
        let sample = head_latency.as_micros().min(u128::from(u32::MAX)) as u64;
        let old = self.ewma_us.load(Ordering::Relaxed);
        // α = 1/8: smooth enough to ignore one outlier, quick to follow a trend.
        self.ewma_us.store(old - old / 8 + sample / 8, Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
    }

    /// Ejects the provision for 1 s, 2 s, 4 s … up to 60 s.
    pub fn record_failure(&self, epoch: Instant) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed).min(6);
        let backoff = 1_000u64 << n;
        self.ejected_until_ms
            .store(now_ms(epoch) + backoff.min(60_000), Ordering::Relaxed);
    }

    fn available(&self, now: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) <= now
    }
}

pub struct InFlight(Arc<Provision>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct Pools {
    pools: RwLock<HashMap<PoolKey, Vec<Arc<Provision>>>>,
    /// Models ever offered (from the store at start and every link since): a
    /// request for one of these with no live provision is a 503, otherwise 404.
    known: RwLock<HashSet<PoolKey>>,
    epoch: Instant,
}

impl Default for Pools {
    fn default() -> Self {
        Pools {
            pools: RwLock::default(),
            known: RwLock::default(),
            epoch: Instant::now(),
        }
    }
}

impl Pools {
    pub fn epoch(&self) -> Instant {
        self.epoch
    }

    pub fn add(&self, provisions: Vec<Arc<Provision>>) {
        let mut pools = self.pools.write().unwrap_or_else(|p| p.into_inner());
        let mut known = self.known.write().unwrap_or_else(|p| p.into_inner());
        for p in provisions {
            let key = (p.service, p.model.clone());
            known.insert(key.clone());
            let pool = pools.entry(key).or_default();
            pool.retain(|q| q.id != p.id);
            pool.push(p);
        }
    }

    /// Removes every provision of one session; returns how many.
    pub fn remove_session(&self, session: u64) -> usize {
        self.remove_where(|p| p.session == session)
    }

    /// Removes every provision of a device (drain, disconnect by an admin).
    pub fn remove_device(&self, device_id: &str) -> usize {
        self.remove_where(|p| p.device_id == device_id)
    }

    /// Removes a device's provisions of every session but `session` (a direct
    /// registration that replaces an earlier one).
    pub fn remove_device_except(&self, device_id: &str, session: u64) -> usize {
        self.remove_where(|p| p.device_id == device_id && p.session != session)
    }

    fn remove_where(&self, gone: impl Fn(&Provision) -> bool) -> usize {
        let mut pools = self.pools.write().unwrap_or_else(|p| p.into_inner());
        let mut removed = 0;
        for pool in pools.values_mut() {
            let before = pool.len();
            pool.retain(|p| !gone(p));
            removed += before - pool.len();
        }
        pools.retain(|_, pool| !pool.is_empty());
        removed
    }

    pub fn mark_known(&self, items: impl IntoIterator<Item = PoolKey>) {
        self.known.write().unwrap_or_else(|p| p.into_inner()).extend(items);
    }

    pub fn is_known(&self, service: Service, model: &str) -> bool {
        let key = (service, model.to_string());
        self.known.read().unwrap_or_else(|p| p.into_inner()).contains(&key)
    }

    /// Picks a provision for (service, model), avoiding `exclude` (the one that
    /// just failed). Ejected provisions are used only when nothing else is left.
    pub fn pick(&self, service: Service, model: &str, exclude: Option<&str>) -> Option<Arc<Provision>> {
        let pools = self.pools.read().unwrap_or_else(|p| p.into_inner());
        // A borrowed key lookup would need a custom Borrow impl; models are short.
        let pool = pools.get(&(service, model.to_string()))?;
        let now = now_ms(self.epoch);
        let candidates: Vec<&Arc<Provision>> = pool
            .iter()
            .filter(|p| Some(p.id.as_str()) != exclude && p.available(now))
            .collect();
        match candidates.len() {
            0 => None,
            1 => Some(candidates[0].clone()),
            n => {
                let mut rng = rand::thread_rng();
                let a = rng.gen_range(0..n);
                let mut b = rng.gen_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let (pa, pb) = (candidates[a], candidates[b]);
                Some(if pa.score() <= pb.score() {
                    pa.clone()
                } else {
                    pb.clone()
                })
            }
        }
    }

    /// (service, model, live provisions) for every non-empty pool.
    pub fn summary(&self) -> Vec<(Service, String, usize)> {
        let pools = self.pools.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<_> = pools.iter().map(|((s, m), v)| (*s, m.clone(), v.len())).collect();
        out.sort();
        out
    }

    pub fn all(&self) -> Vec<Arc<Provision>> {
        let pools = self.pools.read().unwrap_or_else(|p| p.into_inner());
        pools.values().flatten().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::direct_client;

    #[test]
    fn announced_placements_are_cleaned() {
        use cxmpute_protocol::link::Placement;
        let clean = |tier, country: Option<&str>, region: Option<&str>| {
            NodePlacement::from_announced(&Placement {
                tier,
                country: country.map(str::to_string),
                region: region.map(str::to_string),
            })
        };
        let p = clean(Some(3), Some(" de "), Some("Bavaria"));
        assert_eq!((p.tier, p.region.as_deref()), (Some(3), Some("DE · Bavaria")));
        assert_eq!(clean(None, Some("us"), None).region.as_deref(), Some("US"));
        // A region without a country, a bad country, a bad tier: unknown.
        assert_eq!(clean(Some(9), None, Some("Bavaria")), NodePlacement::default());
        assert_eq!(clean(None, Some("<b>"), None).region, None);
        assert_eq!(clean(None, Some("FR"), Some("a\nb")).region.as_deref(), Some("FR"));
        let long = "x".repeat(61);
        assert_eq!(clean(None, Some("FR"), Some(&long)).region.as_deref(), Some("FR"));
    }

    fn prov(id: &str, session: u64) -> Arc<Provision> {
        let t = Transport::Direct {
            base: "http://127.0.0.1:9".into(),
            token: "t".into(),
            client: direct_client(),
        };
        Arc::new(Provision::new(
            id.into(),
            format!("dev-{id}"),
            "acc".into(),
            Service::Chat,
            "m".into(),
            t,
            session,
        ))
    }

    #[tokio::test]
    async fn picks_the_less_loaded_and_skips_excluded_and_ejected() {
        let pools = Pools::default();
        let (a, b) = (prov("a", 1), prov("b", 2));
        pools.add(vec![a.clone(), b.clone()]);
        let _busy: Vec<_> = (0..5).map(|_| a.start()).collect();
        for _ in 0..20 {
            assert_eq!(pools.pick(Service::Chat, "m", None).unwrap().id, "b");
        }
        assert_eq!(pools.pick(Service::Chat, "m", Some("b")).unwrap().id, "a");
        b.record_failure(pools.epoch());
        assert_eq!(pools.pick(Service::Chat, "m", None).unwrap().id, "a");
        assert!(pools.pick(Service::Chat, "other", None).is_none());
    }

    #[tokio::test]
    async fn sessions_leave_but_models_stay_known() {
        let pools = Pools::default();
        pools.add(vec![prov("a", 1)]);
        assert_eq!(pools.remove_session(1), 1);
        assert!(pools.pick(Service::Chat, "m", None).is_none());
        assert!(pools.is_known(Service::Chat, "m"));
        assert!(pools.summary().is_empty());
    }
}
