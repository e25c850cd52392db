//! The orchestrator's exchange with a node before it links: the node reports
//! its hardware and what its owner allows, the gateway answers which catalog
//! models it should load and serve (its *assignment*).
//!
//! A node `POST`s an [`AssignmentRequest`] to [`ASSIGNMENT_PATH`] with its
//! device credential, loads what the [`Assignment`] lists, then links. The
//! gateway admits only assigned offers, plus the node's own upstream models
//! (offers marked `upstream`).

use serde::{Deserialize, Serialize};

/// Where a node asks for its assignment.
pub const ASSIGNMENT_PATH: &str = "/v1/provider/assignment";

/// Names of the provider tiers 0-4, by GPU memory: under 1 GB, 1-4, 4-8, 8-22, 22 and more.
pub const TIER_NAMES: [&str; 5] = ["Basic", "Tide Pool", "Blue Surf", "Open Ocean", "Mariana Depth"];

/// What the node found out about its machine (from `cxmpute-provider diagnose`).
/// Sizes are MiB; `None` is "could not learn".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Hardware {
    /// Provider tier 0-4 (see docs/provider.md).
    pub tier: u8,
    /// Memory of the best counted GPU.
    pub vram_mb: Option<u64>,
    /// Total system memory.
    pub ram_mb: Option<u64>,
    /// Free space where models are stored.
    pub free_disk_mb: Option<u64>,
    /// Logical processors.
    pub cpu_threads: Option<u32>,
    pub cpu_model: Option<String>,
    pub os: Option<String>,
}

/// What the node's owner allows it to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct OptIn {
    /// Services the node may serve (`chat`, `embeddings`, `speech`, `scrape`).
    pub services: Vec<String>,
    /// Requests at once.
    pub max_concurrency: u32,
    /// Most GPU memory the assigned models may need together, in MiB.
    pub max_vram_mb: Option<u64>,
    /// Most disk space new downloads may take together, in MiB.
    pub max_disk_mb: Option<u64>,
}

impl Default for OptIn {
    fn default() -> Self {
        OptIn {
            services: vec!["chat".into(), "embeddings".into(), "speech".into(), "scrape".into()],
            max_concurrency: 64,
            max_vram_mb: None,
            max_disk_mb: None,
        }
    }
}

/// Body of `POST /v1/provider/assignment`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AssignmentRequest {
    pub hardware: Hardware,
    pub opt_in: OptIn,
    /// Engines this node can run: `llama`, `minilm`, `piper`, `scrape`.
    pub engines: Vec<String>,
    /// Model ids this node can load with those engines (it has them or knows
    /// where to fetch them).
    pub models: Vec<String>,
    /// Of those, the ones already on its disk: they need no download space.
    pub cached: Vec<String>,
    /// Models its own OpenAI-compatible upstream serves.
    pub upstream_models: Vec<String>,
    /// Catalog models beyond `models` that the node can fetch itself and load.
    pub fetch: Fetch,
}

/// What a node can fetch on its own: any catalog model of one of `engines`
/// that lists a source of one of the `sources` kinds (the part before the
/// first `:` of a source, e.g. `hf` in `hf:org/name`), except the models in
/// `failed`, which it tried to fetch on this start and could not.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Fetch {
    pub engines: Vec<String>,
    pub sources: Vec<String>,
    pub failed: Vec<String>,
}

impl Fetch {
    /// True when model `id` of `engine` with these `sources` can be fetched.
    pub fn can(&self, id: &str, engine: &str, sources: &[String]) -> bool {
        !self.failed.iter().any(|f| f == id)
            && self.engines.iter().any(|e| e == engine)
            && sources
                .iter()
                .any(|s| self.sources.iter().any(|k| source_kind(s) == Some(k.as_str())))
    }
}

/// The kind of a model source: `hf` for `hf:org/name`, `None` when it has no `kind:` prefix.
pub fn source_kind(source: &str) -> Option<&str> {
    let (kind, rest) = source.split_once(':')?;
    let ok = !kind.is_empty() && !rest.is_empty() && kind.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    ok.then_some(kind)
}

/// One catalog model the node should load and serve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignedModel {
    /// Public model id.
    pub id: String,
    pub service: String,
    /// `llama`, `minilm`, `piper`, `scrape` or `upstream`.
    pub engine: String,
    /// Where the model's files can be fetched, best first.
    #[serde(default)]
    pub sources: Vec<String>,
    /// Disk the catalog says the model's files take, MiB: what the node makes
    /// room for in its cache before fetching it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mb: Option<u64>,
}

/// A catalog model the node was not given, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Declined {
    pub id: String,
    pub reason: String,
}

/// The answer to an [`AssignmentRequest`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub models: Vec<AssignedModel>,
    #[serde(default)]
    pub declined: Vec<Declined>,
}

impl Assignment {
    pub fn has(&self, id: &str) -> bool {
        self.models.iter().any(|m| m.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_kinds_are_the_lowercase_prefix() {
        assert_eq!(source_kind("hf:org/name"), Some("hf"));
        assert_eq!(source_kind("pypi:pkg==1.0"), Some("pypi"));
        assert_eq!(source_kind("path:/srv/models/x"), Some("path"));
        assert_eq!(source_kind("org/name"), None);
        assert_eq!(source_kind("HF:org/name"), None);
        assert_eq!(source_kind("hf:"), None);
    }

    #[test]
    fn a_model_is_fetchable_only_by_an_engine_and_source_kind_the_node_has() {
        let mut fetch = Fetch {
            engines: vec!["minilm".into()],
            sources: vec!["hf".into(), "path".into()],
            failed: vec![],
        };
        let sources = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(fetch.can("m", "minilm", &sources(&["s3:bucket/x", "hf:org/name"])));
        assert!(!fetch.can("m", "minilm", &sources(&["pypi:pkg==1"])));
        assert!(!fetch.can("m", "llama", &sources(&["hf:org/name"])));
        assert!(!fetch.can("m", "minilm", &[]));
        assert!(!Fetch::default().can("m", "minilm", &sources(&["hf:org/name"])));
        fetch.failed = vec!["m".into()];
        assert!(!fetch.can("m", "minilm", &sources(&["hf:org/name"])));
        assert!(fetch.can("n", "minilm", &sources(&["hf:org/name"])));
    }
}
