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
//! (8 bytes, FNV-1a) and the payload: the usage record in the binary layout
//! of [`put_record`] (decision 63), or as JSON, which gateways before that
//! wrote and which is still read back. Reading stops at the first record
//! that is cut short, does not match its checksum or cannot be read.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::{Service, UsageRecord};

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
    /// The record being appended, reused from one to the next.
    buf: Vec<u8>,
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
        Ok((
            Journal {
                segments,
                active: 0,
                buf: Vec::new(),
            },
            records,
        ))
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
        encode_into(record, &mut self.buf)?;
        segment.file.write_all_at(&self.buf, segment.len)?;
        segment.len += self.buf.len() as u64;
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

/// The first byte of a payload in the binary layout. A JSON payload starts
/// with `{`.
const BINARY_V1: u8 = 1;

/// Replaces `out` with `record`'s header and payload.
fn encode_into(record: &UsageRecord, out: &mut Vec<u8>) -> io::Result<()> {
    out.clear();
    out.resize(HEADER, 0);
    put_record(out, record);
    let payload = &out[HEADER..];
    if payload.len() > MAX_RECORD {
        return Err(io::Error::other("usage record too large"));
    }
    let len = payload.len() as u32;
    let sum = checksum(payload);
    out[..4].copy_from_slice(&len.to_le_bytes());
    out[4..HEADER].copy_from_slice(&sum.to_le_bytes());
    Ok(())
}

#[cfg(test)]
fn encode(record: &UsageRecord) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    encode_into(record, &mut out)?;
    Ok(out)
}

/// The binary payload: [`BINARY_V1`], then every field in declaration
/// order; strings as a 4-byte length and their UTF-8 bytes, absent strings
/// as a 0 byte (present ones after a 1), the service as its name, numbers as
/// little-endian two's complement. Written because serde_json's encoding of
/// the record was about 4 % of a serving gateway's instructions per request.
fn put_record(out: &mut Vec<u8>, r: &UsageRecord) {
    out.push(BINARY_V1);
    put_str(out, &r.request_id);
    put_str(out, &r.account_id);
    put_str(out, &r.key_id);
    for s in [&r.device_id, &r.provider_account_id, &r.provision_id] {
        match s {
            Some(s) => {
                out.push(1);
                put_str(out, s);
            }
            None => out.push(0),
        }
    }
    put_str(out, r.service.as_str());
    put_str(out, &r.model);
    for n in [
        r.input_tokens,
        r.output_tokens,
        r.characters,
        r.pages,
        r.latency_ms,
        r.ttfb_ms,
    ] {
        out.extend_from_slice(&n.to_le_bytes());
    }
    out.extend_from_slice(&r.status.to_le_bytes());
    for n in [r.cost, r.reward, r.created_at] {
        out.extend_from_slice(&n.to_le_bytes());
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Records are far below 4 GiB; `encode_into` refuses any over MAX_RECORD.
    out.extend_from_slice(&(s.len().min(u32::MAX as usize) as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Reads a payload of either layout; `None` when it is not a whole record.
fn get_record(payload: &[u8]) -> Option<UsageRecord> {
    let (&tag, rest) = payload.split_first()?;
    if tag != BINARY_V1 {
        return serde_json::from_slice(payload).ok();
    }
    let mut r = Reader(rest);
    let request_id = r.string()?;
    let account_id = r.string()?;
    let key_id = r.string()?;
    let device_id = r.optional()?;
    let provider_account_id = r.optional()?;
    let provision_id = r.optional()?;
    let service = Service::parse(&r.string()?)?;
    let model = r.string()?;
    let record = UsageRecord {
        request_id,
        account_id,
        key_id,
        device_id,
        provider_account_id,
        provision_id,
        service,
        model,
        input_tokens: r.i64()?,
        output_tokens: r.i64()?,
        characters: r.i64()?,
        pages: r.i64()?,
        latency_ms: r.i64()?,
        ttfb_ms: r.i64()?,
        status: i32::from_le_bytes(r.array()?),
        cost: r.i64()?,
        reward: r.i64()?,
        created_at: r.i64()?,
    };
    r.0.is_empty().then_some(record)
}

/// The unread rest of a binary payload.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn i64(&mut self) -> Option<i64> {
        Some(i64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Option<String> {
        let len = u32::from_le_bytes(self.array()?) as usize;
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }

    fn optional(&mut self) -> Option<Option<String>> {
        match self.take(1)? {
            [0] => Some(None),
            [1] => self.string().map(Some),
            _ => None,
        }
    }
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
        match get_record(payload) {
            Some(record) => records.push(record),
            None => break,
        }
        bytes = &bytes[HEADER + len..];
    }
    (records, bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// A record as gateways before decision 63 wrote it: JSON.
    fn json_encoded(record: &UsageRecord) -> Vec<u8> {
        let payload = serde_json::to_vec(record).expect("json");
        let mut out = (payload.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(&checksum(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    #[test]
    fn records_of_both_layouts_come_back_exactly() {
        let mut full = record("a");
        full.provider_account_id = Some("prov-acc-é".into());
        full.provision_id = Some(String::new());
        full.service = Service::Scrape;
        full.model = "org/model:q4 ✓".into();
        (full.characters, full.pages, full.status) = (i64::MIN, i64::MAX, 499);
        let mut bare = record("b");
        bare.device_id = None;
        bare.service = Service::Speech;
        let mut bytes = Vec::new();
        for r in [&full, &bare] {
            bytes.extend(encode(r).expect("encode"));
            bytes.extend(json_encoded(r));
        }
        let (found, skipped) = decode(&bytes);
        assert_eq!(skipped, 0);
        assert_eq!(found, [full.clone(), full, bare.clone(), bare]);
    }

    #[test]
    fn a_binary_payload_that_does_not_parse_ends_the_records_read_back() {
        let good = encode(&record("a")).expect("encode");
        let payload = &good[HEADER..];
        // Cut short, one byte too many, an unknown service, a bad option tag:
        // each with a valid checksum, so only the parse can refuse them.
        let mut unknown_service = payload.to_vec();
        let at = unknown_service.windows(4).position(|w| w == b"chat").expect("service");
        unknown_service[at..at + 4].copy_from_slice(b"chap");
        let mut bad_tag = payload.to_vec();
        // The device id's tag follows the tag byte and three strings.
        let tag_at = 1 + 3 * 4 + "a".len() + "acc".len() + "key".len();
        assert_eq!(bad_tag[tag_at], 1);
        bad_tag[tag_at] = 2;
        let longer = [payload, &[0]].concat();
        for broken in [
            &payload[..payload.len() - 1],
            &longer[..],
            &unknown_service[..],
            &bad_tag[..],
        ] {
            let mut bytes = (broken.len() as u32).to_le_bytes().to_vec();
            bytes.extend_from_slice(&checksum(broken).to_le_bytes());
            bytes.extend_from_slice(broken);
            bytes.extend_from_slice(&good);
            let (found, skipped) = decode(&bytes);
            assert!(found.is_empty());
            assert_eq!(skipped, bytes.len());
        }
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
