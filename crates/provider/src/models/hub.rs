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

use anyhow::{anyhow, Context, Result};
use reqwest::header::{CONTENT_LENGTH, ETAG, LOCATION};
use reqwest::StatusCode;

use super::download::{self, Origin, Remote};
pub use super::download::{progress_bar, Progress};

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

    fn origin(&self) -> Origin {
        Origin {
            name: format!("the Hugging Face hub at {}", self.endpoint),
            fix: "or set HF_ENDPOINT to a mirror",
            auth_hint: "the repository may be gated or private; set HF_TOKEN to a token that can read it",
            token: self.token.clone(),
        }
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

    let client = download::client(true)?;
    let no_redirect = download::client(false)?;
    let origin = hub.origin();

    // Sizes (and checksums) of the files still missing.
    let mut remotes = Vec::new();
    for file in spec.files.iter().filter(|f| !spec.dest.join(f).is_file()) {
        remotes.push(describe(hub, &no_redirect, spec, file).await?);
    }
    let mut needed = 0u64;
    for r in &remotes {
        let have = download::part_len(&partial.join(format!("{}.part", r.file))).await;
        needed += r.size.saturating_sub(have);
    }
    download::check_room(root, needed, spec.max_bytes, &spec.repo)?;

    for r in &remotes {
        let done = partial.join(&r.file);
        if !done.is_file() {
            download::download(&origin, &client, r, &partial, &mut progress).await?;
        }
    }
    install(&partial, &spec.dest, &spec.files).await?;
    Ok(spec.dest.clone())
}

/// `HEAD` without following the CDN redirect: the hub's own answer carries
/// the LFS size and SHA-256.
async fn describe(hub: &Hub, client: &reqwest::Client, spec: &PullSpec, file: &str) -> Result<Remote> {
    let url = hub.file_url(&spec.repo, &spec.revision, file);
    let mut req = client.head(&url);
    if let Some(t) = &hub.token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.map_err(|e| download::unreachable(&hub.origin(), &e))?;
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
                let res = client
                    .head(to)
                    .send()
                    .await
                    .map_err(|e| download::unreachable(&hub.origin(), &e))?;
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
