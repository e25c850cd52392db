//! Models from a Hugging Face hub (or a mirror): resumable, verified downloads
//! into the model cache (`cxmpute-provider models pull`).
//!
//! A file's URL is `{endpoint}/{repo}/resolve/{revision}/{file}`, with the
//! endpoint from `$HF_ENDPOINT` (default `https://huggingface.co`) and
//! `$HF_TOKEN` sent as a bearer token when set.
//!
//! - **Sizes and checksums first.** A `HEAD` per file, without following the
//!   hub's redirect to its CDN, reads `X-Linked-Size` / `X-Linked-Etag` (the
//!   size and SHA-256 of files stored with Git LFS, i.e. the weights) or
//!   `Content-Length` (small files kept in git, which have no SHA-256 there).
//! - **Disk space** for everything still to download is checked before any
//!   byte is written.
//! - **Resumable.** Bytes go to `.partial/<model>/<file>.part` in the cache;
//!   a later run asks for the rest with `Range: bytes=N-` (a server that
//!   ignores it and sends the whole file is handled too).
//! - **Verified.** A finished file must have the announced size and, when the
//!   hub gave one, SHA-256; a mismatch deletes it. The model folder appears
//!   only once every file is complete (one rename, or per-file renames into
//!   an existing incomplete folder).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, ETAG, LOCATION, RANGE};
use reqwest::StatusCode;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes kept free on the disk on top of the download itself.
const DISK_MARGIN: u64 = 64 << 20;

/// Where the hub is and who we are to it.
#[derive(Debug, Clone)]
pub struct Hub {
    pub endpoint: String,
    pub token: Option<String>,
}

impl Hub {
    /// From `$HF_ENDPOINT` and `$HF_TOKEN`.
    pub fn from_env() -> Self {
        let var = |k| std::env::var(k).ok().filter(|v: &String| !v.trim().is_empty());
        Self {
            endpoint: var("HF_ENDPOINT")
                .unwrap_or_else(|| "https://huggingface.co".into())
                .trim_end_matches('/')
                .to_owned(),
            token: var("HF_TOKEN"),
        }
    }

    pub fn file_url(&self, repo: &str, revision: &str, file: &str) -> String {
        format!("{}/{repo}/resolve/{revision}/{file}", self.endpoint)
    }
}

/// What to download: `files` of `repo` at `revision`, into the folder `dest`.
#[derive(Debug, Clone)]
pub struct PullSpec {
    pub repo: String,
    pub revision: String,
    pub files: Vec<String>,
    pub dest: PathBuf,
    /// Most bytes this download may take (the node owner's disk allowance).
    pub max_bytes: Option<u64>,
}

/// One progress update: `done` of `total` bytes of `file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Bytes already on disk from an earlier, interrupted run.
    Resuming {
        file: String,
        have: u64,
    },
    Bytes {
        file: String,
        done: u64,
        total: u64,
    },
    Verified {
        file: String,
    },
}

/// What the hub says about a file before it is downloaded.
#[derive(Debug, Clone)]
struct Remote {
    file: String,
    url: String,
    size: u64,
    sha256: Option<String>,
}

pub(crate) fn check_file_name(file: &str) -> Result<()> {
    // No drive letters or other prefixes either: joined to the destination,
    // every part must stay a plain name on every platform.
    let ok = !file.is_empty()
        && !file.starts_with('/')
        && !file.contains('\\')
        && !file.contains(':')
        && file
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
        && Path::new(file)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    anyhow::ensure!(ok, "'{file}' is not a file path inside a repository");
    Ok(())
}

/// A repository id the hub accepts: `name` or `org/name`.
pub fn check_repo(repo: &str) -> Result<()> {
    let parts: Vec<&str> = repo.split('/').collect();
    let ok = (1..=2).contains(&parts.len())
        && parts.iter().all(|p| {
            !p.is_empty()
                && *p != "."
                && *p != ".."
                && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        });
    anyhow::ensure!(ok, "'{repo}' is not a Hugging Face repository id (expected org/name)");
    Ok(())
}

/// The 64-hex SHA-256 in an LFS ETag (`"…"`, possibly weak), if it is one.
fn sha256_etag(value: &str) -> Option<String> {
    let v = value
        .trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_ascii_lowercase();
    (v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit())).then_some(v)
}

fn unreachable_hint(hub: &Hub, e: &reqwest::Error) -> anyhow::Error {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg = format!("{msg}: {s}");
        src = s.source();
    }
    anyhow!(
        "cannot reach the Hugging Face hub at {} ({msg}); check the network, or set HF_ENDPOINT to a mirror",
        hub.endpoint
    )
}

fn refused(status: StatusCode, url: &str, spec: &PullSpec, file: &str) -> anyhow::Error {
    match status.as_u16() {
        401 | 403 => anyhow!(
            "the hub refused {url} ({status}): the repository may be gated or private; set HF_TOKEN to a token \
             that can read it"
        ),
        404 => anyhow!(
            "{} has no file '{file}' at revision '{}' ({url} answered 404)",
            spec.repo,
            spec.revision
        ),
        _ => anyhow!("the hub answered {status} for {url}"),
    }
}

fn human(n: u64) -> String {
    crate::diagnose::render::size(Some(n))
}

/// Downloads `spec` into its folder; returns the folder. Nothing is fetched
/// when the folder already holds every file.
pub async fn pull(hub: &Hub, spec: &PullSpec, mut progress: impl FnMut(Progress)) -> Result<PathBuf> {
    check_repo(&spec.repo)?;
    anyhow::ensure!(!spec.files.is_empty(), "no files to download");
    for f in &spec.files {
        check_file_name(f)?;
    }
    if spec.files.iter().all(|f| spec.dest.join(f).is_file()) {
        return Ok(spec.dest.clone());
    }
    let root = spec
        .dest
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent folder", spec.dest.display()))?;
    let name = spec
        .dest
        .file_name()
        .ok_or_else(|| anyhow!("{} has no folder name", spec.dest.display()))?;
    let partial = root.join(".partial").join(name);
    tokio::fs::create_dir_all(&partial)
        .await
        .with_context(|| format!("cannot create {}", partial.display()))?;

    let client = reqwest::Client::builder()
        .user_agent(concat!("cxmpute-provider/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(60))
        .build()
        .context("cannot build an HTTP client")?;
    let no_redirect = reqwest::Client::builder()
        .user_agent(concat!("cxmpute-provider/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .context("cannot build an HTTP client")?;

    // Sizes (and checksums) of the files still missing.
    let mut remotes = Vec::new();
    for file in spec.files.iter().filter(|f| !spec.dest.join(f).is_file()) {
        remotes.push(describe(hub, &no_redirect, spec, file).await?);
    }
    let mut needed = 0u64;
    for r in &remotes {
        let have = part_len(&partial.join(format!("{}.part", r.file))).await;
        needed += r.size.saturating_sub(have);
    }
    if let Some(max) = spec.max_bytes.filter(|max| needed > *max) {
        bail!(
            "{} needs {} to download, more than this node's disk allowance of {} (max_disk_mb)",
            spec.repo,
            human(needed),
            human(max)
        );
    }
    if let Some(disk) = crate::diagnose::host::disk_of(root) {
        if disk.free_bytes < needed.saturating_add(DISK_MARGIN) {
            bail!(
                "not enough disk space for {}: {} to download, {} free on {} (keeping {} spare)",
                spec.repo,
                human(needed),
                human(disk.free_bytes),
                disk.mount_point.display(),
                human(DISK_MARGIN)
            );
        }
    }

    for r in &remotes {
        let done = partial.join(&r.file);
        if !done.is_file() {
            download(hub, &client, r, &partial, &mut progress).await?;
        }
    }
    install(&partial, &spec.dest, &spec.files).await?;
    Ok(spec.dest.clone())
}

async fn part_len(path: &Path) -> u64 {
    tokio::fs::metadata(path).await.map_or(0, |m| m.len())
}

/// `HEAD` without following the CDN redirect: the hub's own answer carries
/// the LFS size and SHA-256.
async fn describe(hub: &Hub, client: &reqwest::Client, spec: &PullSpec, file: &str) -> Result<Remote> {
    let url = hub.file_url(&spec.repo, &spec.revision, file);
    let mut req = client.head(&url);
    if let Some(t) = &hub.token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.map_err(|e| unreachable_hint(hub, &e))?;
    let status = res.status();
    if !(status.is_success() || status.is_redirection()) {
        return Err(refused(status, &url, spec, file));
    }
    let header = |name: &str| res.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let sha256 = header("x-linked-etag").and_then(|e| sha256_etag(&e));
    let mut size = header("x-linked-size").and_then(|s| s.trim().parse::<u64>().ok());
    if size.is_none() && status.is_success() {
        size = header(CONTENT_LENGTH.as_str()).and_then(|s| s.trim().parse().ok());
    }
    if size.is_none() && status.is_redirection() {
        // A plain redirect (a mirror): ask where it points.
        if let Some(to) = header(LOCATION.as_str()) {
            let to = reqwest::Url::parse(&url).and_then(|u| u.join(&to)).ok();
            if let Some(to) = to {
                let res = client.head(to).send().await.map_err(|e| unreachable_hint(hub, &e))?;
                size = res
                    .headers()
                    .get(CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|s| s.trim().parse().ok());
            }
        }
    }
    let size = size.ok_or_else(|| anyhow!("the hub did not say how large {file} is ({url})"))?;
    // A small file kept in git has a git-blob ETag, not a SHA-256: size only.
    let sha256 = sha256.or_else(|| {
        header(ETAG.as_str())
            .filter(|_| header("x-linked-size").is_some())
            .and_then(|e| sha256_etag(&e))
    });
    Ok(Remote {
        file: file.to_owned(),
        url,
        size,
        sha256,
    })
}

/// Fetches one file into `partial/<file>.part`, resuming what is there, then
/// verifies it and renames it to `partial/<file>`.
async fn download(
    hub: &Hub,
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
        // Not a prefix of this file (the repository changed): start over.
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
        let mut req = client.get(&r.url);
        if let Some(t) = &hub.token {
            req = req.bearer_auth(t);
        }
        if have > 0 {
            req = req.header(RANGE, format!("bytes={have}-"));
        }
        let mut res = req.send().await.map_err(|e| unreachable_hint(hub, &e))?;
        let status = res.status();
        let append = match status {
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
                    "the hub resumed {} at the wrong place ({:?} instead of byte {have})",
                    r.file,
                    start
                );
                true
            }
            StatusCode::OK => false,
            s => bail!("downloading {} failed: the hub answered {s}", r.url),
        };
        let mut out = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&part)
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
                        "the download of {} was interrupted at {} of {} ({e}); run the command again to resume",
                        r.file,
                        human(done),
                        human(r.size)
                    );
                }
            };
            done += chunk.len() as u64;
            anyhow::ensure!(
                done <= r.size,
                "{} is larger than the {} the hub announced",
                r.file,
                human(r.size)
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
        drop(out);
    }
    let len = part_len(&part).await;
    if len != r.size {
        bail!(
            "{} ended at {} of {}; run the command again to resume",
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
                "checksum mismatch for {}: the hub announced SHA-256 {want}, the download has {got}; \
                 the file was discarded",
                r.file
            );
        }
    }
    tokio::fs::rename(&part, partial.join(&r.file))
        .await
        .with_context(|| format!("cannot finish {}", part.display()))?;
    progress(Progress::Verified { file: r.file.clone() });
    Ok(())
}

async fn sha256_file(path: &Path) -> Result<String> {
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

/// Moves the finished files into `dest`: the whole folder in one rename when
/// `dest` does not exist yet, else file by file.
async fn install(partial: &Path, dest: &Path, files: &[String]) -> Result<()> {
    let leftover_parts = files.iter().any(|f| partial.join(format!("{f}.part")).exists());
    if !dest.exists() && !leftover_parts && tokio::fs::rename(partial, dest).await.is_ok() {
        return Ok(());
    }
    for f in files {
        let from = partial.join(f);
        if !from.is_file() {
            continue; // already in dest
        }
        let to = dest.join(f);
        if let Some(dir) = to.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        tokio::fs::rename(&from, &to)
            .await
            .with_context(|| format!("cannot move {} to {}", from.display(), to.display()))?;
    }
    tokio::fs::remove_dir_all(partial).await.ok();
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_and_names() {
        let sha = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";
        assert_eq!(sha256_etag(&format!("\"{sha}\"")).as_deref(), Some(sha));
        assert_eq!(
            sha256_etag(&format!("W/\"{}\"", sha.to_uppercase())).as_deref(),
            Some(sha)
        );
        assert_eq!(sha256_etag("\"5f1c2a\""), None);
        assert!(check_repo("sentence-transformers/all-MiniLM-L6-v2").is_ok());
        for bad in ["", "a/b/c", "../x", "a/..", "a b/c"] {
            assert!(check_repo(bad).is_err(), "{bad}");
        }
        assert!(check_file_name("onnx/model.onnx").is_ok());
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a\\b",
            "a//b",
            "C:/x/model.gguf",
            "a/c:x",
        ] {
            assert!(check_file_name(bad).is_err(), "{bad}");
        }
    }
}
