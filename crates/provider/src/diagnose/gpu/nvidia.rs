//! NVIDIA cards: NVML first, `nvidia-smi` when NVML cannot be loaded.
//!
//! NVML ships with the driver, not with us: `nvml-wrapper` opens the library at run
//! time, so a machine without NVIDIA hardware runs the same binary and simply gets an
//! error back from `Nvml::init`.

use std::sync::mpsc;
use std::time::Duration;

use super::{Backend, Gpu, GpuKind, Vendor};

const MIB: u64 = 1 << 20;

pub const SMI_ARGS: &[&str] = &[
    "--query-gpu=name,memory.total,memory.free",
    "--format=csv,noheader,nounits",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvidiaCard {
    pub name: String,
    pub total_bytes: Option<u64>,
    pub free_bytes: Option<u64>,
}

impl NvidiaCard {
    pub fn to_gpu(&self, source: &str) -> Gpu {
        Gpu {
            vendor: Vendor::Nvidia,
            name: self.name.clone(),
            vram_total_bytes: self.total_bytes,
            vram_free_bytes: self.free_bytes,
            kind: GpuKind::Dedicated,
            // The driver answered, so CUDA is there.
            backend: Backend::Cuda,
            source: source.into(),
        }
    }
}

/// Parses `nvidia-smi --query-gpu=name,memory.total,memory.free
/// --format=csv,noheader,nounits`: one line per GPU, sizes in MiB, `[N/A]` (or
/// `[Not Supported]`) where the driver has no figure.
pub fn parse_smi_csv(text: &str) -> Vec<NvidiaCard> {
    text.lines()
        .filter_map(|line| {
            // From the right, so a comma in a product name cannot shift the numbers.
            let mut fields = line.rsplitn(3, ',');
            let free = fields.next()?;
            let total = fields.next()?;
            let name = fields.next()?.trim();
            if name.is_empty() {
                return None;
            }
            let mib = |s: &str| s.trim().parse::<u64>().ok().and_then(|n| n.checked_mul(MIB));
            Some(NvidiaCard {
                name: name.to_string(),
                total_bytes: mib(total),
                free_bytes: mib(free),
            })
        })
        .collect()
}

/// Reads every NVIDIA GPU through NVML; `None` when the library is missing, refuses to
/// start, or takes longer than `deadline` (a wedged GPU can stall the driver, and a
/// diagnostic must not hang with it; the stuck thread is simply abandoned). Guarded
/// against panics in the binding too: a diagnostic must never crash.
pub fn read_nvml(deadline: Duration) -> Option<Vec<NvidiaCard>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(read_nvml_now());
    });
    rx.recv_timeout(deadline).ok().flatten()
}

fn read_nvml_now() -> Option<Vec<NvidiaCard>> {
    std::panic::catch_unwind(|| {
        let nvml = nvml_wrapper::Nvml::init().ok()?;
        let count = nvml.device_count().ok()?;
        let cards = (0..count)
            .filter_map(|i| {
                let device = nvml.device_by_index(i).ok()?;
                let memory = device.memory_info().ok();
                Some(NvidiaCard {
                    name: device.name().unwrap_or_else(|_| format!("NVIDIA GPU {i}")),
                    total_bytes: memory.as_ref().map(|m| m.total),
                    free_bytes: memory.as_ref().map(|m| m.free),
                })
            })
            .collect();
        Some(cards)
    })
    .ok()
    .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_csv_lines_and_tolerates_missing_figures() {
        let text = "NVIDIA GeForce RTX 4090, 24564, 23012\n\
                    NVIDIA GB10, [N/A], [N/A]\n\
                    \n\
                    garbage\n";
        let cards = parse_smi_csv(text);
        assert_eq!(
            cards,
            vec![
                NvidiaCard {
                    name: "NVIDIA GeForce RTX 4090".into(),
                    total_bytes: Some(24564 * MIB),
                    free_bytes: Some(23012 * MIB),
                },
                NvidiaCard {
                    name: "NVIDIA GB10".into(),
                    total_bytes: None,
                    free_bytes: None,
                },
            ]
        );
    }

    #[test]
    fn nvml_absent_is_none_not_a_crash() {
        // On machines with an NVIDIA driver this finds cards; elsewhere it must just say
        // "no NVML". Either way it returns.
        if let Some(cards) = read_nvml(Duration::from_secs(5)) {
            assert!(cards.iter().all(|c| !c.name.is_empty()));
        }
    }
}
