//! `diagnose` against recorded machines (tests/fixtures/diagnose/, see its README) and
//! against the machine running the tests.

use std::path::{Path, PathBuf};
use std::process::Command;

use cxmpute_provider::diagnose::{self, gpu, Backend, GpuKind, GpuProbes, HostFacts, Report, Tier, Vendor};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/diagnose")
        .join(name)
}

fn read(dir: &Path, file: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(file)).ok()
}

/// A fixture folder holds what the probes saw: `host.json` (the `sysinfo` facts), the
/// raw output of each tool that answered, and a copy of the sysfs/dev tree.
fn probes_of(dir: &Path) -> GpuProbes {
    GpuProbes {
        nvml: None,
        nvidia_smi: read(dir, "nvidia-smi.csv"),
        drm: gpu::linux::scan_drm(dir),
        kfd: dir.join("dev/kfd").exists(),
        rocm_smi: read(dir, "rocm-smi.json"),
        system_profiler: read(dir, "system_profiler.json"),
        sysctl_memsize: read(dir, "sysctl-hw.memsize.txt"),
        windows_video: read(dir, "windows-video.json"),
    }
}

fn replay(name: &str) -> Report {
    let dir = fixture(name);
    let host: HostFacts = serde_json::from_str(&read(&dir, "host.json").expect("host.json")).expect("host.json parses");
    let gpus = gpu::gpus_from(&probes_of(&dir), host.memory.total_bytes);
    Report::build(host, gpus)
}

fn check_against_expected(name: &str) -> Report {
    let report = replay(name);
    let expected: serde_json::Value =
        serde_json::from_str(&read(&fixture(name), "expected.json").expect("expected.json"))
            .expect("expected.json parses");
    let actual = serde_json::to_value(&report).expect("a report serializes");
    assert_eq!(
        actual,
        expected,
        "{name}: report differs from expected.json; got\n{}",
        serde_json::to_string_pretty(&actual).unwrap_or_default()
    );
    // And the JSON reads back into the same report: the schema round-trips.
    let back: Report = serde_json::from_value(actual).expect("the JSON reads back as a Report");
    assert_eq!(back, report);
    report
}

#[test]
fn linux_with_an_nvidia_card() {
    let r = check_against_expected("linux-nvidia");
    assert_eq!((r.tier.level, r.tier.name.as_str()), (4, "Mariana Depth"));
    // The driver's view replaces the bare sysfs entry for the same card.
    assert_eq!(r.gpus.iter().filter(|g| g.vendor == Vendor::Nvidia).count(), 1);
}

#[test]
fn linux_nvidia_card_without_driver_tools_is_listed_but_not_usable() {
    let mut probes = probes_of(&fixture("linux-nvidia"));
    probes.nvidia_smi = None;
    let gpus = gpu::gpus_from(&probes, None);
    let nvidia: Vec<_> = gpus.iter().filter(|g| g.vendor == Vendor::Nvidia).collect();
    assert_eq!(nvidia.len(), 1);
    assert_eq!((nvidia[0].backend, nvidia[0].vram_total_bytes), (Backend::None, None));
    assert_eq!(Tier::for_gpus(&gpus).level, 0, "unknown VRAM cannot earn a tier");
}

#[test]
fn linux_with_an_amd_card_and_an_apu() {
    let r = check_against_expected("linux-amd");
    assert_eq!(r.tier.level, 4);
    assert_eq!(r.gpus[1].kind, GpuKind::Integrated);
}

#[test]
fn linux_amd_without_rocm_falls_back_to_vulkan() {
    let mut probes = probes_of(&fixture("linux-amd"));
    probes.kfd = false;
    let gpus = gpu::gpus_from(&probes, None);
    assert!(gpus.iter().all(|g| g.backend == Backend::Vulkan));
}

#[test]
fn linux_without_a_gpu() {
    let r = check_against_expected("linux-cpu-only");
    assert!(r.gpus.is_empty(), "a VM's emulated display adapter is not a GPU");
    assert_eq!((r.tier.level, r.tier.name.as_str()), (0, "Basic"));
}

#[test]
fn macos_apple_silicon() {
    let r = check_against_expected("macos-apple-silicon");
    assert_eq!((r.tier.level, r.tier.name.as_str()), (3, "Open Ocean"));
    assert_eq!((r.gpus[0].kind, r.gpus[0].backend), (GpuKind::Unified, Backend::Metal));
}

#[test]
fn macos_without_sysctl_uses_system_memory() {
    let mut probes = probes_of(&fixture("macos-apple-silicon"));
    probes.sysctl_memsize = None;
    let gpus = gpu::gpus_from(&probes, Some(64 << 30));
    assert_eq!(gpus[0].vram_total_bytes, Some(48 << 30));
    assert_eq!(Tier::for_gpus(&gpus).level, 4);
}

#[test]
fn windows_with_a_radeon_and_an_intel_igpu() {
    let r = check_against_expected("windows");
    // The registry's 64-bit size, not AdapterRAM's capped 4 GiB, decides the tier.
    assert_eq!((r.tier.level, r.tier.name.as_str()), (3, "Open Ocean"));
    assert!(r.gpus.iter().all(|g| !g.name.contains("Remote Display")));
}

#[test]
fn the_human_table_shows_every_gpu_and_the_tier() {
    let text = diagnose::render::human(&replay("linux-nvidia"));
    assert!(
        text.contains("Tier    4 Mariana Depth (24.0 GiB VRAM on NVIDIA GeForce RTX 4090)"),
        "{text}"
    );
    assert!(text.contains("Memory  54.7 GiB available of 62.6 GiB"), "{text}");
    let header = text.lines().find(|l| l.starts_with("GPU ")).expect("GPU table header");
    let nvidia = text
        .lines()
        .find(|l| l.contains("RTX 4090") && l.contains("CUDA"))
        .expect("GPU row");
    // Columns line up: VRAM sits at the same offset in the header and the row.
    assert_eq!(header.find("VRAM"), nvidia.find("24.0 GiB"), "{text}");

    let empty = diagnose::render::human(&replay("linux-cpu-only"));
    assert!(empty.contains("GPUs    none found"), "{empty}");
    assert!(empty.contains("Tier    0 Basic (no dedicated GPU found)"), "{empty}");
}

#[test]
fn garbage_probe_output_yields_no_gpus_and_no_panic() {
    let junk = "\u{0}\u{ff}not what any tool prints {[".to_string();
    let probes = GpuProbes {
        nvml: None,
        nvidia_smi: Some(junk.clone()),
        drm: Vec::new(),
        kfd: true,
        rocm_smi: Some(junk.clone()),
        system_profiler: Some(junk.clone()),
        sysctl_memsize: Some(junk.clone()),
        windows_video: Some(junk),
    };
    assert!(gpu::gpus_from(&probes, None).is_empty());
}

/// The real binary on this machine: it must run, print JSON that parses into the
/// documented report, and report sane values. Build machines have no GPU, so the tier
/// must come out Basic unless a counted GPU was actually found.
#[test]
fn the_binary_diagnoses_this_machine() {
    let models = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cxmpute-provider"))
        .args(["diagnose", "--json"])
        .env("CXMPUTE_MODELS_DIR", models.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let r: Report = serde_json::from_slice(&out.stdout).expect("diagnose --json prints a Report");

    assert_eq!(r.schema, diagnose::SCHEMA_VERSION);
    let cores = r.cpu.physical_cores.expect("physical cores known");
    let threads = r.cpu.threads.expect("threads known");
    assert!(cores >= 1 && threads >= cores, "{:?}", r.cpu);
    assert!(r.cpu.arch.is_some());
    let total = r.memory.total_bytes.expect("memory known");
    assert!(total > 0);
    assert!(r.memory.available_bytes.is_some_and(|a| a <= total), "{:?}", r.memory);
    assert_eq!(r.disk.models_dir, models.path().display().to_string());
    assert!(
        r.disk.free_bytes.is_some(),
        "free disk of the temp folder: {:?}",
        r.disk
    );
    assert_eq!(r.os.family, std::env::consts::OS);

    assert_eq!(r.tier, Tier::for_gpus(&r.gpus));
    let counted = r
        .gpus
        .iter()
        .any(|g| matches!(g.kind, GpuKind::Dedicated | GpuKind::Unified) && g.vram_total_bytes.is_some());
    if !counted {
        assert_eq!((r.tier.level, r.tier.name.as_str()), (0, "Basic"));
    }

    let human = Command::new(env!("CARGO_BIN_EXE_cxmpute-provider"))
        .arg("diagnose")
        .env("CXMPUTE_MODELS_DIR", models.path())
        .output()
        .unwrap();
    assert!(human.status.success());
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.contains(&format!("Tier    {} {}", r.tier.level, r.tier.name)),
        "{text}"
    );
}
