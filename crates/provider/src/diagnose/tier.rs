//! The provider tier: how much model a machine can hold, judged by GPU memory.
//!
//! The original platform ranked machines by *system RAM*, which put a 64 GB office
//! desktop with no GPU above a 24 GB gaming card. What limits which models a node can
//! serve at useful speed is the memory of its best accelerator, so that is what counts:
//!
//! | level | name | VRAM of the best counted GPU |
//! | --- | --- | --- |
//! | 0 | Basic | under 1 GiB, or no counted GPU |
//! | 1 | Tide Pool | 1 – 4 GiB |
//! | 2 | Blue Surf | 4 – 8 GiB |
//! | 3 | Open Ocean | 8 – 22 GiB |
//! | 4 | Mariana Depth | 22 GiB and more |
//!
//! Counted GPUs are dedicated cards and unified-memory GPUs (Apple Silicon, whose VRAM
//! figure is the share of system memory macOS lets the GPU use; see `gpu::macos`).
//! Integrated GPUs that borrow a little system memory do not count, nor do GPUs whose
//! memory could not be read.
//!
//! A GPU reaches a tier when it has at least 95% of the tier's floor: drivers report a
//! little less than the number on the box (an "8 GB" Radeon RX 6600 reports 8176 MiB),
//! and such a card belongs in the 8 GB tier.

use serde::{Deserialize, Serialize};

use super::gpu::{Gpu, GpuKind};

const GIB: u64 = 1 << 30;

/// Floors of levels 1..=4 in bytes, before the 95% slack.
const FLOORS: [u64; 4] = [GIB, 4 * GIB, 8 * GIB, 22 * GIB];

use cxmpute_protocol::assign::TIER_NAMES as NAMES;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tier {
    /// 0 (Basic) to 4 (Mariana Depth).
    pub level: u8,
    /// The level's display name.
    pub name: String,
    /// VRAM of the GPU that decided the tier; `null` when no GPU counted.
    pub vram_bytes: Option<u64>,
    /// Name of that GPU.
    pub gpu: Option<String>,
}

impl Tier {
    /// The level for `vram` bytes of GPU memory.
    pub fn level_for_vram(vram: u64) -> u8 {
        // 95% of the floor, computed in integers.
        let reached = FLOORS.iter().filter(|floor| vram >= *floor / 20 * 19).count();
        u8::try_from(reached).unwrap_or(4)
    }

    pub fn name_of(level: u8) -> &'static str {
        NAMES.get(usize::from(level)).copied().unwrap_or("Unknown")
    }

    /// The tier earned by the best counted GPU in `gpus`.
    pub fn for_gpus(gpus: &[Gpu]) -> Tier {
        let best = gpus
            .iter()
            .filter(|g| matches!(g.kind, GpuKind::Dedicated | GpuKind::Unified))
            .filter_map(|g| g.vram_total_bytes.map(|v| (v, g)))
            // Ties go to the name that sorts first, as in `gpu::sort_best_first`.
            .max_by(|(va, a), (vb, b)| va.cmp(vb).then(b.name.cmp(&a.name)));
        match best {
            Some((vram, g)) => {
                let level = Tier::level_for_vram(vram);
                Tier {
                    level,
                    name: Tier::name_of(level).to_string(),
                    vram_bytes: Some(vram),
                    gpu: Some(g.name.clone()),
                }
            }
            None => Tier {
                level: 0,
                name: Tier::name_of(0).to_string(),
                vram_bytes: None,
                gpu: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnose::gpu::{Backend, Vendor};

    const MIB: u64 = 1 << 20;

    fn gpu(name: &str, kind: GpuKind, vram: Option<u64>) -> Gpu {
        Gpu {
            vendor: Vendor::Other,
            name: name.into(),
            vram_total_bytes: vram,
            vram_free_bytes: None,
            kind,
            backend: Backend::None,
            source: "test".into(),
        }
    }

    #[test]
    fn boundaries() {
        assert_eq!(Tier::level_for_vram(0), 0);
        assert_eq!(Tier::level_for_vram(512 * MIB), 0);
        assert_eq!(Tier::level_for_vram(GIB), 1);
        assert_eq!(Tier::level_for_vram(2 * GIB), 1);
        assert_eq!(Tier::level_for_vram(4 * GIB), 2);
        // An "8 GB" card as the amdgpu driver reports it.
        assert_eq!(Tier::level_for_vram(8176 * MIB), 3);
        assert_eq!(Tier::level_for_vram(7 * GIB), 2);
        // A 20 GB workstation card stays below the 22 GiB floor.
        assert_eq!(Tier::level_for_vram(20470 * MIB), 3);
        assert_eq!(Tier::level_for_vram(24564 * MIB), 4);
        assert_eq!(Tier::level_for_vram(u64::MAX), 4);
    }

    #[test]
    fn only_dedicated_and_unified_gpus_count() {
        let gpus = [
            gpu("iGPU", GpuKind::Integrated, Some(16 * GIB)),
            gpu("small card", GpuKind::Dedicated, Some(2 * GIB)),
            gpu("unknown memory", GpuKind::Dedicated, None),
        ];
        let t = Tier::for_gpus(&gpus);
        assert_eq!((t.level, t.name.as_str()), (1, "Tide Pool"));
        assert_eq!(t.gpu.as_deref(), Some("small card"));

        let t = Tier::for_gpus(&[gpu("M2", GpuKind::Unified, Some(12 * GIB))]);
        assert_eq!((t.level, t.name.as_str()), (3, "Open Ocean"));
    }

    #[test]
    fn the_tier_names_the_gpu_listed_first() {
        let mut gpus = vec![
            gpu("card B", GpuKind::Dedicated, Some(8 * GIB)),
            gpu("card A", GpuKind::Dedicated, Some(8 * GIB)),
        ];
        crate::diagnose::gpu::sort_best_first(&mut gpus);
        assert_eq!(Tier::for_gpus(&gpus).gpu.as_deref(), Some(gpus[0].name.as_str()));
    }

    #[test]
    fn no_gpu_is_basic() {
        let t = Tier::for_gpus(&[]);
        assert_eq!(
            t,
            Tier {
                level: 0,
                name: "Basic".into(),
                vram_bytes: None,
                gpu: None
            }
        );
    }
}
