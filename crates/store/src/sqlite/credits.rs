//! Holds and settlement on SQLite, with group commit.
//!
//! A hold writes nothing: it reads the account and key on a connection of
//! its own, beside the writer, and is kept in memory (`holds.rs`, decision
//! 58); such a connection keeps its read transaction for the holds after
//! it until the writer's next commit ([`Reader`], decision 68). A
//! settlement is the one write transaction per request.
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
//! Under load many jobs share one commit, and the counters they all add to
//! (balances, key spend, daily roll-ups) are written once per commit rather
//! than once per job (`pending.rs`); at concurrency 1 each job has its own,
//! and the cost is a few statements on a cached connection. At low
//! load (the job is the only one in progress, and so were the few before
//! it) the caller runs its job itself on the same connection (behind a
//! mutex) instead of handing it to the thread and waiting to be woken: that
//! saves two thread wake-ups per job. Otherwise jobs queue and share commits
//! as before (running them on the callers' async threads under load was
//! measured to cost throughput: every job then pays its own commit).
//!
//! Once the store serves (it holds the file's serving claim), a settlement
//! whose request holds credits here does not wait for any of this: it goes
//! to the settlement journal (`journal.rs`, decision 57) and to the thread's
//! queue, and its caller goes on; the thread applies it in its next batch.
//! Reads wait for what is journaled ([`CreditWriter::caught_up`]).
//!
//! Journaled settlements that arrive while the thread is busy gather beside
//! it (decision 65): when it finishes a batch and some wait, it takes them
//! once [`APPLY_AT`] have gathered, [`APPLY_WITHIN`] after it saw the first,
//! or with another job it is sent (a read's barrier among them), whichever
//! comes first. Under load that makes batches larger and commits fewer. A
//! thread asleep with nothing waiting is woken by the next settlement and
//! applies it at once, as before: at low load, waiting for company measured
//! slower (the request's own cores then go idle between requests, and a
//! virtual machine's idle cores wake slowly).

use std::collections::{HashSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use rusqlite::{params, CachedStatement, Connection, OpenFlags, OptionalExtension};
use tokio::sync::oneshot;

use super::holds::{Holds, Settling, Standing, Undo};
use super::journal::{Journal, Ticket};
use super::pending::Pending;
use crate::{rules, HoldOutcome, HoldRequest, LedgerKind, Millis, Result, SettleOutcome, StoreError, UsageRecord};

/// How long the writer waits for another connection's write to finish.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Most jobs in one transaction: bounds the time the first of them waits.
const MAX_BATCH: usize = 256;

/// Journaled settlements waiting that a busy writer thread, its batch done,
/// takes at once rather than waiting up to [`APPLY_WITHIN`] for more.
const APPLY_AT: usize = 64;

/// Longest a journaled settlement waits for the writer thread once the
/// thread has seen it: the staleness of the database file for readers that
/// do not go through this store (another process, `admin` commands); reads
/// through it wait for every settlement (see [`CreditWriter::caught_up`]).
const APPLY_WITHIN: Duration = Duration::from_millis(10);

/// Connections that decide holds beside the writer: about one per worker
/// thread of the gateway's runtime, so that a hold rarely finds them all
/// busy (it then goes to the writer). At least two, at most eight.
fn readers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8))
}

/// Times a hold decided beside the writer is read again when the writer's
/// transaction ended during the read, before it queues for the writer.
const READ_AGAIN: usize = 2;

/// Longest a reader keeps one read transaction open for the holds it decides
/// (decision 68). While the writer commits nothing, the rows a hold reads
/// cannot change but through another connection (an `admin` command in
/// another process, say), and such a change is seen by holds at most this
/// long after it, like the database file lags the journal by up to
/// [`APPLY_WITHIN`].
const SNAPSHOT_FOR: Duration = Duration::from_millis(10);

/// Jobs in a row that must have found no other in progress before callers
/// run theirs themselves. Measured on 2 cores: with 4, throughput at
/// concurrency 16 fell 10 % (bursts in lockstep look quiet between batches,
/// and inline jobs each pay a commit); with 32 it did not, and concurrency 1
/// keeps the gain.
const QUIET_STREAK: usize = 32;

enum Op {
    Hold(HoldRequest),
    Settle(Box<UsageRecord>),
    /// A settlement already in the journal, whose caller has gone on.
    Journaled(Box<UsageRecord>, Ticket),
    Adjust(Box<Adjustment>),
    /// Answered once every job queued before it is done.
    Barrier,
}

/// What the writer thread is sent.
enum Msg {
    Job(Job),
    /// A caller that ran its job itself asks for a checkpoint.
    Checkpoint,
    /// Journaled settlements wait (see [`Shared::deferred`]).
    Wake,
}

enum Done {
    Hold(HoldOutcome),
    Settle(SettleOutcome),
    /// The balance shown after an adjustment.
    Adjusted(i64),
    Barrier,
}

/// An operator's change to a balance. It runs here, under the connection's
/// lock, because a debit must be checked against the holds in memory, and a
/// hold may be placed at any moment without SQLite's write lock.
struct Adjustment {
    account_id: String,
    amount: i64,
    note: String,
}

struct Job {
    op: Op,
    /// `None` for a journaled settlement: nobody waits for it.
    reply: Option<oneshot::Sender<Result<Done>>>,
}

/// Handle to the writer thread. Dropping the last handle ends the thread
/// after the jobs already queued.
pub(super) struct CreditWriter {
    jobs: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
    /// Dropped with the writer, which ends the WAL copier thread.
    _copier: mpsc::Sender<()>,
    /// Joined on drop, so that the settlements still queued (journaled ones
    /// included) are in the database when the store is gone.
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for CreditWriter {
    fn drop(&mut self) {
        // Closing the queue ends the thread once it has run what is queued.
        let (closed, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.jobs, closed));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What callers and the writer thread share.
struct Shared {
    conn: Mutex<Connection>,
    /// Read committed rows for holds decided beside the writer.
    readers: Vec<Mutex<Reader>>,
    /// How long what a reader read serves later holds ([`SNAPSHOT_FOR`]).
    snapshot_for: Duration,
    /// Bumped by each checkpoint: a reader's snapshot from before it is not
    /// used again (see [`Reader`]).
    checkpoints: AtomicU64,
    /// Taken after `conn` when both are needed (see `holds.rs`).
    holds: Mutex<Holds>,
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
    /// Set once the store serves (`serve_journal`); taken before `holds`.
    journal: Mutex<Option<Journal>>,
    /// Journaled settlements that the thread has yet to take, oldest first.
    /// Each is counted in `journaled` only once it is here, so a barrier
    /// sent after that count finds it here or already applied.
    deferred: Mutex<Vec<Job>>,
    /// The thread sleeps with no deadline: the next journaled settlement
    /// wakes it, and it applies that one at once.
    parked: AtomicBool,
    /// Journaled settlements queued, and those the thread has finished.
    journaled: AtomicU64,
    finished: AtomicU64,
    /// Provider accounts a settlement has paid a reward to. Only rewards to
    /// these are journaled: a reward to an account that does not exist must
    /// fail before the client sees the end of the answer.
    paid: Mutex<HashSet<String>>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn holds(&self) -> std::sync::MutexGuard<'_, Holds> {
        self.holds.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn deferred(&self) -> std::sync::MutexGuard<'_, Vec<Job>> {
        self.deferred.lock().unwrap_or_else(PoisonError::into_inner)
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

    fn new(conn: Connection, readers: Vec<Connection>) -> Self {
        Shared {
            conn: Mutex::new(conn),
            readers: readers.into_iter().map(|conn| Mutex::new(Reader::new(conn))).collect(),
            snapshot_for: SNAPSHOT_FOR,
            checkpoints: AtomicU64::new(0),
            holds: Mutex::new(Holds::default()),
            active: AtomicUsize::new(0),
            alone_streak: AtomicUsize::new(0),
            checkpointed_ms: AtomicU64::new(0),
            checkpoint_asked: AtomicBool::new(false),
            epoch: Instant::now(),
            journal: Mutex::new(None),
            deferred: Mutex::new(Vec::new()),
            parked: AtomicBool::new(false),
            journaled: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            paid: Mutex::new(HashSet::new()),
        }
    }

    fn checkpoint(&self, conn: &Connection) {
        // A reader's open snapshot keeps the WAL frames after it from being
        // copied and the WAL from starting over: end those of idle readers,
        // and tell busy ones not to use theirs again.
        self.checkpoints.fetch_add(1, Ordering::AcqRel);
        for reader in &self.readers {
            if let Ok(mut reader) = reader.try_lock() {
                reader.end();
            }
        }
        checkpoint(conn);
        self.checkpointed_ms.store(self.now_ms(), Ordering::Relaxed);
        self.checkpoint_asked.store(false, Ordering::Relaxed);
    }
}

impl CreditWriter {
    /// Opens its own connection to `path` (which the sqlx pools opened and
    /// migrated already) and starts the thread.
    pub(super) fn start(path: &Path) -> Result<Self> {
        let readers = (0..readers())
            .map(|_| open(path, Role::Reader))
            .collect::<Result<Vec<_>>>()?;
        let shared = Arc::new(Shared::new(open(path, Role::Writer)?, readers));
        let copier_conn = open(path, Role::Copier)?;
        let (jobs, rx) = mpsc::channel();
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("cxmpute-credits".into())
            .spawn(move || run(&thread_shared, rx))
            .map_err(|e| StoreError::Corrupt(format!("cannot start the credit writer thread: {e}")))?;
        let (copier, stop) = mpsc::channel();
        std::thread::Builder::new()
            .name("cxmpute-wal-copy".into())
            .spawn(move || copy_wal(&copier_conn, &stop))
            .map_err(|e| StoreError::Corrupt(format!("cannot start the WAL copier thread: {e}")))?;
        Ok(CreditWriter {
            jobs,
            shared,
            _copier: copier,
            thread: Some(thread),
        })
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
                let began = begin(conn, &self.shared, &op).is_ok();
                let _ = conn.busy_timeout(BUSY_TIMEOUT);
                began
            });
            if let Some(conn) = began {
                let result = finish_alone(&conn, &self.shared, &op);
                drop(conn);
                // Checkpoints stay on the thread, off the request path.
                if self.shared.checkpoint_due() && !self.shared.checkpoint_asked.swap(true, Ordering::Relaxed) {
                    let _ = self.jobs.send(Msg::Checkpoint);
                }
                return result;
            }
        }
        self.queue(op).await
    }

    /// Queues a job for the thread and waits for its answer.
    async fn queue(&self, op: Op) -> Result<Done> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Msg::Job(Job { op, reply: Some(reply) }))
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Applies the settlements a previous gateway left in the journal beside
    /// `database`, then settles through the journal from now on. Called when
    /// this store starts serving (it holds the file's serving claim, so no
    /// other process uses the journal).
    pub(super) async fn serve_journal(&self, database: &Path) -> Result<()> {
        let journal_error = |e: std::io::Error| StoreError::Corrupt(format!("settlement journal: {e}"));
        let (mut journal, left) = Journal::open(database).map_err(journal_error)?;
        // Most records were applied before the previous gateway stopped (a
        // file is emptied only when it takes over); those stop at the usage
        // record's key.
        let (mut settled, mut failed) = (0u64, 0u64);
        for usage in left {
            let request_id = usage.request_id.clone();
            match self.queue(Op::Settle(Box::new(usage))).await {
                Ok(Done::Settle(SettleOutcome::AlreadySettled)) => {}
                Ok(_) => settled += 1,
                Err(e) => {
                    failed += 1;
                    tracing::error!(%request_id, error = %e, "a settlement from the journal could not be applied");
                }
            }
        }
        if settled + failed > 0 {
            tracing::info!(
                settled,
                failed,
                "applied the settlements a previous gateway left in its journal"
            );
        }
        journal.start().map_err(journal_error)?;
        *self.shared.journal.lock().unwrap_or_else(PoisonError::into_inner) = Some(journal);
        Ok(())
    }

    /// Waits until the settlements journaled so far are in the database, so
    /// that a read sees every settlement whose request has ended.
    pub(super) async fn caught_up(&self) {
        if self.shared.finished.load(Ordering::Acquire) >= self.shared.journaled.load(Ordering::Acquire) {
            return;
        }
        let _ = self.queue(Op::Barrier).await;
    }

    /// Settles through the journal when this store serves and the request
    /// holds credits here; `Err` gives the record back for the synchronous way.
    fn settle_journaled(&self, usage: Box<UsageRecord>) -> std::result::Result<SettleOutcome, Box<UsageRecord>> {
        let mut guard = self.shared.journal.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(journal) = guard.as_mut() else {
            return Err(usage);
        };
        if let (Some(provider), true) = (&usage.provider_account_id, rules::payable_reward(&usage) > 0) {
            if !self
                .shared
                .paid
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(provider)
            {
                return Err(usage);
            }
        }
        let before = match self.shared.holds().begin_settling(&usage) {
            Settling::Absent => return Err(usage),
            Settling::Already => return Ok(SettleOutcome::AlreadySettled),
            Settling::Started(before) => before,
        };
        let ticket = match journal.append(&usage) {
            Ok(Some(ticket)) => ticket,
            refused => {
                if let Err(e) = refused {
                    tracing::warn!(error = %e, "cannot write the settlement journal; settling synchronously");
                }
                self.shared.holds().cancel_settling(&usage.request_id, before);
                return Err(usage);
            }
        };
        // The thread takes the journal's lock when it has applied the record:
        // free it before handing the record over.
        drop(guard);
        let job = Job {
            op: Op::Journaled(usage, ticket),
            reply: None,
        };
        let waiting = {
            let mut deferred = self.shared.deferred();
            deferred.push(job);
            deferred.len()
        };
        self.shared.journaled.fetch_add(1, Ordering::AcqRel);
        // Wake the thread only when it sleeps with no deadline (it then
        // applies this one at once) or when enough wait: a busy thread
        // looks for them after its batch.
        if (waiting == APPLY_AT || self.shared.parked.swap(false, Ordering::SeqCst))
            && self.jobs.send(Msg::Wake).is_err()
        {
            // The thread is gone (the store is closing): the record stays in
            // the journal for the next start.
            tracing::warn!("the credit writer stopped; a settlement waits in the journal");
        }
        Ok(SettleOutcome::Settled)
    }

    pub(super) async fn hold(&self, hold: HoldRequest) -> Result<HoldOutcome> {
        rules::check_hold(&hold)?;
        if let Some(outcome) = self.hold_beside(&hold)? {
            return Ok(outcome);
        }
        match self.submit(Op::Hold(hold)).await? {
            Done::Hold(outcome) => Ok(outcome),
            _ => Err(mismatch()),
        }
    }

    /// Decides a hold on a reader connection, from committed rows and what
    /// the writer's open transaction owes (`holds.rs`), without waiting for
    /// the writer. `None` leaves the hold to the writer: every reader is busy,
    /// the writer's transaction kept ending during the read, the read failed,
    /// or the answer is a refusal (which the writer's exact view confirms:
    /// between its commit and the end of its transaction, a charge counts
    /// twice here, never less than once).
    fn hold_beside(&self, hold: &HoldRequest) -> Result<Option<HoldOutcome>> {
        Ok(decide_beside(&self.shared, hold)?.filter(|outcome| *outcome == HoldOutcome::Held))
    }

    /// See [`crate::AdminStore::adjust_balance`]: refused when a debit would
    /// leave less than the running requests hold.
    pub(super) async fn adjust(&self, account_id: &str, amount: i64, note: &str) -> Result<i64> {
        let adjustment = Adjustment {
            account_id: account_id.to_string(),
            amount,
            note: note.to_string(),
        };
        match self.submit(Op::Adjust(Box::new(adjustment))).await? {
            Done::Adjusted(balance) => Ok(balance),
            _ => Err(mismatch()),
        }
    }

    /// Returns holds in full. Nothing to write: the balance never lost them.
    pub(super) fn release<'a>(&self, request_ids: impl IntoIterator<Item = &'a str>) -> u64 {
        self.shared.holds().release(request_ids)
    }

    pub(super) fn release_expired(&self, now: Millis) -> u64 {
        self.shared.holds().release_expired(now)
    }

    pub(super) fn release_all(&self) -> u64 {
        self.shared.holds().release_all()
    }

    /// What the running requests of an account hold (still in its database balance).
    pub(super) fn held(&self, account_id: &str) -> i64 {
        self.shared.holds().held_by_account(account_id)
    }

    pub(super) async fn settle(&self, usage: UsageRecord) -> Result<SettleOutcome> {
        rules::check_usage(&usage)?;
        let usage = match self.settle_journaled(Box::new(usage)) {
            Ok(outcome) => return Ok(outcome),
            Err(usage) => usage,
        };
        let paid = usage
            .provider_account_id
            .clone()
            .filter(|_| rules::payable_reward(&usage) > 0);
        match self.submit(Op::Settle(usage)).await? {
            Done::Settle(outcome) => {
                if let (Some(provider), SettleOutcome::Settled) = (paid, outcome) {
                    self.shared
                        .paid
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(provider);
                }
                Ok(outcome)
            }
            _ => Err(mismatch()),
        }
    }
}

/// Decides a hold on a free reader connection (see
/// [`CreditWriter::hold_beside`]), or on the standing of its key that an
/// earlier hold read since the writer's transaction last ended (decision
/// 69); `None` when no reader is free, the read fails, or the writer's
/// transaction ended during each read.
fn decide_beside(shared: &Shared, hold: &HoldRequest) -> Result<Option<HoldOutcome>> {
    {
        let mut holds = shared.holds();
        if let Some(standing) = holds.known_standing(hold, shared.snapshot_for) {
            return holds.place_committed(hold, &standing).map(Some);
        }
    }
    let Some(mut reader) = shared.readers.iter().find_map(|reader| reader.try_lock().ok()) else {
        return Ok(None);
    };
    for _ in 0..READ_AGAIN {
        // A snapshot begins after this load, so a transaction that ends
        // after it changes the generation seen below.
        let generation = shared.holds().generation();
        let checkpoints = shared.checkpoints.load(Ordering::Acquire);
        if !reader.snapshot_usable(generation, checkpoints, shared.snapshot_for)
            && reader.begin(generation, checkpoints).is_err()
        {
            return Ok(None);
        }
        let Ok(standing) = standing(&reader.conn, hold, &Pending::default()) else {
            reader.end();
            return Ok(None);
        };
        let mut holds = shared.holds();
        if holds.generation() == generation {
            if let Some(began) = reader.began() {
                holds.remember_standing(hold, standing, began);
            }
            return holds.place_committed(hold, &standing).map(Some);
        }
        drop(holds);
        reader.end();
    }
    Ok(None)
}

/// A connection that decides holds beside the writer, and the read
/// transaction it keeps open between them (decision 68).
///
/// Holds read committed rows and add what the writer owes in memory; that
/// sum is right as long as no writer transaction ended since the read's
/// snapshot began ([`Holds::generation`]), however old the snapshot. So a
/// reader keeps its snapshot for the next holds until the writer's next
/// transaction ends, a checkpoint runs, or [`SNAPSHOT_FOR`] has passed. Under
/// load that saves a read transaction per hold (its locks, its `fcntl` calls)
/// and the pages every new snapshot reads again after a commit.
struct Reader {
    conn: Connection,
    /// The open snapshot: the generation and checkpoint count when it began,
    /// and when.
    snapshot: Option<(u64, u64, Instant)>,
}

impl Reader {
    fn new(conn: Connection) -> Self {
        Reader { conn, snapshot: None }
    }

    /// When the open snapshot began.
    fn began(&self) -> Option<Instant> {
        self.snapshot.map(|(_, _, began)| began)
    }

    fn snapshot_usable(&self, generation: u64, checkpoints: u64, max_age: Duration) -> bool {
        self.snapshot
            .is_some_and(|(g, c, began)| g == generation && c == checkpoints && began.elapsed() < max_age)
    }

    /// Ends the open snapshot, if any, and opens a transaction whose first
    /// read takes the next one.
    fn begin(&mut self, generation: u64, checkpoints: u64) -> rusqlite::Result<()> {
        self.end();
        self.conn.execute_batch("BEGIN")?;
        self.snapshot = Some((generation, checkpoints, Instant::now()));
        Ok(())
    }

    fn end(&mut self) {
        if self.snapshot.take().is_some() && !self.conn.is_autocommit() {
            // Ending a read-only transaction cannot fail for a reason that
            // leaves it open; should it, the next `begin` fails and the hold
            // goes to the writer.
            let _ = self.conn.execute_batch("COMMIT");
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

/// Which of the two connections [`open`] makes.
#[derive(Clone, Copy, PartialEq)]
enum Role {
    /// Commits: opened through the VFS that writes a commit's WAL frames at
    /// once (`walbuf.rs`), with the sync that VFS sends them at.
    Writer,
    /// Only copies the WAL into the database file: SQLite's default VFS.
    Copier,
    /// Only reads, for holds decided beside the writer: SQLite's default VFS.
    Reader,
}

/// The writer's own connection to `path` (which the sqlx pools opened and
/// migrated already), or the WAL copier's.
fn open(path: &Path, role: Role) -> Result<Connection> {
    let conn = match role {
        Role::Writer => {
            super::walbuf::register().map_err(StoreError::Sqlite)?;
            Connection::open_with_flags_and_vfs(path, OpenFlags::default(), super::walbuf::NAME)
        }
        Role::Copier | Role::Reader => Connection::open(path),
    }
    .map_err(db)?;
    if role == Role::Reader {
        // It reads on an async thread: never wait there (a busy read leaves
        // the hold to the writer), never write.
        conn.execute_batch("PRAGMA query_only = ON;").map_err(db)?;
        conn.busy_timeout(Duration::ZERO).map_err(db)?;
        conn.set_prepared_statement_cache_capacity(4);
        return Ok(conn);
    }
    conn.busy_timeout(BUSY_TIMEOUT).map_err(db)?;
    // temp_store: statement journals stay in memory, not in a temp file.
    conn.execute_batch("PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL; PRAGMA temp_store = MEMORY;")
        .map_err(db)?;
    if role == Role::Writer {
        // NORMAL's durability still (see `walbuf.rs`).
        super::walbuf::configure(&conn)?;
    }
    conn.set_prepared_statement_cache_capacity(32);
    // Checkpoints (copying the WAL back into the database file) would run
    // inside a commit, stalling the whole batch; the writer thread runs them
    // itself between batches instead (see `run`).
    // The WAL restarts from its beginning after each full checkpoint; the
    // size limit then trims what a burst left behind (see `WAL_KEPT`).
    conn.execute_batch(&format!(
        "PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = {WAL_KEPT};"
    ))
    .map_err(db)?;
    Ok(conn)
}

fn stopped() -> StoreError {
    StoreError::Corrupt("the credit writer thread stopped".into())
}

fn mismatch() -> StoreError {
    StoreError::Corrupt("the credit writer answered another kind of job".into())
}

pub(super) fn db(e: rusqlite::Error) -> StoreError {
    StoreError::Sqlite(e.to_string())
}

fn run(shared: &Shared, rx: mpsc::Receiver<Msg>) {
    yield_to_wakers();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut results = Vec::with_capacity(MAX_BATCH);
    let mut undo = Vec::new();
    let mut pending = Pending::default();
    // Jobs received but not yet run: they wait while the journaled
    // settlements sent before them are more than a batch.
    let mut backlog = VecDeque::new();
    let mut asked = false;
    let mut closing = false;
    // Journaled settlements were left for the next batch (over `MAX_BATCH`).
    let mut behind = false;
    let mut since = None;
    loop {
        if backlog.is_empty() && !closing && !behind {
            match wait(shared, &rx, &mut since) {
                Woken::Message(Msg::Job(job)) => backlog.push_back(job),
                Woken::Message(Msg::Checkpoint) => asked = true,
                Woken::Message(Msg::Wake) | Woken::Due => {}
                Woken::Closed => closing = true,
            }
        }
        // What was sent before the journaled settlements are taken: a
        // barrier among them must find every settlement counted before it.
        while let Ok(msg) = rx.try_recv() {
            match msg {
                Msg::Job(job) => backlog.push_back(job),
                Msg::Checkpoint => asked = true,
                Msg::Wake => {}
            }
        }
        let all_taken = {
            let mut deferred = shared.deferred();
            let take = deferred.len().min(MAX_BATCH);
            batch.extend(deferred.drain(..take));
            deferred.is_empty()
        };
        since = None;
        behind = !all_taken;
        if all_taken {
            while batch.len() < MAX_BATCH {
                let Some(job) = backlog.pop_front() else { break };
                batch.push(job);
            }
        }
        if batch.is_empty() && closing && backlog.is_empty() {
            break;
        }
        let conn = shared.lock();
        if !batch.is_empty() && run_batch(&conn, shared, &batch, &mut results, &mut undo, &mut pending).is_err() {
            // One job broke the shared transaction (or the commit failed):
            // nothing of the batch happened. Run each job on its own, so only
            // the job at fault fails.
            let _ = exec(&conn, "ROLLBACK");
            {
                let mut holds = shared.holds();
                holds.undo(&mut undo);
                holds.end_transaction();
            }
            results.clear();
            results.extend(batch.iter().map(|job| run_alone(&conn, shared, &job.op)));
        } else {
            shared.holds().end_transaction();
        }
        undo.clear();
        count_journaled(shared, &batch, &results);
        for (job, result) in batch.drain(..).zip(results.drain(..)) {
            if let Some(reply) = job.reply {
                let _ = reply.send(result);
            }
        }
        if std::mem::take(&mut asked) || shared.checkpoint_due() {
            shared.checkpoint(&conn);
        }
    }
    shared.checkpoint(&shared.lock());
}

/// Why the writer thread stopped waiting.
enum Woken {
    Message(Msg),
    /// Enough journaled settlements wait, or the oldest has waited long enough.
    Due,
    /// Every handle to the writer is gone.
    Closed,
}

/// Sleeps until a job comes, or journaled settlements are due: at once when
/// [`APPLY_AT`] wait, otherwise [`APPLY_WITHIN`] after the thread first saw
/// one (`since`). With none waiting it sleeps with no deadline, and the next
/// one wakes it (`Shared::parked`) and is due at once.
fn wait(shared: &Shared, rx: &mpsc::Receiver<Msg>, since: &mut Option<Instant>) -> Woken {
    loop {
        let waiting = shared.deferred().len();
        if waiting >= APPLY_AT {
            return Woken::Due;
        }
        let idle = waiting == 0;
        let received = if idle {
            *since = None;
            // Parked before looking again, so that a settlement queued after
            // the look sees the flag and wakes the thread.
            shared.parked.store(true, Ordering::SeqCst);
            if !shared.deferred().is_empty() {
                shared.parked.store(false, Ordering::SeqCst);
                continue;
            }
            let received = rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected);
            shared.parked.store(false, Ordering::SeqCst);
            received
        } else {
            let due = *since.get_or_insert_with(Instant::now) + APPLY_WITHIN;
            match due.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => rx.recv_timeout(left),
                _ => return Woken::Due,
            }
        };
        match received {
            // Woken from a sleep with no deadline, the thread applies the
            // settlement at once (the load is low); otherwise a wake says
            // that `APPLY_AT` wait.
            Ok(Msg::Wake) if idle => return Woken::Due,
            Ok(Msg::Wake) => continue,
            Ok(msg) => return Woken::Message(msg),
            Err(mpsc::RecvTimeoutError::Timeout) => return Woken::Due,
            Err(mpsc::RecvTimeoutError::Disconnected) => return Woken::Closed,
        }
    }
}

/// Tells the journal which of its records are now in the database (or failed
/// for good), before any job of the batch is answered.
fn count_journaled(shared: &Shared, batch: &[Job], results: &[Result<Done>]) {
    let mut journal = None;
    let mut finished = 0;
    for (job, result) in batch.iter().zip(results) {
        let Op::Journaled(usage, ticket) = &job.op else {
            continue;
        };
        if let Err(e) = result {
            tracing::error!(request_id = %usage.request_id, error = %e,
                "a journaled settlement could not be applied; it stays in the journal for the next start");
        }
        let journal = journal.get_or_insert_with(|| shared.journal.lock().unwrap_or_else(PoisonError::into_inner));
        if let Some(journal) = journal.as_mut() {
            journal.applied(*ticket, result.is_ok());
        }
        finished += 1;
    }
    if finished > 0 {
        shared.finished.fetch_add(finished, Ordering::AcqRel);
    }
}

/// How often, at most, the WAL is copied back into the database file. Rows
/// that change on every request (balances, keys, roll-ups) are copied once
/// per period instead of once per commit that touched them.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// The WAL size kept when it restarts (`journal_size_limit`), in bytes. At
/// concurrency 1 each settlement is a commit of its own (about 13 pages), so
/// the WAL grows by tens of MB between two checkpoints on a fast machine. A
/// limit below that truncated the file after every checkpoint and let it
/// grow again, making the file system free and allocate its blocks each
/// time (an `ftruncate` of 3.3 ms was seen beside one of the slowest
/// requests at concurrency 1). Above it the WAL is only overwritten in place.
const WAL_KEPT: u64 = 64 << 20;

/// Copies the WAL back into the database. Run by the writer between batches:
/// with no write in progress the checkpoint can take every frame, so the next
/// transaction starts the WAL over instead of growing it. (A checkpoint from
/// another thread, under constant load, would never catch up: see
/// [`copy_wal`] for the part another thread does take.)
fn checkpoint(conn: &Connection) {
    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
        tracing::warn!(error = %e, "WAL checkpoint failed; will retry");
    }
}

/// Copies the WAL into the database file on a thread and connection of its
/// own, as often as the writer does, while the writer goes on with its
/// batches. The writer's own checkpoint then finds most frames copied and
/// holds the jobs queued behind it only for the rest: on a large file, where
/// a checkpoint writes pages scattered over it, that pause was the longest
/// wait a request saw (decision 53). Ends when the writer is dropped.
fn copy_wal(conn: &Connection, stop: &mpsc::Receiver<()>) {
    yield_to_wakers();
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY) {
        checkpoint(conn);
    }
}

/// Makes the calling thread a batch thread (Linux `SCHED_BATCH`): woken, it
/// does not preempt the thread that woke it. A request's worker wakes the
/// credit writer with the settlement it has just journaled, before it writes
/// the end of the answer to the client; as an ordinary thread the writer
/// took the worker's core at once and ran its whole commit first, which
/// delayed that write by the commit's length (decision 60). As a batch
/// thread it runs on a free core, or once the worker waits.
fn yield_to_wakers() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: a system call about the calling thread (0), with a valid
        // parameter that outlives it.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "cannot make the thread a batch thread");
        }
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
/// failed part-way or the commit failed: the caller then rolls back, and
/// `pending` is already empty.
fn run_batch(
    conn: &Connection,
    shared: &Shared,
    batch: &[Job],
    results: &mut Vec<Result<Done>>,
    undo: &mut Vec<Undo>,
    pending: &mut Pending,
) -> Result<()> {
    let outcome = exec(conn, "BEGIN IMMEDIATE").and_then(|()| {
        let mut tx = Tx::new(conn);
        for job in batch {
            let result = apply(&mut tx, shared, &job.op, undo, pending);
            if let Err(e) = &result {
                if !is_clean(e) {
                    return Err(StoreError::Sqlite(e.to_string()));
                }
            }
            results.push(result);
        }
        pending.flush(conn)?;
        exec(conn, "COMMIT")
    });
    if outcome.is_err() {
        pending.clear();
    }
    outcome
}

fn run_alone(conn: &Connection, shared: &Shared, op: &Op) -> Result<Done> {
    begin(conn, shared, op)?;
    finish_alone(conn, shared, op)
}

/// Starts a write transaction for a job that writes, first ending one that a
/// panic left open. A hold only reads, in autocommit mode.
fn begin(conn: &Connection, shared: &Shared, op: &Op) -> Result<()> {
    if !conn.is_autocommit() {
        let _ = exec(conn, "ROLLBACK");
        shared.holds().end_transaction();
    }
    match op {
        Op::Hold(_) | Op::Barrier => Ok(()),
        Op::Settle(_) | Op::Journaled(..) | Op::Adjust(_) => exec(conn, "BEGIN IMMEDIATE"),
    }
}

/// Runs `op` in the transaction [`begin`] started, then commits (or rolls back).
fn finish_alone(conn: &Connection, shared: &Shared, op: &Op) -> Result<Done> {
    let mut undo = Vec::new();
    let mut pending = Pending::default();
    let result = apply(&mut Tx::new(conn), shared, op, &mut undo, &mut pending);
    if conn.is_autocommit() {
        return result;
    }
    let committed = result.and_then(|done| {
        pending.flush(conn)?;
        exec(conn, "COMMIT").map(|()| done)
    });
    if committed.is_err() {
        let _ = exec(conn, "ROLLBACK");
        let mut holds = shared.holds();
        holds.undo(&mut undo);
        holds.end_transaction();
    } else {
        shared.holds().end_transaction();
    }
    committed
}

/// A write transaction of the writer's connection, and the statements that
/// run once per settlement in it. rusqlite's statement cache hashes a
/// statement's text to find it and again to put it back, about 1.8 k
/// instructions a use; these are taken from it once per transaction.
struct Tx<'c> {
    conn: &'c Connection,
    insert_usage: Option<CachedStatement<'c>>,
    insert_ledger: Option<CachedStatement<'c>>,
}

impl<'c> Tx<'c> {
    fn new(conn: &'c Connection) -> Self {
        Tx {
            conn,
            insert_usage: None,
            insert_ledger: None,
        }
    }

    fn insert_usage(&mut self) -> Result<&mut CachedStatement<'c>> {
        cached(self.conn, &mut self.insert_usage, INSERT_USAGE)
    }

    fn insert_ledger(&mut self) -> Result<&mut CachedStatement<'c>> {
        cached(self.conn, &mut self.insert_ledger, INSERT_LEDGER)
    }
}

/// The statement in `slot`, taken from the connection's cache the first time.
fn cached<'s, 'c>(
    conn: &'c Connection,
    slot: &'s mut Option<CachedStatement<'c>>,
    sql: &str,
) -> Result<&'s mut CachedStatement<'c>> {
    if slot.is_none() {
        *slot = Some(conn.prepare_cached(sql).map_err(db)?);
    }
    slot.as_mut()
        .ok_or_else(|| StoreError::Sqlite(format!("statement not prepared: {sql}")))
}

const INSERT_USAGE: &str = "INSERT INTO usage_records (request_id, account_id, key_id, device_id, \
     provider_account_id, provision_id, service, model, input_tokens, output_tokens, \
     characters, pages, latency_ms, ttfb_ms, status, cost, reward, created_at) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18) \
     ON CONFLICT (request_id) DO NOTHING";

const INSERT_LEDGER: &str =
    "INSERT INTO ledger (account_id, kind, amount, request_id, created_at) VALUES (?1, ?2, ?3, ?4, ?5)";

fn apply(tx: &mut Tx<'_>, shared: &Shared, op: &Op, undo: &mut Vec<Undo>, pending: &mut Pending) -> Result<Done> {
    let conn = tx.conn;
    match op {
        Op::Hold(hold) => {
            let standing = standing(conn, hold, pending)?;
            shared.holds().place(hold, &standing, undo).map(Done::Hold)
        }
        Op::Settle(usage) | Op::Journaled(usage, _) => settle_one(tx, shared, usage, undo, pending).map(Done::Settle),
        Op::Barrier => Ok(Done::Barrier),
        Op::Adjust(adjustment) => adjust_one(conn, shared, adjustment, pending).map(Done::Adjusted),
    }
}

/// Decides first (an unknown account or a refused amount writes nothing),
/// then sets the balance and writes the ledger entry.
fn adjust_one(conn: &Connection, shared: &Shared, a: &Adjustment, pending: &mut Pending) -> Result<i64> {
    let balance = pending.stored_balance(conn, &a.account_id)? + pending.balance(&a.account_id);
    let held = {
        let mut holds = shared.holds();
        let held = holds.held_by_account(&a.account_id);
        let allowed = balance
            .checked_add(a.amount)
            .is_some_and(|adjusted| a.amount > 0 || adjusted - held >= 0);
        if !allowed {
            return Err(StoreError::InvalidInput(crate::admin::ADJUST_REFUSED.into()));
        }
        // A debit counts against holds decided beside the writer until it commits.
        holds.owe(&a.account_id, None, -a.amount);
        held
    };
    let adjusted = balance + a.amount;
    add_to_balance(conn, &a.account_id, a.amount).map_err(after_write)?;
    pending.stored_wrote(&a.account_id, a.amount);
    conn.prepare_cached(crate::admin::INSERT_LEDGER)
        .map_err(db)?
        .execute(params![
            a.account_id,
            LedgerKind::Adjust.as_str(),
            a.amount,
            a.note,
            crate::now_millis()
        ])
        .map_err(db)?;
    Ok(adjusted - held)
}

/// Reads what a hold is decided on (with what the transaction it runs in has
/// yet to write). The hold itself is placed in memory (`holds.rs`), under the
/// connection's lock, so no write can come between this read and the decision.
fn standing(conn: &Connection, hold: &HoldRequest, pending: &Pending) -> Result<Standing> {
    conn.prepare_cached(
        "SELECT a.suspended, k.revoked_at IS NOT NULL, a.balance, k.credit_limit, k.spent \
         FROM accounts a JOIN api_keys k ON k.account_id = a.id WHERE a.id = ?1 AND k.id = ?2",
    )
    .map_err(db)?
    .query_row(params![hold.account_id, hold.key_id], |r| {
        Ok(Standing {
            suspended: r.get(0)?,
            revoked: r.get(1)?,
            balance: r.get(2)?,
            credit_limit: r.get(3)?,
            spent: r.get(4)?,
        })
    })
    .optional()
    .map_err(db)?
    .map(|mut standing| {
        standing.balance += pending.balance(&hold.account_id);
        standing.spent += pending.spent(&hold.key_id);
        standing
    })
    .ok_or_else(|| StoreError::NotFound(format!("api key {} of account {}", hold.key_id, hold.account_id)))
}

pub(super) fn add_to_balance(conn: &Connection, account_id: &str, amount: i64) -> Result<()> {
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

fn add_ledger(tx: &mut Tx<'_>, u: &UsageRecord, account_id: &str, kind: LedgerKind, amount: i64) -> Result<()> {
    tx.insert_ledger()?
        .execute(params![account_id, kind.as_str(), amount, u.request_id, u.created_at])
        .map_err(db)?;
    Ok(())
}

pub(super) fn balance_of(conn: &Connection, account_id: &str) -> Result<i64> {
    conn.prepare_cached("SELECT balance FROM accounts WHERE id = ?1")
        .map_err(db)?
        .query_row([account_id], |r| r.get(0))
        .optional()
        .map_err(db)?
        .ok_or_else(|| StoreError::NotFound(format!("account {account_id}")))
}

/// A "not found" once a job has written is no longer clean (see [`is_clean`]).
pub(super) fn after_write(e: StoreError) -> StoreError {
    match e {
        StoreError::NotFound(what) => StoreError::Corrupt(format!("{what} vanished part-way through a job")),
        other => other,
    }
}

/// See the crate docs: the usage record is the settlement's claim, so a
/// second settle of the same request stops at the first statement. The hold
/// leaves memory (undone should the transaction not commit); the balance
/// only loses the charge, since it never lost the hold. The balances, the
/// key's spend and the roll-up are added to in `pending`, written at the
/// transaction's end.
fn settle_one(
    tx: &mut Tx<'_>,
    shared: &Shared,
    u: &UsageRecord,
    undo: &mut Vec<Undo>,
    pending: &mut Pending,
) -> Result<SettleOutcome> {
    let reward = rules::payable_reward(u);
    let conn = tx.conn;
    let balance = pending.stored_balance(conn, &u.account_id)? + pending.balance(&u.account_id);
    let inserted = tx
        .insert_usage()?
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

    // What the account may pay: its balance less what its other running
    // requests hold (this request's own hold has just left the map). The
    // charge counts for holds decided beside the writer until it commits.
    let charge = {
        let mut holds = shared.holds();
        holds.take(&u.request_id, undo);
        let charge = rules::clamp_charge(u.cost, balance - holds.held_by_account(&u.account_id));
        holds.owe(&u.account_id, Some(&u.key_id), charge);
        charge
    };
    if charge != u.cost {
        conn.prepare_cached("UPDATE usage_records SET cost = ?2 WHERE request_id = ?1")
            .map_err(db)?
            .execute(params![u.request_id, charge])
            .map_err(db)?;
    }
    if charge > 0 {
        add_ledger(tx, u, &u.account_id, LedgerKind::Charge, -charge)?;
    }
    if let (Some(provider), true) = (&u.provider_account_id, reward > 0) {
        add_ledger(tx, u, provider, LedgerKind::Reward, reward)?;
    }
    pending.settled(u, charge, reward);
    Ok(SettleOutcome::Settled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::{account_with, hold_of, key_of, usage_of};
    use crate::{SqliteStore, Store};

    fn job(op: Op) -> Job {
        let (reply, _) = oneshot::channel();
        Job { op, reply: Some(reply) }
    }

    fn settle(request_id: &str, key: &crate::ApiKey, cost: i64) -> Job {
        job(Op::Settle(Box::new(usage_of(request_id, key, cost, 0, None))))
    }

    fn adjust(account_id: &str, amount: i64, note: &str) -> Job {
        job(Op::Adjust(Box::new(Adjustment {
            account_id: account_id.to_string(),
            amount,
            note: note.to_string(),
        })))
    }

    /// The sum of the account's charge entries in the ledger.
    async fn charged(store: &SqliteStore, account_id: &str) -> i64 {
        store
            .ledger_sum(account_id, crate::LedgerKind::Charge)
            .await
            .expect("sum")
    }

    /// Runs `batch` as one transaction on the writer's connection, which must commit.
    fn commit_batch(shared: &Shared, batch: &[Job]) -> Vec<Result<Done>> {
        let (mut results, mut undo, mut pending) = (Vec::new(), Vec::new(), Pending::default());
        run_batch(&shared.lock(), shared, batch, &mut results, &mut undo, &mut pending).expect("batch commits");
        results
    }

    /// A store on a new file with an account of 1,000 credits, its key (with
    /// `limit`), and a writer connection of its own that tests run jobs on.
    async fn fixture(limit: Option<i64>) -> (tempfile::TempDir, SqliteStore, crate::ApiKey, Shared) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("credits.db");
        let store = SqliteStore::connect(&format!("sqlite://{}", path.display()))
            .await
            .expect("open");
        let account = account_with(&store, "batch", 1_000).await;
        let key = key_of(&store, &account, "batchkey", limit).await;
        let shared = Shared::new(open(&path, Role::Writer).expect("writer connection"), Vec::new());
        (dir, store, key, shared)
    }

    /// Jobs in one transaction see what the jobs before them have yet to
    /// write (the balance, the key's spend), and the commit writes it all.
    #[tokio::test]
    async fn jobs_in_one_batch_see_what_earlier_jobs_have_yet_to_write() {
        let (_dir, store, key, shared) = fixture(Some(400)).await;
        let account = store.account(&key.account_id).await.expect("read").expect("account");

        let batch = vec![
            // Charged directly (no hold): 300 of the 1,000.
            settle("r1", &key, 300),
            // 700 left, so 800 is refused; and the key's limit (400) has 100 left.
            job(Op::Hold(hold_of("r2", &key, 800))),
            job(Op::Hold(hold_of("r3", &key, 150))),
            job(Op::Hold(hold_of("r4", &key, 100))),
            // r4 holds 100 of the 700: a debit of 601 is refused, 600 passes.
            adjust(&account.id, -601, "too much"),
            adjust(&account.id, -600, "just enough"),
            settle("r4", &key, 40),
        ];
        let results = commit_batch(&shared, &batch);

        let outcomes: Vec<String> = results
            .iter()
            .map(|r| match r {
                Ok(Done::Hold(h)) => format!("{h:?}"),
                Ok(Done::Settle(s)) => format!("{s:?}"),
                Ok(Done::Adjusted(balance)) => format!("balance {balance}"),
                Ok(Done::Barrier) => "barrier".into(),
                Err(e) => format!("error: {e}"),
            })
            .collect();
        assert_eq!(outcomes[0], "Settled");
        assert_eq!(outcomes[1], "InsufficientBalance");
        assert_eq!(outcomes[2], "KeyLimitReached");
        assert_eq!(outcomes[3], "Held");
        assert!(outcomes[4].starts_with("error: "), "{outcomes:?}");
        assert_eq!(outcomes[5], "balance 0");
        assert_eq!(outcomes[6], "Settled");

        // Committed: 1,000 - 300 - 600 - 40.
        let stored = store.account(&account.id).await.expect("read").expect("account");
        assert_eq!(stored.balance, 60);
        let keys = store.api_keys(&account.id).await.expect("keys");
        assert_eq!(keys[0].spent, 340);
        let rollups = store
            .rollups(&crate::day_of(crate::now_millis()))
            .await
            .expect("rollups");
        let mine: Vec<_> = rollups.iter().filter(|r| r.account_id == account.id).collect();
        assert_eq!(mine.len(), 1);
        assert_eq!((mine[0].requests, mine[0].cost), (2, 340));
        assert_eq!(charged(&store, &account.id).await, -340);
    }

    /// A batch reads an account's stored balance once; a debit in the middle
    /// of it is still seen by the settlements after it, which are charged no
    /// more than what is left.
    #[tokio::test]
    async fn a_settlement_after_a_debit_in_the_same_batch_is_charged_only_what_is_left() {
        let (_dir, store, key, shared) = fixture(None).await;
        let batch = vec![
            settle("r1", &key, 100),
            adjust(&key.account_id, -850, "debit"),
            // 50 left: a cost of 100 is charged 50.
            settle("r2", &key, 100),
        ];
        let results = commit_batch(&shared, &batch);
        assert!(
            results.iter().all(|r| r.is_ok()),
            "{:?}",
            results
                .iter()
                .map(|r| r.as_ref().err().map(ToString::to_string))
                .collect::<Vec<_>>()
        );
        let stored = store.account(&key.account_id).await.expect("read").expect("account");
        assert_eq!(stored.balance, 0);
        assert_eq!(charged(&store, &key.account_id).await, -150);
    }

    /// A hold decided beside the writer, from committed rows, counts what the
    /// writer's open transaction has charged and debited (it is not in the
    /// rows yet) and stops counting it once the transaction has ended.
    #[tokio::test]
    async fn holds_beside_the_writer_count_what_its_open_transaction_owes() {
        let (dir, store, key, writer) = fixture(Some(400)).await;
        let path = dir.path().join("credits.db");
        let shared = Shared::new(
            writer.conn.into_inner().expect("writer connection"),
            vec![open(&path, Role::Reader).expect("reader connection")],
        );
        let account = key.account_id.clone();
        let beside = |id: &str, amount: i64| {
            decide_beside(&shared, &hold_of(id, &key, amount))
                .expect("decided")
                .expect("a reader is free")
        };

        // The writer charges 300 (no hold) and debits 600, not yet committed.
        let open_generation = {
            let conn = shared.lock();
            exec(&conn, "BEGIN IMMEDIATE").expect("begin");
            let (mut undo, mut pending) = (Vec::new(), Pending::default());
            for job in [settle("r1", &key, 300), adjust(&account, -600, "debit")] {
                apply(&mut Tx::new(&conn), &shared, &job.op, &mut undo, &mut pending).expect("applied");
            }
            let open_generation = shared.holds().generation();
            // Committed rows still say 1,000 and nothing spent; 100 is what is left.
            assert_eq!(beside("h1", 101), HoldOutcome::InsufficientBalance);
            assert_eq!(beside("h2", 100), HoldOutcome::Held, "the key has 100 of 400 left too");
            assert_eq!(beside("h3", 1), HoldOutcome::InsufficientBalance);

            pending.flush(&conn).expect("flush");
            exec(&conn, "COMMIT").expect("commit");
            shared.holds().end_transaction();
            open_generation
        };
        assert_ne!(shared.holds().generation(), open_generation);
        assert_eq!(
            beside("h4", 1),
            HoldOutcome::InsufficientBalance,
            "h2 holds the last 100"
        );
        shared.holds().release(["h2"]);
        assert_eq!(
            beside("h5", 101),
            HoldOutcome::InsufficientBalance,
            "the committed balance is 100"
        );
        assert_eq!(beside("h6", 100), HoldOutcome::Held);
        let shown = store.account(&account).await.expect("read").expect("account");
        assert_eq!(
            shown.balance, 100,
            "this store's own holds are not in the fixture's map"
        );
    }

    /// A shared store state with one hold reader, on the fixture's file.
    fn with_reader(dir: &tempfile::TempDir, writer: Shared) -> Shared {
        let path = dir.path().join("credits.db");
        Shared::new(
            writer.conn.into_inner().expect("writer connection"),
            vec![open(&path, Role::Reader).expect("reader connection")],
        )
    }

    fn decided_beside(shared: &Shared, id: &str, key: &crate::ApiKey) -> HoldOutcome {
        decide_beside(shared, &hold_of(id, key, 10))
            .expect("decided")
            .expect("a reader is free")
    }

    /// A reader keeps its snapshot for the holds after it (decision 68), but
    /// not past `SNAPSHOT_FOR`: a change made through another connection,
    /// which the writer knows nothing of, counts for holds once that passed.
    #[tokio::test]
    async fn holds_beside_the_writer_see_another_connections_change_once_the_snapshot_ages() {
        let (dir, _store, key, writer) = fixture(None).await;
        let shared = with_reader(&dir, writer);
        assert_eq!(decided_beside(&shared, "h1", &key), HoldOutcome::Held);

        let other = Connection::open(dir.path().join("credits.db")).expect("another connection");
        other
            .execute("UPDATE accounts SET suspended = 1 WHERE id = ?1", [&key.account_id])
            .expect("suspend");
        std::thread::sleep(SNAPSHOT_FOR + Duration::from_millis(5));
        assert_eq!(decided_beside(&shared, "h2", &key), HoldOutcome::Refused);
    }

    /// A hold beside the writer keeps the standing it read for the next holds
    /// of its key (decision 69): they are decided without a reader, until the
    /// writer's transaction ends or the standing is as old as a snapshot may
    /// be. Then they read again and see what changed.
    #[tokio::test]
    async fn a_standing_read_beside_the_writer_serves_its_key_until_the_writer_commits() {
        let (dir, _store, key, writer) = fixture(None).await;
        let mut shared = with_reader(&dir, writer);
        shared.snapshot_for = Duration::from_secs(600);
        assert_eq!(decided_beside(&shared, "h1", &key), HoldOutcome::Held);

        // Another connection suspends the account; the only reader is busy.
        let other = Connection::open(dir.path().join("credits.db")).expect("another connection");
        other
            .execute("UPDATE accounts SET suspended = 1 WHERE id = ?1", [&key.account_id])
            .expect("suspend");
        let busy = shared.readers[0].lock().expect("the reader");
        assert_eq!(
            decided_beside(&shared, "h2", &key),
            HoldOutcome::Held,
            "decided on the standing h1 read, as h1's snapshot would have"
        );
        let other_key = crate::ApiKey {
            id: "another-key".into(),
            ..key.clone()
        };
        assert_eq!(
            decide_beside(&shared, &hold_of("h3", &other_key, 10)).expect("decided"),
            None,
            "another key's standing was never read: it waits for a reader"
        );

        // The writer's transaction ends: what was read may be out of date.
        shared.holds().end_transaction();
        assert_eq!(decide_beside(&shared, &hold_of("h4", &key, 10)).expect("decided"), None);
        drop(busy);
        assert_eq!(decided_beside(&shared, "h5", &key), HoldOutcome::Refused);

        // So does a standing older than the snapshots may be.
        other
            .execute("UPDATE accounts SET suspended = 0 WHERE id = ?1", [&key.account_id])
            .expect("lift the suspension");
        shared.snapshot_for = Duration::ZERO;
        assert_eq!(decided_beside(&shared, "h6", &key), HoldOutcome::Held);
    }

    /// A checkpoint ends the snapshots idle readers keep: a reader that
    /// decided a hold before a commit, and none since, would otherwise keep
    /// that commit's WAL frames from being copied and the WAL from starting
    /// over.
    #[tokio::test]
    async fn a_checkpoint_ends_the_snapshots_that_idle_readers_keep() {
        let (dir, _store, key, writer) = fixture(None).await;
        let shared = with_reader(&dir, writer);
        assert_eq!(decided_beside(&shared, "h1", &key), HoldOutcome::Held);
        {
            let conn = shared.lock();
            let (mut results, mut undo, mut pending) = (Vec::new(), Vec::new(), Pending::default());
            run_batch(
                &conn,
                &shared,
                &[settle("r1", &key, 5)],
                &mut results,
                &mut undo,
                &mut pending,
            )
            .expect("the settlement commits");
        }
        shared.holds().end_transaction();

        let conn = shared.lock();
        shared.checkpoint(&conn);
        // The fixture's own store copies its WAL every 250 ms; should that
        // checkpoint be running now, this one answers "busy": ask again.
        let mut counts = (1, 0, 0);
        for _ in 0..50 {
            counts = conn
                .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .expect("checkpoint");
            if counts.0 == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let (busy, frames, copied): (i64, i64, i64) = counts;
        assert!(frames > 0, "the settlement wrote WAL frames");
        assert_eq!((busy, copied), (0, frames), "every frame was copied");
    }

    /// The WAL copier writes committed pages into the database file on its
    /// own while nothing else checkpoints, and ends when its sender goes.
    #[test]
    fn the_wal_copier_copies_pages_into_the_file_and_stops_when_told() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("copy.db");
        let writer = Connection::open(&path).expect("open");
        writer
            .execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0; \
                 CREATE TABLE t (x TEXT); \
                 WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000) \
                 INSERT INTO t SELECT printf('%0100d', i) FROM n;",
            )
            .expect("fill the WAL");
        let file_len = || std::fs::metadata(&path).expect("database file").len();
        let before = file_len();
        assert!(
            before < 100_000,
            "the rows are still in the WAL only ({before} bytes in the file)"
        );

        let (stop_tx, stop_rx) = mpsc::channel();
        let conn = open(&path, Role::Copier).expect("copier connection");
        let copier = std::thread::spawn(move || copy_wal(&conn, &stop_rx));
        let deadline = Instant::now() + Duration::from_secs(5);
        while file_len() < 200_000 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            file_len() >= 200_000,
            "the copier wrote the pages back ({} bytes)",
            file_len()
        );
        drop(stop_tx);
        copier.join().expect("the copier ends when its sender is dropped");
    }

    /// A transaction that rolls back leaves nothing gathered for the next
    /// one on the same writer.
    #[tokio::test]
    async fn a_failed_batch_writes_nothing_it_gathered() {
        let (_dir, store, key, shared) = fixture(None).await;
        let account = store.account(&key.account_id).await.expect("read").expect("account");

        // The second settlement names a provider account that does not
        // exist: its ledger entry breaks the transaction after r1 wrote.
        let mut ghost = usage_of("r2", &key, 10, 5, None);
        ghost.provider_account_id = Some("no-such-account".into());
        let batch = vec![settle("r1", &key, 100), job(Op::Settle(Box::new(ghost)))];
        let (mut results, mut undo, mut pending) = (Vec::new(), Vec::new(), Pending::default());
        {
            let conn = shared.lock();
            assert!(run_batch(&conn, &shared, &batch, &mut results, &mut undo, &mut pending).is_err());
            exec(&conn, "ROLLBACK").expect("rollback");
            // The next transaction, with the same gatherer: r1 again.
            results.clear();
            let again = [settle("r1", &key, 100)];
            run_batch(&conn, &shared, &again, &mut results, &mut undo, &mut pending).expect("commits");
        }
        assert!(matches!(results[..], [Ok(Done::Settle(SettleOutcome::Settled))]));

        let stored = store.account(&account.id).await.expect("read").expect("account");
        assert_eq!(stored.balance, 900);
        assert_eq!(store.api_keys(&account.id).await.expect("keys")[0].spent, 100);
    }

    /// A gateway killed after a settlement reached the journal but before
    /// the credit writer applied it: the next gateway on the file applies it
    /// before it serves, once, and starts with an empty journal.
    #[tokio::test]
    async fn the_next_gateway_applies_what_the_journal_holds() {
        let (dir, store, key, _shared) = fixture(None).await;
        let path = dir.path().join("credits.db");
        let database = std::fs::canonicalize(&path).expect("canonical path");
        drop(store);
        {
            let (mut journal, left) = Journal::open(&database).expect("journal");
            assert!(left.is_empty());
            journal.start().expect("start");
            for request_id in ["r1", "r2", "r1"] {
                journal
                    .append(&usage_of(request_id, &key, 100, 0, None))
                    .expect("append");
            }
        }
        let url = format!("sqlite://{}", path.display());
        let store = SqliteStore::connect(&url).await.expect("reopen");
        assert!(
            store.usage("r1").await.expect("read").is_none(),
            "only a serving store replays"
        );
        store.claim_for_serving().await.expect("claim");
        assert!(store.usage("r1").await.expect("read").is_some());
        assert!(store.usage("r2").await.expect("read").is_some());
        let account = store.account(&key.account_id).await.expect("read").expect("account");
        assert_eq!(account.balance, 800, "each request charged once");
        for file in super::super::journal::paths(&database) {
            assert_eq!(std::fs::metadata(file).expect("journal file").len(), 0);
        }
    }

    /// How many usage records an account has, and its balance, as `store` reads them.
    async fn usage_and_balance(store: &SqliteStore, account_id: &str) -> (usize, i64) {
        let records = store.usage_for_account(account_id, 100).await.expect("usage").len();
        let account = store.account(account_id).await.expect("read").expect("account");
        (records, account.balance)
    }

    /// Through the journal, `settle` returns before the database has the
    /// settlement, and reads wait for it.
    #[tokio::test]
    async fn reads_after_a_journaled_settlement_see_it() {
        let (_dir, store, key, _shared) = fixture(None).await;
        store.claim_for_serving().await.expect("claim");
        let mut settled = Vec::new();
        for n in 0..50 {
            let request_id = format!("j{n}");
            assert_eq!(
                store.hold(hold_of(&request_id, &key, 20)).await.expect("hold"),
                HoldOutcome::Held
            );
            settled.push(
                store
                    .settle(usage_of(&request_id, &key, 10, 0, None))
                    .await
                    .expect("settle"),
            );
            assert_eq!(
                store
                    .settle(usage_of(&request_id, &key, 10, 0, None))
                    .await
                    .expect("settle twice"),
                SettleOutcome::AlreadySettled
            );
        }
        assert!(settled.iter().all(|s| *s == SettleOutcome::Settled));
        assert_eq!(usage_and_balance(&store, &key.account_id).await, (50, 500));
        assert_eq!(
            store
                .ledger_sum(&key.account_id, LedgerKind::Charge)
                .await
                .expect("sum"),
            -500
        );
        assert_eq!(store.held_amount(&key.account_id).await.expect("held"), 0);
    }

    /// The usage records in the file as a connection of another process
    /// sees them, once there are `want` or after 5 s.
    async fn usage_rows_in_file(other: &Connection, want: i64) -> i64 {
        let count = || -> i64 {
            other
                .query_row("SELECT count(*) FROM usage_records", [], |r| r.get(0))
                .expect("count")
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while count() < want && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        count()
    }

    /// Journaled settlements reach the database file by themselves, soon,
    /// whether fewer or more than [`APPLY_AT`] wait: what another process
    /// (an `admin` command) reads, without going through the serving store.
    #[tokio::test]
    async fn journaled_settlements_reach_the_file_without_a_read() {
        let (dir, store, key, _shared) = fixture(None).await;
        store.claim_for_serving().await.expect("claim");
        let other = Connection::open(dir.path().join("credits.db")).expect("other connection");
        let mut settled = 0;
        for round in [1, APPLY_AT + 5] {
            for n in 0..round {
                let request_id = format!("f{round}-{n}");
                store.hold(hold_of(&request_id, &key, 5)).await.expect("hold");
                store
                    .settle(usage_of(&request_id, &key, 5, 0, None))
                    .await
                    .expect("settle");
            }
            settled += round as i64;
            assert_eq!(
                usage_rows_in_file(&other, settled).await,
                settled,
                "every settlement of round {round} in the file"
            );
        }
        let balance: i64 = other
            .query_row("SELECT balance FROM accounts WHERE id = ?1", [&key.account_id], |r| {
                r.get(0)
            })
            .expect("balance");
        assert_eq!(balance, 1_000 - 5 * settled);
        assert_eq!(store.held_amount(&key.account_id).await.expect("held"), 0);
    }

    /// Settlements journaled while the writer is busy wait for its batch to
    /// end and are then applied together, not one commit each.
    #[tokio::test]
    async fn settlements_journaled_while_the_writer_is_busy_share_a_commit() {
        let (dir, store, key, _shared) = fixture(None).await;
        store.claim_for_serving().await.expect("claim");
        for n in 0..4 {
            store.hold(hold_of(&format!("b{n}"), &key, 5)).await.expect("hold");
        }
        let shared = store.credits.shared.clone();
        let before = shared.holds().generation();
        // The writer's connection is taken, as by a batch in progress.
        let (taken, release) = (mpsc::channel(), mpsc::channel::<()>());
        let holder = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                let _busy = shared.lock();
                let _ = taken.0.send(());
                let _ = release.1.recv();
            })
        };
        taken.1.recv().expect("connection taken");
        for n in 0..4 {
            store
                .settle(usage_of(&format!("b{n}"), &key, 5, 0, None))
                .await
                .expect("settle");
        }
        release.0.send(()).expect("release");
        holder.join().expect("holder thread");
        let other = Connection::open(dir.path().join("credits.db")).expect("other connection");
        assert_eq!(usage_rows_in_file(&other, 4).await, 4);
        // The first may have had a commit of its own (it woke the thread);
        // the three that came while the thread waited for the lock did not.
        let commits = shared.holds().generation() - before;
        assert!((1..=2).contains(&commits), "{commits} commits for 4 settlements");
    }

    /// A store dropped right after journaled settlements (a gateway that
    /// stops) leaves them in the database, for a process that reads the file
    /// without serving it (the admin commands).
    #[tokio::test]
    async fn dropping_the_store_applies_what_is_journaled() {
        let (dir, store, key, _shared) = fixture(None).await;
        store.claim_for_serving().await.expect("claim");
        for n in 0..20 {
            let request_id = format!("d{n}");
            store.hold(hold_of(&request_id, &key, 20)).await.expect("hold");
            store
                .settle(usage_of(&request_id, &key, 10, 0, None))
                .await
                .expect("settle");
        }
        drop(store);
        let url = format!("sqlite://{}", dir.path().join("credits.db").display());
        let reader = SqliteStore::connect(&url).await.expect("reopen");
        assert_eq!(usage_and_balance(&reader, &key.account_id).await, (20, 800));
    }
}
