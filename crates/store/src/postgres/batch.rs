//! Group commit on PostgreSQL (decision 50).
//!
//! Every hold and settlement of an account updates the account's row, which
//! stays locked until the commit; one call per request (decision 47) left a
//! busy account at one commit per request, across all gateways. Here the
//! jobs a gateway receives while its earlier batches are at the server queue
//! up and go as one call of `cx_batch` (migration 0007): one round trip, one
//! transaction, one commit, and the row locked once for all of them.
//!
//! Each caller is still answered only after the commit that holds its job,
//! so an answer never reports a write that a crash could lose. Jobs run in
//! the order they were queued, each seeing the ones before it. Should the
//! batch fail (a job names a missing account, or PostgreSQL picks it as a
//! deadlock victim), nothing of it is kept and each job runs again alone,
//! retried as before; the failing job then fails by itself. A job alone in
//! its batch is the plain `cx_hold` or `cx_settle` call, with no JSON.
//! (One ordering the batch cannot fix: two gateways settling the *same*
//! request at once, one alone and one in a batch, may deadlock; PostgreSQL
//! breaks it after `deadlock_timeout`, and the loser's jobs run alone.)
//!
//! A few workers take batches, so a gateway has at most that many credit
//! transactions open at once; when they are all at the server, new jobs
//! wait and leave in the next batches. A caller that stops waiting does not
//! take its job back: a queued hold still runs and, unclaimed, expires like
//! any hold whose request vanished.

use std::sync::Arc;

use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot, Mutex};

use super::credits::{hold_answer, hold_once, not_found_raised, settle_answer, settle_once, unexpected};
use super::retrying;
use crate::{day_of, now_millis, rules, HoldOutcome, HoldRequest, Result, SettleOutcome, StoreError, UsageRecord};

/// Credit transactions one gateway keeps open at once (of the pool's 16).
/// Two let one batch run while the one before commits. Measured with
/// `store-bench` on 2 cores shared with the server (`docs/benchmarks.md`):
/// 1 worker did 5-15 % more than 2, and 4 and 8 did less; one worker would
/// leave the server idle during each commit's flush on a slower disk.
const WORKERS: usize = 2;

/// Most jobs in one batch: bounds how long the first of them waits.
const MAX_BATCH: usize = 128;

enum Job {
    Hold(HoldRequest, oneshot::Sender<Result<HoldOutcome>>),
    Settle(Box<UsageRecord>, oneshot::Sender<Result<SettleOutcome>>),
}

/// The queue the workers take batches from. Dropping it ends them once the
/// jobs already queued are done.
pub(super) struct Batcher {
    jobs: mpsc::UnboundedSender<Job>,
}

impl Batcher {
    /// Starts the workers on the current Tokio runtime.
    pub(super) fn start(pool: &PgPool) -> Self {
        let (jobs, queue) = mpsc::unbounded_channel();
        let queue = Arc::new(Mutex::new(queue));
        for _ in 0..WORKERS {
            tokio::spawn(work(pool.clone(), queue.clone()));
        }
        Batcher { jobs }
    }

    pub(super) async fn hold(&self, hold: HoldRequest) -> Result<HoldOutcome> {
        rules::check_hold(&hold)?;
        let (reply, answer) = oneshot::channel();
        self.jobs.send(Job::Hold(hold, reply)).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    pub(super) async fn settle(&self, usage: UsageRecord) -> Result<SettleOutcome> {
        rules::check_usage(&usage)?;
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job::Settle(Box::new(usage), reply))
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

fn stopped() -> StoreError {
    StoreError::Database(sqlx::Error::PoolClosed)
}

async fn work(pool: PgPool, queue: Arc<Mutex<mpsc::UnboundedReceiver<Job>>>) {
    loop {
        let batch = {
            let mut queue = queue.lock().await;
            let Some(first) = queue.recv().await else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            batch
        };
        if batch.len() == 1 {
            for job in batch {
                run_alone(&pool, job).await;
            }
        } else {
            run_batch(&pool, batch).await;
        }
    }
}

async fn run_alone(pool: &PgPool, job: Job) {
    match job {
        Job::Hold(hold, reply) => {
            let _ = reply.send(retrying(|| hold_once(pool, &hold)).await);
        }
        Job::Settle(usage, reply) => {
            let _ = reply.send(retrying(|| settle_once(pool, &usage)).await);
        }
    }
}

async fn run_batch(pool: &PgPool, batch: Vec<Job>) {
    let ops = Value::Array(batch.iter().map(Job::to_json).collect());
    let words: std::result::Result<Vec<String>, _> = sqlx::query_scalar("SELECT cx_batch($1::jsonb)")
        .bind(ops.to_string())
        .fetch_one(pool)
        .await;
    match words {
        Ok(words) if words.len() == batch.len() => {
            for (job, word) in batch.into_iter().zip(words) {
                job.answer(&word);
            }
        }
        Ok(words) => {
            // Committed, but the answer cannot be matched to the jobs.
            let message = format!("{} answers for {} jobs", words.len(), batch.len());
            for job in batch {
                job.fail(unexpected("cx_batch", &message));
            }
        }
        Err(err) => {
            tracing::debug!(jobs = batch.len(), error = %not_found_raised(err), "credit batch rolled back; running its jobs alone");
            for job in batch {
                run_alone(pool, job).await;
            }
        }
    }
}

impl Job {
    /// The job as `cx_batch` reads it: `cx_hold`'s or `cx_settle`'s arguments by name.
    fn to_json(&self) -> Value {
        match self {
            Job::Hold(h, _) => json!({
                "op": "hold",
                "request_id": h.request_id,
                "account_id": h.account_id,
                "key_id": h.key_id,
                "amount": h.amount,
                "now": now_millis(),
                "expires_at": h.expires_at,
            }),
            Job::Settle(u, _) => json!({
                "op": "settle",
                "request_id": u.request_id,
                "account_id": u.account_id,
                "key_id": u.key_id,
                "device_id": u.device_id,
                "provider_account_id": u.provider_account_id,
                "provision_id": u.provision_id,
                "service": u.service.as_str(),
                "model": u.model,
                "input_tokens": u.input_tokens,
                "output_tokens": u.output_tokens,
                "characters": u.characters,
                "pages": u.pages,
                "latency_ms": u.latency_ms,
                "ttfb_ms": u.ttfb_ms,
                "status": u.status,
                "cost": u.cost,
                "reward": rules::payable_reward(u),
                "created_at": u.created_at,
                "day": day_of(u.created_at),
                "error": rules::is_error(u.status),
            }),
        }
    }

    fn answer(self, word: &str) {
        match self {
            Job::Hold(hold, reply) => {
                let _ = reply.send(hold_answer(&hold, word));
            }
            Job::Settle(_, reply) => {
                let _ = reply.send(settle_answer(word));
            }
        }
    }

    fn fail(self, err: StoreError) {
        match self {
            Job::Hold(_, reply) => {
                let _ = reply.send(Err(err));
            }
            Job::Settle(_, reply) => {
                let _ = reply.send(Err(err));
            }
        }
    }
}
