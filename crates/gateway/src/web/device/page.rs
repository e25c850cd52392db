//! `/link`: where a signed-in owner approves (or denies) a node's code.
//!
//! A visitor without a session is sent to `/login`; the code rides along in
//! a short-lived `cx_link` cookie (only a well-formed code, so the login can
//! never be made to redirect anywhere else), and after login the browser
//! comes back here. Each code look-up, right or wrong, counts against a
//! per-account and a per-IP hourly budget, so codes cannot be guessed.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use cxmpute_store::{now_millis, DecideOutcome, DeviceDecision};

use super::{UserCode, HOUR};
use crate::state::AppState;
use crate::web::app::{require_form, require_page};
use crate::web::html::{esc, page, respond};
use crate::web::session::{cookie, set_cookie, WebUser, CSRF_FIELD};
use crate::web::{ClientIp, Form, PageError};

/// Carries a code through the login.
pub const LINK_COOKIE: &str = "cx_link";

/// Where the login goes after success: back to `/link` when a code came
/// along, else the dashboard.
pub fn after_login(headers: &HeaderMap) -> Option<String> {
    cookie(headers, LINK_COOKIE)
        .and_then(UserCode::parse)
        .map(|code| format!("/link?code={}", code.display()))
}

/// A 303 to a path we built (never one taken from the request as is).
pub fn see_other(to: &str) -> Response {
    match HeaderValue::from_str(to) {
        Ok(location) => (StatusCode::SEE_OTHER, [(header::LOCATION, location)]).into_response(),
        Err(_) => (
            StatusCode::SEE_OTHER,
            [(header::LOCATION, HeaderValue::from_static("/app"))],
        )
            .into_response(),
    }
}

/// `GET /link` (optionally `?code=…`).
pub async fn link_page(
    State(state): State<AppState>,
    ip: ClientIp,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, PageError> {
    let raw = query.get("code").map(String::as_str).unwrap_or("").trim();
    let user = match require_page(&state, &headers).await? {
        Ok(user) => user,
        Err(mut res) => {
            if res.status() == StatusCode::SEE_OTHER {
                if let Some(code) = UserCode::parse(raw) {
                    res.headers_mut().append(
                        header::SET_COOKIE,
                        set_cookie(&state, LINK_COOKIE, code.as_str(), "/login", 3600)?,
                    );
                }
            }
            return Ok(res);
        }
    };
    if raw.is_empty() {
        return Ok(respond(StatusCode::OK, code_form(&user, None, "")));
    }
    if let Some(res) = over_budget(&state, &ip, &user) {
        return Ok(res);
    }
    let Some(code) = UserCode::parse(raw) else {
        return Ok(bad_code(&user, raw));
    };
    let problem = match state.store.device_code(&code.hash()).await? {
        None => (StatusCode::NOT_FOUND, UNKNOWN),
        Some(info) if info.expires_at <= now_millis() => (StatusCode::GONE, EXPIRED),
        Some(info) if !info.pending => (StatusCode::CONFLICT, DECIDED),
        Some(info) => return Ok(respond(StatusCode::OK, confirm(&user, &code, &info.device_name))),
    };
    Ok(respond(problem.0, code_form(&user, Some(problem.1), &code.display())))
}

/// `POST /link`: `code`, `action` (`approve` or `deny`) and the CSRF token.
pub async fn decide(
    State(state): State<AppState>,
    ip: ClientIp,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, PageError> {
    let form = Form::parse(&body);
    let user = match require_form(&state, &headers, &form).await? {
        Ok(user) => user,
        Err(res) => return Ok(res),
    };
    if let Some(res) = over_budget(&state, &ip, &user) {
        return Ok(res);
    }
    let raw = form.get("code").unwrap_or("").trim();
    let Some(code) = UserCode::parse(raw) else {
        return Ok(bad_code(&user, raw));
    };
    let (decision, approving) = match form.get("action") {
        Some("approve") => (
            DeviceDecision::Approve {
                account_id: &user.account.id,
            },
            true,
        ),
        Some("deny") => (DeviceDecision::Deny, false),
        _ => {
            let problem = "Choose to approve or to deny the node.";
            return Ok(respond(
                StatusCode::BAD_REQUEST,
                code_form(&user, Some(problem), &code.display()),
            ));
        }
    };
    let outcome = state
        .store
        .decide_device_code(&code.hash(), decision, now_millis())
        .await?;
    let (status, problem) = match outcome {
        DecideOutcome::Decided => {
            tracing::info!(account = %user.account.id, approved = approving, "device code decided on the web");
            return Ok(respond(StatusCode::OK, decided(&user, approving)));
        }
        DecideOutcome::Missing => (StatusCode::NOT_FOUND, UNKNOWN),
        DecideOutcome::Expired => (StatusCode::GONE, EXPIRED),
        DecideOutcome::AlreadyDecided => (StatusCode::CONFLICT, DECIDED),
    };
    Ok(respond(status, code_form(&user, Some(problem), &code.display())))
}

const UNKNOWN: &str = "No node is waiting with this code. Check the code your node shows, or run \
                       `cxmpute-provider login` again.";
const EXPIRED: &str = "This code has expired. Run `cxmpute-provider login` again for a new one.";
const DECIDED: &str = "This code was approved or denied already.";

/// Counts one code look-up; the refusal page when the budget is spent.
fn over_budget(state: &AppState, ip: &ClientIp, user: &WebUser) -> Option<Response> {
    let per_hour = state.config.device_login.link_attempts_per_hour;
    let throttle = &state.web.throttle;
    let account_key = format!("link:{}", user.account.id);
    let ip_key = format!("link-{}", ip.throttle_key());
    let wait = throttle
        .check_window(&account_key, per_hour, HOUR)
        .and_then(|()| throttle.check_window(&ip_key, per_hour, HOUR))
        .err()?;
    let mut res = respond(
        StatusCode::TOO_MANY_REQUESTS,
        code_form(
            user,
            Some(&format!(
                "Too many codes tried. Try again in {} minutes.",
                wait.div_ceil(60)
            )),
            "",
        ),
    );
    res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(wait));
    Some(res)
}

fn bad_code(user: &WebUser, raw: &str) -> Response {
    let problem = "That is not a code a node shows: it has eight letters, like WDJB-MJHT.";
    respond(StatusCode::BAD_REQUEST, code_form(user, Some(problem), raw))
}

fn frame(user: &WebUser, title: &str, body: &str) -> String {
    let header = format!(
        "<span class=\"muted\">{}</span>",
        esc(user.account.email.as_deref().unwrap_or(&user.account.name))
    );
    page(title, &header, body)
}

fn code_form(user: &WebUser, problem: Option<&str>, code: &str) -> String {
    let alert = problem
        .map(|p| format!("<p class=\"msg err\" role=\"alert\">{}</p>", esc(p)))
        .unwrap_or_default();
    let body = format!(
        "<h1>Link a provider node</h1>{alert}\
         <p>Enter the code that <code>cxmpute-provider login</code> shows.</p>\
         <form method=\"get\" action=\"/link\">\
         <label for=\"code\">Code</label>\
         <input id=\"code\" name=\"code\" type=\"text\" autocomplete=\"off\" maxlength=\"20\" required \
         autofocus value=\"{code}\" placeholder=\"WDJB-MJHT\">\
         <div><button type=\"submit\">Continue</button></div></form>\
         <p><a href=\"/app\">Back to the dashboard</a></p>",
        code = esc(code),
    );
    frame(user, "Link a provider node", &body)
}

fn confirm(user: &WebUser, code: &UserCode, device_name: &str) -> String {
    let body = format!(
        "<h1>Link a provider node</h1>\
         <p>A node named <strong>{name}</strong> asks to serve requests for the account \
         <strong>{account}</strong> and to earn its rewards.</p>\
         <p class=\"msg\">Approve only if you started <code>cxmpute-provider login</code> yourself \
         and it shows the code <strong>{shown}</strong>.</p>\
         <form method=\"post\" action=\"/link\">\
         <input type=\"hidden\" name=\"{CSRF_FIELD}\" value=\"{csrf}\">\
         <input type=\"hidden\" name=\"code\" value=\"{shown}\">\
         <button type=\"submit\" name=\"action\" value=\"approve\">Approve</button> \
         <button type=\"submit\" name=\"action\" value=\"deny\" class=\"link\">Deny</button></form>",
        name = esc(device_name),
        account = esc(user.account.email.as_deref().unwrap_or(&user.account.name)),
        shown = esc(&code.display()),
        csrf = esc(&user.csrf),
    );
    frame(user, "Link a provider node", &body)
}

fn decided(user: &WebUser, approved: bool) -> String {
    let body = if approved {
        "<h1>Node approved</h1><p class=\"msg ok\" role=\"status\">The node receives its credentials \
         at its next poll and starts by itself. You can close this page.</p>\
         <p><a href=\"/app\">Go to the dashboard</a></p>"
    } else {
        "<h1>Node denied</h1><p class=\"msg\" role=\"status\">The node was told no. Nothing was added \
         to your account.</p><p><a href=\"/app\">Go to the dashboard</a></p>"
    };
    frame(user, if approved { "Node approved" } else { "Node denied" }, body)
}
