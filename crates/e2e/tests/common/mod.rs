//! The end-to-end harness: real `cxmpute-gateway` and `cxmpute-provider`
//! processes on loopback ports, a fresh database per test (a SQLite file, or a
//! new PostgreSQL database when `CXMPUTE_TEST_POSTGRES_URL` is set).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cxmpute_store::Store;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub mod mail;

pub const ADMIN_TOKEN: &str = "e2e-admin-token-0123456789";

/// A binary of this workspace, built next to the test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo nextest run --workspace` (or cargo test --workspace) so the binaries are built",
        path.display()
    );
    path
}

pub struct Db {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    pg: Option<(String, String)>,
}

impl Db {
    pub async fn sqlite() -> Db {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("gateway.db").display());
        Db {
            url,
            _dir: Some(dir),
            pg: None,
        }
    }

    /// A fresh PostgreSQL database, or None when no server is configured.
    pub async fn postgres() -> Option<Db> {
        let Ok(base) = std::env::var("CXMPUTE_TEST_POSTGRES_URL") else {
            eprintln!("CXMPUTE_TEST_POSTGRES_URL is not set: skipping the PostgreSQL variant");
            return None;
        };
        use sqlx::Connection;
        let name = format!("cx_e2e_{}", rand::random::<u32>());
        let mut conn = sqlx::PgConnection::connect(&base).await.expect("connect to PostgreSQL");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        let (prefix, _) = base.rsplit_once('/').expect("database URL with a path");
        Some(Db {
            url: format!("{prefix}/{name}"),
            _dir: None,
            pg: Some((base, name)),
        })
    }

    pub async fn store(&self) -> Arc<dyn Store> {
        cxmpute_store::connect(&self.url).await.unwrap()
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        if let Some((base, name)) = self.pg.take() {
            // Best effort, on a thread of its own: Drop cannot be async.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    use sqlx::Connection;
                    if let Ok(mut c) = sqlx::PgConnection::connect(&base).await {
                        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                            .execute(&mut c)
                            .await;
                    }
                });
            })
            .join();
        }
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

pub struct Gateway {
    pub child: Child,
    pub url: String,
    pub port: u16,
    pub db_url: String,
    pub http: reqwest::Client,
}

impl Gateway {
    pub async fn start(db_url: &str) -> Gateway {
        Gateway::start_on(db_url, 0).await
    }

    pub async fn start_on(db_url: &str, port: u16) -> Gateway {
        Gateway::start_with(db_url, port, &[]).await
    }

    /// Like [`Gateway::start_on`], with more global arguments (e.g. `--config FILE`).
    pub async fn start_with(db_url: &str, port: u16, extra: &[&str]) -> Gateway {
        let mut child = Command::new(bin("cxmpute-gateway"))
            .args(extra)
            .args([
                "--database-url",
                db_url,
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .env("CXMPUTE_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("CXMPUTE_ALLOW_PRIVATE_DIRECT_URLS", "1")
            .env(
                "CXMPUTE_LOG",
                std::env::var("CXMPUTE_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn cxmpute-gateway");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let url = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(url) = line.strip_prefix("listening on ") {
                    return url.to_string();
                }
            }
            panic!("the gateway exited before listening");
        })
        .await
        .expect("gateway did not start in 60 s");
        let port = url.rsplit(':').next().unwrap().parse().unwrap();
        Gateway {
            child,
            url,
            port,
            db_url: db_url.to_string(),
            http: client(),
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.start_kill();
    }

    pub async fn admin(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self
            .http
            .request(method, format!("{}/admin{path}", self.url))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.unwrap();
        let status = res.status();
        let v: Value = res.json().await.unwrap();
        assert!(status.is_success(), "admin {path}: {status} {v}");
        v
    }

    /// A new account with `credits`, and an API key for it.
    pub async fn account(&self, credits: i64, key_opts: Value) -> (String, String) {
        let acc = self
            .admin(reqwest::Method::POST, "/accounts", Some(json!({"name": "e2e"})))
            .await;
        let id = acc["id"].as_str().unwrap().to_string();
        if credits > 0 {
            self.admin(
                reqwest::Method::POST,
                &format!("/accounts/{id}/deposit"),
                Some(json!({"amount": credits})),
            )
            .await;
        }
        let key = self
            .admin(reqwest::Method::POST, &format!("/accounts/{id}/keys"), Some(key_opts))
            .await;
        (id, key["key"].as_str().unwrap().to_string())
    }

    /// A provider account with a device; returns (account id, credential).
    pub async fn device(&self) -> (String, String) {
        let acc = self
            .admin(reqwest::Method::POST, "/accounts", Some(json!({"name": "provider"})))
            .await;
        let id = acc["id"].as_str().unwrap().to_string();
        let dev = self
            .admin(
                reqwest::Method::POST,
                &format!("/accounts/{id}/devices"),
                Some(json!({"name": "node"})),
            )
            .await;
        (id, dev["credential"].as_str().unwrap().to_string())
    }

    /// How many providers serve `model` (0 when it is not listed).
    pub async fn providers(&self, model: &str) -> u64 {
        let Ok(res) = self.http.get(format!("{}/v1/models", self.url)).send().await else {
            return 0;
        };
        let v: Value = res.json().await.unwrap_or(Value::Null);
        v["data"]
            .as_array()
            .and_then(|d| d.iter().find(|m| m["id"] == model))
            .and_then(|m| m["providers"].as_u64())
            .unwrap_or(0)
    }

    /// Waits until `model` has exactly `n` providers; returns the time it took.
    pub async fn wait_providers(&self, model: &str, n: u64, timeout: Duration) -> Duration {
        let started = Instant::now();
        loop {
            if self.providers(model).await == n {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < timeout,
                "{model} did not reach {n} providers within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn post(&self, path: &str, key: &str) -> reqwest::RequestBuilder {
        self.http.post(format!("{}{path}", self.url)).bearer_auth(key)
    }
}

pub struct Node {
    pub child: Child,
}

impl Node {
    /// Starts a node linked to `gw`. Without `--embeddings` in `args` the
    /// built-in MiniLM engine is off (it takes seconds to load); without
    /// `--chat` the built-in chat engine is, and without `--speech` the
    /// built-in voice.
    pub async fn start(gw: &Gateway, credential: &str, args: &[&str]) -> Node {
        Self::start_with_env(gw, credential, args, &[]).await
    }

    /// [`Node::start`] with extra environment variables.
    pub async fn start_with_env(gw: &Gateway, credential: &str, args: &[&str], env: &[(&str, &str)]) -> Node {
        let mut cmd = Command::new(bin("cxmpute-provider"));
        cmd.envs(env.iter().copied());
        cmd.arg("start").args(["--gateway", &gw.url, "--headless"]);
        if !args.contains(&"--embeddings") {
            cmd.arg("--no-embeddings");
        }
        if !args.contains(&"--chat") {
            cmd.arg("--no-chat");
        }
        if !args.contains(&"--speech") {
            cmd.arg("--no-speech");
        }
        cmd.args(
            args.iter()
                .filter(|a| !matches!(**a, "--embeddings" | "--chat" | "--speech")),
        )
        .env("CXMPUTE_CREDENTIAL", credential)
        .env(
            "CXMPUTE_LOG",
            std::env::var("CXMPUTE_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .kill_on_drop(true);
        Node {
            child: cmd.spawn().expect("spawn cxmpute-provider"),
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.start_kill();
    }

    pub fn terminate(&self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
}

/// Reads an SSE body into its `data:` payloads.
pub fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|ev| {
            ev.lines()
                .find_map(|l| l.strip_prefix("data:"))
                .map(|d| d.trim().to_string())
        })
        .collect()
}

/// The sum of a column over an account's usage rows, and their count.
pub async fn usage_totals(store: &dyn Store, account: &str) -> (i64, usize) {
    let rows = store.usage_for_account(account, 100_000).await.unwrap();
    (rows.iter().map(|r| r.cost).sum(), rows.len())
}

/// [`usage_totals`] once the account has at least `rows` usage rows, or
/// after 10 s. The tests read the gateway's database from a store of their
/// own, as an `admin` command does, and a serving gateway on SQLite applies
/// its journaled settlements to the file a few milliseconds after the
/// answers end (decisions 57 and 65); reads through the gateway itself
/// wait for them.
#[allow(dead_code)]
pub async fn settled_usage(store: &dyn Store, account: &str, rows: usize) -> (i64, usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let totals = usage_totals(store, account).await;
        if totals.1 >= rows || tokio::time::Instant::now() >= deadline {
            return totals;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The model cache root, found the way the node finds it
/// (crates/provider/src/models.rs).
#[allow(dead_code)]
pub fn models_root() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("CXMPUTE_MODELS_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("cxmpute").join("models")))
        .or_else(|| var("HOME").map(|h| h.join(".cache").join("cxmpute").join("models")))
}

/// True when what a test needs is there. When it is not, the test should
/// return early: it passes with a loud SKIP message, unless
/// CXMPUTE_REQUIRE_MODELS is set (CI sets it), when this fails instead.
#[allow(dead_code)]
pub fn present_or_skip(present: bool, what: &str, fix: &str) -> bool {
    if present {
        return true;
    }
    assert!(
        std::env::var_os("CXMPUTE_REQUIRE_MODELS").is_none_or(|v| v.is_empty()),
        "CXMPUTE_REQUIRE_MODELS is set but {what} is missing; {fix}"
    );
    eprintln!("\n*** SKIPPED: {what} is missing. {fix} ***\n");
    false
}

/// Serves `/article`, a small article page with a script, on a loopback port
/// for the scraper; returns its base URL.
#[allow(dead_code)]
pub async fn page_server() -> String {
    let app = axum::Router::new().route(
        "/article",
        axum::routing::get(|| async {
            axum::response::Html(
                "<html><head><title>Tides</title></head><body><article><h1>Tides of the North</h1>\
                 <p>The tide rises twice a day along the northern coast, and the fishermen plan by it.</p>\
                 <p>Read <a href=\"/more\">more about tides</a>.</p></article><script>alert('x')</script></body></html>",
            )
        }),
    )
    // A 4 MiB plain-text page, for answers larger than any buffer on the way.
    .route(
        "/big",
        axum::routing::get(|| async {
            (
                [(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                "tide ".repeat((4 << 20) / 5),
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

/// Cosine similarity of two vectors.
#[allow(dead_code)]
pub fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

/// The float vectors of an OpenAI embeddings answer, in order.
#[allow(dead_code)]
pub fn embedding_vectors(answer: &Value) -> Vec<Vec<f64>> {
    answer["data"]
        .as_array()
        .expect("an embeddings answer has data")
        .iter()
        .map(|d| {
            d["embedding"]
                .as_array()
                .expect("float embeddings")
                .iter()
                .map(|x| x.as_f64().expect("a float"))
                .collect()
        })
        .collect()
}
