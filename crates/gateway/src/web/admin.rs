//! The operator's pages under `/admin` and their JSON routes under
//! `/web/api/admin/…`, for accounts whose email is in `web.admin_emails`.
//!
//! Who may: anonymous visitors of a page go to the login (JSON: 401),
//! suspended accounts get 403, signed-in accounts that are not
//! administrators get 403 (`not_admin`) — the same convention as the rest of
//! the web side. Every change is logged with the administrator's email; credit
//! changes also carry it in the ledger note.

use std::collections::BTreeMap;

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use cxmpute_protocol::parse::parse_json;
use cxmpute_store::{now_millis, Account, BannerLevel, NewBanner};
use serde::Deserialize;
use serde_json::{json, Value};

use super::app::{require_form, require_page};
use super::html::{esc, message_page, page, respond, usd, when};
use super::ops::{self, CreditKind};
use super::session::{require_json, require_json_csrf, Role, WebUser, CSRF_FIELD};
use super::{Form, PageError};
use crate::config::{ModelPrice, Pricing};
use crate::error::ApiError;
use crate::state::AppState;

const LIST: i64 = 50;

fn not_admin() -> ApiError {
    ApiError::forbidden("not_admin", "This route is for administrators.")
}

fn admin_email(user: &WebUser) -> String {
    user.account.email.clone().unwrap_or_else(|| user.account.id.clone())
}

pub async fn require_admin_json(state: &AppState, headers: &HeaderMap) -> Result<WebUser, ApiError> {
    let user = require_json(state, headers).await?;
    (user.role == Role::Admin).then_some(user).ok_or_else(not_admin)
}

async fn require_admin_json_csrf(state: &AppState, headers: &HeaderMap) -> Result<WebUser, ApiError> {
    let user = require_json_csrf(state, headers).await?;
    (user.role == Role::Admin).then_some(user).ok_or_else(not_admin)
}

fn forbidden_page() -> Response {
    message_page(
        StatusCode::FORBIDDEN,
        "Administrators only",
        "This page is for the operators of this network.",
        ("/app", "Back to the dashboard"),
    )
}

async fn admin_page(state: &AppState, headers: &HeaderMap) -> Result<Result<WebUser, Response>, PageError> {
    Ok(match require_page(state, headers).await? {
        Ok(user) if user.role == Role::Admin => Ok(user),
        Ok(_) => Err(forbidden_page()),
        Err(res) => Err(res),
    })
}

async fn admin_form(
    state: &AppState,
    headers: &HeaderMap,
    form: &Form,
) -> Result<Result<WebUser, Response>, PageError> {
    Ok(match require_form(state, headers, form).await? {
        Ok(user) if user.role == Role::Admin => Ok(user),
        Ok(_) => Err(forbidden_page()),
        Err(res) => Err(res),
    })
}

/// 303 to a page built from ids (escaped for the header by construction:
/// ids are validated to be plain ASCII before they get here).
fn see_other(to: &str) -> Response {
    match HeaderValue::from_str(to) {
        Ok(v) => (StatusCode::SEE_OTHER, [(header::LOCATION, v)]).into_response(),
        Err(_) => super::session::redirect("/admin"),
    }
}

/// A refused form: the message and a way back.
fn refused(e: ApiError, back: &str) -> Response {
    message_page(e.status, "Not done", &e.message, (back, "Back"))
}

fn query_param(raw: &Option<String>, name: &str) -> Option<String> {
    raw.as_deref().and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    })
}

/// Signed dollars → credits: `-2.5` is −2,500,000,000.
pub fn parse_signed_usd(text: &str) -> Option<i64> {
    let text = text.trim();
    match text.strip_prefix('-') {
        Some(rest) => super::app::parse_usd(rest).map(|v| -v),
        None => super::app::parse_usd(text.strip_prefix('+').unwrap_or(text)),
    }
}

/// `YYYY-MM-DDTHH:MM` or `YYYY-MM-DD HH:MM` (UTC, as a `datetime-local`
/// field sends it) → milliseconds.
pub fn parse_utc_minute(text: &str) -> Option<i64> {
    let text = text.trim();
    let (day, time) = text.split_once(['T', ' ']).unwrap_or((text, "00:00"));
    let (start, _) = cxmpute_store::referrals::day_bounds(day).ok()?;
    let (h, m) = time.split_once(':')?;
    let (h, m): (i64, i64) = (h.parse().ok()?, m.get(..2)?.parse().ok()?);
    ((0..24).contains(&h) && (0..60).contains(&m)).then_some(start + h * 3_600_000 + m * 60_000)
}

// ---- pages ---------------------------------------------------------------

/// `GET /admin`: search, prices, live provisions, banners, referral payouts.
pub async fn home(State(s): State<AppState>, headers: HeaderMap, RawQuery(q): RawQuery) -> Result<Response, PageError> {
    let user = match admin_page(&s, &headers).await? {
        Ok(user) => user,
        Err(res) => return Ok(res),
    };
    let csrf = esc(&user.csrf);
    let query = query_param(&q, "q").unwrap_or_default();
    let accounts = if query.trim().is_empty() {
        let mut all = s.store.list_accounts().await?;
        all.reverse();
        all.truncate(LIST as usize);
        all
    } else {
        s.store.search_accounts(&query, LIST).await?
    };
    let mut body = super::app::banner_html(&s).await;
    body.push_str("<h1>Administration</h1><h2 id=\"accounts\">Accounts</h2>");
    body.push_str(&format!(
        "<form method=\"get\" action=\"/admin\" role=\"search\"><label for=\"q\">Email, name or account id</label>\
         <input id=\"q\" name=\"q\" type=\"text\" value=\"{}\"><div><button type=\"submit\">Search</button></div></form>",
        esc(&query)
    ));
    body.push_str(&accounts_table(&accounts));
    body.push_str(&pricing_section(&s, &csrf).await?);
    body.push_str(&provisions_section(&s, &csrf).await?);
    body.push_str(&banners_section(&s, &csrf).await?);
    body.push_str(&format!(
        "<h2 id=\"referrals\">Referral payouts</h2><p>Payouts run every {} s for the last {} finished days; \
         a day already paid is not paid again.</p>\
         <form method=\"post\" action=\"/admin/referrals/run\"><input type=\"hidden\" name=\"{CSRF_FIELD}\" value=\"{csrf}\">\
         <label for=\"ref-day\">Day (UTC, empty: the last finished days)</label><input id=\"ref-day\" name=\"day\" type=\"text\" placeholder=\"YYYY-MM-DD\">\
         <div><button type=\"submit\">Run payouts now</button></div></form>",
        s.config.web.referrals.payout_interval_secs, s.config.web.referrals.payout_days_back
    ));
    Ok(respond(StatusCode::OK, page("Administration", &header(&user), &body)))
}

fn header(user: &WebUser) -> String {
    format!(
        "<nav><a href=\"/app\">Dashboard</a> · <a href=\"/admin\">Admin</a> · <span class=\"muted\">{}</span></nav>",
        esc(&admin_email(user))
    )
}

fn accounts_table(accounts: &[Account]) -> String {
    if accounts.is_empty() {
        return "<p>No accounts found.</p>".into();
    }
    let mut html = String::from(
        "<table><thead><tr><th scope=\"col\">Account</th><th scope=\"col\">Email</th><th scope=\"col\">Balance</th>\
         <th scope=\"col\">State</th><th scope=\"col\">Created (UTC)</th></tr></thead><tbody>",
    );
    for a in accounts {
        html.push_str(&format!(
            "<tr><td><a href=\"/admin/users/{id}\">{name}</a> <span class=\"muted secret\">{id}</span></td><td>{email}</td>\
             <td>{bal}</td><td>{state}</td><td>{created}</td></tr>",
            id = esc(&a.id),
            name = esc(&a.name),
            email = esc(a.email.as_deref().unwrap_or("")),
            bal = usd(a.balance),
            state = if a.suspended { "suspended" } else { "active" },
            created = when(a.created_at),
        ));
    }
    html + "</tbody></table>"
}

async fn pricing_section(s: &AppState, csrf: &str) -> Result<String, PageError> {
    let p = s.pricing();
    let history = s.store.pricing_versions(10).await?;
    let models: String = p
        .models
        .iter()
        .map(|(m, price)| match price.output {
            Some(out) => format!("{m} {} {out}\n", price.input),
            None => format!("{m} {}\n", price.input),
        })
        .collect();
    let field = |name: &str, label: &str, value: i64| {
        format!(
            "<label for=\"p-{name}\">{label}</label><input id=\"p-{name}\" name=\"{name}\" type=\"number\" min=\"0\" value=\"{value}\">"
        )
    };
    let mut html = format!(
        "<h2 id=\"pricing\">Prices</h2><p>Version <strong>{v}</strong>{src}. Prices are credits per unit (1 credit = 10⁻⁹ USD). \
         Each change is stored as a new version.</p>\
         <form method=\"post\" action=\"/admin/pricing\"><input type=\"hidden\" name=\"{CSRF_FIELD}\" value=\"{csrf}\">",
        v = s.pricing_version(),
        src = if s.pricing_version() == 0 { " (from the configuration file)" } else { "" },
    );
    html.push_str(&field("chat_input", "Chat, per prompt token", p.chat_input));
    html.push_str(&field("chat_output", "Chat, per completion token", p.chat_output));
    html.push_str(&field(
        "embeddings_input",
        "Embeddings, per input token",
        p.embeddings_input,
    ));
    html.push_str(&field("speech_character", "Speech, per character", p.speech_character));
    html.push_str(&field("scrape_page", "Scrape, per page", p.scrape_page));
    html.push_str(&field(
        "reward_share_percent",
        "Provider share of each charge (percent)",
        i64::from(p.reward_share_percent),
    ));
    html.push_str(&field(
        "default_max_tokens",
        "Completion budget held when a request names none",
        i64::from(p.default_max_tokens),
    ));
    html.push_str(&format!(
        "<label for=\"p-models\">Per-model prices: one per line, <code>model input [output]</code></label>\
         <textarea id=\"p-models\" name=\"models\" rows=\"4\" cols=\"60\">{}</textarea>\
         <div><button type=\"submit\">Save as a new version</button></div></form>",
        esc(&models)
    ));
    if !history.is_empty() {
        html.push_str("<table><caption>Recent versions</caption><thead><tr><th scope=\"col\">Version</th><th scope=\"col\">By</th><th scope=\"col\">When (UTC)</th></tr></thead><tbody>");
        for v in &history {
            html.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                v.version,
                esc(&v.created_by),
                when(v.created_at)
            ));
        }
        html.push_str("</tbody></table>");
    }
    Ok(html)
}

async fn provisions_section(s: &AppState, csrf: &str) -> Result<String, PageError> {
    let mut live = s.pools.all();
    live.sort_by(|a, b| (&a.device_id, a.service, &a.model).cmp(&(&b.device_id, b.service, &b.model)));
    let mut html = String::from("<h2 id=\"provisions\">Live provisions</h2>");
    if live.is_empty() {
        return Ok(html + "<p>No provider is connected to this gateway.</p>");
    }
    html.push_str(
        "<table><thead><tr><th scope=\"col\">Device</th><th scope=\"col\">Account</th><th scope=\"col\">Service</th>\
         <th scope=\"col\">Model</th><th scope=\"col\">Mode</th><th scope=\"col\">In flight</th><th scope=\"col\">Action</th></tr></thead><tbody>",
    );
    for p in &live {
        html.push_str(&format!(
            "<tr><td class=\"secret\">{dev}</td><td><a href=\"/admin/users/{acc}\">{acc}</a></td><td>{svc}</td><td>{model}</td><td>{mode}</td><td>{n}</td>\
             <td><form method=\"post\" action=\"/admin/devices/{dev}/disconnect\"><input type=\"hidden\" name=\"{CSRF_FIELD}\" value=\"{csrf}\">\
             <button class=\"link\" type=\"submit\" aria-label=\"Disconnect device {dev}\">Disconnect</button></form></td></tr>",
            dev = esc(&p.device_id),
            acc = esc(&p.account_id),
            svc = p.service.as_str(),
            model = esc(&p.model),
            mode = p.transport.mode(),
            n = p.in_flight(),
        ));
    }
    Ok(html + "</tbody></table>")
}

async fn banners_section(s: &AppState, csrf: &str) -> Result<String, PageError> {
    let banners = s.store.banners_from(now_millis()).await?;
    let mut html = String::from("<h2 id=\"banners\">Banners</h2>");
    if banners.is_empty() {
        html.push_str("<p>No current or scheduled banners.</p>");
    } else {
        html.push_str("<table><thead><tr><th scope=\"col\">Message</th><th scope=\"col\">Level</th><th scope=\"col\">From (UTC)</th><th scope=\"col\">Until (UTC)</th><th scope=\"col\">Action</th></tr></thead><tbody>");
        for b in &banners {
            html.push_str(&format!(
                "<tr><td>{msg}</td><td>{lvl}</td><td>{from}</td><td>{until}</td><td><form method=\"post\" action=\"/admin/banners/{id}/delete\">\
                 <input type=\"hidden\" name=\"{CSRF_FIELD}\" value=\"{csrf}\"><button class=\"link\" type=\"submit\">Delete</button></form></td></tr>",
                msg = esc(&b.message),
                lvl = b.level.as_str(),
                from = when(b.starts_at),
                until = when(b.ends_at),
                id = esc(&b.id),
            ));
        }
        html.push_str("</tbody></table>");
    }
    html.push_str(&format!(
        "<h3>New banner</h3><form method=\"post\" action=\"/admin/banners\"><input type=\"hidden\" name=\"{CSRF_FIELD}\" value=\"{csrf}\">\
         <label for=\"b-msg\">Message</label><input id=\"b-msg\" name=\"message\" type=\"text\" maxlength=\"500\" required>\
         <label for=\"b-level\">Level</label><select id=\"b-level\" name=\"level\"><option>info</option><option>warning</option><option>critical</option></select>\
         <label for=\"b-start\">Starts (UTC, empty: now)</label><input id=\"b-start\" name=\"starts\" type=\"datetime-local\">\
         <label for=\"b-end\">Ends (UTC)</label><input id=\"b-end\" name=\"ends\" type=\"datetime-local\" required>\
         <div><button type=\"submit\">Add banner</button></div></form>"
    ));
    Ok(html)
}

/// `GET /admin/users/{id}`.
pub async fn user_page(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, PageError> {
    let user = match admin_page(&s, &headers).await? {
        Ok(user) => user,
        Err(res) => return Ok(res),
    };
    let a = ops::account(&s, &id).await?;
    let csrf = esc(&user.csrf);
    let ledger = s.store.ledger(&a.id, LIST).await?;
    let keys = s.store.api_keys(&a.id).await?;
    let devices = s.store.devices(&a.id).await?;
    let referrer = s.store.referrer_of(&a.id).await?;
    let id = esc(&a.id);
    let mut body = format!(
        "<p><a href=\"/admin\">← Administration</a></p><h1>{name}</h1><dl>\
         <dt>Id</dt><dd class=\"secret\">{id}</dd><dt>Email</dt><dd>{email}</dd><dt>Balance</dt><dd>{bal} ({credits} credits)</dd>\
         <dt>State</dt><dd>{state}</dd><dt>Referred by</dt><dd>{referrer}</dd><dt>Created (UTC)</dt><dd>{created}</dd></dl>",
        name = esc(&a.name),
        email = esc(a.email.as_deref().unwrap_or("none")),
        bal = usd(a.balance),
        credits = a.balance,
        state = if a.suspended {
            format!("suspended: {}", esc(a.suspended_reason.as_deref().unwrap_or("")))
        } else {
            "active".into()
        },
        referrer = referrer.map_or("nobody".to_string(), |r| format!("<a href=\"/admin/users/{0}\">{0}</a>", esc(&r))),
        created = when(a.created_at),
    );
    body.push_str(&format!(
        "<h2>Credits</h2><form method=\"post\" action=\"/admin/users/{id}/credits\"><input type=\"hidden\" name=\"{CSRF_FIELD}\" value=\"{csrf}\">\
         <fieldset><legend>Kind</legend><input type=\"radio\" id=\"k-dep\" name=\"kind\" value=\"deposit\" checked> <label for=\"k-dep\">deposit (a payment received)</label>\
         <input type=\"radio\" id=\"k-adj\" name=\"kind\" value=\"adjust\"> <label for=\"k-adj\">adjustment (either way; the balance may not go below zero)</label></fieldset>\
         <label for=\"c-amount\">Amount in USD (negative to take credits away)</label><input id=\"c-amount\" name=\"amount_usd\" type=\"text\" inputmode=\"decimal\" required>\
         <label for=\"c-reason\">Reason (recorded in the ledger with your email)</label><input id=\"c-reason\" name=\"reason\" type=\"text\" maxlength=\"500\" required>\
         <div><button type=\"submit\">Record</button></div></form>"
    ));
    let (action, verb) = if a.suspended {
        ("unsuspend", "Lift the suspension")
    } else {
        ("suspend", "Suspend: keys, web login and devices stop at once")
    };
    body.push_str(&format!(
        "<h2>Suspension</h2><form method=\"post\" action=\"/admin/users/{id}/{action}\"><input type=\"hidden\" name=\"{CSRF_FIELD}\" value=\"{csrf}\">\
         <label for=\"s-reason\">Reason</label><input id=\"s-reason\" name=\"reason\" type=\"text\" maxlength=\"500\" required>\
         <div><button type=\"submit\">{verb}</button></div></form>"
    ));
    body.push_str(&format!(
        "<h2>API keys</h2><p>{} keys, {} active.</p>",
        keys.len(),
        keys.iter().filter(|k| k.revoked_at.is_none()).count()
    ));
    body.push_str("<h2>Devices</h2>");
    if devices.is_empty() {
        body.push_str("<p>No devices.</p>");
    } else {
        body.push_str("<table><thead><tr><th scope=\"col\">Device</th><th scope=\"col\">Name</th><th scope=\"col\">Last seen (UTC)</th><th scope=\"col\">Action</th></tr></thead><tbody>");
        for d in &devices {
            body.push_str(&format!(
                "<tr><td class=\"secret\">{dev}</td><td>{name}</td><td>{seen}</td><td><form method=\"post\" action=\"/admin/devices/{dev}/disconnect\">\
                 <input type=\"hidden\" name=\"{CSRF_FIELD}\" value=\"{csrf}\"><button class=\"link\" type=\"submit\" aria-label=\"Disconnect device {dev}\">Disconnect</button></form></td></tr>",
                dev = esc(&d.id),
                name = esc(&d.name),
                seen = d.last_seen_at.map_or("never".into(), when),
            ));
        }
        body.push_str("</tbody></table>");
    }
    body.push_str("<h2>Ledger</h2><table><thead><tr><th scope=\"col\">When (UTC)</th><th scope=\"col\">Kind</th><th scope=\"col\">Amount</th><th scope=\"col\">Note</th></tr></thead><tbody>");
    for e in &ledger {
        body.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            when(e.created_at),
            e.kind.as_str(),
            usd(e.amount),
            esc(e.note.as_deref().or(e.request_id.as_deref()).unwrap_or(""))
        ));
    }
    body.push_str("</tbody></table>");
    Ok(respond(StatusCode::OK, page(&a.name, &header(&user), &body)))
}

/// A page form's fields, checked for an administrator and the CSRF token.
macro_rules! admin_form {
    ($s:expr, $headers:expr, $body:expr) => {{
        let form = Form::parse(&$body);
        match admin_form(&$s, &$headers, &form).await? {
            Ok(user) => (user, form),
            Err(res) => return Ok(res),
        }
    }};
}

/// `POST /admin/users/{id}/credits`: `kind`, `amount_usd`, `reason`.
pub async fn credits_form(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, PageError> {
    let (user, form) = admin_form!(s, headers, body);
    let back = format!("/admin/users/{id}");
    let kind = match form.get("kind") {
        Some("deposit") => CreditKind::Deposit,
        Some("adjust") => CreditKind::Adjust,
        _ => return Ok(refused(ApiError::bad_request("Choose deposit or adjustment."), &back)),
    };
    let Some(amount) = form.get("amount_usd").and_then(parse_signed_usd) else {
        return Ok(refused(
            ApiError::bad_request("The amount is a dollar amount, e.g. 5 or -0.25."),
            &back,
        ));
    };
    let reason = form.get("reason").unwrap_or("");
    match ops::credit(&s, &admin_email(&user), &id, kind, amount, reason).await {
        Ok(_) => Ok(see_other(&back)),
        Err(e) if e.status.is_client_error() => Ok(refused(e, &back)),
        Err(e) => Err(e.into()),
    }
}

/// `POST /admin/users/{id}/suspend` and `…/unsuspend`: `reason`.
pub async fn suspend_form(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, PageError> {
    suspension_form(s, headers, id, body, true).await
}

pub async fn unsuspend_form(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, PageError> {
    suspension_form(s, headers, id, body, false).await
}

async fn suspension_form(
    s: AppState,
    headers: HeaderMap,
    id: String,
    body: Bytes,
    on: bool,
) -> Result<Response, PageError> {
    let (user, form) = admin_form!(s, headers, body);
    let back = format!("/admin/users/{id}");
    match suspend(&s, &user, &id, form.get("reason").unwrap_or(""), on).await {
        Ok(()) => Ok(see_other(&back)),
        Err(e) if e.status.is_client_error() => Ok(refused(e, &back)),
        Err(e) => Err(e.into()),
    }
}

async fn suspend(s: &AppState, user: &WebUser, id: &str, reason: &str, on: bool) -> Result<(), ApiError> {
    let reason = ops::check_reason(reason)?;
    let admin = admin_email(user);
    if on && id == user.account.id {
        return Err(ApiError::bad_request(
            "Administrators cannot suspend their own account.",
        ));
    }
    let stored = format!("{reason} (by {admin})");
    ops::set_suspended(s, id, on.then_some(stored.as_str())).await?;
    tracing::info!(account = %id, admin, reason, suspended = on, "suspension changed by an administrator");
    Ok(())
}

/// `POST /admin/pricing`: the whole table from the form.
pub async fn pricing_form(State(s): State<AppState>, headers: HeaderMap, body: Bytes) -> Result<Response, PageError> {
    let (user, form) = admin_form!(s, headers, body);
    let pricing = match pricing_from_form(&form, s.pricing().as_ref()) {
        Ok(p) => p,
        Err(m) => return Ok(refused(ApiError::bad_request(m), "/admin#pricing")),
    };
    match ops::change_pricing(&s, &admin_email(&user), pricing).await {
        Ok(_) => Ok(see_other("/admin#pricing")),
        Err(e) if e.status.is_client_error() => Ok(refused(e, "/admin#pricing")),
        Err(e) => Err(e.into()),
    }
}

fn pricing_from_form(form: &Form, current: &Pricing) -> Result<Pricing, String> {
    let num = |name: &str, current: i64| -> Result<i64, String> {
        match form.get(name).map(str::trim).filter(|v| !v.is_empty()) {
            None => Ok(current),
            Some(v) => v
                .parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or(format!("'{name}' must be a whole number of credits, 0 or more")),
        }
    };
    let share = num("reward_share_percent", i64::from(current.reward_share_percent))?;
    let max_tokens = num("default_max_tokens", i64::from(current.default_max_tokens))?;
    let mut models = BTreeMap::new();
    for (n, line) in form.get("models").unwrap_or("").lines().enumerate() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let bad = || {
            format!(
                "per-model price line {}: write 'model input [output]' with whole credits",
                n + 1
            )
        };
        let price = |s: &str| s.parse::<i64>().ok().filter(|v| *v >= 0);
        match parts.as_slice() {
            [] => {}
            [model, input] => {
                models.insert(
                    model.to_string(),
                    ModelPrice {
                        input: price(input).ok_or_else(bad)?,
                        output: None,
                    },
                );
            }
            [model, input, output] => {
                models.insert(
                    model.to_string(),
                    ModelPrice {
                        input: price(input).ok_or_else(bad)?,
                        output: Some(price(output).ok_or_else(bad)?),
                    },
                );
            }
            _ => return Err(bad()),
        }
    }
    Ok(Pricing {
        chat_input: num("chat_input", current.chat_input)?,
        chat_output: num("chat_output", current.chat_output)?,
        embeddings_input: num("embeddings_input", current.embeddings_input)?,
        speech_character: num("speech_character", current.speech_character)?,
        scrape_page: num("scrape_page", current.scrape_page)?,
        reward_share_percent: u8::try_from(share)
            .ok()
            .filter(|p| *p <= 100)
            .ok_or("the provider share is 0-100 percent")?,
        default_max_tokens: u32::try_from(max_tokens)
            .ok()
            .filter(|n| *n >= 1)
            .ok_or("the completion budget is at least 1 token")?,
        models,
    })
}

/// `POST /admin/devices/{id}/disconnect`.
pub async fn disconnect_form(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, PageError> {
    let (user, _) = admin_form!(s, headers, body);
    match disconnect(&s, &user, &id).await {
        Ok(_) => Ok(see_other("/admin#provisions")),
        Err(e) if e.status.is_client_error() => Ok(refused(e, "/admin#provisions")),
        Err(e) => Err(e.into()),
    }
}

async fn disconnect(s: &AppState, user: &WebUser, device_id: &str) -> Result<(usize, usize), ApiError> {
    if s.store.device(device_id).await?.is_none() {
        return Err(ApiError::not_found(format!("no device '{device_id}'")));
    }
    let done = ops::disconnect_device(s, device_id).await?;
    tracing::info!(device = %device_id, admin = %admin_email(user), "disconnect requested by an administrator");
    Ok(done)
}

/// `POST /admin/banners`: `message`, `level`, `starts`, `ends`.
pub async fn banner_form(State(s): State<AppState>, headers: HeaderMap, body: Bytes) -> Result<Response, PageError> {
    let (user, form) = admin_form!(s, headers, body);
    let starts = match form.get("starts").map(str::trim).filter(|v| !v.is_empty()) {
        None => Some(now_millis()),
        Some(v) => parse_utc_minute(v),
    };
    let ends = form.get("ends").and_then(parse_utc_minute);
    let (Some(starts_at), Some(ends_at)) = (starts, ends) else {
        return Ok(refused(
            ApiError::bad_request("Start and end are UTC times like 2026-12-24T18:00."),
            "/admin#banners",
        ));
    };
    let req = BannerRequest {
        message: form.get("message").unwrap_or("").to_string(),
        level: form.get("level").unwrap_or("info").to_string(),
        starts_at: Some(starts_at),
        ends_at,
    };
    match create_banner(&s, &user, req).await {
        Ok(_) => Ok(see_other("/admin#banners")),
        Err(e) if e.status.is_client_error() => Ok(refused(e, "/admin#banners")),
        Err(e) => Err(e.into()),
    }
}

/// `POST /admin/banners/{id}/delete`.
pub async fn banner_delete_form(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, PageError> {
    let _ = admin_form!(s, headers, body);
    if !s.store.delete_banner(&id).await? {
        return Ok(refused(
            ApiError::not_found(format!("no banner '{id}'")),
            "/admin#banners",
        ));
    }
    Ok(see_other("/admin#banners"))
}

/// `POST /admin/referrals/run`: `day` (optional).
pub async fn referrals_form(State(s): State<AppState>, headers: HeaderMap, body: Bytes) -> Result<Response, PageError> {
    let (_, form) = admin_form!(s, headers, body);
    let day = form.get("day").map(str::trim).filter(|d| !d.is_empty());
    match ops::pay_referrals(&s, day).await {
        Ok(runs) => {
            let paid: u64 = runs.iter().map(|r| r.paid).sum();
            let credits: i64 = runs.iter().map(|r| r.credits).sum();
            Ok(respond(
                StatusCode::OK,
                page(
                    "Referral payouts",
                    "",
                    &format!(
                        "<h1>Referral payouts</h1><p class=\"msg ok\" role=\"status\">{paid} payouts made, {} in total, over {} days.</p><p><a href=\"/admin#referrals\">Back</a></p>",
                        usd(credits),
                        runs.len()
                    ),
                ),
            ))
        }
        Err(e) if e.status.is_client_error() => Ok(refused(e, "/admin#referrals")),
        Err(e) => Err(e.into()),
    }
}

// ---- JSON ----------------------------------------------------------------

/// `GET /web/api/admin/accounts?q=…`: all accounts, or those matching `q`.
pub async fn api_accounts(
    State(s): State<AppState>,
    h: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    require_admin_json(&s, &h).await?;
    let data = match query_param(&q, "q").filter(|q| !q.trim().is_empty()) {
        Some(q) => s.store.search_accounts(&q, 200).await?,
        None => s.store.list_accounts().await?,
    };
    Ok(Json(json!({ "data": data })))
}

/// `GET /web/api/admin/accounts/{id}`.
pub async fn api_account(
    State(s): State<AppState>,
    h: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    require_admin_json(&s, &h).await?;
    let account = ops::account(&s, &id).await?;
    Ok(Json(json!({
        "account": account,
        "ledger": s.store.ledger(&id, 100).await?,
        "keys": s.store.api_keys(&id).await?,
        "devices": s.store.devices(&id).await?,
        "referrer_id": s.store.referrer_of(&id).await?,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreditRequest {
    kind: CreditKind,
    /// Credits; negative only for adjustments.
    amount: i64,
    reason: String,
}

/// `POST /web/api/admin/accounts/{id}/credits`: `{kind, amount, reason}`.
pub async fn api_credits(
    State(s): State<AppState>,
    h: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let user = require_admin_json_csrf(&s, &h).await?;
    let req: CreditRequest = parse_json(&body).map_err(ApiError::invalid_body)?;
    let balance = ops::credit(&s, &admin_email(&user), &id, req.kind, req.amount, &req.reason).await?;
    Ok(Json(json!({ "account_id": id, "balance": balance })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReasonRequest {
    reason: String,
}

/// `POST /web/api/admin/accounts/{id}/suspend`: `{reason}`.
pub async fn api_suspend(
    State(s): State<AppState>,
    h: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    api_suspension(s, h, id, body, true).await
}

/// `POST /web/api/admin/accounts/{id}/unsuspend`: `{reason}`.
pub async fn api_unsuspend(
    State(s): State<AppState>,
    h: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    api_suspension(s, h, id, body, false).await
}

async fn api_suspension(s: AppState, h: HeaderMap, id: String, body: Bytes, on: bool) -> Result<Json<Value>, ApiError> {
    let user = require_admin_json_csrf(&s, &h).await?;
    let req: ReasonRequest = parse_json(&body).map_err(ApiError::invalid_body)?;
    suspend(&s, &user, &id, &req.reason, on).await?;
    Ok(Json(json!({ "account_id": id, "suspended": on })))
}

/// `GET /web/api/admin/pricing`: the table in force and the recent versions.
pub async fn api_pricing(State(s): State<AppState>, h: HeaderMap) -> Result<Json<Value>, ApiError> {
    require_admin_json(&s, &h).await?;
    let history: Vec<Value> = s
        .store
        .pricing_versions(50)
        .await?
        .into_iter()
        .map(|v| {
            json!({
                "version": v.version,
                "created_by": v.created_by,
                "created_at": v.created_at,
                "pricing": serde_json::from_str::<Value>(&v.pricing).unwrap_or(Value::Null),
            })
        })
        .collect();
    Ok(Json(json!({
        "version": s.pricing_version(),
        "pricing": *s.pricing(),
        "history": history,
    })))
}

/// `POST /web/api/admin/pricing`: a whole `[pricing]` table as JSON.
pub async fn api_set_pricing(State(s): State<AppState>, h: HeaderMap, body: Bytes) -> Result<Json<Value>, ApiError> {
    let user = require_admin_json_csrf(&s, &h).await?;
    let pricing: Pricing = parse_json(&body).map_err(ApiError::invalid_body)?;
    let v = ops::change_pricing(&s, &admin_email(&user), pricing).await?;
    Ok(Json(
        json!({ "version": v.version, "created_by": v.created_by, "created_at": v.created_at, "pricing": *s.pricing() }),
    ))
}

/// `GET /web/api/admin/provisions`: live (this gateway's pools) and stored.
pub async fn api_provisions(State(s): State<AppState>, h: HeaderMap) -> Result<Json<Value>, ApiError> {
    require_admin_json(&s, &h).await?;
    let live: Vec<Value> = s
        .pools
        .all()
        .iter()
        .map(|p| {
            json!({
                "id": p.id, "device_id": p.device_id, "account_id": p.account_id, "service": p.service.as_str(),
                "model": p.model, "mode": p.transport.mode(), "in_flight": p.in_flight(),
            })
        })
        .collect();
    Ok(Json(json!({ "live": live, "stored": s.store.provisions().await? })))
}

/// `POST /web/api/admin/devices/{id}/disconnect`.
pub async fn api_disconnect(
    State(s): State<AppState>,
    h: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let user = require_admin_json_csrf(&s, &h).await?;
    let (links, provisions) = disconnect(&s, &user, &id).await?;
    Ok(Json(
        json!({ "device_id": id, "links_closed": links, "provisions_removed": provisions }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BannerRequest {
    message: String,
    #[serde(default = "info")]
    level: String,
    /// Milliseconds; default now.
    #[serde(default)]
    starts_at: Option<i64>,
    ends_at: i64,
}

fn info() -> String {
    "info".into()
}

async fn create_banner(s: &AppState, user: &WebUser, req: BannerRequest) -> Result<cxmpute_store::Banner, ApiError> {
    let level = BannerLevel::parse(&req.level)
        .ok_or_else(|| ApiError::bad_request("'level' is info, warning or critical").with_param("level"))?;
    let banner = s
        .store
        .create_banner(NewBanner {
            message: req.message,
            level,
            starts_at: req.starts_at.unwrap_or_else(now_millis),
            ends_at: req.ends_at,
            created_by: admin_email(user),
        })
        .await
        .map_err(|e| match e {
            cxmpute_store::StoreError::InvalidInput(m) => ApiError::bad_request(m),
            other => other.into(),
        })?;
    tracing::info!(banner = %banner.id, admin = %banner.created_by, "banner added");
    Ok(banner)
}

/// `GET /web/api/admin/banners`: current and scheduled.
pub async fn api_banners(State(s): State<AppState>, h: HeaderMap) -> Result<Json<Value>, ApiError> {
    require_admin_json(&s, &h).await?;
    Ok(Json(json!({ "data": s.store.banners_from(now_millis()).await? })))
}

/// `POST /web/api/admin/banners`: `{message, level?, starts_at?, ends_at}`.
pub async fn api_add_banner(
    State(s): State<AppState>,
    h: HeaderMap,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let user = require_admin_json_csrf(&s, &h).await?;
    let req: BannerRequest = parse_json(&body).map_err(ApiError::invalid_body)?;
    let banner = create_banner(&s, &user, req).await?;
    Ok((StatusCode::CREATED, Json(json!(banner))))
}

/// `DELETE /web/api/admin/banners/{id}`.
pub async fn api_delete_banner(
    State(s): State<AppState>,
    h: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    require_admin_json_csrf(&s, &h).await?;
    if !s.store.delete_banner(&id).await? {
        return Err(ApiError::not_found(format!("no banner '{id}'")));
    }
    Ok(Json(json!({ "id": id, "deleted": true })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RunRequest {
    #[serde(default)]
    day: Option<String>,
}

/// `POST /web/api/admin/referrals/run`: `{day?}`.
pub async fn api_run_referrals(State(s): State<AppState>, h: HeaderMap, body: Bytes) -> Result<Json<Value>, ApiError> {
    require_admin_json_csrf(&s, &h).await?;
    let req: RunRequest = if body.is_empty() {
        RunRequest::default()
    } else {
        parse_json(&body).map_err(ApiError::invalid_body)?
    };
    let runs = ops::pay_referrals(&s, req.day.as_deref()).await?;
    Ok(Json(json!({ "data": runs })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_dollars_and_utc_minutes_parse() {
        assert_eq!(parse_signed_usd("-2.5"), Some(-2_500_000_000));
        assert_eq!(parse_signed_usd("+1"), Some(1_000_000_000));
        assert_eq!(parse_signed_usd("--1"), None);
        assert_eq!(parse_utc_minute("1970-01-02T01:30"), Some(86_400_000 + 5_400_000));
        assert_eq!(parse_utc_minute("1970-01-01 00:01"), Some(60_000));
        assert_eq!(parse_utc_minute("1970-01-01T24:00"), None);
        assert_eq!(parse_utc_minute("yesterday"), None);
    }

    #[test]
    fn pricing_forms_are_checked() {
        let current = Pricing::default();
        let form = |pairs: &[(&str, &str)]| {
            let body = form_urlencoded::Serializer::new(String::new())
                .extend_pairs(pairs)
                .finish();
            Form::parse(&Bytes::from(body))
        };
        let p = pricing_from_form(
            &form(&[("chat_input", "7"), ("models", "big 10 30\nsmall 1\n")]),
            &current,
        )
        .unwrap();
        assert_eq!(p.chat_input, 7);
        assert_eq!(p.chat_output, current.chat_output);
        assert_eq!(p.unit_prices(cxmpute_store::Service::Chat, "big"), (10, 30));
        assert_eq!(p.unit_prices(cxmpute_store::Service::Chat, "small"), (1, 1));
        for bad in [
            vec![("chat_input", "-1")],
            vec![("reward_share_percent", "101")],
            vec![("default_max_tokens", "0")],
            vec![("models", "big ten")],
            vec![("models", "a 1 2 3")],
        ] {
            assert!(pricing_from_form(&form(&bad), &current).is_err(), "{bad:?}");
        }
    }
}
