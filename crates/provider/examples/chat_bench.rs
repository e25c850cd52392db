//! Tokens per second of the built-in chat engine: one stream alone, then N
//! streams at once (batched into the same decode steps).
//!
//! ```sh
//! scripts/fetch-model.sh gemma-3-270m
//! cargo run -p cxmpute-provider --example chat_bench -- [--streams 4] [--tokens 128] [--threads N] [--seed 7] [--greedy] [--json]
//! ```
//!
//! `--json` ends with one line of figures for `bench/chat.sh`, which compares
//! them with the same requests sent through the gateway.
//!
//! llama.cpp itself is always compiled optimised (its build script uses CMake's
//! Release mode), so a debug build of this example measures the same kernels.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cxmpute_protocol::openai::ChatRequest;
use cxmpute_protocol::parse::parse_json;
use cxmpute_provider::engines::llama::engine::Event;
use cxmpute_provider::engines::llama::params::ChatParams;
use cxmpute_provider::engines::llama::{ChatOptions, LlamaChat};
use cxmpute_provider::models;
use serde_json::json;

const PROMPTS: [&str; 4] = [
    "Write a long story about a lighthouse keeper.",
    "Explain how bread is made, step by step, in detail.",
    "Write a long essay about the history of sailing ships.",
    "Write a long letter to a friend about a trip to the mountains.",
];

struct Run {
    tokens: u32,
    /// Request sent → first text.
    first: Duration,
    /// Request sent → done.
    total: Duration,
}

/// How every request of a run is sampled.
#[derive(Clone, Copy)]
struct Sampling {
    temperature: f32,
    /// A fixed seed: the same text every run, and no early end-of-text from
    /// greedy loops. Builds whose kernels round differently (AVX2, AMX) can
    /// still reach end-of-text at different places for the same seed;
    /// `--seed` picks one where every answer runs to `--tokens` on both.
    seed: u32,
}

fn one(engine: &LlamaChat, prompt: &str, tokens: u32, sampling: Sampling) -> anyhow::Result<Run> {
    let body = json!({
        "model": models::GEMMA_ID,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens, "temperature": sampling.temperature, "seed": sampling.seed,
    });
    let req: ChatRequest = parse_json(body.to_string().as_bytes()).map_err(|e| anyhow::anyhow!(e.message))?;
    let params = ChatParams::from_request(&req).map_err(|e| anyhow::anyhow!(e.message))?;
    let started = Instant::now();
    let mut generation = engine.start(&req.messages, &params)?;
    let mut first = None;
    while let Some(event) = generation.events.blocking_recv() {
        match event {
            Event::Text(_) => {
                first.get_or_insert_with(|| started.elapsed());
            }
            Event::Done { completion_tokens, .. } => {
                let total = started.elapsed();
                return Ok(Run {
                    tokens: completion_tokens,
                    first: first.unwrap_or(total),
                    total,
                });
            }
            Event::Failed(e) => bail!("generation failed: {e}"),
        }
    }
    bail!("the engine stopped")
}

fn arg(name: &str, default: u32) -> anyhow::Result<u32> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .context("missing value")?
            .parse()
            .with_context(|| format!("{name} takes a number")),
        None => Ok(default),
    }
}

fn main() -> anyhow::Result<()> {
    let streams = arg("--streams", 4)?;
    let tokens = arg("--tokens", 128)?;
    let threads = arg("--threads", 0)?;
    // `--greedy` (temperature 0: a plain argmax, no sampler) separates the
    // cost of llama.cpp's decode from that of sampling over the vocabulary.
    let temperature = if std::env::args().any(|a| a == "--greedy") {
        0.0
    } else {
        0.8
    };
    let sampling = Sampling {
        temperature,
        seed: arg("--seed", 7)?,
    };
    let file = models::cached_gemma().context("gemma-3-270m is not cached: run scripts/fetch-model.sh")?;
    let options = ChatOptions {
        slots: streams.max(1),
        context_per_slot: 1024,
        threads: (threads > 0).then_some(threads),
        ..ChatOptions::default()
    };
    let started = Instant::now();
    let engine = Arc::new(LlamaChat::load(&file, options)?);
    println!("loaded {} in {:.2?}", file.display(), started.elapsed());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    println!(
        "cores: {cores}, threads: {}",
        if threads > 0 { threads as usize } else { cores }
    );

    // Warm up: first touches of the weights page them in.
    one(&engine, PROMPTS[0], 8, sampling)?;

    let single = one(&engine, PROMPTS[0], tokens, sampling)?;
    let decode = single.total.saturating_sub(single.first);
    println!(
        "1 stream:  {} tokens in {:.2?}  => {:.1} tokens/s overall, {:.1} tokens/s after the first (first token {:.0?})",
        single.tokens,
        single.total,
        f64::from(single.tokens) / single.total.as_secs_f64(),
        f64::from(single.tokens.saturating_sub(1)) / decode.as_secs_f64().max(1e-9),
        single.first,
    );

    let before = engine.step_times();
    let started = Instant::now();
    let runs: Vec<Run> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..streams as usize)
            .map(|i| {
                let engine = &engine;
                s.spawn(move || one(engine, PROMPTS[i % PROMPTS.len()], tokens, sampling))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("thread panicked"))))
            .collect::<anyhow::Result<Vec<Run>>>()
    })?;
    let wall = started.elapsed();
    for (i, run) in runs.iter().enumerate() {
        println!(
            "  stream {i}: {} tokens in {:.2?} (first token {:.0?})",
            run.tokens, run.total, run.first
        );
    }
    println!("  sequences moved to a lower id: {}", engine.sequences_moved());
    let steps = engine.step_times().since(before);
    let per_step = |d: Duration| d.as_secs_f64() * 1e3 / steps.steps.max(1) as f64;
    println!(
        "  engine thread: {} steps ({} with the node's output layer, {:.2} ms in it per such step), {:.2} ms decoding and {:.2} ms sampling per step ({:.1} % of the wall time in neither)",
        steps.steps,
        steps.head_steps,
        steps.head.as_secs_f64() * 1e3 / steps.head_steps.max(1) as f64,
        per_step(steps.decode),
        per_step(steps.sample),
        100.0 * (1.0 - (steps.decode + steps.sample).as_secs_f64() / wall.as_secs_f64()),
    );
    let total: u32 = runs.iter().map(|r| r.tokens).sum();
    let slowest_first = runs.iter().map(|r| r.first).max().unwrap_or_default();
    if std::env::args().any(|a| a == "--json") {
        println!(
            "{}",
            json!({
                "single": { "tokens": single.tokens, "secs": single.total.as_secs_f64(), "first_secs": single.first.as_secs_f64() },
                "batch": { "streams": streams, "tokens": total, "secs": wall.as_secs_f64(), "first_secs": slowest_first.as_secs_f64(),
                           "steps": steps.steps, "head_steps": steps.head_steps, "head_secs": steps.head.as_secs_f64(), "decode_secs": steps.decode.as_secs_f64(), "sample_secs": steps.sample.as_secs_f64() },
            })
        );
    }
    println!(
        "{streams} streams: {total} tokens in {wall:.2?} => {:.1} tokens/s aggregate, {:.1} per stream (slowest first token {:.0?})",
        f64::from(total) / wall.as_secs_f64(),
        f64::from(total) / wall.as_secs_f64() / f64::from(streams.max(1)),
        slowest_first,
    );
    Ok(())
}
