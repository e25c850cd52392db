//! CPU, memory, disk and operating system, through `sysinfo`.
//!
//! `sysinfo` reports "nothing learned" as `0` or an empty string; those become `None`
//! here so the report can say "unknown" instead of a wrong number.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sysinfo::{CpuRefreshKind, Disks, System};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    pub cpu: Cpu,
    pub memory: Memory,
    pub disk: Disk,
    pub os: Os,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cpu {
    /// Marketing name, e.g. `AMD Ryzen 9 7950X 16-Core Processor` or `Apple M2 Pro`.
    pub model: Option<String>,
    /// Physical cores (no SMT siblings).
    pub physical_cores: Option<u32>,
    /// Logical processors the OS schedules on.
    pub threads: Option<u32>,
    /// Instruction set, e.g. `x86_64`, `aarch64`/`arm64`.
    pub arch: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Memory {
    pub total_bytes: Option<u64>,
    /// What new programs can get without swapping (includes reclaimable caches).
    pub available_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// The model cache folder the figures are for (it need not exist yet).
    pub models_dir: String,
    /// Mount point of the filesystem holding it.
    pub mount_point: Option<String>,
    pub free_bytes: Option<u64>,
    pub total_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Os {
    /// `linux`, `macos`, `windows`… (Rust's `std::env::consts::OS`).
    pub family: String,
    /// Distribution or product name, e.g. `Ubuntu`, `Darwin`, `Windows`.
    pub name: Option<String>,
    /// e.g. `22.04`, `14.5`, `11 (22631)`.
    pub version: Option<String>,
    /// Kernel release, e.g. `6.5.0-41-generic`.
    pub kernel: Option<String>,
}

/// One mounted filesystem, as far as the disk pick needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: PathBuf,
    pub free_bytes: u64,
    pub total_bytes: u64,
}

pub fn collect(models_dir: &Path) -> HostFacts {
    let mut sys = System::new();
    sys.refresh_memory();
    sys.refresh_cpu_list(CpuRefreshKind::nothing());

    let cpus = sys.cpus();
    let cpu = Cpu {
        model: cpus
            .first()
            .map(|c| c.brand().trim().to_string())
            .filter(|b| !b.is_empty()),
        physical_cores: System::physical_core_count().and_then(|n| u32::try_from(n).ok()),
        threads: u32::try_from(cpus.len()).ok().filter(|n| *n > 0),
        arch: Some(System::cpu_arch()).filter(|a| !a.is_empty()),
    };
    let memory = Memory {
        total_bytes: Some(sys.total_memory()).filter(|n| *n > 0),
        available_bytes: Some(sys.available_memory()).filter(|n| *n > 0),
    };

    let mount = disk_of(models_dir);
    let mount = mount.as_ref();
    let disk = Disk {
        models_dir: models_dir.display().to_string(),
        mount_point: mount.map(|m| m.mount_point.display().to_string()),
        free_bytes: mount.map(|m| m.free_bytes),
        total_bytes: mount.map(|m| m.total_bytes).filter(|n| *n > 0),
    };

    let os = Os {
        family: std::env::consts::OS.to_string(),
        name: System::name().filter(|s| !s.is_empty()),
        version: System::os_version().filter(|s| !s.is_empty()),
        kernel: System::kernel_version().filter(|s| !s.is_empty()),
    };
    HostFacts { cpu, memory, disk, os }
}

/// The filesystem `path` lives (or will live) on, with its free space; `None`
/// when no probe could tell.
pub fn disk_of(path: &Path) -> Option<Mount> {
    let mounts: Vec<Mount> = Disks::new_with_refreshed_list()
        .list()
        .iter()
        .map(|d| Mount {
            mount_point: d.mount_point().to_path_buf(),
            free_bytes: d.available_space(),
            total_bytes: d.total_space(),
        })
        .collect();
    filesystem_of(&existing_ancestor(path), &mounts)
}

/// The closest folder at or above `path` that exists, with links resolved, so a cache
/// folder that is not created yet still finds the filesystem it will live on.
fn existing_ancestor(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    absolute
        .ancestors()
        .find_map(|p| p.canonicalize().ok())
        .unwrap_or(absolute)
}

/// The filesystem holding `path`. `sysinfo` leaves out network filesystems (statvfs on a
/// hard-mounted NFS share can hang), so when its deepest containing mount is not the
/// path's own filesystem, `df` is asked instead, under a deadline. Unknown beats wrong.
fn filesystem_of(path: &Path, mounts: &[Mount]) -> Option<Mount> {
    if let Some(m) = mount_for(path, mounts).filter(|m| same_filesystem(path, &m.mount_point)) {
        return Some(m.clone());
    }
    if cfg!(unix) {
        let path = path.to_str()?;
        let text = super::command::output("df", &["-Pk", path], super::command::QUICK)?;
        return parse_df(&text).filter(|m| same_filesystem(Path::new(path), &m.mount_point));
    }
    None
}

#[cfg(unix)]
fn same_filesystem(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_filesystem(_: &Path, _: &Path) -> bool {
    // Windows mounts are drive letters; the longest-prefix pick is already exact.
    true
}

/// Parses POSIX `df -Pk PATH`: a header, then `FS 1024-blocks used available capacity%
/// mount point`. The capacity column (ending in `%`) anchors the parse, so spaces in
/// the device name or the mount point do not shift it.
pub fn parse_df(text: &str) -> Option<Mount> {
    let line = text.lines().nth(1)?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    let cap = fields.iter().rposition(|f| f.ends_with('%'))?;
    let kib = |i: usize| fields.get(i)?.parse::<u64>().ok()?.checked_mul(1024);
    let total = kib(cap.checked_sub(3)?)?;
    let free = kib(cap.checked_sub(1)?)?;
    let mount_point = fields.get(cap + 1..).filter(|rest| !rest.is_empty())?.join(" ");
    Some(Mount {
        mount_point: PathBuf::from(mount_point),
        free_bytes: free,
        total_bytes: total,
    })
}

/// The filesystem holding `path`: the mount with the longest mount point that contains it.
pub fn mount_for<'a>(path: &Path, mounts: &'a [Mount]) -> Option<&'a Mount> {
    mounts
        .iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.components().count())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(at: &str, free: u64) -> Mount {
        Mount {
            mount_point: PathBuf::from(at),
            free_bytes: free,
            total_bytes: free * 2,
        }
    }

    #[test]
    fn the_deepest_containing_mount_wins() {
        let mounts = [mount("/", 1), mount("/home", 2), mount("/home2", 3)];
        let pick = |p: &str| mount_for(Path::new(p), &mounts).map(|m| m.free_bytes);
        assert_eq!(pick("/home/ann/.cache/cxmpute/models"), Some(2));
        // Path components, not string prefixes: /home2 does not contain /home.
        assert_eq!(pick("/home2/x"), Some(3));
        assert_eq!(pick("/var/cache"), Some(1));
        assert_eq!(mount_for(Path::new("relative"), &mounts), None);
    }

    #[test]
    fn df_output() {
        let text = "Filesystem     1024-blocks      Used Available Capacity Mounted on\n\
                    server:/export/home 1000 400 600 40% /mnt/my home\n";
        assert_eq!(
            parse_df(text),
            Some(Mount {
                mount_point: PathBuf::from("/mnt/my home"),
                free_bytes: 600 * 1024,
                total_bytes: 1000 * 1024,
            })
        );
        assert_eq!(parse_df("Filesystem 1024-blocks\n"), None);
        assert_eq!(parse_df(""), None);
    }

    #[cfg(unix)]
    #[test]
    fn the_filesystem_of_a_temp_folder_is_found() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().canonicalize().unwrap();
        // With no mounts listed at all, df must still find it.
        let m = filesystem_of(&path, &[]).expect("df answers");
        assert!(path.starts_with(&m.mount_point) && m.total_bytes > 0, "{m:?}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_containing_mount_of_another_filesystem_is_not_taken() {
        // /proc is its own filesystem, so "/" holds its path but not its files.
        let root = Mount {
            mount_point: PathBuf::from("/"),
            free_bytes: 1,
            total_bytes: 1,
        };
        assert_ne!(
            filesystem_of(Path::new("/proc/self"), std::slice::from_ref(&root)),
            Some(root)
        );
    }

    #[test]
    fn a_missing_folder_resolves_to_its_nearest_existing_parent() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("not/yet/created");
        assert_eq!(existing_ancestor(&missing), tmp.path().canonicalize().unwrap());
    }
}
