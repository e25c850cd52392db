//! The provider page (`/app/provider`): the account's devices, what they
//! offer, whether they are online, and what they earned.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use cxmpute_store::{day_of, now_millis, ProviderDay};
use serde_json::{json, Value};

use super::app::require_page;
use super::charts::{bar_chart, days};
use super::html::{esc, page, respond, usd, when};
use super::session::{require_json, WebUser};
use super::PageError;
use crate::error::ApiError;
use crate::state::AppState;

const DAYS: i64 = 30;

/// Everything the page shows, as JSON.
async fn overview(state: &AppState, user: &WebUser) -> Result<Value, ApiError> {
    let account = &user.account.id;
    let devices = state.store.devices(account).await?;
    let stored = state.store.provisions().await?;
    let live = state.pools.all();
    let now = now_millis();
    let since = day_of(now - (DAYS - 1) * 86_400_000);
    let earned: Vec<ProviderDay> = state.store.provider_days(account, &since).await?;
    let (requests_all, reward_all) = state.store.provider_totals(account).await?;
    let today = day_of(now);
    let today_row = earned.iter().find(|d| d.day == today);
    let mut listed = Vec::with_capacity(devices.len());
    for d in &devices {
        let provisions: Vec<Value> = stored
            .iter()
            .filter(|p| p.device_id == d.id)
            .map(|p| {
                let online = live.iter().any(|l| l.id == p.id);
                json!({ "id": p.id, "service": p.service, "model": p.model, "mode": p.mode, "online": online })
            })
            .collect();
        // The hardware it reported and what the orchestrator assigned it.
        let assignment = state.store.assignment(&d.id).await?;
        let hardware = assignment
            .as_ref()
            .and_then(|a| serde_json::from_str::<Value>(&a.hardware).ok())
            .unwrap_or(Value::Null);
        let assigned: Vec<Value> = assignment
            .iter()
            .flat_map(|a| &a.models)
            .map(|(service, model)| json!({ "service": service, "model": model }))
            .collect();
        // Online since its current link (or registration) came up.
        let online_since = live.iter().filter(|l| l.device_id == d.id).map(|l| l.linked_at).min();
        listed.push(json!({
            "id": d.id, "name": d.name, "created_at": d.created_at, "last_seen_at": d.last_seen_at,
            "online": online_since.is_some(), "online_since": online_since,
            "uptime_secs": online_since.map(|t| (now - t).max(0) / 1000),
            "signed_out": d.access_key_hash.is_empty(),
            "hardware": hardware, "assigned": assigned, "provisions": provisions,
        }));
    }
    let devices = listed;
    Ok(json!({
        "devices": devices,
        "earnings": {
            "today": today_row.map_or(0, |d| d.reward),
            "last_30_days": earned.iter().map(|d| d.reward).sum::<i64>(),
            "all_time": reward_all,
        },
        "requests_served": {
            "today": today_row.map_or(0, |d| d.requests),
            "last_30_days": earned.iter().map(|d| d.requests).sum::<i64>(),
            "all_time": requests_all,
        },
        "by_day": earned,
    }))
}

/// `GET /web/api/provider`.
pub async fn api(State(s): State<AppState>, h: HeaderMap) -> Result<Json<Value>, ApiError> {
    let user = require_json(&s, &h).await?;
    Ok(Json(overview(&s, &user).await?))
}

/// `GET /app/provider`.
pub async fn page_handler(State(s): State<AppState>, headers: HeaderMap) -> Result<Response, PageError> {
    let user = match require_page(&s, &headers).await? {
        Ok(user) => user,
        Err(res) => return Ok(res),
    };
    let o = overview(&s, &user).await?;
    let num = |v: &Value| v.as_i64().unwrap_or(0);
    let mut body = super::app::banner_html(&s).await;
    body.push_str(&format!(
        "<h1>Provider</h1><table><caption>Earnings and requests served by your devices</caption><thead><tr><th scope=\"col\"></th>\
         <th scope=\"col\">Today (UTC)</th><th scope=\"col\">Last 30 days</th><th scope=\"col\">All time</th></tr></thead><tbody>\
         <tr><th scope=\"row\">Earned</th><td>{}</td><td>{}</td><td>{}</td></tr>\
         <tr><th scope=\"row\">Requests served</th><td>{}</td><td>{}</td><td>{}</td></tr></tbody></table>",
        usd(num(&o["earnings"]["today"])),
        usd(num(&o["earnings"]["last_30_days"])),
        usd(num(&o["earnings"]["all_time"])),
        num(&o["requests_served"]["today"]),
        num(&o["requests_served"]["last_30_days"]),
        num(&o["requests_served"]["all_time"]),
    ));
    let by_day: BTreeMap<String, i64> = o["by_day"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| Some((d["day"].as_str()?.to_string(), d["reward"].as_i64()?)))
        .collect();
    let bars = days(now_millis(), DAYS, &by_day);
    body.push_str("<h2>Earnings by day</h2>");
    body.push_str(&bar_chart("earn", "Earnings per day, last 30 days (UTC)", &bars, usd));
    body.push_str("<details><summary>Earnings by day as a table</summary><table><thead><tr><th scope=\"col\">Day</th><th scope=\"col\">Earned</th></tr></thead><tbody>");
    for (day, v) in bars.iter().rev() {
        body.push_str(&format!("<tr><td>{}</td><td>{}</td></tr>", esc(day), usd(*v)));
    }
    body.push_str("</tbody></table></details><h2>Devices</h2>");
    let devices = o["devices"].as_array().cloned().unwrap_or_default();
    if devices.is_empty() {
        body.push_str(
            "<p>No devices yet. An operator creates a device credential for your account; see docs/provider.md.</p>",
        );
    }
    for d in &devices {
        body.push_str(&format!(
            "<h3>{name} <span class=\"muted secret\">{id}</span></h3><p>{state}; last seen {seen}.</p>",
            name = esc(d["name"].as_str().unwrap_or("")),
            id = esc(d["id"].as_str().unwrap_or("")),
            state = if d["signed_out"].as_bool().unwrap_or(false) {
                "signed out (its credential was revoked)".to_string()
            } else if let Some(up) = d["uptime_secs"].as_i64() {
                format!("<strong>online</strong> for {}", uptime(up))
            } else {
                "offline".to_string()
            },
            seen = d["last_seen_at"].as_i64().map_or("never".into(), when),
        ));
        body.push_str(&hardware_line(&d["hardware"], &d["assigned"]));
        let provisions = d["provisions"].as_array().cloned().unwrap_or_default();
        if !provisions.is_empty() {
            body.push_str("<table><thead><tr><th scope=\"col\">Service</th><th scope=\"col\">Model</th><th scope=\"col\">Mode</th><th scope=\"col\">State</th></tr></thead><tbody>");
            for p in &provisions {
                body.push_str(&format!(
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(p["service"].as_str().unwrap_or("")),
                    esc(p["model"].as_str().unwrap_or("")),
                    esc(p["mode"].as_str().unwrap_or("")),
                    if p["online"].as_bool().unwrap_or(false) {
                        "online"
                    } else {
                        "offline"
                    },
                ));
            }
            body.push_str("</tbody></table>");
        }
    }
    let header = "<nav><a href=\"/app\">Dashboard</a> · <a href=\"/app/provider\">Provider</a></nav>";
    Ok(respond(StatusCode::OK, page("Provider", header, &body)))
}

/// "Tier 2 (Blue Surf) · 8 GiB GPU · 32 GiB RAM · …; assigned: chat gemma-3-270m, …"
fn hardware_line(hw: &Value, assigned: &Value) -> String {
    if hw.is_null() {
        return "<p class=\"muted\">No hardware report yet (sent when the node starts).</p>".into();
    }
    use cxmpute_protocol::assign::TIER_NAMES as TIERS;
    let tier = hw["tier"].as_u64().unwrap_or(0) as usize;
    let mut parts = vec![format!(
        "Tier {tier} ({})",
        TIERS.get(tier).copied().unwrap_or("unknown")
    )];
    let gib = |mb: u64| format!("{:.1} GiB", mb as f64 / 1024.0);
    if let Some(v) = hw["vram_mb"].as_u64() {
        parts.push(format!("{} GPU memory", gib(v)));
    }
    if let Some(v) = hw["ram_mb"].as_u64() {
        parts.push(format!("{} RAM", gib(v)));
    }
    if let Some(v) = hw["cpu_threads"].as_u64() {
        parts.push(format!("{v} CPU threads"));
    }
    if let Some(v) = hw["free_disk_mb"].as_u64() {
        parts.push(format!("{} free disk", gib(v)));
    }
    if let Some(os) = hw["os"].as_str() {
        parts.push(os.to_string());
    }
    let assigned: Vec<String> = assigned
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            format!(
                "{} {}",
                a["service"].as_str().unwrap_or(""),
                a["model"].as_str().unwrap_or("")
            )
        })
        .collect();
    format!(
        "<p>{}.<br>Assigned: {}.</p>",
        esc(&parts.join(" · ")),
        if assigned.is_empty() {
            "nothing from the catalog".to_string()
        } else {
            esc(&assigned.join(", "))
        }
    )
}

/// "3 d 4 h", "2 h 5 min", "12 min", "40 s".
fn uptime(secs: i64) -> String {
    let (d, h, m) = (secs / 86_400, secs % 86_400 / 3_600, secs % 3_600 / 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{secs} s"),
        (0, 0, m) => format!("{m} min"),
        (0, h, m) => format!("{h} h {m} min"),
        (d, h, _) => format!("{d} d {h} h"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn uptimes_read_naturally() {
        assert_eq!(super::uptime(40), "40 s");
        assert_eq!(super::uptime(12 * 60 + 5), "12 min");
        assert_eq!(super::uptime(2 * 3_600 + 5 * 60), "2 h 5 min");
        assert_eq!(super::uptime(3 * 86_400 + 4 * 3_600 + 59), "3 d 4 h");
    }
}
