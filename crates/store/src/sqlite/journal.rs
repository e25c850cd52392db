//! The settlement journal of a serving gateway on SQLite (decision 57).
//!
//! A settlement must be durable before the client sees the end of its answer
//! (a gateway killed after that point must still charge it). Committing it
//! to SQLite on the request path costs a transaction: a dozen pages written
//! to the WAL with their checksums. Instead the request appends its usage
//! record here, one `pwrite` of a few hundred bytes, which survives the
//! process being killed just as a commit under `synchronous = NORMAL` does,
//! and the credit writer thread applies the records to the database in its
//! batches, off the request path. A gateway that starts on the file applies
//! whatever records a previous one left (settling is keyed by request id, so
//! a record already applied is skipped) before it serves.
//!
//! Two files, `<database>-settling-0` and `-1`, take turns: records go to
//! the active one until it passes [`SWITCH_AT`]; then, once every record of
//! the other has been applied, the other is emptied and becomes the active
//! one. A file thus never has to be emptied while records are still coming
//! in. When neither can take more (the writer has fallen far behind, or a
//! record could not be applied), settlements take the synchronous path
//! again until it has caught up, so the journal stays bounded.
//!
//! A record is its payload's length (4 bytes), a checksum of the payload
//! (8 bytes, FNV-1a) and the payload: the usage record as JSON. Reading stops
//! at the first record that is cut short or does not match its checksum.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::UsageRecord;

/// Size past which the active file hands over to the other.
const SWITCH_AT: u64 = 1 << 20;
/// Size past which a file takes no more records.
const FULL_AT: u64 = 32 << 20;
/// Largest payload accepted when reading back (a usage record is far smaller).
const MAX_RECORD: usize = 1 << 20;
const HEADER: usize = 12;

struct Segment {
    file: File,
    len: u64,
    appended: u64,
    applied: u64,
    /// A record of this file could not be applied: it stays until a restart
    /// replays it.
    stuck: bool,
}

impl Segment {
    fn drained(&self) -> bool {
        self.applied == self.appended && !self.stuck
    }

    fn empty(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.len = 0;
        self.appended = 0;
        self.applied = 0;
        Ok(())
    }
}

pub(super) struct Journal {
    segments: [Segment; 2],
    active: usize,
}

/// Which file a record went to, for [`Journal::applied`].
pub(super) type Ticket = usize;

impl Journal {
    /// Opens (creating) the two files beside `database` and reads back the
    /// records they hold, which the caller applies and then passes to
    /// [`Journal::start`].
    pub fn open(database: &Path) -> io::Result<(Journal, Vec<UsageRecord>)> {
        let mut records = Vec::new();
        let mut open = |n: usize| -> io::Result<Segment> {
            let path = segment_path(database, n);
            let mut file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(&path)?;
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes)?;
            let (found, skipped) = decode(&bytes);
            if skipped > 0 {
                tracing::warn!(file = %path.display(), bytes = skipped, "settlement journal ends in a damaged record; ignored");
            }
            records.extend(found);
            Ok(Segment {
                file,
                len: 0,
                appended: 0,
                applied: 0,
                stuck: false,
            })
        };
        let segments = [open(0)?, open(1)?];
        Ok((Journal { segments, active: 0 }, records))
    }

    /// Empties both files: call once the records [`Journal::open`] returned
    /// are in the database.
    pub fn start(&mut self) -> io::Result<()> {
        for segment in &mut self.segments {
            segment.empty()?;
            segment.file.sync_all()?;
        }
        Ok(())
    }

    /// Appends a record; `None` when the journal is full (the caller settles
    /// synchronously instead).
    pub fn append(&mut self, record: &UsageRecord) -> io::Result<Option<Ticket>> {
        let active = &self.segments[self.active];
        if active.len >= SWITCH_AT || active.stuck {
            let other = 1 - self.active;
            if self.segments[other].drained() {
                self.segments[other].empty()?;
                self.active = other;
            }
        }
        let segment = &mut self.segments[self.active];
        if segment.len >= FULL_AT || segment.stuck {
            return Ok(None);
        }
        let bytes = encode(record)?;
        segment.file.write_all_at(&bytes, segment.len)?;
        segment.len += bytes.len() as u64;
        segment.appended += 1;
        Ok(Some(self.active))
    }

    /// Counts a record as applied to the database (`ok`) or as failed.
    pub fn applied(&mut self, ticket: Ticket, ok: bool) {
        let segment = &mut self.segments[ticket];
        segment.applied += 1;
        segment.stuck |= !ok;
    }
}

fn segment_path(database: &Path, n: usize) -> PathBuf {
    let mut path = database.as_os_str().to_owned();
    path.push(format!("-settling-{n}"));
    PathBuf::from(path)
}

/// The two files' paths (for tests and clean-up).
#[cfg(test)]
pub(super) fn paths(database: &Path) -> [PathBuf; 2] {
    [segment_path(database, 0), segment_path(database, 1)]
}

fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn encode(record: &UsageRecord) -> io::Result<Vec<u8>> {
    let mut out = vec![0; HEADER];
    serde_json::to_writer(&mut out, record)?;
    let payload = &out[HEADER..];
    let len = u32::try_from(payload.len()).map_err(|_| io::Error::other("usage record too large"))?;
    let sum = checksum(payload);
    out[..4].copy_from_slice(&len.to_le_bytes());
    out[4..HEADER].copy_from_slice(&sum.to_le_bytes());
    Ok(out)
}

/// The whole records at the start of `bytes`, and how many bytes after them
/// were not one.
fn decode(mut bytes: &[u8]) -> (Vec<UsageRecord>, usize) {
    let mut records = Vec::new();
    while bytes.len() >= HEADER {
        let mut len = [0; 4];
        len.copy_from_slice(&bytes[..4]);
        let len = u32::from_le_bytes(len) as usize;
        let mut sum = [0; 8];
        sum.copy_from_slice(&bytes[4..HEADER]);
        let Some(payload) = bytes.get(HEADER..HEADER + len).filter(|_| len <= MAX_RECORD) else {
            break;
        };
        if checksum(payload) != u64::from_le_bytes(sum) {
            break;
        }
        match serde_json::from_slice(payload) {
            Ok(record) => records.push(record),
            Err(_) => break,
        }
        bytes = &bytes[HEADER + len..];
    }
    (records, bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Service;

    fn record(id: &str) -> UsageRecord {
        UsageRecord {
            request_id: id.into(),
            account_id: "acc".into(),
            key_id: "key".into(),
            device_id: Some("dev".into()),
            provider_account_id: None,
            provision_id: None,
            service: Service::Chat,
            model: "m".into(),
            input_tokens: 3,
            output_tokens: 4,
            characters: 0,
            pages: 0,
            latency_ms: 5,
            ttfb_ms: 1,
            status: 200,
            cost: 12,
            reward: 0,
            created_at: 1_700_000_000_000,
        }
    }

    /// A journal on empty files in a temporary folder.
    fn started() -> (tempfile::TempDir, Journal) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut journal, found) = Journal::open(&dir.path().join("gw.db")).expect("open");
        assert!(found.is_empty());
        journal.start().expect("start");
        (dir, journal)
    }

    #[test]
    fn records_come_back_after_a_restart_and_a_damaged_tail_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("gw.db");
        let (mut journal, found) = Journal::open(&db).expect("open");
        assert!(found.is_empty());
        journal.start().expect("start");
        for id in ["a", "b", "c"] {
            assert_eq!(journal.append(&record(id)).expect("append"), Some(0));
        }
        drop(journal);
        // A write cut short by a crash, after the three whole records.
        let [first, _] = paths(&db);
        let mut bytes = std::fs::read(&first).expect("read");
        let whole = bytes.len();
        bytes.extend_from_slice(&encode(&record("d")).expect("encode")[..20]);
        std::fs::write(&first, &bytes).expect("write");

        let (mut journal, found) = Journal::open(&db).expect("reopen");
        let ids: Vec<_> = found.iter().map(|r| r.request_id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(found[0], record("a"), "a record comes back exactly");
        journal.start().expect("start");
        assert_eq!(std::fs::metadata(&first).expect("stat").len(), 0, "started empty");
        assert!(whole > 0);
    }

    #[test]
    fn a_changed_byte_ends_the_records_read_back() {
        let mut bytes = encode(&record("a")).expect("encode");
        bytes.extend(encode(&record("b")).expect("encode"));
        let last = bytes.len() - 2;
        bytes[last] ^= 1;
        let (found, skipped) = decode(&bytes);
        assert_eq!(found.len(), 1);
        assert_eq!(skipped, encode(&record("b")).expect("encode").len());
    }

    #[test]
    fn files_take_turns_only_once_the_other_is_applied() {
        let (_dir, mut journal) = started();
        let mut tickets = Vec::new();
        while journal.segments[0].len < SWITCH_AT {
            tickets.push(journal.append(&record("x")).expect("append").expect("room"));
        }
        // The other file is empty and applied: the next record goes there.
        assert_eq!(journal.append(&record("y")).expect("append"), Some(1));
        while journal.segments[1].len < SWITCH_AT {
            journal.append(&record("z")).expect("append").expect("room");
        }
        // The first file still has unapplied records: no switch back.
        assert_eq!(journal.append(&record("w")).expect("append"), Some(1));
        for ticket in tickets {
            journal.applied(ticket, true);
        }
        assert_eq!(journal.append(&record("v")).expect("append"), Some(0));
        assert_eq!(journal.segments[0].appended, 1, "emptied before reuse");
    }

    #[test]
    fn a_record_that_failed_keeps_its_file_from_being_emptied() {
        let (_dir, mut journal) = started();
        let ticket = journal.append(&record("a")).expect("append").expect("room");
        journal.applied(ticket, false);
        assert_eq!(journal.append(&record("b")).expect("append"), Some(1));
        while journal.segments[1].len < FULL_AT {
            let ticket = journal.append(&record("c")).expect("append").expect("room");
            journal.applied(ticket, true);
        }
        assert_eq!(
            journal.append(&record("d")).expect("append"),
            None,
            "settle synchronously"
        );
        assert_eq!(journal.segments[0].appended, 1, "the failed record stays for a restart");
    }
}
