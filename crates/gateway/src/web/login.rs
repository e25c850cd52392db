//! Login with one-time codes sent by mail, and logout.
//!
//! `POST /login` answers the same page whether or not an account exists for
//! the address, and sends a code either way: the first successful code
//! creates the account (as the original platform did). So the answer reveals
//! nothing about who has an account. Limits: codes per address per hour and
//! login requests per client IP per hour (in memory, per replica), attempts
//! per code (in the store, so they hold across replicas).

use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use cxmpute_store::ids::{hash_secret, random_secret};
use cxmpute_store::referrals::normalize_code;
use cxmpute_store::{now_millis, CodeCheck, StoreError};
use lettre::Address;
use rand::Rng;

use super::device::page as link_page;
use super::html::{esc, message_page, page, respond};
use super::session::{self, cookie, csrf_of, csrf_ok, set_cookie, well_formed, CSRF_FIELD, LOGIN_COOKIE};
use super::{ClientIp, Form, PageError};
use crate::state::AppState;

const HOUR: Duration = Duration::from_secs(3600);
const LOGIN_COOKIE_SECS: u64 = 3600;

/// A mail address as typed, trimmed and lowercased, and checked to be one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email(Address);

impl Email {
    pub fn parse(raw: &str) -> Option<Email> {
        let normal = raw.trim().to_lowercase();
        if normal.is_empty() || normal.len() > 254 {
            return None;
        }
        normal.parse::<Address>().ok().map(Email)
    }

    pub fn as_str(&self) -> &str {
        self.0.as_ref()
    }
}

/// Six decimal digits, uniformly drawn.
pub fn new_code() -> String {
    format!("{:06}", rand::rngs::OsRng.gen_range(0..1_000_000u32))
}

/// The address is part of the hash so a stored hash is useless for any other
/// address. Six digits can be brute-forced offline from a leaked hash; what
/// protects a code is its short life and the attempt limit, not the hash.
pub fn hash_code(email: &Email, code: &str) -> String {
    hash_secret(&format!("cxmpute-login\0{}\0{code}", email.as_str()))
}

/// `GET /login` (`?ref=CODE` for a referral): the address form. Issues the
/// login CSRF cookie.
pub async fn login_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, PageError> {
    let token = login_token(&headers);
    let referral = query.as_deref().and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "ref")
            .and_then(|(_, v)| normalize_code(&v))
    });
    let mut res = respond(
        StatusCode::OK,
        email_form(&csrf_of(&token), None, "", referral.as_deref()),
    );
    res.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(&state, LOGIN_COOKIE, &token, "/login", LOGIN_COOKIE_SECS)?,
    );
    Ok(res)
}

/// `POST /login`: sends a code to the address.
pub async fn request_code(
    State(state): State<AppState>,
    ip: ClientIp,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, PageError> {
    let (form, csrf) = match checked_login_form(&state, &ip, &headers, &body) {
        Ok(checked) => checked,
        Err(refusal) => return Ok(*refusal),
    };
    let web = &state.config.web;
    let raw = form.get("email").unwrap_or("");
    let Some(email) = Email::parse(raw) else {
        let form = email_form(
            &csrf,
            Some("That does not look like an email address."),
            raw,
            referral_of(&form).as_deref(),
        );
        return Ok(respond(StatusCode::BAD_REQUEST, form));
    };
    let address_key = format!("addr:{}", email.as_str());
    if let Err(wait) = state
        .web
        .throttle
        .check_window(&address_key, web.codes_per_address_per_hour, HOUR)
    {
        return Ok(too_many(wait));
    }
    let code = new_code();
    let now = now_millis();
    let ttl_ms = i64::try_from(web.code_ttl_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    state
        .store
        .put_login_code(
            email.as_str(),
            &hash_code(&email, &code),
            now,
            now.saturating_add(ttl_ms),
        )
        .await?;
    if let Err(e) = state
        .web
        .mailer
        .send_code(&email.0, &code, web.code_ttl_secs.div_ceil(60))
        .await
    {
        tracing::error!(error = %e, "login code not sent");
        return Ok(message_page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Mail could not be sent",
            "The login code could not be sent. Please try again in a few minutes.",
            ("/login", "Back to login"),
        ));
    }
    Ok(respond(
        StatusCode::OK,
        code_form(&csrf, &email, None, referral_of(&form).as_deref()),
    ))
}

/// `POST /login/verify`: checks the code; on success starts a session.
pub async fn verify_code(
    State(state): State<AppState>,
    ip: ClientIp,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, PageError> {
    let (form, csrf) = match checked_login_form(&state, &ip, &headers, &body) {
        Ok(checked) => checked,
        Err(refusal) => return Ok(*refusal),
    };
    let web = &state.config.web;
    let Some(email) = Email::parse(form.get("email").unwrap_or("")) else {
        return Ok(message_page(
            StatusCode::BAD_REQUEST,
            "Login",
            "That does not look like an email address.",
            ("/login", "Start again"),
        ));
    };
    let code = form.get("code").unwrap_or("").trim();
    if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
        let page = code_form(
            &csrf,
            &email,
            Some("The code is six digits."),
            referral_of(&form).as_deref(),
        );
        return Ok(respond(StatusCode::BAD_REQUEST, page));
    }
    let verdict = state
        .store
        .check_login_code(
            email.as_str(),
            &hash_code(&email, code),
            now_millis(),
            web.code_attempts,
        )
        .await?;
    let problem = match verdict {
        CodeCheck::Valid => return sign_in(&state, &email, &headers, referral_of(&form).as_deref()).await,
        CodeCheck::Wrong { attempts_left } if attempts_left > 0 => {
            format!("That code is not right. {attempts_left} more tries, then the code stops working.")
        }
        CodeCheck::Wrong { .. } | CodeCheck::Locked => {
            "Too many wrong tries: this code no longer works. Request a new one.".to_string()
        }
        CodeCheck::Expired | CodeCheck::Missing => {
            "This code has expired or was used already. Request a new one.".to_string()
        }
    };
    Ok(respond(
        StatusCode::UNAUTHORIZED,
        code_form(&csrf, &email, Some(&problem), referral_of(&form).as_deref()),
    ))
}

/// The code was right: find or create the account, refuse it if suspended,
/// otherwise set the session cookie and go to the dashboard (or back to the
/// `/link` page the visitor came from). A first login with a referral code
/// records the referrer.
async fn sign_in(
    state: &AppState,
    email: &Email,
    headers: &HeaderMap,
    referral: Option<&str>,
) -> Result<Response, PageError> {
    let account = match state.store.account_by_email(email.as_str()).await? {
        Some(account) => account,
        None => {
            let name = email.as_str().split('@').next().unwrap_or("user");
            match state.store.create_account(name, Some(email.as_str())).await {
                Ok(account) => {
                    tracing::info!(account = %account.id, "account created at first login");
                    if let Some(code) = referral {
                        record_referrer(state, &account.id, code).await;
                    }
                    account
                }
                // Created concurrently (e.g. by an operator): use that one.
                Err(StoreError::Conflict(_)) => state
                    .store
                    .account_by_email(email.as_str())
                    .await?
                    .ok_or_else(crate::error::ApiError::internal)?,
                Err(e) => return Err(e.into()),
            }
        }
    };
    if account.suspended {
        return Ok(message_page(
            StatusCode::FORBIDDEN,
            "Account suspended",
            "This account is suspended. Contact the operator of this network.",
            ("/login", "Back to login"),
        ));
    }
    let cookie = session::start(state, &account.id).await?;
    let next = link_page::after_login(headers);
    let mut res = match &next {
        Some(to) => link_page::see_other(to),
        None => session::redirect("/app"),
    };
    let h = res.headers_mut();
    h.append(header::SET_COOKIE, cookie);
    h.append(header::SET_COOKIE, set_cookie(state, LOGIN_COOKIE, "", "/login", 0)?);
    if next.is_some() {
        h.append(
            header::SET_COOKIE,
            set_cookie(state, link_page::LINK_COOKIE, "", "/login", 0)?,
        );
    }
    Ok(res)
}

/// An account made by a first login with a referral code records its
/// referrer. A code that names nobody, or is refused by the store (self,
/// cycle, set already), does not stop the login: it is only logged.
async fn record_referrer(state: &AppState, account_id: &str, code: &str) {
    let referrer = match state.store.account_of_referral_code(code).await {
        Ok(Some(referrer)) => referrer,
        Ok(None) => {
            tracing::info!(account = %account_id, "sign-up with an unknown referral code");
            return;
        }
        Err(e) => {
            tracing::warn!(account = %account_id, error = %e, "referral code not read");
            return;
        }
    };
    match state.store.set_referrer(account_id, &referrer).await {
        Ok(()) => tracing::info!(account = %account_id, referrer = %referrer, "referred sign-up"),
        Err(e) => tracing::info!(account = %account_id, error = %e, "referrer not recorded"),
    }
}

/// The referral code a login form carries, if it is well formed.
fn referral_of(form: &Form) -> Option<String> {
    form.get("ref").and_then(normalize_code)
}

/// The hidden field that carries a referral code from form to form.
fn referral_field(referral: Option<&str>) -> String {
    referral
        .map(|code| {
            format!(
                "<input type=\"hidden\" name=\"ref\" value=\"{0}\"><p class=\"muted\">Invited with code <strong>{0}</strong>.</p>",
                esc(code)
            )
        })
        .unwrap_or_default()
}

/// `POST /logout`: deletes the session on the server and the cookie.
pub async fn logout(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Result<Response, PageError> {
    if let Some(token) = cookie(&headers, session::SESSION_COOKIE).filter(|t| well_formed(t)) {
        let form = Form::parse(&body);
        if !csrf_ok(&csrf_of(token), form.get(CSRF_FIELD)) {
            return Ok(form_expired());
        }
        state.store.delete_session(&hash_secret(token)).await?;
    }
    let mut res = session::to_login();
    res.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(&state, session::SESSION_COOKIE, "", "/", 0)?,
    );
    Ok(res)
}

/// The login cookie's token, or a new one.
fn login_token(headers: &HeaderMap) -> String {
    cookie(headers, LOGIN_COOKIE)
        .filter(|t| well_formed(t))
        .map(str::to_string)
        .unwrap_or_else(random_secret)
}

/// The form's CSRF token when it matches the login cookie.
/// What both login posts check first: the form's CSRF token (against the
/// login cookie), then the per-IP login budget. Returns the form and token,
/// or the page to answer with.
fn checked_login_form(
    state: &AppState,
    ip: &ClientIp,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(Form, String), Box<Response>> {
    let form = Form::parse(body);
    let Some(csrf) = login_csrf(headers, &form) else {
        return Err(Box::new(form_expired()));
    };
    let per_hour = state.config.web.logins_per_ip_per_hour;
    if let Err(wait) = state.web.throttle.check_window(&ip.throttle_key(), per_hour, HOUR) {
        return Err(Box::new(too_many(wait)));
    }
    Ok((form, csrf))
}

fn login_csrf(headers: &HeaderMap, form: &Form) -> Option<String> {
    let token = cookie(headers, LOGIN_COOKIE).filter(|t| well_formed(t))?;
    let expected = csrf_of(token);
    csrf_ok(&expected, form.get(CSRF_FIELD)).then_some(expected)
}

fn form_expired() -> Response {
    message_page(
        StatusCode::FORBIDDEN,
        "Form expired",
        "This form is no longer valid (or did not come from this site). Please start again.",
        ("/login", "Back to login"),
    )
}

fn too_many(wait_secs: u64) -> Response {
    let mut res = message_page(
        StatusCode::TOO_MANY_REQUESTS,
        "Too many requests",
        &format!(
            "Too many login requests. Try again in {} minutes.",
            wait_secs.div_ceil(60)
        ),
        ("/login", "Back to login"),
    );
    res.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(wait_secs));
    res
}

fn alert(message: Option<&str>) -> String {
    message
        .map(|m| format!("<p class=\"msg err\" role=\"alert\">{}</p>", esc(m)))
        .unwrap_or_default()
}

fn email_form(csrf: &str, problem: Option<&str>, email: &str, referral: Option<&str>) -> String {
    let body = format!(
        "<h1>Sign in</h1>{alert}\
         <p>We send a six-digit code to your address. New here? The first login creates your account.</p>\
         <form method=\"post\" action=\"/login\">\
         <input type=\"hidden\" name=\"{CSRF_FIELD}\" value=\"{csrf}\">{referral}\
         <label for=\"email\">Email address</label>\
         <input id=\"email\" name=\"email\" type=\"email\" autocomplete=\"email\" required maxlength=\"254\" value=\"{email}\">\
         <div><button type=\"submit\">Send me a code</button></div></form>",
        alert = alert(problem),
        csrf = esc(csrf),
        email = esc(email),
        referral = referral_field(referral),
    );
    page("Sign in", "", &body)
}

fn code_form(csrf: &str, email: &Email, problem: Option<&str>, referral: Option<&str>) -> String {
    let body = format!(
        "<h1>Enter your code</h1>{alert}\
         <p>If <strong>{email}</strong> can receive mail, a code is on its way. It works once and expires soon.</p>\
         <form method=\"post\" action=\"/login/verify\">\
         <input type=\"hidden\" name=\"{CSRF_FIELD}\" value=\"{csrf}\">\
         <input type=\"hidden\" name=\"email\" value=\"{email}\">{referral}\
         <label for=\"code\">Six-digit code</label>\
         <input id=\"code\" name=\"code\" type=\"text\" inputmode=\"numeric\" pattern=\"[0-9]{{6}}\" \
         autocomplete=\"one-time-code\" maxlength=\"6\" required autofocus>\
         <div><button type=\"submit\">Sign in</button></div></form>\
         <p><a href=\"/login\">Use another address or get a new code</a></p>",
        alert = alert(problem),
        csrf = esc(csrf),
        email = esc(email.as_str()),
        referral = referral_field(referral),
    );
    page("Enter your code", "", &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalised_and_checked() {
        assert_eq!(
            Email::parse("  Alice@Example.COM ").map(|e| e.as_str().to_string()),
            Some("alice@example.com".to_string())
        );
        for bad in [
            "",
            "alice",
            "@example.com",
            "a b@example.com",
            "<a@b.c>",
            "a@b.c\r\nBcc: x@y.z",
        ] {
            assert!(Email::parse(bad).is_none(), "{bad:?}");
        }
        assert!(Email::parse(&format!("{}@example.com", "a".repeat(250))).is_none());
    }

    #[test]
    fn codes_are_six_digits_and_hashes_depend_on_the_address() {
        for _ in 0..100 {
            let c = new_code();
            assert_eq!(c.len(), 6);
            assert!(c.bytes().all(|b| b.is_ascii_digit()));
        }
        let a = Email::parse("a@example.com").unwrap();
        let b = Email::parse("b@example.com").unwrap();
        assert_ne!(hash_code(&a, "123456"), hash_code(&b, "123456"));
    }
}
