//! A VFS for the credit writer's connection that writes each commit's WAL
//! frames with one system call instead of two per page (decision 55).
//!
//! SQLite appends a frame to the WAL as two writes, its 24-byte header and
//! then the page, so a settlement that changes 16 pages makes 32 `pwrite64`
//! calls; at concurrency 1 those were a sixth of the gateway's CPU time. This
//! VFS is SQLite's own default one (`unix`) with one difference: writes to a
//! WAL file that continue the previous one are gathered in memory, and go to
//! the file as one write when SQLite syncs the WAL at the end of the commit
//! (the connection runs `synchronous = FULL` for that), or earlier when
//! SQLite reads the file, asks its size, truncates it, writes elsewhere in it
//! or closes it, or when the next write would not fit in one (128 KiB).
//!
//! What a sync means is kept as it was under `synchronous = NORMAL`, which
//! the store used before: the commit's sync only hands the frames to the
//! operating system (so a commit survives the process being killed, as
//! before), while the syncs SQLite makes before a checkpoint copies the WAL
//! into the database, and after it rewrites the WAL's header, reach the disk
//! as they always did. Which sync is which needs no guessing: a commit's sync
//! always finds frames gathered, a checkpoint's finds none (the commits
//! before it sent theirs), and a rewritten header is the only write at
//! offset 0.
//!
//! The connection must not spill its page cache into the WAL before the
//! commit ([`configure`] turns that off): SQLite would write such frames
//! without a sync after them, and if the transaction then rolled back,
//! frames gathered from it could reach the file after the write lock was
//! released, over another connection's commit. With spilling off, SQLite
//! writes frames only in a commit, which always ends with the sync.
//!
//! Locks, the shared-memory index and every other file go straight to the
//! `unix` VFS, whose files these are: other connections of the process, on
//! the default VFS, see the same locks. Readers cannot see gathered frames
//! too early either: SQLite publishes a commit in the WAL index only after
//! the sync that sends them.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::ptr;
use std::sync::OnceLock;

use rusqlite::ffi;

/// The name connections open this VFS by.
pub(super) const NAME: &str = "cxmpute-walbuf";
const NAME_C: &CStr = c"cxmpute-walbuf";

/// The most bytes sent in one write: the `unix` VFS's own limit (it masks a
/// write's length to 17 bits). A large commit's frames go out in pieces of
/// up to this size.
const MAX_WRITE: usize = 0x1ffff;

/// The `unix` VFS and the file methods it gives WAL files, found at
/// registration; ours wrap the latter.
struct Registered {
    inner: *mut ffi::sqlite3_vfs,
    /// Offset of [`Gathered`] within our `sqlite3_file` allocation.
    extra_offset: usize,
    /// Set by the first WAL file opened: the methods it came with, and ours
    /// (`None`: it lacked one, and WAL files are left as they come).
    methods: OnceLock<Option<Methods>>,
}

/// The `unix` VFS's WAL file methods that ours call on, resolved once.
struct Methods {
    given: *const ffi::sqlite3_io_methods,
    ours: ffi::sqlite3_io_methods,
    close: unsafe extern "C" fn(*mut ffi::sqlite3_file) -> c_int,
    read: unsafe extern "C" fn(*mut ffi::sqlite3_file, *mut c_void, c_int, i64) -> c_int,
    write: unsafe extern "C" fn(*mut ffi::sqlite3_file, *const c_void, c_int, i64) -> c_int,
    truncate: unsafe extern "C" fn(*mut ffi::sqlite3_file, i64) -> c_int,
    sync: unsafe extern "C" fn(*mut ffi::sqlite3_file, c_int) -> c_int,
    file_size: unsafe extern "C" fn(*mut ffi::sqlite3_file, *mut i64) -> c_int,
}

impl Methods {
    /// `None` when the given table lacks one of the methods ours wrap.
    unsafe fn wrapping(given: *const ffi::sqlite3_io_methods) -> Option<Methods> {
        let g = &*given;
        Some(Methods {
            given,
            ours: ffi::sqlite3_io_methods {
                xClose: Some(close),
                xRead: Some(read),
                xWrite: Some(write),
                xTruncate: Some(truncate),
                xSync: Some(sync),
                xFileSize: Some(file_size),
                ..*g
            },
            close: g.xClose?,
            read: g.xRead?,
            write: g.xWrite?,
            truncate: g.xTruncate?,
            sync: g.xSync?,
            file_size: g.xFileSize?,
        })
    }
}

// The pointers are to SQLite's static VFS and method tables, never freed.
unsafe impl Send for Registered {}
unsafe impl Sync for Registered {}
unsafe impl Send for Methods {}
unsafe impl Sync for Methods {}

static REGISTERED: OnceLock<Result<Registered, String>> = OnceLock::new();

/// What a WAL file opened through this VFS carries after the `unix` VFS's
/// own state: the bytes gathered and where in the file they go.
struct Gathered {
    bytes: Vec<u8>,
    offset: i64,
}

/// Sets what this VFS needs of a connection opened through it: a sync at the
/// end of each commit (`synchronous = FULL`; see the module docs for what it
/// then does) and no cache spills before the commit.
pub(super) fn configure(conn: &rusqlite::Connection) -> crate::Result<()> {
    let sqlite = |e: rusqlite::Error| crate::StoreError::Sqlite(e.to_string());
    conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA cache_spill = OFF;")
        .map_err(sqlite)?;
    let spill: i64 = conn.query_row("PRAGMA cache_spill", [], |r| r.get(0)).map_err(sqlite)?;
    if spill != 0 {
        return Err(crate::StoreError::Sqlite("SQLite kept cache_spill on".into()));
    }
    Ok(())
}

#[cfg(test)]
thread_local! {
    /// Bytes this thread's writes gathered, in all (tests only).
    static GATHERED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Registers the VFS (once per process). Connections then open it by [`NAME`].
pub(super) fn register() -> Result<(), String> {
    REGISTERED
        .get_or_init(|| unsafe { register_once() })
        .as_ref()
        .map(|_| ())
        .map_err(Clone::clone)
}

unsafe fn register_once() -> Result<Registered, String> {
    let inner = ffi::sqlite3_vfs_find(ptr::null());
    if inner.is_null() {
        return Err("SQLite has no default VFS".into());
    }
    let base = usize::try_from((*inner).szOsFile).map_err(|_| "the default VFS has a negative file size")?;
    let align = std::mem::align_of::<Gathered>();
    let extra_offset = base.div_ceil(align) * align;
    let size = c_int::try_from(extra_offset + std::mem::size_of::<Gathered>())
        .map_err(|_| "the default VFS's files are too large")?;
    let mut ours: ffi::sqlite3_vfs = *inner;
    ours.szOsFile = size;
    ours.zName = NAME_C.as_ptr();
    ours.pNext = ptr::null_mut();
    ours.xOpen = Some(open);
    // Leaked: a registered VFS must outlive every connection.
    let ours = Box::into_raw(Box::new(ours));
    let registered = Registered {
        inner,
        extra_offset,
        methods: OnceLock::new(),
    };
    let rc = ffi::sqlite3_vfs_register(ours, 0);
    if rc != ffi::SQLITE_OK {
        return Err(format!("cannot register the {NAME} VFS (SQLite error {rc})"));
    }
    Ok(registered)
}

fn registered() -> Option<&'static Registered> {
    REGISTERED.get().and_then(|r| r.as_ref().ok())
}

unsafe fn gathered<'a>(file: *mut ffi::sqlite3_file) -> Option<(&'a mut Gathered, &'static Methods)> {
    let r = registered()?;
    let methods = r.methods.get()?.as_ref()?;
    let extra = file.cast::<u8>().add(r.extra_offset).cast::<Gathered>();
    Some((&mut *extra, methods))
}

unsafe extern "C" fn open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let Some(r) = registered() else {
        return ffi::SQLITE_ERROR;
    };
    let Some(inner_open) = (*r.inner).xOpen else {
        return ffi::SQLITE_ERROR;
    };
    let rc = inner_open(r.inner, name, file, flags, out_flags);
    if rc != ffi::SQLITE_OK || flags & ffi::SQLITE_OPEN_WAL == 0 || (*file).pMethods.is_null() {
        return rc;
    }
    let given = (*file).pMethods;
    let Some(methods) = r.methods.get_or_init(|| Methods::wrapping(given)) else {
        return rc;
    };
    // Another kind of file than the first WAL file: left as it came.
    if !ptr::eq(methods.given, given) {
        return rc;
    }
    let extra = file.cast::<u8>().add(r.extra_offset).cast::<Gathered>();
    extra.write(Gathered {
        bytes: Vec::new(),
        offset: 0,
    });
    (*file).pMethods = &methods.ours;
    rc
}

/// Writes what is gathered, as one write.
unsafe fn flush(file: *mut ffi::sqlite3_file, g: &mut Gathered, m: &Methods) -> c_int {
    if g.bytes.is_empty() {
        return ffi::SQLITE_OK;
    }
    let Ok(len) = c_int::try_from(g.bytes.len()) else {
        return ffi::SQLITE_IOERR_WRITE;
    };
    let rc = (m.write)(file, g.bytes.as_ptr().cast::<c_void>(), len, g.offset);
    g.bytes.clear();
    rc
}

/// Sends what `file` has gathered; then the inner methods may run on it.
unsafe fn flushed(file: *mut ffi::sqlite3_file, missing: c_int) -> Result<&'static Methods, c_int> {
    let (g, m) = gathered(file).ok_or(missing)?;
    match flush(file, g, m) {
        ffi::SQLITE_OK => Ok(m),
        rc => Err(rc),
    }
}

unsafe extern "C" fn close(file: *mut ffi::sqlite3_file) -> c_int {
    let Some((g, m)) = gathered(file) else {
        return ffi::SQLITE_ERROR;
    };
    let flushed = flush(file, g, m);
    let extra: *mut Gathered = g;
    let closed = (m.close)(file);
    extra.drop_in_place();
    if flushed != ffi::SQLITE_OK {
        flushed
    } else {
        closed
    }
}

unsafe extern "C" fn read(file: *mut ffi::sqlite3_file, buf: *mut c_void, amount: c_int, offset: i64) -> c_int {
    flushed(file, ffi::SQLITE_IOERR_READ).map_or_else(|rc| rc, |m| (m.read)(file, buf, amount, offset))
}

unsafe extern "C" fn write(file: *mut ffi::sqlite3_file, data: *const c_void, amount: c_int, offset: i64) -> c_int {
    let Some((g, m)) = gathered(file) else {
        return ffi::SQLITE_IOERR_WRITE;
    };
    let Ok(len) = usize::try_from(amount) else {
        return ffi::SQLITE_IOERR_WRITE;
    };
    // Only a write that continues the gathered bytes, and keeps them within
    // one write's limit, joins them; anything else sends them first, so the
    // file sees every write in SQLite's order.
    let continues = i64::try_from(g.bytes.len()).is_ok_and(|n| g.offset.checked_add(n) == Some(offset));
    if !g.bytes.is_empty() && (!continues || g.bytes.len() + len > MAX_WRITE) {
        let rc = flush(file, g, m);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
    }
    if len > MAX_WRITE {
        // Larger than SQLite ever writes at once: straight through.
        return (m.write)(file, data, amount, offset);
    }
    if g.bytes.is_empty() {
        g.offset = offset;
    }
    g.bytes
        .extend_from_slice(std::slice::from_raw_parts(data.cast::<u8>(), len));
    #[cfg(test)]
    GATHERED.with(|n| n.set(n.get() + len as u64));
    ffi::SQLITE_OK
}

unsafe extern "C" fn truncate(file: *mut ffi::sqlite3_file, size: i64) -> c_int {
    flushed(file, ffi::SQLITE_IOERR_TRUNCATE).map_or_else(|rc| rc, |m| (m.truncate)(file, size))
}

/// A commit's sync (frames gathered, not the WAL's header) only sends them
/// to the operating system; every other sync is a real one.
unsafe extern "C" fn sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    let Some((g, m)) = gathered(file) else {
        return ffi::SQLITE_IOERR_FSYNC;
    };
    let commit = !g.bytes.is_empty() && g.offset > 0;
    let rc = flush(file, g, m);
    if rc != ffi::SQLITE_OK || commit {
        return rc;
    }
    (m.sync)(file, flags)
}

unsafe extern "C" fn file_size(file: *mut ffi::sqlite3_file, size: *mut i64) -> c_int {
    flushed(file, ffi::SQLITE_IOERR_FSTAT).map_or_else(|rc| rc, |m| (m.file_size)(file, size))
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::process::Command;

    use rusqlite::{Connection, OpenFlags};

    use super::*;

    /// Write system calls this thread has made (Linux counts them per thread).
    #[cfg(target_os = "linux")]
    fn writes_so_far() -> u64 {
        let io = std::fs::read_to_string("/proc/thread-self/io").expect("/proc/thread-self/io");
        io.lines()
            .find_map(|line| line.strip_prefix("syscw: "))
            .and_then(|n| n.trim().parse().ok())
            .expect("syscw in /proc/thread-self/io")
    }

    /// A database in WAL mode with a table and two indexes, made on the default VFS.
    fn database(dir: &Path) -> std::path::PathBuf {
        let path = dir.join("walbuf.db");
        let conn = Connection::open(&path).expect("open");
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA page_size = 2048; \
             CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT NOT NULL, v TEXT NOT NULL); \
             CREATE INDEX t_k ON t (k); CREATE INDEX t_v ON t (v);",
        )
        .expect("schema");
        path
    }

    fn writer(path: &Path) -> Connection {
        register().expect("register");
        let conn = Connection::open_with_flags_and_vfs(path, OpenFlags::default(), NAME).expect("open");
        configure(&conn).expect("configure");
        conn.execute_batch("PRAGMA wal_autocheckpoint = 0;").expect("pragmas");
        conn
    }

    /// Inserts rows whose keys scatter over the indexes, so that a commit
    /// changes many pages.
    fn insert(conn: &Connection, from: i64, count: i64) {
        conn.execute_batch("BEGIN IMMEDIATE").expect("begin");
        for i in from..from + count {
            conn.execute(
                "INSERT INTO t (k, v) VALUES (?1, ?2)",
                (
                    format!("{:08}", (i * 7919) % 100_003),
                    format!("{:0200}", (i * 104_729) % 99_991),
                ),
            )
            .expect("insert");
        }
        conn.execute_batch("COMMIT").expect("commit");
    }

    /// SQLite's own check of the whole file, through `conn`.
    fn assert_intact(conn: &Connection) {
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .expect("check");
        assert_eq!(check, "ok");
    }

    fn count(path: &Path) -> i64 {
        let reader = Connection::open(path).expect("reader");
        reader
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .expect("count")
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_commit_reaches_the_wal_in_one_write_and_other_connections_see_it_at_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = database(dir.path());
        // Enough rows first that a small commit touches pages all over the file.
        insert(&Connection::open(&path).expect("fill"), 0, 2_000);

        let plain = Connection::open(&path).expect("open");
        plain.execute_batch("PRAGMA synchronous = NORMAL;").expect("pragma");
        let before = writes_so_far();
        insert(&plain, 2_000, 12);
        let plain_writes = writes_so_far() - before;
        drop(plain);

        let conn = writer(&path);
        let before = writes_so_far();
        insert(&conn, 3_000, 12);
        let gathered_writes = writes_so_far() - before;

        assert!(
            plain_writes >= 16,
            "the default VFS wrote each frame twice ({plain_writes} writes)"
        );
        assert!(
            gathered_writes <= 2,
            "one write for the commit ({gathered_writes} writes)"
        );
        assert_eq!(count(&path), 2_024, "another connection sees the commit at once");
        assert_intact(&conn);
    }

    /// A transaction larger than the page cache, whose commit takes many
    /// writes of the most that one write takes, commits whole.
    #[test]
    fn a_transaction_larger_than_the_cache_commits_whole() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = database(dir.path());
        let conn = writer(&path);
        conn.execute_batch("PRAGMA cache_size = 8;").expect("small cache");
        conn.execute_batch("BEGIN IMMEDIATE").expect("begin");
        for round in 0..3 {
            for i in 0..1_500_i64 {
                conn.execute(
                    "INSERT INTO t (id, k, v) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (id) DO UPDATE SET k = excluded.k, v = excluded.v",
                    (
                        i,
                        format!("{round}-{:08}", (i * 7919) % 100_003),
                        format!("{round}{:0300}", i),
                    ),
                )
                .expect("upsert");
            }
        }
        conn.execute_batch("COMMIT").expect("commit");
        drop(conn);

        let reader = Connection::open(&path).expect("reader");
        assert_intact(&reader);
        let (rows, last_round): (i64, i64) = reader
            .query_row("SELECT count(*), sum(k LIKE '2-%') FROM t", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .expect("read");
        assert_eq!(
            (rows, last_round),
            (1_500, 1_500),
            "every row holds the last round's values"
        );
    }

    /// A transaction larger than the page cache writes nothing to the WAL
    /// before its commit, so one that rolls back leaves nothing gathered to
    /// reach the file later, over another connection's commit.
    #[test]
    fn a_rolled_back_transaction_gathers_nothing_and_later_commits_survive() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = database(dir.path());
        let spill = |conn: &Connection| {
            conn.execute_batch("PRAGMA cache_size = 8; BEGIN IMMEDIATE")
                .expect("begin");
            let before = GATHERED.with(std::cell::Cell::get);
            for i in 0..1_000_i64 {
                conn.execute(
                    "INSERT INTO t (k, v) VALUES (?1, ?2)",
                    (format!("gone-{i:06}"), format!("{i:0300}")),
                )
                .expect("insert");
            }
            let gathered = GATHERED.with(std::cell::Cell::get) - before;
            conn.execute_batch("ROLLBACK").expect("rollback");
            gathered
        };
        // Without `configure`, SQLite spills into the WAL mid-transaction.
        register().expect("register");
        let unconfigured = Connection::open_with_flags_and_vfs(&path, OpenFlags::default(), NAME).expect("open");
        assert!(spill(&unconfigured) > 0, "an unconfigured connection spills");
        drop(unconfigured);

        let conn = writer(&path);
        assert_eq!(spill(&conn), 0, "nothing reaches the WAL before a commit");
        let other = Connection::open(&path).expect("other connection");
        insert(&other, 10_000, 50);
        drop(other);
        insert(&conn, 20_000, 5);
        drop(conn);

        let reader = Connection::open(&path).expect("reader");
        assert_intact(&reader);
        assert_eq!(
            count(&path),
            55,
            "both later commits are there, nothing of the rolled-back ones"
        );
    }

    /// Set in the child process of the test below: the database to commit to
    /// before the process aborts.
    const CHILD: &str = "CXMPUTE_WALBUF_CHILD_DB";

    /// A commit is in the operating system's hands when SQLite returns: a
    /// process that aborts right after it (no close, no destructor) loses
    /// nothing. The test runs itself as that process.
    #[test]
    fn a_commit_survives_the_process_aborting_right_after_it() {
        if let Some(path) = std::env::var_os(CHILD) {
            let conn = writer(Path::new(&path));
            insert(&conn, 0, 40);
            std::process::abort();
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let path = database(dir.path());
        let status = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "sqlite::walbuf::tests::a_commit_survives_the_process_aborting_right_after_it",
                "--exact",
                "--nocapture",
            ])
            .env(CHILD, &path)
            .status()
            .expect("run the child");
        assert!(!status.success(), "the child aborted ({status})");
        assert_eq!(count(&path), 40, "the rows committed before the abort are there");
    }
}
