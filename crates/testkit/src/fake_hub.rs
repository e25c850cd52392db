//! A loopback server that answers like the Hugging Face hub's file routes,
//! for the node's model downloads (point `HF_ENDPOINT` at [`FakeHub::url`]).
//!
//! `GET|HEAD /{org}/{name}/resolve/{revision}/{file}`: Git LFS files answer a
//! `HEAD` with a redirect carrying `X-Linked-Size` and `X-Linked-Etag` (the
//! SHA-256), as the hub does; small files kept in git with a plain
//! `Content-Length`. `Range: bytes=N-` is honoured. Faults on demand: a
//! connection cut after some bytes (once), or a claimed size unlike the real one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::ranged::{range_of, ranged_body};

/// A repository file on the fake hub.
#[derive(Debug, Clone)]
pub struct HubFile {
    pub body: Vec<u8>,
    /// Stored in LFS: `HEAD` announces X-Linked-Size and X-Linked-Etag (this).
    pub lfs_sha256: Option<String>,
    /// Cut the connection after this many body bytes (once).
    pub cut_after: Option<usize>,
    /// Announce this size instead of the real one.
    pub claimed_size: Option<u64>,
}

impl HubFile {
    /// A file stored with Git LFS whose SHA-256 (hex) the hub announces.
    pub fn lfs(body: Vec<u8>, sha256: impl Into<String>) -> Self {
        HubFile {
            body,
            lfs_sha256: Some(sha256.into()),
            cut_after: None,
            claimed_size: None,
        }
    }

    /// A small file kept in git: no checksum, only its size.
    pub fn git(body: &[u8]) -> Self {
        HubFile {
            body: body.to_vec(),
            lfs_sha256: None,
            cut_after: None,
            claimed_size: None,
        }
    }
}

/// One request the hub saw: method, `org/name/revision/file`, Range header.
pub type LoggedRequest = (String, String, Option<String>);

#[derive(Default)]
struct HubState {
    files: Mutex<HashMap<String, HubFile>>,
    log: Mutex<Vec<LoggedRequest>>,
}

impl HubState {
    fn files(&self) -> std::sync::MutexGuard<'_, HashMap<String, HubFile>> {
        self.files.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Vec<LoggedRequest>> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The running fake hub.
pub struct FakeHub {
    /// Base URL, e.g. `http://127.0.0.1:PORT`: the value for `HF_ENDPOINT`.
    pub url: String,
    state: Arc<HubState>,
}

impl FakeHub {
    /// Serves `files`, each keyed `org/name/revision/path/in/repo`.
    pub async fn start(files: Vec<(String, HubFile)>) -> anyhow::Result<FakeHub> {
        let state = Arc::new(HubState::default());
        state.files().extend(files);
        let app = Router::new()
            .route("/{org}/{name}/resolve/{rev}/{*file}", get(resolve))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(FakeHub {
            url: format!("http://{addr}"),
            state,
        })
    }

    /// Every request so far, in order.
    pub fn log(&self) -> Vec<LoggedRequest> {
        self.state.log().clone()
    }

    /// Changes a served file (e.g. to inject a fault); false when there is none.
    pub fn edit(&self, path: &str, change: impl FnOnce(&mut HubFile)) -> bool {
        self.state.files().get_mut(path).map(change).is_some()
    }
}

async fn resolve(
    State(state): State<Arc<HubState>>,
    method: Method,
    Path((org, name, rev, file)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let path = format!("{org}/{name}/{rev}/{file}");
    let range = range_of(&headers);
    state.log().push((method.to_string(), path.clone(), range.clone()));
    let Some(f) = state.files().get(&path).cloned() else {
        return (StatusCode::NOT_FOUND, "Entry not found").into_response();
    };
    let size = f.claimed_size.unwrap_or(f.body.len() as u64);
    if method == Method::HEAD {
        let mut res = Response::builder().header(header::CONTENT_LENGTH, f.body.len());
        if let Some(sha) = &f.lfs_sha256 {
            // Like the hub: LFS files answer with a redirect to the CDN.
            res = res
                .status(StatusCode::FOUND)
                .header(header::LOCATION, "https://cdn.invalid/blob")
                .header("x-linked-size", size)
                .header("x-linked-etag", format!("\"{sha}\""));
        } else {
            res = res.header(header::ETAG, "\"0123abcd\"");
        }
        return res.body(Body::empty()).unwrap_or_default();
    }
    if f.cut_after.is_some() {
        // Once: the next request gets the whole answer.
        if let Some(stored) = state.files().get_mut(&path) {
            stored.cut_after = None;
        }
    }
    ranged_body(&f.body, range.as_deref(), f.cut_after)
}
