//! `cxmpute-provider diagnose`: what this machine can offer the pool.
//!
//! # Layout
//! - this file: the [`Report`] (its JSON is a stable interface) and [`collect`].
//! - [`tier`]: the VRAM tier rule.
//! - [`host`]: CPU, memory, disk and OS through `sysinfo`.
//! - [`gpu`]: graphics cards, from per-platform probes whose raw output is parsed by pure
//!   functions, so recorded outputs (tests/fixtures/diagnose/) can be replayed anywhere.
//! - [`command`]: running probe programs with a deadline.
//! - [`render`]: the human-readable table.
//!
//! Every probe fails soft: a field it could not learn is `None` (`null` in JSON,
//! "unknown" in the table). Nothing here panics or returns an error on bad input.

pub mod command;
pub mod gpu;
pub mod host;
pub mod render;
pub mod tier;

use std::path::Path;

use serde::{Deserialize, Serialize};

pub use gpu::{Backend, Gpu, GpuKind, GpuProbes, Vendor};
pub use host::{Cpu, Disk, HostFacts, Memory, Os};
pub use tier::Tier;

/// Bumped whenever a field changes meaning or disappears (adding fields does not bump it).
pub const SCHEMA_VERSION: u32 = 1;

/// Everything `diagnose` learns about the machine. Serialized as-is by `--json`; sizes are
/// bytes, unknown values are `null`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// [`SCHEMA_VERSION`] of this layout.
    pub schema: u32,
    pub cpu: Cpu,
    pub memory: Memory,
    /// Every graphics adapter found, best first (see [`gpu::sort_best_first`]).
    pub gpus: Vec<Gpu>,
    /// Free space where models are stored.
    pub disk: Disk,
    pub os: Os,
    /// The tier this machine earns from its best dedicated (or unified-memory) GPU.
    pub tier: Tier,
}

impl Report {
    /// Assembles a report from already-gathered facts; pure, so tests can feed recordings.
    pub fn build(host: HostFacts, mut gpus: Vec<Gpu>) -> Report {
        gpu::sort_best_first(&mut gpus);
        let tier = Tier::for_gpus(&gpus);
        Report {
            schema: SCHEMA_VERSION,
            cpu: host.cpu,
            memory: host.memory,
            gpus,
            disk: host.disk,
            os: host.os,
            tier,
        }
    }
}

/// Probes this machine. `models_dir` decides which filesystem's free space is reported.
/// Blocks for at most a few seconds per external program (see [`command`]).
pub fn collect(models_dir: &Path) -> Report {
    let host = host::collect(models_dir);
    let probes = gpu::collect_probes();
    let gpus = gpu::gpus_from(&probes, host.memory.total_bytes);
    Report::build(host, gpus)
}
