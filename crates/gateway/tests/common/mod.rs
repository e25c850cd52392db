//! In-process gateway for the web tests: a fresh SQLite file, codes captured
//! instead of mailed, requests sent straight into the router.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use cxmpute_gateway::web::config::WebConfig;
use cxmpute_gateway::web::mail::{Captured, Mailer};
use cxmpute_gateway::web::session::csrf_of;
use cxmpute_gateway::{Config, Gateway};
use cxmpute_store::ids::{hash_secret, random_secret};
use cxmpute_store::{now_millis, Store};
use http_body_util::BodyExt;
use tower::ServiceExt;

pub const ADMIN_EMAIL: &str = "root@example.com";
pub const ADMIN_TOKEN: &str = "web-tests-admin-token-0123";

pub struct App {
    pub router: Router,
    pub store: Arc<dyn Store>,
    /// The gateway's state: its pools, prices and links.
    pub state: cxmpute_gateway::state::AppState,
    pub mail: Captured,
    _dir: tempfile::TempDir,
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: axum::http::HeaderMap,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The value of a `Set-Cookie` for `name` (empty when it deletes it).
    pub fn cookie(&self, name: &str) -> Option<String> {
        self.headers
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| v.split(';').next())
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    }
}

pub async fn app_with(web: WebConfig) -> App {
    app_with_config(|c| {
        c.web = WebConfig {
            admin_emails: vec![ADMIN_EMAIL.into()],
            ..web
        }
    })
    .await
}

/// A gateway whose configuration `change` adjusts (the database and the
/// admin token are set already; keep `web.admin_emails` if you replace `web`).
pub async fn app_with_config(change: impl FnOnce(&mut Config)) -> App {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        database_url: format!("sqlite://{}", dir.path().join("g.db").display()),
        web: WebConfig {
            admin_emails: vec![ADMIN_EMAIL.into()],
            ..WebConfig::default()
        },
        admin_token: Some(ADMIN_TOKEN.into()),
        ..Config::default()
    };
    change(&mut config);
    let store = cxmpute_store::connect(&config.database_url).await.unwrap();
    let (mailer, mail) = Mailer::capture();
    let gw = Gateway::with_mailer(config, store.clone(), mailer).await.unwrap();
    App {
        router: gw.router(),
        state: gw.state().clone(),
        store,
        mail,
        _dir: dir,
    }
}

pub async fn app() -> App {
    app_with(WebConfig::default()).await
}

/// A browser's state: its cookies, by name.
#[derive(Default, Clone)]
pub struct Browser {
    pub cookies: Vec<(String, String)>,
}

impl Browser {
    pub fn with_session(token: &str) -> Browser {
        Browser {
            cookies: vec![("cx_session".into(), token.into())],
        }
    }

    fn header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn remember(&mut self, answer: &Answer) {
        for name in ["cx_session", "cx_login", "cx_link"] {
            if let Some(value) = answer.cookie(name) {
                self.cookies.retain(|(k, _)| k != name);
                if !value.is_empty() {
                    self.cookies.push((name.into(), value));
                }
            }
        }
    }

    pub fn get_cookie(&self, name: &str) -> Option<String> {
        self.cookies.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    /// The CSRF token of this browser's session.
    pub fn session_csrf(&self) -> String {
        csrf_of(&self.get_cookie("cx_session").unwrap_or_default())
    }

    /// The CSRF token of the login forms (after `GET /login`).
    pub fn login_csrf(&self) -> String {
        csrf_of(&self.get_cookie("cx_login").unwrap_or_default())
    }

    pub async fn send(
        &mut self,
        app: &App,
        method: Method,
        uri: &str,
        extra: &[(&str, &str)],
        content_type: Option<&str>,
        body: &str,
    ) -> Answer {
        let mut req = Request::builder().method(method).uri(uri);
        if !self.cookies.is_empty() {
            req = req.header(header::COOKIE, self.header());
        }
        if let Some(ct) = content_type {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        let res = app
            .router
            .clone()
            .oneshot(req.body(Body::from(body.to_string())).unwrap())
            .await
            .unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let answer = Answer {
            status,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        };
        self.remember(&answer);
        answer
    }

    pub async fn get(&mut self, app: &App, uri: &str) -> Answer {
        self.send(app, Method::GET, uri, &[], None, "").await
    }

    pub async fn form(&mut self, app: &App, uri: &str, fields: &[(&str, &str)]) -> Answer {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(fields)
            .finish();
        self.send(
            app,
            Method::POST,
            uri,
            &[],
            Some("application/x-www-form-urlencoded"),
            &body,
        )
        .await
    }

    /// A JSON call with the session's CSRF header.
    pub async fn json(&mut self, app: &App, method: Method, uri: &str, body: &str) -> Answer {
        let csrf = self.session_csrf();
        self.send(
            app,
            method,
            uri,
            &[("x-csrf-token", &csrf)],
            Some("application/json"),
            body,
        )
        .await
    }

    /// `GET /login` then `POST /login`: the code mailed is returned.
    pub async fn request_code(&mut self, app: &App, email: &str) -> Answer {
        if self.get_cookie("cx_login").is_none() {
            let page = self.get(app, "/login").await;
            assert_eq!(page.status, StatusCode::OK);
        }
        let csrf = self.login_csrf();
        self.form(app, "/login", &[("email", email), ("csrf", &csrf)]).await
    }

    pub async fn verify(&mut self, app: &App, email: &str, code: &str) -> Answer {
        let csrf = self.login_csrf();
        self.form(
            app,
            "/login/verify",
            &[("email", email), ("code", code), ("csrf", &csrf)],
        )
        .await
    }

    /// The whole login; panics unless it succeeds.
    pub async fn login(&mut self, app: &App, email: &str) {
        let sent = self.request_code(app, email).await;
        assert_eq!(sent.status, StatusCode::OK, "{}", sent.body);
        let code = last_code(app, email);
        let done = self.verify(app, email, &code).await;
        assert_eq!(done.status, StatusCode::SEE_OTHER, "{}", done.body);
        assert!(self.get_cookie("cx_session").is_some());
    }
}

/// The latest code mailed to `email`.
pub fn last_code(app: &App, email: &str) -> String {
    app.mail
        .lock()
        .unwrap()
        .iter()
        .rev()
        .find(|(to, _)| to.eq_ignore_ascii_case(email.trim()))
        .map(|(_, code)| code.clone())
        .unwrap_or_else(|| panic!("no code was sent to {email}"))
}

/// A session made directly in the store; returns its token.
pub async fn session_for(store: &dyn Store, account_id: &str) -> String {
    let token = random_secret();
    let now = now_millis();
    store
        .create_session(&hash_secret(&token), account_id, now, now + 3_600_000)
        .await
        .unwrap();
    token
}

/// Like [`app`], with the rest of the configuration edited by `edit`.
pub async fn app_configured(edit: impl FnOnce(&mut Config)) -> App {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        database_url: format!("sqlite://{}", dir.path().join("g.db").display()),
        web: WebConfig {
            admin_emails: vec![ADMIN_EMAIL.into()],
            ..WebConfig::default()
        },
        admin_token: Some(ADMIN_TOKEN.into()),
        ..Config::default()
    };
    edit(&mut config);
    let store = cxmpute_store::connect(&config.database_url).await.unwrap();
    let (mailer, mail) = Mailer::capture();
    let gw = Gateway::with_mailer(config, store.clone(), mailer).await.unwrap();
    App {
        router: gw.router(),
        store,
        state: gw.state().clone(),
        mail,
        _dir: dir,
    }
}
