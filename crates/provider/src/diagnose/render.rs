//! The human-readable form of a [`Report`]: a key/value block for the machine, then one
//! table row per GPU. Unknown values print as "unknown".

use super::gpu::{Backend, GpuKind};
use super::Report;

const UNKNOWN: &str = "unknown";

pub fn human(r: &Report) -> String {
    let cpu = &r.cpu;
    let count = |n: Option<u32>, what: &str| match n {
        Some(n) => format!("{n} {what}"),
        None => format!("{UNKNOWN} {what}"),
    };
    let mut facts: Vec<Vec<String>> = vec![
        vec!["CPU".into(), cpu.model.clone().unwrap_or_else(|| UNKNOWN.into())],
        vec![
            "Cores".into(),
            format!(
                "{}, {}, {}",
                count(cpu.physical_cores, "physical"),
                count(cpu.threads, "threads"),
                cpu.arch.as_deref().unwrap_or(UNKNOWN)
            ),
        ],
        vec![
            "Memory".into(),
            format!(
                "{} available of {}",
                size(r.memory.available_bytes),
                size(r.memory.total_bytes)
            ),
        ],
        vec![
            "Disk".into(),
            format!(
                "{} free of {} on {} (models: {})",
                size(r.disk.free_bytes),
                size(r.disk.total_bytes),
                r.disk.mount_point.as_deref().unwrap_or(UNKNOWN),
                r.disk.models_dir
            ),
        ],
        vec!["OS".into(), os_line(r)],
    ];
    let tier = &r.tier;
    let decided_by = match (&tier.gpu, tier.vram_bytes) {
        (Some(gpu), Some(vram)) => format!("{} VRAM on {gpu}", size(Some(vram))),
        _ => "no dedicated GPU found".into(),
    };
    facts.push(vec![
        "Tier".into(),
        format!("{} {} ({decided_by})", tier.level, tier.name),
    ]);
    if r.gpus.is_empty() {
        facts.push(vec!["GPUs".into(), "none found".into()]);
    }
    let mut out = table(&facts);
    if !r.gpus.is_empty() {
        let mut rows = vec![["GPU", "NAME", "KIND", "BACKEND", "VRAM", "FREE", "SOURCE"]
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()];
        for (i, g) in r.gpus.iter().enumerate() {
            rows.push(vec![
                i.to_string(),
                g.name.clone(),
                kind(g.kind).into(),
                backend(g.backend).into(),
                size(g.vram_total_bytes),
                size(g.vram_free_bytes),
                g.source.clone(),
            ]);
        }
        out.push('\n');
        out.push_str(&table(&rows));
    }
    out
}

fn os_line(r: &Report) -> String {
    let os = &r.os;
    let mut line = os.name.clone().unwrap_or_else(|| UNKNOWN.into());
    if let Some(v) = &os.version {
        line.push(' ');
        line.push_str(v);
    }
    if let Some(k) = &os.kernel {
        line.push_str(&format!(", kernel {k}"));
    }
    line.push_str(&format!(" ({})", os.family));
    line
}

fn kind(k: GpuKind) -> &'static str {
    match k {
        GpuKind::Dedicated => "dedicated",
        GpuKind::Integrated => "integrated",
        GpuKind::Unified => "unified",
    }
}

fn backend(b: Backend) -> &'static str {
    match b {
        Backend::Cuda => "CUDA",
        Backend::Metal => "Metal",
        Backend::Rocm => "ROCm",
        Backend::Vulkan => "Vulkan",
        Backend::None => "none",
    }
}

/// Bytes in binary units with one decimal: "23.9 GiB".
pub fn size(bytes: Option<u64>) -> String {
    let Some(bytes) = bytes else {
        return UNKNOWN.into();
    };
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Left-aligned columns two spaces apart; no trailing spaces.
pub fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(&widths) {
            line.push_str(cell);
            line.push_str(&" ".repeat(width.saturating_sub(cell.chars().count()) + 2));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_naturally() {
        assert_eq!(size(None), "unknown");
        assert_eq!(size(Some(512)), "512 B");
        assert_eq!(size(Some(24564 << 20)), "24.0 GiB");
        assert_eq!(size(Some(3 << 39)), "1.5 TiB");
    }

    #[test]
    fn columns_line_up() {
        let rows = vec![
            vec!["a".to_string(), "long value".to_string(), "x".to_string()],
            vec!["longer".to_string(), "v".to_string(), "y".to_string()],
        ];
        assert_eq!(table(&rows), "a       long value  x\nlonger  v           y\n");
    }
}
