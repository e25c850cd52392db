//! Node configuration: defaults < TOML file < `CXMPUTE_…` environment < flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// The gateway to link to, e.g. `http://127.0.0.1:8080`.
    pub gateway: String,
    /// `<device id>.<secret>`, from `cxmpute-gateway admin device create`.
    pub credential: Option<String>,
    /// An OpenAI-compatible server (vLLM, llama.cpp server, LM Studio…) whose
    /// models this node also serves, e.g. `http://127.0.0.1:8000/v1`.
    pub upstream: Option<String>,
    /// Bearer token for the upstream, if it needs one.
    pub upstream_api_key: Option<String>,
    /// Which upstream models serve which service; guessed from names when empty.
    pub upstream_models: UpstreamModels,
    /// A local Ollama (e.g. `http://127.0.0.1:11434`) whose models this node
    /// serves for chat and embeddings. Off unless set.
    pub ollama: Option<String>,
    /// Models to pull into Ollama at start if it lacks them; the node removes
    /// the ones it pulled when it stops.
    pub ollama_pull: Vec<String>,
    /// Serve the built-in chat engine (llama.cpp) when its model is available.
    pub chat: bool,
    /// A GGUF file, or a folder holding one, to chat with instead of the cached
    /// Gemma 3 270M; it must exist.
    pub chat_model_dir: Option<PathBuf>,
    /// Chat requests decoded at once by the built-in engine; more wait.
    pub chat_slots: u32,
    /// Tokens of context (prompt + answer) each chat request gets.
    pub chat_context: u32,
    /// Serve the built-in MiniLM embeddings engine.
    pub embeddings: bool,
    /// Folder holding the MiniLM files, instead of the model cache.
    pub embeddings_model_dir: Option<PathBuf>,
    /// Serve the built-in text-to-speech voice (Piper) when it, ONNX Runtime
    /// and espeak-ng are available.
    pub speech: bool,
    /// A Piper voice folder (or `.onnx` file with its `.onnx.json`) instead of
    /// the cached en_US-joe-medium; it must load.
    pub speech_model_dir: Option<PathBuf>,
    /// Serve the built-in web scraper.
    pub scrape: bool,
    /// Let the scraper fetch loopback addresses (tests only; never on a real node).
    pub scrape_allow_loopback: bool,
    /// Also serve the local router on this address (direct mode, debugging).
    pub listen: Option<SocketAddr>,
    /// Direct mode: register this public URL instead of dialling a link.
    pub direct_url: Option<String>,
    /// Requests run at once; more wait in the link's queue.
    pub max_concurrency: u32,
    /// Most GPU memory the assigned models may need together, in MiB.
    pub max_vram_mb: Option<u64>,
    /// Most disk space the assigned models' downloads may take, in MiB.
    pub max_disk_mb: Option<u64>,
    /// Fetch catalog models the gateway assigns (from the sources its catalog
    /// lists); when off, this node serves only models it already knows.
    pub fetch_catalog_models: bool,
    /// Folders whose models the gateway's catalog may name with `path:`
    /// sources; none by default, so a gateway cannot point the node at
    /// other files of this computer.
    pub model_paths: Vec<PathBuf>,
    /// Seconds in-flight requests get to finish after Ctrl-C / SIGTERM.
    pub drain_timeout_secs: u64,
    /// How this computer appears on the provider dashboard (set by the setup wizard).
    pub device_name: Option<String>,
    /// Where it is, as the person running it describes it (all optional).
    pub location: Location,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Location {
    pub country: Option<String>,
    pub region: Option<String>,
    pub city: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamModels {
    pub chat: Vec<String>,
    pub embeddings: Vec<String>,
    pub speech: Vec<String>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            gateway: "http://127.0.0.1:8080".into(),
            credential: None,
            upstream: None,
            upstream_api_key: None,
            upstream_models: UpstreamModels::default(),
            ollama: None,
            ollama_pull: Vec::new(),
            chat: true,
            chat_model_dir: None,
            chat_slots: 4,
            chat_context: 4096,
            embeddings: true,
            embeddings_model_dir: None,
            speech: true,
            speech_model_dir: None,
            scrape: true,
            scrape_allow_loopback: false,
            listen: None,
            direct_url: None,
            max_concurrency: 64,
            max_vram_mb: None,
            max_disk_mb: None,
            fetch_catalog_models: true,
            model_paths: Vec::new(),
            drain_timeout_secs: 30,
            device_name: None,
            location: Location::default(),
        }
    }
}

impl std::fmt::Debug for NodeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeConfig")
            .field("gateway", &self.gateway)
            .field("credential", &self.credential.as_ref().map(|c| redact_credential(c)))
            .field("upstream", &self.upstream)
            .field("upstream_api_key", &self.upstream_api_key.as_ref().map(|_| "***"))
            .field("upstream_models", &self.upstream_models)
            .field("ollama", &self.ollama)
            .field("ollama_pull", &self.ollama_pull)
            .field("chat", &self.chat)
            .field("chat_model_dir", &self.chat_model_dir)
            .field("chat_slots", &self.chat_slots)
            .field("chat_context", &self.chat_context)
            .field("embeddings", &self.embeddings)
            .field("embeddings_model_dir", &self.embeddings_model_dir)
            .field("speech", &self.speech)
            .field("speech_model_dir", &self.speech_model_dir)
            .field("scrape", &self.scrape)
            .field("scrape_allow_loopback", &self.scrape_allow_loopback)
            .field("listen", &self.listen)
            .field("direct_url", &self.direct_url)
            .field("max_concurrency", &self.max_concurrency)
            .field("max_vram_mb", &self.max_vram_mb)
            .field("max_disk_mb", &self.max_disk_mb)
            .field("fetch_catalog_models", &self.fetch_catalog_models)
            .field("model_paths", &self.model_paths)
            .field("drain_timeout_secs", &self.drain_timeout_secs)
            .field("device_name", &self.device_name)
            .field("location", &self.location)
            .finish()
    }
}

/// Shows the device id, hides the secret.
fn redact_credential(c: &str) -> String {
    match c.split_once('.') {
        Some((id, _)) => format!("{id}.***"),
        None => "***".into(),
    }
}

/// The per-user config folder: `$XDG_CONFIG_HOME/cxmpute`, else
/// `~/.config/cxmpute` (`%APPDATA%\\cxmpute` on Windows).
pub fn config_dir() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("XDG_CONFIG_HOME")
        .map(|d| d.join("cxmpute"))
        .or_else(|| var("HOME").map(|h| h.join(".config").join("cxmpute")))
        .or_else(|| var("APPDATA").map(|a| a.join("cxmpute")))
}

/// Where `start` looks for its config file when none is named, and where the
/// setup wizard saves its answers.
pub fn default_config_file() -> Option<PathBuf> {
    config_dir().map(|d| d.join("node.toml"))
}

impl NodeConfig {
    /// Writes this configuration as TOML to `path` (creating its folder),
    /// without the credential: secrets never go into the config file.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let mut shown = self.clone();
        shown.credential = None;
        shown.upstream_api_key = None;
        let text = toml::to_string_pretty(&shown).context("cannot write the configuration as TOML")?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let body = format!("# cxmpute provider node: written by the setup wizard; edit freely.\n{text}");
        std::fs::write(path, body).with_context(|| format!("cannot write {}", path.display()))
    }

    pub fn load(file: Option<&Path>, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<NodeConfig> {
        let mut c = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))?
            }
            None => NodeConfig::default(),
        };
        if let Some(v) = env("CXMPUTE_GATEWAY") {
            c.gateway = v;
        }
        if let Some(v) = env("CXMPUTE_CREDENTIAL") {
            c.credential = Some(v);
        }
        if let Some(v) = env("CXMPUTE_UPSTREAM") {
            c.upstream = Some(v);
        }
        if let Some(v) = env("CXMPUTE_UPSTREAM_API_KEY") {
            c.upstream_api_key = Some(v);
        }
        if let Some(v) = env("CXMPUTE_OLLAMA") {
            c.ollama = Some(v);
        }
        Ok(c)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.gateway.starts_with("http://") || self.gateway.starts_with("https://"),
            "gateway must be an http:// or https:// URL, got '{}'",
            self.gateway
        );
        let cred = self.credential.as_deref().context(
            "no device credential: run `cxmpute-provider login`, or create one with \
             `cxmpute-gateway admin device create <account>` and pass it with --credential or CXMPUTE_CREDENTIAL",
        )?;
        anyhow::ensure!(cred.contains('.'), "the credential must look like <device id>.<secret>");
        if let Some(url) = &self.ollama {
            anyhow::ensure!(
                url.starts_with("http://") || url.starts_with("https://"),
                "ollama must be an http:// or https:// URL, got '{url}'"
            );
        }
        anyhow::ensure!(
            self.ollama_pull.is_empty() || self.ollama.is_some(),
            "ollama_pull names models to pull, but no ollama URL is set"
        );
        anyhow::ensure!(self.max_concurrency >= 1, "max_concurrency must be at least 1");
        anyhow::ensure!(self.chat_slots >= 1, "chat_slots must be at least 1");
        anyhow::ensure!(self.chat_context >= 64, "chat_context must be at least 64 tokens");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_redacted() {
        let c = NodeConfig {
            credential: Some("dev_abc.supersecret".into()),
            ..NodeConfig::default()
        };
        let shown = format!("{c:?}");
        assert!(
            shown.contains("dev_abc.***") && !shown.contains("supersecret"),
            "{shown}"
        );
    }

    #[test]
    fn saved_config_loads_back_without_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("node.toml");
        let c = NodeConfig {
            credential: Some("dev_abc.supersecret".into()),
            upstream_api_key: Some("upkey".into()),
            device_name: Some("box".into()),
            location: Location {
                country: Some("DE".into()),
                ..Location::default()
            },
            max_vram_mb: Some(2048),
            speech: false,
            ..NodeConfig::default()
        };
        c.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("supersecret") && !text.contains("upkey"), "{text}");
        let back = NodeConfig::load(Some(&path), |_| None).unwrap();
        assert_eq!(back.device_name.as_deref(), Some("box"));
        assert_eq!(back.location.country.as_deref(), Some("DE"));
        assert_eq!(back.max_vram_mb, Some(2048));
        assert!(!back.speech && back.credential.is_none());
    }

    #[test]
    fn ollama_keys_load_and_are_checked() {
        let c: NodeConfig =
            toml::from_str("ollama = \"http://127.0.0.1:11434\"\nollama_pull = [\"llama3.2\"]").unwrap();
        assert_eq!(c.ollama.as_deref(), Some("http://127.0.0.1:11434"));
        assert_eq!(c.ollama_pull, ["llama3.2"]);
        let with = |ollama: Option<&str>, pull: &[&str]| NodeConfig {
            credential: Some("dev.secret".into()),
            ollama: ollama.map(str::to_owned),
            ollama_pull: pull.iter().map(|s| s.to_string()).collect(),
            ..NodeConfig::default()
        };
        assert!(with(Some("http://127.0.0.1:11434"), &["m"]).validate().is_ok());
        let err = with(None, &["m"]).validate().unwrap_err().to_string();
        assert!(err.contains("no ollama URL"), "{err}");
        let err = with(Some("127.0.0.1:11434"), &[]).validate().unwrap_err().to_string();
        assert!(err.contains("http://"), "{err}");
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(toml::from_str::<NodeConfig>("gatway = \"x\"").is_err());
    }
}
