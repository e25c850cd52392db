//! Runs the deterministic fake OpenAI-compatible server from
//! `cxmpute-testkit` as a process: the benchmark's baseline and a stand-in
//! upstream for manual runs of a provider node.

use std::io::Write as _;
use std::time::Duration;

use clap::Parser;
use cxmpute_testkit::{FakeOptions, FakeUpstream};

#[derive(Parser, Debug)]
#[command(about = "Deterministic fake OpenAI-compatible upstream on 127.0.0.1")]
struct Args {
    /// Port to listen on (0 picks a free one; the chosen port is printed).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Delay before each generated token, in milliseconds.
    #[arg(long, default_value_t = 0)]
    token_delay_ms: u64,
    /// Chat model ids to serve (repeatable; default "fake-chat").
    #[arg(long = "model")]
    models: Vec<String>,
    /// Embedding model ids to serve (repeatable; default "fake-embed").
    #[arg(long = "embedding-model")]
    embedding_models: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut opts = FakeOptions {
        token_delay: Duration::from_millis(args.token_delay_ms),
        ..FakeOptions::default()
    };
    if !args.models.is_empty() {
        opts.models = args.models;
    }
    if !args.embedding_models.is_empty() {
        opts.embedding_models = args.embedding_models;
    }
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port)).await?;
    let upstream = FakeUpstream::start_on(listener, opts).await?;
    // Scripts wait for this line to learn the port, so flush it right away
    // even when stdout is a pipe.
    println!("listening on http://{}", upstream.addr);
    std::io::stdout().flush()?;
    tokio::signal::ctrl_c().await?;
    Ok(())
}
