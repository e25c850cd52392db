//! What is in the model cache, and removing an entry: `cxmpute-provider models list|rm`.
//!
//! Every top-level entry of the cache folder is a model: a folder or a single file (GGUF
//! weights). A folder is complete once it holds a safetensors model's
//! [`REQUIRED_FILES`](super::REQUIRED_FILES) or a `.gguf` file, which is a model on its
//! own. Hidden entries are the fetcher's scratch folders and are not listed.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::is_model_folder;
use super::source::Format;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheListing {
    /// The cache folder that was listed.
    pub dir: String,
    /// False when the folder does not exist yet (nothing fetched so far).
    pub exists: bool,
    /// Entries sorted by name.
    pub models: Vec<CachedModel>,
    /// Sum of the entries' sizes.
    pub total_bytes: u64,
    /// Bytes of unfinished or left-over downloads (`.partial`), not in `total_bytes`.
    #[serde(default)]
    pub partial_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedModel {
    /// The entry's name in the cache folder, as `models rm` takes it.
    pub name: String,
    /// `folder` or `file`.
    pub kind: EntryKind,
    /// Bytes on disk, counting every file below a folder (links are not followed).
    pub size_bytes: u64,
    /// For folders: holds every file an engine needs (or a GGUF). `null` for single files.
    pub complete: Option<bool>,
    /// Fetched for the gateway's catalog (and reused for it); false for models
    /// pulled or copied by hand.
    #[serde(default)]
    pub catalog: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    Folder,
    File,
}

#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    #[error("`{0}` is not a model name: give the name `models list` shows, without `/`, `\\` or `..`")]
    InvalidName(String),
    #[error("no model named `{name}` in {dir}{}", known_hint(.known))]
    NotFound {
        name: String,
        dir: PathBuf,
        known: Vec<String>,
    },
    #[error("cannot remove {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn known_hint(known: &[String]) -> String {
    if known.is_empty() {
        " (the cache is empty)".into()
    } else {
        format!("; cached models: {}", known.join(", "))
    }
}

/// Lists the cache folder `dir`. A missing folder is an empty listing, not an error.
pub fn list(dir: &Path) -> io::Result<CacheListing> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(CacheListing {
                dir: dir.display().to_string(),
                exists: false,
                models: Vec::new(),
                total_bytes: 0,
                partial_bytes: 0,
            })
        }
        Err(e) => return Err(e),
    };
    let mut models = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        // Follows a link at the top level: a cache entry linked to a model kept elsewhere
        // is still a cached model, and its size is what it holds.
        let Ok(meta) = fs::metadata(&path) else {
            continue;
        };
        let model = if meta.is_dir() {
            CachedModel {
                name,
                kind: EntryKind::Folder,
                size_bytes: tree_size(&path),
                complete: Some(folder_is_complete(&path)),
                catalog: super::source::fetched_for_catalog(&path),
            }
        } else {
            CachedModel {
                name,
                kind: EntryKind::File,
                size_bytes: meta.len(),
                complete: None,
                catalog: false,
            }
        };
        models.push(model);
    }
    models.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(CacheListing {
        dir: dir.display().to_string(),
        exists: true,
        total_bytes: models.iter().map(|m| m.size_bytes).sum(),
        partial_bytes: tree_size(&dir.join(".partial")),
        models,
    })
}

fn folder_is_complete(dir: &Path) -> bool {
    let formats = [Format::Gguf, Format::SentenceBert, Format::PiperVoice];
    if formats.iter().any(|f| super::source::locate(dir, *f).is_ok()) {
        return true;
    }
    // The voice's runtime library is not a model, but it is all its folder needs.
    is_model_folder(dir)
        || super::find_onnxruntime_library(dir).is_some()
        || fs::read_dir(dir).is_ok_and(|entries| {
            entries.filter_map(Result::ok).any(|e| {
                let path = e.path();
                path.is_file() && path.extension().is_some_and(|x| x.eq_ignore_ascii_case("gguf"))
            })
        })
}

/// The listing as a table with a summary line, for `models list`.
pub fn human(listing: &CacheListing) -> String {
    use crate::diagnose::render::{size, table};

    let partial = if listing.partial_bytes > 0 {
        format!(
            "{} of unfinished downloads in {}/.partial (resumed by the next fetch; left-over files go after a week)\n",
            size(Some(listing.partial_bytes)),
            listing.dir
        )
    } else {
        String::new()
    };
    if listing.models.is_empty() {
        let why = if listing.exists {
            "is empty"
        } else {
            "does not exist yet"
        };
        return format!("no cached models: {} {why}\n{partial}", listing.dir);
    }
    let mut rows = vec![vec!["NAME".to_string(), "SIZE".into(), "KIND".into(), "STATUS".into()]];
    for m in &listing.models {
        let status = match (m.complete, m.catalog) {
            (Some(true), true) => "complete, catalog",
            (Some(false), true) => "incomplete, catalog",
            (Some(true), false) => "complete",
            (Some(false), false) => "incomplete",
            (None, _) => "",
        };
        let kind = match m.kind {
            EntryKind::Folder => "folder",
            EntryKind::File => "file",
        };
        rows.push(vec![
            m.name.clone(),
            size(Some(m.size_bytes)),
            kind.into(),
            status.into(),
        ]);
    }
    format!(
        "{}{} model(s), {} in {}\n{partial}",
        table(&rows),
        listing.models.len(),
        size(Some(listing.total_bytes)),
        listing.dir
    )
}

/// Bytes of every file below `dir`, not following links; unreadable parts count as 0.
pub(crate) fn tree_size(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_size(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

/// A name that can only mean an entry directly inside the cache folder.
fn check_name(name: &str) -> Result<(), RemoveError> {
    let bad = name.is_empty()
        || name == "."
        || name.contains("..")
        || name.contains(['/', '\\', ':', '\0'])
        || Path::new(name).is_absolute();
    if bad {
        Err(RemoveError::InvalidName(name.to_string()))
    } else {
        Ok(())
    }
}

/// Removes the cache entry `name` from `dir` and returns what was removed. A linked
/// entry loses only the link, never the files it points at.
pub fn remove(dir: &Path, name: &str) -> Result<CachedModel, RemoveError> {
    check_name(name)?;
    let path = dir.join(name);
    let not_found = || RemoveError::NotFound {
        name: name.to_string(),
        dir: dir.to_path_buf(),
        known: list(dir)
            .map(|l| l.models.into_iter().map(|m| m.name).collect())
            .unwrap_or_default(),
    };
    let meta = match fs::symlink_metadata(&path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_found()),
        Err(source) => return Err(RemoveError::Io { path, source }),
    };
    let entry = list(dir)
        .ok()
        .and_then(|l| l.models.into_iter().find(|m| m.name == name))
        .ok_or_else(not_found)?;
    let result = if meta.is_dir() {
        fs::remove_dir_all(&path)
    } else {
        // A file, or a link (to a file or a folder): unlink it.
        fs::remove_file(&path).or_else(|e| {
            // Windows removes links to folders with remove_dir.
            if meta.file_type().is_symlink() {
                fs::remove_dir(&path)
            } else {
                Err(e)
            }
        })
    };
    result.map_err(|source| RemoveError::Io { path, source })?;
    Ok(entry)
}

/// What the cache must make room for: `incoming` bytes of models about to be
/// fetched, within the owner's `allowance` for the whole cache, keeping
/// `margin` bytes free on a disk that has `free_bytes` left.
#[derive(Debug, Clone, Copy)]
pub struct Room {
    pub incoming: u64,
    pub allowance: Option<u64>,
    pub free_bytes: Option<u64>,
    pub margin: u64,
}

/// Evicts models fetched for the gateway's catalog that `keep` does not name
/// (cache folder names), least recently used first, until the cache plus the
/// incoming models fits the allowance and the disk keeps its margin. Models
/// the owner pulled or copied by hand, and the built-in ones, are never
/// evicted. Best effort: when evicting everything allowed is not enough, the
/// download itself refuses with the reason. Returns what was removed.
pub fn make_room(dir: &Path, room: &Room, keep: &[String]) -> Vec<CachedModel> {
    let Ok(listing) = list(dir) else {
        return Vec::new();
    };
    let (mut total, mut free) = (listing.total_bytes, room.free_bytes);
    let over = |total: u64, free: Option<u64>| {
        room.allowance
            .is_some_and(|max| total.saturating_add(room.incoming) > max)
            || free.is_some_and(|f| f < room.incoming.saturating_add(room.margin))
    };
    let mut candidates: Vec<(std::time::SystemTime, CachedModel)> = listing
        .models
        .into_iter()
        .filter(|m| m.catalog && !keep.contains(&m.name))
        .map(|m| (super::source::last_used(&dir.join(&m.name)), m))
        .collect();
    candidates.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.name.cmp(&b.1.name)));
    let mut removed = Vec::new();
    for (_, model) in candidates {
        if !over(total, free) {
            break;
        }
        match remove(dir, &model.name) {
            Ok(gone) => {
                total = total.saturating_sub(gone.size_bytes);
                free = free.map(|f| f.saturating_add(gone.size_bytes));
                removed.push(gone);
            }
            Err(e) => tracing::warn!("cannot evict {} from the model cache: {e}", model.name),
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder fetched for the catalog with `bytes` of weights, last used `age_s` ago.
    fn catalog_model(cache: &Path, name: &str, bytes: usize, age_s: u64) {
        let dir = cache.join(name);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("model.gguf"), vec![0u8; bytes]).unwrap();
        let marker = dir.join(super::super::source::MARKER);
        fs::write(&marker, "hf:acme/x\n").unwrap();
        let when = std::time::SystemTime::now() - std::time::Duration::from_secs(age_s);
        fs::File::options()
            .append(true)
            .open(&marker)
            .unwrap()
            .set_modified(when)
            .unwrap();
    }

    #[test]
    fn eviction_takes_unassigned_catalog_models_least_recently_used_first() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path();
        catalog_model(cache, "old", 4000, 3000);
        catalog_model(cache, "older", 4000, 9000);
        catalog_model(cache, "assigned", 4000, 99_000);
        catalog_model(cache, "recent", 4000, 10);
        // Pulled by hand: never evicted, however old or large.
        fs::create_dir_all(cache.join("by-hand")).unwrap();
        fs::write(cache.join("by-hand/model.gguf"), vec![0u8; 8000]).unwrap();
        let keep = vec!["assigned".to_string()];
        let total = list(cache).unwrap().total_bytes;

        // Fits already: nothing goes.
        let room = Room {
            incoming: 1000,
            allowance: Some(total + 1000),
            free_bytes: None,
            margin: 0,
        };
        assert!(make_room(cache, &room, &keep).is_empty());

        // 6000 bytes more than fit: the two oldest unassigned ones go, "recent" stays.
        let room = Room {
            incoming: 7000,
            allowance: Some(total + 1000),
            free_bytes: None,
            margin: 0,
        };
        let gone: Vec<String> = make_room(cache, &room, &keep).into_iter().map(|m| m.name).collect();
        assert_eq!(gone, ["older", "old"]);
        assert!(cache.join("recent").is_dir() && cache.join("assigned").is_dir() && cache.join("by-hand").is_dir());

        // The disk is short: evicts what it may, then stops without touching the rest.
        let room = Room {
            incoming: 50_000,
            allowance: None,
            free_bytes: Some(10_000),
            margin: 1000,
        };
        let gone: Vec<String> = make_room(cache, &room, &keep).into_iter().map(|m| m.name).collect();
        assert_eq!(gone, ["recent"]);
        assert!(cache.join("assigned").is_dir() && cache.join("by-hand").is_dir());
    }

    #[test]
    fn names_that_could_leave_the_cache_are_refused() {
        for bad in ["", ".", "..", "../x", "a/b", "a\\b", "x..y", "/etc", "C:evil", "nul\0"] {
            assert!(
                matches!(check_name(bad), Err(RemoveError::InvalidName(_))),
                "{bad:?} was accepted"
            );
        }
        for good in ["all-minilm-l6-v2", "org--name", "qwen2.5-0.5b-instruct-q4_k_m.gguf"] {
            assert!(check_name(good).is_ok(), "{good:?} was refused");
        }
    }

    #[test]
    fn a_missing_cache_lists_as_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let l = list(&tmp.path().join("nope")).unwrap();
        assert!(!l.exists && l.models.is_empty() && l.total_bytes == 0);
    }

    #[cfg(unix)]
    #[test]
    fn removing_a_link_keeps_its_target() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("cache");
        let elsewhere = tmp.path().join("elsewhere");
        fs::create_dir_all(&cache).unwrap();
        fs::create_dir_all(&elsewhere).unwrap();
        fs::write(elsewhere.join("model.safetensors"), b"1234").unwrap();
        std::os::unix::fs::symlink(&elsewhere, cache.join("linked")).unwrap();

        let listed = list(&cache).unwrap();
        assert_eq!(listed.models[0].size_bytes, 4);
        let removed = remove(&cache, "linked").unwrap();
        assert_eq!(removed.name, "linked");
        assert!(!cache.join("linked").exists());
        assert!(elsewhere.join("model.safetensors").is_file());
    }
}
