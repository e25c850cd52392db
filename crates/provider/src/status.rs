//! What the node is doing right now, for the terminal dashboard: its phase
//! (loading, linking, linked, draining), what it offers, counters, the last
//! errors, and what the gateway says it has earned.
//!
//! One process runs one node, so the status is process-wide ([`global`]): the
//! link, the router and the engines update it with one call each, without
//! threading a handle through every layer. Counters are atomics; the rest sits
//! behind a mutex that is held only to copy or replace a field.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime};

use serde::Deserialize;

/// Errors kept for the dashboard.
const RECENT_ERRORS: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Engines are loading; the text says which step.
    Loading(String),
    /// Dialling the gateway (first time or again).
    Connecting,
    Linked {
        since: Instant,
    },
    /// The last attempt failed; the next one is coming.
    Retrying(String),
    /// Registered a URL with the gateway (direct mode).
    Direct,
    /// Stop requested: no new work, in-flight requests finish.
    Draining,
    /// The gateway refused this node (bad credential, suspended account).
    Refused(String),
    Stopped,
}

/// Earnings as the gateway reports them (`GET /v1/provider/stats`), in credits
/// (1 credit = 10⁻⁹ USD).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Earnings {
    pub today_reward: i64,
    pub today_requests: i64,
    pub all_time_reward: i64,
}

#[derive(Debug, Clone)]
pub struct Snapshot {
    pub phase: Phase,
    pub offers: Vec<(String, String)>,
    /// Assigned models being fetched while the node serves the others:
    /// service, model, last progress line.
    pub fetching: Vec<(String, String, String)>,
    pub served: u64,
    pub failed: u64,
    pub in_flight: u64,
    pub tokens_out: u64,
    pub errors: Vec<(SystemTime, String)>,
    pub earnings: Option<Earnings>,
    pub earnings_error: Option<String>,
}

#[derive(Default)]
struct Inner {
    phase: Option<Phase>,
    offers: Vec<(String, String)>,
    fetching: Vec<(String, String, String)>,
    errors: VecDeque<(SystemTime, String)>,
    earnings: Option<Earnings>,
    earnings_error: Option<String>,
}

#[derive(Default)]
pub struct NodeStatus {
    inner: Mutex<Inner>,
    served: AtomicU64,
    failed: AtomicU64,
    in_flight: AtomicU64,
    tokens_out: AtomicU64,
}

/// The process's node status.
pub fn global() -> &'static Arc<NodeStatus> {
    static STATUS: OnceLock<Arc<NodeStatus>> = OnceLock::new();
    STATUS.get_or_init(|| Arc::new(NodeStatus::default()))
}

impl NodeStatus {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    pub fn set_phase(&self, phase: Phase) {
        self.with(|i| i.phase = Some(phase));
    }

    /// Moves to `phase` unless the node is already draining or stopped (a link
    /// that drops during a drain must not look like a reconnect).
    pub fn set_phase_unless_leaving(&self, phase: Phase) {
        self.with(|i| {
            if !matches!(i.phase, Some(Phase::Draining | Phase::Stopped)) {
                i.phase = Some(phase);
            }
        });
    }

    pub fn set_offers(&self, offers: Vec<(String, String)>) {
        self.with(|i| i.offers = offers);
    }

    /// Shows `model` (of `service`) as being fetched in the background, with
    /// its latest progress line.
    pub fn set_fetching(&self, service: &str, model: &str, progress: &str) {
        self.with(|i| match i.fetching.iter_mut().find(|f| f.1 == model) {
            Some(f) => f.2 = progress.to_string(),
            None => i
                .fetching
                .push((service.to_string(), model.to_string(), progress.to_string())),
        });
    }

    /// `model` is no longer being fetched (it is served now, or it failed).
    pub fn fetch_ended(&self, model: &str) {
        self.with(|i| i.fetching.retain(|f| f.1 != model));
    }

    pub fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A request's answer ended; `ok` is false for 5xx answers.
    pub fn request_finished(&self, ok: bool) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        if ok {
            self.served.fetch_add(1, Ordering::Relaxed);
        } else {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn add_tokens(&self, n: u64) {
        self.tokens_out.fetch_add(n, Ordering::Relaxed);
    }

    pub fn error(&self, message: impl Into<String>) {
        let message = message.into();
        self.with(|i| {
            if i.errors.len() == RECENT_ERRORS {
                i.errors.pop_front();
            }
            i.errors.push_back((SystemTime::now(), message));
        });
    }

    pub fn set_earnings(&self, result: Result<Earnings, String>) {
        self.with(|i| match result {
            Ok(e) => {
                i.earnings = Some(e);
                i.earnings_error = None;
            }
            Err(e) => i.earnings_error = Some(e),
        });
    }

    pub fn snapshot(&self) -> Snapshot {
        let (phase, offers, fetching, errors, earnings, earnings_error) = self.with(|i| {
            (
                i.phase.clone().unwrap_or(Phase::Loading("starting".into())),
                i.offers.clone(),
                i.fetching.clone(),
                i.errors.iter().cloned().collect(),
                i.earnings.clone(),
                i.earnings_error.clone(),
            )
        });
        Snapshot {
            phase,
            offers,
            fetching,
            served: self.served.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            tokens_out: self.tokens_out.load(Ordering::Relaxed),
            errors,
            earnings,
            earnings_error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_errors() {
        let s = NodeStatus::default();
        s.request_started();
        s.request_started();
        s.request_finished(true);
        s.add_tokens(12);
        for n in 0..(RECENT_ERRORS + 3) {
            s.error(format!("e{n}"));
        }
        let snap = s.snapshot();
        assert_eq!(
            (snap.served, snap.failed, snap.in_flight, snap.tokens_out),
            (1, 0, 1, 12)
        );
        assert_eq!(snap.errors.len(), RECENT_ERRORS);
        assert_eq!(snap.errors.last().map(|e| e.1.as_str()), Some("e10"));
    }

    #[test]
    fn a_drain_is_not_overwritten_by_link_events() {
        let s = NodeStatus::default();
        s.set_phase(Phase::Draining);
        s.set_phase_unless_leaving(Phase::Retrying("closed".into()));
        assert_eq!(s.snapshot().phase, Phase::Draining);
    }
}
