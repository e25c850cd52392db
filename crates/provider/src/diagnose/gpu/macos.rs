//! macOS: `system_profiler SPDisplaysDataType -json` and `sysctl -n hw.memsize`.
//!
//! Apple Silicon GPUs have no VRAM of their own; they use the unified memory the CPU
//! uses. macOS lets Metal keep only part of it resident (`recommendedMaxWorkingSetSize`),
//! so the VRAM we report for them is that part, approximated by a fixed rule: **two
//! thirds of physical memory up to 32 GiB, three quarters above** (16 GiB → 10.7 GiB,
//! 64 GiB → 48 GiB). Such GPUs have kind `unified` and count for the tier.
//!
//! Intel Macs list their GPUs with `spdisplays_vram` (dedicated) or
//! `spdisplays_vram_shared` (integrated).

use serde_json::Value;

use super::{parse_size, Backend, Gpu, GpuKind, Vendor};

const GIB: u64 = 1 << 30;

/// `sysctl -n hw.memsize` prints bytes; `sysctl hw.memsize` prefixes the key.
pub fn parse_memsize(text: &str) -> Option<u64> {
    let t = text.trim();
    let value = t.rsplit([':', '=']).next().unwrap_or(t);
    value.trim().parse().ok().filter(|n| *n > 0)
}

/// The share of unified memory the GPU can use (see the module documentation).
pub fn unified_vram(memsize: u64) -> u64 {
    if memsize > 32 * GIB {
        memsize / 4 * 3
    } else {
        memsize / 3 * 2
    }
}

pub fn parse_system_profiler(text: &str, memsize: Option<u64>) -> Vec<Gpu> {
    let Ok(root) = serde_json::from_str::<Value>(text) else {
        return Vec::new();
    };
    let Some(items) = root.get("SPDisplaysDataType").and_then(Value::as_array) else {
        return Vec::new();
    };
    items.iter().filter_map(|item| gpu_of(item, memsize)).collect()
}

fn gpu_of(item: &Value, memsize: Option<u64>) -> Option<Gpu> {
    let field = |k: &str| {
        item.get(k)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
    };
    let name = field("sppci_model").or_else(|| field("_name"))?.to_string();
    let vendor = match field("spdisplays_vendor") {
        Some(v) => Vendor::from_text(v),
        None => Vendor::from_text(&name),
    };
    let metal = item.as_object().is_some_and(|o| {
        o.keys()
            .any(|k| k.starts_with("spdisplays_mtlgpufamilysupport") || k == "spdisplays_metal")
    });
    let builtin = field("sppci_bus").is_some_and(|b| b.contains("builtin"));
    let dedicated_vram = field("spdisplays_vram").and_then(parse_size);
    let shared_vram = field("spdisplays_vram_shared").and_then(parse_size);

    let (kind, vram) = if vendor == Vendor::Apple {
        (GpuKind::Unified, memsize.map(unified_vram))
    } else if let Some(v) = dedicated_vram.filter(|_| !builtin) {
        (GpuKind::Dedicated, Some(v))
    } else {
        (GpuKind::Integrated, shared_vram.or(dedicated_vram))
    };
    Some(Gpu {
        vendor,
        name,
        vram_total_bytes: vram,
        // system_profiler has no live usage figures.
        vram_free_bytes: None,
        kind,
        backend: if metal || vendor == Vendor::Apple {
            Backend::Metal
        } else {
            Backend::None
        },
        source: "system_profiler".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memsize_forms() {
        assert_eq!(parse_memsize("17179869184\n"), Some(16 * GIB));
        assert_eq!(parse_memsize("hw.memsize: 17179869184"), Some(16 * GIB));
        assert_eq!(parse_memsize("oops"), None);
    }

    #[test]
    fn unified_share() {
        assert_eq!(unified_vram(8 * GIB), 8 * GIB / 3 * 2);
        assert_eq!(unified_vram(64 * GIB), 48 * GIB);
    }

    #[test]
    fn intel_mac_with_a_radeon() {
        let text = r#"{"SPDisplaysDataType": [
            {"_name": "kHW_IntelUHDGraphics630Item", "sppci_model": "Intel UHD Graphics 630",
             "spdisplays_vram_shared": "1536 MB", "sppci_bus": "spdisplays_builtin",
             "spdisplays_vendor": "Intel", "spdisplays_mtlgpufamilysupport": "spdisplays_metal3"},
            {"_name": "AMD Radeon Pro 5500M", "sppci_model": "AMD Radeon Pro 5500M",
             "spdisplays_vram": "8 GB", "sppci_bus": "spdisplays_pcie_device",
             "spdisplays_vendor": "sppci_vendor_amd", "spdisplays_mtlgpufamilysupport": "spdisplays_metal3"}]}"#;
        let gpus = parse_system_profiler(text, Some(32 * GIB));
        assert_eq!(gpus.len(), 2);
        assert_eq!(
            (gpus[0].kind, gpus[0].vram_total_bytes),
            (GpuKind::Integrated, Some(1536 << 20))
        );
        assert_eq!((gpus[1].vendor, gpus[1].kind), (Vendor::Amd, GpuKind::Dedicated));
        assert_eq!(
            (gpus[1].vram_total_bytes, gpus[1].backend),
            (Some(8 * GIB), Backend::Metal)
        );
        assert!(parse_system_profiler("{}", None).is_empty());
        assert!(parse_system_profiler("<plist>", None).is_empty());
    }
}
