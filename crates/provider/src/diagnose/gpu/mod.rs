//! Graphics adapters: what each platform's tools say, turned into [`Gpu`] rows.
//!
//! Probing is split in two so the interesting part is testable without the hardware:
//! [`collect_probes`] runs the tools and keeps their raw output in [`GpuProbes`];
//! [`gpus_from`] is a pure function from that record to the list of GPUs. The fixtures in
//! `tests/fixtures/diagnose/` are such records.
//!
//! Sources, per platform:
//! - NVIDIA (Linux, Windows): NVML, loaded at run time from the driver
//!   (`libnvidia-ml.so.1` / `nvml.dll`), else `nvidia-smi`'s CSV ([`nvidia`]).
//! - Linux: `/sys/class/drm/card*/device` for AMD and Intel (and NVIDIA cards whose
//!   driver tools are missing), `rocm-smi` when sysfs lacks AMD memory figures ([`linux`]).
//! - macOS: `system_profiler SPDisplaysDataType -json` and `sysctl -n hw.memsize` ([`macos`]).
//! - Windows: `Win32_VideoController` and the display class registry keys through
//!   PowerShell ([`windows`]).

pub mod linux;
pub mod macos;
pub mod nvidia;
pub mod windows;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Vendor {
    Nvidia,
    Amd,
    Intel,
    Apple,
    Other,
}

impl Vendor {
    /// From a PCI vendor id.
    pub fn from_pci(id: u16) -> Vendor {
        match id {
            0x10de => Vendor::Nvidia,
            0x1002 | 0x1022 => Vendor::Amd,
            0x8086 => Vendor::Intel,
            0x106b => Vendor::Apple,
            _ => Vendor::Other,
        }
    }

    /// From free text such as "Advanced Micro Devices, Inc." or "sppci_vendor_Apple".
    pub fn from_text(text: &str) -> Vendor {
        let t = text.to_ascii_lowercase();
        if t.contains("nvidia") || t.contains("0x10de") {
            Vendor::Nvidia
        } else if t.contains("amd") || t.contains("advanced micro") || t.contains("ati ") || t.contains("0x1002") {
            Vendor::Amd
        } else if t.contains("intel") || t.contains("0x8086") {
            Vendor::Intel
        } else if t.contains("apple") {
            Vendor::Apple
        } else {
            Vendor::Other
        }
    }
}

/// How the GPU gets its memory; decides whether it counts for the tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuKind {
    /// A card with its own memory.
    Dedicated,
    /// Shares a small slice of system memory with the CPU (most laptop and desktop iGPUs).
    Integrated,
    /// Designed around memory shared with the CPU at full speed (Apple Silicon).
    Unified,
}

/// The compute interface the node could drive this GPU through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Cuda,
    Metal,
    Rocm,
    Vulkan,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    pub vendor: Vendor,
    pub name: String,
    pub vram_total_bytes: Option<u64>,
    pub vram_free_bytes: Option<u64>,
    pub kind: GpuKind,
    pub backend: Backend,
    /// Which probe found it: `nvml`, `nvidia-smi`, `sysfs`, `rocm-smi`, `system_profiler`,
    /// `win32_videocontroller`.
    pub source: String,
}

/// Raw probe output: everything [`gpus_from`] needs, nothing it has to go and fetch.
#[derive(Debug, Clone, Default)]
pub struct GpuProbes {
    /// NVIDIA cards read through NVML (already structured; `None` when NVML did not load).
    pub nvml: Option<Vec<nvidia::NvidiaCard>>,
    /// `nvidia-smi --query-gpu=name,memory.total,memory.free --format=csv,noheader,nounits`.
    pub nvidia_smi: Option<String>,
    /// Cards under `/sys/class/drm` (see [`linux::scan_drm`]).
    pub drm: Vec<linux::DrmCard>,
    /// `/dev/kfd`, the kernel interface ROCm uses, exists.
    pub kfd: bool,
    /// `rocm-smi --showproductname --showmeminfo vram --json`.
    pub rocm_smi: Option<String>,
    /// `system_profiler SPDisplaysDataType -json`.
    pub system_profiler: Option<String>,
    /// `sysctl -n hw.memsize`.
    pub sysctl_memsize: Option<String>,
    /// The JSON printed by [`windows::POWERSHELL_SCRIPT`].
    pub windows_video: Option<String>,
}

/// Turns a probe record into GPUs. `system_memory` stands in for `hw.memsize` when that
/// probe is missing.
pub fn gpus_from(p: &GpuProbes, system_memory: Option<u64>) -> Vec<Gpu> {
    let mut gpus = match &p.nvml {
        Some(cards) if !cards.is_empty() => cards.iter().map(|c| c.to_gpu("nvml")).collect(),
        _ => p
            .nvidia_smi
            .as_deref()
            .map(nvidia::parse_smi_csv)
            .unwrap_or_default()
            .iter()
            .map(|c| c.to_gpu("nvidia-smi"))
            .collect::<Vec<_>>(),
    };
    // The NVIDIA driver's own answer beats every other view of the same cards.
    let have_nvidia = !gpus.is_empty();
    let keep = |g: &Gpu| !(have_nvidia && g.vendor == Vendor::Nvidia);

    let mut drm = linux::drm_gpus(&p.drm, p.kfd);
    let amd_in_sysfs_without_memory = drm
        .iter()
        .any(|g| g.vendor == Vendor::Amd && g.vram_total_bytes.is_none());
    if let Some(text) = p.rocm_smi.as_deref() {
        let rocm = linux::parse_rocm_smi(text, p.kfd);
        if !rocm.is_empty() && (amd_in_sysfs_without_memory || !drm.iter().any(|g| g.vendor == Vendor::Amd)) {
            drm.retain(|g| g.vendor != Vendor::Amd);
            drm.extend(rocm);
        }
    }
    gpus.extend(drm.into_iter().filter(keep));

    if let Some(text) = p.system_profiler.as_deref() {
        let memsize = p
            .sysctl_memsize
            .as_deref()
            .and_then(macos::parse_memsize)
            .or(system_memory);
        gpus.extend(macos::parse_system_profiler(text, memsize).into_iter().filter(keep));
    }
    if let Some(text) = p.windows_video.as_deref() {
        gpus.extend(windows::parse_video_controllers(text).into_iter().filter(keep));
    }
    gpus
}

/// Orders GPUs so the one that decides the tier comes first: counted kinds before
/// integrated ones, then by VRAM, then by name for a stable order.
pub fn sort_best_first(gpus: &mut [Gpu]) {
    gpus.sort_by(|a, b| {
        let rank = |g: &Gpu| matches!(g.kind, GpuKind::Dedicated | GpuKind::Unified);
        rank(b)
            .cmp(&rank(a))
            .then(b.vram_total_bytes.cmp(&a.vram_total_bytes))
            .then(a.name.cmp(&b.name))
    });
}

/// Runs this platform's probes. Each one fails soft; see [`super::command`] for deadlines.
pub fn collect_probes() -> GpuProbes {
    let mut p = GpuProbes::default();
    if !cfg!(target_os = "macos") {
        p.nvml = nvidia::read_nvml(super::command::QUICK);
        if p.nvml.as_ref().is_none_or(|cards| cards.is_empty()) {
            p.nvidia_smi = super::command::output("nvidia-smi", nvidia::SMI_ARGS, super::command::QUICK);
        }
    }
    if cfg!(target_os = "linux") {
        let root = std::path::Path::new("/");
        p.drm = linux::scan_drm(root);
        p.kfd = root.join("dev/kfd").exists();
        let amd_without_memory = p
            .drm
            .iter()
            .any(|c| c.vendor.map(Vendor::from_pci) == Some(Vendor::Amd) && c.vram_total_bytes.is_none());
        if amd_without_memory {
            p.rocm_smi = super::command::output("rocm-smi", linux::ROCM_SMI_ARGS, super::command::QUICK);
        }
    }
    if cfg!(target_os = "macos") {
        p.system_profiler = super::command::output(
            "system_profiler",
            &["SPDisplaysDataType", "-json"],
            super::command::SLOW,
        );
        p.sysctl_memsize = super::command::output("sysctl", &["-n", "hw.memsize"], super::command::QUICK);
    }
    if cfg!(windows) {
        p.windows_video = super::command::output(
            "powershell",
            &["-NoProfile", "-NonInteractive", "-Command", windows::POWERSHELL_SCRIPT],
            super::command::SLOW,
        );
    }
    p
}

const MIB: u64 = 1 << 20;

/// Parses "8 GB", "1536 MB", "24564 MiB" and similar into bytes (binary units, which is
/// what every tool here means).
pub(crate) fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "kib" | "k" => 1 << 10,
        "mb" | "mib" | "m" => MIB,
        "gb" | "gib" | "g" => 1 << 30,
        "tb" | "tib" | "t" => 1 << 40,
        _ => return None,
    };
    let bytes = number * factor as f64;
    (bytes.is_finite() && bytes >= 0.0).then_some(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("8 GB"), Some(8 << 30));
        assert_eq!(parse_size("1536 MB"), Some(1536 * MIB));
        assert_eq!(parse_size("24564"), Some(24564));
        assert_eq!(parse_size("1.5 GB"), Some(3 << 29));
        assert_eq!(parse_size("[N/A]"), None);
        assert_eq!(parse_size("8 bananas"), None);
        assert_eq!(parse_size(""), None);
    }

    #[test]
    fn vendors() {
        assert_eq!(Vendor::from_pci(0x10de), Vendor::Nvidia);
        assert_eq!(Vendor::from_pci(0x1234), Vendor::Other);
        assert_eq!(Vendor::from_text("Advanced Micro Devices, Inc."), Vendor::Amd);
        assert_eq!(Vendor::from_text("sppci_vendor_Apple"), Vendor::Apple);
        assert_eq!(Vendor::from_text("Intel Corporation"), Vendor::Intel);
        assert_eq!(Vendor::from_text("Microsoft"), Vendor::Other);
    }
}
