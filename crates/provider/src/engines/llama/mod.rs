//! Built-in chat: a GGUF model run by llama.cpp (through the `llama-cpp-2` crate)
//! on the CPU, several requests decoded together in one context.
//!
//! - [`params`]: the request's generation settings, checked at the edge.
//! - [`prompt`]: messages → tokens (the model's chat template, or a plain transcript).
//! - [`engine`]: the engine thread and its batched decode loop.
//! - [`head`]: the output layer, computed by the node on generation steps.
//! - [`sample`]: temperature, top_p and seeded draws over a row of logits.
//! - [`text`]: token bytes → text, with stop sequences.
//! - [`http`]: the OpenAI chat-completions answer, JSON or SSE.
//!
//! The async side never touches llama.cpp while it decodes: a request becomes a
//! [`engine::Job`] sent over a channel to the engine thread, and its text comes
//! back over a channel of its own. Dropping that receiver (the client went away)
//! frees the request's sequence at the engine's next step.

pub mod engine;
pub mod head;
pub mod http;
pub mod params;
pub mod prompt;
pub mod sample;
pub mod text;

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use cxmpute_protocol::openai::ChatMessage;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::LogOptions;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use engine::{Engine, Event, Job, Shape, Stats};
use head::{Capture, Head};
use params::ChatParams;
use prompt::{Prompt, PromptError, PromptFormat};

/// Tokens llama.cpp computes at once inside a decode call (its `n_ubatch`).
const MICRO_BATCH: u32 = 128;

/// How the engine is laid out; fixed when it loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChatOptions {
    /// Requests decoded at once; more wait their turn inside the engine.
    pub slots: u32,
    /// Context (prompt + answer) of each request, in tokens.
    pub context_per_slot: u32,
    /// Most tokens per decode call: bounds how much prompt is read per step, so a
    /// long prompt arriving does not stall the answers being streamed for long.
    pub batch: u32,
    /// CPU threads llama.cpp computes with; `None` means one per core.
    pub threads: Option<u32>,
    /// Let the node compute the output layer of generation steps where it can
    /// (see [`head`]); false leaves all of it to llama.cpp. The environment
    /// variable `CXMPUTE_CHAT_OUTPUT=llama` also turns it off.
    pub own_output_layer: bool,
    /// Let llama.cpp compute the output layer too, compare its logits with the
    /// node's ([`LlamaChat::output_layer_check`]) and use llama.cpp's: for
    /// tests and for checking a new CPU. Costs the time the node saves.
    pub check_output_layer: bool,
    /// Tests only: the n-th generation step's capture (from 1) is taken as
    /// malformed, as if llama.cpp's graph had changed shape.
    #[doc(hidden)]
    pub fault_output_capture_at: Option<u64>,
}

impl Default for ChatOptions {
    fn default() -> Self {
        ChatOptions {
            slots: 4,
            context_per_slot: 4096,
            batch: 512,
            threads: None,
            own_output_layer: true,
            check_output_layer: false,
            fault_output_capture_at: None,
        }
    }
}

/// Why a chat request was refused before generation started.
/// Totals of the engine thread's decode steps (see [`LlamaChat::step_times`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepTimes {
    pub steps: u64,
    /// Steps whose logits the node computed (see [`head`]).
    pub head_steps: u64,
    /// Of `decode`, the time in the node's output layer.
    pub head: Duration,
    /// Building batches and `llama_decode`.
    pub decode: Duration,
    /// Sampling the decoded rows and handing their text out.
    pub sample: Duration,
}

impl StepTimes {
    /// What happened between `earlier` and `self`.
    pub fn since(self, earlier: StepTimes) -> StepTimes {
        StepTimes {
            steps: self.steps.saturating_sub(earlier.steps),
            head_steps: self.head_steps.saturating_sub(earlier.head_steps),
            head: self.head.saturating_sub(earlier.head),
            decode: self.decode.saturating_sub(earlier.decode),
            sample: self.sample.saturating_sub(earlier.sample),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error(transparent)]
    Prompt(#[from] PromptError),
    #[error("the prompt is {prompt} tokens; this model's context holds {limit} per request, answer included")]
    TooLong { prompt: usize, limit: u32 },
    #[error("the chat engine has stopped")]
    Stopped,
}

/// A started generation: its prompt size and the stream of its events.
pub struct Generation {
    pub prompt_tokens: u32,
    pub events: UnboundedReceiver<Event>,
}

/// A finished generation, collected (tests, benchmarks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub text: String,
    pub reason: engine::FinishReason,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Text events received: how many pieces a stream would have had.
    pub pieces: usize,
}

/// A loaded chat model and the handle to its engine thread. The thread stops
/// once this is dropped and its last request has finished.
pub struct LlamaChat {
    model: Arc<LlamaModel>,
    format: PromptFormat,
    jobs: Mutex<mpsc::Sender<Job>>,
    options: ChatOptions,
    stats: Arc<Stats>,
    output_layer: &'static str,
}

/// `params` with [`head::on_node`] as llama.cpp's evaluation callback, looking
/// into `capture`.
///
/// llama-cpp-2 does not wrap `cb_eval`, and keeps the raw parameters in a
/// private field of a struct that has no other; the two are swapped through
/// `transmute`, which the assertions below hold to the same size and
/// alignment.
fn with_eval_callback(params: LlamaContextParams, capture: &Capture) -> LlamaContextParams {
    use llama_cpp_sys_2::llama_context_params as Raw;
    const _: () = assert!(std::mem::size_of::<LlamaContextParams>() == std::mem::size_of::<Raw>());
    const _: () = assert!(std::mem::align_of::<LlamaContextParams>() == std::mem::align_of::<Raw>());
    // SAFETY: a struct whose only field is `Raw` is laid out as `Raw` (same
    // size and alignment, asserted above, and no other field to place).
    let mut raw: Raw = unsafe { std::mem::transmute::<LlamaContextParams, Raw>(params) };
    raw.cb_eval = Some(head::on_node);
    raw.cb_eval_user_data = std::ptr::from_ref(capture).cast_mut().cast();
    // SAFETY: as above, back again.
    unsafe { std::mem::transmute::<Raw, LlamaContextParams>(raw) }
}

/// llama.cpp's global state, initialised once per process and kept for its life.
fn backend() -> anyhow::Result<&'static LlamaBackend> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            // llama.cpp logs every tensor it loads at INFO; through `tracing` they
            // obey the node's log filter (see main.rs) instead of flooding stderr.
            llama_cpp_2::send_logs_to_tracing(LogOptions::default());
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| anyhow!("cannot initialise llama.cpp: {e}"))
}

impl LlamaChat {
    /// Loads a GGUF file and starts the engine thread.
    pub fn load(path: &Path, options: ChatOptions) -> anyhow::Result<LlamaChat> {
        anyhow::ensure!(options.slots >= 1, "the chat engine needs at least one slot");
        // Every running sequence puts one token in each batch.
        anyhow::ensure!(
            options.batch >= options.slots,
            "the chat engine's batch ({}) must hold at least one token per slot ({})",
            options.batch,
            options.slots
        );
        if !path.is_file() {
            bail!("{} is not a file", path.display());
        }
        let backend = backend()?;
        let model = LlamaModel::load_from_file(backend, path, &LlamaModelParams::default())
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("llama.cpp cannot load {}", path.display()))?;
        let model = Arc::new(model);
        let format = PromptFormat::for_model(&model);

        let threads = options
            .threads
            .map(|t| t.max(1) as usize)
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2));
        let threads = i32::try_from(threads).unwrap_or(i32::MAX);
        let total_ctx = options
            .context_per_slot
            .checked_mul(options.slots)
            .and_then(NonZeroU32::new)
            .context("context_per_slot x slots must be between 1 and 2^32")?;
        let shape = Shape {
            slots: options.slots,
            batch: options.batch,
        };

        let head = match Head::open(path, usize::try_from(threads).unwrap_or(1)) {
            Ok(_) if !options.own_output_layer => None,
            Ok(head) => Some(head),
            Err(e) => {
                tracing::info!(reason = %format!("{e:#}"), "llama.cpp computes the chat model's output layer");
                None
            }
        };
        let output_layer = head.as_ref().map_or("llama.cpp", Head::describe);

        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), String>>(1);
        let thread_model = Arc::clone(&model);
        let stats = Arc::new(Stats::default());
        let thread_stats = Arc::clone(&stats);
        std::thread::Builder::new()
            .name("llama-chat".into())
            .spawn(move || {
                // The context borrows the model, and llama.cpp contexts stay on the
                // thread that made them, so it is created here.
                // Where the evaluation callback looks; it must outlive the
                // context, which the engine drops first.
                let capture = Box::new(Capture::new(
                    head.as_ref().map_or(0, Head::n_embd),
                    options.check_output_layer,
                    options.fault_output_capture_at,
                ));
                let params = LlamaContextParams::default()
                    .with_n_ctx(Some(total_ctx))
                    .with_n_batch(options.batch)
                    // The compute buffer holds a logits row (262k floats for Gemma)
                    // per token of a micro-batch: 128 keeps it near 130 MiB
                    // instead of 512 MiB, and costs prompt reading little.
                    .with_n_ubatch(options.batch.min(MICRO_BATCH))
                    .with_n_seq_max(options.slots)
                    // One KV stream per sequence: requests share no prefix, and
                    // attention then only looks at a sequence's own cells.
                    .with_kv_unified(false)
                    .with_n_threads(threads)
                    .with_n_threads_batch(threads);
                let params = match &head {
                    Some(_) => with_eval_callback(params, &capture),
                    None => params,
                };
                let ctx = match thread_model.new_context(backend, params) {
                    Ok(ctx) => ctx,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                Engine::new(&thread_model, ctx, shape, thread_stats)
                    .with_head(head, capture)
                    .run(jobs_rx);
            })
            .context("cannot start the chat engine thread")?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("llama.cpp cannot create a context for {}: {e}", path.display()),
            Err(_) => bail!("the chat engine thread stopped while starting"),
        }
        tracing::info!(
            model = %path.display(),
            prompt_format = format.describe(),
            slots = options.slots,
            context_per_slot = options.context_per_slot,
            threads,
            output_layer,
            "chat engine ready"
        );
        Ok(LlamaChat {
            model,
            format,
            jobs: Mutex::new(jobs_tx),
            options,
            stats,
            output_layer,
        })
    }

    pub fn options(&self) -> ChatOptions {
        self.options
    }

    /// With [`ChatOptions::check_output_layer`]: rows of logits compared with
    /// llama.cpp's so far, and the largest difference, relative to the
    /// largest logit of its row.
    pub fn output_layer_check(&self) -> (u64, f32) {
        (
            self.stats.checked_rows.load(Ordering::Relaxed),
            f32::from_bits(self.stats.worst_difference.load(Ordering::Relaxed)),
        )
    }

    /// Who computes the output layer of generation steps: "llama.cpp", or
    /// "node (…)" with the kernel (see [`head`]).
    pub fn output_layer(&self) -> &'static str {
        self.output_layer
    }

    /// Requests generating or waiting for a slot, as of the engine's last step.
    /// A request whose receiver was dropped stops counting at the next step.
    pub fn busy(&self) -> usize {
        self.stats.busy.load(Ordering::Relaxed)
    }

    /// Sequences the engine has moved to a lower id so far, to keep one pass
    /// over the weights per step (see `engine::Engine::compact`).
    pub fn sequences_moved(&self) -> u64 {
        self.stats.moved.load(Ordering::Relaxed)
    }

    /// Where the engine thread's time went so far: for benchmarks and the
    /// node's own figures.
    pub fn step_times(&self) -> StepTimes {
        StepTimes {
            steps: self.stats.steps.load(Ordering::Relaxed),
            head_steps: self.stats.head_steps.load(Ordering::Relaxed),
            head: Duration::from_nanos(self.stats.head_ns.load(Ordering::Relaxed)),
            decode: Duration::from_nanos(self.stats.decode_ns.load(Ordering::Relaxed)),
            sample: Duration::from_nanos(self.stats.sample_ns.load(Ordering::Relaxed)),
        }
    }

    pub fn prompt_format(&self) -> &PromptFormat {
        &self.format
    }

    /// Formats and tokenizes `messages` (CPU work: call it off the async runtime
    /// for long prompts).
    pub fn prompt(&self, messages: &[ChatMessage]) -> Result<Prompt, PromptError> {
        prompt::build(&self.model, &self.format, messages)
    }

    /// Queues a request; its text arrives on the returned receiver.
    pub fn start(&self, messages: &[ChatMessage], params: &ChatParams) -> Result<Generation, ChatError> {
        let prompt = self.prompt(messages)?;
        let limit = self.options.context_per_slot;
        let prompt_len = prompt.tokens.len();
        let room = u32::try_from(prompt_len)
            .ok()
            .and_then(|p| limit.checked_sub(p))
            .filter(|room| *room > 0 && prompt_len > 0)
            .ok_or(ChatError::TooLong {
                prompt: prompt_len,
                limit,
            })?;
        let max_tokens = params.max_tokens.map_or(room, |m| m.min(room));
        let (events_tx, events_rx) = unbounded_channel();
        let mut stops = prompt.stops;
        stops.extend(params.stop.iter().cloned());
        let job = Job {
            tokens: prompt.tokens,
            max_tokens,
            sampling: params.sampling,
            stops,
            trim_start: prompt.trim_start,
            events: events_tx,
        };
        // A poisoned lock only means another sender panicked mid-send; the
        // sender itself is still usable.
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        jobs.send(job).map_err(|_| ChatError::Stopped)?;
        Ok(Generation {
            prompt_tokens: u32::try_from(prompt_len).unwrap_or(u32::MAX),
            events: events_rx,
        })
    }

    /// Runs a request to the end on the calling thread (which must not be an
    /// async runtime's): for tests and benchmarks.
    pub fn complete_blocking(&self, messages: &[ChatMessage], params: &ChatParams) -> anyhow::Result<Completion> {
        self.start(messages, params)?.wait()
    }
}

impl Generation {
    /// Collects the rest of the answer on the calling thread (which must not
    /// be an async runtime's): for tests and benchmarks.
    pub fn wait(mut self) -> anyhow::Result<Completion> {
        let mut text = String::new();
        let mut pieces = 0;
        while let Some(event) = self.events.blocking_recv() {
            match event {
                Event::Text(t) => {
                    text.push_str(&t);
                    pieces += 1;
                }
                Event::Done {
                    reason,
                    completion_tokens,
                } => {
                    return Ok(Completion {
                        text,
                        reason,
                        prompt_tokens: self.prompt_tokens,
                        completion_tokens,
                        pieces,
                    })
                }
                Event::Failed(e) => bail!("generation failed: {e}"),
            }
        }
        bail!("the chat engine stopped mid-answer")
    }
}
