//! `cxmpute up`: the whole platform on one machine — a gateway on an embedded
//! SQLite file and a provider node with the built-in engines, linked together.
//! Prints a working API key and an example call, and writes them to
//! `.cxmpute/quickstart.env`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use cxmpute_gateway::auth::{self, KeyOptions};
use cxmpute_gateway::{Config, Gateway};
use cxmpute_provider::NodeConfig;
use cxmpute_store::Store;
use tokio_util::sync::CancellationToken;

// Allocation is on every request's path (decision 48, docs/decisions.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "cxmpute", version, about = "cxmpute: pooled AI compute")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a gateway and a provider node locally and print an API key.
    Up {
        /// Gateway port on 127.0.0.1.
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Where the database and credentials live.
        #[arg(long, default_value = ".cxmpute")]
        data_dir: PathBuf,
        /// An OpenAI-compatible server (vLLM, llama.cpp, LM Studio…) the node also serves.
        #[arg(long)]
        upstream: Option<String>,
        /// Do not start the built-in scraper.
        #[arg(long)]
        no_scrape: bool,
        /// Do not fetch or serve the built-in chat model (gemma-3-270m, 253 MB).
        #[arg(long)]
        no_chat: bool,
        /// Do not fetch or serve the built-in voice (piper-en-us-joe-medium, 63 MB,
        /// plus ONNX Runtime, 35 MB; needs the espeak-ng program).
        #[arg(long)]
        no_speech: bool,
    },
}

/// Credits given to the quickstart account: 10 USD.
const QUICKSTART_CREDITS: i64 = 10_000_000_000;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CXMPUTE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let Command::Up {
        port,
        data_dir,
        upstream,
        no_scrape,
        no_chat,
        no_speech,
    } = Cli::parse().command;
    let engines = Builtins {
        scrape: !no_scrape,
        chat: !no_chat,
        speech: !no_speech,
    };
    match up(port, &data_dir, upstream, engines).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Which built-in engines the quickstart node runs (embeddings always).
struct Builtins {
    scrape: bool,
    chat: bool,
    speech: bool,
}

/// Fetches the voice and ONNX Runtime; speech is optional in the quickstart, so
/// anything missing turns it off with a message saying how to get it.
async fn prepare_speech() -> Option<PathBuf> {
    let fetched = tokio::task::spawn_blocking(|| -> anyhow::Result<PathBuf> {
        let dir = cxmpute_provider::models::ensure_piper(|m| eprintln!("[model] {m}"))?;
        cxmpute_provider::models::ensure_onnxruntime(|m| eprintln!("[model] {m}"))?;
        cxmpute_provider::engines::piper::phonemes::Espeak::find("en-us")?;
        Ok(dir)
    })
    .await;
    match fetched {
        Ok(Ok(dir)) => Some(dir),
        Ok(Err(e)) => {
            eprintln!("[speech] off: {e:#}");
            None
        }
        Err(_) => None,
    }
}

async fn up(port: u16, data_dir: &Path, upstream: Option<String>, engines: Builtins) -> anyhow::Result<()> {
    std::fs::create_dir_all(data_dir).with_context(|| format!("cannot create {}", data_dir.display()))?;
    let model_dir =
        tokio::task::spawn_blocking(|| cxmpute_provider::models::ensure_minilm(|m| eprintln!("[model] {m}")))
            .await
            .context("model fetch panicked")??;
    let chat_model = if !engines.chat {
        None
    } else {
        let file = tokio::task::spawn_blocking(|| cxmpute_provider::models::ensure_gemma(|m| eprintln!("[model] {m}")))
            .await
            .context("model fetch panicked")??;
        Some(file)
    };
    let voice = if engines.speech { prepare_speech().await } else { None };

    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("port {port} is busy: pass --port to use another"))?;
    let addr = listener.local_addr()?;
    let base = format!("http://{addr}");
    let db = data_dir.join("gateway.db");
    let config = Config {
        listen: addr,
        database_url: format!("sqlite://{}", db.display()),
        ..Config::default()
    };
    let gateway = Gateway::open(config).await?;
    let store = gateway.store();
    let (api_key, credential) = bootstrap(store.as_ref(), data_dir).await?;
    let state = gateway.state().clone();

    let stop = CancellationToken::new();
    let gw_stop = stop.clone();
    let gw = tokio::spawn(gateway.serve(listener, async move { gw_stop.cancelled().await }));

    let node_config = NodeConfig {
        gateway: base.clone(),
        credential: Some(credential),
        upstream,
        embeddings_model_dir: Some(model_dir),
        chat: engines.chat,
        chat_model_dir: chat_model,
        speech: voice.is_some(),
        speech_model_dir: voice,
        scrape: engines.scrape,
        ..NodeConfig::default()
    };
    let node_stop = CancellationToken::new();
    let node = tokio::spawn(cxmpute_provider::node::run(node_config, node_stop.clone()));

    let started = Instant::now();
    while state.pools.summary().is_empty() {
        if node.is_finished() {
            return match node.await {
                Ok(Err(e)) => Err(e.context("the provider node failed to start")),
                _ => Err(anyhow::anyhow!("the provider node stopped during start-up")),
            };
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "the node did not link within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let env_file = data_dir.join("quickstart.env");
    write_private(
        &env_file,
        &format!("CXMPUTE_BASE_URL={base}/v1\nCXMPUTE_API_KEY={api_key}\n"),
    )?;
    println!();
    println!("cxmpute is up: gateway {base}, one provider node linked.");
    for (service, model, n) in state.pools.summary() {
        println!("  {service:<10} {model}  ({n} provider)");
    }
    println!();
    println!("API key (also in {}):", env_file.display());
    println!("  {api_key}");
    println!();
    println!("Try it:");
    println!(
        "  curl {base}/v1/embeddings -H \"Authorization: Bearer {api_key}\" -H 'Content-Type: application/json' \\"
    );
    println!("    -d '{{\"model\":\"all-minilm-l6-v2\",\"input\":\"The weather is lovely today.\"}}'");
    let offered = |service: &str| state.pools.summary().into_iter().any(|(s, _, _)| s.as_str() == service);
    if offered("speech") {
        println!(
            "  curl {base}/v1/audio/speech -H \"Authorization: Bearer {api_key}\" -H 'Content-Type: application/json' \\"
        );
        println!(
            "    -d '{{\"model\":\"{}\",\"voice\":\"joe\",\"input\":\"Hello from cxmpute.\"}}' -o hello.mp3",
            cxmpute_provider::models::PIPER_ID
        );
    }
    if engines.chat {
        println!(
            "  curl {base}/v1/chat/completions -H \"Authorization: Bearer {api_key}\" -H 'Content-Type: application/json' \\"
        );
        println!(
            "    -d '{{\"model\":\"{}\",\"max_tokens\":40,\"messages\":[{{\"role\":\"user\",\"content\":\"What is the capital of France?\"}}]}}'",
            cxmpute_provider::models::GEMMA_ID
        );
    }
    println!();
    println!("Web dashboard: {base}/login (no mail server here: login codes appear in this log).");
    println!("OpenAI SDKs: base_url={base}/v1, api_key as above. Ctrl-C stops.");

    tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")?;
    eprintln!("stopping…");
    node_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(35), node).await;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), gw).await;
    Ok(())
}

/// Creates (first run) or reuses the quickstart account, key and device.
async fn bootstrap(store: &dyn Store, data_dir: &Path) -> anyhow::Result<(String, String)> {
    let saved = data_dir.join("quickstart.secrets");
    if let Ok(text) = std::fs::read_to_string(&saved) {
        let mut lines = text.lines();
        if let (Some(key), Some(cred)) = (lines.next(), lines.next()) {
            let key_ok = match auth::parse_key(key) {
                Some(p) => store.key_auth(p.id).await?.is_some_and(|a| a.key.revoked_at.is_none()),
                None => false,
            };
            let device_ok = match cred.split_once('.') {
                Some((id, _)) => store.device(id).await?.is_some(),
                None => false,
            };
            if key_ok && device_ok {
                return Ok((key.to_string(), cred.to_string()));
            }
        }
    }
    let account = store.create_account("quickstart", None).await?;
    store
        .deposit(&account.id, QUICKSTART_CREDITS, Some("quickstart credits"))
        .await?;
    let (_, key) = auth::create_key(
        store,
        &account.id,
        KeyOptions {
            name: Some("quickstart".into()),
            ..KeyOptions::default()
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!(e.message))?;
    let (_, credential) = auth::create_device(store, &account.id, "quickstart-node")
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?;
    write_private(&saved, &format!("{key}\n{credential}\n"))?;
    Ok((key, credential))
}

/// Writes a file only its owner can read: it holds secrets.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}
