//! Prometheus counters, kept as atomics so recording costs no lock.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use cxmpute_store::Service;

use crate::pools::Pools;

/// Upper bounds (ms) of the latency histogram buckets.
const BUCKETS_MS: [u64; 12] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 5000, 30000];
const SERVICES: usize = 4;
/// Status classes we count: 2xx, 4xx, 5xx.
const CLASSES: usize = 3;

#[derive(Default)]
pub struct Metrics {
    requests: [[AtomicU64; CLASSES]; SERVICES],
    latency_buckets: [[AtomicU64; BUCKETS_MS.len()]; SERVICES],
    latency_sum_ms: [AtomicU64; SERVICES],
    retries: AtomicU64,
    cancelled: AtomicU64,
    input_tokens: [AtomicU64; SERVICES],
    output_tokens: [AtomicU64; SERVICES],
    links_opened: AtomicU64,
    links_closed: AtomicU64,
}

fn idx(service: Service) -> usize {
    match service {
        Service::Chat => 0,
        Service::Embeddings => 1,
        Service::Speech => 2,
        Service::Scrape => 3,
    }
}

impl Metrics {
    pub fn record(&self, service: Service, status: u16, latency_ms: u64, input: u64, output: u64) {
        let s = idx(service);
        let class = match status {
            200..=399 => 0,
            400..=499 => 1,
            _ => 2,
        };
        self.requests[s][class].fetch_add(1, Ordering::Relaxed);
        if let Some(b) = BUCKETS_MS.iter().position(|le| latency_ms <= *le) {
            self.latency_buckets[s][b].fetch_add(1, Ordering::Relaxed);
        }
        self.latency_sum_ms[s].fetch_add(latency_ms, Ordering::Relaxed);
        self.input_tokens[s].fetch_add(input, Ordering::Relaxed);
        self.output_tokens[s].fetch_add(output, Ordering::Relaxed);
    }

    pub fn retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    pub fn cancelled(&self) {
        self.cancelled.fetch_add(1, Ordering::Relaxed);
    }

    pub fn link_opened(&self) {
        self.links_opened.fetch_add(1, Ordering::Relaxed);
    }

    pub fn link_closed(&self) {
        self.links_closed.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self, pools: &Pools) -> String {
        let mut out = String::with_capacity(4096);
        let classes = ["2xx", "4xx", "5xx"];
        out.push_str("# HELP cxmpute_requests_total API requests by service and status class.\n# TYPE cxmpute_requests_total counter\n");
        for service in Service::ALL {
            for (c, class) in classes.iter().enumerate() {
                let v = self.requests[idx(service)][c].load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "cxmpute_requests_total{{service=\"{service}\",status=\"{class}\"}} {v}"
                );
            }
        }
        out.push_str("# HELP cxmpute_request_duration_ms Time to the end of the answer.\n# TYPE cxmpute_request_duration_ms histogram\n");
        for service in Service::ALL {
            let s = idx(service);
            let mut cumulative = 0;
            for (b, le) in BUCKETS_MS.iter().enumerate() {
                cumulative += self.latency_buckets[s][b].load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "cxmpute_request_duration_ms_bucket{{service=\"{service}\",le=\"{le}\"}} {cumulative}"
                );
            }
            let count: u64 = self.requests[s].iter().map(|a| a.load(Ordering::Relaxed)).sum();
            let _ = writeln!(
                out,
                "cxmpute_request_duration_ms_bucket{{service=\"{service}\",le=\"+Inf\"}} {count}"
            );
            let _ = writeln!(
                out,
                "cxmpute_request_duration_ms_sum{{service=\"{service}\"}} {}",
                self.latency_sum_ms[s].load(Ordering::Relaxed)
            );
            let _ = writeln!(
                out,
                "cxmpute_request_duration_ms_count{{service=\"{service}\"}} {count}"
            );
        }
        out.push_str("# TYPE cxmpute_tokens_total counter\n");
        for service in Service::ALL {
            let s = idx(service);
            let _ = writeln!(
                out,
                "cxmpute_tokens_total{{service=\"{service}\",direction=\"input\"}} {}",
                self.input_tokens[s].load(Ordering::Relaxed)
            );
            let _ = writeln!(
                out,
                "cxmpute_tokens_total{{service=\"{service}\",direction=\"output\"}} {}",
                self.output_tokens[s].load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# TYPE cxmpute_retries_total counter\ncxmpute_retries_total {}",
            self.retries.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE cxmpute_cancelled_total counter\ncxmpute_cancelled_total {}",
            self.cancelled.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE cxmpute_links_opened_total counter\ncxmpute_links_opened_total {}",
            self.links_opened.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE cxmpute_links_closed_total counter\ncxmpute_links_closed_total {}",
            self.links_closed.load(Ordering::Relaxed)
        );
        out.push_str("# HELP cxmpute_provisions Live provisions per pool.\n# TYPE cxmpute_provisions gauge\n");
        for (service, model, n) in pools.summary() {
            let model = model.replace('\\', "\\\\").replace('"', "\\\"");
            let _ = writeln!(out, "cxmpute_provisions{{service=\"{service}\",model=\"{model}\"}} {n}");
        }
        out
    }
}
