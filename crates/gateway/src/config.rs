//! Gateway configuration: defaults < TOML file < `CXMPUTE_…` environment < flags.
//!
//! Unknown keys in the file are errors (a typo must not silently fall back to a
//! default). The admin token is redacted wherever the config is printed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use cxmpute_store::Service;
use serde::{Deserialize, Serialize};

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the HTTP server binds.
    pub listen: SocketAddr,
    /// `sqlite://file.db` or `postgres://…`.
    pub database_url: String,
    /// Bearer token for `/admin/…`; the admin API is off when unset.
    pub admin_token: Option<String>,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Longest a forwarded request may take to produce its response head.
    pub first_byte_timeout_secs: u64,
    /// Longest a whole forwarded request may take; holds expire after this.
    pub request_timeout_secs: u64,
    /// Whether holds are all released at start-up. Right for one gateway on one
    /// database; with several replicas, leave it off and let holds expire.
    pub release_holds_at_start: bool,
    pub link: LinkConfig,
    pub pricing: Pricing,
    pub web: WebConfig,
    /// Device login (`cxmpute-provider login`).
    pub device_login: DeviceLoginConfig,
    /// The models nodes may be assigned (`[[catalog]]`); replaces the built-in
    /// list when given.
    pub catalog: Vec<CatalogEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeviceLoginConfig {
    /// How long a device code waits for approval.
    pub code_ttl_secs: u64,
    /// Seconds a node waits between polls (more after a `slow_down`).
    pub poll_interval_secs: u32,
    /// Device codes one client IP may ask for per hour.
    pub codes_per_ip_per_hour: u32,
    /// Code look-ups on the /link page (right or wrong) per account and per
    /// client IP per hour.
    pub link_attempts_per_hour: u32,
}

impl Default for DeviceLoginConfig {
    fn default() -> Self {
        DeviceLoginConfig {
            code_ttl_secs: 600,
            poll_interval_secs: 5,
            codes_per_ip_per_hour: 20,
            link_attempts_per_hour: 30,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LinkConfig {
    /// HTTP/2 ping period on provider links.
    pub ping_interval_ms: u64,
    /// A link whose ping is not answered within this is dead.
    pub ping_timeout_ms: u64,
    /// Direct-mode nodes may register private or loopback URLs (tests, LANs).
    pub allow_private_direct_urls: bool,
    /// Streams a node may run at once over its link.
    pub max_streams_per_link: u32,
}

/// Prices in credits (1 credit = 10⁻⁹ USD) per unit. Defaults are the original
/// platform's list prices with its markups applied (spec §3.6).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pricing {
    /// Per prompt token (chat). $0.002 per 1K tokens + 20 %.
    pub chat_input: i64,
    /// Per completion token (chat).
    pub chat_output: i64,
    /// Per input token (embeddings). $0.0001 per 1K + 20 %.
    pub embeddings_input: i64,
    /// Per input character (speech). $0.015 per 1K characters + 25 %.
    pub speech_character: i64,
    /// Per page scraped successfully. $0.01 + 30 %.
    pub scrape_page: i64,
    /// Share of each charge credited to the provider, in percent (original: 55).
    pub reward_share_percent: u8,
    /// Completion budget assumed for holds when a chat request names none.
    pub default_max_tokens: u32,
    /// Per-model overrides of the per-unit prices, by public model id.
    pub models: BTreeMap<String, ModelPrice>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    pub input: i64,
    #[serde(default)]
    pub output: Option<i64>,
}

pub use crate::orchestrator::{default_catalog, prune_catalog_sources, validate_catalog, CatalogEntry, Engine};
pub use crate::web::config::{SmtpConfig, SmtpTls, WebConfig};

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            database_url: "sqlite://cxmpute.db".into(),
            admin_token: None,
            max_body_bytes: 4 * 1024 * 1024,
            first_byte_timeout_secs: 120,
            request_timeout_secs: 600,
            release_holds_at_start: true,
            link: LinkConfig::default(),
            pricing: Pricing::default(),
            web: WebConfig::default(),
            device_login: DeviceLoginConfig::default(),
            catalog: default_catalog(),
        }
    }
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            ping_interval_ms: 1000,
            ping_timeout_ms: 2000,
            allow_private_direct_urls: false,
            max_streams_per_link: 2048,
        }
    }
}

impl Default for Pricing {
    fn default() -> Self {
        Pricing {
            chat_input: 2_400,
            chat_output: 2_400,
            embeddings_input: 120,
            speech_character: 18_750,
            scrape_page: 13_000_000,
            reward_share_percent: 55,
            default_max_tokens: 4096,
            models: BTreeMap::new(),
        }
    }
}

impl Pricing {
    /// (input unit price, output unit price) for a request.
    pub fn unit_prices(&self, service: Service, model: &str) -> (i64, i64) {
        if let Some(p) = self.models.get(model) {
            return (p.input, p.output.unwrap_or(p.input));
        }
        match service {
            Service::Chat => (self.chat_input, self.chat_output),
            Service::Embeddings => (self.embeddings_input, 0),
            Service::Speech => (self.speech_character, 0),
            Service::Scrape => (self.scrape_page, 0),
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.reward_share_percent <= 100,
            "pricing.reward_share_percent must be 0-100"
        );
        let all = [
            self.chat_input,
            self.chat_output,
            self.embeddings_input,
            self.speech_character,
            self.scrape_page,
        ];
        anyhow::ensure!(all.iter().all(|p| *p >= 0), "prices must not be negative");
        for (model, p) in &self.models {
            anyhow::ensure!(
                p.input >= 0 && p.output.unwrap_or(0) >= 0,
                "price of {model} must not be negative"
            );
        }
        Ok(())
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("database_url", &cxmpute_store::redact_url(&self.database_url))
            .field("admin_token", &self.admin_token.as_ref().map(|_| "***"))
            .field("max_body_bytes", &self.max_body_bytes)
            .field("first_byte_timeout_secs", &self.first_byte_timeout_secs)
            .field("request_timeout_secs", &self.request_timeout_secs)
            .field("release_holds_at_start", &self.release_holds_at_start)
            .field("link", &self.link)
            .field("pricing", &self.pricing)
            .field("web", &self.web)
            .field("device_login", &self.device_login)
            .field("catalog", &self.catalog.len())
            .finish()
    }
}

impl Config {
    /// Reads the file (if given), then applies `CXMPUTE_…` variables from `env`.
    pub fn load(file: Option<&Path>, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<Config> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))?
            }
            None => Config::default(),
        };
        if let Some(v) = env("CXMPUTE_LISTEN") {
            config.listen = v
                .parse()
                .with_context(|| format!("CXMPUTE_LISTEN: not an address: {v}"))?;
        }
        if let Some(v) = env("CXMPUTE_DATABASE_URL") {
            config.database_url = v;
        }
        if let Some(v) = env("CXMPUTE_ADMIN_TOKEN") {
            config.admin_token = Some(v);
        }
        if let Some(v) = env("CXMPUTE_MAX_BODY_BYTES") {
            config.max_body_bytes = v.parse().context("CXMPUTE_MAX_BODY_BYTES: not a number")?;
        }
        if let Some(v) = env("CXMPUTE_PUBLIC_URL") {
            config.web.public_url = Some(v);
        }
        if let Some(v) = env("CXMPUTE_ADMIN_EMAILS") {
            config.web.admin_emails = v
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
        }
        if let Some(v) = env("CXMPUTE_SMTP_PASSWORD") {
            if let Some(smtp) = config.web.smtp.as_mut() {
                smtp.password = Some(v);
            }
        }
        if let Some(v) = env("CXMPUTE_ALLOW_PRIVATE_DIRECT_URLS") {
            config.link.allow_private_direct_urls = matches!(v.as_str(), "1" | "true" | "yes");
        }
        for warning in prune_catalog_sources(&mut config.catalog) {
            tracing::warn!("{warning}");
        }
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.max_body_bytes >= 1024, "max_body_bytes must be at least 1024");
        anyhow::ensure!(
            self.link.ping_interval_ms >= 100,
            "link.ping_interval_ms must be at least 100"
        );
        if let Some(t) = &self.admin_token {
            anyhow::ensure!(t.len() >= 16, "admin_token must be at least 16 characters");
        }
        self.web.validate()?;
        let d = &self.device_login;
        anyhow::ensure!(
            d.code_ttl_secs >= 10 && d.poll_interval_secs >= 1,
            "device_login.code_ttl_secs must be at least 10 and poll_interval_secs at least 1"
        );
        anyhow::ensure!(
            d.codes_per_ip_per_hour >= 1 && d.link_attempts_per_hour >= 1,
            "device_login rate limits must be at least 1"
        );
        validate_catalog(&self.catalog)?;
        self.pricing.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_errors() {
        let err = toml::from_str::<Config>("listen = \"127.0.0.1:1\"\nlisten_port = 3").unwrap_err();
        assert!(err.to_string().contains("listen_port"), "{err}");
    }

    #[test]
    fn env_overrides_file_defaults_and_secrets_are_redacted() {
        let c = Config::load(None, |k| match k {
            "CXMPUTE_ADMIN_TOKEN" => Some("0123456789abcdef-secret".into()),
            "CXMPUTE_DATABASE_URL" => Some("postgres://u:pw@h/db".into()),
            _ => None,
        })
        .unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("secret") && !shown.contains("pw@"), "{shown}");
        assert_eq!(c.admin_token.as_deref(), Some("0123456789abcdef-secret"));
    }

    #[test]
    fn catalog_entries_replace_the_builtin_list() {
        assert_eq!(Config::default().catalog, default_catalog());
        let c: Config = toml::from_str(
            "[[catalog]]\nid = \"llama-3-8b\"\nservice = \"chat\"\nengine = \"llama\"\n\
             min_vram_mb = 6000\ndisk_mb = 4900\nsources = [\"hf:x/y/model.gguf\"]\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.catalog.len(), 1);
        assert_eq!((c.catalog[0].engine, c.catalog[0].min_ram_mb), (Engine::Llama, 0));
        assert!(toml::from_str::<Config>("[[catalog]]\nid = \"x\"\nservice = \"chat\"\nengine = \"vllm\"\n").is_err());
        assert!(toml::from_str::<Config>("[device_login]\npoll_interval_secs = 0\n")
            .unwrap()
            .validate()
            .is_err());
    }

    #[test]
    fn model_overrides_win() {
        let c: Config = toml::from_str("[pricing.models.big]\ninput = 10\noutput = 30\n").unwrap();
        assert_eq!(c.pricing.unit_prices(Service::Chat, "big"), (10, 30));
        assert_eq!(c.pricing.unit_prices(Service::Chat, "small"), (2_400, 2_400));
    }
}
