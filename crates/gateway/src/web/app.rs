//! The user dashboard at `/app`: balance, API keys, ledger and recent usage,
//! with forms to create and revoke keys.

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use cxmpute_store::{ApiKey, LedgerEntry, Service, UsageRecord};

use super::html::{esc, message_page, page, respond, usd, when};
use super::session::{self, csrf_ok, Denied, Role, WebUser, CSRF_FIELD};
use super::{Form, PageError};
use crate::auth::KeyOptions;
use crate::error::ApiError;
use crate::state::AppState;

const HISTORY: i64 = 50;

/// A page's signed-in user, or the response that replaces the page.
pub(super) async fn require_page(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<Result<WebUser, Response>, PageError> {
    Ok(match session::current(state, headers).await? {
        Ok(user) => Ok(user),
        Err(Denied::NoSession) => Err(session::to_login()),
        Err(Denied::Suspended) => Err(message_page(
            StatusCode::FORBIDDEN,
            "Account suspended",
            "This account is suspended. Contact the operator of this network.",
            ("/login", "Back to login"),
        )),
    })
}

/// Like [`require_page`], and the form must carry the session's CSRF token.
pub(super) async fn require_form(
    state: &AppState,
    headers: &HeaderMap,
    form: &Form,
) -> Result<Result<WebUser, Response>, PageError> {
    let user = match require_page(state, headers).await? {
        Ok(user) => user,
        Err(res) => return Ok(Err(res)),
    };
    if !csrf_ok(&user.csrf, form.get(CSRF_FIELD)) {
        return Ok(Err(message_page(
            StatusCode::FORBIDDEN,
            "Form expired",
            "This form is no longer valid (or did not come from this site). Reload the dashboard and try again.",
            ("/app", "Back to the dashboard"),
        )));
    }
    Ok(Ok(user))
}

/// `GET /app` (`?before=ID` pages the ledger).
pub async fn dashboard(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, PageError> {
    let user = match require_page(&state, &headers).await? {
        Ok(user) => user,
        Err(res) => return Ok(res),
    };
    let before = q.as_deref().and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "before")
            .and_then(|(_, v)| v.parse::<i64>().ok())
    });
    render_page(&state, &user, StatusCode::OK, None, None, before).await
}

/// Where clients reach this gateway: `web.public_url`, else the listen address.
pub fn base_url(state: &AppState) -> String {
    match &state.config.web.public_url {
        Some(url) => url.trim_end_matches('/').to_string(),
        None => {
            // Listening on every interface: this machine's loopback works at
            // least; `web.public_url` names the address others should use.
            let mut addr = state.config.listen;
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            format!("http://{addr}")
        }
    }
}

/// The banners showing now, as alerts at the top of a page. A store error
/// only costs the banners, not the page.
pub async fn banner_html(state: &AppState) -> String {
    match super::ops::live_banners(state).await {
        Ok(banners) => banners
            .iter()
            .map(|b| {
                let class = if b.level == cxmpute_store::BannerLevel::Info {
                    "msg"
                } else {
                    "msg err"
                };
                format!(
                    "<p class=\"{class}\" role=\"status\"><strong>{}:</strong> {}</p>",
                    b.level.as_str(),
                    esc(&b.message)
                )
            })
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "banners could not be read");
            String::new()
        }
    }
}

/// `POST /app/keys`: creates a key and shows its secret once.
pub async fn create_key(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Result<Response, PageError> {
    let form = Form::parse(&body);
    let user = match require_form(&state, &headers, &form).await? {
        Ok(user) => user,
        Err(res) => return Ok(res),
    };
    let opts = match key_options(&form) {
        Ok(opts) => opts,
        Err(problem) => return render(&state, &user, StatusCode::BAD_REQUEST, None, Some(&problem)).await,
    };
    match crate::auth::create_key(state.store.as_ref(), &user.account.id, opts).await {
        Ok((key, secret)) => {
            tracing::info!(account = %user.account.id, key = %key.id, "api key created on the web");
            render(&state, &user, StatusCode::OK, Some((&key, &secret)), None).await
        }
        Err(e) if e.status.is_client_error() => render(&state, &user, e.status, None, Some(&e.message)).await,
        Err(e) => Err(e.into()),
    }
}

/// `POST /app/keys/{id}/revoke`.
pub async fn revoke_key(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, PageError> {
    let form = Form::parse(&body);
    let user = match require_form(&state, &headers, &form).await? {
        Ok(user) => user,
        Err(res) => return Ok(res),
    };
    revoke_own_key(&state, &user, &id).await?;
    Ok(session::redirect("/app"))
}

/// `POST /app/keys/{id}/edit`: the edit form of a key (the create form's fields).
pub async fn edit_key(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, PageError> {
    let form = Form::parse(&body);
    let user = match require_form(&state, &headers, &form).await? {
        Ok(user) => user,
        Err(res) => return Ok(res),
    };
    let opts = match key_options(&form) {
        Ok(opts) => opts,
        Err(problem) => return render(&state, &user, StatusCode::BAD_REQUEST, None, Some(&problem)).await,
    };
    match update_own_key(&state, &user, &id, opts).await {
        Ok(_) => Ok(session::redirect("/app")),
        Err(e) if e.status == StatusCode::BAD_REQUEST => render(&state, &user, e.status, None, Some(&e.message)).await,
        Err(e) => Err(e.into()),
    }
}

/// Changes `key_id`'s settings if it is a live key of `user`; 404 otherwise.
pub async fn update_own_key(
    state: &AppState,
    user: &WebUser,
    key_id: &str,
    opts: KeyOptions,
) -> Result<ApiKey, ApiError> {
    let Some(current) = state
        .store
        .key_auth(key_id)
        .await?
        .map(|k| k.key)
        .filter(|k| k.account_id == user.account.id && k.revoked_at.is_none())
    else {
        return Err(ApiError::not_found(format!("no key '{key_id}'")));
    };
    let settings = crate::auth::key_settings(opts, &current.name)?;
    if !state.store.update_api_key(key_id, &settings).await? {
        return Err(ApiError::not_found(format!("no key '{key_id}'")));
    }
    state.keys.evict(key_id);
    tracing::info!(account = %user.account.id, key = %key_id, "api key edited on the web");
    state
        .store
        .key_auth(key_id)
        .await?
        .map(|k| k.key)
        .ok_or_else(|| ApiError::not_found(format!("no key '{key_id}'")))
}

/// Revokes `key_id` if it belongs to `user`; 404 otherwise (also for keys of
/// other accounts, so ids of others' keys cannot be confirmed).
pub async fn revoke_own_key(state: &AppState, user: &WebUser, key_id: &str) -> Result<(), ApiError> {
    let owned = state
        .store
        .key_auth(key_id)
        .await?
        .is_some_and(|k| k.key.account_id == user.account.id);
    if !owned || !state.store.revoke_api_key(key_id).await? {
        return Err(ApiError::not_found(format!("no key '{key_id}'")));
    }
    state.keys.evict(key_id);
    tracing::info!(account = %user.account.id, key = %key_id, "api key revoked on the web");
    Ok(())
}

/// Reads the create-key form: name, limit in dollars, services, RPM.
fn key_options(form: &Form) -> Result<KeyOptions, String> {
    let name = form
        .get("name")
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_string);
    let credit_limit = match form.get("credit_limit_usd").map(str::trim).filter(|s| !s.is_empty()) {
        None => None,
        Some(text) => Some(parse_usd(text).ok_or("The credit limit is a dollar amount, e.g. 5 or 0.25.")?),
    };
    let services: Vec<String> = form.all("service").map(str::to_string).collect();
    if services.is_empty() {
        return Err("Choose at least one service.".into());
    }
    let allowed_services = (services.len() < Service::ALL.len()).then_some(services);
    let rpm_limit = match form.get("rpm_limit").map(str::trim).filter(|s| !s.is_empty()) {
        None => None,
        Some(text) => Some(
            text.parse::<u32>()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or("Requests per minute is a whole number of at least 1.")?,
        ),
    };
    Ok(KeyOptions {
        name,
        credit_limit,
        allowed_services,
        rpm_limit,
    })
}

/// `12`, `0.25`, `3.000001` dollars → credits (10⁻⁹ USD); at most 9 decimals.
pub fn parse_usd(text: &str) -> Option<i64> {
    let text = text.strip_prefix('$').unwrap_or(text);
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    if whole.is_empty() && frac.is_empty() || frac.len() > 9 {
        return None;
    }
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || !digits(frac) {
        return None;
    }
    let whole: i64 = if whole.is_empty() { 0 } else { whole.parse().ok()? };
    let frac: i64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<9}").parse().ok()?
    };
    whole.checked_mul(1_000_000_000)?.checked_add(frac)
}

async fn render(
    state: &AppState,
    user: &WebUser,
    status: StatusCode,
    created: Option<(&ApiKey, &str)>,
    problem: Option<&str>,
) -> Result<Response, PageError> {
    render_page(state, user, status, created, problem, None).await
}

async fn render_page(
    state: &AppState,
    user: &WebUser,
    status: StatusCode,
    created: Option<(&ApiKey, &str)>,
    problem: Option<&str>,
    before: Option<i64>,
) -> Result<Response, PageError> {
    let account = &user.account;
    let keys = state.store.api_keys(&account.id).await?;
    let ledger = state.store.ledger_page(&account.id, before, HISTORY).await?;
    let usage = state.store.usage_for_account(&account.id, HISTORY).await?;
    let csrf = esc(&user.csrf);

    let header = format!(
        "<form method=\"post\" action=\"/logout\"><span class=\"muted\">{email}{admin}</span> \
         <input type=\"hidden\" name=\"{CSRF_FIELD}\" value=\"{csrf}\"><button class=\"link\" type=\"submit\">Sign out</button></form>",
        email = esc(account.email.as_deref().unwrap_or(&account.name)),
        admin = if user.role == Role::Admin { " (admin)" } else { "" },
    );
    let mut body = banner_html(state).await;
    body.push_str(&format!(
        "<nav><a href=\"/app/provider\">Provider</a> · <a href=\"/network\">Network</a> · <a href=\"/models\">Models</a>{}</nav>",
        if user.role == Role::Admin { " · <a href=\"/admin\">Admin</a>" } else { "" }
    ));
    body.push_str("<h1>Dashboard</h1>");
    if let Some(problem) = problem {
        body.push_str(&format!("<p class=\"msg err\" role=\"alert\">{}</p>", esc(problem)));
    }
    if let Some((key, secret)) = created {
        body.push_str(&format!(
            "<div class=\"msg ok\" role=\"status\"><p>Key <strong>{}</strong> created. Copy it now: it is shown only once.</p>\
             <p class=\"secret\">{}</p></div>",
            esc(&key.name),
            esc(secret)
        ));
    }
    body.push_str(&format!(
        "<h2>Balance</h2><p><strong>{}</strong> <span class=\"muted\">({} credits; 1 credit = 10⁻⁹ USD)</span></p>",
        usd(account.balance),
        account.balance
    ));
    body.push_str(&keys_section(&keys, &csrf));
    body.push_str(&snippets_section(&base_url(state)));
    let since = cxmpute_store::day_of(cxmpute_store::now_millis() - (USAGE_DAYS - 1) * 86_400_000);
    body.push_str(&usage_days_section(&state.store.usage_days(&account.id, &since).await?));
    body.push_str(&ledger_section(&ledger, before, HISTORY));
    body.push_str(&usage_section(&usage));
    body.push_str(&referral_section(state, &account.id).await?);
    Ok(respond(status, page("Dashboard", &header, &body)))
}

fn keys_section(keys: &[ApiKey], csrf: &str) -> String {
    let mut html = String::from("<h2>API keys</h2>");
    if keys.is_empty() {
        html.push_str("<p>No keys yet.</p>");
    } else {
        html.push_str(
            "<table><thead><tr><th scope=\"col\">Name</th><th scope=\"col\">Key</th><th scope=\"col\">Services</th>\
             <th scope=\"col\">Limit</th><th scope=\"col\">Spent</th><th scope=\"col\">RPM</th>\
             <th scope=\"col\">Last used</th><th scope=\"col\">Status</th></tr></thead><tbody>",
        );
        for k in keys {
            let services = k.allowed_services.as_ref().map_or("all".to_string(), |list| {
                list.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            });
            let status = if k.revoked_at.is_some() {
                "revoked".to_string()
            } else {
                format!(
                    "<form method=\"post\" action=\"/app/keys/{id}/revoke\"><input type=\"hidden\" name=\"{CSRF_FIELD}\" value=\"{csrf}\">\
                     <button class=\"link\" type=\"submit\" aria-label=\"Revoke key {name}\">Revoke</button></form>",
                    id = esc(&k.id),
                    name = esc(&k.name),
                )
            };
            html.push_str(&format!(
                "<tr><td>{}</td><td class=\"secret\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&k.name),
                esc(&k.prefix),
                esc(&services),
                k.credit_limit.map_or("none".into(), usd),
                usd(k.spent),
                k.rpm_limit.map_or("none".into(), |n| n.to_string()),
                k.last_used_at.map_or("never".into(), when),
                status,
            ));
        }
        html.push_str("</tbody></table>");
        for k in keys.iter().filter(|k| k.revoked_at.is_none()) {
            html.push_str(&edit_form(k, csrf));
        }
    }
    let boxes: String = Service::ALL
        .iter()
        .map(|s| {
            format!(
                "<input type=\"checkbox\" id=\"svc-{s}\" name=\"service\" value=\"{s}\" checked> <label for=\"svc-{s}\">{s}</label>",
                s = s.as_str()
            )
        })
        .collect();
    html.push_str(&format!(
        "<h3>New key</h3><form method=\"post\" action=\"/app/keys\">\
         <input type=\"hidden\" name=\"{CSRF_FIELD}\" value=\"{csrf}\">\
         <label for=\"key-name\">Name</label><input id=\"key-name\" name=\"name\" type=\"text\" maxlength=\"100\" placeholder=\"default\">\
         <label for=\"key-limit\">Credit limit in USD (optional)</label><input id=\"key-limit\" name=\"credit_limit_usd\" type=\"text\" inputmode=\"decimal\" placeholder=\"no limit\">\
         <label for=\"key-rpm\">Requests per minute (optional)</label><input id=\"key-rpm\" name=\"rpm_limit\" type=\"number\" min=\"1\" placeholder=\"no limit\">\
         <fieldset><legend>Services</legend>{boxes}</fieldset>\
         <div><button type=\"submit\">Create key</button></div></form>"
    ));
    html
}

/// A live key's settings as a form, folded away until opened.
fn edit_form(k: &ApiKey, csrf: &str) -> String {
    let id = esc(&k.id);
    let boxes: String = Service::ALL
        .iter()
        .map(|s| {
            let on = k.allowed_services.as_ref().is_none_or(|list| list.contains(s));
            format!(
                "<input type=\"checkbox\" id=\"e-svc-{s}-{id}\" name=\"service\" value=\"{s}\"{c}> <label for=\"e-svc-{s}-{id}\">{s}</label>",
                s = s.as_str(),
                c = if on { " checked" } else { "" },
            )
        })
        .collect();
    format!(
        "<details><summary>Edit key {name}</summary><form method=\"post\" action=\"/app/keys/{id}/edit\">\
         <input type=\"hidden\" name=\"{CSRF_FIELD}\" value=\"{csrf}\">\
         <label for=\"e-name-{id}\">Name</label><input id=\"e-name-{id}\" name=\"name\" type=\"text\" maxlength=\"100\" value=\"{name}\">\
         <label for=\"e-limit-{id}\">Credit limit in USD (empty: no limit)</label><input id=\"e-limit-{id}\" name=\"credit_limit_usd\" type=\"text\" inputmode=\"decimal\" value=\"{limit}\">\
         <label for=\"e-rpm-{id}\">Requests per minute (empty: no limit)</label><input id=\"e-rpm-{id}\" name=\"rpm_limit\" type=\"number\" min=\"1\" value=\"{rpm}\">\
         <fieldset><legend>Services</legend>{boxes}</fieldset>\
         <div><button type=\"submit\">Save key</button></div></form></details>",
        name = esc(&k.name),
        limit = k.credit_limit.map(usd).unwrap_or_default(),
        rpm = k.rpm_limit.map(|n| n.to_string()).unwrap_or_default(),
    )
}

const USAGE_DAYS: i64 = 30;

fn snippets_section(base: &str) -> String {
    let base = esc(base);
    format!(
        "<h2>Use the API</h2><p>Replace <code>$CXMPUTE_KEY</code> with one of your keys. The API is OpenAI-compatible.</p>\
         <h3>curl</h3><pre><code>curl {base}/v1/chat/completions \\\n  -H \"Authorization: Bearer $CXMPUTE_KEY\" \\\n  \
         -H \"Content-Type: application/json\" \\\n  -d '{{\"model\": \"MODEL\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'</code></pre>\
         <h3>Python</h3><pre><code>import os\nfrom openai import OpenAI\n\nclient = OpenAI(base_url=\"{base}/v1\", api_key=os.environ[\"CXMPUTE_KEY\"])\n\
         reply = client.chat.completions.create(model=\"MODEL\", messages=[{{\"role\": \"user\", \"content\": \"Hello\"}}])\n\
         print(reply.choices[0].message.content)</code></pre>\
         <h3>JavaScript</h3><pre><code>const res = await fetch(\"{base}/v1/chat/completions\", {{\n  method: \"POST\",\n  \
         headers: {{ Authorization: `Bearer ${{process.env.CXMPUTE_KEY}}`, \"Content-Type\": \"application/json\" }},\n  \
         body: JSON.stringify({{ model: \"MODEL\", messages: [{{ role: \"user\", content: \"Hello\" }}] }}),\n}});\n\
         console.log((await res.json()).choices[0].message.content);</code></pre>\
         <p class=\"muted\">Models and prices: <a href=\"/models\">/models</a>.</p>"
    )
}

fn usage_days_section(rows: &[cxmpute_store::UsageDay]) -> String {
    let mut by_day = std::collections::BTreeMap::new();
    for r in rows {
        *by_day.entry(r.day.clone()).or_insert(0i64) += r.cost;
    }
    let bars = super::charts::days(cxmpute_store::now_millis(), USAGE_DAYS, &by_day);
    let mut html = String::from("<h2>Usage by day</h2>");
    html.push_str(&super::charts::bar_chart(
        "spend",
        "Spend per day, last 30 days (UTC)",
        &bars,
        usd,
    ));
    if rows.is_empty() {
        return html + "<p>No usage in the last 30 days.</p>";
    }
    html.push_str(
        "<table><caption>Usage by day, service and model</caption><thead><tr><th scope=\"col\">Day (UTC)</th><th scope=\"col\">Service</th>\
         <th scope=\"col\">Model</th><th scope=\"col\">Requests</th><th scope=\"col\">Errors</th><th scope=\"col\">Tokens in/out</th>\
         <th scope=\"col\">Cost</th></tr></thead><tbody>",
    );
    for r in rows.iter().rev() {
        html.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} / {}</td><td>{}</td></tr>",
            esc(&r.day),
            r.service.as_str(),
            esc(&r.model),
            r.requests,
            r.errors,
            r.input_tokens,
            r.output_tokens,
            usd(r.cost)
        ));
    }
    html + "</tbody></table>"
}

async fn referral_section(state: &AppState, account_id: &str) -> Result<String, PageError> {
    let code = state.store.referral_code(account_id).await?;
    let referred = state.store.referred_by(account_id).await?;
    let earned = state
        .store
        .ledger_sum(account_id, cxmpute_store::LedgerKind::Referral)
        .await?;
    let r = &state.config.web.referrals;
    let list = |v: &[f64]| v.iter().map(|p| format!("{p} %")).collect::<Vec<_>>().join(" / ");
    Ok(format!(
        "<h2>Referrals</h2><p>Your code: <strong class=\"secret\">{code}</strong>. Sign-up link: \
         <span class=\"secret\">{link}</span></p><p>You earn {rw} of the provider rewards and {sp} of the usage spend \
         of the accounts you bring in (and of theirs, by level). {n} accounts signed up with your code; you earned {earned}.</p>",
        code = esc(&code),
        link = esc(&format!("{}/login?ref={code}", base_url(state))),
        rw = list(&r.reward_levels_percent),
        sp = list(&r.spend_levels_percent),
        n = referred.len(),
        earned = usd(earned),
    ))
}

fn ledger_section(entries: &[LedgerEntry], before: Option<i64>, page_size: i64) -> String {
    let mut html = String::from("<h2 id=\"ledger\">Ledger</h2>");
    if before.is_some() {
        html.push_str("<p><a href=\"/app#ledger\">Newest entries</a></p>");
    }
    if entries.is_empty() {
        return html + "<p>No entries yet.</p>";
    }
    let more = match entries.last() {
        Some(last) if entries.len() as i64 == page_size => {
            format!("<p><a href=\"/app?before={}#ledger\">Older entries</a></p>", last.id)
        }
        _ => String::new(),
    };
    html.push_str(
        "<table><thead><tr><th scope=\"col\">When (UTC)</th><th scope=\"col\">Kind</th><th scope=\"col\">Amount</th>\
         <th scope=\"col\">Note</th></tr></thead><tbody>",
    );
    for e in entries {
        html.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            when(e.created_at),
            e.kind.as_str(),
            usd(e.amount),
            esc(e.note.as_deref().or(e.request_id.as_deref()).unwrap_or("")),
        ));
    }
    html + "</tbody></table>" + &more
}

fn usage_section(rows: &[UsageRecord]) -> String {
    let mut html = String::from("<h2>Recent usage</h2>");
    if rows.is_empty() {
        return html + "<p>No requests yet.</p>";
    }
    html.push_str(
        "<table><thead><tr><th scope=\"col\">When (UTC)</th><th scope=\"col\">Service</th><th scope=\"col\">Model</th>\
         <th scope=\"col\">Tokens in/out</th><th scope=\"col\">Status</th><th scope=\"col\">Cost</th></tr></thead><tbody>",
    );
    for u in rows {
        html.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{} / {}</td><td>{}</td><td>{}</td></tr>",
            when(u.created_at),
            u.service.as_str(),
            esc(&u.model),
            u.input_tokens,
            u.output_tokens,
            u.status,
            usd(u.cost),
        ));
    }
    html + "</tbody></table>"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollars_parse_into_credits() {
        assert_eq!(parse_usd("12"), Some(12_000_000_000));
        assert_eq!(parse_usd("$0.25"), Some(250_000_000));
        assert_eq!(parse_usd(".5"), Some(500_000_000));
        assert_eq!(parse_usd("3.000000001"), Some(3_000_000_001));
        for bad in ["", ".", "1.0000000001", "-1", "1e3", "abc", "99999999999999"] {
            assert_eq!(parse_usd(bad), None, "{bad:?}");
        }
    }
}
