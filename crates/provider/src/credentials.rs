//! Saved device credentials: what `cxmpute-provider login` writes and `start`
//! falls back on when no credential is given.
//!
//! The file is `$CXMPUTE_CREDENTIALS`, else `$XDG_CONFIG_HOME/cxmpute/credentials.toml`,
//! else `$HOME/.config/cxmpute/credentials.toml`. It holds a secret, so it is
//! written to a new file created with mode 0600 (in a folder created 0700)
//! and then renamed into place: at no moment can another user read it, and a
//! crash mid-write leaves the old file intact.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// The gateway these credentials belong to.
    pub gateway: String,
    pub device_id: String,
    pub access_key: String,
    /// The device's name on the gateway.
    #[serde(default)]
    pub name: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("gateway", &self.gateway)
            .field("device_id", &self.device_id)
            .field("access_key", &"***")
            .field("name", &self.name)
            .finish()
    }
}

impl Credentials {
    /// `<device id>.<access key>`, as the link expects it.
    pub fn credential(&self) -> String {
        format!("{}.{}", self.device_id, self.access_key)
    }
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// Where credentials are kept when no path is given.
pub fn default_path() -> PathBuf {
    if let Some(path) = env_path("CXMPUTE_CREDENTIALS") {
        return path;
    }
    let config = env_path("XDG_CONFIG_HOME")
        .or_else(|| env_path("HOME").map(|h| h.join(".config")))
        .or_else(|| env_path("APPDATA"))
        .unwrap_or_else(std::env::temp_dir);
    config.join("cxmpute").join("credentials.toml")
}

/// Reads the file; `Ok(None)` when there is none.
pub fn load(path: &Path) -> anyhow::Result<Option<Credentials>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let creds: Credentials =
        toml::from_str(&text).with_context(|| format!("{} is not a credentials file", path.display()))?;
    anyhow::ensure!(
        !creds.device_id.is_empty() && !creds.access_key.is_empty() && !creds.device_id.contains('.'),
        "{} holds no usable device id and access key",
        path.display()
    );
    Ok(Some(creds))
}

/// Writes the file with mode 0600 (see the module docs).
pub fn save(path: &Path, creds: &Credentials) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let text = toml::to_string(creds).context("encoding the credentials")?;
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("credentials.toml");
    let staging = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let written = write_then_rename(&opts, &staging, path, text.as_bytes());
    if written.is_err() {
        let _ = std::fs::remove_file(&staging);
    }
    written
}

fn write_then_rename(opts: &std::fs::OpenOptions, staging: &Path, path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut file = opts
        .open(staging)
        .with_context(|| format!("cannot create {}", staging.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(staging, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Deletes the file; returns whether there was one.
pub fn remove(path: &Path) -> anyhow::Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("cannot delete {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Credentials {
        Credentials {
            gateway: "http://127.0.0.1:8080".into(),
            device_id: "dev_abc".into(),
            access_key: "s3cret".into(),
            name: "laptop".into(),
        }
    }

    #[test]
    fn saved_credentials_load_back_private_and_hidden_in_debug() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested").join("credentials.toml");
        assert_eq!(load(&path).unwrap(), None);
        save(&path, &sample()).unwrap();
        assert_eq!(load(&path).unwrap(), Some(sample()));
        assert_eq!(sample().credential(), "dev_abc.s3cret");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            let dir_mode = std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777;
            assert_eq!(dir_mode, 0o700);
        }
        // Saving again replaces the file (and keeps it private).
        let mut other = sample();
        other.device_id = "dev_new".into();
        save(&path, &other).unwrap();
        assert_eq!(load(&path).unwrap().unwrap().device_id, "dev_new");
        assert!(!format!("{other:?}").contains("s3cret"));
        assert!(remove(&path).unwrap());
        assert!(!remove(&path).unwrap());
    }

    #[test]
    fn broken_files_are_errors_not_empty_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "gateway = 1").unwrap();
        assert!(load(&path).is_err());
        std::fs::write(&path, "gateway = \"x\"\ndevice_id = \"\"\naccess_key = \"k\"\n").unwrap();
        assert!(load(&path).is_err());
    }
}
