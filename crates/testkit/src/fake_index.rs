//! A loopback Python package index, for the node's wheel downloads (point
//! `CXMPUTE_PYPI_INDEX_URL` at [`FakeIndex::url`]).
//!
//! `GET /simple/{project}/` answers the project page of the simple repository
//! API: JSON (PEP 691) when the client accepts it and the index was started
//! with [`PageFormat::Json`], HTML anchors (PEP 503) otherwise. Files are at
//! `GET|HEAD /files/{filename}`, with `Range: bytes=N-` honoured. Faults on
//! demand: a connection cut after some bytes (once), a wrong listed checksum,
//! and file downloads held until the test lets them go ([`FakeIndex::hold`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::json;

use crate::ranged::{range_of, ranged_body};

/// How project pages are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageFormat {
    /// PEP 691 JSON with sizes (what PyPI serves), HTML to clients that ask for it.
    Json,
    /// PEP 503 HTML only, checksums in the link fragment (what plain mirrors serve).
    Html,
}

/// A file the index lists.
#[derive(Debug, Clone)]
pub struct IndexFile {
    pub body: Vec<u8>,
    /// The SHA-256 the page lists (hex); may be made wrong to inject a fault.
    pub sha256: Option<String>,
    /// Cut the connection after this many body bytes (once).
    pub cut_after: Option<usize>,
}

impl IndexFile {
    pub fn new(body: Vec<u8>, sha256: impl Into<String>) -> Self {
        IndexFile {
            body,
            sha256: Some(sha256.into()),
            cut_after: None,
        }
    }
}

/// One request the index saw: method, path, Range header.
pub type LoggedRequest = (String, String, Option<String>);

struct IndexState {
    format: PageFormat,
    /// Normalized project name → file names, in listing order.
    projects: Mutex<HashMap<String, Vec<String>>>,
    files: Mutex<HashMap<String, IndexFile>>,
    log: Mutex<Vec<LoggedRequest>>,
    /// False while file downloads are held.
    open: tokio::sync::watch::Sender<bool>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The running fake index.
pub struct FakeIndex {
    /// The simple API's root, `http://127.0.0.1:PORT/simple/`.
    pub url: String,
    state: Arc<IndexState>,
}

impl FakeIndex {
    pub async fn start(format: PageFormat) -> anyhow::Result<FakeIndex> {
        let state = Arc::new(IndexState {
            format,
            projects: Mutex::default(),
            files: Mutex::default(),
            log: Mutex::default(),
            open: tokio::sync::watch::Sender::new(true),
        });
        let app = Router::new()
            .route("/simple/{project}/", get(page))
            .route("/files/{filename}", get(file))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(FakeIndex {
            url: format!("http://{addr}/simple/"),
            state,
        })
    }

    /// Lists `filename` on the page of `project` (already normalized: `my-pkg`).
    pub fn add(&self, project: &str, filename: &str, file: IndexFile) {
        lock(&self.state.projects)
            .entry(project.to_owned())
            .or_default()
            .push(filename.to_owned());
        lock(&self.state.files).insert(filename.to_owned(), file);
    }

    /// Changes a listed file (e.g. to inject a fault); false when there is none.
    pub fn edit(&self, filename: &str, change: impl FnOnce(&mut IndexFile)) -> bool {
        lock(&self.state.files).get_mut(filename).map(change).is_some()
    }

    /// Holds every file download (GET) until [`FakeIndex::release`]; pages and
    /// HEAD requests still answer.
    pub fn hold(&self) {
        self.state.open.send_replace(false);
    }

    /// Lets held and later downloads go.
    pub fn release(&self) {
        self.state.open.send_replace(true);
    }

    /// Every request so far, in order.
    pub fn log(&self) -> Vec<LoggedRequest> {
        lock(&self.state.log).clone()
    }
}

async fn page(State(state): State<Arc<IndexState>>, Path(project): Path<String>, headers: HeaderMap) -> Response {
    lock(&state.log).push(("GET".into(), format!("/simple/{project}/"), None));
    let Some(names) = lock(&state.projects).get(&project).cloned() else {
        return (StatusCode::NOT_FOUND, "Not Found").into_response();
    };
    let files: Vec<(String, IndexFile)> = {
        let all = lock(&state.files);
        names
            .into_iter()
            .filter_map(|n| all.get(&n).cloned().map(|f| (n, f)))
            .collect()
    };
    let wants_json = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/vnd.pypi.simple.v1+json"));
    if state.format == PageFormat::Json && wants_json {
        let list: Vec<_> = files
            .iter()
            .map(|(name, f)| {
                json!({
                    // Relative, as PyPI's own are not: clients must resolve them.
                    "filename": name, "url": format!("../../files/{name}"),
                    "hashes": f.sha256.as_ref().map(|s| json!({ "sha256": s })).unwrap_or(json!({})),
                    "size": f.body.len(), "yanked": false,
                })
            })
            .collect();
        let body = json!({ "meta": { "api-version": "1.1" }, "name": project, "files": list });
        return Response::builder()
            .header(header::CONTENT_TYPE, "application/vnd.pypi.simple.v1+json")
            .body(Body::from(body.to_string()))
            .unwrap_or_default();
    }
    let mut html = format!("<!DOCTYPE html>\n<html><body><h1>Links for {project}</h1>\n");
    for (name, f) in &files {
        let fragment = f.sha256.as_ref().map(|s| format!("#sha256={s}")).unwrap_or_default();
        html.push_str(&format!("<a href=\"/files/{name}{fragment}\">{name}</a><br/>\n"));
    }
    html.push_str("</body></html>\n");
    Response::builder()
        .header(header::CONTENT_TYPE, "text/html")
        .body(Body::from(html))
        .unwrap_or_default()
}

async fn file(
    State(state): State<Arc<IndexState>>,
    method: Method,
    Path(filename): Path<String>,
    headers: HeaderMap,
) -> Response {
    let range = range_of(&headers);
    lock(&state.log).push((method.to_string(), format!("/files/{filename}"), range.clone()));
    let Some(f) = lock(&state.files).get(&filename).cloned() else {
        return (StatusCode::NOT_FOUND, "Not Found").into_response();
    };
    if method == Method::HEAD {
        return Response::builder()
            .header(header::CONTENT_LENGTH, f.body.len())
            .body(Body::empty())
            .unwrap_or_default();
    }
    let mut open = state.open.subscribe();
    let _ = open.wait_for(|open| *open).await;
    if f.cut_after.is_some() {
        if let Some(stored) = lock(&state.files).get_mut(&filename) {
            stored.cut_after = None;
        }
    }
    ranged_body(&f.body, range.as_deref(), f.cut_after)
}
