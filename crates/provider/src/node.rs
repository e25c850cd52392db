//! Running a node: load the engines, link (or register a direct URL), serve,
//! and on stop drain: no new work, in-flight requests finish, then go.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use cxmpute_protocol::assign::AssignmentRequest;
use cxmpute_protocol::link::{Hello, Placement, Register, DRAIN_PATH, REGISTER_PATH};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::assignment::Planned;
use crate::config::NodeConfig;
use crate::engines::llama::{ChatOptions, LlamaChat};
use crate::engines::minilm::MiniLm;
use crate::engines::ollama::{self, Ollama};
use crate::engines::piper::{self, PiperVoice};
use crate::engines::scrape::{ScrapeConfig, ScrapeEngine};
use crate::engines::upstream::Upstream;
use crate::engines::{BuiltinChat, BuiltinEmbeddings, Engines};
use crate::models::source::{Format, Limits};
use crate::server::{self, NodeState};
use crate::status::{self, Phase};
use crate::{assignment, link, models};

/// Public ids the engines serve their model under, where the gateway's
/// catalog named it (a fetched catalog model) rather than the file's name.
#[derive(Debug, Clone, Default)]
pub struct ServedNames {
    pub chat: Option<String>,
    pub embeddings: Option<String>,
    pub speech: Option<String>,
}

impl ServedNames {
    fn catalog_ids(&self) -> Vec<String> {
        [&self.chat, &self.embeddings, &self.speech]
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    }
}

/// The switch, model folder and served name of the engine that loads `format`.
fn slot<'a>(
    config: &'a mut NodeConfig,
    names: &'a mut ServedNames,
    format: Format,
) -> (&'a mut bool, &'a mut Option<std::path::PathBuf>, &'a mut Option<String>) {
    match format {
        Format::Gguf => (&mut config.chat, &mut config.chat_model_dir, &mut names.chat),
        Format::SentenceBert => (
            &mut config.embeddings,
            &mut config.embeddings_model_dir,
            &mut names.embeddings,
        ),
        Format::PiperVoice => (&mut config.speech, &mut config.speech_model_dir, &mut names.speech),
    }
}

/// Where fetch progress goes: the start-up splash, or (while the node already
/// serves) the dashboard's row for the model.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shown {
    Splash,
    Background,
}

/// Fetches the catalog models the assignment gave this node and points their
/// engines at them. A model that cannot be fetched turns its engine off and
/// is returned in the second list, for the gateway to assign something else.
async fn fetch_planned(config: &mut NodeConfig, planned: Vec<Planned>, shown: Shown) -> (ServedNames, Vec<String>) {
    let mut names = ServedNames::default();
    let mut failed = Vec::new();
    let limits = limits_of(config);
    for p in planned {
        let service = p.format.service();
        let (id, id2) = (p.id.clone(), p.id.clone());
        let report = move |msg: &str| match shown {
            Shown::Splash => status::global().set_phase(Phase::Loading(msg.to_string())),
            Shown::Background => status::global().set_fetching(service, &id2, msg),
        };
        report(&format!("fetching {}", p.id));
        let fetched = models::source::prepare(&p.id, p.format, &p.sources, &limits, move |msg| {
            tracing::info!(model = %id, "{msg}");
            report(msg);
        })
        .await;
        let (on, dir, name) = slot(config, &mut names, p.format);
        match fetched {
            Ok(path) => {
                *dir = Some(path);
                *name = Some(p.id);
            }
            Err(e) => {
                tracing::error!(model = %p.id, "not serving {}: {e:#}", p.id);
                status::global().error(format!("cannot fetch {}: {e:#}", p.id));
                status::global().fetch_ended(&p.id);
                *on = false;
                failed.push(p.id);
            }
        }
    }
    (names, failed)
}

fn limits_of(config: &NodeConfig) -> Limits {
    Limits {
        path_roots: Some(config.model_paths.clone()),
        max_bytes: config.max_disk_mb.map(|mb| mb.saturating_mul(1 << 20)),
    }
}

/// True when `p` needs no download: an earlier run fetched it for the
/// catalog, or a source is a local path.
fn is_at_hand(p: &Planned) -> bool {
    let cached = models::source::cache_name(&p.id)
        .is_some_and(|n| models::source::fetched_for_catalog(&models::models_dir().join(n)));
    // Sources are tried in order: a local path helps only when it comes first.
    let local_first = match p.sources.first().map(|s| models::source::Source::parse(s)) {
        Some(Ok(models::source::Source::Path(path))) => path.exists(),
        _ => false,
    };
    cached || local_first
}

/// Evicts catalog models neither `planned` nor `serving` names (least
/// recently used first) while the cache and the models about to be fetched
/// would not fit the owner's disk allowance or the free disk.
async fn make_room(planned: &[Planned], serving: &[String], allowance: Option<u64>) {
    let root = models::models_dir();
    let keep: Vec<String> = planned
        .iter()
        .map(|p| &p.id)
        .chain(serving)
        .filter_map(|id| models::source::cache_name(id))
        .collect();
    let incoming: u64 = planned
        .iter()
        .filter(|p| {
            !models::source::cache_name(&p.id).is_some_and(|n| models::source::fetched_for_catalog(&root.join(n)))
        })
        .map(|p| p.disk_bytes)
        .sum();
    let evicted = tokio::task::spawn_blocking(move || {
        let room = models::cache::Room {
            incoming,
            allowance,
            free_bytes: crate::diagnose::host::disk_of(&root).map(|d| d.free_bytes),
            margin: models::download::DISK_MARGIN,
        };
        models::cache::make_room(&root, &room, &keep)
    })
    .await
    .unwrap_or_default();
    for m in evicted {
        tracing::info!(model = %m.name, bytes = m.size_bytes, "evicted from the model cache to make room (not assigned, least recently used)");
    }
}

/// Rounds of asking for an assignment: the first, and up to two more when
/// assigned catalog models could not be fetched.
const ASSIGNMENT_ROUNDS: usize = 3;

/// Loads the chat engine: the configured GGUF, else the cached Gemma 3 270M. A
/// missing cached model is not an error (the node serves its other engines);
/// a configured one that cannot be loaded is.
async fn build_chat(config: &NodeConfig, name: Option<String>) -> anyhow::Result<Option<BuiltinChat>> {
    if !config.chat {
        return Ok(None);
    }
    let explicit = config.chat_model_dir.clone();
    let options = ChatOptions {
        slots: config.chat_slots,
        context_per_slot: config.chat_context,
        ..ChatOptions::default()
    };
    tokio::task::spawn_blocking(move || -> anyhow::Result<Option<BuiltinChat>> {
        let file = match explicit {
            Some(path) => models::resolve_gguf(&path)?,
            None => match models::cached_gemma() {
                Some(file) => file,
                None => {
                    tracing::warn!(
                        "the chat model {} is not in {}, so this node offers no chat; fetch it with \
                         `cxmpute-provider fetch-model` or scripts/fetch-model.sh",
                        models::GEMMA_ID,
                        models::models_dir().display()
                    );
                    return Ok(None);
                }
            },
        };
        let started = Instant::now();
        let engine =
            LlamaChat::load(&file, options).with_context(|| format!("loading the chat model {}", file.display()))?;
        let model = name.unwrap_or_else(|| models::chat_model_id(&file));
        tracing::info!(model = %model, ms = started.elapsed().as_millis() as u64, "chat engine loaded");
        Ok(Some(BuiltinChat {
            model,
            engine: Arc::new(engine),
        }))
    })
    .await
    .context("the chat model loader panicked")?
}

/// Loads the text-to-speech voice: the configured one, else the cached Piper
/// voice. Like chat, a missing cached voice, ONNX Runtime or espeak-ng is a
/// warning (the node serves its other engines); a configured voice that cannot
/// be loaded is an error.
async fn build_speech(config: &NodeConfig, name: Option<String>) -> anyhow::Result<Option<Arc<PiperVoice>>> {
    if !config.speech {
        return Ok(None);
    }
    let explicit = config.speech_model_dir.clone();
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    tokio::task::spawn_blocking(move || -> anyhow::Result<Option<Arc<PiperVoice>>> {
        let skip = |why: String| {
            tracing::warn!(
                "{why}, so this node offers no speech; fetch the voice with `cxmpute-provider fetch-model \
                 --model {}`",
                models::PIPER_ID
            );
            Ok(None)
        };
        let (dir, model) = match &explicit {
            Some(path) => {
                let file = piper::find_voice_file(path)?;
                (path.clone(), name.unwrap_or_else(|| models::speech_model_id(&file)))
            }
            None if models::is_piper_folder(&models::piper_dir()) => (models::piper_dir(), models::PIPER_ID.to_string()),
            None => {
                return skip(format!(
                    "the voice {} is not in {}",
                    models::PIPER_ID,
                    models::models_dir().display()
                ))
            }
        };
        let Some(library) = models::cached_onnxruntime() else {
            if explicit.is_some() {
                anyhow::bail!("ONNX Runtime is not installed: set ORT_DYLIB_PATH or run `cxmpute-provider fetch-model --model {}`", models::PIPER_ID);
            }
            return skip(format!("ONNX Runtime is not in {}", models::models_dir().display()));
        };
        let started = Instant::now();
        let loaded = piper::init_onnxruntime(&library)
            .and_then(|()| PiperVoice::load(&model, &dir, threads))
            .with_context(|| format!("loading the voice in {}", dir.display()));
        match loaded {
            Ok(voice) => {
                tracing::info!(model = %model, ms = started.elapsed().as_millis() as u64, "speech engine loaded");
                Ok(Some(Arc::new(voice)))
            }
            Err(e) if explicit.is_none() => skip(format!("{e:#}")),
            Err(e) => Err(e),
        }
    })
    .await
    .context("the voice loader panicked")?
}

fn loading(step: &str) {
    status::global().set_phase(Phase::Loading(step.to_string()));
}

/// Loads the embeddings engine: the configured or catalog model folder, else
/// MiniLM from the cache (fetched first if missing).
async fn build_embeddings(config: &NodeConfig, name: Option<String>) -> anyhow::Result<Option<BuiltinEmbeddings>> {
    if !config.embeddings {
        return Ok(None);
    }
    let dir = config.embeddings_model_dir.clone();
    let engine = tokio::task::spawn_blocking(move || -> anyhow::Result<MiniLm> {
        let dir = match dir {
            Some(d) => d,
            None => models::ensure_minilm(|msg| tracing::info!("{msg}"))?,
        };
        let started = Instant::now();
        let engine = MiniLm::load(&dir).with_context(|| format!("loading MiniLM from {}", dir.display()))?;
        tracing::info!(dir = %dir.display(), ms = started.elapsed().as_millis() as u64, "embeddings engine ready");
        Ok(engine)
    })
    .await
    .context("the model loader panicked")??;
    Ok(Some(BuiltinEmbeddings {
        model: name.unwrap_or_else(|| models::MINILM_ID.to_string()),
        engine: Arc::new(engine),
    }))
}

/// A catalog model that was fetched but does not load leaves its engine off
/// instead of stopping the node: the gateway chose it, not the owner.
fn soft<T>(catalog_model: Option<&str>, built: anyhow::Result<Option<T>>) -> anyhow::Result<Option<T>> {
    match (built, catalog_model) {
        (Err(e), Some(id)) => {
            tracing::error!(model = %id, "not serving {id}: it does not load: {e:#}");
            status::global().error(format!("cannot load {id}: {e:#}"));
            Ok(None)
        }
        (built, _) => built,
    }
}

/// Loads every engine the configuration asks for; `upstream` is already discovered.
async fn build_engines(
    config: &NodeConfig,
    upstream: Option<Upstream>,
    names: ServedNames,
    shown: Shown,
) -> anyhow::Result<Engines> {
    let loading = |step: &str| {
        if shown == Shown::Splash {
            loading(step);
        }
    };
    if config.chat {
        loading("loading the chat model");
    }
    let chat = soft(names.chat.as_deref(), build_chat(config, names.chat.clone()).await)?;
    if config.speech {
        loading("loading the voice");
    }
    let speech = soft(
        names.speech.as_deref(),
        build_speech(config, names.speech.clone()).await,
    )?;
    if config.embeddings {
        loading("loading the embeddings model");
    }
    let minilm = soft(
        names.embeddings.as_deref(),
        build_embeddings(config, names.embeddings.clone()).await,
    )?;
    let scrape = if config.scrape {
        let cfg = ScrapeConfig {
            allow_loopback: config.scrape_allow_loopback,
            ..ScrapeConfig::default()
        };
        Some(Arc::new(ScrapeEngine::new(cfg)?))
    } else {
        None
    };
    // Last, so nothing after it can fail and leave pulled models behind.
    let ollama = match &config.ollama {
        Some(url) => {
            loading("connecting to Ollama");
            let mut reporters = std::collections::HashMap::new();
            let ol = Ollama::connect(url, &config.ollama_pull, |model, p| {
                reporters
                    .entry(model.to_owned())
                    .or_insert_with(|| ollama::log_progress(model))(p)
            })
            .await?;
            tracing::info!(ollama = %url, models = ol.offers.len(), pulled = ?ol.pulled(), "Ollama ready");
            Some(ol)
        }
        None => None,
    };
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    Ok(Engines {
        chat,
        minilm,
        speech,
        cpu_slots: Arc::new(Semaphore::new(cpus.max(1))),
        scrape,
        upstream,
        ollama,
    })
}

/// Runs the node until `shutdown` is cancelled, then drains: discover the
/// upstream, ask the gateway for an assignment, load what was assigned, link.
pub async fn run(mut config: NodeConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    config.validate()?;
    let upstream = match &config.upstream {
        Some(url) => {
            let up = Upstream::discover(url, config.upstream_api_key.clone(), &config.upstream_models).await?;
            tracing::info!(upstream = %url, models = up.offers.len(), "upstream ready");
            Some(up)
        }
        None => None,
    };
    let chat_model = if config.chat {
        assignment::chat_model_id(&config)?
    } else {
        String::new()
    };
    let report = tokio::task::spawn_blocking(|| crate::diagnose::collect(&models::models_dir()))
        .await
        .context("the hardware probe panicked")?;
    let hardware = assignment::hardware(&report);
    tracing::info!(
        tier = hardware.tier,
        vram_mb = ?hardware.vram_mb,
        ram_mb = ?hardware.ram_mb,
        free_disk_mb = ?hardware.free_disk_mb,
        "asking the gateway for an assignment"
    );
    let mut req = assignment::request(&config, hardware, &chat_model, upstream.as_ref());
    let credential = config.credential.clone().unwrap_or_default();
    let wanted = config.clone();
    let mut names = ServedNames::default();
    let mut later = Vec::new();
    for round in 1..=ASSIGNMENT_ROUNDS {
        let fetched = tokio::select! {
            r = assignment::fetch(&wanted.gateway, &credential, &req) => r?,
            _ = shutdown.cancelled() => return Ok(()),
        };
        let Some(assigned) = fetched else {
            break;
        };
        config = wanted.clone();
        let planned = assignment::apply(&mut config, &assigned, &chat_model);
        make_room(&planned, &[], limits_of(&config).max_bytes).await;
        // Models that need a download come after the node serves the rest.
        let (now, downloads): (Vec<_>, Vec<_>) = planned.into_iter().partition(is_at_hand);
        later = downloads;
        for p in &later {
            *slot(&mut config, &mut names, p.format).0 = false;
        }
        let failed;
        (names, failed) = tokio::select! {
            done = fetch_planned(&mut config, now, Shown::Splash) => done,
            _ = shutdown.cancelled() => return Ok(()),
        };
        if failed.is_empty() || round == ASSIGNMENT_ROUNDS {
            break;
        }
        tracing::warn!(models = ?failed, "asking the gateway again, without the models that could not be fetched");
        req = ask_again(&wanted, &req, upstream.as_ref(), &chat_model, failed);
    }
    let mut engines = build_engines(&config, upstream.clone(), names.clone(), Shown::Splash).await?;
    let mut background = None;
    if !later.is_empty() {
        let deferred = Deferred {
            planned: later,
            serving: names.catalog_ids(),
            config: config.clone(),
            wanted,
            request: req.clone(),
            upstream,
            chat_model,
        };
        if engines.offers().is_empty() {
            // Nothing to serve meanwhile: fetch first, as the splash shows.
            let mut added = Added::default();
            tokio::select! {
                _ = deferred.load(Shown::Splash, |more| added.absorb(more)) => {}
                _ = shutdown.cancelled() => return Ok(()),
            };
            added.merge_into(&mut engines);
        } else {
            for p in &deferred.planned {
                status::global().set_fetching(p.format.service(), &p.id, "waiting to fetch");
            }
            background = Some(deferred);
        }
    }
    let ollama = engines.ollama.clone();
    let result = run_with_engines(config, engines, Some(req.hardware.tier), background, shutdown).await;
    // Whatever ended the node, models it pulled into Ollama go again.
    if let Some(ollama) = ollama {
        ollama.remove_pulled().await;
    }
    result
}

/// The assignment request of the next round: the same node, and every model
/// that could not be fetched so far.
fn ask_again(
    wanted: &NodeConfig,
    last: &AssignmentRequest,
    upstream: Option<&Upstream>,
    chat_model: &str,
    failed: Vec<String>,
) -> AssignmentRequest {
    // What earlier rounds fetched is cached now and needs no disk space again.
    let mut req = assignment::request(wanted, last.hardware.clone(), chat_model, upstream);
    req.fetch.failed = last.fetch.failed.clone();
    req.fetch.failed.extend(failed);
    req
}

/// Assigned catalog models that need a download, fetched while the node
/// already serves its other models.
struct Deferred {
    planned: Vec<Planned>,
    /// Catalog models the node already serves (kept when making room).
    serving: Vec<String>,
    /// The node's configuration once its assignment was applied.
    config: NodeConfig,
    /// What the owner asked for, to apply a new assignment to.
    wanted: NodeConfig,
    /// The last assignment request, to ask again without failed models.
    request: AssignmentRequest,
    upstream: Option<Upstream>,
    chat_model: String,
}

/// Engines loaded after the start.
#[derive(Default)]
struct Added {
    chat: Option<BuiltinChat>,
    minilm: Option<BuiltinEmbeddings>,
    speech: Option<Arc<PiperVoice>>,
}

impl Added {
    fn is_empty(&self) -> bool {
        self.chat.is_none() && self.minilm.is_none() && self.speech.is_none()
    }

    fn absorb(&mut self, more: Added) {
        self.chat = more.chat.or(self.chat.take());
        self.minilm = more.minilm.or(self.minilm.take());
        self.speech = more.speech.or(self.speech.take());
    }

    fn merge_into(self, engines: &mut Engines) {
        engines.chat = self.chat.or(engines.chat.take());
        engines.minilm = self.minilm.or(engines.minilm.take());
        engines.speech = self.speech.or(engines.speech.take());
    }
}

impl Deferred {
    /// Fetches and loads the models, all at once, handing each engine to
    /// `on_ready` as soon as it loads (so a small model is served while a
    /// large one still downloads). Those that cannot be fetched are reported
    /// to the gateway, which may assign others in their place (fetched in the
    /// same way), for as many rounds as at start-up. Returns the models that
    /// could not be served.
    async fn load(&self, shown: Shown, mut on_ready: impl FnMut(Added)) -> Vec<String> {
        let mut planned = self.planned.clone();
        // Engines whose built-in model the gateway assigned in a later round.
        let mut builtins: Vec<Format> = Vec::new();
        let mut request = self.request.clone();
        let mut given_up = Vec::new();
        let mut serving = self.serving.clone();
        let credential = self.config.credential.clone().unwrap_or_default();
        for round in 1..=ASSIGNMENT_ROUNDS {
            let ids: Vec<String> = planned.iter().map(|p| p.id.clone()).collect();
            let formats: Vec<Format> = planned.iter().map(|p| p.format).collect();
            if round > 1 {
                make_room(&planned, &serving, limits_of(&self.config).max_bytes).await;
            }
            serving.extend(ids.iter().cloned());
            // One step per model, then one for the built-in models (no download).
            let mut steps: Vec<(Vec<Planned>, Vec<Format>)> =
                planned.into_iter().map(|p| (vec![p], Vec::new())).collect();
            if !builtins.is_empty() {
                steps.push((Vec::new(), std::mem::take(&mut builtins)));
            }
            // The steps run at once (a small model is not held up behind a
            // large one); each engine is handed over as soon as it loads.
            let mut running: FuturesUnordered<_> = steps
                .into_iter()
                .map(|(step, builtin)| async move {
                    let ids: Vec<String> = step.iter().map(|p| p.id.clone()).collect();
                    let mut config = self.engines_only(step.iter().map(|p| p.format).chain(builtin));
                    let (names, failed) = fetch_planned(&mut config, step, shown).await;
                    let built = build_engines(&config, None, names, shown).await;
                    (ids, failed, built)
                })
                .collect();
            let mut failed = Vec::new();
            while let Some((step_ids, step_failed, built)) = running.next().await {
                match built {
                    Ok(built) => {
                        let loaded: Vec<String> = built.offers().into_iter().map(|o| o.model).collect();
                        given_up.extend(
                            step_ids
                                .iter()
                                .filter(|id| !loaded.contains(id) && !step_failed.contains(id))
                                .cloned(),
                        );
                        let added = Added {
                            chat: built.chat,
                            minilm: built.minilm,
                            speech: built.speech,
                        };
                        if !added.is_empty() {
                            on_ready(added);
                        }
                    }
                    Err(e) => {
                        tracing::error!("the models fetched after the start do not load: {e:#}");
                        status::global().error(format!("cannot load {}: {e:#}", step_ids.join(", ")));
                        given_up.extend(step_ids.iter().filter(|id| !step_failed.contains(id)).cloned());
                    }
                }
                for id in &step_ids {
                    status::global().fetch_ended(id);
                }
                failed.extend(step_failed);
            }
            if failed.is_empty() || round == ASSIGNMENT_ROUNDS {
                given_up.extend(failed);
                break;
            }
            tracing::warn!(models = ?failed, "asking the gateway again, without the models that could not be fetched");
            request = ask_again(
                &self.wanted,
                &request,
                self.upstream.as_ref(),
                &self.chat_model,
                failed.clone(),
            );
            let assigned = match assignment::fetch(&self.wanted.gateway, &credential, &request).await {
                Ok(Some(a)) => a,
                Ok(None) | Err(_) => {
                    given_up.extend(failed);
                    break;
                }
            };
            let mut applied = self.wanted.clone();
            // Replacements only for the engines whose model failed; the rest is settled.
            let open: Vec<Format> = formats
                .iter()
                .zip(&ids)
                .filter(|(_, id)| failed.contains(id))
                .map(|(f, _)| *f)
                .collect();
            planned = assignment::apply(&mut applied, &assigned, &self.chat_model)
                .into_iter()
                .filter(|p| open.contains(&p.format) && !failed.contains(&p.id))
                .collect();
            // An engine with no catalog model may have been given its built-in one.
            let speech_id = assignment::speech_model_id(&self.wanted);
            let builtin_id = |f: Format| match f {
                Format::Gguf => self.chat_model.as_str(),
                Format::SentenceBert => models::MINILM_ID,
                Format::PiperVoice => speech_id.as_str(),
            };
            builtins = open
                .into_iter()
                .filter(|f| !planned.iter().any(|p| p.format == *f) && assigned.has(builtin_id(*f)))
                .collect();
            given_up.extend(failed);
            if planned.is_empty() && builtins.is_empty() {
                break;
            }
        }
        given_up
    }

    /// The node's configuration with only the engines of `formats` switched on:
    /// everything else already runs.
    fn engines_only(&self, formats: impl Iterator<Item = Format>) -> NodeConfig {
        let mut config = NodeConfig {
            chat: false,
            embeddings: false,
            speech: false,
            scrape: false,
            ollama: None,
            ..self.config.clone()
        };
        let mut ignored = ServedNames::default();
        for format in formats {
            *slot(&mut config, &mut ignored, format).0 = true;
        }
        config
    }
}

/// Fetches the deferred models while the node serves, and serves each as soon
/// as it loads: the offering is replaced, and the link (or a new direct
/// registration) announces it.
async fn fetch_in_background(
    state: NodeState,
    deferred: Deferred,
    reregister: Option<Register>,
    shutdown: CancellationToken,
) {
    // A direct-mode node registers again after each replacement (the gateway
    // asks a registration for its hello); replacements that come while a
    // registration is being retried are announced by one more registration.
    let announcing = reregister.map(|register| {
        let (mut replaced, config) = (state.replacements(), deferred.config.clone());
        AbortOnDrop(tokio::spawn(async move {
            while replaced.changed().await.is_ok() {
                let mut backoff = Duration::from_millis(500);
                while let Err(e) = register_direct(&config, &register).await {
                    tracing::warn!("could not announce the new models to the gateway: {e:#}");
                    status::global().error(format!("could not announce the new models: {e:#}"));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }))
    });
    let given_up = deferred
        .load(Shown::Background, |added| {
            if shutdown.is_cancelled() {
                return;
            }
            let current = state.offering();
            let mut engines = current.engines.clone();
            added.merge_into(&mut engines);
            let hello = Hello {
                offers: engines.offers(),
                ..current.hello.clone()
            };
            show_offers(&hello);
            state.replace(engines, hello);
        })
        .await;
    if !given_up.is_empty() {
        tracing::warn!(models = ?given_up, "not serving these assigned models");
    }
    // Announcing continues until the node stops.
    if announcing.is_some() {
        shutdown.cancelled().await;
    }
}

/// Aborts a task when dropped: a background fetch ends with the node however
/// the node ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Logs what the node offers and shows it on the dashboard.
fn show_offers(hello: &Hello) {
    for o in &hello.offers {
        tracing::info!(service = %o.service, model = %o.model, "offering");
    }
    status::global().set_offers(
        hello
            .offers
            .iter()
            .map(|o| (o.service.clone(), o.model.clone()))
            .collect(),
    );
}

/// Runs the node with `engines` until `shutdown`; `tier` is what the hardware
/// probe found (announced for the public network figures). `background`
/// models are fetched and added while it serves.
async fn run_with_engines(
    config: NodeConfig,
    engines: Engines,
    tier: Option<u8>,
    background: Option<Deferred>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    config.validate()?;
    let credential = config.credential.clone().unwrap_or_default();
    let offers = engines.offers();
    anyhow::ensure!(
        !offers.is_empty(),
        "this node has nothing to offer: enable an engine or give it an upstream (if the gateway assigned \
         nothing, the log above says why)"
    );
    let hello = Hello {
        node_version: env!("CARGO_PKG_VERSION").into(),
        offers,
        max_concurrency: config.max_concurrency,
        placement: Placement {
            tier,
            country: config.location.country.clone(),
            region: config.location.region.clone(),
        },
    };
    show_offers(&hello);
    let direct_token = config.direct_url.as_ref().map(|_| cxmpute_token());
    let state = NodeState::new(engines, hello, direct_token.as_deref().map(Arc::from));
    let router = server::router(state.clone());
    let serving = CancellationToken::new();
    if let Some(addr) = config.listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        tracing::info!(addr = %listener.local_addr()?, "local router listening");
        let (router, stop) = (router.clone(), serving.clone());
        tokio::spawn(async move {
            use axum::serve::ListenerExt;
            // Without TCP_NODELAY small streamed chunks wait on Nagle + delayed ACK (~40 ms).
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        });
    }
    let http = crate::gateway_tls::http_client(Duration::from_secs(15))?;
    let gateway = config.gateway.trim_end_matches('/').to_string();
    let registration = match (&config.direct_url, &direct_token) {
        (Some(url), Some(token)) => Some(Register {
            url: url.clone(),
            token: token.clone(),
        }),
        _ => None,
    };
    let link_task = match &registration {
        Some(register) => {
            register_direct(&config, register).await?;
            tracing::info!(url = %register.url, "registered in direct mode");
            status::global().set_phase(Phase::Direct);
            None
        }
        None => {
            let (router, stop) = (router.clone(), serving.clone());
            let max_streams = config.max_concurrency;
            let (gw, draining) = (gateway.clone(), shutdown.clone());
            let relink = link::Relink {
                replaced: state.replacements(),
                hellos: state.hellos(),
            };
            status::global().set_phase(Phase::Connecting);
            Some(tokio::spawn(async move {
                link::run(&gw, &credential, router, max_streams, stop, draining, relink).await
            }))
        }
    };
    // Stopped with the node, or when it drains (a download in progress stays in
    // the cache's .partial folder and resumes next time).
    let _fetching = background.map(|deferred| {
        let task = tokio::spawn(fetch_in_background(
            state.clone(),
            deferred,
            registration,
            shutdown.clone(),
        ));
        let (abort, stop) = (task.abort_handle(), shutdown.clone());
        tokio::spawn(async move {
            stop.cancelled().await;
            abort.abort();
        });
        AbortOnDrop(task)
    });
    let mut link_task = link_task;
    // Wait for a stop, or for the link to give up (refused credential).
    if let Some(task) = link_task.as_mut() {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            r = task => {
                serving.cancel();
                status::global().set_phase(Phase::Stopped);
                return match r {
                    Ok(Err(e)) => Err(e.into()),
                    Ok(Ok(())) => Ok(()),
                    Err(e) => Err(anyhow::anyhow!("link task failed: {e}")),
                };
            }
        }
    } else {
        shutdown.cancelled().await;
    }
    status::global().set_phase(Phase::Draining);
    drain(
        &http,
        &gateway,
        config.credential.as_deref().unwrap_or_default(),
        &state,
        Duration::from_secs(config.drain_timeout_secs),
    )
    .await;
    serving.cancel();
    if let Some(task) = link_task {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    tracing::info!("node stopped");
    status::global().set_phase(Phase::Stopped);
    Ok(())
}

/// Registers the node's local router with the gateway (direct mode); the
/// gateway asks it for its hello and replaces an earlier registration.
async fn register_direct(config: &NodeConfig, register: &Register) -> anyhow::Result<()> {
    let http = crate::gateway_tls::http_client(Duration::from_secs(15))?;
    let gateway = config.gateway.trim_end_matches('/');
    let res = http
        .post(format!("{gateway}{REGISTER_PATH}"))
        .bearer_auth(config.credential.as_deref().unwrap_or_default())
        .json(register)
        .send()
        .await
        .context("cannot reach the gateway to register")?;
    let status = res.status();
    let text = res.text().await.unwrap_or_default();
    anyhow::ensure!(
        status.is_success(),
        "the gateway refused the registration ({status}): {text}"
    );
    Ok(())
}

/// Tells the gateway to stop sending work, then waits for in-flight requests.
async fn drain(http: &reqwest::Client, gateway: &str, credential: &str, state: &NodeState, deadline: Duration) {
    tracing::info!(in_flight = state.in_flight.load(Ordering::SeqCst), "draining");
    match http
        .post(format!("{gateway}{DRAIN_PATH}"))
        .bearer_auth(credential)
        .timeout(Duration::from_secs(3))
        .send()
        .await
    {
        Ok(r) if r.status().is_success() => {}
        Ok(r) => tracing::warn!(status = %r.status(), "the gateway did not accept the drain notice"),
        Err(e) => tracing::warn!(error = %e, "could not tell the gateway we are draining"),
    }
    let until = Instant::now() + deadline;
    while state.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = state.in_flight.load(Ordering::SeqCst);
    if left > 0 {
        tracing::warn!(left, "drain deadline passed with requests still running");
    }
}

fn cxmpute_token() -> String {
    use rand::Rng;
    let bytes: [u8; 24] = rand::thread_rng().gen();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
