//! Windows: video controllers through PowerShell.
//!
//! `Win32_VideoController.AdapterRAM` is a 32-bit field, so every card with 4 GiB or more
//! reports just under 4 GiB. The display driver's registry key has the real size in
//! `HardwareInformation.qwMemorySize`, so the script reads both and the parser prefers
//! the registry, matching entries by driver description. A capped `AdapterRAM` with no
//! registry figure is reported as unknown rather than as a wrong 4 GiB.

use serde_json::Value;

use super::{linux::amd_kind, Backend, Gpu, GpuKind, Vendor};

/// Prints `{"controllers": [...], "registry": [...]}` on one line.
pub const POWERSHELL_SCRIPT: &str = "$ErrorActionPreference = 'SilentlyContinue'; \
$c = @(Get-CimInstance Win32_VideoController | Select-Object Name, AdapterCompatibility, AdapterRAM, PNPDeviceID); \
$r = @(Get-ItemProperty 'HKLM:\\SYSTEM\\CurrentControlSet\\Control\\Class\\{4d36e968-e325-11ce-bfc1-08002be10318}\\0*' \
| Select-Object DriverDesc, 'HardwareInformation.qwMemorySize'); \
ConvertTo-Json -Depth 3 -Compress @{ controllers = $c; registry = $r }";

/// The largest value a 32-bit `AdapterRAM` can hold, give or take the driver's rounding.
const ADAPTER_RAM_CAP: u64 = 0xFFF0_0000;

/// Parses the script's output, or plain `Get-CimInstance Win32_VideoController |
/// ConvertTo-Json` output (an object for one controller, an array for several).
pub fn parse_video_controllers(text: &str) -> Vec<Gpu> {
    let Ok(root) = serde_json::from_str::<Value>(text) else {
        return Vec::new();
    };
    let (controllers, registry) = match root.get("controllers") {
        Some(c) => (list(c), root.get("registry").map(list).unwrap_or_default()),
        None => (list(&root), Vec::new()),
    };
    controllers
        .into_iter()
        .filter_map(|c| {
            let field = |k: &str| {
                c.get(k)
                    .and_then(Value::as_str)
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
            };
            let name = field("Name")?.to_string();
            let vendor = field("PNPDeviceID")
                .and_then(pci_vendor)
                .map(Vendor::from_pci)
                .or_else(|| field("AdapterCompatibility").map(Vendor::from_text))
                .unwrap_or_else(|| Vendor::from_text(&name));
            let from_registry = registry
                .iter()
                .find(|r| r.get("DriverDesc").and_then(Value::as_str).map(str::trim) == Some(name.as_str()))
                .and_then(|r| r.get("HardwareInformation.qwMemorySize"))
                .and_then(registry_bytes);
            let from_wmi = c
                .get("AdapterRAM")
                .and_then(Value::as_u64)
                .filter(|n| *n > 0 && *n < ADAPTER_RAM_CAP);
            let vram = from_registry.or(from_wmi);
            let (kind, backend) = match vendor {
                Vendor::Nvidia => (GpuKind::Dedicated, Backend::None),
                Vendor::Amd => (amd_kind(Some(&name), vram), Backend::Vulkan),
                Vendor::Intel if intel_discrete_name(&name) => (GpuKind::Dedicated, Backend::Vulkan),
                Vendor::Intel => (GpuKind::Integrated, Backend::Vulkan),
                // Basic display and remote desktop adapters are not compute devices.
                Vendor::Apple | Vendor::Other => return None,
            };
            Some(Gpu {
                vendor,
                name,
                vram_total_bytes: vram,
                vram_free_bytes: None,
                kind,
                backend,
                source: "win32_videocontroller".into(),
            })
        })
        .collect()
}

fn list(v: &Value) -> Vec<&Value> {
    match v {
        Value::Array(items) => items.iter().collect(),
        Value::Object(_) => vec![v],
        _ => Vec::new(),
    }
}

/// `PCI\VEN_10DE&DEV_2684&…` → 0x10de.
fn pci_vendor(pnp: &str) -> Option<u16> {
    let upper = pnp.to_ascii_uppercase();
    let at = upper.find("VEN_")? + 4;
    let hex = upper.get(at..at + 4)?;
    u16::from_str_radix(hex, 16).ok()
}

/// A REG_QWORD arrives as a number; some drivers write REG_BINARY, which PowerShell turns
/// into an array of bytes (little-endian).
fn registry_bytes(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::Array(bytes) if !bytes.is_empty() && bytes.len() <= 8 => bytes.iter().rev().try_fold(0u64, |acc, b| {
            let b = u8::try_from(b.as_u64()?).ok()?;
            Some(acc << 8 | u64::from(b))
        }),
        _ => None,
    }
    .filter(|n| *n > 0)
}

/// "Intel(R) Arc(TM) A770 Graphics" and "B580" are cards; "Intel(R) Arc(TM) Graphics"
/// is the Core Ultra iGPU.
fn intel_discrete_name(name: &str) -> bool {
    name.split_whitespace().any(|w| {
        let mut chars = w.chars();
        matches!(chars.next(), Some('A' | 'B')) && w.len() >= 4 && chars.all(|c| c.is_ascii_digit())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_cim_output_for_one_controller() {
        let text = r#"{"Name": "NVIDIA GeForce RTX 3060", "AdapterCompatibility": "NVIDIA",
                       "AdapterRAM": 4293918720, "PNPDeviceID": "PCI\\VEN_10DE&DEV_2504&SUBSYS_1"}"#;
        let gpus = parse_video_controllers(text);
        assert_eq!(gpus.len(), 1);
        assert_eq!(gpus[0].vendor, Vendor::Nvidia);
        // Capped at 4 GiB by the 32-bit field, and no registry figure: unknown.
        assert_eq!(gpus[0].vram_total_bytes, None);
    }

    #[test]
    fn registry_bytes_forms() {
        assert_eq!(registry_bytes(&serde_json::json!(25769803776u64)), Some(24 << 30));
        assert_eq!(
            registry_bytes(&serde_json::json!([0, 0, 0, 0, 2, 0, 0, 0])),
            Some(8 << 30)
        );
        assert_eq!(registry_bytes(&serde_json::json!([300])), None);
        assert_eq!(registry_bytes(&serde_json::json!("x")), None);
    }

    #[test]
    fn intel_names() {
        assert!(intel_discrete_name("Intel(R) Arc(TM) A770 Graphics"));
        assert!(intel_discrete_name("Intel(R) Arc(TM) B580 Graphics"));
        assert!(!intel_discrete_name("Intel(R) Arc(TM) Graphics"));
        assert!(!intel_discrete_name("Intel(R) UHD Graphics 770"));
    }

    #[test]
    fn pnp_ids() {
        assert_eq!(pci_vendor("PCI\\VEN_1002&DEV_744C"), Some(0x1002));
        assert_eq!(pci_vendor("ROOT\\BasicDisplay"), None);
    }
}
