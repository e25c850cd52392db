//! Pages and JSON anyone may read, signed in or not: the network's state
//! (`/network`), the model catalog with prices (`/models`), and the banners.
//!
//! The statistics read today's usage from the store; they are cached for
//! [`STATS_TTL`] so that public traffic cannot turn into database load.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use cxmpute_store::{day_of, now_millis, NetworkUsage, Service};
use serde::Serialize;
use serde_json::{json, Value};

use super::html::{esc, page, respond, usd};
use super::PageError;
use crate::error::ApiError;
use crate::pools::NodePlacement;
use crate::state::AppState;

pub const STATS_TTL: Duration = Duration::from_secs(10);

/// Today's usage, read at most once per [`STATS_TTL`].
#[derive(Default)]
pub struct StatsCache(Mutex<Option<(Instant, String, NetworkUsage)>>);

#[derive(Debug, Serialize)]
pub struct PublicStats {
    /// Distinct devices with a live provision on this gateway.
    pub providers_online: usize,
    /// Providers by tier (`0`-`4`) and by region (`NL`, `NL · South
    /// Holland`) as nodes announce them; `unknown` for nodes that did not.
    pub providers_by_tier: BTreeMap<String, usize>,
    pub providers_by_region: BTreeMap<String, usize>,
    /// The same by tier and region together.
    pub providers_by_tier_and_region: Vec<PlacementCount>,
    pub models: Vec<PoolStats>,
    /// The UTC day the usage figures are for.
    pub day: String,
    pub requests_today: i64,
    pub errors_today: i64,
    pub average_latency_ms: Option<i64>,
    /// Completion tokens per second of successful chat requests today.
    pub chat_tokens_per_second: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct PlacementCount {
    pub tier: String,
    pub region: String,
    pub providers: usize,
}

#[derive(Debug, Serialize)]
pub struct PoolStats {
    pub service: Service,
    pub model: String,
    pub pool_size: usize,
}

pub async fn stats(state: &AppState) -> Result<PublicStats, ApiError> {
    let live = state.pools.all();
    // One entry per device: its provisions share one placement.
    let devices: BTreeMap<&str, &NodePlacement> = live
        .iter()
        .map(|p| (p.device_id.as_str(), p.placement.as_ref()))
        .collect();
    let online = devices.len();
    let mut by_tier = BTreeMap::new();
    let mut by_region = BTreeMap::new();
    let mut by_both: BTreeMap<(String, String), usize> = BTreeMap::new();
    for placement in devices.values() {
        let tier = placement.tier.map_or("unknown".to_string(), |t| t.to_string());
        let region = placement.region.clone().unwrap_or_else(|| "unknown".to_string());
        *by_tier.entry(tier.clone()).or_insert(0) += 1;
        *by_region.entry(region.clone()).or_insert(0) += 1;
        *by_both.entry((tier, region)).or_insert(0) += 1;
    }
    let today = day_of(now_millis());
    let usage = today_usage(state, &today).await?;
    Ok(PublicStats {
        providers_online: online,
        providers_by_tier: by_tier,
        providers_by_region: by_region,
        providers_by_tier_and_region: by_both
            .into_iter()
            .map(|((tier, region), providers)| PlacementCount {
                tier,
                region,
                providers,
            })
            .collect(),
        models: state
            .pools
            .summary()
            .into_iter()
            .map(|(service, model, pool_size)| PoolStats {
                service,
                model,
                pool_size,
            })
            .collect(),
        requests_today: usage.requests,
        errors_today: usage.errors,
        average_latency_ms: (usage.requests > 0).then(|| usage.latency_ms / usage.requests),
        chat_tokens_per_second: (usage.chat_latency_ms > 0)
            .then(|| (usage.chat_output_tokens as f64 * 1000.0 / usage.chat_latency_ms as f64 * 10.0).round() / 10.0),
        day: today,
    })
}

async fn today_usage(state: &AppState, today: &str) -> Result<NetworkUsage, ApiError> {
    let cache = &state.web.stats;
    if let Some((at, day, usage)) = cache.0.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
        if at.elapsed() < STATS_TTL && day == today {
            return Ok(*usage);
        }
    }
    let (start, _) = cxmpute_store::referrals::day_bounds(today).map_err(|_| ApiError::internal())?;
    let usage = state.store.network_usage(start).await?;
    *cache.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), today.to_string(), usage));
    Ok(usage)
}

/// `GET /web/api/public/stats`.
pub async fn api_stats(State(s): State<AppState>) -> Result<Json<PublicStats>, ApiError> {
    Ok(Json(stats(&s).await?))
}

#[derive(Debug, Serialize)]
pub struct CatalogEntry {
    pub service: Service,
    pub model: String,
    /// Live provisions on this gateway (0: known, but nobody serves it now).
    pub pool_size: usize,
    /// Credits (10⁻⁹ USD) per unit: token, character or page.
    pub input_price: i64,
    pub output_price: i64,
    pub unit: &'static str,
}

fn unit(service: Service) -> &'static str {
    match service {
        Service::Chat | Service::Embeddings => "token",
        Service::Speech => "character",
        Service::Scrape => "page",
    }
}

pub async fn catalog(state: &AppState) -> Result<Vec<CatalogEntry>, ApiError> {
    let pricing = state.pricing();
    let live: BTreeMap<(Service, String), usize> =
        state.pools.summary().into_iter().map(|(s, m, n)| ((s, m), n)).collect();
    let mut all: BTreeMap<(Service, String), usize> =
        state.store.known_models().await?.into_iter().map(|k| (k, 0)).collect();
    all.extend(live);
    Ok(all
        .into_iter()
        .map(|((service, model), pool_size)| {
            let (input_price, output_price) = pricing.unit_prices(service, &model);
            CatalogEntry {
                service,
                unit: unit(service),
                pool_size,
                input_price,
                output_price,
                model,
            }
        })
        .collect())
}

/// `GET /web/api/public/models`.
pub async fn api_models(State(s): State<AppState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        json!({ "pricing_version": s.pricing_version(), "data": catalog(&s).await? }),
    ))
}

/// `GET /web/api/public/banners`: the banners showing now.
pub async fn api_banners(State(s): State<AppState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "data": super::ops::live_banners(&s).await? })))
}

fn nav() -> &'static str {
    "<nav><a href=\"/network\">Network</a> · <a href=\"/models\">Models</a> · <a href=\"/app\">Dashboard</a></nav>"
}

/// `GET /network`.
pub async fn network_page(State(s): State<AppState>) -> Result<Response, PageError> {
    let st = stats(&s).await?;
    let mut body = super::app::banner_html(&s).await;
    body.push_str(&format!(
        "<h1>Network</h1><dl><dt>Providers online</dt><dd>{}</dd><dt>Requests today ({} UTC)</dt><dd>{}</dd>\
         <dt>Average latency today</dt><dd>{}</dd><dt>Chat speed today</dt><dd>{}</dd></dl>",
        st.providers_online,
        esc(&st.day),
        st.requests_today,
        st.average_latency_ms
            .map_or("no requests yet".into(), |v| format!("{v} ms")),
        st.chat_tokens_per_second
            .map_or("no chat requests yet".into(), |v| format!("{v} tokens/s")),
    ));
    body.push_str("<h2>Providers by tier and region</h2><table><thead><tr><th scope=\"col\">Tier</th><th scope=\"col\">Region</th><th scope=\"col\">Providers</th></tr></thead><tbody>");
    for row in &st.providers_by_tier_and_region {
        let tier = row
            .tier
            .parse::<usize>()
            .ok()
            .and_then(|t| {
                cxmpute_protocol::assign::TIER_NAMES
                    .get(t)
                    .map(|name| format!("{t} · {name}"))
            })
            .unwrap_or_else(|| row.tier.clone());
        body.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&tier),
            esc(&row.region),
            row.providers
        ));
    }
    body.push_str("</tbody></table><h2>Models online</h2>");
    if st.models.is_empty() {
        body.push_str("<p>No model is being served right now.</p>");
    } else {
        body.push_str("<table><thead><tr><th scope=\"col\">Service</th><th scope=\"col\">Model</th><th scope=\"col\">Providers</th></tr></thead><tbody>");
        for m in &st.models {
            body.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                m.service.as_str(),
                esc(&m.model),
                m.pool_size
            ));
        }
        body.push_str("</tbody></table>");
    }
    body.push_str("<p class=\"muted\">As JSON: <a href=\"/web/api/public/stats\">/web/api/public/stats</a></p>");
    Ok(respond(StatusCode::OK, page("Network", nav(), &body)))
}

/// `GET /models`.
pub async fn models_page(State(s): State<AppState>) -> Result<Response, PageError> {
    let entries = catalog(&s).await?;
    let mut body = super::app::banner_html(&s).await;
    body.push_str("<h1>Models</h1>");
    if entries.is_empty() {
        body.push_str("<p>No models yet.</p>");
    } else {
        body.push_str("<table><thead><tr><th scope=\"col\">Service</th><th scope=\"col\">Model</th><th scope=\"col\">Input price</th>\
                       <th scope=\"col\">Output price</th><th scope=\"col\">Providers online</th></tr></thead><tbody>");
        for e in &entries {
            let per = |price: i64| match e.unit {
                "token" => format!("{} per 1M tokens", usd(price.saturating_mul(1_000_000))),
                "character" => format!("{} per 1K characters", usd(price.saturating_mul(1_000))),
                _ => format!("{} per page", usd(price)),
            };
            body.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                e.service.as_str(),
                esc(&e.model),
                per(e.input_price),
                if e.service == Service::Chat {
                    per(e.output_price)
                } else {
                    "—".into()
                },
                e.pool_size
            ));
        }
        body.push_str("</tbody></table>");
    }
    body.push_str("<p class=\"muted\">As JSON: <a href=\"/web/api/public/models\">/web/api/public/models</a></p>");
    Ok(respond(StatusCode::OK, page("Models", nav(), &body)))
}
