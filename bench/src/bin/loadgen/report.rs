//! Turns merged worker results into exact percentiles and prints them.

use std::fmt::Write as _;
use std::time::Duration;

use super::worker::Results;

/// Exact percentiles of a sample set (nearest-rank on the sorted values).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Percentiles {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
    pub mean: u64,
}

impl Percentiles {
    pub fn of(mut values: Vec<u64>) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        values.sort_unstable();
        // Nearest rank: the smallest value with at least p% of samples <= it.
        let rank = |p: f64| {
            let n = values.len();
            let idx = ((p / 100.0) * n as f64).ceil() as usize;
            values[idx.clamp(1, n) - 1]
        };
        let sum: u128 = values.iter().map(|&v| u128::from(v)).sum();
        Some(Self {
            p50: rank(50.0),
            p90: rank(90.0),
            p99: rank(99.0),
            max: values[values.len() - 1],
            mean: u64::try_from(sum / values.len() as u128).unwrap_or(u64::MAX),
        })
    }

    fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "p50": self.p50, "p90": self.p90, "p99": self.p99, "max": self.max, "mean": self.mean,
        })
    }
}

pub struct Report {
    results: Results,
    elapsed: Duration,
    latency: Option<Percentiles>,
    ttfb: Option<Percentiles>,
}

impl Report {
    pub fn new(mut results: Results, elapsed: Duration, stream: bool) -> Self {
        let latency = Percentiles::of(std::mem::take(&mut results.latencies_us));
        let ttfb = if stream {
            Percentiles::of(std::mem::take(&mut results.ttfb_us))
        } else {
            None
        };
        Self {
            results,
            elapsed,
            latency,
            ttfb,
        }
    }

    fn requests(&self) -> u64 {
        let r = &self.results;
        r.ok + r.status_errors + r.transport_errors + r.timeouts
    }

    fn errors(&self) -> u64 {
        self.requests() - self.results.ok
    }

    fn per_sec(&self, n: u64) -> f64 {
        n as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn to_json(&self) -> String {
        let r = &self.results;
        let statuses: serde_json::Map<String, serde_json::Value> =
            r.statuses.iter().map(|(s, n)| (s.to_string(), (*n).into())).collect();
        serde_json::json!({
            "requests": self.requests(),
            "ok": r.ok,
            "errors": self.errors(),
            "status_errors": r.status_errors,
            "transport_errors": r.transport_errors,
            "timeouts": r.timeouts,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "rps": self.per_sec(self.requests()),
            "ok_rps": self.per_sec(r.ok),
            "body_bytes": r.body_bytes,
            "statuses": statuses,
            "latency_us": self.latency.map(Percentiles::to_json),
            "ttfb_us": self.ttfb.map(Percentiles::to_json),
            "first_error": r.first_error,
        })
        .to_string()
    }

    pub fn to_text(&self) -> String {
        let r = &self.results;
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = writeln!(
            out,
            "requests {}  ok {}  errors {} (status {}, transport {}, timeout {})",
            self.requests(),
            r.ok,
            self.errors(),
            r.status_errors,
            r.transport_errors,
            r.timeouts
        );
        let _ = writeln!(
            out,
            "elapsed {:.3}s  {:.1} req/s  ({:.1} ok/s)  body {} bytes",
            self.elapsed.as_secs_f64(),
            self.per_sec(self.requests()),
            self.per_sec(r.ok),
            r.body_bytes
        );
        let statuses: Vec<String> = r.statuses.iter().map(|(s, n)| format!("{s}:{n}")).collect();
        let _ = writeln!(out, "statuses {}", statuses.join(" "));
        for (name, p) in [("latency", self.latency), ("ttfb", self.ttfb)] {
            if let Some(p) = p {
                let _ = writeln!(
                    out,
                    "{name:<8} us  p50 {}  p90 {}  p99 {}  max {}  mean {}",
                    p.p50, p.p90, p.p99, p.max, p.mean
                );
            }
        }
        if let Some(err) = &r.first_error {
            let _ = writeln!(out, "first transport error: {err}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::Percentiles;

    #[test]
    fn nearest_rank_percentiles() {
        let p = Percentiles::of((1..=100).rev().collect()).expect("non-empty");
        assert_eq!((p.p50, p.p90, p.p99, p.max, p.mean), (50, 90, 99, 100, 50));
        let one = Percentiles::of(vec![7]).expect("non-empty");
        assert_eq!((one.p50, one.p99, one.max), (7, 7, 7));
        assert!(Percentiles::of(Vec::new()).is_none());
    }
}
