//! Linux: GPUs as the kernel's DRM subsystem lists them, plus `rocm-smi`.
//!
//! `/sys/class/drm/cardN/device/` holds the PCI `vendor` and `device` ids of each card;
//! the amdgpu driver adds `mem_info_vram_total` and `mem_info_vram_used` (bytes) and, on
//! some cards, `product_name`. [`scan_drm`] reads those files below any root folder, so a
//! copied tree (a test fixture) reads the same as the live `/`.

use std::fs;
use std::path::Path;

use super::{Backend, Gpu, GpuKind, Vendor};

const GIB: u64 = 1 << 30;

pub const ROCM_SMI_ARGS: &[&str] = &["--showproductname", "--showmeminfo", "vram", "--json"];

/// What sysfs says about one `cardN`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrmCard {
    /// `card0`, `card1`, …
    pub card: String,
    pub vendor: Option<u16>,
    pub device: Option<u16>,
    pub vram_total_bytes: Option<u64>,
    pub vram_used_bytes: Option<u64>,
    pub product_name: Option<String>,
}

/// Reads `ROOT/sys/class/drm/card*/device/…`, ordered by card number. Connector entries
/// (`card0-DP-1`) and render nodes are skipped; unreadable files become `None`.
pub fn scan_drm(root: &Path) -> Vec<DrmCard> {
    let class = root.join("sys/class/drm");
    let Ok(entries) = fs::read_dir(&class) else {
        return Vec::new();
    };
    let mut cards: Vec<(u32, DrmCard)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let number: u32 = name.strip_prefix("card")?.parse().ok()?;
            let dev = class.join(&name).join("device");
            let read = |file: &str| fs::read_to_string(dev.join(file)).ok().map(|s| s.trim().to_string());
            let card = DrmCard {
                vendor: read("vendor").as_deref().and_then(parse_hex_u16),
                device: read("device").as_deref().and_then(parse_hex_u16),
                vram_total_bytes: read("mem_info_vram_total").and_then(|s| s.parse().ok()),
                vram_used_bytes: read("mem_info_vram_used").and_then(|s| s.parse().ok()),
                product_name: read("product_name").filter(|s| !s.is_empty()),
                card: name,
            };
            Some((number, card))
        })
        .collect();
    cards.sort_by_key(|(n, _)| *n);
    cards.into_iter().map(|(_, c)| c).collect()
}

fn parse_hex_u16(s: &str) -> Option<u16> {
    u16::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
}

/// GPUs among the DRM cards. Display-only adapters of virtual machines and server
/// management chips (QEMU, virtio, VMware, ASPEED…) are not compute devices and are
/// left out.
pub fn drm_gpus(cards: &[DrmCard], kfd: bool) -> Vec<Gpu> {
    cards
        .iter()
        .filter_map(|c| {
            let vendor = Vendor::from_pci(c.vendor?);
            let device = c.device.map(|d| format!(" {d:#06x}")).unwrap_or_default();
            let (kind, backend, fallback_name) = match vendor {
                Vendor::Amd => (
                    amd_kind(None, c.vram_total_bytes),
                    if kfd { Backend::Rocm } else { Backend::Vulkan },
                    format!("AMD GPU{device}"),
                ),
                Vendor::Intel => (
                    if c.device.is_some_and(intel_discrete_device) {
                        GpuKind::Dedicated
                    } else {
                        GpuKind::Integrated
                    },
                    Backend::Vulkan,
                    format!("Intel GPU{device}"),
                ),
                // Only reached when neither NVML nor nvidia-smi answered: the card is
                // there but no CUDA driver is usable.
                Vendor::Nvidia => (GpuKind::Dedicated, Backend::None, format!("NVIDIA GPU{device}")),
                Vendor::Apple | Vendor::Other => return None,
            };
            Some(Gpu {
                vendor,
                name: c.product_name.clone().unwrap_or(fallback_name),
                vram_total_bytes: c.vram_total_bytes,
                vram_free_bytes: c
                    .vram_total_bytes
                    .zip(c.vram_used_bytes)
                    .map(|(t, u)| t.saturating_sub(u)),
                kind,
                backend,
                source: "sysfs".into(),
            })
        })
        .collect()
}

/// AMD APUs report their BIOS carve-out (often 512 MiB) as VRAM; no discrete Radeon of
/// the last decade has 1 GiB or less. Where a product name is known, Windows-style APU
/// names ("AMD Radeon(TM) Graphics", "Radeon 780M Graphics") also mark an APU.
pub(crate) fn amd_kind(name: Option<&str>, vram: Option<u64>) -> GpuKind {
    let apu_name = name.is_some_and(|n| {
        let n = n.to_ascii_lowercase();
        n.trim_end().ends_with("graphics") && !n.contains(" rx ") && !n.contains(" pro ")
    });
    if apu_name || vram.is_some_and(|v| v <= GIB) {
        GpuKind::Integrated
    } else {
        GpuKind::Dedicated
    }
}

/// Intel Arc discrete cards: Alchemist (DG2, 0x56xx) and Battlemage (0xe2xx).
fn intel_discrete_device(device: u16) -> bool {
    matches!(device >> 8, 0x56 | 0xe2)
}

/// Parses `rocm-smi --showproductname --showmeminfo vram --json`: an object keyed by
/// `card0`, `card1`…, sizes as decimal strings in bytes.
pub fn parse_rocm_smi(text: &str, kfd: bool) -> Vec<Gpu> {
    let Ok(serde_json::Value::Object(root)) = serde_json::from_str::<serde_json::Value>(text) else {
        return Vec::new();
    };
    let mut cards: Vec<(&String, &serde_json::Map<String, serde_json::Value>)> = root
        .iter()
        .filter(|(k, _)| k.starts_with("card"))
        .filter_map(|(k, v)| Some((k, v.as_object()?)))
        .collect();
    cards.sort_by_key(|(k, _)| k.trim_start_matches("card").parse::<u32>().unwrap_or(u32::MAX));
    cards
        .into_iter()
        .map(|(key, fields)| {
            let text = |name: &str| {
                fields
                    .get(name)
                    .and_then(|v| v.as_str())
                    .map(str::trim)
                    .filter(|s| !s.is_empty() && !s.eq_ignore_ascii_case("n/a"))
            };
            let bytes = |name: &str| text(name).and_then(|s| s.parse::<u64>().ok());
            let total = bytes("VRAM Total Memory (B)");
            let used = bytes("VRAM Total Used Memory (B)");
            let name = text("Card Series")
                .or_else(|| text("Card series"))
                .or_else(|| text("Card Model"))
                .or_else(|| text("Card model"))
                .map(String::from)
                .unwrap_or_else(|| format!("AMD GPU ({key})"));
            Gpu {
                vendor: Vendor::Amd,
                kind: amd_kind(Some(&name), total),
                name,
                vram_total_bytes: total,
                vram_free_bytes: total.zip(used).map(|(t, u)| t.saturating_sub(u)),
                backend: if kfd { Backend::Rocm } else { Backend::Vulkan },
                source: "rocm-smi".into(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_ids() {
        assert_eq!(parse_hex_u16("0x1002\n"), Some(0x1002));
        assert_eq!(parse_hex_u16("10de"), Some(0x10de));
        assert_eq!(parse_hex_u16("0xzz"), None);
    }

    #[test]
    fn apus_are_integrated() {
        assert_eq!(amd_kind(None, Some(512 << 20)), GpuKind::Integrated);
        assert_eq!(amd_kind(None, Some(16 * GIB)), GpuKind::Dedicated);
        assert_eq!(amd_kind(None, None), GpuKind::Dedicated);
        assert_eq!(
            amd_kind(Some("AMD Radeon(TM) Graphics"), Some(2 * GIB)),
            GpuKind::Integrated
        );
        assert_eq!(
            amd_kind(Some("AMD Radeon RX 7900 XTX"), Some(24 * GIB)),
            GpuKind::Dedicated
        );
    }

    #[test]
    fn rocm_smi_json() {
        let text = r#"{"card0": {"Card Series": "Radeon RX 7900 XTX", "VRAM Total Memory (B)": "25753026560",
                       "VRAM Total Used Memory (B)": "1073741824"},
                       "system": {"Driver version": "6.8.0"}}"#;
        let gpus = parse_rocm_smi(text, true);
        assert_eq!(gpus.len(), 1);
        assert_eq!(gpus[0].name, "Radeon RX 7900 XTX");
        assert_eq!(gpus[0].vram_total_bytes, Some(25_753_026_560));
        assert_eq!(gpus[0].vram_free_bytes, Some(25_753_026_560 - GIB));
        assert_eq!((gpus[0].kind, gpus[0].backend), (GpuKind::Dedicated, Backend::Rocm));
        assert!(parse_rocm_smi("not json", true).is_empty());
        assert!(parse_rocm_smi("[1,2]", true).is_empty());
    }
}
