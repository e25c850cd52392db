//! `cxmpute-provider models pull` against a loopback server acting as the
//! Hugging Face hub (HF_ENDPOINT points at it): resume after a cut
//! connection, checksum mismatches, missing files, no disk space, no hub.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::Path;
use std::process::Output;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};

/// A repository file on the fake hub.
#[derive(Clone)]
struct HubFile {
    body: Vec<u8>,
    /// Stored in LFS: HEAD announces X-Linked-Size and X-Linked-Etag (this).
    lfs_sha256: Option<String>,
    /// Cut the connection after this many body bytes (once).
    cut_after: Option<usize>,
    /// Announce this size instead of the real one.
    claimed_size: Option<u64>,
}

#[derive(Default)]
struct HubState {
    files: Mutex<HashMap<String, HubFile>>,
    /// (method, path, Range header) of every request.
    log: Mutex<Vec<(String, String, Option<String>)>>,
}

async fn resolve(
    State(state): State<Arc<HubState>>,
    method: Method,
    UrlPath((org, name, rev, file)): UrlPath<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let path = format!("{org}/{name}/{rev}/{file}");
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    state
        .log
        .lock()
        .unwrap()
        .push((method.to_string(), path.clone(), range.clone()));
    let Some(f) = state.files.lock().unwrap().get(&path).cloned() else {
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
        return res.body(Body::empty()).unwrap();
    }
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|r| r.parse::<usize>().ok())
        .unwrap_or(0)
        .min(f.body.len());
    let rest = f.body[start..].to_vec();
    let mut res = Response::builder().header(header::CONTENT_LENGTH, rest.len());
    if start > 0 {
        res = res.status(StatusCode::PARTIAL_CONTENT).header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{}", f.body.len() - 1, f.body.len()),
        );
    }
    if let Some(cut) = f.cut_after {
        // Once: the next request gets the whole answer.
        state.files.lock().unwrap().get_mut(&path).unwrap().cut_after = None;
        let head = Bytes::from(rest[..cut.min(rest.len())].to_vec());
        let body = futures_util::stream::iter(vec![
            Ok::<Bytes, std::io::Error>(head),
            Err(std::io::Error::other("connection cut")),
        ]);
        return res.body(Body::from_stream(body)).unwrap();
    }
    let body = futures_util::stream::iter(
        rest.chunks(64 * 1024)
            .map(|c| Ok::<Bytes, Infallible>(Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>(),
    );
    res.body(Body::from_stream(body)).unwrap()
}

async fn hub(files: Vec<(&str, HubFile)>) -> (String, Arc<HubState>) {
    let state = Arc::new(HubState::default());
    for (path, f) in files {
        state.files.lock().unwrap().insert(path.to_owned(), f);
    }
    let app = Router::new()
        .route("/{org}/{name}/resolve/{rev}/{*file}", get(resolve))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), state)
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn weights(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 251) as u8).collect()
}

fn lfs(body: Vec<u8>) -> HubFile {
    HubFile {
        lfs_sha256: Some(sha(&body)),
        body,
        cut_after: None,
        claimed_size: None,
    }
}

fn git(body: &[u8]) -> HubFile {
    HubFile {
        body: body.to_vec(),
        lfs_sha256: None,
        cut_after: None,
        claimed_size: None,
    }
}

async fn pull(endpoint: &str, models: &Path, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_cxmpute-provider"))
        .args(["models", "pull"])
        .args(args)
        .env("CXMPUTE_MODELS_DIR", models)
        .env("HF_ENDPOINT", endpoint)
        .env_remove("HF_TOKEN")
        .output()
        .await
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn model_files(big: Vec<u8>) -> Vec<(&'static str, HubFile)> {
    vec![
        ("org/tiny-embed/main/model.safetensors", lfs(big)),
        ("org/tiny-embed/main/config.json", git(b"{\"hidden_size\": 4}")),
        ("org/tiny-embed/main/tokenizer.json", git(b"{\"model\": {}}")),
    ]
}

#[tokio::test]
async fn an_interrupted_download_resumes_where_it_stopped() {
    let big = weights(3 << 20);
    let mut files = model_files(big.clone());
    files[0].1.cut_after = Some(1_200_000);
    let (endpoint, state) = hub(files).await;
    let tmp = tempfile::tempdir().unwrap();

    let first = pull(&endpoint, tmp.path(), &["org/tiny-embed"]).await;
    assert!(!first.status.success());
    let err = stderr(&first);
    assert!(
        err.contains("interrupted") && err.contains("run the command again"),
        "{err}"
    );
    let part = tmp.path().join(".partial/org--tiny-embed/model.safetensors.part");
    let kept = std::fs::metadata(&part).unwrap().len();
    assert!(kept >= 1_000_000 && kept < big.len() as u64, "{kept}");
    assert!(
        !tmp.path().join("org--tiny-embed").exists(),
        "no folder before it is complete"
    );

    let second = pull(&endpoint, tmp.path(), &["org/tiny-embed"]).await;
    assert!(second.status.success(), "{}", stderr(&second));
    let dir = tmp.path().join("org--tiny-embed");
    assert_eq!(
        String::from_utf8_lossy(&second.stdout).trim(),
        dir.display().to_string()
    );
    assert_eq!(std::fs::read(dir.join("model.safetensors")).unwrap(), big);
    assert_eq!(std::fs::read(dir.join("config.json")).unwrap(), b"{\"hidden_size\": 4}");
    assert!(stderr(&second).contains("resuming after"), "{}", stderr(&second));
    assert!(!tmp.path().join(".partial/org--tiny-embed").exists());

    // The second run asked only for the missing bytes.
    let gets: Vec<Option<String>> = state
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|(m, p, _)| m == "GET" && p.ends_with("model.safetensors"))
        .map(|(_, _, r)| r.clone())
        .collect();
    assert_eq!(gets, [None, Some(format!("bytes={kept}-"))]);

    // The cache lists it; a third run downloads nothing.
    let before = state.log.lock().unwrap().len();
    let third = pull(&endpoint, tmp.path(), &["org/tiny-embed"]).await;
    assert!(third.status.success());
    assert_eq!(state.log.lock().unwrap().len(), before);
}

#[tokio::test]
async fn a_checksum_mismatch_is_refused_and_discarded() {
    let mut files = model_files(weights(300_000));
    files[0].1.lfs_sha256 = Some(sha(b"something else"));
    let (endpoint, _) = hub(files).await;
    let tmp = tempfile::tempdir().unwrap();
    let out = pull(&endpoint, tmp.path(), &["org/tiny-embed"]).await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("checksum mismatch for model.safetensors"), "{err}");
    assert!(!tmp.path().join("org--tiny-embed").exists());
    assert!(!tmp
        .path()
        .join(".partial/org--tiny-embed/model.safetensors.part")
        .exists());
}

#[tokio::test]
async fn missing_files_unreachable_hubs_and_full_disks_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let (endpoint, state) = hub(model_files(weights(1000))).await;

    let out = pull(&endpoint, tmp.path(), &["org/tiny-embed", "--file", "model.gguf"]).await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("org/tiny-embed has no file 'model.gguf' at revision 'main'"),
        "{err}"
    );

    let out = pull(&endpoint, tmp.path(), &["org/../etc"]).await;
    assert!(
        stderr(&out).contains("not a Hugging Face repository id"),
        "{}",
        stderr(&out)
    );

    // A port nothing listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let out = pull(&format!("http://{closed}"), tmp.path(), &["org/tiny-embed"]).await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("cannot reach the Hugging Face hub at http://"), "{err}");

    // A file larger than any disk: refused before a single GET.
    state
        .files
        .lock()
        .unwrap()
        .get_mut("org/tiny-embed/main/model.safetensors")
        .unwrap()
        .claimed_size = Some(1 << 60);
    let out = pull(&endpoint, tmp.path(), &["org/tiny-embed"]).await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("not enough disk space"), "{err}");
    assert!(!state.log.lock().unwrap().iter().any(|(m, _, _)| m == "GET"));
}
