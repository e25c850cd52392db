//! A lean HTTP/1.1 load generator for the gateway and its baseline.
//!
//! Each worker owns one keep-alive connection (raw `hyper` http1, TCP_NODELAY)
//! and sends requests back to back, so the tool adds as little overhead as
//! possible to what it measures. The run is always bounded by `--requests`
//! and/or `--duration-secs`, and every request by `--timeout-secs`.

mod report;
mod worker;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use clap::Parser;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, HOST};
use http::{HeaderMap, Method, Uri};

/// Longest run we allow; keeps a mistyped flag from hammering a box for hours.
const MAX_DURATION_SECS: u64 = 3600;

#[derive(Parser, Debug)]
#[command(about = "HTTP/1.1 load generator (one keep-alive connection per worker)")]
struct Args {
    /// Target URL, plain http (e.g. http://127.0.0.1:8080/v1/chat/completions).
    #[arg(long)]
    url: String,
    /// Extra header "Name: value"; repeatable (e.g. "Authorization: Bearer k").
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// Request body (JSON); makes the request a POST.
    #[arg(long, conflicts_with = "body_file")]
    body: Option<String>,
    /// Read the request body from a file; makes the request a POST.
    #[arg(long)]
    body_file: Option<std::path::PathBuf>,
    /// Override the method (default: POST with a body, GET without).
    #[arg(long)]
    method: Option<String>,
    /// Concurrent workers, each with its own connection.
    #[arg(long, short = 'c', default_value_t = 16)]
    concurrency: usize,
    /// Measured requests in total (default 1000 unless --duration-secs is set).
    #[arg(long, short = 'n')]
    requests: Option<u64>,
    /// Stop starting requests after this many seconds.
    #[arg(long)]
    duration_secs: Option<u64>,
    /// Unmeasured requests sent first (to open connections and warm caches).
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// Also measure time to the first body byte (for streamed responses).
    #[arg(long)]
    stream: bool,
    /// Per-request timeout, counted as an error when hit.
    #[arg(long, default_value_t = 30)]
    timeout_secs: u64,
    /// Runtime worker threads (default: number of CPUs).
    #[arg(long)]
    threads: Option<usize>,
    /// Print the results as one JSON line instead of text.
    #[arg(long)]
    json: bool,
}

/// Everything a worker needs to build and send requests.
pub struct Target {
    pub authority: String,
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub stream: bool,
    pub timeout: Duration,
}

/// Shared budget: workers claim request numbers until it is exhausted.
pub struct Budget {
    pub claimed: AtomicU64,
    pub limit: u64,
    pub deadline: Option<Instant>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = args.threads {
        rt.worker_threads(threads.max(1));
    }
    let rt = rt.enable_all().build()?;
    let json = args.json;
    let report = rt.block_on(run(args))?;
    if json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<report::Report> {
    if args.concurrency == 0 || args.concurrency > 10_000 {
        bail!("--concurrency must be in 1..=10000");
    }
    if args.duration_secs.is_some_and(|s| s == 0 || s > MAX_DURATION_SECS) {
        bail!("--duration-secs must be in 1..={MAX_DURATION_SECS}");
    }
    let target = Arc::new(build_target(&args)?);
    let limit = match (args.requests, args.duration_secs) {
        (Some(n), _) => n,
        (None, Some(_)) => u64::MAX,
        (None, None) => 1000,
    };

    let warmup = Arc::new(Budget {
        claimed: AtomicU64::new(0),
        limit: args.warmup,
        deadline: None,
    });
    // Workers connect and run the warmup, then meet at `ready`; the measured
    // budget (and its deadline) is only created afterwards, so warmup time
    // does not eat into --duration-secs. `go` then starts every worker.
    let ready = Arc::new(tokio::sync::Barrier::new(args.concurrency + 1));
    let go = Arc::new(tokio::sync::Barrier::new(args.concurrency + 1));
    let measured = Arc::new(std::sync::OnceLock::new());
    let mut tasks = Vec::with_capacity(args.concurrency);
    for _ in 0..args.concurrency {
        let (target, warmup, measured) = (target.clone(), warmup.clone(), measured.clone());
        let (ready, go) = (ready.clone(), go.clone());
        tasks.push(tokio::spawn(async move {
            let mut worker = worker::Worker::new(target);
            worker.run(&warmup, false).await;
            ready.wait().await;
            go.wait().await;
            let budget: &Budget = measured.get().expect("set between the two barriers");
            worker.run(budget, true).await;
            worker.into_results()
        }));
    }
    ready.wait().await;
    measured
        .set(Budget {
            claimed: AtomicU64::new(0),
            limit,
            deadline: args.duration_secs.map(|s| Instant::now() + Duration::from_secs(s)),
        })
        .ok()
        .context("measured budget set twice")?;
    go.wait().await;
    let started = Instant::now();
    let mut results = worker::Results::default();
    for task in tasks {
        results.merge(task.await.context("worker panicked")?);
    }
    Ok(report::Report::new(results, started.elapsed(), args.stream))
}

fn build_target(args: &Args) -> anyhow::Result<Target> {
    let uri: Uri = args.url.parse().context("invalid --url")?;
    if uri.scheme_str() != Some("http") {
        bail!("only http:// URLs are supported");
    }
    let authority = uri.authority().context("--url has no host")?.to_string();
    let authority = if uri.port().is_some() {
        authority
    } else {
        format!("{authority}:80")
    };
    let body = match (&args.body, &args.body_file) {
        (Some(body), _) => Bytes::from(body.clone()),
        (None, Some(path)) => Bytes::from(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?),
        (None, None) => Bytes::new(),
    };
    let method = match &args.method {
        Some(m) => Method::from_bytes(m.as_bytes()).context("invalid --method")?,
        None if body.is_empty() => Method::GET,
        None => Method::POST,
    };
    let mut headers = HeaderMap::new();
    for raw in &args.headers {
        let (name, value) = raw
            .split_once(':')
            .with_context(|| format!("header {raw:?} lacks ':'"))?;
        let name = HeaderName::from_bytes(name.trim().as_bytes()).context("invalid header name")?;
        let value = HeaderValue::from_str(value.trim()).context("invalid header value")?;
        headers.append(name, value);
    }
    if !headers.contains_key(HOST) {
        let host = uri.authority().context("--url has no host")?.as_str();
        headers.insert(HOST, HeaderValue::from_str(host).context("invalid host")?);
    }
    if !body.is_empty() && !headers.contains_key(CONTENT_TYPE) {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    // http1 connections only want the path in the request line.
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    Ok(Target {
        authority,
        method,
        uri: path.parse().context("invalid path")?,
        headers,
        body,
        stream: args.stream,
        timeout: Duration::from_secs(args.timeout_secs.max(1)),
    })
}
