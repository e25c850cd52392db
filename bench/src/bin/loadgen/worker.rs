//! One load worker: a keep-alive HTTP/1.1 connection and a request loop.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{Budget, Target};

/// Per-worker measurements, merged at the end (no shared state on the hot path).
#[derive(Default)]
pub struct Results {
    /// Total time of each 2xx request, in microseconds.
    pub latencies_us: Vec<u64>,
    /// Time to the first non-empty body chunk of each 2xx request (`--stream`).
    pub ttfb_us: Vec<u64>,
    pub ok: u64,
    pub status_errors: u64,
    pub transport_errors: u64,
    pub timeouts: u64,
    pub body_bytes: u64,
    pub statuses: BTreeMap<u16, u64>,
    /// First transport error message, to make a failing run diagnosable.
    pub first_error: Option<String>,
}

impl Results {
    pub fn merge(&mut self, other: Results) {
        self.latencies_us.extend(other.latencies_us);
        self.ttfb_us.extend(other.ttfb_us);
        self.ok += other.ok;
        self.status_errors += other.status_errors;
        self.transport_errors += other.transport_errors;
        self.timeouts += other.timeouts;
        self.body_bytes += other.body_bytes;
        for (status, n) in other.statuses {
            *self.statuses.entry(status).or_default() += n;
        }
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

struct Sample {
    status: StatusCode,
    total: Duration,
    ttfb: Option<Duration>,
    body_bytes: u64,
}

pub struct Worker {
    target: Arc<Target>,
    conn: Option<SendRequest<Full<Bytes>>>,
    results: Results,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Worker {
    pub fn new(target: Arc<Target>) -> Self {
        Self {
            target,
            conn: None,
            results: Results::default(),
        }
    }

    pub fn into_results(self) -> Results {
        self.results
    }

    /// Sends requests until `budget` is spent; records them if `record`.
    pub async fn run(&mut self, budget: &Budget, record: bool) {
        loop {
            if budget.deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            if budget.claimed.fetch_add(1, Ordering::Relaxed) >= budget.limit {
                break;
            }
            let outcome = tokio::time::timeout(self.target.timeout, self.one()).await;
            if !matches!(outcome, Ok(Ok(_))) {
                // The connection is in an unknown state (or gone): start afresh.
                self.conn = None;
            }
            if !record {
                continue;
            }
            let r = &mut self.results;
            match outcome {
                Ok(Ok(sample)) => {
                    *r.statuses.entry(sample.status.as_u16()).or_default() += 1;
                    r.body_bytes += sample.body_bytes;
                    if sample.status.is_success() {
                        r.ok += 1;
                        r.latencies_us.push(micros(sample.total));
                        if let Some(ttfb) = sample.ttfb {
                            r.ttfb_us.push(micros(ttfb));
                        }
                    } else {
                        r.status_errors += 1;
                    }
                }
                Ok(Err(err)) => {
                    r.transport_errors += 1;
                    r.first_error.get_or_insert_with(|| format!("{err:#}"));
                }
                Err(_) => r.timeouts += 1,
            }
        }
    }

    /// A ready sender, reusing the keep-alive connection when it is still open.
    async fn sender(&mut self) -> anyhow::Result<&mut SendRequest<Full<Bytes>>> {
        if let Some(conn) = &mut self.conn {
            // A server may close an idle connection; that is not an error of
            // this request, so fall through and reconnect.
            if conn.ready().await.is_err() {
                self.conn = None;
            }
        }
        if self.conn.is_none() {
            let tcp = TcpStream::connect(&self.target.authority).await?;
            tcp.set_nodelay(true)?;
            let (sender, conn) = http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(async move {
                // Errors surface through `send_request`; nothing to do here.
                let _ = conn.await;
            });
            self.conn = Some(sender);
        }
        self.conn.as_mut().ok_or_else(|| anyhow::anyhow!("no connection"))
    }

    async fn one(&mut self) -> anyhow::Result<Sample> {
        let start = Instant::now();
        let target = Arc::clone(&self.target);
        let mut req = Request::builder()
            .method(target.method.clone())
            .uri(target.uri.clone())
            .body(Full::new(target.body.clone()))?;
        *req.headers_mut() = target.headers.clone();
        let resp = self.sender().await?.send_request(req).await?;
        let status = resp.status();
        let mut body = resp.into_body();
        let mut ttfb = None;
        let mut body_bytes = 0u64;
        // Read frame by frame rather than collecting: nothing is buffered and
        // the first data frame gives the time to first byte.
        while let Some(frame) = body.frame().await {
            if let Some(data) = frame?.data_ref() {
                if ttfb.is_none() && !data.is_empty() {
                    ttfb = Some(start.elapsed());
                }
                body_bytes += data.len() as u64;
            }
        }
        Ok(Sample {
            status,
            total: start.elapsed(),
            ttfb: ttfb.filter(|_| target.stream),
            body_bytes,
        })
    }
}
