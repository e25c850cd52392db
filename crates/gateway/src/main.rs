//! `cxmpute-gateway`: `serve` runs the gateway; `admin …` works directly on its
//! database (accounts, credits, API keys, provider devices).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use cxmpute_gateway::auth::{self, KeyOptions};
use cxmpute_gateway::Config;

// Allocation is on every request's path (decision 48, docs/decisions.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "cxmpute-gateway", version, about = "The cxmpute gateway")]
struct Cli {
    /// TOML configuration file (see docs/configuration.md).
    #[arg(long, global = true, env = "CXMPUTE_CONFIG")]
    config: Option<PathBuf>,
    /// Database URL; overrides the file and CXMPUTE_DATABASE_URL.
    #[arg(long, global = true)]
    database_url: Option<String>,
    /// Log as JSON lines.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Address to listen on, e.g. 0.0.0.0:8080.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Operate on the database directly.
    #[command(subcommand)]
    Admin(Admin),
}

#[derive(Subcommand)]
enum Admin {
    #[command(subcommand)]
    Account(AccountCmd),
    #[command(subcommand)]
    Key(KeyCmd),
    #[command(subcommand)]
    Device(DeviceCmd),
}

#[derive(Subcommand)]
enum AccountCmd {
    /// Create an account and print its id.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        email: Option<String>,
    },
    List,
    /// Add credits (1 credit = 10⁻⁹ USD; 1 USD = 1,000,000,000 credits).
    Deposit {
        account: String,
        amount: i64,
        #[arg(long)]
        note: Option<String>,
    },
    Suspend {
        account: String,
        #[arg(long)]
        reason: String,
    },
    Unsuspend {
        account: String,
    },
}

#[derive(Subcommand)]
enum KeyCmd {
    /// Create an API key; the key is printed once and never stored in clear.
    Create(KeyArgs),
    List {
        account: String,
    },
    Revoke {
        key_id: String,
    },
}

#[derive(Args)]
struct KeyArgs {
    account: String,
    #[arg(long)]
    name: Option<String>,
    /// Most credits the key may spend.
    #[arg(long)]
    credit_limit: Option<i64>,
    /// Comma-separated: chat,embeddings,speech,scrape (default: all).
    #[arg(long, value_delimiter = ',')]
    services: Option<Vec<String>>,
    /// Requests per minute.
    #[arg(long)]
    rpm: Option<u32>,
}

#[derive(Subcommand)]
enum DeviceCmd {
    /// Register a provider device; prints the credential the node needs.
    Create {
        account: String,
        #[arg(long, default_value = "device")]
        name: String,
    },
    List {
        account: String,
    },
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CXMPUTE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    let outcome = load_config(&cli).and_then(|config| {
        let runtime = runtime(&config.database_url).context("cannot start the async runtime")?;
        runtime.block_on(real_main(cli, config))
    });
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The async runtime. On SQLite one core is left to the store's credit
/// writer thread, which applies every settlement (decision 61): one worker
/// thread per core but one, at least one. `TOKIO_WORKER_THREADS` sets
/// another count; on PostgreSQL there is no such thread and every core
/// gets a worker.
fn runtime(database_url: &str) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if database_url.starts_with("sqlite:") && std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        builder.worker_threads(cores.saturating_sub(1).max(1));
    }
    builder.enable_all().build()
}

fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let mut config = Config::load(cli.config.as_deref(), |k| std::env::var(k).ok())?;
    if let Some(url) = &cli.database_url {
        config.database_url = url.clone();
    }
    Ok(config)
}

async fn real_main(cli: Cli, mut config: Config) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { listen } => {
            if let Some(addr) = listen {
                config.listen = addr;
            }
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .with_context(|| format!("cannot listen on {}", config.listen))?;
            let addr = listener.local_addr()?;
            // The address actually bound (port 0 picks one): pages show it.
            config.listen = addr;
            tracing::info!(addr = %addr, config = ?config, "gateway starting");
            // The store first (migrations, the SQLite claim): a script that
            // waits for the line below may then use the database at once.
            let gateway = cxmpute_gateway::Gateway::open(config).await?;
            tracing::info!(addr = %addr, "gateway listening");
            // One machine-readable line for scripts and tests that bind port 0.
            println!("listening on http://{addr}");
            gateway.serve(listener, shutdown_signal()).await
        }
        Command::Admin(cmd) => admin(config, cmd).await,
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

async fn admin(config: Config, cmd: Admin) -> anyhow::Result<()> {
    let store = cxmpute_store::connect(&config.database_url).await?;
    let store = store.as_ref();
    let api = |e: cxmpute_gateway::error::ApiError| anyhow::anyhow!(e.message);
    match cmd {
        Admin::Account(AccountCmd::Create { name, email }) => {
            print_json(&store.create_account(&name, email.as_deref()).await?)
        }
        Admin::Account(AccountCmd::List) => print_json(&store.list_accounts().await?),
        Admin::Account(AccountCmd::Deposit { account, amount, note }) => {
            anyhow::ensure!(amount > 0, "the amount must be a positive number of credits");
            let balance = store.deposit(&account, amount, note.as_deref()).await?;
            println!("balance of {account}: {balance} credits");
            Ok(())
        }
        Admin::Account(AccountCmd::Suspend { account, reason }) => {
            store.set_suspended(&account, Some(&reason)).await?;
            store.delete_sessions_of(&account).await?;
            println!("{account} suspended");
            Ok(())
        }
        Admin::Account(AccountCmd::Unsuspend { account }) => {
            store.set_suspended(&account, None).await?;
            println!("{account} unsuspended");
            Ok(())
        }
        Admin::Key(KeyCmd::Create(a)) => {
            let opts = KeyOptions {
                name: a.name,
                credit_limit: a.credit_limit,
                allowed_services: a.services,
                rpm_limit: a.rpm,
            };
            let (key, secret) = auth::create_key(store, &a.account, opts).await.map_err(api)?;
            eprintln!("key id {} created; the key is shown only now:", key.id);
            println!("{secret}");
            Ok(())
        }
        Admin::Key(KeyCmd::List { account }) => print_json(&store.api_keys(&account).await?),
        Admin::Key(KeyCmd::Revoke { key_id }) => {
            anyhow::ensure!(store.revoke_api_key(&key_id).await?, "no key '{key_id}'");
            println!("{key_id} revoked");
            Ok(())
        }
        Admin::Device(DeviceCmd::Create { account, name }) => {
            let (id, credential) = auth::create_device(store, &account, &name).await.map_err(api)?;
            eprintln!("device {id} registered; its credential is shown only now:");
            println!("{credential}");
            Ok(())
        }
        Admin::Device(DeviceCmd::List { account }) => print_json(&store.devices(&account).await?),
    }
}
