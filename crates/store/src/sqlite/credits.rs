//! Holds and settlement on SQLite, with group commit.
//!
//! These are the writes made on every API request, so they take the shortest
//! path SQLite offers: one OS thread owns one connection (`rusqlite`, cached
//! prepared statements, no per-statement hop between threads) and runs the
//! jobs queued while it was busy as one transaction. A job decides before it
//! writes, so one that declines (say, insufficient balance) leaves no trace
//! and needs no savepoint; should a job fail after writing, the batch is
//! rolled back and each of its jobs rerun in a transaction of its own. A
//! caller is answered only after the commit that contains its job, so an
//! answer never reports a write that a crash could still lose (WAL with
//! `synchronous = NORMAL`: a commit survives a process crash; an operating
//! system crash may lose the last commits, as for every other write).
//!
//! Under load many jobs share one commit; at concurrency 1 each job has its
//! own, and the cost is a few statements on a cached connection. At low
//! load (the job is the only one in progress, and so were the few before
//! it) the caller runs its job itself on the same connection (behind a
//! mutex) instead of handing it to the thread and waiting to be woken: that
//! saves two thread wake-ups per job. Otherwise jobs queue and share commits
//! as before (running them on the callers' async threads under load was
//! measured to cost throughput: every job then pays its own commit).

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::oneshot;

use crate::{
    day_of, now_millis, rules, HoldOutcome, HoldRequest, LedgerKind, Result, SettleOutcome, StoreError, UsageRecord,
};

/// How long the writer waits for another connection's write to finish.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Most jobs in one transaction: bounds the time the first of them waits.
const MAX_BATCH: usize = 256;

/// Jobs in a row that must have found no other in progress before callers
/// run theirs themselves. Measured on 2 cores: with 4, throughput at
/// concurrency 16 fell 10 % (bursts in lockstep look quiet between batches,
/// and inline jobs each pay a commit); with 32 it did not, and concurrency 1
/// keeps the gain.
const QUIET_STREAK: usize = 32;

enum Op {
    Hold(HoldRequest),
    Release(Vec<String>),
    Settle(Box<UsageRecord>),
}

enum Done {
    Hold(HoldOutcome),
    Released(u64),
    Settle(SettleOutcome),
}

struct Job {
    op: Op,
    reply: oneshot::Sender<Result<Done>>,
}

/// Handle to the writer thread. Dropping the last handle ends the thread
/// after the jobs already queued.
pub(super) struct CreditWriter {
    /// `None` asks the thread for a checkpoint.
    jobs: mpsc::Sender<Option<Job>>,
    shared: Arc<Shared>,
}

/// What callers and the writer thread share.
struct Shared {
    conn: Mutex<Connection>,
    /// Callers waiting for a job (a caller whose future is dropped stops
    /// counting, though its job may still be queued).
    active: AtomicUsize,
    /// How many jobs in a row found no other in progress.
    alone_streak: AtomicUsize,
    /// When the last checkpoint ran (milliseconds since `epoch`).
    checkpointed_ms: AtomicU64,
    /// A checkpoint request is on its way to the thread.
    checkpoint_asked: AtomicBool,
    epoch: Instant,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether a job may run on its caller's thread: no other is in progress
    /// and none was for the last few jobs (the load is low, rather than
    /// between two bursts).
    fn quiet(&self, alone: bool) -> bool {
        if !alone {
            self.alone_streak.store(0, Ordering::Relaxed);
            return false;
        }
        self.alone_streak.fetch_add(1, Ordering::Relaxed) >= QUIET_STREAK
    }

    fn checkpoint_due(&self) -> bool {
        self.now_ms()
            .saturating_sub(self.checkpointed_ms.load(Ordering::Relaxed))
            >= CHECKPOINT_EVERY.as_millis() as u64
    }

    fn checkpoint(&self, conn: &Connection) {
        checkpoint(conn);
        self.checkpointed_ms.store(self.now_ms(), Ordering::Relaxed);
        self.checkpoint_asked.store(false, Ordering::Relaxed);
    }
}

impl CreditWriter {
    /// Opens its own connection to `path` (which the sqlx pools opened and
    /// migrated already) and starts the thread.
    pub(super) fn start(path: &Path) -> Result<Self> {
        let conn = Connection::open(path).map_err(db)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(db)?;
        // temp_store: statement journals stay in memory, not in a temp file.
        conn.execute_batch("PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL; PRAGMA temp_store = MEMORY;")
            .map_err(db)?;
        conn.set_prepared_statement_cache_capacity(32);
        // Checkpoints (copying the WAL back into the database file) would run
        // inside a commit, stalling the whole batch; this thread runs them
        // itself between batches instead (see `run`).
        // The WAL restarts from its beginning after each full checkpoint; the
        // size limit then trims what a burst left behind.
        conn.execute_batch("PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = 16777216;")
            .map_err(db)?;
        let (jobs, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            conn: Mutex::new(conn),
            active: AtomicUsize::new(0),
            alone_streak: AtomicUsize::new(0),
            checkpointed_ms: AtomicU64::new(0),
            checkpoint_asked: AtomicBool::new(false),
            epoch: Instant::now(),
        });
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("cxmpute-credits".into())
            .spawn(move || run(&thread_shared, rx))
            .map_err(|e| StoreError::Corrupt(format!("cannot start the credit writer thread: {e}")))?;
        Ok(CreditWriter { jobs, shared })
    }

    async fn submit(&self, op: Op) -> Result<Done> {
        let active = Active::enter(&self.shared.active);
        if self.shared.quiet(active.alone) {
            let free = match self.shared.conn.try_lock() {
                Ok(conn) => Some(conn),
                Err(TryLockError::Poisoned(p)) => {
                    self.shared.conn.clear_poison();
                    Some(p.into_inner())
                }
                Err(TryLockError::WouldBlock) => None,
            };
            // Never wait for another connection's write on an async thread:
            // when the database is busy, the job queues for the thread.
            let began = free.filter(|conn| {
                let _ = conn.busy_timeout(Duration::ZERO);
                let began = begin(conn).is_ok();
                let _ = conn.busy_timeout(BUSY_TIMEOUT);
                began
            });
            if let Some(conn) = began {
                let result = finish_alone(&conn, &op);
                drop(conn);
                // Checkpoints stay on the thread, off the request path.
                if self.shared.checkpoint_due() && !self.shared.checkpoint_asked.swap(true, Ordering::Relaxed) {
                    let _ = self.jobs.send(None);
                }
                return result;
            }
        }
        let (reply, answer) = oneshot::channel();
        self.jobs.send(Some(Job { op, reply })).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    pub(super) async fn hold(&self, hold: HoldRequest) -> Result<HoldOutcome> {
        rules::check_hold(&hold)?;
        match self.submit(Op::Hold(hold)).await? {
            Done::Hold(outcome) => Ok(outcome),
            _ => Err(mismatch()),
        }
    }

    pub(super) async fn release(&self, request_ids: Vec<String>) -> Result<u64> {
        if request_ids.is_empty() {
            return Ok(0);
        }
        match self.submit(Op::Release(request_ids)).await? {
            Done::Released(n) => Ok(n),
            _ => Err(mismatch()),
        }
    }

    pub(super) async fn settle(&self, usage: UsageRecord) -> Result<SettleOutcome> {
        rules::check_usage(&usage)?;
        match self.submit(Op::Settle(Box::new(usage))).await? {
            Done::Settle(outcome) => Ok(outcome),
            _ => Err(mismatch()),
        }
    }
}

/// Counts a job as in progress until dropped (also when its caller's future
/// is dropped while it waits).
struct Active<'a> {
    count: &'a AtomicUsize,
    /// No other job was in progress when this one started.
    alone: bool,
}

impl<'a> Active<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        let alone = count.fetch_add(1, Ordering::AcqRel) == 0;
        Active { count, alone }
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

fn stopped() -> StoreError {
    StoreError::Corrupt("the credit writer thread stopped".into())
}

fn mismatch() -> StoreError {
    StoreError::Corrupt("the credit writer answered another kind of job".into())
}

fn db(e: rusqlite::Error) -> StoreError {
    StoreError::Sqlite(e.to_string())
}

fn run(shared: &Shared, rx: mpsc::Receiver<Option<Job>>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut results = Vec::with_capacity(MAX_BATCH);
    while let Ok(first) = rx.recv() {
        // `None` is a checkpoint asked for by a caller that ran its job itself.
        let mut asked = first.is_none();
        batch.extend(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => {
                    asked |= job.is_none();
                    batch.extend(job);
                }
                Err(_) => break,
            }
        }
        let conn = shared.lock();
        if !batch.is_empty() && run_batch(&conn, &batch, &mut results).is_err() {
            // One job broke the shared transaction (or the commit failed):
            // nothing of the batch happened. Run each job on its own, so only
            // the job at fault fails.
            let _ = exec(&conn, "ROLLBACK");
            results.clear();
            results.extend(batch.iter().map(|job| run_alone(&conn, &job.op)));
        }
        for (job, result) in batch.drain(..).zip(results.drain(..)) {
            let _ = job.reply.send(result);
        }
        if asked || shared.checkpoint_due() {
            shared.checkpoint(&conn);
        }
    }
    shared.checkpoint(&shared.lock());
}

/// How often, at most, the WAL is copied back into the database file. Rows
/// that change on every request (balances, keys, roll-ups) are copied once
/// per period instead of once per commit that touched them.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// Copies the WAL back into the database. Run by the writer between batches:
/// with no write in progress the checkpoint can take every frame, so the next
/// transaction starts the WAL over instead of growing it. (A checkpoint from
/// another thread, under constant load, would never catch up.)
fn checkpoint(conn: &Connection) {
    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
        tracing::warn!(error = %e, "WAL checkpoint failed; will retry");
    }
}

fn exec(conn: &Connection, sql: &str) -> Result<()> {
    conn.prepare_cached(sql).map_err(db)?.execute([]).map_err(db)?;
    Ok(())
}

/// Whether a failed job left the transaction as it found it. The jobs are
/// written so that these errors come before their first write; anything
/// else (a database error, a broken invariant) may come after one.
fn is_clean(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::NotFound(_) | StoreError::Conflict(_) | StoreError::InvalidInput(_)
    )
}

/// Runs every job in one transaction; `results` gets one entry per job. Jobs
/// that decline (insufficient balance, already settled, …) decide before
/// they write, so no savepoints are needed. Returns an error when a job
/// failed part-way or the commit failed: the caller then rolls back.
fn run_batch(conn: &Connection, batch: &[Job], results: &mut Vec<Result<Done>>) -> Result<()> {
    begin(conn)?;
    for job in batch {
        let result = apply(conn, &job.op);
        if let Err(e) = &result {
            if !is_clean(e) {
                return Err(StoreError::Sqlite(e.to_string()));
            }
        }
        results.push(result);
    }
    exec(conn, "COMMIT")
}

fn run_alone(conn: &Connection, op: &Op) -> Result<Done> {
    begin(conn)?;
    finish_alone(conn, op)
}

/// Starts a write transaction, first ending one that a panic left open.
fn begin(conn: &Connection) -> Result<()> {
    if !conn.is_autocommit() {
        let _ = exec(conn, "ROLLBACK");
    }
    exec(conn, "BEGIN IMMEDIATE")
}

/// Runs `op` in the transaction [`begin`] started, then commits (or rolls back).
fn finish_alone(conn: &Connection, op: &Op) -> Result<Done> {
    match apply(conn, op) {
        Ok(done) => {
            if let Err(e) = exec(conn, "COMMIT") {
                let _ = exec(conn, "ROLLBACK");
                return Err(e);
            }
            Ok(done)
        }
        Err(e) => {
            let _ = exec(conn, "ROLLBACK");
            Err(e)
        }
    }
}

fn apply(conn: &Connection, op: &Op) -> Result<Done> {
    match op {
        Op::Hold(hold) => hold_one(conn, hold).map(Done::Hold),
        Op::Release(ids) => {
            let mut released = 0;
            for id in ids {
                if return_hold(conn, id)?.is_some() {
                    released += 1;
                }
            }
            Ok(Done::Released(released))
        }
        Op::Settle(usage) => settle_one(conn, usage).map(Done::Settle),
    }
}

/// Decides first, then writes: a declined hold leaves nothing behind. The
/// decision cannot go stale before the writes, since this thread is the only
/// writer while its transaction is open.
fn hold_one(conn: &Connection, hold: &HoldRequest) -> Result<HoldOutcome> {
    type State = (bool, bool, i64, Option<i64>, i64);
    let state: Option<State> = conn
        .prepare_cached(
            "SELECT a.suspended, k.revoked_at IS NOT NULL, a.balance, k.credit_limit, k.spent + k.reserved \
             FROM accounts a JOIN api_keys k ON k.account_id = a.id WHERE a.id = ?1 AND k.id = ?2",
        )
        .map_err(db)?
        .query_row(params![hold.account_id, hold.key_id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .optional()
        .map_err(db)?;
    let Some((suspended, revoked, balance, credit_limit, committed)) = state else {
        return Err(StoreError::NotFound(format!(
            "api key {} of account {}",
            hold.key_id, hold.account_id
        )));
    };
    if suspended || revoked {
        return Ok(HoldOutcome::Refused);
    }
    if balance < hold.amount {
        return Ok(HoldOutcome::InsufficientBalance);
    }
    if credit_limit.is_some_and(|limit| committed.saturating_add(hold.amount) > limit) {
        return Ok(HoldOutcome::KeyLimitReached);
    }
    let inserted = conn
        .prepare_cached(
            "INSERT INTO holds (request_id, account_id, key_id, amount, created_at, expires_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (request_id) DO NOTHING",
        )
        .map_err(db)?
        .execute(params![
            hold.request_id,
            hold.account_id,
            hold.key_id,
            hold.amount,
            now_millis(),
            hold.expires_at
        ])
        .map_err(db)?;
    if inserted == 0 {
        return Err(StoreError::Conflict(format!(
            "request {} already holds credits",
            hold.request_id
        )));
    }
    // The guard repeats the check above, so a hold can never overdraw even
    // if the decision were somehow stale.
    let debited = conn
        .prepare_cached("UPDATE accounts SET balance = balance - ?2 WHERE id = ?1 AND balance >= ?2")
        .map_err(db)?
        .execute(params![hold.account_id, hold.amount])
        .map_err(db)?;
    let reserved = conn
        .prepare_cached("UPDATE api_keys SET reserved = reserved + ?2 WHERE id = ?1")
        .map_err(db)?
        .execute(params![hold.key_id, hold.amount])
        .map_err(db)?;
    if debited == 0 || reserved == 0 {
        return Err(StoreError::Corrupt(format!(
            "hold {} changed under the writer",
            hold.request_id
        )));
    }
    Ok(HoldOutcome::Held)
}

struct Hold {
    account_id: String,
    key_id: String,
    amount: i64,
}

fn take_hold(conn: &Connection, request_id: &str) -> Result<Option<Hold>> {
    conn.prepare_cached("DELETE FROM holds WHERE request_id = ?1 RETURNING account_id, key_id, amount")
        .map_err(db)?
        .query_row([request_id], |r| {
            Ok(Hold {
                account_id: r.get(0)?,
                key_id: r.get(1)?,
                amount: r.get(2)?,
            })
        })
        .optional()
        .map_err(db)
}

/// Deletes a hold and gives its amount back to the balance and the key's
/// headroom. Returns the amount, or `None` when there was no hold.
fn return_hold(conn: &Connection, request_id: &str) -> Result<Option<i64>> {
    let Some(hold) = take_hold(conn, request_id)? else {
        return Ok(None);
    };
    add_to_balance(conn, &hold.account_id, hold.amount).map_err(after_write)?;
    conn.prepare_cached("UPDATE api_keys SET reserved = reserved - ?2 WHERE id = ?1")
        .map_err(db)?
        .execute(params![hold.key_id, hold.amount])
        .map_err(db)?;
    Ok(Some(hold.amount))
}

fn add_to_balance(conn: &Connection, account_id: &str, amount: i64) -> Result<()> {
    let done = conn
        .prepare_cached("UPDATE accounts SET balance = balance + ?2 WHERE id = ?1")
        .map_err(db)?
        .execute(params![account_id, amount])
        .map_err(db)?;
    if done == 0 {
        return Err(StoreError::NotFound(format!("account {account_id}")));
    }
    Ok(())
}

fn add_ledger(conn: &Connection, u: &UsageRecord, account_id: &str, kind: LedgerKind, amount: i64) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO ledger (account_id, kind, amount, request_id, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .map_err(db)?
    .execute(params![account_id, kind.as_str(), amount, u.request_id, u.created_at])
    .map_err(db)?;
    Ok(())
}

fn balance_of(conn: &Connection, account_id: &str) -> Result<i64> {
    conn.prepare_cached("SELECT balance FROM accounts WHERE id = ?1")
        .map_err(db)?
        .query_row([account_id], |r| r.get(0))
        .optional()
        .map_err(db)?
        .ok_or_else(|| StoreError::NotFound(format!("account {account_id}")))
}

/// A "not found" once a job has written is no longer clean (see [`is_clean`]).
fn after_write(e: StoreError) -> StoreError {
    match e {
        StoreError::NotFound(what) => StoreError::Corrupt(format!("{what} vanished part-way through a job")),
        other => other,
    }
}

/// See the crate docs: the usage record is the settlement's claim, so a
/// second settle of the same request stops at the first statement.
fn settle_one(conn: &Connection, u: &UsageRecord) -> Result<SettleOutcome> {
    let reward = rules::payable_reward(u);
    let balance = balance_of(conn, &u.account_id)?;
    let inserted = conn
        .prepare_cached(
            "INSERT INTO usage_records (request_id, account_id, key_id, device_id, \
             provider_account_id, provision_id, service, model, input_tokens, output_tokens, \
             characters, pages, latency_ms, ttfb_ms, status, cost, reward, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18) \
             ON CONFLICT (request_id) DO NOTHING",
        )
        .map_err(db)?
        .execute(params![
            u.request_id,
            u.account_id,
            u.key_id,
            u.device_id,
            u.provider_account_id,
            u.provision_id,
            u.service.as_str(),
            u.model,
            u.input_tokens,
            u.output_tokens,
            u.characters,
            u.pages,
            u.latency_ms,
            u.ttfb_ms,
            u.status,
            u.cost,
            reward,
            u.created_at
        ])
        .map_err(db)?;
    if inserted == 0 {
        return Ok(SettleOutcome::AlreadySettled);
    }

    // The hold goes back and the charge comes off in one balance update when
    // both concern the same account, which is the normal case.
    let hold = take_hold(conn, &u.request_id)?;
    let (balance, returned_here) = match &hold {
        Some(h) if h.account_id == u.account_id => (balance, h.amount),
        Some(h) => {
            add_to_balance(conn, &h.account_id, h.amount).map_err(after_write)?;
            (balance, 0)
        }
        None => (balance, 0),
    };
    let charge = rules::clamp_charge(u.cost, balance + returned_here);
    if charge != u.cost {
        conn.prepare_cached("UPDATE usage_records SET cost = ?2 WHERE request_id = ?1")
            .map_err(db)?
            .execute(params![u.request_id, charge])
            .map_err(db)?;
    }
    if returned_here != charge {
        add_to_balance(conn, &u.account_id, returned_here - charge).map_err(after_write)?;
    }
    if charge > 0 {
        add_ledger(conn, u, &u.account_id, LedgerKind::Charge, -charge)?;
    }
    // Likewise one update for the key, unless the hold came through another.
    let released_here = match &hold {
        Some(h) if h.key_id == u.key_id => h.amount,
        Some(h) => {
            conn.prepare_cached("UPDATE api_keys SET reserved = reserved - ?2 WHERE id = ?1")
                .map_err(db)?
                .execute(params![h.key_id, h.amount])
                .map_err(db)?;
            0
        }
        None => 0,
    };
    conn.prepare_cached(
        "UPDATE api_keys SET spent = spent + ?2, reserved = reserved - ?3, last_used_at = ?4 WHERE id = ?1",
    )
    .map_err(db)?
    .execute(params![u.key_id, charge, released_here, u.created_at])
    .map_err(db)?;
    if let (Some(provider), true) = (&u.provider_account_id, reward > 0) {
        add_to_balance(conn, provider, reward).map_err(after_write)?;
        add_ledger(conn, u, provider, LedgerKind::Reward, reward)?;
    }
    conn.prepare_cached(
        "INSERT INTO daily_rollups (day, account_id, device_id, service, model, requests, \
         errors, input_tokens, output_tokens, cost, reward) \
         VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6, ?7, ?8, ?9, ?10) \
         ON CONFLICT (day, account_id, device_id, service, model) DO UPDATE SET \
         requests = daily_rollups.requests + 1, \
         errors = daily_rollups.errors + excluded.errors, \
         input_tokens = daily_rollups.input_tokens + excluded.input_tokens, \
         output_tokens = daily_rollups.output_tokens + excluded.output_tokens, \
         cost = daily_rollups.cost + excluded.cost, \
         reward = daily_rollups.reward + excluded.reward",
    )
    .map_err(db)?
    .execute(params![
        day_of(u.created_at),
        u.account_id,
        u.device_id.as_deref().unwrap_or(""),
        u.service.as_str(),
        u.model,
        rules::is_error(u.status),
        u.input_tokens,
        u.output_tokens,
        charge,
        reward
    ])
    .map_err(db)?;
    Ok(SettleOutcome::Settled)
}
