//! The engine thread: one llama.cpp context, several sequences decoded together.
//!
//! Why one thread with a batched loop rather than a context per request: the
//! weights are read once per step whatever the batch holds, so decoding four
//! sequences in one `llama_decode` costs little more than decoding one, and a
//! context per request would also multiply the KV cache and compute buffers.
//!
//! Each step of the loop:
//! 1. takes new jobs from the channel (blocking only when there is no work),
//! 2. drops jobs whose client went away (their event receiver was dropped) and
//!    frees their sequence's KV cells,
//! 3. gives waiting jobs a free sequence id,
//! 4. builds one batch: the last sampled token of every decoding sequence, then
//!    as many prompt tokens of prefilling sequences as still fit,
//! 5. decodes it, and samples one token for each sequence whose logits it
//!    computed, sending the new text to that job's receiver.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc::UnboundedSender;

use super::head::{on_team, Capture, Head};
use super::params::Sampling;
use super::sample::{argmax, Sampler};
use super::text::TextStream;

/// Why generation ended, in OpenAI's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End of text, or a stop sequence.
    Stop,
    /// `max_tokens`, or the sequence's context is full.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What a job's receiver gets, in order: text pieces, then one `Done` or `Failed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Text(String),
    Done {
        reason: FinishReason,
        /// Sampled tokens, the end-of-text token excepted.
        completion_tokens: u32,
    },
    Failed(String),
}

/// One request, as the engine sees it.
pub struct Job {
    pub tokens: Vec<LlamaToken>,
    /// Already capped so that prompt + answer fit the sequence's context.
    pub max_tokens: u32,
    pub sampling: Sampling,
    pub stops: Vec<String>,
    pub trim_start: bool,
    pub events: UnboundedSender<Event>,
}

/// Fixed at start-up.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Sequences decoded at once.
    pub slots: u32,
    /// Tokens per `llama_decode` call.
    pub batch: u32,
}

/// What the engine thread publishes for [`super::LlamaChat`].
#[derive(Debug, Default)]
pub struct Stats {
    /// Jobs running or waiting, as of the last step.
    pub busy: AtomicUsize,
    /// Sequences moved to a lower id (see `Engine::compact`).
    pub moved: AtomicU64,
    /// Decode steps run.
    pub steps: AtomicU64,
    /// Nanoseconds spent building batches and in `llama_decode`.
    pub decode_ns: AtomicU64,
    /// Nanoseconds spent sampling and handing out text after decodes.
    pub sample_ns: AtomicU64,
    /// Steps whose logits the node computed (see `head`).
    pub head_steps: AtomicU64,
    /// Nanoseconds of those steps spent in the node's output layer.
    pub head_ns: AtomicU64,
    /// With `check_output_layer`: rows compared with llama.cpp's, and the
    /// largest difference seen, relative to the row's largest logit (as
    /// `f32::to_bits`, which orders non-negative floats as they compare).
    pub checked_rows: AtomicU64,
    pub worst_difference: AtomicU32,
}

/// A job holding a sequence id.
struct Active {
    seq: i32,
    job: Job,
    /// `None` for greedy decoding, which is a plain argmax.
    sampler: Option<Sampler>,
    text: TextStream,
    /// Prompt tokens already put in a batch.
    fed: usize,
    /// Position of the next token put in a batch.
    pos: i32,
    /// Sampled but not yet decoded.
    next: Option<LlamaToken>,
    /// Where this sequence's logits are in the batch being decoded.
    logits_at: Option<i32>,
    /// The token drawn from those logits, when drawn ahead (`draw_on_team`).
    drawn: Option<LlamaToken>,
    generated: u32,
}

pub struct Engine<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    shape: Shape,
    waiting: VecDeque<Job>,
    active: Vec<Active>,
    free: Vec<i32>,
    piece: Vec<u8>,
    stats: Arc<Stats>,
    /// The output layer, when the node computes it (see `head`).
    head: Option<Head>,
    /// What the evaluation callback caught; declared after `ctx`, so dropped
    /// after the context that points to it.
    capture: Box<Capture>,
    /// The step's normed hidden states, then its logits, when `head` made them.
    hidden: Vec<f32>,
    logits: Vec<f32>,
    /// The tokens of a step decoded for `head`, to decode again on a fault.
    fed: Vec<(i32, LlamaToken)>,
}

impl<'m> Engine<'m> {
    pub fn new(model: &'m LlamaModel, ctx: LlamaContext<'m>, shape: Shape, stats: Arc<Stats>) -> Self {
        Engine {
            model,
            ctx,
            batch: LlamaBatch::new(shape.batch as usize, 1),
            shape,
            waiting: VecDeque::new(),
            active: Vec::new(),
            // Popped from the end: sequence 0 first.
            free: (0..shape.slots as i32).rev().collect(),
            piece: Vec::new(),
            stats,
            head: None,
            capture: Box::new(Capture::new(0, false, None)),
            hidden: Vec::new(),
            logits: Vec::new(),
            fed: Vec::new(),
        }
    }

    /// Lets `head` compute the logits of generation steps. `capture` must be
    /// the one the context's evaluation callback was given.
    pub fn with_head(mut self, head: Option<Head>, capture: Box<Capture>) -> Self {
        self.head = head;
        self.capture = capture;
        self
    }

    /// Runs until every sender of `jobs` is gone and the last job finished.
    pub fn run(mut self, jobs: Receiver<Job>) {
        loop {
            self.publish();
            if !self.take_jobs(&jobs) {
                return;
            }
            self.drop_cancelled();
            self.admit();
            self.compact();
            self.publish();
            if self.active.is_empty() {
                continue;
            }
            self.step();
        }
    }

    fn publish(&self) {
        self.stats
            .busy
            .store(self.active.len() + self.waiting.len(), Ordering::Relaxed);
    }

    /// Returns false when the engine should stop.
    fn take_jobs(&mut self, jobs: &Receiver<Job>) -> bool {
        if self.active.is_empty() && self.waiting.is_empty() {
            match jobs.recv() {
                Ok(job) => self.waiting.push_back(job),
                Err(_) => return false,
            }
        }
        loop {
            match jobs.try_recv() {
                Ok(job) => self.waiting.push_back(job),
                Err(TryRecvError::Empty) => return true,
                // The handle is gone; finish what is running, then stop.
                Err(TryRecvError::Disconnected) => return !(self.active.is_empty() && self.waiting.is_empty()),
            }
        }
    }

    fn release(&mut self, seq: i32) {
        // Removing a whole sequence cannot fail; the result only matters for
        // partial removals.
        let _ = self.ctx.clear_kv_cache_seq(u32::try_from(seq).ok(), None, None);
        self.free.push(seq);
        // Lowest id last, so the next job takes it: see `fill_batch`.
        self.free.sort_unstable_by(|a, b| b.cmp(a));
    }

    fn drop_cancelled(&mut self) {
        self.waiting.retain(|j| !j.events.is_closed());
        let mut i = 0;
        while i < self.active.len() {
            if self.active[i].job.events.is_closed() {
                let gone = self.active.swap_remove(i);
                tracing::debug!(seq = gone.seq, "client went away; sequence freed");
                self.release(gone.seq);
            } else {
                i += 1;
            }
        }
    }

    /// Keeps the running sequences' ids contiguous from 0 when nothing waits
    /// to fill a freed id. With one KV stream per sequence, llama.cpp decodes
    /// sequences 0, 1 and 3 in two passes over the weights (see `fill_batch`),
    /// so a request that ends before a higher-numbered one would make every
    /// later step cost nearly twice as much. The highest-numbered sequence moves
    /// into the lowest free id instead: llama.cpp copies its KV stream (a few
    /// MB per layer group, once) at the next decode.
    fn compact(&mut self) {
        loop {
            let Some(&hole) = self.free.last() else { return };
            let Some(top) = self.active.iter_mut().filter(|a| a.seq > hole).max_by_key(|a| a.seq) else {
                return;
            };
            let from = top.seq;
            if self.ctx.copy_kv_cache_seq(from, hole, None, None).is_err() {
                return;
            }
            let _ = self.ctx.clear_kv_cache_seq(u32::try_from(from).ok(), None, None);
            top.seq = hole;
            tracing::debug!(from, to = hole, "sequence moved to keep ids contiguous");
            self.stats.moved.fetch_add(1, Ordering::Relaxed);
            self.free.pop();
            self.free.push(from);
            self.free.sort_unstable_by(|a, b| b.cmp(a));
        }
    }

    fn admit(&mut self) {
        while !self.waiting.is_empty() {
            let Some(seq) = self.free.pop() else { return };
            let Some(job) = self.waiting.pop_front() else {
                self.free.push(seq);
                return;
            };
            let text = TextStream::new(job.stops.clone(), job.trim_start);
            self.active.push(Active {
                seq,
                sampler: Sampler::new(&job.sampling),
                job,
                text,
                fed: 0,
                pos: 0,
                next: None,
                logits_at: None,
                drawn: None,
                generated: 0,
            });
        }
    }

    /// Puts the next tokens of every sequence in the batch, in ascending
    /// sequence id. The order matters: with one KV stream per sequence,
    /// llama.cpp splits a batch into micro-batches of sequences whose ids
    /// follow each other in batch order (0, 1, 2 …), so sequences out of order
    /// (or with gaps between their ids) are decoded in separate passes over the
    /// weights. Keeping the batch sorted, and handing out the lowest free id
    /// first, keeps a step to one pass as often as possible.
    fn fill_batch(&mut self) -> Result<(), llama_cpp_2::llama_batch::BatchAddError> {
        self.active.sort_unstable_by_key(|a| a.seq);
        self.batch.clear();
        for a in &mut self.active {
            a.logits_at = None;
            if let Some(token) = a.next.take() {
                self.batch.add(token, a.pos, &[a.seq], true)?;
                a.pos += 1;
                a.logits_at = Some(self.batch.n_tokens() - 1);
            }
        }
        let mut room = (self.shape.batch as usize).saturating_sub(self.batch.n_tokens() as usize);
        for a in &mut self.active {
            if room == 0 {
                break;
            }
            let left = a.job.tokens.len() - a.fed;
            if left == 0 {
                continue;
            }
            let take = left.min(room);
            for _ in 0..take {
                let last = a.fed + 1 == a.job.tokens.len();
                self.batch.add(a.job.tokens[a.fed], a.pos, &[a.seq], last)?;
                a.fed += 1;
                a.pos += 1;
                if last {
                    a.logits_at = Some(self.batch.n_tokens() - 1);
                }
            }
            room -= take;
        }
        Ok(())
    }

    fn step(&mut self) {
        let started = Instant::now();
        // A generation step (every sequence decodes its last sampled token, so
        // every token of the batch wants logits) gets its logits from `head`.
        // Prompts are left to llama.cpp: it would reorder their outputs.
        let own = self.head.is_some() && self.active.iter().all(|a| a.next.is_some());
        if own {
            self.fed.clear();
            self.fed
                .extend(self.active.iter().filter_map(|a| Some((a.seq, a.next?))));
        }
        self.capture.arm(own);
        let filled = self.fill_batch();
        let decoded = match filled {
            Ok(()) if self.batch.n_tokens() == 0 => return,
            Ok(()) => self.ctx.decode(&mut self.batch).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = decoded {
            tracing::warn!(error = %e, sequences = self.active.len(), "llama.cpp decode failed");
            for a in std::mem::take(&mut self.active) {
                let _ = a
                    .job
                    .events
                    .send(Event::Failed("the chat engine failed to decode".into()));
                self.release(a.seq);
            }
            return;
        }
        if own {
            if !self.own_logits() {
                return;
            }
            self.draw_on_team();
        }
        let decoded_at = Instant::now();
        // Counted before any answer hears of this step: a caller that reads
        // the counts once its answer has ended sees every step that made it.
        let stats = &self.stats;
        stats.steps.fetch_add(1, Ordering::Relaxed);
        stats
            .decode_ns
            .fetch_add(nanos(decoded_at - started), Ordering::Relaxed);
        let mut i = 0;
        while i < self.active.len() {
            let finished = match self.active[i].logits_at {
                Some(at) => self.sample(i, at),
                None => false,
            };
            if finished {
                let done = self.active.swap_remove(i);
                self.release(done.seq);
            } else {
                i += 1;
            }
        }
        self.stats
            .sample_ns
            .fetch_add(nanos(decoded_at.elapsed()), Ordering::Relaxed);
    }

    /// Computes the logits of a generation step from the hidden states the
    /// callback caught. If it caught none (llama.cpp's graph did not look as
    /// expected), the step's tokens are taken out of the KV cache and put back
    /// to be decoded again, by llama.cpp alone from now on; returns false then.
    fn own_logits(&mut self) -> bool {
        let rows = self.batch.n_tokens() as usize;
        if let (Some(head), Some(())) = (&self.head, self.capture.take(rows, &mut self.hidden)) {
            let started = Instant::now();
            head.logits(&self.hidden, &mut self.logits);
            self.stats.head_steps.fetch_add(1, Ordering::Relaxed);
            self.stats
                .head_ns
                .fetch_add(nanos(started.elapsed()), Ordering::Relaxed);
            if self.capture.verifies() {
                self.compare_logits(head.n_vocab(), rows);
            }
            return true;
        }
        tracing::warn!("llama.cpp's graph did not stop at its final norm; it computes the output layer from now on");
        self.head = None;
        for a in &mut self.active {
            let Some(&(_, token)) = self.fed.iter().find(|(seq, _)| *seq == a.seq) else {
                continue;
            };
            a.pos -= 1;
            let _ = self
                .ctx
                .clear_kv_cache_seq(u32::try_from(a.seq).ok(), u32::try_from(a.pos).ok(), None);
            a.next = Some(token);
            a.logits_at = None;
        }
        false
    }

    /// Draws the next token of every sequence of a generation step from the
    /// node's logits, the sequences shared out between llama.cpp's threads,
    /// which are idle (spinning) between steps anyway.
    fn draw_on_team(&mut self) {
        let Some(head) = &self.head else { return };
        let n_vocab = head.n_vocab();
        let threads = head.threads().max(1);
        let logits = &self.logits;
        let mut groups: Vec<Vec<&mut Active>> = (0..threads).map(|_| Vec::new()).collect();
        let drawing = self.active.iter_mut().filter(|a| a.logits_at.is_some());
        for (k, a) in drawing.enumerate() {
            groups[k % threads].push(a);
        }
        groups.retain(|g| !g.is_empty());
        // In a generation step the batch holds one token per sequence, so
        // its logits are row `logits_at` of the node's.
        on_team(groups, |group| {
            for a in group {
                let at = a.logits_at.and_then(|at| usize::try_from(at).ok()).unwrap_or(0);
                let row = logits.chunks_exact(n_vocab).nth(at).unwrap_or_default();
                a.drawn = Some(draw(&mut a.sampler, row));
            }
        });
    }

    /// Compares the node's logits of a step with those llama.cpp also
    /// computed, records the difference, and keeps llama.cpp's.
    fn compare_logits(&mut self, n_vocab: usize, rows: usize) {
        for (r, ours) in self.logits.chunks_exact_mut(n_vocab).enumerate().take(rows) {
            let theirs = self.ctx.get_logits_ith(i32::try_from(r).unwrap_or(i32::MAX));
            let scale = theirs.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            let worst = ours.iter().zip(theirs).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
            self.stats.checked_rows.fetch_add(1, Ordering::Relaxed);
            self.stats
                .worst_difference
                .fetch_max(worst.to_bits(), Ordering::Relaxed);
            ours.copy_from_slice(theirs);
        }
    }

    /// Samples the next token of `active[i]`; true when that job is finished.
    fn sample(&mut self, i: usize, at: i32) -> bool {
        let vocab = self.model.vocab();
        let a = &mut self.active[i];
        // A generation step's tokens were all drawn by `draw_on_team`.
        let token = match a.drawn.take() {
            Some(token) => token,
            None => draw(&mut a.sampler, self.ctx.get_logits_ith(at)),
        };
        if vocab.is_eog(token) {
            return finish(a, FinishReason::Stop);
        }
        a.generated += 1;
        self.piece.clear();
        vocab.token_to_piece_into(token, &mut self.piece, false, None);
        let pushed = a.text.push(&self.piece);
        if !pushed.text.is_empty() && a.job.events.send(Event::Text(pushed.text)).is_err() {
            return true;
        }
        if pushed.stopped {
            return finish(a, FinishReason::Stop);
        }
        if a.generated >= a.job.max_tokens {
            return finish(a, FinishReason::Length);
        }
        a.next = Some(token);
        false
    }
}

/// The next token from a row of logits: the sampler's draw, or the argmax
/// for greedy decoding.
fn draw(sampler: &mut Option<Sampler>, logits: &[f32]) -> LlamaToken {
    LlamaToken::new(match sampler {
        Some(s) => s.sample(logits),
        None => i32::try_from(argmax(logits)).unwrap_or(0),
    })
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Sends what was held back and the end of the answer.
fn finish(a: &mut Active, reason: FinishReason) -> bool {
    let rest = a.text.finish();
    if !rest.is_empty() {
        let _ = a.job.events.send(Event::Text(rest));
    }
    let _ = a.job.events.send(Event::Done {
        reason,
        completion_tokens: a.generated,
    });
    true
}
