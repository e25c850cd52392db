//! The credit path of one API request, alone: a hold, then its settlement,
//! against a real store (a SQLite file in a temporary folder, or PostgreSQL),
//! from `--concurrency` tasks at once. No HTTP: this isolates what the store
//! costs per request, which the full benchmark (`bench/run.sh`) cannot
//! separate from the two HTTP hops around it.
//!
//! Reports requests/s, the latency of hold + settle, and the process's CPU
//! time per request (and the SQLite credit writer thread's share; the kernel
//! counts CPU time in 10 ms ticks, so runs should last seconds). Every run
//! also checks its result: the account paid exactly what the ledger says.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;
use cxmpute_store::conformance::{account_with, device_of, hold_of, key_of, usage_of};
use cxmpute_store::{HoldOutcome, LedgerKind, SettleOutcome, Store};

#[derive(Parser, Debug)]
#[command(about = "Hold and settle requests against a real store; CPU and latency per request")]
struct Args {
    /// Store URL; default a new SQLite file in a temporary folder.
    #[arg(long)]
    url: Option<String>,
    /// Tasks running hold + settle back to back.
    #[arg(long, short = 'c', default_value_t = 64)]
    concurrency: usize,
    /// Measured requests in total.
    #[arg(long, short = 'n', default_value_t = 20_000)]
    requests: usize,
    /// Accounts the requests are spread over (each with its own key).
    #[arg(long, default_value_t = 1)]
    accounts: usize,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

const COST: i64 = 7;
const REWARD: i64 = 5;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.concurrency == 0 || args.requests == 0 || args.accounts == 0 {
        bail!("--concurrency, --requests and --accounts must be at least 1");
    }
    if args.requests > 10_000_000 {
        bail!("--requests is capped at 10,000,000");
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?
        .block_on(bench(args))
}

async fn bench(args: Args) -> anyhow::Result<()> {
    let folder = std::env::temp_dir().join(format!("cxmpute-store-bench-{}", std::process::id()));
    let url = match &args.url {
        Some(url) => url.clone(),
        None => {
            std::fs::create_dir_all(&folder)?;
            format!("sqlite://{}", folder.join("bench.db").display())
        }
    };
    let result = run(&args, &url).await;
    if args.url.is_none() {
        let _ = std::fs::remove_dir_all(&folder);
    }
    result
}

async fn run(args: &Args, url: &str) -> anyhow::Result<()> {
    let store = cxmpute_store::connect(url).await.context("open the store")?;
    let s: &dyn Store = store.as_ref();
    let tag = format!("{:x}", std::process::id());
    let provider = account_with(s, &format!("bench provider {tag}"), 0).await;
    let device = device_of(s, &provider, &format!("bench-device-{tag}")).await;
    // Enough for every request's charge, and for the holds of all tasks at once.
    let warmup = args.concurrency.max(64);
    let start_balance = ((args.requests + warmup) as i64) * COST + (args.concurrency as i64) * COST * 2;
    let mut keys = Vec::new();
    for i in 0..args.accounts {
        let account = account_with(s, &format!("bench user {tag} {i}"), start_balance).await;
        keys.push(key_of(s, &account, &format!("bench-key-{tag}-{i}"), None).await);
    }
    let keys = Arc::new(keys);
    let device = Arc::new(device);

    // Warm-up: caches, prepared statements, the WAL.
    drive(
        &store,
        &keys,
        &device,
        warmup,
        args.concurrency.min(warmup),
        &format!("w{tag}"),
    )
    .await?;

    let cpu_before = Cpu::now();
    let began = Instant::now();
    let mut latencies = drive(
        &store,
        &keys,
        &device,
        args.requests,
        args.concurrency,
        &format!("m{tag}"),
    )
    .await?;
    let wall = began.elapsed();
    let cpu = Cpu::now().since(&cpu_before);

    // The result must be right, or the figures mean nothing.
    let done = (warmup + args.requests) as i64;
    let mut charged = 0;
    for key in keys.iter() {
        charged -= s.ledger_sum(&key.account_id, LedgerKind::Charge).await?;
    }
    let rewarded = s.ledger_sum(&provider.id, LedgerKind::Reward).await?;
    if charged != done * COST || rewarded != done * REWARD {
        bail!("ledger disagrees: charged {charged}, rewarded {rewarded} for {done} requests");
    }

    latencies.sort_unstable();
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6;
    let n = args.requests as f64;
    println!(
        "{} c={} n={} accounts={}: {:.0} requests/s, hold+settle p50 {:.0} µs p99 {:.0} µs, \
         CPU {:.1} µs/request (credit writer thread {:.1} µs)",
        store.backend(),
        args.concurrency,
        args.requests,
        args.accounts,
        n / wall.as_secs_f64(),
        pct(0.5),
        pct(0.99),
        cpu.process.as_secs_f64() * 1e6 / n,
        cpu.writer.as_secs_f64() * 1e6 / n,
    );
    Ok(())
}

/// Runs `total` hold + settle pairs from `concurrency` tasks; returns each pair's time.
async fn drive(
    store: &Arc<dyn Store>,
    keys: &Arc<Vec<cxmpute_store::ApiKey>>,
    device: &Arc<cxmpute_store::Device>,
    total: usize,
    concurrency: usize,
    prefix: &str,
) -> anyhow::Result<Vec<Duration>> {
    let mut tasks = Vec::with_capacity(concurrency);
    for t in 0..concurrency {
        let (store, keys, device) = (store.clone(), keys.clone(), device.clone());
        let count = total / concurrency + usize::from(t < total % concurrency);
        let prefix = format!("{prefix}_");
        tasks.push(tokio::spawn(async move {
            let mut times = Vec::with_capacity(count);
            for i in 0..count {
                let key = &keys[(t + i) % keys.len()];
                // Time-ordered, as the gateway makes them.
                let request_id = cxmpute_store::ids::new_sorted_id(&prefix);
                let began = Instant::now();
                let held = store.hold(hold_of(&request_id, key, COST * 2)).await?;
                if held != HoldOutcome::Held {
                    bail!("hold refused: {held:?}");
                }
                let settled = store
                    .settle(usage_of(&request_id, key, COST, REWARD, Some(&device)))
                    .await?;
                if settled != SettleOutcome::Settled {
                    bail!("settle: {settled:?}");
                }
                times.push(began.elapsed());
            }
            Ok(times)
        }));
    }
    let mut all = Vec::with_capacity(total);
    for task in tasks {
        all.extend(task.await.context("bench task")??);
    }
    Ok(all)
}

/// CPU time of this process, and of its SQLite credit writer thread.
struct Cpu {
    process: Duration,
    writer: Duration,
}

impl Cpu {
    fn now() -> Cpu {
        let mut writer = Duration::ZERO;
        if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
            for task in tasks.flatten() {
                let dir: PathBuf = task.path();
                let named = std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim() == "cxmpute-credits");
                if named {
                    writer += ticks(&dir.join("stat"));
                }
            }
        }
        Cpu {
            process: ticks(std::path::Path::new("/proc/self/stat")),
            writer,
        }
    }

    fn since(&self, before: &Cpu) -> Cpu {
        Cpu {
            process: self.process.saturating_sub(before.process),
            writer: self.writer.saturating_sub(before.writer),
        }
    }
}

/// utime + stime of a `/proc/…/stat` file (zero where there is none).
fn ticks(stat: &std::path::Path) -> Duration {
    let Ok(text) = std::fs::read_to_string(stat) else {
        return Duration::ZERO;
    };
    // Fields after the command name (which is in parentheses and may hold spaces).
    let Some(rest) = text.rsplit_once(')').map(|(_, rest)| rest) else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the file; the state (field 3) is
    // the first after the name.
    let tick = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // The kernel's USER_HZ is 100 on every Linux we run on.
    Duration::from_millis((tick(11) + tick(12)) * 10)
}
